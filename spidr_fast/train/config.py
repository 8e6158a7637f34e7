"""Training configuration: the official TOML/JSON sections and field names (run, data, model, optimizer, masking,
validation), so an official config file runs as it is, plus a few fields of ours with defaults.

With no file, `SYNTHETIC_DEFAULTS` trains a small SpidR on the built-in synthetic corpus in a few CPU minutes.
"""

import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from spidr_fast.data.loading import DataConfig
from spidr_fast.data.masking import MaskingConfig
from spidr_fast.models.config import DinoSRConfig, ModelType, SpidRConfig


@dataclass(frozen=True)
class RunConfig:
    """The official run section; the run folder is workdir/wandb_project/wandb_name."""

    workdir: str = "runs"
    wandb_project: str = "spidr_fast"
    wandb_name: str = "synthetic"
    wandb_mode: Literal["online", "offline", "disabled"] = "offline"
    random_seed: int = 0
    use_deterministic: bool = False
    log_interval: int = 200
    save_interval: int = 2_500
    init_ckpt: str | None = None
    compile: bool = True
    keep_latest: int = -1
    model_type: ModelType = "dinosr"
    slurm_validation: dict | None = None
    # spidr_fast
    accumulate: int = 1  # micro-batches per optimizer step
    max_nonfinite_steps: int = 10  # skipped steps in a row before the run stops
    collective_timeout: int = 600  # seconds a rank waits in a collective for a dead or stuck peer
    validate_interval: int = 0  # steps; 0 validates only at the end
    loggers: list[str] = field(default_factory=list)  # "wandb" and/or "tensorboard", when installed

    def __post_init__(self) -> None:
        _check_choice("run.model_type", self.model_type, ("spidr", "dinosr"))
        _check_choice("run.wandb_mode", self.wandb_mode, ("online", "offline", "disabled"))
        for logger in self.loggers:
            _check_choice("run.loggers", logger, ("wandb", "tensorboard"))
        _check_positive("run.accumulate", self.accumulate)
        _check_positive("run.log_interval", self.log_interval)
        _check_positive("run.save_interval", self.save_interval)
        _check_positive("run.max_nonfinite_steps", self.max_nonfinite_steps)
        _check_positive("run.collective_timeout", self.collective_timeout)

    @property
    def dir(self) -> Path:
        return Path(self.workdir) / self.wandb_project / self.wandb_name


@dataclass(frozen=True)
class OptimizerConfig:
    """The official optimizer section: AdamW and the learning-rate schedule."""

    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.01
    eps: float = 1e-6
    max_norm: float = 10.0
    dtype: Literal["float32", "float16", "bfloat16"] = "bfloat16"
    init_lr_scale: float = 0.01
    final_lr_scale: float = 0.01
    max_steps: int = 400_000
    warmup_steps: int = 12_000
    hold_steps: int = 188_000
    decay_steps: int = 200_000
    rsqrt_timescale: int = 10_000
    rsqrt_shift: int = 0
    scheduler: Literal["tristage", "cosine", "rsqrt", "constant"] = "tristage"
    exclude_from_optimizer: list[str] = field(default_factory=lambda: ["teacher"])
    to_freeze: list[str] = field(default_factory=lambda: ["feature_extractor", "feature_projection"])

    def __post_init__(self) -> None:
        _check_choice("optimizer.dtype", self.dtype, ("float32", "float16", "bfloat16"))
        _check_choice("optimizer.scheduler", self.scheduler, ("tristage", "cosine", "rsqrt", "constant"))
        _check_positive("optimizer.max_steps", self.max_steps)
        if self.lr <= 0:
            raise ValueError(f"optimizer.lr must be positive, got {self.lr}")


@dataclass(frozen=True)
class TrainConfig:
    run: RunConfig
    data: DataConfig
    model: DinoSRConfig | SpidRConfig
    optimizer: OptimizerConfig
    masking: MaskingConfig
    validation: dict[str, DataConfig]


def _check_choice(name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")


def _has_type(value: object, expected: type) -> bool:
    if isinstance(value, bool) and expected is not bool:  # bool is an int subclass, but not a number here
        return False
    return isinstance(value, expected) or (expected is float and isinstance(value, int))


def _build(cls: type, section: str, values: dict[str, Any]) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"[{section}] must be a table of fields, got {values!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"unknown field {section}.{unknown[0]} (known fields of [{section}]: {', '.join(sorted(known))})"
        )
    for f in fields(cls):
        if f.name in values and f.type in (int, float, bool, str) and not _has_type(values[f.name], f.type):
            raise ValueError(f"{section}.{f.name} must be {f.type.__name__}, got {values[f.name]!r}")
    try:
        return cls(**values)
    except TypeError as error:
        raise ValueError(f"[{section}]: {error}") from error


SECTIONS = ("run", "data", "model", "optimizer", "masking", "validation")


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    """Each section's fields over the official defaults; an unknown section or field is an error naming it."""
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown config section [{unknown[0]}] (known: {', '.join(SECTIONS)})")
    run = _build(RunConfig, "run", raw.get("run", {}))
    model_class = SpidRConfig if run.model_type == "spidr" else DinoSRConfig
    validation = raw.get("validation", {})
    model = _build(model_class, "model", raw.get("model", {}))
    if not 1 <= model.num_codebooks <= model.encoder_num_layers:  # training reads one teacher layer per codebook
        raise ValueError(
            f"model.num_codebooks ({model.num_codebooks}) must be between 1 and "
            f"model.encoder_num_layers ({model.encoder_num_layers}) to train"
        )
    return TrainConfig(
        run=run,
        data=_build(DataConfig, "data", raw.get("data", {})),
        model=model,
        optimizer=_build(OptimizerConfig, "optimizer", raw.get("optimizer", {})),
        masking=_build(MaskingConfig, "masking", raw.get("masking", {})),
        validation={name: _build(DataConfig, f"validation.{name}", v) for name, v in validation.items()},
    )


def merge(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`raw` with the fields of `overrides` replaced, recursively through nested tables (an empty table
    replaces, so that `{"validation": {}}` removes every validation set)."""
    merged = dict(raw)
    for name, value in overrides.items():
        if isinstance(value, dict) and value and isinstance(merged.get(name), dict):
            merged[name] = merge(merged[name], value)
        else:
            merged[name] = value
    return merged


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        return tomllib.loads(text)
    if path.suffix == ".json":
        return json.loads(text)
    raise ValueError(f"config file must be .toml or .json, got {path}")


def parse_override(assignment: str) -> dict[str, Any]:
    """ "section.field=value" or "validation.name.field=value" (value in TOML syntax, or a bare string) → the
    nested dict {"section": {"field": value}}."""
    key, sep, value = assignment.partition("=")
    path = key.strip().split(".")
    if not sep or len(path) < 2 or not all(path):
        raise ValueError(f"--set expects section.field=value, got {assignment!r}")
    try:
        parsed: Any = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    for name in reversed(path):
        parsed = {name: parsed}
    return parsed


# A small SpidR on the synthetic corpus: a few minutes of training on 2 CPU cores.
SYNTHETIC_DEFAULTS: dict[str, Any] = {
    "run": {
        "model_type": "spidr",
        "log_interval": 10,
        "save_interval": 100,
        "keep_latest": 2,
        "compile": False,
        "validate_interval": 200,
    },
    # Every clip (2 to 4 s) cropped to 2 s and full batches only: one shape, so --compile compiles once (CPU
    # inductor specialises convolution lengths, so varying crops would recompile there). Three clips a batch: twice
    # the steps per second of seven, so runs leave the plateau as soon in wall time and 600 steps fit the 10-minute
    # CPU budget (docs/synthetic-runs.md).
    "data": {
        "max_sample_size": 32_000,
        "max_batch_length": 112_000,
        "num_buckets": 4,
        "num_workers": 2,
        "min_sample_size": 32_000,
        "drop_last": True,
    },
    "model": {
        "extractor_conv_layer_config": [
            [128, 10, 5],
            [128, 3, 2],
            [128, 3, 2],
            [128, 3, 2],
            [128, 3, 2],
            [128, 2, 2],
            [128, 2, 2],
        ],  # 20 ms frames, as the official
        "encoder_embed_dim": 192,
        "encoder_num_heads": 4,
        "encoder_num_layers": 6,
        "encoder_ff_interm_features": 512,
        # Two 4-tap layers, 7 frames seen: the official 95 at depth 5 (91 frames) on 2 s clips, or 32 at depth 2
        # (31 frames), marks the frames near the clip's edges through its zero padding, and the codebooks then
        # encode the frame's position instead of its phone (docs/synthetic-runs.md: What the collapse is).
        "encoder_pos_conv_kernel": 8,
        "encoder_pos_conv_groups": 8,
        "encoder_pos_conv_depth": 2,
        "num_codebooks": 4,
        "codebook_size": 64,
    },
    # 1e-3 leaves the heads on one unit and the codebooks on a plateau on some seeds (docs/synthetic-runs.md).
    "optimizer": {"lr": 3e-4, "dtype": "float32", "max_steps": 600, "warmup_steps": 30, "scheduler": "cosine"},
    "validation": {
        "synthetic": {
            "synthetic_utterances": 64,
            "synthetic_seed": 1,
            "num_workers": 0,
            "max_sample_size": 64_000,
            "max_batch_length": 400_000,
            "num_buckets": 4,
            "min_sample_size": 16_000,
        }
    },
}
# Each model's own teacher schedule, both 100 times shorter than the official one (SpidR's timescale of 20k steps,
# DinoSR's linear anneal over 30k), so that `--model dinosr` runs the same corpus and budget as SpidR.
SYNTHETIC_TEACHER_SCHEDULES: dict[str, dict[str, Any]] = {
    "spidr": {"ema_timescale": 200.0},
    "dinosr": {"ema_final_step": 300},
}


def synthetic_defaults(model_type: str) -> dict[str, Any]:
    """`SYNTHETIC_DEFAULTS` for `model_type`, with that model's teacher schedule."""
    _check_choice("run.model_type", model_type, tuple(SYNTHETIC_TEACHER_SCHEDULES))
    return merge(
        SYNTHETIC_DEFAULTS, {"run": {"model_type": model_type}, "model": SYNTHETIC_TEACHER_SCHEDULES[model_type]}
    )
