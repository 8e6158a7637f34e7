"""One online codebook as a module that drops into any model, in the style of vector-quantize-pytorch's
`VectorQuantize` (EMA updates, `mask` or lengths, k-means init, dead-code restarts, sync across DDP ranks), built on
the fused `codebook` ops. It returns labels, the targets of a masked-prediction loss, rather than quantised vectors.

State (float32 whatever the model's dtype): `codebook` (K, D) running sums and `counts` (K,) running counts, the
centroid of codeword k being codebook[k] / counts[k], as in DinoSR/SpidR's codebooks.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from spidr_fast import ops
from spidr_fast.distributed import is_distributed, sum_over_ranks
from spidr_fast.nn.codebook import keep_float32
from spidr_fast.ops._checks import INDEX_DTYPES, check_shape, check_tensor, check_values_in_range


class OnlineCodebook(nn.Module):
    """K codewords of dimension D, assigned and updated online.

    forward(x (B, T, D), mask=None | lengths=None) → labels (B, T) int64, `ignore_index` on the frames left out
    (mask False, or past lengths[b]), so that they feed `heads_cross_entropy` or F.cross_entropy directly. In
    training mode the same call updates the codebook: EMA of the sums and counts of the frames assigned to each
    codeword (`decay`, the official rule: a codeword assigned nothing keeps its state).

    Args:
        dim, codebook_size: D and K.
        decay: EMA decay in [0, 1]; 1 freezes the codebook.
        metric: "l2" (nearest centroid) or "cosine" (most similar centroid), as `ops.codebook_assign`.
        kmeans_init: initialise the codebook by k-means (`kmeans_iters` Lloyd iterations) on the first training
            batch, instead of DinoSR's random initialisation. Off by default.
        threshold_ema_dead_code: a codeword whose running count falls below it restarts on a random frame of the
            batch (count 1). 0, the default, never restarts.
        sync_codebook: sum the batch statistics over DDP ranks before the update (one all-reduce), so that every
            rank keeps the same codebook; None syncs when a process group with several ranks is initialised.
        ignore_index: the label of the frames left out (-100, F.cross_entropy's default).
    """

    codebook: Tensor
    counts: Tensor
    initted: Tensor

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        decay: float = 0.9,
        metric: str = "l2",
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        threshold_ema_dead_code: float = 0.0,
        sync_codebook: bool | None = None,
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        if metric not in ops.METRICS:
            raise ValueError(f"metric must be one of {ops.METRICS}, got {metric!r}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        if threshold_ema_dead_code < 0:
            raise ValueError(f"threshold_ema_dead_code must be non-negative, got {threshold_ema_dead_code}")
        self.decay, self.metric, self.ignore_index = decay, metric, ignore_index
        self.kmeans_iters, self.threshold_ema_dead_code, self.sync_codebook = (
            kmeans_iters,
            threshold_ema_dead_code,
            sync_codebook,
        )
        # DinoSR's initialisation: Gaussian codewords normalised per dimension across codewords, counts of one.
        self.register_buffer(
            "codebook", F.instance_norm(torch.randn(1, dim, codebook_size)).squeeze(0).t().contiguous()
        )
        self.register_buffer("counts", torch.ones(codebook_size))
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        # A host copy of `initted`, so that forward never reads the buffer (a sync on CUDA) to decide.
        self._needs_kmeans = kmeans_init
        self.register_load_state_dict_post_hook(_read_initted_after_load)

    @property
    def centroids(self) -> Tensor:
        """(K, D) float32: codebook / counts."""
        return self.codebook / self.counts.unsqueeze(-1)

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 - nn.Module's signature
        # A whole-model cast (.half(), .bfloat16()) leaves the float32 state float32 and still moves it.
        return super()._apply(lambda t: keep_float32(fn, t) if t.dtype == torch.float32 else fn(t), recurse)

    def _synced(self) -> bool:
        return is_distributed() if self.sync_codebook is None else self.sync_codebook

    def _assign(
        self, rows: Tensor, codebook: Tensor, counts: Tensor, left_out: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """rows (1, N, D), zero where left_out (N,) → labels (1, N), batch statistics without the left-out rows."""
        labels, batch_counts, batch_sums = ops.codebook_assign(rows, codebook[None], counts[None], metric=self.metric)
        if left_out is not None:
            # A zeroed row adds nothing to the sums but 1 to its codeword's count: take those counts back, no sync.
            batch_counts.scatter_add_(1, labels, -left_out.float().unsqueeze(0))
        if self._synced():
            batch_counts, batch_sums = sum_over_ranks(batch_counts, batch_sums)
        return labels, batch_counts, batch_sums

    def forward(self, x: Tensor, mask: Tensor | None = None, lengths: Tensor | None = None) -> Tensor:
        """x (B, T, D) float32, bfloat16 or float16; mask (B, T) bool, True on the frames to assign, or lengths (B,)
        int64/int32 valid frames per row → labels (B, T) int64."""
        check_tensor("x", x, ndim=3)
        batch, frames, dim = x.shape
        check_shape("x", x, (batch, frames, self.codebook.shape[1]), meaning="(B, T, D)")
        if mask is not None and lengths is not None:
            raise ValueError("pass mask or lengths, not both")
        if lengths is not None:
            check_tensor("lengths", lengths, ndim=1, dtypes=INDEX_DTYPES)
            check_shape("lengths", lengths, (batch,), meaning="(B,)")
            check_values_in_range("lengths", lengths, frames + 1, meaning=f"at most T = {frames} frames of x")
            mask = torch.arange(frames, device=x.device) < lengths.unsqueeze(1)
        elif mask is not None:
            check_tensor("mask", mask, dtypes=(torch.bool,))
            check_shape("mask", mask, (batch, frames), meaning="(B, T)")
        left_out = None if mask is None else ~mask.reshape(-1)
        with torch.no_grad():
            rows = x.detach().reshape(1, batch * frames, dim)
            if left_out is not None:
                rows = rows.masked_fill(left_out[None, :, None], 0)
            if self.training and self._needs_kmeans:
                self._kmeans_init(rows, left_out)
            labels, batch_counts, batch_sums = self._assign(rows, self.codebook, self.counts, left_out)
            if self.training:
                ops.codebook_ema_update_(self.codebook[None], self.counts[None], batch_counts, batch_sums, self.decay)
                if self.threshold_ema_dead_code > 0:
                    self._restart_dead_codes(rows, left_out)
        if left_out is not None:
            labels = labels.masked_fill(left_out.unsqueeze(0), self.ignore_index)
        return labels.view(batch, frames)

    def _sample_rows(self, rows: Tensor, left_out: Tensor | None) -> Tensor:
        """(K, D) float32 frames drawn at random from those not left out, the same on every synced rank."""
        weights = torch.ones(rows.shape[1], device=rows.device) if left_out is None else (~left_out).float()
        # All left out: draw among every (zeroed) row rather than fail, without reading the count on the host.
        weights = weights + (weights.sum() == 0).float()
        sample = rows[0].index_select(0, torch.multinomial(weights, self.codebook.shape[0], replacement=True))
        sample = sample.float()
        if self._synced():
            dist.broadcast(sample, 0)
        return sample

    def _kmeans_init(self, rows: Tensor, left_out: Tensor | None) -> None:
        """Lloyd's k-means from codewords drawn among the frames, with the assignment op (and its all-reduce)."""
        codebook, counts = self._sample_rows(rows, left_out), torch.ones_like(self.counts)
        for _ in range(self.kmeans_iters):
            _, batch_counts, batch_sums = self._assign(rows, codebook, counts, left_out)
            assigned = batch_counts[0] > 0  # a codeword assigned nothing keeps its centroid
            codebook = torch.where(assigned.unsqueeze(-1), batch_sums[0], codebook)
            counts = torch.where(assigned, batch_counts[0], counts)
        self.codebook.copy_(codebook)
        self.counts.copy_(counts)
        self.initted.fill_(True)
        self._needs_kmeans = False

    def _restart_dead_codes(self, rows: Tensor, left_out: Tensor | None) -> None:
        """Codewords whose running count fell below the threshold restart on a random frame, count 1 (no sync)."""
        dead = self.counts < self.threshold_ema_dead_code
        sample = self._sample_rows(rows, left_out)
        self.codebook.copy_(torch.where(dead.unsqueeze(-1), sample, self.codebook))
        self.counts.copy_(torch.where(dead, 1.0, self.counts))


def _read_initted_after_load(module: OnlineCodebook, _incompatible_keys: object) -> None:
    module._needs_kmeans = not bool(module.initted)
