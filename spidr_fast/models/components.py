"""Building blocks of SpidR and DinoSR, with the official module and parameter names (so state dicts match)."""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spidr_fast import ops
from spidr_fast.models.config import DinoSRConfig


class ConvLayerBlock(nn.Module):
    """The parameters of one extractor layer, Conv1d → optional norm → GELU, under the official names; the layers
    run together in `ops.feature_extractor`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        *,
        bias: bool,
        layer_norm: nn.Module | None,
    ) -> None:
        super().__init__()
        self.layer_norm = layer_norm
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride, bias=bias)
        nn.init.kaiming_normal_(self.conv.weight)


class FeatureExtractor(nn.Module):
    """Waveforms (B, samples) → frames (B, T, channels), 20 ms per frame with the default layers."""

    def __init__(self, cfg: DinoSRConfig) -> None:
        super().__init__()
        if cfg.extractor_mode not in ("group_norm", "layer_norm"):
            raise ValueError(f"extractor_mode must be 'group_norm' or 'layer_norm', got {cfg.extractor_mode!r}")
        self.conv_layers = nn.ModuleList()
        in_channels = 1
        for i, (out_channels, kernel_size, stride) in enumerate(cfg.extractor_conv_layer_config):
            norm: nn.Module | None = None
            if cfg.extractor_mode == "layer_norm":
                norm = nn.LayerNorm(out_channels)  # over the channels
            elif i == 0:  # group_norm mode normalises the first layer only, one group per channel
                norm = nn.GroupNorm(out_channels, out_channels, affine=True)
            self.conv_layers.append(
                ConvLayerBlock(
                    in_channels, out_channels, kernel_size, stride, bias=cfg.extractor_conv_bias, layer_norm=norm
                )
            )
            in_channels = out_channels
        self.mode = cfg.extractor_mode
        self.strides = [stride for _, _, stride in cfg.extractor_conv_layer_config]

    def forward(self, waveforms: Tensor) -> Tensor:
        """The official layers through `ops.feature_extractor`, which runs them channels-last and fused on a GPU."""
        layers = self.conv_layers
        norms = [layer.layer_norm for layer in layers]
        return ops.feature_extractor(
            waveforms,
            [layer.conv.weight for layer in layers],
            [layer.conv.bias for layer in layers],
            [None if norm is None else norm.weight for norm in norms],
            [None if norm is None else norm.bias for norm in norms],
            self.strides,
            mode=self.mode,
            eps=next((norm.eps for norm in norms if norm is not None), 1e-5),
        )


def num_frames(cfg: DinoSRConfig, num_samples: Tensor) -> Tensor:
    """Frames that the feature extractor makes of `num_samples` samples (elementwise, never negative)."""
    for _, kernel_size, stride in cfg.extractor_conv_layer_config:
        num_samples = ((num_samples - kernel_size).div(stride, rounding_mode="floor") + 1).clamp_min(0)
    return num_samples


def frame_hop(cfg: DinoSRConfig) -> int:
    """Samples per feature frame."""
    return math.prod(stride for _, _, stride in cfg.extractor_conv_layer_config)


class FeatureProjection(nn.Module):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(in_features)
        self.projection = nn.Linear(in_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.projection(self.layer_norm(x))


class ConvPositionalEmbedding(nn.Module):
    """A stack of `depth` grouped convolutions, each followed by a parameter-free LayerNorm and GELU.

    Channels-last throughout, where the official transposes around every LayerNorm: each convolution runs on the
    (B, D, 1, T) view of the (B, T, D) activations, which is the channels_last layout, with a channels_last weight,
    so cuDNN (and oneDNN on a CPU) convolve without a transpose and return (B, T, D) memory; the LayerNorm is then
    over the contiguous last dimension. Same parameters, same math as the official Conv1d stack."""

    def __init__(self, embed_dim: int, kernel_size: int, groups: int, depth: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        layer_kernel_size = max(3, kernel_size // depth)
        self.trim_last = layer_kernel_size % 2 == 0  # an even kernel with "same" padding makes one extra frame
        self.layer_norm = nn.LayerNorm(embed_dim, elementwise_affine=False)
        self.convs = nn.ModuleList(
            nn.Conv1d(embed_dim, embed_dim, layer_kernel_size, padding=layer_kernel_size // 2, groups=groups)
            for _ in range(depth)
        )

    def forward(self, x: Tensor, frame_mask: Tensor | None) -> Tensor:
        """x (B, T, D); frame_mask (B, T) bool, True on real frames, or None."""
        mask = None if frame_mask is None else frame_mask.unsqueeze(-1).to(x.dtype)
        for conv in self.convs:
            if mask is not None:
                x = x * mask
            weight = conv.weight.unsqueeze(2).contiguous(memory_format=torch.channels_last)
            x = F.conv2d(x.transpose(1, 2).unsqueeze(2), weight, conv.bias, padding=(0, conv.padding[0]),
                         groups=conv.groups)  # fmt: skip
            x = x.squeeze(2).transpose(1, 2)
            if self.trim_last:
                x = x[:, :-1]
            x = F.gelu(self.layer_norm(x))
        return x if mask is None else x * mask


class SelfAttention(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, *, qkv_bias: bool, dropout: float) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"encoder_embed_dim ({embed_dim}) must be divisible by encoder_num_heads ({num_heads})")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=qkv_bias)
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: Tensor, frame_mask: Tensor | None) -> Tensor:
        batch, frames, dim = x.shape
        q, k, v = self.qkv(x).view(batch, frames, 3, self.num_heads, dim // self.num_heads).unbind(2)
        out = ops.attention(q, k, v, valid_frames=frame_mask, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.reshape(batch, frames, dim))


class FeedForward(nn.Module):
    def __init__(self, embed_dim: int, interm_features: int, interm_dropout: float) -> None:
        super().__init__()
        self.intermediate_dense = nn.Linear(embed_dim, interm_features)
        self.intermediate_dropout = nn.Dropout(interm_dropout)
        self.output_dense = nn.Linear(interm_features, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.output_dense(self.intermediate_dropout(F.gelu(self.intermediate_dense(x))))


class TransformerLayer(nn.Module):
    """Attention and feed-forward blocks, post-norm (official default) or pre-norm."""

    def __init__(self, cfg: DinoSRConfig) -> None:
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.attention = SelfAttention(
            dim, cfg.encoder_num_heads, qkv_bias=cfg.encoder_qkv_bias, dropout=cfg.encoder_attention_dropout
        )
        self.dropout = nn.Dropout(cfg.encoder_dropout)
        self.layer_norm = nn.LayerNorm(dim)
        self.layer_norm_first = cfg.encoder_layer_norm_first
        self.feed_forward = FeedForward(dim, cfg.encoder_ff_interm_features, cfg.encoder_ff_interm_dropout)
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, frame_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Returns the layer's output and the feed-forward output before the residual (the SpidR targets)."""
        if self.layer_norm_first:
            x = x + self.dropout(self.attention(self.layer_norm(x), frame_mask))
            before_residual = self.feed_forward(self.final_layer_norm(x))
            return x + self.dropout(before_residual), before_residual
        x = self.layer_norm(x + self.dropout(self.attention(x, frame_mask)))
        before_residual = self.feed_forward(x)
        return self.final_layer_norm(x + self.dropout(before_residual)), before_residual


class Transformer(nn.Module):
    """Positional convolution, then the layers; the encoder of the student and of the teacher."""

    def __init__(self, cfg: DinoSRConfig) -> None:
        super().__init__()
        self.pos_conv_embed = ConvPositionalEmbedding(
            cfg.encoder_embed_dim, cfg.encoder_pos_conv_kernel, cfg.encoder_pos_conv_groups, cfg.encoder_pos_conv_depth
        )
        self.layer_norm = nn.LayerNorm(cfg.encoder_embed_dim)
        # Post-norm layers take a norm before the first layer; pre-norm layers a norm after the last one.
        self.norm_before_layers = not cfg.encoder_layer_norm_first
        self.layer_drop = cfg.encoder_layer_drop
        self.dropout = nn.Dropout(cfg.encoder_dropout)
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.encoder_num_layers))
        self.apply(self.init_weights)

    @staticmethod
    def init_weights(module: nn.Module) -> None:
        """The official initialisation (children are visited before their parent by `apply`)."""
        if isinstance(module, SelfAttention):
            nn.init.xavier_uniform_(module.qkv.weight, gain=1 / math.sqrt(2))
            nn.init.xavier_uniform_(module.proj.weight)
            nn.init.zeros_(module.proj.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def run_layers(self, x: Tensor, frame_mask: Tensor | None, keep_last: int = 0) -> tuple[Tensor, Tensor | None]:
        """The last layer's output (before pre-norm layers' closing norm), and the feed-forward outputs before the
        residual of the last `keep_last` layers, (keep_last, B, T, D), None when `keep_last` is 0: the teacher's
        targets and the SpidR heads' inputs. Each kept output is written into one buffer as its layer ends, so no
        layer's output outlives the next layer and nothing is stacked afterwards."""
        x = x + self.pos_conv_embed(x, frame_mask)
        if self.norm_before_layers:
            x = self.layer_norm(x)
        x = self.dropout(x)
        # LayerDrop as the official: every layer runs, a dropped one's output is discarded (no host sync).
        dropped = None
        if self.training and self.layer_drop > 0:
            dropped = torch.rand(len(self.layers), device=x.device) <= self.layer_drop
        first_kept = len(self.layers) - keep_last
        kept = None
        for i, layer in enumerate(self.layers):
            out, before_residual = layer(x, frame_mask)
            x = out if dropped is None else torch.where(dropped[i], x, out)
            if i >= first_kept:
                if kept is None:
                    kept = before_residual.new_empty((keep_last, *before_residual.shape))
                kept[i - first_kept] = before_residual
        return x, kept

    def compile_layers(self, backend: str = "inductor") -> None:
        """torch.compile `run_layers`, which every entry point goes through, with dynamic batch and time sizes."""
        self.run_layers = torch.compile(self.run_layers, backend=backend, dynamic=True)

    def forward(self, x: Tensor, frame_mask: Tensor | None = None) -> Tensor:
        x, _ = self.run_layers(x, frame_mask)
        return x if self.norm_before_layers else self.layer_norm(x)

    def get_intermediate_outputs(self, x: Tensor, frame_mask: Tensor | None = None) -> list[Tensor]:
        """Each layer's feed-forward output before the residual, first layer first."""
        return list(self.run_layers(x, frame_mask, keep_last=len(self.layers))[1].unbind(0))
