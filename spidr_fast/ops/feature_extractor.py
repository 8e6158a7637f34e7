"""The convolutional feature extractor: strided Conv1d → norm → GELU, layer after layer, waveform to frames.

Shapes:
    waveforms     (B, S)                 float
    conv_weights  (C_out, C_in, k) each  the official `nn.Conv1d` weights, as stored (reshaped at call time)
    result        (B, T, C_last)         T = the official frame count of S samples (0 when S is too short)

Two implementations behind one seam:
- "reference": the official layer stack, exactly its math, in (B, C, T) with a transpose around each LayerNorm.
- the channels-last path (registered by `ops/kernels/feature_extractor.py`): activations stay (rows, C) from the
  waveform to the frames. The waveforms are zero-padded to a multiple of the hop (the product of the strides), so
  every layer's input is one flat buffer of B·R rows per batch element with R a multiple of the stride, and the
  receptive field of output row r is the contiguous run of k·C_in values that starts at r·stride·C_in. A strided
  convolution is then one GEMM over overlapping rows (no im2col copy), its input gradient a GEMM per group of
  `stride` taps, and its weight gradient one cuBLAS GEMM per group over every row of the batch. Rows past a batch
  element's last frame hold finite values computed from padding or from the next element: no valid row reads
  them, their gradient is zero, and the result keeps the first T rows of each element.

Each layer of the channels-last path is the custom op `feature_conv_layer` (conv → LayerNorm over channels or
nothing → GELU), with its backward `feature_conv_layer_backward`, which recomputes the norm and GELU from the
saved convolution output instead of keeping float32 copies. The "group_norm" mode (DinoSR / wav2vec 2.0) runs the
reference: its first layer normalises each channel over time, a reduction across rows of the channels-last
buffer rather than along them (`GROUP_NORM_REASON`).
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from spidr_fast.ops._checks import FLOAT_DTYPES, check_same_device, check_shape, check_tensor
from spidr_fast.ops._dispatch import custom_op, implementation, register

MODES = ("layer_norm", "group_norm")
GROUP_NORM_REASON = (
    "its first layer normalises each channel over time: a reduction across the rows of the channels-last buffer, "
    "not along them"
)


def num_frames(num_samples: int, kernels_strides: Sequence[tuple[int, int]]) -> int:
    """Frames that the layers make of `num_samples` samples (never negative)."""
    for kernel, stride in kernels_strides:
        num_samples = max((num_samples - kernel) // stride + 1, 0)
    return num_samples


# --- the official stack --------------------------------------------------------------------------------------------


@register("feature_extractor", "reference")
def _feature_extractor_reference(
    waveforms: torch.Tensor,
    conv_weights: Sequence[torch.Tensor],
    conv_biases: Sequence[torch.Tensor | None],
    norm_weights: Sequence[torch.Tensor | None],
    norm_biases: Sequence[torch.Tensor | None],
    strides: Sequence[int],
    mode: str,
    eps: float,
) -> torch.Tensor:
    x = waveforms.unsqueeze(1)
    for i, (weight, bias, norm_weight, norm_bias, stride) in enumerate(
        zip(conv_weights, conv_biases, norm_weights, norm_biases, strides, strict=True)
    ):
        x = F.conv1d(x, weight, bias, stride)
        channels = weight.shape[0]
        if mode == "layer_norm":
            x = F.layer_norm(x.transpose(1, 2), (channels,), norm_weight, norm_bias, eps).transpose(1, 2)
        elif i == 0:
            x = F.group_norm(x, channels, norm_weight, norm_bias, eps)
        x = F.gelu(x)
    return x.transpose(1, 2)


# --- one channels-last layer: reference, custom ops, autograd -------------------------------------------------------


def full_rows(numel: int, row_step: int, field: int, rows_out: int) -> int:
    """Output rows whose field of `field` values from r·row_step on lies inside a buffer of `numel` values. The rest
    are the last padding rows of the last batch element: both implementations give them a zero field."""
    return min(max((numel - field) // row_step + 1, 0), rows_out)


def _overlapping_rows(x: torch.Tensor, stride: int, kernel: int) -> torch.Tensor:
    """(rows_out, k·C_in): row r is the receptive field of output row r (zeros from `full_rows` on)."""
    rows_out, c_in = x.shape[0] // stride, x.shape[1]
    full = full_rows(x.numel(), stride * c_in, kernel * c_in, rows_out)
    fields = x.reshape(-1).as_strided((full, kernel * c_in), (stride * c_in, 1))
    return F.pad(fields, (0, 0, 0, rows_out - full))


def gemm_weight(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, k) → (C_out, k·C_in), column tap·C_in + c: the order of a receptive field's values."""
    return weight.permute(0, 2, 1).reshape(weight.shape[0], -1)


def _norm_input(pre: torch.Tensor, norm_weight, norm_bias, eps: float):  # noqa: ANN001, ANN202
    """float32 normalised pre-activation (xhat), its rstd, and the GELU input z."""
    p = pre.float()
    if norm_weight is None:
        return p, None, p
    mean = p.mean(-1, keepdim=True)
    rstd = torch.rsqrt(p.var(-1, unbiased=False, keepdim=True) + eps)
    xhat = (p - mean) * rstd
    z = xhat * norm_weight.float()
    return xhat, rstd, z if norm_bias is None else z + norm_bias.float()


@register("feature_conv_layer", "reference")
def _conv_layer_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    stride: int,
    eps: float,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (rows_in, C_in) with rows_in a multiple of stride → (y (rows_out, C_out) out_dtype, pre in x's dtype):
    pre = the convolution (accumulated in float32, rounded once), y = GELU(LayerNorm(pre)) or GELU(pre)."""
    acc = _overlapping_rows(x, stride, weight.shape[2]).float() @ gemm_weight(weight).float().t()
    if bias is not None:
        acc += bias.float()
    pre = acc.to(x.dtype)
    return F.gelu(_norm_input(pre, norm_weight, norm_bias, eps)[2]).to(out_dtype), pre


def _gelu_grad(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(z * math.sqrt(0.5))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def weight_grad(grad_pre: torch.Tensor, x: torch.Tensor, stride: int, kernel: int) -> torch.Tensor:
    """(C_out, k·C_in) gradient of `gemm_weight`: one GEMM per group of `stride` taps over every row, each a strided
    view of x (the fields of a group do not overlap), accumulated in float32 and rounded once."""
    rows_out, c_out = grad_pre.shape
    width = stride * x.shape[1]  # the values of one frame of `stride` samples
    frames = x.reshape(rows_out, width)
    full = full_rows(x.numel(), width, kernel * x.shape[1], rows_out)
    grad = grad_pre.new_zeros((c_out, kernel * x.shape[1]))
    for group in range(math.ceil(kernel / stride)):
        start = group * width
        columns = min(width, grad.shape[1] - start)
        grad[:, start : start + columns] = grad_pre[:full].t() @ frames[group : group + full, :columns]
    return grad


@register("feature_conv_layer_backward", "reference")
def _conv_layer_backward_reference(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    pre: torch.Tensor,
    stride: int,
    eps: float,
    input_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of x ((0, C_in) when not `input_grad`), of weight ((C_out, k·C_in), the `gemm_weight` layout), of the
    pre-activation and of the norm's weight and bias stacked ((2, C_out) float32, zeros without a norm)."""
    xhat, rstd, z = _norm_input(pre, norm_weight, norm_bias, eps)
    dz = grad_y.float() * _gelu_grad(z)
    norm_grads = torch.zeros((2, pre.shape[1]), dtype=torch.float32, device=pre.device)
    if norm_weight is None:
        grad_p = dz
    else:
        norm_grads[0], norm_grads[1] = (dz * xhat).sum(0), dz.sum(0)
        dxhat = dz * norm_weight.float()
        grad_p = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    grad_pre = grad_p.to(pre.dtype)  # what autograd feeds the convolution's backward
    kernel = weight.shape[2]
    grad_weight = weight_grad(grad_pre.float(), x.float(), stride, kernel).to(weight.dtype)
    grad_x = x.new_empty((0, x.shape[1]))
    if input_grad:
        row_step, field = stride * x.shape[1], kernel * x.shape[1]
        full = full_rows(x.numel(), row_step, field, grad_pre.shape[0])
        fields = grad_pre[:full].float() @ gemm_weight(weight).float()  # each receptive field's gradient
        index = (torch.arange(full, device=x.device)[:, None] * row_step + torch.arange(field, device=x.device))
        flat = fields.new_zeros(x.numel()).index_add_(0, index.reshape(-1), fields.reshape(-1))
        grad_x = flat.view_as(x).to(x.dtype)
    return grad_x, grad_weight, grad_pre, norm_grads


def _fake_layer(x, weight, bias, norm_weight, norm_bias, stride, eps, out_dtype):  # noqa: ANN001, ANN202
    shape = (x.shape[0] // stride, weight.shape[0])
    return x.new_empty(shape, dtype=out_dtype), x.new_empty(shape)


def _fake_layer_backward(grad_y, x, weight, norm_weight, norm_bias, pre, stride, eps, input_grad):  # noqa: ANN001, ANN202
    grad_x = torch.empty_like(x) if input_grad else x.new_empty((0, x.shape[1]))
    grad_weight = weight.new_empty((weight.shape[0], weight.shape[1] * weight.shape[2]))
    return grad_x, grad_weight, torch.empty_like(pre), pre.new_empty((2, pre.shape[1]), dtype=torch.float32)


_conv_layer_op = custom_op("feature_conv_layer", fake=_fake_layer)
_conv_layer_backward_op = custom_op("feature_conv_layer_backward", fake=_fake_layer_backward)


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    x, weight, bias, norm_weight, norm_bias, stride, eps, _ = inputs
    ctx.save_for_backward(x, weight, norm_weight, norm_bias, output[1])
    ctx.stride, ctx.eps, ctx.has_bias = stride, eps, bias is not None
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_y, _grad_pre):  # noqa: ANN001, ANN202
    x, weight, norm_weight, norm_bias, pre = ctx.saved_tensors
    grad_x, grad_weight, grad_pre, norm_grads = _conv_layer_backward_op(
        grad_y.contiguous(), x, weight, norm_weight, norm_bias, pre, ctx.stride, ctx.eps, ctx.needs_input_grad[0]
    )
    c_out, c_in, kernel = weight.shape
    grad_weight = grad_weight.view(c_out, kernel, c_in).permute(0, 2, 1).contiguous()
    grad_bias = grad_pre.float().sum(0).to(weight.dtype) if ctx.has_bias else None
    grad_norm_weight = None if norm_weight is None else norm_grads[0].to(norm_weight.dtype)
    grad_norm_bias = None if norm_bias is None else norm_grads[1].to(norm_bias.dtype)
    grad_x = grad_x if ctx.needs_input_grad[0] else None
    return grad_x, grad_weight, grad_bias, grad_norm_weight, grad_norm_bias, None, None, None


_conv_layer_op.register_autograd(_backward, setup_context=_setup_context)


def channels_last_feature_extractor(
    waveforms: torch.Tensor,
    conv_weights: Sequence[torch.Tensor],
    conv_biases: Sequence[torch.Tensor | None],
    norm_weights: Sequence[torch.Tensor | None],
    norm_biases: Sequence[torch.Tensor | None],
    strides: Sequence[int],
    mode: str,
    eps: float,
) -> torch.Tensor:
    """The channels-last path (see the module docstring); the "layer_norm" mode only."""
    batch, samples = waveforms.shape
    hop = math.prod(strides)
    padded = -(-samples // hop) * hop
    # Under autocast the official convolutions run in its dtype. CUDA's autocast runs each LayerNorm, so its GELU,
    # in float32 (CPU's keeps them in the autocast dtype): intermediate activations are rounded to the autocast dtype
    # where the next convolution would cast them, and the last layer's output stays float32.
    device_type = waveforms.device.type
    autocast = torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type) if autocast else waveforms.dtype
    last_dtype = torch.float32 if autocast and device_type == "cuda" else dtype
    x = F.pad(waveforms.to(dtype), (0, padded - samples)).reshape(batch * padded, 1)
    last = len(conv_weights) - 1
    for i, (weight, bias, norm_weight, norm_bias, stride) in enumerate(
        zip(conv_weights, conv_biases, norm_weights, norm_biases, strides, strict=True)
    ):
        out_dtype = last_dtype if i == last else dtype
        bias = None if bias is None else bias.to(dtype)
        x, _ = _conv_layer_op(x, weight.to(dtype), bias, norm_weight, norm_bias, stride, eps, out_dtype)
    frames = num_frames(samples, [(w.shape[2], s) for w, s in zip(conv_weights, strides, strict=True)])
    return x.view(batch, padded // hop, -1)[:, :frames]


# --- the public function --------------------------------------------------------------------------------------------


def _check_inputs(waveforms, conv_weights, conv_biases, norm_weights, norm_biases, strides, mode) -> None:  # noqa: ANN001
    check_tensor("waveforms", waveforms, ndim=2, dtypes=FLOAT_DTYPES)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    lengths = {len(conv_weights), len(conv_biases), len(norm_weights), len(norm_biases), len(strides)}
    if len(lengths) != 1 or not conv_weights:
        raise ValueError(
            "conv_weights, conv_biases, norm_weights, norm_biases and strides must have one entry per layer, got "
            f"{len(conv_weights)}, {len(conv_biases)}, {len(norm_weights)}, {len(norm_biases)}, {len(strides)}"
        )
    in_channels = 1
    for i, (weight, bias, norm_weight, norm_bias, stride) in enumerate(
        zip(conv_weights, conv_biases, norm_weights, norm_biases, strides, strict=True)
    ):
        weight = check_tensor(f"conv_weights[{i}]", weight, ndim=3, dtypes=FLOAT_DTYPES)
        out_channels = weight.shape[0]
        if weight.shape[1] != in_channels:
            raise ValueError(
                f"conv_weights[{i}] must have {in_channels} input channels (the previous layer's output channels), "
                f"got shape {tuple(weight.shape)}"
            )
        if not isinstance(stride, int) or stride < 1:
            raise ValueError(f"strides[{i}] must be a positive int, got {stride!r}")
        normalised = mode == "layer_norm" or i == 0
        for name, tensor in ((f"conv_biases[{i}]", bias), (f"norm_weights[{i}]", norm_weight),
                             (f"norm_biases[{i}]", norm_bias)):  # fmt: skip
            if tensor is not None:
                check_shape(name, check_tensor(name, tensor, ndim=1, dtypes=FLOAT_DTYPES), (out_channels,),
                            meaning="(C_out,)")  # fmt: skip
                check_same_device(waveforms=waveforms, **{name: tensor})
            elif name.startswith("norm") and normalised:
                raise ValueError(f"{name} is needed in {mode} mode, got None")
        check_same_device(waveforms=waveforms, **{f"conv_weights[{i}]": weight})
        in_channels = out_channels


def feature_extractor(
    waveforms: torch.Tensor,
    conv_weights: Sequence[torch.Tensor],
    conv_biases: Sequence[torch.Tensor | None],
    norm_weights: Sequence[torch.Tensor | None],
    norm_biases: Sequence[torch.Tensor | None],
    strides: Sequence[int],
    *,
    mode: str = "layer_norm",
    eps: float = 1e-5,
) -> torch.Tensor:
    """Waveforms (B, S) → frames (B, T, C_last) through the official extractor's layers.

    Layer i: `F.conv1d(x, conv_weights[i], conv_biases[i], strides[i])`, then in "layer_norm" mode a LayerNorm over
    the channels (norm_weights[i], norm_biases[i]), in "group_norm" mode a GroupNorm with one group per channel on
    the first layer only (the other layers' norm entries are None), then the exact GELU. Under autocast, each
    convolution runs in the autocast dtype and each norm in float32, as autocast runs the official modules.
    Fewer samples than one frame give T = 0.
    """
    _check_inputs(waveforms, conv_weights, conv_biases, norm_weights, norm_biases, strides, mode)
    kernels_strides = [(w.shape[2], s) for w, s in zip(conv_weights, strides, strict=True)]
    if num_frames(waveforms.shape[1], kernels_strides) == 0:
        return waveforms.new_zeros((waveforms.shape[0], 0, conv_weights[-1].shape[0]))
    args = (waveforms, conv_weights, conv_biases, norm_weights, norm_biases, strides, mode, eps)
    if mode == "group_norm":
        return _feature_extractor_reference(*args)
    return implementation("feature_extractor", waveforms.device)(*args)
