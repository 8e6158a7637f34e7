"""Triton: the codebook ops. Nearest-codeword assignment of every layer in one launch, with the batch statistics
of the EMA update; then the EMA update itself, in place.

Kernels:
    _instance_norm_stats_kernel  mean and 1/std per (layer, utterance, channel) over time, one pass (Chan's merge)
    _assign_kernel               per block of rows: distances tile by tile over the K codewords, running argmin,
                                 and in the fast mode atomic adds of the counts and sums
    _statistics_kernel           deterministic mode: counts and sums per (codeword block, channel block) in a
                                 fixed order, as a one-hot matmul kept in registers
    _ema_update_kernel           the official EMA rule for every codeword assigned at least once, the L·K
                                 codewords flattened into one axis of programs; the others keep their bits

The rows come either from (L, N, D) already normalised (codebook_assign), or straight from the stacked teacher
layers (L, B, T, D) through the masked-frame index and the instance-norm statistics (instance_norm_assign), so
neither the normalised targets nor an N×K distance or one-hot matrix is written to global memory.

Precision: every dot product runs in fp32 on the CUDA cores (`input_precision="ieee"`). TF32 keeps 10 mantissa bits
and misorders codewords whose distances differ by ~1e-3 relative; the split 3×TF32 path would be faster on tensor
cores, but the CPU interpreter evaluates every dot in fp32, so CI could not check it. fp32 is what the reference's
addmm computes, and it keeps labels equal to a float64 argmin except for near-ties (< 1e-4 relative).
"""

import torch
import triton
import triton.language as tl

from spidr_fast.ops._dispatch import register
from spidr_fast.ops.codebook import statistics_buffer

EPS = 1e-5  # F.instance_norm's


@triton.jit
def _load_rows(
    x_ptr, index_ptr, mean_ptr, rstd_ptr, layer, rows, row_mask, d, d_mask,
    stride_l, stride_b, stride_t, stride_d, frames, batch, dim,
    GATHER: tl.constexpr, NORMALIZE: tl.constexpr,
):
    """(BLOCK_N, BLOCK_D) float32 rows of one layer (an int64 scalar); zeros outside the masks. Tile offsets
    within a layer stay int32 (a layer holds < 2³¹ elements): int64 pointer tiles would double their registers."""
    if GATHER:
        frame = tl.load(index_ptr + rows, mask=row_mask, other=0).to(tl.int32)
    else:
        frame = rows
    utterance = frame // frames
    mask = row_mask[:, None] & d_mask[None, :]
    offsets = utterance[:, None] * stride_b + (frame % frames)[:, None] * stride_t + d[None, :] * stride_d
    x = tl.load(x_ptr + layer * stride_l + offsets, mask=mask, other=0.0).to(tl.float32)
    if NORMALIZE:
        stat = utterance[:, None] * dim + d[None, :]
        mean = tl.load(mean_ptr + layer * batch * dim + stat, mask=mask, other=0.0)
        rstd = tl.load(rstd_ptr + layer * batch * dim + stat, mask=mask, other=0.0)
        x = (x - mean) * rstd
    return x


@triton.jit
def _instance_norm_stats_kernel(
    x_ptr, lengths_ptr, mean_ptr, rstd_ptr, frames, batch, dim,
    stride_l, stride_b, stride_t, stride_d, eps,
    HAS_LENGTHS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_d, utterance, layer = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < dim
    valid = frames
    if HAS_LENGTHS:
        valid = tl.minimum(tl.load(lengths_ptr + utterance).to(tl.int32), frames)
    base = x_ptr + layer * stride_l + utterance.to(tl.int64) * stride_b + d[None, :] * stride_d
    mean = tl.zeros([BLOCK_D], tl.float32)
    m2 = tl.zeros([BLOCK_D], tl.float32)
    count = 0.0
    # One pass: each chunk's own mean and squared deviations, merged with Chan's formula (no sum-of-squares
    # cancellation when the mean is large against the spread).
    for t0 in range(0, valid, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mask = (t < valid)[:, None] & d_mask[None, :]
        x = tl.load(base + t[:, None] * stride_t, mask=mask, other=0.0).to(tl.float32)
        chunk = tl.minimum(valid - t0, BLOCK_T).to(tl.float32)
        chunk_mean = tl.sum(x, axis=0) / chunk
        deviation = tl.where(mask, x - chunk_mean[None, :], 0.0)
        total = count + chunk
        delta = chunk_mean - mean
        mean += delta * (chunk / total)
        m2 += tl.sum(deviation * deviation, axis=0) + delta * delta * (count * chunk / total)
        count = total
    var = m2 / tl.maximum(count, 1.0)
    out = (layer * batch + utterance) * dim + d
    tl.store(mean_ptr + out, mean, mask=d_mask)
    tl.store(rstd_ptr + out, 1.0 / tl.sqrt(var + eps), mask=d_mask)


@triton.jit
def _assign_kernel(
    x_ptr, index_ptr, mean_ptr, rstd_ptr, codebook_ptr, counts_ptr, labels_ptr, batch_counts_ptr, batch_sums_ptr,
    num_rows, num_codewords, dim, frames, batch, stride_l, stride_b, stride_t, stride_d,
    COSINE: tl.constexpr, GATHER: tl.constexpr, NORMALIZE: tl.constexpr, ATOMIC_STATS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n, layer = tl.program_id(0), tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < num_rows
    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_index = tl.zeros([BLOCK_N], tl.int32)
    for k0 in range(0, num_codewords, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < num_codewords
        count = tl.load(counts_ptr + layer * num_codewords + k, mask=k_mask, other=1.0)
        layer_codebook = codebook_ptr + layer * num_codewords * dim
        dots = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        norms = tl.zeros([BLOCK_K], tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_mask = d < dim
            x = _load_rows(x_ptr, index_ptr, mean_ptr, rstd_ptr, layer, rows, row_mask, d, d_mask,
                           stride_l, stride_b, stride_t, stride_d, frames, batch, dim, GATHER, NORMALIZE)
            c_mask = k_mask[:, None] & d_mask[None, :]
            centroid = tl.load(layer_codebook + k[:, None] * dim + d[None, :], mask=c_mask, other=0.0) / count[:, None]
            dots += tl.dot(x, tl.trans(centroid), input_precision="ieee")
            norms += tl.sum(centroid * centroid, axis=1)
        if COSINE:  # the row's own norm does not change which codeword is most similar
            score = -dots / tl.maximum(tl.sqrt(norms), 1e-12)[None, :]
        else:  # |x|² is the same for every codeword: the reference's addmm form
            score = norms[None, :] - 2.0 * dots
        score = tl.where(k_mask[None, :], score, float("inf"))
        tile_best = tl.min(score, axis=1)
        tile_index = tl.argmin(score, axis=1, tie_break_left=True).to(tl.int32) + k0
        better = tile_best < best  # strict: on a tie the earlier tile, hence the lower index, wins
        best = tl.where(better, tile_best, best)
        best_index = tl.where(better, tile_index, best_index)
    tl.store(labels_ptr + layer * num_rows + rows, best_index.to(tl.int64), mask=row_mask)
    if ATOMIC_STATS:
        layer_counts = batch_counts_ptr + layer * num_codewords
        tl.atomic_add(layer_counts + best_index, tl.full([BLOCK_N], 1.0, tl.float32), mask=row_mask, sem="relaxed")
        layer_sums = batch_sums_ptr + layer * num_codewords * dim
        for d0 in range(0, dim, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_mask = d < dim
            x = _load_rows(x_ptr, index_ptr, mean_ptr, rstd_ptr, layer, rows, row_mask, d, d_mask,
                           stride_l, stride_b, stride_t, stride_d, frames, batch, dim, GATHER, NORMALIZE)
            tl.atomic_add(layer_sums + best_index[:, None] * dim + d[None, :], x,
                          mask=row_mask[:, None] & d_mask[None, :], sem="relaxed")


@triton.jit
def _statistics_kernel(
    x_ptr, index_ptr, mean_ptr, rstd_ptr, labels_ptr, batch_counts_ptr, batch_sums_ptr,
    num_rows, num_codewords, dim, frames, batch, stride_l, stride_b, stride_t, stride_d,
    GATHER: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_k, pid_d, layer = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    k_mask, d_mask = k < num_codewords, d < dim
    sums = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    counts = tl.zeros([BLOCK_K], tl.float32)
    for n0 in range(0, num_rows, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_mask = rows < num_rows
        labels = tl.load(labels_ptr + layer * num_rows + rows, mask=row_mask, other=-1)
        onehot = (labels[:, None] == k[None, :]).to(tl.float32)
        x = _load_rows(x_ptr, index_ptr, mean_ptr, rstd_ptr, layer, rows, row_mask, d, d_mask,
                       stride_l, stride_b, stride_t, stride_d, frames, batch, dim, GATHER, NORMALIZE)
        sums += tl.dot(tl.trans(onehot), x, input_precision="ieee")  # exact products: 0 or 1 times x
        counts += tl.sum(onehot, axis=0)
    layer_sums = batch_sums_ptr + layer * num_codewords * dim
    tl.store(layer_sums + k[:, None] * dim + d[None, :], sums, mask=k_mask[:, None] & d_mask[None, :])
    if pid_d == 0:
        tl.store(batch_counts_ptr + layer * num_codewords + k, counts, mask=k_mask)


def _blocks(num_codewords: int, dim: int) -> dict[str, int]:
    """Tile sizes: dot operands need every side >= 16. With 8 warps, 64 × 64 score tiles and 32 channels at a time
    compile for sm_80 and sm_90 without spilling at the SpidR shapes (see kernel_report)."""
    return dict(
        BLOCK_N=64,
        BLOCK_K=min(64, max(16, triton.next_power_of_2(num_codewords))),
        BLOCK_D=min(32, max(16, triton.next_power_of_2(dim))),
    )


def assign_config(num_codewords: int, dim: int) -> dict:
    return dict(**_blocks(num_codewords, dim), num_warps=8, num_stages=2)


def statistics_config(num_codewords: int, dim: int) -> dict:
    return dict(**_blocks(num_codewords, dim), num_warps=8)


def stats_config(dim: int) -> dict:
    return dict(BLOCK_T=32, BLOCK_D=min(128, max(16, triton.next_power_of_2(dim))), num_warps=4)


def _launch_assign(
    source: torch.Tensor,
    frame_index: torch.Tensor | None,
    stats: tuple[torch.Tensor, torch.Tensor] | None,
    codebook: torch.Tensor,
    counts: torch.Tensor,
    num_rows: int,
    metric: str,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """source (L, B, T, D) read at frame_index (or (L, 1, N, D) read in order); stats: mean and 1/std (L, B, D)."""
    num_layers, batch, frames, dim = source.shape
    num_codewords = codebook.shape[1]
    codebook, counts = codebook.contiguous(), counts.contiguous()
    labels = torch.empty(num_layers, num_rows, dtype=torch.int64, device=source.device)
    flat = statistics_buffer(num_layers, num_codewords, dim, source.device)
    if num_rows == 0:
        return labels, flat
    batch_counts, batch_sums = flat[: num_layers * num_codewords], flat[num_layers * num_codewords :]
    mean, rstd = stats if stats is not None else (source, source)  # unread when NORMALIZE is off
    index = frame_index if frame_index is not None else labels  # unread when GATHER is off
    common = dict(GATHER=frame_index is not None, NORMALIZE=stats is not None)
    strides = source.stride()
    config = assign_config(num_codewords, dim)
    grid = (triton.cdiv(num_rows, config["BLOCK_N"]), num_layers)
    _assign_kernel[grid](
        source, index, mean, rstd, codebook, counts, labels, batch_counts, batch_sums,
        num_rows, num_codewords, dim, frames, batch, *strides,
        COSINE=metric == "cosine", ATOMIC_STATS=not deterministic, **common, **config,
    )
    if deterministic:
        config = statistics_config(num_codewords, dim)
        grid = (triton.cdiv(num_codewords, config["BLOCK_K"]), triton.cdiv(dim, config["BLOCK_D"]), num_layers)
        _statistics_kernel[grid](
            source, index, mean, rstd, labels, batch_counts, batch_sums,
            num_rows, num_codewords, dim, frames, batch, *strides, **common, **config,
        )
    return labels, flat


@register("codebook_assign", "triton")
def codebook_assign_triton(
    x: torch.Tensor, codebook: torch.Tensor, counts: torch.Tensor, metric: str, deterministic: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_assign(x.unsqueeze(1), None, None, codebook, counts, x.shape[1], metric, deterministic)


@register("instance_norm_assign", "triton")
def instance_norm_assign_triton(
    layers: torch.Tensor, frame_index: torch.Tensor, codebook: torch.Tensor, counts: torch.Tensor,
    lengths: torch.Tensor | None, metric: str, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    num_layers, batch, frames, dim = layers.shape
    mean = torch.empty(num_layers, batch, dim, dtype=torch.float32, device=layers.device)
    rstd = torch.empty_like(mean)
    if frame_index.numel() and frames:
        config = stats_config(dim)
        grid = (triton.cdiv(dim, config["BLOCK_D"]), batch, num_layers)
        _instance_norm_stats_kernel[grid](
            layers, lengths if lengths is not None else layers, mean, rstd, frames, batch, dim, *layers.stride(), EPS,
            HAS_LENGTHS=lengths is not None, **config,
        )
    return _launch_assign(
        layers, frame_index, (mean, rstd), codebook, counts, frame_index.numel(), metric, deterministic
    )


# --- EMA update ---------------------------------------------------------------------------------------------------


@triton.jit
def _ema_update_kernel(
    codebook_ptr, counts_ptr, batch_counts_ptr, batch_sums_ptr, decay, num_codewords, dim,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    batch_counts = tl.load(batch_counts_ptr + k, mask=k < num_codewords, other=0.0)
    assigned = batch_counts != 0.0  # also false past the end
    counts = tl.load(counts_ptr + k, mask=assigned)
    tl.store(counts_ptr + k, decay * counts + (1.0 - decay) * batch_counts, mask=assigned)
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        offsets = k[:, None] * dim + d[None, :]
        mask = assigned[:, None] & (d < dim)[None, :]
        codebook = tl.load(codebook_ptr + offsets, mask=mask)
        sums = tl.load(batch_sums_ptr + offsets, mask=mask)
        tl.store(codebook_ptr + offsets, decay * codebook + (1.0 - decay) * sums, mask=mask)


def ema_config(dim: int) -> dict:
    return dict(BLOCK_K=16, BLOCK_D=min(256, triton.next_power_of_2(dim)), num_warps=4)


@register("codebook_ema_update_", "triton")
def codebook_ema_update_triton(
    codebook: torch.Tensor, counts: torch.Tensor, batch_counts: torch.Tensor, batch_sums: torch.Tensor, decay: float
) -> None:
    if not (codebook.is_contiguous() and counts.is_contiguous()):
        raise ValueError(
            f"codebook and counts must be contiguous to be updated in place, got strides {codebook.stride()} and "
            f"{counts.stride()}"
        )
    num_codewords = counts.numel()
    config = ema_config(codebook.shape[-1])
    _ema_update_kernel[(triton.cdiv(num_codewords, config["BLOCK_K"]),)](
        codebook, counts, batch_counts.contiguous(), batch_sums.contiguous(), decay, num_codewords,
        codebook.shape[-1], **config,
    )
