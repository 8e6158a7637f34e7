"""The seam between the models and the kernels: every hot op of the SpidR/DinoSR objective.

One stem per op: `ops/<stem>.py` holds its public function (the only place that checks the inputs) and its
plain-PyTorch reference, `ops/kernels/<stem>.py` its fused implementation, registered as a backend that
`_dispatch` picks: a fused kernel on CUDA tensors when one is registered, the reference otherwise (see `_dispatch`
for the override). Stems: codebook, heads_cross_entropy, attention, feature_extractor.
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
from spidr_fast.ops.feature_extractor import feature_extractor
from spidr_fast.ops.heads_cross_entropy import heads_cross_entropy
from spidr_fast.ops.kernels import attention as _attention_kernel  # noqa: F401 - registers its "cuda" backend

if importlib.util.find_spec("triton") is not None:  # registers the "triton" backend of each op
    from spidr_fast.ops.kernels import codebook as _codebook_kernel  # noqa: F401
    from spidr_fast.ops.kernels import feature_extractor as _feature_extractor_kernel  # noqa: F401
    from spidr_fast.ops.kernels import heads_cross_entropy as _heads_cross_entropy_kernel  # noqa: F401

__all__ = [
    "BACKENDS",
    "METRICS",
    "attention",
    "codebook_assign",
    "codebook_ema_update_",
    "codebook_statistics",
    "feature_extractor",
    "forced_backend",
    "heads_cross_entropy",
    "instance_norm_assign",
    "instance_norm_select",
    "set_backend",
]
