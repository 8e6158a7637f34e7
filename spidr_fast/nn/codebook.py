"""The EMA codebooks as a module (the `codebook` ops), stored so that all layers are updated at once and state
dicts match the official.

Each layer keeps the official buffers `{i}.codebook` (K, D) and `{i}.counts` (K,) (`codebooks.{i}.…` in a model),
but they are views into one (L, K, D) and one (L, K) tensor, which the fused ops read and update in place.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spidr_fast import ops


def keep_float32(fn: Callable[[Tensor], Tensor], tensor: Tensor) -> Tensor:
    """`fn` from `nn.Module._apply` (.to(), .cuda(), .half(), ...) applied to a float32 state tensor, except for a
    dtype change: the device move alone. The ops read float32 codebooks, and EMA sums in 16 bits lose the small
    (1 - decay) updates."""
    moved = fn(tensor)
    return moved if moved.dtype == tensor.dtype else tensor.to(moved.device)


class Codebook(nn.Module):
    codebook: Tensor
    counts: Tensor

    def __init__(self, codebook: Tensor, counts: Tensor) -> None:
        super().__init__()
        self.register_buffer("codebook", codebook)
        self.register_buffer("counts", counts)


class EMACodebooks(nn.ModuleList):
    """L codebooks of K codewords of dimension D, each the running sum `codebook` over running `counts`.

    `metric`: "l2" (official: nearest centroid codebook / counts) or "cosine" (most similar centroid). The buffers
    stay float32 when the model is cast (`.half()`, `.bfloat16()`); `.to(device)` moves them.
    """

    def __init__(self, num_codebooks: int, codebook_size: int, dim: int, decay: float, metric: str = "l2") -> None:
        if metric not in ops.METRICS:
            raise ValueError(f"metric must be one of {ops.METRICS}, got {metric!r}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        # Official initialisation: Gaussian codewords normalised per dimension across codewords, counts of one.
        init = [F.instance_norm(torch.randn(1, dim, codebook_size)).squeeze(0).t() for _ in range(num_codebooks)]
        super().__init__(Codebook(c.contiguous(), torch.ones(codebook_size)) for c in init)
        self.decay = decay
        self.metric = metric
        self._restack()
        self.register_load_state_dict_post_hook(_retie_after_load)

    def _restack(self) -> None:
        """Stack the per-layer buffers (at construction, after a load) and make them views into the stack."""
        self._tie(torch.stack([c.codebook for c in self]), torch.stack([c.counts for c in self]))

    def _tie(self, codebook: Tensor, counts: Tensor) -> None:
        self.stacked_codebook, self.stacked_counts = codebook, counts
        for i, layer in enumerate(self):
            layer.codebook, layer.counts = codebook[i], counts[i]

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 - nn.Module's signature
        self._tie(keep_float32(fn, self.stacked_codebook), keep_float32(fn, self.stacked_counts))
        return self

    def assign_layers(
        self, layers: Tensor, frame_index: Tensor, lengths: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Fused: instance-normalise layers (L, B, T, D) over time (all T frames, or the first lengths[b]), keep the
        frames at frame_index (N,), and assign them → labels (L, N), batch_counts (L, K), batch_sums (L, K, D)."""
        return ops.instance_norm_assign(
            layers, frame_index, self.stacked_codebook, self.stacked_counts, lengths=lengths, metric=self.metric
        )

    def update_(self, batch_counts: Tensor, batch_sums: Tensor) -> None:
        """EMA update with statistics already summed over ranks."""
        ops.codebook_ema_update_(self.stacked_codebook, self.stacked_counts, batch_counts, batch_sums, self.decay)


def _retie_after_load(module: EMACodebooks, _incompatible_keys: object) -> None:
    # A plain load copies into the views; `load_state_dict(assign=True)` replaces them, hence the re-tie.
    module._restack()
