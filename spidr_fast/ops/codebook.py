"""Online EMA codebooks: teacher targets, nearest-codeword assignment with its batch statistics, EMA update.

All ops work on the L codebooks of a model at once. Shapes:
    x              (L, N, D)  rows to assign, N frames per layer
    codebook       (L, K, D)  float32 running sums of the rows assigned to each codeword
    counts         (L, K)     float32 running counts; the centroid of codeword k is codebook[k] / counts[k]
    labels         (L, N)     int64
    batch_counts   (L, K)     float32 rows assigned to each codeword in this batch
    batch_sums     (L, K, D)  float32 sum of the rows assigned to each codeword in this batch
"""

from typing import Literal

import torch
import torch.nn.functional as F

from spidr_fast.ops._checks import FLOAT_DTYPES, check_same_device, check_shape, check_tensor
from spidr_fast.ops._dispatch import implementation, register

Metric = Literal["l2", "cosine"]
METRICS = ("l2", "cosine")


# --- teacher targets ---------------------------------------------------------------------------------------------


@register("instance_norm_select", "reference")
def _instance_norm_select_reference(layers: torch.Tensor, frame_index: torch.Tensor) -> torch.Tensor:
    batch, frames, dim = layers.shape[1:]
    # Official formula: F.instance_norm over time of each utterance and channel, in float32.
    normed = F.instance_norm(layers.float().reshape(-1, frames, dim).transpose(1, 2)).transpose(1, 2)
    return normed.reshape(layers.shape[0], batch * frames, dim).index_select(1, frame_index)


def instance_norm_select(layers: torch.Tensor, frame_index: torch.Tensor) -> torch.Tensor:
    """Teacher targets: instance-normalise each layer per utterance and channel over time, keep some frames.

    Args:
        layers: (L, B, T, D) teacher layer outputs, any float dtype. As in the official model, the statistics
            run over all T frames, padding included.
        frame_index: (N,) int64 indices into the B * T frames, e.g. `masked_frame_index(mask_indices, T)`.
    Returns:
        (L, N, D) float32.
    """
    check_tensor("layers", layers, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("frame_index", frame_index, ndim=1, dtypes=(torch.int64,))
    check_same_device(layers=layers, frame_index=frame_index)
    return implementation("instance_norm_select", layers.device)(layers, frame_index)


# --- assignment ----------------------------------------------------------------------------------------------------


@register("codebook_assign", "reference")
def _codebook_assign_reference(
    x: torch.Tensor, codebook: torch.Tensor, counts: torch.Tensor, metric: Metric
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    num_layers, num_codewords, dim = codebook.shape
    with torch.autocast(x.device.type, enabled=False):
        rows = x.float()
        centroids = codebook / counts.unsqueeze(-1)
        labels = torch.empty(rows.shape[:2], dtype=torch.int64, device=x.device)
        # One matmul per layer, the official `addmm` form, so labels match the official ones bit for bit.
        for layer in range(num_layers):
            if metric == "l2":
                distances = torch.addmm(
                    centroids[layer].square().sum(1), rows[layer], centroids[layer].t(), alpha=-2
                )
                labels[layer] = distances.argmin(1)  # argmin returns the first minimum: ties go to the lowest index
            else:
                similarity = F.normalize(rows[layer], dim=-1) @ F.normalize(centroids[layer], dim=-1).t()
                labels[layer] = similarity.argmax(1)
        batch_counts = torch.zeros(num_layers, num_codewords, device=x.device)
        batch_counts.scatter_add_(1, labels, torch.ones_like(labels, dtype=torch.float32))
        batch_sums = torch.zeros(num_layers, num_codewords, dim, device=x.device)
        batch_sums.scatter_add_(1, labels.unsqueeze(-1).expand_as(rows), rows)
    return labels, batch_counts, batch_sums


def _check_codebooks(codebook: torch.Tensor, counts: torch.Tensor) -> tuple[int, int, int]:
    check_tensor("codebook", codebook, ndim=3, dtypes=(torch.float32,))
    check_tensor("counts", counts, ndim=2, dtypes=(torch.float32,))
    num_layers, num_codewords, dim = codebook.shape
    check_shape("counts", counts, (num_layers, num_codewords), meaning="(L, K)")
    return num_layers, num_codewords, dim


@torch.no_grad()
def codebook_assign(
    x: torch.Tensor, codebook: torch.Tensor, counts: torch.Tensor, *, metric: Metric = "l2"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest codeword of every row of every layer, and the batch statistics that the EMA update needs.

    Args:
        x: (L, N, D) float32, bfloat16 or float16; computed in float32 with autocast off.
        codebook: (L, K, D) float32 running sums; counts: (L, K) float32 running counts.
        metric: "l2" (official: smallest Euclidean distance to centroid = codebook / counts) or "cosine"
            (largest cosine similarity to the centroid). Ties go to the lowest index.
    Returns:
        labels (L, N) int64, batch_counts (L, K) float32, batch_sums (L, K, D) float32.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    num_layers, _, dim = _check_codebooks(codebook, counts)
    if x.shape[0] != num_layers or x.shape[2] != dim:
        raise ValueError(
            f"x must have shape (L, N, D) with L = {num_layers} and D = {dim} from codebook {tuple(codebook.shape)}, "
            f"got {tuple(x.shape)}"
        )
    check_same_device(x=x, codebook=codebook, counts=counts)
    return implementation("codebook_assign", x.device)(x, codebook, counts, metric)


# --- EMA update ----------------------------------------------------------------------------------------------------


@register("codebook_ema_update_", "reference")
def _codebook_ema_update_reference(
    codebook: torch.Tensor, counts: torch.Tensor, batch_counts: torch.Tensor, batch_sums: torch.Tensor, decay: float
) -> None:
    # Codewords assigned nothing in this batch keep their state exactly (decay 1 for them).
    alpha = torch.where(batch_counts != 0, decay, 1.0)
    counts.copy_(alpha * counts + (1 - alpha) * batch_counts)
    codebook.copy_(alpha.unsqueeze(-1) * codebook + (1 - alpha).unsqueeze(-1) * batch_sums)


@torch.no_grad()
def codebook_ema_update_(
    codebook: torch.Tensor,
    counts: torch.Tensor,
    batch_counts: torch.Tensor,
    batch_sums: torch.Tensor,
    decay: float,
) -> None:
    """In place, every layer, the official rule for each codeword assigned at least once in the batch:

        counts   = decay * counts   + (1 - decay) * batch_counts
        codebook = decay * codebook + (1 - decay) * batch_sums

    The batch statistics must already be summed over ranks in a distributed run. decay >= 1 changes nothing.
    """
    num_layers, num_codewords, dim = _check_codebooks(codebook, counts)
    check_tensor("batch_counts", batch_counts, dtypes=(torch.float32,))
    check_tensor("batch_sums", batch_sums, dtypes=(torch.float32,))
    check_shape("batch_counts", batch_counts, (num_layers, num_codewords), meaning="(L, K)")
    check_shape("batch_sums", batch_sums, (num_layers, num_codewords, dim), meaning="(L, K, D)")
    check_same_device(codebook=codebook, counts=counts, batch_counts=batch_counts, batch_sums=batch_sums)
    if not 0.0 <= decay:
        raise ValueError(f"decay must be non-negative, got {decay}")
    if decay >= 1.0:
        return
    implementation("codebook_ema_update_", codebook.device)(codebook, counts, batch_counts, batch_sums, decay)
