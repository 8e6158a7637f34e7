"""The seam between the models and the kernels: every hot op of the SpidR/DinoSR objective.

Each op validates its inputs here and runs the implementation that `_dispatch` picks: a fused kernel on CUDA
tensors when one is registered, the plain-PyTorch reference otherwise (see `_dispatch` for the override).
"""

from spidr_fast.ops._dispatch import BACKENDS, forced_backend, set_backend
from spidr_fast.ops.attention import attention
from spidr_fast.ops.codebook import METRICS, codebook_assign, codebook_ema_update_, instance_norm_select
from spidr_fast.ops.heads import heads_cross_entropy

__all__ = [
    "BACKENDS",
    "METRICS",
    "attention",
    "codebook_assign",
    "codebook_ema_update_",
    "forced_backend",
    "heads_cross_entropy",
    "instance_norm_select",
    "set_backend",
]
