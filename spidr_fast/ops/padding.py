"""Between the padded layout and flash-attention's variable-length (packed) one, for the reference attention.

padded  (B, T, ...)            with valid_frames (B, T), True on real frames
packed  (total_tokens, ...)    with cu_seqlens (B + 1,) int32: sequence b is packed[cu_seqlens[b]:cu_seqlens[b+1]]
"""

import torch


def unpack(tokens: torch.Tensor, token_index: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
    """(total_tokens, ...) tokens at `token_index` among the batch * frames padded ones → (batch, frames, ...),
    zeros on padding."""
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
