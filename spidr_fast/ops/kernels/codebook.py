"""Triton: the codebook ops. Nearest-codeword assignment of every layer in one launch, with the batch statistics
of the EMA update; then the EMA update of every layer in one launch, in place.

Kernels:
    _instance_norm_stats_kernel  mean and 1/std per (layer, utterance, channel) over time, one pass (Chan's merge)
    _centroids_kernel            centroids codebook / counts, split into TF32 parts, and their squared norms
    _assign_kernel               per tile of rows: distances to each codeword tile on the tensor cores, channel
                                 chunk by channel chunk, a running argmin over codeword tiles, and in the fast mode
                                 atomic adds of the counts and sums
    _statistics_kernel           deterministic mode: counts and sums per (codeword block, channel block) in a
                                 fixed order, as a one-hot matmul kept in registers
    _ema_update_kernel           the official EMA rule for every codeword assigned at least once, programs over
                                 (L·K codewords) × channel chunks; the others keep their bits

The rows come either from (L, N, D) already normalised (codebook_assign), or straight from the stacked teacher
layers (L, B, T, D) through the masked-frame index and the instance-norm statistics (instance_norm_assign), so
neither the normalised targets nor an N×K distance or one-hot matrix is written to global memory. A tile of rows is
gathered and normalised once per codeword tile (two at SpidR's K = 256, see ASSIGN_TILES) and once for its sums.

Precision: the official model computes its distances in full fp32: autocast is off around its `addmm`, and its
setup sets `torch.backends.cuda.matmul.allow_tf32 = False` and `float32_matmul_precision("highest")`. Plain TF32
(10 mantissa bits) would misorder codewords whose distances differ by ~1e-3 relative. The distances here run on the
tensor cores as three TF32 products of operands split into a high and a low TF32 part (`_split_tf32`), what Triton's
`input_precision="tf32x3"` does: about 2⁻²¹ relative per product against fp32's 2⁻²⁴. The split is written out
rather than left to "tf32x3" because Triton's CPU interpreter evaluates every dot in plain fp32 whatever its
input_precision: on exact TF32 operands its products are the tensor cores' own, so CI measures the precision that
a GPU gets. A bf16 split would need six products (three bf16 parts) for the same precision, at the same tensor-core
time as three TF32 ones, and more elementwise work.
"""

import functools

import torch
import triton
import triton.language as tl

from spidr_fast.ops._dispatch import register
from spidr_fast.ops.codebook import statistics_buffer

EPS = 1e-5  # F.instance_norm's


@triton.jit
def _row_offsets(index_ptr, rows, row_mask, frames, batch, dim, stride_b, stride_t, GATHER: tl.constexpr):
    """Per row of a tile: its offset in one layer of the source, the offset of its utterance's statistics, and
    whether to read it. Offsets within a layer stay int32 (a layer holds < 2³¹ elements): int64 pointer tiles would
    double their registers.

    A frame index outside [0, B·T) fails a device assert where the launch compiles asserts in (`_assign_kernel`'s):
    no host sync. Its row is never read, so that the assert, not an illegal address, is what a GPU reports."""
    if GATHER:
        frame = tl.load(index_ptr + rows, mask=row_mask, other=0)
        in_range = (frame >= 0) & (frame < batch * frames)
        tl.device_assert(in_range | ~row_mask, "frame_index out of range: every value must lie in [0, B * T)")
        row_mask = row_mask & in_range
        frame = frame.to(tl.int32)
    else:
        frame = rows
    utterance = frame // frames
    return utterance * stride_b + (frame % frames) * stride_t, utterance * dim, row_mask


@triton.jit
def _load_rows(x_ptr, mean_ptr, rstd_ptr, offsets, stat_offsets, row_mask, d, d_mask, stride_d, NORMALIZE):
    """(BLOCK_N, BLOCK_D) float32 rows (pointers already at their layer); zeros outside the masks."""
    mask = row_mask[:, None] & d_mask[None, :]
    x = tl.load(x_ptr + offsets[:, None] + d[None, :] * stride_d, mask=mask, other=0.0).to(tl.float32)
    if NORMALIZE:
        stat = stat_offsets[:, None] + d[None, :]
        x = (x - tl.load(mean_ptr + stat, mask=mask, other=0.0)) * tl.load(rstd_ptr + stat, mask=mask, other=0.0)
    return x


@triton.jit
def _tf32(x):
    """x rounded to the nearest TF32 value (10 mantissa bits, ties away from zero: PTX's cvt.rna.tf32.f32), as
    fp32. Adding half a TF32 unit to the bits carries into the exponent exactly when rounding should."""
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _split_tf32(x):
    """x ≈ hi + lo, both exact TF32 values (what `input_precision="tf32x3"` computes inside): products of the parts
    are exact in fp32, on the tensor cores and in the interpreter alike, and hi·hi + hi·lo + lo·hi misses x·y by the
    dropped lo·lo and lo's rounding, ~2⁻²¹ relative."""
    hi = _tf32(x)
    return hi, _tf32(x - hi)


@triton.jit
def _centroids_kernel(
    codebook_ptr, counts_ptr, centroid_hi_ptr, centroid_lo_ptr, norms_ptr, num_codewords, dim,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Centroids codebook / counts of all L·K codewords, split into TF32 parts, and their squared norms in fp32:
    computed once per call, so that the assignment's codeword tiles go straight from memory to the tensor cores."""
    k = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    d = tl.arange(0, BLOCK_D)
    k_mask = k < num_codewords
    mask = k_mask[:, None] & (d < dim)[None, :]
    offsets = k[:, None] * dim + d[None, :]
    count = tl.load(counts_ptr + k, mask=k_mask, other=1.0)
    centroid = tl.load(codebook_ptr + offsets, mask=mask, other=0.0) / count[:, None]
    hi, lo = _split_tf32(centroid)
    tl.store(centroid_hi_ptr + offsets, hi, mask=mask)
    tl.store(centroid_lo_ptr + offsets, lo, mask=mask)
    tl.store(norms_ptr + k, tl.sum(centroid * centroid, axis=1), mask=k_mask)


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
    x_ptr, index_ptr, mean_ptr, rstd_ptr, centroid_hi_ptr, centroid_lo_ptr, norms_ptr, labels_ptr,
    batch_counts_ptr, batch_sums_ptr, num_rows, num_codewords, dim, frames, batch, stride_l, stride_b, stride_t,
    stride_d, COSINE: tl.constexpr, GATHER: tl.constexpr, NORMALIZE: tl.constexpr, ATOMIC_STATS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n, layer = tl.program_id(0), tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offsets, stat_offsets, row_mask = _row_offsets(
        index_ptr, rows, rows < num_rows, frames, batch, dim, stride_b, stride_t, GATHER
    )
    x_ptr += layer * stride_l
    mean_ptr += layer * batch * dim
    rstd_ptr += layer * batch * dim
    centroid_hi_ptr += layer * num_codewords * dim
    centroid_lo_ptr += layer * num_codewords * dim
    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_index = tl.zeros([BLOCK_N], tl.int32)
    for k0 in range(0, num_codewords, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < num_codewords
        norms = tl.load(norms_ptr + layer * num_codewords + k, mask=k_mask, other=0.0)
        dots = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_mask = d < dim
            x = _load_rows(x_ptr, mean_ptr, rstd_ptr, offsets, stat_offsets, row_mask, d, d_mask, stride_d, NORMALIZE)
            x_hi, x_lo = _split_tf32(x)
            c = k[:, None] * dim + d[None, :]
            c_mask = k_mask[:, None] & d_mask[None, :]
            c_hi = tl.trans(tl.load(centroid_hi_ptr + c, mask=c_mask, other=0.0))
            c_lo = tl.trans(tl.load(centroid_lo_ptr + c, mask=c_mask, other=0.0))
            # x · c to ~fp32 precision on the tensor cores, the smallest terms first; their operands are exact TF32
            # values, which "tf32" passes through unchanged.
            dots = tl.dot(x_lo, c_hi, dots, input_precision="tf32")
            dots = tl.dot(x_hi, c_lo, dots, input_precision="tf32")
            dots = tl.dot(x_hi, c_hi, dots, input_precision="tf32")
        if COSINE:  # the row's own norm does not change which codeword is most similar
            score = -dots / tl.maximum(tl.sqrt(norms), 1e-12)[None, :]
        else:  # |x|² is the same for every codeword: the reference's addmm form
            score = norms[None, :] - 2.0 * dots
        score = tl.where(k_mask[None, :], score, float("inf"))
        # Two plain reductions: tl.min with return_indices spilled 8 bytes in sm_80's second config (triton 3.9).
        tile_best = tl.min(score, axis=1)
        tile_index = tl.min(tl.where(score == tile_best[:, None], k[None, :], num_codewords), axis=1)  # lowest of ties
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
            x = _load_rows(x_ptr, mean_ptr, rstd_ptr, offsets, stat_offsets, row_mask, d, d_mask, stride_d, NORMALIZE)
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
    x_ptr += layer * stride_l
    mean_ptr += layer * batch * dim
    rstd_ptr += layer * batch * dim
    sums = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    counts = tl.zeros([BLOCK_K], tl.float32)
    for n0 in range(0, num_rows, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        offsets, stat_offsets, row_mask = _row_offsets(
            index_ptr, rows, rows < num_rows, frames, batch, dim, stride_b, stride_t, GATHER
        )
        labels = tl.load(labels_ptr + layer * num_rows + rows, mask=row_mask, other=-1)
        onehot = (labels[:, None] == k[None, :]).to(tl.float32)
        x = _load_rows(x_ptr, mean_ptr, rstd_ptr, offsets, stat_offsets, row_mask, d, d_mask, stride_d, NORMALIZE)
        sums += tl.dot(tl.trans(onehot), x, input_precision="ieee")  # exact products: 0 or 1 times x
        counts += tl.sum(onehot, axis=0)
    layer_sums = batch_sums_ptr + layer * num_codewords * dim
    tl.store(layer_sums + k[:, None] * dim + d[None, :], sums, mask=k_mask[:, None] & d_mask[None, :])
    if pid_d == 0:
        tl.store(batch_counts_ptr + layer * num_codewords + k, counts, mask=k_mask)


# The assignment's tiles (BLOCK_N rows, BLOCK_K codewords, BLOCK_D channels a step, warps, pipeline stages) for
# SpidR's shapes (L 8, K 256, D 768, N ~1.8k-7.2k rows a layer at B 12, T 250-1000), by compute capability: each
# compiles without register spills at those shapes (kernel_report, triton 3.6 and 3.9), and `triton.autotune` times
# them at the first call of each (K, D, dtypes). A 128 × 256 fp32 score tile (the whole codebook: rows read once)
# takes 128 of a thread's 255 registers and spilled in every arrangement tried, so K = 256 takes two codeword tiles
# and each row tile is gathered and normalised twice for its distances (from L2). Hopper's wgmma reads the codeword
# tiles from shared memory; Ampere's mma.sync holds both operands in registers, hence its smaller tiles. The first
# tile is the predicted winner (docs/performance-predictions-ops.md), and the only one in Triton's CPU interpreter,
# where autotune would time every config through the interpreter.
ASSIGN_TILES = {
    9: ((128, 128, 16, 8, 2), (128, 64, 16, 8, 2)),  # Hopper and newer
    8: ((64, 128, 16, 8, 2), (128, 64, 16, 8, 2)),
}
# Compiles the frame_index device assert in; no integer-overflow checks (debug's other effect).
ASSIGN_OPTIONS = dict(debug=True, sanitize_overflow=False)


def assign_configs(capability: int | None) -> list[dict]:
    """The configs autotune tries on a GPU of this compute capability (major; None: the interpreter), as constexprs
    and compile options (kernel_report compiles each)."""
    tiles = ASSIGN_TILES[8 if capability == 8 else 9]
    return [
        dict(BLOCK_N=n, BLOCK_K=k, BLOCK_D=d, num_warps=warps, num_stages=stages) | ASSIGN_OPTIONS
        for n, k, d, warps, stages in (tiles[:1] if capability is None else tiles)
    ]


@functools.cache
def _assign_tuned(capability: int | None) -> triton.runtime.Autotuner:
    configs = []
    for config in assign_configs(capability):
        num_warps, num_stages = config.pop("num_warps"), config.pop("num_stages")
        configs.append(triton.Config({k: config[k] for k in ("BLOCK_N", "BLOCK_K", "BLOCK_D")}, num_warps, num_stages))
    # reset_to_zero: each timed run adds its statistics atomically.
    return triton.autotune(configs, key=["num_codewords", "dim"], reset_to_zero=["batch_counts_ptr", "batch_sums_ptr"])(
        _assign_kernel
    )


def centroids_config(dim: int) -> dict:
    """Whole rows a program (the norm is one sum), 4096 floats in all: SpidR's 2048 codewords of 768 channels make
    512 programs."""
    block_d = triton.next_power_of_2(dim)
    return dict(BLOCK_K=max(1, 4096 // block_d), BLOCK_D=block_d, num_warps=4)


def statistics_config(num_codewords: int, dim: int) -> dict:
    """With 8 warps, 64 × 64 sum tiles over 32 channels compile for sm_80 and sm_90 without spilling (kernel_report)."""
    return dict(
        BLOCK_N=64,
        BLOCK_K=min(64, max(16, triton.next_power_of_2(num_codewords))),
        BLOCK_D=min(32, max(16, triton.next_power_of_2(dim))),
        num_warps=8,
    )


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
    labels = torch.empty(num_layers, num_rows, dtype=torch.int64, device=source.device)
    flat = statistics_buffer(num_layers, num_codewords, dim, source.device)
    if num_rows == 0:
        return labels, flat
    centroid_hi, centroid_lo = torch.empty(2, *codebook.shape, device=codebook.device)
    norms = torch.empty(num_layers, num_codewords, device=codebook.device)
    config = centroids_config(dim)
    _centroids_kernel[(triton.cdiv(num_layers * num_codewords, config["BLOCK_K"]),)](
        codebook.contiguous(), counts.contiguous(), centroid_hi, centroid_lo, norms, num_layers * num_codewords, dim,
        **config,
    )
    batch_counts, batch_sums = flat[: num_layers * num_codewords], flat[num_layers * num_codewords :]
    mean, rstd = stats if stats is not None else (source, source)  # unread when NORMALIZE is off
    index = frame_index if frame_index is not None else labels  # unread when GATHER is off
    common = dict(GATHER=frame_index is not None, NORMALIZE=stats is not None)
    strides = source.stride()
    capability = torch.cuda.get_device_capability(source.device)[0] if source.is_cuda else None
    _assign_tuned(capability)[lambda meta: (triton.cdiv(num_rows, meta["BLOCK_N"]), num_layers)](
        source, index, mean, rstd, centroid_hi, centroid_lo, norms, labels, batch_counts, batch_sums,
        num_rows, num_codewords, dim, frames, batch, *strides,
        COSINE=metric == "cosine", ATOMIC_STATS=not deterministic, **common, **ASSIGN_OPTIONS,
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
    """One program per BLOCK_K codewords (of all L·K) × BLOCK_D channels: enough programs to keep every SM's loads
    in flight, where one program per codeword block looping over D left the update latency-bound."""
    pid_k, pid_d = tl.program_id(0), tl.program_id(1)
    k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    batch_counts = tl.load(batch_counts_ptr + k, mask=k < num_codewords, other=0.0)
    assigned = batch_counts != 0.0  # also false past the end
    if pid_d == 0:
        counts = tl.load(counts_ptr + k, mask=assigned)
        tl.store(counts_ptr + k, decay * counts + (1.0 - decay) * batch_counts, mask=assigned)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offsets = k[:, None] * dim + d[None, :]
    mask = assigned[:, None] & (d < dim)[None, :]
    codebook = tl.load(codebook_ptr + offsets, mask=mask)
    sums = tl.load(batch_sums_ptr + offsets, mask=mask)
    tl.store(codebook_ptr + offsets, decay * codebook + (1.0 - decay) * sums, mask=mask)


def ema_config(dim: int) -> dict:
    """8 codewords × 256 channels a program, 16 floats a thread: SpidR's 8 × 256 codewords of 768 channels make
    768 programs, all resident at once on an H100's 132 SMs."""
    return dict(BLOCK_K=8, BLOCK_D=min(256, max(16, triton.next_power_of_2(dim))), num_warps=4)


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
    grid = (triton.cdiv(num_codewords, config["BLOCK_K"]), triton.cdiv(codebook.shape[-1], config["BLOCK_D"]))
    _ema_update_kernel[grid](
        codebook, counts, batch_counts.contiguous(), batch_sums.contiguous(), decay, num_codewords,
        codebook.shape[-1], **config,
    )
