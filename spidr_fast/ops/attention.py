"""Non-causal multi-head self-attention, padded or packed (flash-attention's variable-length layout).

    padded: q, k, v (B, T, heads, head_dim), optional valid_frames (B, T) bool, True on real frames
    packed: q, k, v (total_tokens, heads, head_dim), cu_seqlens (B + 1,) int32, max_seqlen int
The output has q's layout. `attention` checks every input, the values of cu_seqlens included; the
implementations below it (the SDPA reference here, the "cuda" one in kernels/attention.py) trust them.
"""

import math

import torch
import torch.nn.functional as F

from spidr_fast.ops import padding
from spidr_fast.ops._checks import FLOAT_DTYPES, check_same_device, check_shape, check_tensor
from spidr_fast.ops._dispatch import implementation, register


def _sdpa_padded(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid_frames: torch.Tensor | None,
    dropout_p: float,
    softmax_scale: float | None,
) -> torch.Tensor:
    # No mask at all when nothing is padded: any dense mask keeps SDPA off its flash backend. SDPA's boolean
    # attn_mask is True where attention is allowed, valid_frames' convention.
    attn_mask = None if valid_frames is None else valid_frames[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        scale=softmax_scale,
    )
    return out.transpose(1, 2)


@register("attention", "reference")
def _attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid_frames: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int | None,
    dropout_p: float,
    softmax_scale: float | None,
) -> torch.Tensor:
    if cu_seqlens is None:
        return _sdpa_padded(q, k, v, valid_frames, dropout_p, softmax_scale)
    batch = cu_seqlens.shape[0] - 1
    token_index = padding.token_index_from_cu_seqlens(cu_seqlens, max_seqlen, q.shape[0])
    q, k, v = (padding.unpack(t, token_index, batch, max_seqlen) for t in (q, k, v))
    mask = padding.mask_from_cu_seqlens(cu_seqlens, max_seqlen)
    out = _sdpa_padded(q, k, v, mask, dropout_p, softmax_scale)
    return out.flatten(0, 1).index_select(0, token_index)


def _check_cu_seqlens(cu_seqlens: torch.Tensor, total_tokens: int, max_seqlen: int) -> None:
    """The values of cu_seqlens (B + 1,) int32, read on the host: from 0, non-decreasing, up to total_tokens, no
    sequence longer than max_seqlen."""
    values = cu_seqlens.cpu()
    lengths = values[1:] - values[:-1]
    if int(values[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(values[0])}")
    if bool((lengths < 0).any()):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {values.tolist()}")
    if int(values[-1]) != total_tokens:
        raise ValueError(f"cu_seqlens must end at the token count {total_tokens}, got {int(values[-1])}")
    if int(lengths.max()) > max_seqlen:
        raise ValueError(f"max_seqlen {max_seqlen} is below the longest sequence, {int(lengths.max())}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    valid_frames: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    key_padding_mask: None = None,
) -> torch.Tensor:
    """softmax(q kᵀ · softmax_scale) v per head, over the real frames of each sequence.

    Args:
        q, k, v: (B, T, heads, head_dim) padded, or (total_tokens, heads, head_dim) packed; same shape and dtype.
        valid_frames: padded only, (B, T) bool, True on real frames (SDPA's boolean attn_mask convention, the
            opposite of nn.MultiheadAttention's key_padding_mask); None when nothing is padded.
        cu_seqlens, max_seqlen: packed only, (B + 1,) int32 cumulative lengths from 0, and the longest length.
        dropout_p: probability of dropping an attention weight (pass 0 in evaluation).
        softmax_scale: defaults to head_dim ** -0.5.
        key_padding_mask: not taken, an error: this mask was once passed under that name with True on real frames,
            which nn.MultiheadAttention's key_padding_mask means the other way round.
    Returns:
        q's shape: (B, T, heads, head_dim) or (total_tokens, heads, head_dim).
    """
    if key_padding_mask is not None:
        raise ValueError(
            "key_padding_mask is not taken: in nn.MultiheadAttention it is True on padding, and ops.attention's mask "
            "is True on real frames. Pass valid_frames (True on real frames), e.g. valid_frames=~key_padding_mask"
        )
    check_tensor("q", q, dtypes=FLOAT_DTYPES)
    for name, tensor in (("k", k), ("v", v)):
        check_tensor(name, tensor, dtypes=(q.dtype,))
        check_shape(name, tensor, q.shape, meaning="q's shape")
    check_same_device(q=q, k=k, v=v, valid_frames=valid_frames, cu_seqlens=cu_seqlens)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if softmax_scale is not None and not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be a finite number, got {softmax_scale}")
    if cu_seqlens is None:
        if q.dim() != 4:
            raise ValueError(f"q must be (B, T, heads, head_dim) without cu_seqlens, got shape {tuple(q.shape)}")
        if max_seqlen is not None:
            raise ValueError("max_seqlen goes with cu_seqlens (packed inputs); it was given without")
        if valid_frames is not None:
            check_tensor("valid_frames", valid_frames, dtypes=(torch.bool,))
            check_shape("valid_frames", valid_frames, q.shape[:2], meaning="(B, T)")
    else:
        if q.dim() != 3:
            raise ValueError(f"q must be (total_tokens, heads, head_dim) with cu_seqlens, got shape {tuple(q.shape)}")
        if valid_frames is not None:
            raise ValueError("valid_frames goes with padded inputs; packed inputs take cu_seqlens only")
        check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,))
        if cu_seqlens.shape[0] < 2:
            raise ValueError(f"cu_seqlens must have B + 1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
        if not isinstance(max_seqlen, int) or max_seqlen < 0:
            raise ValueError(f"max_seqlen must be a non-negative int with cu_seqlens, got {max_seqlen!r}")
        # One host read of B + 1 integers, left out while torch.compile traces (it would break the graph).
        if not torch.compiler.is_compiling():
            _check_cu_seqlens(cu_seqlens, q.shape[0], max_seqlen)
    return implementation("attention", q.device)(
        q, k, v, valid_frames, cu_seqlens, max_seqlen, dropout_p, softmax_scale
    )
