"""Online EMA codebooks: teacher targets, nearest-codeword assignment with its batch statistics, EMA update.

All ops work on the L codebooks of a model at once. Shapes:
    x              (L, N, D)  rows to assign, N frames per layer
    codebook       (L, K, D)  float32 running sums of the rows assigned to each codeword
    counts         (L, K)     float32 running counts; the centroid of codeword k is codebook[k] / counts[k], and a
                              codeword whose count is 0 has none: it is never assigned (an empty cluster)
    labels         (L, N)     int64
    batch_counts   (L, K)     float32 rows assigned to each codeword in this batch
    batch_sums     (L, K, D)  float32 sum of the rows assigned to each codeword in this batch

batch_counts and batch_sums are views of one flat float32 buffer, counts first (`codebook_statistics`), so that
a distributed run sums both over ranks with a single all-reduce.

Each op is a custom op `torch.ops.spidr_fast.<name>` declared by `_dispatch.custom_op` (which says why).
"""

from typing import Literal

import torch
import torch.nn.functional as F

from spidr_fast.ops._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_same_device,
    check_shape,
    check_tensor,
    check_values_in_range,
)
from spidr_fast.ops._dispatch import custom_op, register

Metric = Literal["l2", "cosine"]
METRICS = ("l2", "cosine")


# --- teacher targets ---------------------------------------------------------------------------------------------


def _instance_norm(layers: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """(L, B, T, D) → float32, normalised per utterance and channel over time (the first lengths[b] frames)."""
    num_layers, batch, frames, dim = layers.shape
    x = layers.float()
    if lengths is None:  # official formula: F.instance_norm over all T frames, padding included
        return F.instance_norm(x.reshape(-1, frames, dim).transpose(1, 2)).transpose(1, 2).reshape(x.shape)
    valid = (torch.arange(frames, device=layers.device) < lengths.unsqueeze(1)).unsqueeze(-1)  # (B, T, 1)
    count = valid.sum(1, keepdim=True).clamp_min(1)
    mean = torch.where(valid, x, 0).sum(2, keepdim=True) / count
    var = torch.where(valid, (x - mean).square(), 0).sum(2, keepdim=True) / count
    return (x - mean) / torch.sqrt(var + 1e-5)


@register("instance_norm_select", "reference")
def _instance_norm_select_reference(layers: torch.Tensor, frame_index: torch.Tensor) -> torch.Tensor:
    return _instance_norm(layers, None).flatten(1, 2).index_select(1, frame_index)


def _fake_select(layers: torch.Tensor, frame_index: torch.Tensor) -> torch.Tensor:
    return layers.new_empty((layers.shape[0], frame_index.shape[0], layers.shape[3]), dtype=torch.float32)


_instance_norm_select_op = custom_op("instance_norm_select", fake=_fake_select)


def instance_norm_select(layers: torch.Tensor, frame_index: torch.Tensor) -> torch.Tensor:
    """Teacher targets: instance-normalise each layer per utterance and channel over time, keep some frames.

    Args:
        layers: (L, B, T, D) teacher layer outputs, any float dtype. As in the official model, the statistics
            run over all T frames, padding included.
        frame_index: (N,) int64 or int32 indices into the B * T frames, e.g. `masked_frame_index(mask_indices, T)`.
    Returns:
        (L, N, D) float32.
    """
    check_tensor("layers", layers, ndim=4, dtypes=FLOAT_DTYPES)
    _check_frame_index(frame_index, layers)
    check_same_device(layers=layers, frame_index=frame_index)
    return _instance_norm_select_op(layers, frame_index)


def _check_frame_index(frame_index: torch.Tensor, layers: torch.Tensor) -> None:
    check_tensor("frame_index", frame_index, ndim=1, dtypes=INDEX_DTYPES)
    frames = layers.shape[1] * layers.shape[2]
    check_values_in_range("frame_index", frame_index, frames, meaning=f"B * T = {frames} frames of layers")


# --- assignment ----------------------------------------------------------------------------------------------------


def statistics_buffer(num_layers: int, num_codewords: int, dim: int, device: torch.device) -> torch.Tensor:
    """The flat float32 statistics buffer, zeroed: batch_counts (L·K) then batch_sums (L·K·D)."""
    return torch.zeros(num_layers * num_codewords * (dim + 1), device=device)


def codebook_statistics(flat: torch.Tensor, num_layers: int, num_codewords: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat statistics buffer (L·K·(D + 1),) as its views batch_counts (L, K) and batch_sums (L, K, D)."""
    batch_counts, batch_sums = flat.split([num_layers * num_codewords, flat.shape[0] - num_layers * num_codewords])
    return batch_counts.view(num_layers, num_codewords), batch_sums.view(num_layers, num_codewords, -1)


@register("codebook_assign", "reference")
def _codebook_assign_reference(
    x: torch.Tensor, codebook: torch.Tensor, counts: torch.Tensor, metric: str, deterministic: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    del deterministic  # scatter_add_ on CPU is deterministic; on CUDA torch.use_deterministic_algorithms decides
    num_layers, num_codewords, dim = codebook.shape
    with torch.autocast(x.device.type, enabled=False):
        rows = x.float()
        centroids = codebook / counts.unsqueeze(-1)
        labels = torch.empty(rows.shape[:2], dtype=torch.int64, device=x.device)
        # One matmul per layer, the official `addmm` form, so labels match the official ones bit for bit.
        for layer in range(num_layers):
            empty = counts[layer] == 0  # no centroid: never assigned
            if metric == "l2":
                distances = torch.addmm(centroids[layer].square().sum(1), rows[layer], centroids[layer].t(), alpha=-2)
                # argmin returns the first minimum: ties go to the lowest index
                labels[layer] = distances.masked_fill_(empty, float("inf")).argmin(1)
            else:
                similarity = F.normalize(rows[layer], dim=-1) @ F.normalize(centroids[layer], dim=-1).t()
                labels[layer] = similarity.masked_fill_(empty, float("-inf")).argmax(1)
        flat = statistics_buffer(num_layers, num_codewords, dim, x.device)
        batch_counts, batch_sums = codebook_statistics(flat, num_layers, num_codewords)
        batch_counts.scatter_add_(1, labels, torch.ones_like(labels, dtype=torch.float32))
        batch_sums.scatter_add_(1, labels.unsqueeze(-1).expand_as(rows), rows)
    return labels, flat


def _fake_assign(num_rows: int, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    num_layers, num_codewords, dim = codebook.shape
    labels = codebook.new_empty((num_layers, num_rows), dtype=torch.int64)
    return labels, codebook.new_empty(num_layers * num_codewords * (dim + 1))


_codebook_assign_op = custom_op("codebook_assign", fake=lambda x, codebook, *_: _fake_assign(x.shape[1], codebook))


def _check_codebooks(codebook: torch.Tensor, counts: torch.Tensor) -> tuple[int, int, int]:
    check_tensor("codebook", codebook, ndim=3, dtypes=(torch.float32,))
    check_tensor("counts", counts, ndim=2, dtypes=(torch.float32,))
    num_layers, num_codewords, dim = codebook.shape
    check_shape("counts", counts, (num_layers, num_codewords), meaning="(L, K)")
    return num_layers, num_codewords, dim


def _check_metric(metric: str, deterministic: bool | None) -> bool:
    """Validates the metric; `deterministic=None` follows torch.use_deterministic_algorithms."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return torch.are_deterministic_algorithms_enabled() if deterministic is None else bool(deterministic)


@torch.no_grad()
def codebook_assign(
    x: torch.Tensor,
    codebook: torch.Tensor,
    counts: torch.Tensor,
    *,
    metric: Metric = "l2",
    deterministic: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest codeword of every row of every layer, and the batch statistics that the EMA update needs.

    Args:
        x: (L, N, D) float32, bfloat16 or float16; computed in float32 with autocast off.
        codebook: (L, K, D) float32 running sums; counts: (L, K) float32 running counts, >= 0. A codeword whose count
            is 0 is never assigned (no rows, no centroid), as an empty cluster in k-means.
        metric: "l2" (official: smallest Euclidean distance to centroid = codebook / counts) or "cosine"
            (largest cosine similarity to the centroid). Ties go to the lowest index.
        deterministic: sum the statistics in a fixed order (the fused kernel's slower mode) instead of with atomic
            adds; None follows `torch.are_deterministic_algorithms_enabled()`.
    Returns:
        labels (L, N) int64, batch_counts (L, K) float32, batch_sums (L, K, D) float32; the statistics are views
        of one flat buffer (see `codebook_statistics`).
    """
    deterministic = _check_metric(metric, deterministic)
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    num_layers, _, dim = _check_codebooks(codebook, counts)
    if x.shape[0] != num_layers or x.shape[2] != dim:
        raise ValueError(
            f"x must have shape (L, N, D) with L = {num_layers} and D = {dim} from codebook {tuple(codebook.shape)}, "
            f"got {tuple(x.shape)}"
        )
    check_same_device(x=x, codebook=codebook, counts=counts)
    labels, flat = _codebook_assign_op(x, codebook, counts, metric, deterministic)
    return labels, *codebook_statistics(flat, num_layers, codebook.shape[1])


@register("instance_norm_assign", "reference")
def _instance_norm_assign_reference(
    layers: torch.Tensor,
    frame_index: torch.Tensor,
    codebook: torch.Tensor,
    counts: torch.Tensor,
    lengths: torch.Tensor | None,
    metric: str,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    targets = _instance_norm(layers, lengths).flatten(1, 2).index_select(1, frame_index)
    return _codebook_assign_reference(targets, codebook, counts, metric, deterministic)


_instance_norm_assign_op = custom_op(
    "instance_norm_assign", fake=lambda layers, frame_index, codebook, *_: _fake_assign(frame_index.shape[0], codebook)
)


@torch.no_grad()
def instance_norm_assign(
    layers: torch.Tensor,
    frame_index: torch.Tensor,
    codebook: torch.Tensor,
    counts: torch.Tensor,
    *,
    lengths: torch.Tensor | None = None,
    metric: Metric = "l2",
    deterministic: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`codebook_assign(instance_norm_select(layers, frame_index), ...)` fused: the teacher targets are never
    written out. The fused kernel reads the layers once for the statistics, then only the selected frames (once per
    tile of codewords, mostly from L2) to normalise and assign them.

    Args:
        layers: (L, B, T, D) teacher layer outputs, float32, bfloat16 or float16.
        frame_index: (N,) int64 or int32 indices into the B * T frames.
        codebook, counts, metric, deterministic: as `codebook_assign`.
        lengths: (B,) int64 or int32 valid frames per utterance, at most T: the statistics then run over the first
            lengths[b] frames only. None (the official behaviour) uses all T frames, padding included.
    Index values (frame_index, lengths) are checked on CPU tensors; on CUDA the kernel that reads them does.
    Returns:
        labels (L, N) int64, batch_counts (L, K) float32, batch_sums (L, K, D) float32, as `codebook_assign`.
    """
    deterministic = _check_metric(metric, deterministic)
    check_tensor("layers", layers, ndim=4, dtypes=FLOAT_DTYPES)
    _check_frame_index(frame_index, layers)
    num_layers, num_codewords, dim = _check_codebooks(codebook, counts)
    if layers.shape[0] != num_layers or layers.shape[3] != dim:
        raise ValueError(
            f"layers must have shape (L, B, T, D) with L = {num_layers} and D = {dim} from codebook "
            f"{tuple(codebook.shape)}, got {tuple(layers.shape)}"
        )
    if lengths is not None:
        check_tensor("lengths", lengths, ndim=1, dtypes=INDEX_DTYPES)
        check_shape("lengths", lengths, layers.shape[1:2], meaning="(B,)")
        frames = layers.shape[2]
        check_values_in_range("lengths", lengths, frames + 1, meaning=f"at most T = {frames} frames of layers")
    check_same_device(layers=layers, frame_index=frame_index, codebook=codebook, counts=counts, lengths=lengths)
    labels, flat = _instance_norm_assign_op(layers, frame_index, codebook, counts, lengths, metric, deterministic)
    return labels, *codebook_statistics(flat, num_layers, num_codewords)


# --- EMA update ----------------------------------------------------------------------------------------------------


@register("codebook_ema_update_", "reference")
def _codebook_ema_update_reference(
    codebook: torch.Tensor, counts: torch.Tensor, batch_counts: torch.Tensor, batch_sums: torch.Tensor, decay: float
) -> None:
    # Codewords assigned nothing in this batch keep their state exactly (decay 1 for them).
    alpha = torch.where(batch_counts != 0, decay, 1.0)
    counts.copy_(alpha * counts + (1 - alpha) * batch_counts)
    codebook.copy_(alpha.unsqueeze(-1) * codebook + (1 - alpha).unsqueeze(-1) * batch_sums)


_codebook_ema_update_op = custom_op("codebook_ema_update_", fake=lambda *_: None, mutates_args=("codebook", "counts"))


@torch.no_grad()
def codebook_ema_update_(
    codebook: torch.Tensor, counts: torch.Tensor, batch_counts: torch.Tensor, batch_sums: torch.Tensor, decay: float
) -> None:
    """In place, every layer, the official rule for each codeword assigned at least once in the batch:

        counts   = decay * counts   + (1 - decay) * batch_counts
        codebook = decay * codebook + (1 - decay) * batch_sums

    The batch statistics must already be summed over ranks in a distributed run. decay is in [0, 1]; 1 changes
    nothing.
    """
    num_layers, num_codewords, dim = _check_codebooks(codebook, counts)
    check_tensor("batch_counts", batch_counts, dtypes=(torch.float32,))
    check_tensor("batch_sums", batch_sums, dtypes=(torch.float32,))
    check_shape("batch_counts", batch_counts, (num_layers, num_codewords), meaning="(L, K)")
    check_shape("batch_sums", batch_sums, (num_layers, num_codewords, dim), meaning="(L, K, D)")
    check_same_device(codebook=codebook, counts=counts, batch_counts=batch_counts, batch_sums=batch_sums)
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    if decay >= 1.0:
        return
    _codebook_ema_update_op(codebook, counts, batch_counts, batch_sums, decay)
