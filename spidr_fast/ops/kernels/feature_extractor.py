"""Triton: one channels-last layer of the feature extractor (see `ops/feature_extractor.py` for the layout).

Forward, two launches: the convolution as a GEMM whose A rows overlap (row r reads the k·C_in values from
r·stride·C_in on: the loads are plain pointer arithmetic, so no im2col copy), accumulated in float32 and rounded
once to the input dtype as cuDNN does; then LayerNorm over the channels and GELU, one row block at a time,
statistics in float32, written in the output dtype.

Backward, three launches and a GEMM per tap group: LayerNorm + GELU backward recomputed from the saved
convolution output (per-program partial sums of the norm's weight and bias gradients); the input gradient as
Σ over tap groups of (grad_pre shifted by the group) @ W_group, one float32 accumulator, rounded once; the weight
gradient by cuBLAS (`weight_grad`: strided views, float32 accumulation over the whole batch).

FLOPs and bytes per layer, official batch (B12 × 20 s, bf16), what the tiling is chosen from: layers 2-5
(k 3, stride 2, 512 → 512 channels) are 604, 302, 151 and 75 GFLOP with K = 1536 and 384k-24k rows, layers 6-7
(k 2) 50 and 25 GFLOP with K = 1024: arithmetic intensity above 300 FLOP/byte, so the GEMMs take 128 × 128
tiles with 64-wide K steps (8 warps, 3 stages), tensor-core bound. Layer 1 (1 channel in, k 10, stride 5) is
7.9 GFLOP for 786 MB of bf16 output: bound by its store, K = 10 padded to one 16-wide step. The norm + GELU
passes move 2 bytes in and out per value (6 in the backward): 4.7 GB forward over the seven layers.
"""

import os

import torch
import triton
import triton.language as tl

from spidr_fast.ops._dispatch import register
from spidr_fast.ops.feature_extractor import channels_last_feature_extractor, full_rows, gemm_weight, weight_grad

_SQRT_HALF = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _conv_forward_kernel(
    x_ptr, w_ptr, bias_ptr, pre_ptr, rows_out, num_full_rows, row_step, reduction, out_channels,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """pre[r, n] = Σ_q x_flat[r·row_step + q] · w[n, q], q < reduction (= k·C_in); w is (C_out, k·C_in). Rows from
    num_full_rows on, whose fields run past the buffer (padding rows of the last batch element), read zeros."""
    # The column tiles of one row block are consecutive programs, so they run together and read its A rows (the
    # large operand) from L2 instead of once each from memory.
    column_tiles = tl.cdiv(out_channels, BLOCK_N)
    rows = (tl.program_id(0) // column_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tl.program_id(0) % column_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, col_mask = rows < num_full_rows, cols < out_channels
    q = tl.arange(0, BLOCK_K)
    # Row starts in int64 (12 × 20 s of 512 channels overflows int32); the masks are per row and per column only,
    # so the loads vectorise and the loop pipelines.
    a_ptrs = (x_ptr + rows.to(tl.int64) * row_step)[:, None] + q[None, :]
    b_ptrs = w_ptr + (cols[None, :] * reduction + q[:, None])
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, reduction, BLOCK_K):
        a = tl.load(a_ptrs, mask=row_mask[:, None] & (q < reduction - k0)[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=(q < reduction - k0)[:, None] & col_mask[None, :], other=0.0)
        if DOT_UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc += tl.dot(a, b, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out = (pre_ptr + rows.to(tl.int64) * out_channels)[:, None] + cols[None, :]
    tl.store(out, acc.to(pre_ptr.dtype.element_ty), mask=(rows < rows_out)[:, None] & col_mask[None, :])


@triton.jit
def _conv_input_grad_kernel(
    grad_pre_ptr, w_ptr, grad_x_ptr, rows_out, num_full_rows, out_channels, frame_width, reduction,
    NUM_GROUPS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grad_x viewed as frames (rows_out, stride·C_in): frame u, value j receives, from each tap group g,
    Σ_n grad_pre[u - g, n] · w[n, g·stride·C_in + j] (the groups' receptive fields tile the input); rows from
    num_full_rows on read zeros in the forward and send nothing back."""
    column_tiles = tl.cdiv(frame_width, BLOCK_N)  # consecutive programs share their grad_pre rows, as above
    frames = (tl.program_id(0) // column_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tl.program_id(0) % column_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for group in tl.static_range(NUM_GROUPS):
        sources = frames - group
        source_rows = grad_pre_ptr + sources.to(tl.int64) * out_channels
        source_mask = (sources >= 0) & (sources < num_full_rows)
        q = group * frame_width + cols
        q_mask = (cols < frame_width) & (q < reduction)
        for n0 in range(0, out_channels, BLOCK_K):
            n = n0 + tl.arange(0, BLOCK_K)
            n_mask = n < out_channels
            a = tl.load(source_rows[:, None] + n[None, :], mask=source_mask[:, None] & n_mask[None, :], other=0.0)
            b = tl.load(w_ptr + (n[:, None] * reduction + q[None, :]), mask=n_mask[:, None] & q_mask[None, :],
                        other=0.0)
            if DOT_UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc += tl.dot(a, b, input_precision=DOT_PRECISION)
    out = (grad_x_ptr + frames.to(tl.int64) * frame_width)[:, None] + cols[None, :]
    mask = (frames < rows_out)[:, None] & (cols < frame_width)[None, :]
    tl.store(out, acc.to(grad_x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _normalise(pre_ptr, norm_w_ptr, norm_b_ptr, rows, cols, num_rows, channels, eps,
               HAS_NORM: tl.constexpr, HAS_NORM_BIAS: tl.constexpr):
    """float32 (xhat, rstd, z) of a (rows, channels) block; z is the GELU input."""
    mask = (rows < num_rows)[:, None] & (cols < channels)[None, :]
    p = tl.load((pre_ptr + rows.to(tl.int64) * channels)[:, None] + cols[None, :], mask=mask, other=0.0)
    p = p.to(tl.float32)
    if HAS_NORM:
        mean = tl.sum(p, axis=1) / channels
        centred = tl.where(mask, p - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / channels + eps)
        xhat = centred * rstd[:, None]
        z = xhat * tl.load(norm_w_ptr + cols, mask=cols < channels, other=0.0).to(tl.float32)[None, :]
        if HAS_NORM_BIAS:
            z += tl.load(norm_b_ptr + cols, mask=cols < channels, other=0.0).to(tl.float32)[None, :]
    else:
        xhat, rstd, z = p, tl.sum(p, axis=1) * 0.0, p
    return xhat, rstd, z, mask


@triton.jit
def _norm_gelu_forward_kernel(
    pre_ptr, norm_w_ptr, norm_b_ptr, y_ptr, num_rows, channels, eps,
    HAS_NORM: tl.constexpr, HAS_NORM_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    _, _, z, mask = _normalise(pre_ptr, norm_w_ptr, norm_b_ptr, rows, cols, num_rows, channels, eps,
                               HAS_NORM, HAS_NORM_BIAS)
    y = 0.5 * z * (1.0 + tl.erf(z * _SQRT_HALF))
    tl.store((y_ptr + rows.to(tl.int64) * channels)[:, None] + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_gelu_backward_kernel(
    pre_ptr, grad_y_ptr, norm_w_ptr, norm_b_ptr, grad_pre_ptr, partials_ptr, num_rows, channels, eps,
    HAS_NORM: tl.constexpr, HAS_NORM_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Each program walks row blocks pid, pid + programs, ...; it writes grad_pre and its partial sums of the norm's
    weight and bias gradients (partials[pid, 0 | 1, :])."""
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols < channels
    if HAS_NORM:
        weight = tl.load(norm_w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    sum_weight = tl.zeros([BLOCK_C], tl.float32)
    sum_bias = tl.zeros([BLOCK_C], tl.float32)
    for block in range(tl.program_id(0), tl.cdiv(num_rows, BLOCK_R), tl.num_programs(0)):
        rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
        xhat, rstd, z, mask = _normalise(pre_ptr, norm_w_ptr, norm_b_ptr, rows, cols, num_rows, channels, eps,
                                         HAS_NORM, HAS_NORM_BIAS)
        row_starts = rows.to(tl.int64) * channels
        grad_y = tl.load((grad_y_ptr + row_starts)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        gelu_grad = 0.5 * (1.0 + tl.erf(z * _SQRT_HALF)) + z * tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
        dz = tl.where(mask, grad_y * gelu_grad, 0.0)
        if HAS_NORM:
            sum_weight += tl.sum(dz * xhat, axis=0)
            sum_bias += tl.sum(dz, axis=0)
            dxhat = dz * weight[None, :]
            mean_dxhat = tl.sum(dxhat, axis=1) / channels
            mean_dxhat_xhat = tl.sum(dxhat * xhat, axis=1) / channels
            grad = rstd[:, None] * (dxhat - mean_dxhat[:, None] - xhat * mean_dxhat_xhat[:, None])
        else:
            grad = dz
        grad_pre = (grad_pre_ptr + row_starts)[:, None] + cols[None, :]
        tl.store(grad_pre, grad.to(grad_pre_ptr.dtype.element_ty), mask=mask)
    partials = partials_ptr + tl.program_id(0) * 2 * channels + cols
    tl.store(partials, sum_weight, mask=col_mask)
    tl.store(partials + channels, sum_bias, mask=col_mask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _gemm_config(dtype: torch.dtype, reduction: int) -> dict:
    return dict(
        # PyTorch's float32 convolution in the reference is true fp32 here; 16-bit inputs use tensor cores.
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        # The interpreter multiplies bf16 tiles as their uint16 storage; bf16 products are exact in fp32.
        DOT_UPCAST=dtype == torch.bfloat16 and _interpreting(),
        BLOCK_M=128, BLOCK_N=128, BLOCK_K=max(16, min(64, triton.next_power_of_2(reduction))),
        num_warps=8, num_stages=3,
    )


def _norm_config(channels: int) -> dict:
    block_c = triton.next_power_of_2(channels)
    # 2048 values a block over 8 warps: 8 a thread for each of the backward's ~8 live tiles, no spills at C = 512.
    return dict(BLOCK_R=max(1, 2048 // block_c), BLOCK_C=block_c, num_warps=8)


@register("feature_conv_layer", "triton")
def _conv_layer_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    stride: int,
    eps: float,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    out_channels, in_channels, kernel = weight.shape
    rows_out, x = x.shape[0] // stride, x.contiguous()
    w = gemm_weight(weight).contiguous()
    pre = x.new_empty((rows_out, out_channels))
    y = x.new_empty((rows_out, out_channels), dtype=out_dtype)
    if rows_out == 0:
        return y, pre
    reduction = kernel * in_channels
    config = _gemm_config(x.dtype, reduction)
    grid = (triton.cdiv(rows_out, config["BLOCK_M"]) * triton.cdiv(out_channels, config["BLOCK_N"]),)
    _conv_forward_kernel[grid](x, w, bias if bias is not None else w, pre, rows_out,
                               full_rows(x.numel(), stride * in_channels, reduction, rows_out), stride * in_channels,
                               reduction, out_channels, HAS_BIAS=bias is not None, **config)
    norm = _norm_config(out_channels)
    _norm_gelu_forward_kernel[(triton.cdiv(rows_out, norm["BLOCK_R"]),)](
        pre, norm_weight if norm_weight is not None else pre, norm_bias if norm_bias is not None else pre, y,
        rows_out, out_channels, eps, HAS_NORM=norm_weight is not None, HAS_NORM_BIAS=norm_bias is not None, **norm)
    return y, pre


@register("feature_conv_layer_backward", "triton")
def _conv_layer_backward_triton(
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
    rows_out, out_channels = pre.shape
    in_channels, kernel = weight.shape[1:]
    grad_pre = torch.empty_like(pre)
    norm = _norm_config(out_channels)
    # Enough programs to fill any GPU, few enough that the partial sums stay small (≤ 1024 × 2 × C floats).
    programs = max(1, min(triton.cdiv(rows_out, norm["BLOCK_R"]), 64 if _interpreting() else 1024))
    partials = pre.new_empty((programs, 2, out_channels), dtype=torch.float32)
    _norm_gelu_backward_kernel[(programs,)](
        pre, grad_y.contiguous(), norm_weight if norm_weight is not None else pre,
        norm_bias if norm_bias is not None else pre, grad_pre, partials, rows_out, out_channels, eps,
        HAS_NORM=norm_weight is not None, HAS_NORM_BIAS=norm_bias is not None, **norm)
    x = x.contiguous()
    grad_weight = weight_grad(grad_pre, x, stride, kernel)
    grad_x = x.new_empty((0, in_channels))
    if input_grad:
        grad_x = torch.empty_like(x)
        frame_width, reduction = stride * in_channels, kernel * in_channels
        config = _gemm_config(x.dtype, out_channels)
        grid = (triton.cdiv(rows_out, config["BLOCK_M"]) * triton.cdiv(frame_width, config["BLOCK_N"]),)
        if rows_out > 0:
            full = full_rows(x.numel(), frame_width, reduction, rows_out)
            _conv_input_grad_kernel[grid](grad_pre, gemm_weight(weight).contiguous(), grad_x, rows_out, full,
                                          out_channels, frame_width, reduction, NUM_GROUPS=triton.cdiv(kernel, stride),
                                          **config)
        else:
            grad_x.zero_()
    return grad_x, grad_weight, grad_pre, partials.sum(0)


register("feature_extractor", "triton")(channels_last_feature_extractor)
