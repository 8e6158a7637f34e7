"""Model configurations: the field names, defaults and meanings of the official `spidr` 0.2.0 package.

Keeping them identical lets an official config file (or the `config.json` stored beside a checkpoint)
build our models unchanged. The fairseq name of each field is in its comment.
"""

from dataclasses import dataclass, field
from typing import Literal

SAMPLE_RATE: int = 16_000
# (out_channels, kernel_size, stride) of each convolution of the feature extractor: 20 ms frames at 16 kHz.
DEFAULT_CONV_LAYER_CONFIG: list[tuple[int, int, int]] = [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2

ModelType = Literal["dinosr", "spidr"]


@dataclass(frozen=True)
class DinoSRConfig:
    """DinoSR: all heads read the student's last layer; the teacher follows a linear EMA schedule."""

    extractor_mode: Literal["group_norm", "layer_norm"] = "layer_norm"  # extractor_mode
    extractor_conv_bias: bool = False  # conv_bias
    extractor_conv_layer_config: list[tuple[int, int, int]] = field(
        default_factory=lambda: list(DEFAULT_CONV_LAYER_CONFIG)
    )  # conv_layer_config
    encoder_embed_dim: int = 768  # encoder_embed_dim
    encoder_projection_dropout: float = 0  # dropout_input
    encoder_pos_conv_kernel: int = 95  # conv_pos
    encoder_pos_conv_groups: int = 16  # conv_pos_groups
    encoder_pos_conv_depth: int = 5  # pos_conv_depth
    encoder_num_layers: int = 12  # encoder_layers
    encoder_num_heads: int = 12  # encoder_attention_heads
    encoder_attention_dropout: float = 0.1  # attention_dropout
    encoder_ff_interm_features: int = 3072  # encoder_ffn_embed_dim
    encoder_ff_interm_dropout: float = 0.0  # activation_dropout
    encoder_dropout: float = 0.1  # dropout
    encoder_layer_norm_first: bool = False  # layer_norm_first
    encoder_layer_drop: float = 0.05  # encoder_layerdrop
    encoder_qkv_bias: bool = False  # always True in fairseq

    codebook_size: int = 256  # codebook_size
    codebook_decay: float = 0.9  # codebook_decay
    num_codebooks: int = 8  # average_top_k_layers
    ema_start_decay: float = 0.999  # ema_decay
    ema_final_decay: float = 0.9999  # ema_end_decay
    ema_final_step: int = 30_000  # ema_anneal_end_step
    ema_exclude_layers: list[str] = field(default_factory=lambda: ["pos_conv_embed"])
    freeze_step: int = 200_000  # freeze_teacher_step


@dataclass(frozen=True)
class SpidRConfig(DinoSRConfig):
    """SpidR: head i reads student layer i of the last `num_codebooks`; exponential teacher EMA schedule."""

    ema_timescale: float = 20_000
    ema_threshold: float = 1e-7
    encoder_layer_drop: float = 0.0  # encoder_layerdrop
