"""Triton: cross-entropy of L prediction heads, logits = scale · x Wᵀ + b, tile by tile; the logits never leave
the chip and no (L, N, K) tensor is written, forward or backward.

Forward (one launch, every layer): per block of rows, the logits of all K codewords in one tile (K ≤ 256, SpidR's
K = 256) give the log-sum-exp, the target logit and the block's probability sums in one sweep; a larger K takes
tiles of 256 with an online log-sum-exp and a second sweep for the probability sums. It writes the per-row
negative log-likelihood and log-sum-exp (L, N) and per-block probability sums with the count of rows kept
(row blocks, L, K + 1). A row whose label is ignore_index adds nothing (0 to the loss, nothing to the sums or the
gradients); a label outside [0, K) otherwise clears a flag the host asserts on asynchronously.
Backward (one launch): per block of rows, each logits tile again from x, W and the saved log-sum-exp, the gradient
G = (softmax - onehot) · grad in registers, rounded to the input dtype as autograd's would be; then channel chunk
by chunk dx = G W (stored, one writer per row block) and dW += Gᵀ x by fp32 atomic adds into one (L, K, D) buffer.
Atomics rather than per-block partials: the (L, K, D) fp32 target is 6.3 MB at SpidR's shapes and stays in L2,
where partials per row block would be N / 128 copies of it (0.8 GB at N = 16k). The bias gradient is summed per
row block and those partials in a fixed order. Under torch.use_deterministic_algorithms the backward runs the
reference (atomics add in no fixed order).
"""

import os

import torch
import triton
import triton.language as tl

from spidr_fast.ops._dispatch import reference, register


@triton.jit
def _load_tile(ptr, layer, stride_l, i, i_mask, stride_i, d, d_mask, stride_d, DOT_UPCAST: tl.constexpr):
    """Rows i, channels d of one layer of x or W, the dot operand. int64 only in the per-layer scalar base: int32
    tile offsets keep the pointer tiles' registers down."""
    tile = tl.load(ptr + layer * stride_l + (i[:, None] * stride_i + d[None, :] * stride_d),
                   mask=i_mask[:, None] & d_mask[None, :], other=0.0)
    return tile.to(tl.float32) if DOT_UPCAST else tile


@triton.jit
def _logits_tile(
    x_ptr, w_ptr, b_ptr, layer, rows, row_mask, k, k_mask, dim, scale,
    stride_xl, stride_xn, stride_xd, stride_wl, stride_wk, stride_wd, stride_bl, stride_bk,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """(BLOCK_N, BLOCK_K) float32 logits, -inf past the last codeword."""
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_mask = d < dim
        x = _load_tile(x_ptr, layer, stride_xl, rows, row_mask, stride_xn, d, d_mask, stride_xd, DOT_UPCAST)
        w = _load_tile(w_ptr, layer, stride_wl, k, k_mask, stride_wk, d, d_mask, stride_wd, DOT_UPCAST)
        acc += tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
    logits = acc * scale
    if HAS_BIAS:
        logits += tl.load(b_ptr + layer * stride_bl + k * stride_bk, mask=k_mask, other=0.0).to(tl.float32)[None, :]
    return tl.where(k_mask[None, :], logits, float("-inf"))


@triton.jit
def _forward_kernel(
    x_ptr, w_ptr, b_ptr, labels_ptr, nll_ptr, lse_ptr, prob_sums_ptr, labels_ok_ptr, num_rows, num_codewords, dim,
    scale, ignore_index,
    stride_xl, stride_xn, stride_xd, stride_wl, stride_wk, stride_wd, stride_bl, stride_bk,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, ONE_TILE: tl.constexpr,
):
    pid_n, layer = tl.program_id(0), tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < num_rows
    labels = tl.load(labels_ptr + layer * num_rows + rows, mask=row_mask, other=0)
    kept = row_mask & (labels != ignore_index)
    # The label check, fused: a label is only ever compared, never used as an address, so a bad one clears a flag
    # that the host asserts on without waiting for it.
    bad = kept & ((labels < 0) | (labels >= num_codewords))
    tl.store(labels_ok_ptr, 0.0, mask=tl.max(bad.to(tl.int32), axis=0) > 0)
    # Each block's row of sums has K + 1 entries: the probabilities, then the count of rows kept (mean_probs'
    # denominator).
    block_sums = prob_sums_ptr + (pid_n * tl.num_programs(1) + layer) * (num_codewords + 1)
    tl.store(block_sums + num_codewords, tl.sum(kept.to(tl.float32), axis=0))
    if ONE_TILE:  # every codeword in one tile: the logits are computed once
        k = tl.arange(0, BLOCK_K)
        k_mask = k < num_codewords
        logits = _logits_tile(x_ptr, w_ptr, b_ptr, layer, rows, row_mask, k, k_mask, dim, scale,
                              stride_xl, stride_xn, stride_xd, stride_wl, stride_wk, stride_wd, stride_bl, stride_bk,
                              HAS_BIAS, DOT_PRECISION, DOT_UPCAST, BLOCK_N, BLOCK_K, BLOCK_D)
        target = tl.sum(tl.where(k[None, :] == labels[:, None], logits, 0.0), axis=1)
        row_max = tl.max(logits, axis=1)
        exps = tl.exp(logits - row_max[:, None])
        row_sum = tl.sum(exps, axis=1)
        lse = row_max + tl.log(row_sum)
        probs = tl.where(kept[:, None], exps / row_sum[:, None], 0.0)
        tl.store(block_sums + k, tl.sum(probs, axis=0), mask=k_mask)
    else:
        running_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
        running_sum = tl.zeros([BLOCK_N], tl.float32)
        target = tl.zeros([BLOCK_N], tl.float32)
        for k0 in range(0, num_codewords, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            logits = _logits_tile(x_ptr, w_ptr, b_ptr, layer, rows, row_mask, k, k < num_codewords, dim, scale,
                                  stride_xl, stride_xn, stride_xd, stride_wl, stride_wk, stride_wd, stride_bl,
                                  stride_bk, HAS_BIAS, DOT_PRECISION, DOT_UPCAST, BLOCK_N, BLOCK_K, BLOCK_D)
            target += tl.sum(tl.where(k[None, :] == labels[:, None], logits, 0.0), axis=1)
            new_max = tl.maximum(running_max, tl.max(logits, axis=1))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), 1)
            running_max = new_max
        lse = running_max + tl.log(running_sum)
        # mean_probs needs the final log-sum-exp of each row: a second sweep recomputes the tiles.
        for k0 in range(0, num_codewords, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < num_codewords
            logits = _logits_tile(x_ptr, w_ptr, b_ptr, layer, rows, row_mask, k, k_mask, dim, scale,
                                  stride_xl, stride_xn, stride_xd, stride_wl, stride_wk, stride_wd, stride_bl,
                                  stride_bk, HAS_BIAS, DOT_PRECISION, DOT_UPCAST, BLOCK_N, BLOCK_K, BLOCK_D)
            probs = tl.where(kept[:, None], tl.exp(logits - lse[:, None]), 0.0)
            tl.store(block_sums + k, tl.sum(probs, axis=0), mask=k_mask)
    tl.store(lse_ptr + layer * num_rows + rows, lse, mask=row_mask)
    tl.store(nll_ptr + layer * num_rows + rows, tl.where(kept, lse - target, 0.0), mask=row_mask)


@triton.jit
def _grad_tile(
    x_ptr, w_ptr, b_ptr, bias_grad_ptr, layer, pid_n, rows, row_mask, labels, lse, kept, grad_rows, k, k_mask,
    num_codewords, dim, scale,
    stride_xl, stride_xn, stride_xd, stride_wl, stride_wk, stride_wd, stride_bl, stride_bk,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """G = (softmax - onehot) · grad of one (BLOCK_N, BLOCK_K) logits tile, computed again from x, W and the
    log-sum-exp, in the input dtype as autograd feeds its matmuls (the tensor cores' operand); stores the tile's
    bias-gradient partial (fp32, before that rounding)."""
    logits = _logits_tile(x_ptr, w_ptr, b_ptr, layer, rows, row_mask, k, k_mask, dim, scale,
                          stride_xl, stride_xn, stride_xd, stride_wl, stride_wk, stride_wd, stride_bl, stride_bk,
                          HAS_BIAS, DOT_PRECISION, DOT_UPCAST, BLOCK_N, BLOCK_K, BLOCK_D)
    onehot = (k[None, :] == labels[:, None]).to(tl.float32)
    grad = tl.where(kept[:, None], (tl.exp(logits - lse[:, None]) - onehot) * grad_rows[:, None], 0.0)
    tl.store(bias_grad_ptr + (pid_n * tl.num_programs(1) + layer) * num_codewords + k, tl.sum(grad, 0), k_mask)
    grad = (grad * scale).to(x_ptr.dtype.element_ty)
    return grad.to(tl.float32) if DOT_UPCAST else grad


@triton.jit
def _backward_kernel(
    x_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, grad_loss_ptr, grad_x_ptr, grad_w_ptr, bias_grad_ptr,
    num_rows, num_codewords, dim, scale, inv_layers, ignore_index,
    stride_xl, stride_xn, stride_xd, stride_wl, stride_wk, stride_wd, stride_bl, stride_bk,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, PAIR: tl.constexpr,
):
    pid_n, layer = tl.program_id(0), tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < num_rows
    labels = tl.load(labels_ptr + layer * num_rows + rows, mask=row_mask, other=0)
    lse = tl.load(lse_ptr + layer * num_rows + rows, mask=row_mask, other=0.0)
    # loss = Σ_l nll_l / L, so each layer's nll receives grad_loss / L; an ignored label's nll is a constant 0.
    kept = row_mask & (labels != ignore_index)
    grad_rows = tl.load(grad_loss_ptr + rows, mask=kept, other=0.0).to(tl.float32) * inv_layers
    # grad_x and grad_w are contiguous (L, N, D) and (L, K, D).
    layer_grad_x = grad_x_ptr + layer * num_rows * dim
    layer_grad_w = grad_w_ptr + layer * num_codewords * dim
    if PAIR:
        # Every codeword as two tiles whose G both stay in registers: dx written once, and twice the rows per dW
        # atomic tile (what one 256-codeword tile of 128 rows cannot hold without spilling).
        ka = tl.arange(0, BLOCK_K)
        kb = BLOCK_K + ka
        ka_mask, kb_mask = ka < num_codewords, kb < num_codewords
        grad_a = _grad_tile(x_ptr, w_ptr, b_ptr, bias_grad_ptr, layer, pid_n, rows, row_mask, labels, lse, kept,
                            grad_rows, ka, ka_mask, num_codewords, dim, scale, stride_xl, stride_xn, stride_xd,
                            stride_wl, stride_wk, stride_wd, stride_bl, stride_bk,
                            HAS_BIAS, DOT_PRECISION, DOT_UPCAST, BLOCK_N, BLOCK_K, BLOCK_D)
        grad_b = _grad_tile(x_ptr, w_ptr, b_ptr, bias_grad_ptr, layer, pid_n, rows, row_mask, labels, lse, kept,
                            grad_rows, kb, kb_mask, num_codewords, dim, scale, stride_xl, stride_xn, stride_xd,
                            stride_wl, stride_wk, stride_wd, stride_bl, stride_bk,
                            HAS_BIAS, DOT_PRECISION, DOT_UPCAST, BLOCK_N, BLOCK_K, BLOCK_D)
        for d0 in range(0, dim, BLOCK_DO):
            d = d0 + tl.arange(0, BLOCK_DO)
            d_mask = d < dim
            x = _load_tile(x_ptr, layer, stride_xl, rows, row_mask, stride_xn, d, d_mask, stride_xd, DOT_UPCAST)
            w_a = _load_tile(w_ptr, layer, stride_wl, ka, ka_mask, stride_wk, d, d_mask, stride_wd, DOT_UPCAST)
            w_b = _load_tile(w_ptr, layer, stride_wl, kb, kb_mask, stride_wk, d, d_mask, stride_wd, DOT_UPCAST)
            grad_x = tl.dot(grad_a, w_a, input_precision=DOT_PRECISION)
            grad_x = tl.dot(grad_b, w_b, grad_x, input_precision=DOT_PRECISION)
            tl.store(layer_grad_x + (rows[:, None] * dim + d[None, :]), grad_x.to(grad_x_ptr.dtype.element_ty),
                     mask=row_mask[:, None] & d_mask[None, :])
            tl.atomic_add(layer_grad_w + (ka[:, None] * dim + d[None, :]),
                          tl.dot(tl.trans(grad_a), x, input_precision=DOT_PRECISION),
                          mask=ka_mask[:, None] & d_mask[None, :], sem="relaxed")
            tl.atomic_add(layer_grad_w + (kb[:, None] * dim + d[None, :]),
                          tl.dot(tl.trans(grad_b), x, input_precision=DOT_PRECISION),
                          mask=kb_mask[:, None] & d_mask[None, :], sem="relaxed")
    else:
        for k0 in range(0, num_codewords, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < num_codewords
            grad = _grad_tile(x_ptr, w_ptr, b_ptr, bias_grad_ptr, layer, pid_n, rows, row_mask, labels, lse, kept,
                              grad_rows, k, k_mask, num_codewords, dim, scale, stride_xl, stride_xn, stride_xd,
                              stride_wl, stride_wk, stride_wd, stride_bl, stride_bk,
                              HAS_BIAS, DOT_PRECISION, DOT_UPCAST, BLOCK_N, BLOCK_K, BLOCK_D)
            for d0 in range(0, dim, BLOCK_DO):
                d = d0 + tl.arange(0, BLOCK_DO)
                d_mask = d < dim
                x = _load_tile(x_ptr, layer, stride_xl, rows, row_mask, stride_xn, d, d_mask, stride_xd, DOT_UPCAST)
                w = _load_tile(w_ptr, layer, stride_wl, k, k_mask, stride_wk, d, d_mask, stride_wd, DOT_UPCAST)
                tile = rows[:, None] * dim + d[None, :]
                tile_mask = row_mask[:, None] & d_mask[None, :]
                # With several codeword tiles, grad_x is an fp32 buffer this block alone writes: add to the tiles
                # before.
                grad_x = tl.load(layer_grad_x + tile, mask=tile_mask & (k0 > 0), other=0.0).to(tl.float32)
                grad_x += tl.dot(grad, w, input_precision=DOT_PRECISION)
                tl.store(layer_grad_x + tile, grad_x.to(grad_x_ptr.dtype.element_ty), mask=tile_mask)
                tl.atomic_add(layer_grad_w + (k[:, None] * dim + d[None, :]),
                              tl.dot(tl.trans(grad), x, input_precision=DOT_PRECISION),
                              mask=k_mask[:, None] & d_mask[None, :], sem="relaxed")


def heads_config(num_codewords: int, dim: int, dtype: torch.dtype) -> dict:
    """The forward's tiles: every codeword of a row block in one tile up to K = 256 (SpidR's), 8 warps."""
    fp32 = dtype == torch.float32
    return {
        # PyTorch's fp32 matmul is true fp32 (no TF32 unless asked); 16-bit inputs ignore this and use tensor cores.
        "DOT_PRECISION": "ieee" if fp32 else "tf32",
        # Triton's CPU interpreter multiplies bf16 tiles as their uint16 storage. Products of bf16 values are exact
        # in fp32, so upcasting there computes what the tensor cores do (fp32 accumulation).
        "DOT_UPCAST": dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1",
        # fp32 dot operands take twice the registers: half the rows and channels (no spills, see kernel_report).
        "BLOCK_N": 32 if fp32 else 64,
        "BLOCK_K": min(256, max(16, triton.next_power_of_2(num_codewords))),
        "BLOCK_D": min(16 if fp32 else 32, max(16, triton.next_power_of_2(dim))),
        "num_warps": 8,
    }


# The backward's (BLOCK_N, BLOCK_K, BLOCK_DO): the largest tiles that compile without spills at K 256, D 768
# (kernel_report). 16-bit inputs with 128 < K <= 256 (SpidR's K) take 128 rows and every codeword as a pair of
# 128-codeword G tiles (255 registers, no spills on sm_90 and sm_80): a single 256-codeword tile of 128 rows
# spills, and 64 rows would send twice the dW atomic bytes. Otherwise a loop over codeword tiles, by compute
# capability (None: the interpreter, which takes sm_90's) and operand width: G, its transpose, the dW tile and that
# tile's atomic pointers share the registers, and sm_80's mma keeps both operands in registers.
_PAIR_TILES = (128, 128, 32)
_BACKWARD_TILES = {(9, 2): (64, 256, 32), (9, 4): (32, 128, 16), (8, 2): (64, 128, 32), (8, 4): (32, 128, 16)}


def backward_config(num_codewords: int, dim: int, dtype: torch.dtype, capability: int | None) -> dict:
    """heads_config's, with the backward's rows, codewords and the channels of dx and dW per step."""
    pair = dtype.itemsize == 2 and 128 < num_codewords <= 256
    tiles = _PAIR_TILES if pair else _BACKWARD_TILES[8 if capability == 8 else 9, min(dtype.itemsize, 4)]
    block_n, block_k, block_do = tiles
    return dict(
        heads_config(num_codewords, dim, dtype),
        BLOCK_N=block_n,
        BLOCK_K=min(block_k, max(16, triton.next_power_of_2(num_codewords))),
        BLOCK_DO=min(block_do, max(16, triton.next_power_of_2(dim))),
        PAIR=pair,
    )


def _common(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: dict
) -> tuple[tuple, dict, tuple]:
    num_layers, num_rows, _ = x.shape
    bias_strides = bias.stride() if bias is not None else (0, 0)
    strides = (*x.stride(), *weight.stride(), *bias_strides)
    return strides, dict(HAS_BIAS=bias is not None, **config), (triton.cdiv(num_rows, config["BLOCK_N"]), num_layers)


@register("heads_cross_entropy", "triton")
def heads_cross_entropy_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, scale: float,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    num_layers, num_rows, dim = x.shape
    num_codewords = weight.shape[1]
    nll = torch.empty(num_layers, num_rows, dtype=torch.float32, device=x.device)
    lse = torch.empty_like(nll)
    config = heads_config(num_codewords, dim, x.dtype)
    strides, meta, grid = _common(x, weight, bias, config)  # without a bias, weight stands in for its unread pointer
    # Every row block writes its whole row of sums, as the backward its bias-gradient partials: no memset.
    prob_sums = torch.empty(grid[0], num_layers, num_codewords + 1, dtype=torch.float32, device=x.device)
    if num_rows:
        labels_ok = torch.ones(1, device=x.device)
        _forward_kernel[grid](
            x, weight, bias if bias is not None else weight, labels.contiguous(), nll, lse, prob_sums, labels_ok,
            num_rows, num_codewords, dim, scale, ignore_index, *strides, ONE_TILE=num_codewords <= config["BLOCK_K"],
            **meta,
        )
        # On CUDA a device-side assert, raised at the next synchronisation: no host sync in the step.
        torch._assert_async(labels_ok, f"labels must be in [0, {num_codewords}) or ignore_index = {ignore_index}")
    # Sum over layers, then divide, in the order of the official loss; block sums in a fixed order.
    sums = prob_sums.sum(0)
    return nll.sum(0) / num_layers, sums[:, :num_codewords] / sums[:, num_codewords:].clamp_min(1), lse


@register("heads_cross_entropy_backward", "triton")
def heads_cross_entropy_backward_triton(
    grad_loss: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
    lse: torch.Tensor, scale: float, ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if torch.are_deterministic_algorithms_enabled():
        return reference("heads_cross_entropy_backward")(grad_loss, x, weight, bias, labels, lse, scale, ignore_index)
    num_layers, num_rows, dim = x.shape
    num_codewords = weight.shape[1]
    capability = torch.cuda.get_device_capability(x.device)[0] if x.is_cuda else None
    config = backward_config(num_codewords, dim, x.dtype, capability)
    strides, meta, grid = _common(x, weight, bias, config)
    # One codeword tile or a pair (SpidR's K) writes dx once in its dtype; a loop over tiles adds up in fp32 first.
    one_tile = config["PAIR"] or num_codewords <= config["BLOCK_K"]
    grad_x = torch.empty(num_layers, num_rows, dim, dtype=x.dtype if one_tile else torch.float32, device=x.device)
    grad_w = torch.zeros(num_layers, num_codewords, dim, dtype=torch.float32, device=x.device)
    bias_grad = torch.empty(grid[0], num_layers, num_codewords, dtype=torch.float32, device=x.device)
    if num_rows:
        _backward_kernel[grid](
            x, weight, bias if bias is not None else weight, labels.contiguous(), lse, grad_loss.contiguous(),
            grad_x, grad_w, bias_grad, num_rows, num_codewords, dim, scale, 1.0 / num_layers, ignore_index, *strides,
            **meta,
        )
    return grad_x.to(x.dtype), grad_w.to(weight.dtype), bias_grad.sum(0)
