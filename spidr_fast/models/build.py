"""Build a model from a config, or from a checkpoint saved by spidr_fast or by the official `spidr` package."""

import json
import warnings
from pathlib import Path
from typing import get_args

import torch

from spidr_fast.models.config import DinoSRConfig, ModelType, SpidRConfig
from spidr_fast.models.dinosr import DinoSR
from spidr_fast.models.spidr import SpidR

MODEL_CLASSES: dict[str, type[DinoSR]] = {"dinosr": DinoSR, "spidr": SpidR}
# Prefixes that wrappers add to parameter names: DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    stripped = {}
    for key, value in state_dict.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        stripped[key] = value
    return stripped


def load_checkpoint(model_type: ModelType, checkpoint: str | Path) -> DinoSR:
    """A model from a `.pt` state dict (bare, or under "model"), with the config from a `config.json` beside it
    (bare, or under "model") when there is one, the defaults otherwise."""
    path = Path(checkpoint)
    if path.suffix != ".pt":
        raise ValueError(f"checkpoint must be a .pt file, got {path}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    model_class = MODEL_CLASSES[model_type]
    config_path = path.parent / "config.json"
    if config_path.is_file():
        fields = json.loads(config_path.read_text(encoding="utf-8"))
        cfg = model_class.config_class(**fields.get("model", fields))
    else:
        warnings.warn(f"no config.json beside {path}: using the default {model_type} config", stacklevel=2)
        cfg = model_class.config_class()
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = state_dict.get("model", state_dict)
    model = model_class(cfg)
    model.load_state_dict(_strip_wrapper_prefixes(state_dict))
    return model


def build_model(
    *,
    cfg: DinoSRConfig | SpidRConfig | None = None,
    model_type: ModelType | None = None,
    checkpoint: str | Path | None = None,
) -> DinoSR:
    """`build_model(cfg=SpidRConfig())`, or `build_model(model_type="spidr", checkpoint="ckpt.pt")`."""
    if checkpoint is not None:
        if model_type not in MODEL_CLASSES:
            raise ValueError(f"model_type must be one of {get_args(ModelType)} with a checkpoint, got {model_type!r}")
        return load_checkpoint(model_type, checkpoint)
    if isinstance(cfg, SpidRConfig):  # checked first: a SpidRConfig is also a DinoSRConfig
        return SpidR(cfg)
    if isinstance(cfg, DinoSRConfig):
        return DinoSR(cfg)
    if cfg is None and model_type in MODEL_CLASSES:
        return MODEL_CLASSES[model_type]()
    raise ValueError(f"give cfg (SpidRConfig or DinoSRConfig), model_type or a checkpoint; got cfg={cfg!r}")
