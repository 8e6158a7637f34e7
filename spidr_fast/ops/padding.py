"""Packing padded batches into flash-attention's variable-length layout and back; the only place that does it.

    padded  (B, T, ...)            with key_padding_mask (B, T), True on real frames
    packed  (total_tokens, ...)    with cu_seqlens (B + 1,) int32: sequence b is packed[cu_seqlens[b]:cu_seqlens[b+1]]
"""

from typing import NamedTuple

import torch


class Packed(NamedTuple):
    tokens: torch.Tensor  # (total_tokens, ...)
    cu_seqlens: torch.Tensor  # (B + 1,) int32
    max_seqlen: int
    token_index: torch.Tensor  # (total_tokens,) int64 position of each token among the B * T padded frames


def cu_seqlens_from_mask(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool, True on real frames → (B + 1,) int32 cumulative lengths starting at 0."""
    lengths = key_padding_mask.sum(1, dtype=torch.int32)
    return torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def pack(padded: torch.Tensor, key_padding_mask: torch.Tensor) -> Packed:
    """Keep the real frames of `padded` (B, T, ...). Real frames need not be a prefix of each row."""
    token_index = key_padding_mask.flatten().nonzero().squeeze(1)
    max_seqlen = int(key_padding_mask.sum(1).max()) if key_padding_mask.numel() else 0
    tokens = padded.flatten(0, 1).index_select(0, token_index)
    return Packed(tokens, cu_seqlens_from_mask(key_padding_mask), max_seqlen, token_index)


def unpack(tokens: torch.Tensor, token_index: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
    """Inverse of `pack`: (total_tokens, ...) → (batch, frames, ...), zeros on padding."""
    padded = tokens.new_zeros((batch * frames, *tokens.shape[1:]))
    return padded.index_copy(0, token_index, tokens).view(batch, frames, *tokens.shape[1:])


def token_index_from_cu_seqlens(cu_seqlens: torch.Tensor, max_seqlen: int, total_tokens: int) -> torch.Tensor:
    """Position of each packed token in a (B, max_seqlen) padded layout, sequences left-aligned."""
    token = torch.arange(total_tokens, device=cu_seqlens.device)
    sequence = torch.searchsorted(cu_seqlens[1:].long(), token, right=True)
    return sequence * max_seqlen + (token - cu_seqlens.long()[sequence])


def mask_from_cu_seqlens(cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    """(B + 1,) cumulative lengths → (B, max_seqlen) bool, True on the first length_b frames of row b."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).unsqueeze(1)
    return torch.arange(max_seqlen, device=cu_seqlens.device).unsqueeze(0) < lengths
