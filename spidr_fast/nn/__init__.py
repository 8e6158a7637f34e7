"""Drop-in modules for other self-supervised models built on the fused ops.

    EMACodebooks  online EMA codebooks (the official DinoSR/SpidR buffers `{i}.codebook`, `{i}.counts`)
    FusedHeads    L prediction heads and their cross-entropy, linear or cosine logits
"""

from spidr_fast.models.codebooks import Codebooks as EMACodebooks
from spidr_fast.nn.heads import FusedHeads

__all__ = ["EMACodebooks", "FusedHeads"]
