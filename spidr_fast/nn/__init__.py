"""Drop-in modules for other self-supervised models built on the fused ops; `nn` depends on `ops` only.

EMACodebooks  online EMA codebooks (the official DinoSR/SpidR buffers `{i}.codebook`, `{i}.counts`)
FusedHeads    L prediction heads and their cross-entropy, linear or cosine logits
"""

from spidr_fast.nn.codebook import EMACodebooks
from spidr_fast.nn.heads_cross_entropy import FusedHeads

__all__ = ["EMACodebooks", "FusedHeads"]
