"""Drop-in modules for other self-supervised models built on the fused ops; `nn` depends on `ops` and on
`spidr_fast.distributed` (torch only).

EMACodebooks    online EMA codebooks (the official DinoSR/SpidR buffers `{i}.codebook`, `{i}.counts`)
OnlineCodebook  one online codebook in the style of vector-quantize-pytorch's VectorQuantize: (B, T, D) → labels
FusedHeads      L prediction heads and their cross-entropy, linear or cosine logits
"""

from spidr_fast.nn.codebook import EMACodebooks
from spidr_fast.nn.heads_cross_entropy import FusedHeads
from spidr_fast.nn.online_codebook import OnlineCodebook

__all__ = ["EMACodebooks", "FusedHeads", "OnlineCodebook"]
