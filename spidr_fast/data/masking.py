"""Span masks as in the official `spidr` (fairseq) masking, computed for a whole batch with tensor ops.

Per row of real length `sz`: `max(2, int(mask_prob * sz / mask_length + u))` spans start at distinct random
frames, spans may overlap, and every row keeps the same number of masked frames (the smallest count of the batch,
a random subset of each row's frames), so the masks travel as indices (B, M).
"""

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

MaskingStrategy = Literal["static", "uniform", "normal", "poisson"]
MIN_MASKS = 2


@dataclass(frozen=True)
class MaskingConfig:
    """The official masking section. Channel masking fields are accepted and unused, as in the official loop."""

    mask_prob: float = 0.8
    mask_selection: MaskingStrategy = "static"
    mask_other: float = 0.0
    mask_length: int = 10
    no_mask_overlap: bool = False
    mask_min_space: int = 1
    mask_channel_prob: float = 0.0
    mask_channel_selection: MaskingStrategy = "static"
    mask_channel_other: float = 0.0
    mask_channel_length: int = 10
    no_mask_channel_overlap: bool = False
    mask_channel_min_space: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.mask_prob <= 1.0:
            raise ValueError(f"masking.mask_prob must be in [0, 1], got {self.mask_prob}")
        if self.mask_length < 1:
            raise ValueError(f"masking.mask_length must be at least 1, got {self.mask_length}")
        if self.mask_selection not in ("static", "uniform", "normal", "poisson"):
            raise ValueError(f"masking.mask_selection: unknown strategy {self.mask_selection!r}")
        if self.no_mask_overlap:
            raise ValueError("masking.no_mask_overlap = true is not supported: spans may overlap (official default)")


def _span_lengths(cfg: MaskingConfig, shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    match cfg.mask_selection:
        case "static":
            return torch.full(shape, cfg.mask_length)
        case "uniform":
            return torch.randint(int(cfg.mask_other), 2 * cfg.mask_length + 1, shape, generator=generator)
        case "normal":
            lengths = torch.normal(float(cfg.mask_length), cfg.mask_other, shape, generator=generator)
            return lengths.round().clamp_min(1).long()
        case _:  # poisson
            return torch.poisson(torch.rand(shape, generator=generator) * cfg.mask_length, generator=generator).long()


def compute_mask_indices(cfg: MaskingConfig, lengths: Tensor, generator: torch.Generator) -> Tensor:
    """Masked frames of each row, (B, M) int64 sorted per row; `lengths` (B,) real frames per row."""
    batch, frames = lengths.shape[0], int(lengths.max())
    uniform = torch.rand(batch, generator=generator)
    num_spans = (cfg.mask_prob * lengths / cfg.mask_length + uniform).long().clamp_min(MIN_MASKS)
    max_spans = int(num_spans.max())
    span_lengths = _span_lengths(cfg, (batch, max_spans), generator)
    # Starts are distinct frames below sz - shortest span (leaving room for num_spans starts), as the official.
    shortest = span_lengths.min(1).values
    start_limit = torch.where(lengths - shortest <= num_spans, num_spans + 1, lengths - shortest)
    scores = torch.rand(batch, frames, generator=generator)
    scores[torch.arange(frames) >= start_limit.unsqueeze(1)] = float("inf")
    starts = scores.topk(min(max_spans, frames), dim=1, largest=False).indices
    kept_spans = torch.arange(starts.shape[1]) < num_spans.unsqueeze(1)
    offsets = torch.arange(int(span_lengths.max()) if span_lengths.numel() else 0)
    positions = starts.unsqueeze(-1) + offsets  # (B, spans, longest span)
    valid = (
        kept_spans.unsqueeze(-1)
        & (offsets < span_lengths[:, : starts.shape[1], None])
        & (positions < lengths[:, None, None])
    )
    mask = torch.zeros(batch, frames + 1, dtype=torch.bool)
    mask.scatter_(1, torch.where(valid, positions, frames).flatten(1), True)  # invalid ones land in a spare column
    mask = mask[:, :frames]
    # The same count on every row: a random subset of each row's masked frames, the smallest count of the batch.
    keep = int(mask.sum(1).min())
    pick = torch.rand(batch, frames, generator=generator).masked_fill(~mask, float("inf"))
    return pick.topk(keep, dim=1, largest=False).indices.sort(1).values
