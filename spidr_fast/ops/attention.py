"""Non-causal multi-head self-attention, padded or packed (flash-attention's variable-length layout).

    padded: q, k, v (B, T, heads, head_dim), optional key_padding_mask (B, T) bool, True on real frames
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
    key_padding_mask: torch.Tensor | None,
    dropout_p: float,
    softmax_scale: float | None,
) -> torch.Tensor:
    # No mask at all when nothing is padded: any dense mask keeps SDPA off its flash backend.
    attn_mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
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
    key_padding_mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int | None,
    dropout_p: float,
    softmax_scale: float | None,
) -> torch.Tensor:
    if cu_seqlens is None:
        return _sdpa_padded(q, k, v, key_padding_mask, dropout_p, softmax_scale)
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
    key_padding_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ · softmax_scale) v per head, over the real frames of each sequence.

    Args:
        q, k, v: (B, T, heads, head_dim) padded, or (total_tokens, heads, head_dim) packed; same shape and dtype.
        key_padding_mask: padded only, (B, T) bool, True on real frames; None when nothing is padded.
        cu_seqlens, max_seqlen: packed only, (B + 1,) int32 cumulative lengths from 0, and the longest length.
        dropout_p: probability of dropping an attention weight (pass 0 in evaluation).
        softmax_scale: defaults to head_dim ** -0.5.
    Returns:
        q's shape: (B, T, heads, head_dim) or (total_tokens, heads, head_dim).
    """
    check_tensor("q", q, dtypes=FLOAT_DTYPES)
    for name, tensor in (("k", k), ("v", v)):
        check_tensor(name, tensor, dtypes=(q.dtype,))
        check_shape(name, tensor, q.shape, meaning="q's shape")
    check_same_device(q=q, k=k, v=v, key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if softmax_scale is not None and not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be a finite number, got {softmax_scale}")
    if cu_seqlens is None:
        if q.dim() != 4:
            raise ValueError(f"q must be (B, T, heads, head_dim) without cu_seqlens, got shape {tuple(q.shape)}")
        if max_seqlen is not None:
            raise ValueError("max_seqlen goes with cu_seqlens (packed inputs); it was given without")
        if key_padding_mask is not None:
            check_tensor("key_padding_mask", key_padding_mask, dtypes=(torch.bool,))
            check_shape("key_padding_mask", key_padding_mask, q.shape[:2], meaning="(B, T)")
    else:
        if q.dim() != 3:
            raise ValueError(f"q must be (total_tokens, heads, head_dim) with cu_seqlens, got shape {tuple(q.shape)}")
        if key_padding_mask is not None:
            raise ValueError("key_padding_mask goes with padded inputs; packed inputs take cu_seqlens only")
        check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,))
        if cu_seqlens.shape[0] < 2:
            raise ValueError(f"cu_seqlens must have B + 1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
        if not isinstance(max_seqlen, int) or max_seqlen < 0:
            raise ValueError(f"max_seqlen must be a non-negative int with cu_seqlens, got {max_seqlen!r}")
        # One host read of B + 1 integers, left out while torch.compile traces (it would break the graph).
        if not torch.compiler.is_compiling():
            _check_cu_seqlens(cu_seqlens, q.shape[0], max_seqlen)
    return implementation("attention", q.device)(
        q, k, v, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, softmax_scale
    )
