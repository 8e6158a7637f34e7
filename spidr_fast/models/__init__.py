"""SpidR and DinoSR, state-dict compatible with the official `spidr` 0.2.0 package."""

from spidr_fast.models.build import build_model
from spidr_fast.models.config import DEFAULT_CONV_LAYER_CONFIG, SAMPLE_RATE, DinoSRConfig, ModelType, SpidRConfig
from spidr_fast.models.dinosr import DinoSR, masked_frame_index, perplexity
from spidr_fast.models.spidr import SpidR

__all__ = [
    "DEFAULT_CONV_LAYER_CONFIG",
    "SAMPLE_RATE",
    "DinoSR",
    "DinoSRConfig",
    "ModelType",
    "SpidR",
    "SpidRConfig",
    "build_model",
    "masked_frame_index",
    "perplexity",
]
