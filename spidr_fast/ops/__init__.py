"""The seam between the models and the kernels: every hot op of the SpidR/DinoSR objective.

Each op validates its inputs here and runs the implementation that `_dispatch` picks: a fused kernel on CUDA
tensors when one is registered, the plain-PyTorch reference otherwise (see `_dispatch` for the override).
"""

import importlib.util

from spidr_fast.ops._dispatch import BACKENDS, forced_backend, set_backend
from spidr_fast.ops.attention import attention
from spidr_fast.ops.codebook import (
    METRICS,
    codebook_assign,
    codebook_ema_update_,
    codebook_statistics,
    instance_norm_assign,
    instance_norm_select,
)
from spidr_fast.ops.heads import heads_cross_entropy

if importlib.util.find_spec("triton") is not None:  # registers the "triton" backend of each op
    import spidr_fast.ops.kernels  # noqa: F401

__all__ = [
    "BACKENDS",
    "METRICS",
    "attention",
    "codebook_assign",
    "codebook_ema_update_",
    "codebook_statistics",
    "forced_backend",
    "heads_cross_entropy",
    "instance_norm_assign",
    "instance_norm_select",
    "set_backend",
]
