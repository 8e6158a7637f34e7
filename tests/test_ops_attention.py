"""Reference attention (SDPA) against a direct float64 softmax, padded and packed, and the packing helpers."""

import pytest
import torch
from helpers import pack

from spidr_fast import ops
from spidr_fast.ops import padding


def direct(q, k, v, valid_frames=None, scale=None):
    """(B, T, H, d) float64 softmax(q kᵀ) v with padded keys removed."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if valid_frames is not None:
        scores = scores.masked_fill(~valid_frames[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


def random_qkv(*shape, dtype=torch.float32):
    return [torch.randn(*shape, dtype=dtype).requires_grad_() for _ in range(3)]


def ragged_mask(lengths, frames):
    return torch.arange(frames) < torch.tensor(lengths).unsqueeze(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_padded_attention_matches_direct(dtype, scale):
    q, k, v = random_qkv(2, 37, 3, 16, dtype=dtype)
    mask = ragged_mask([37, 20], 37)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(
        ops.attention(q, k, v, softmax_scale=scale).double(), direct(q, k, v, scale=scale), rtol=tol, atol=tol
    )
    out = ops.attention(q, k, v, valid_frames=mask, softmax_scale=scale)
    torch.testing.assert_close(out.double(), direct(q, k, v, mask, scale), rtol=tol, atol=tol)


def test_valid_frames_is_the_complement_of_multihead_attention_key_padding_mask():
    """valid_frames is SDPA's boolean convention (True takes part): nn.MultiheadAttention with key_padding_mask
    = ~valid_frames (True on padding) computes the same attention."""
    batch, frames, heads, dim = 2, 7, 2, 8
    mha = torch.nn.MultiheadAttention(dim, heads, batch_first=True, bias=False).eval()
    x, valid = torch.randn(batch, frames, dim), ragged_mask([7, 3], frames)
    qkv = torch.nn.functional.linear(x, mha.in_proj_weight).chunk(3, -1)
    q, k, v = (t.view(batch, frames, heads, dim // heads) for t in qkv)
    ours = mha.out_proj(ops.attention(q, k, v, valid_frames=valid).flatten(2))
    expected, _ = mha(x, x, x, key_padding_mask=~valid, need_weights=False)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_attention_rejects_the_old_mask_name_with_the_convention():
    """The mask was once key_padding_mask with True on real frames, which nn.MultiheadAttention's means the other
    way round: a caller still using the name gets told, not the wrong attention."""
    q = torch.randn(2, 5, 2, 4)
    with pytest.raises(ValueError, match=r"True on padding.*True on real frames.*valid_frames=~key_padding_mask"):
        ops.attention(q, q, q, key_padding_mask=ragged_mask([5, 3], 5))


@pytest.mark.parametrize("lengths", [[1], [5, 1, 13], [1001, 3]])
def test_packed_attention_equals_padded_on_real_frames(lengths):
    frames = max(lengths)
    q, k, v = random_qkv(len(lengths), frames, 2, 8)
    mask = ragged_mask(lengths, frames)
    padded_out = ops.attention(q, k, v, valid_frames=mask)
    packed = [pack(t, mask) for t in (q, k, v)]
    out = ops.attention(*(p.tokens for p in packed), cu_seqlens=packed[0].cu_seqlens, max_seqlen=packed[0].max_seqlen)
    assert out.shape == (sum(lengths), 2, 8)
    torch.testing.assert_close(out, padded_out[mask])

    grad = torch.randn_like(out)
    packed_grads = torch.autograd.grad(out, (q, k, v), grad)
    padded_grads = torch.autograd.grad(padded_out, (q, k, v), padding.unpack(grad, packed[0].token_index, *mask.shape))
    for a, b in zip(packed_grads, padded_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_attention_dropout_is_seeded_and_drops():
    q, k, v = random_qkv(2, 29, 2, 8)
    torch.manual_seed(3)
    first = ops.attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(3)
    again = ops.attention(q, k, v, dropout_p=0.5)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first, ops.attention(q, k, v))


def test_pack_unpack_round_trip_and_cu_seqlens():
    x = torch.randn(3, 7, 4)
    mask = ragged_mask([7, 0, 2], 7)
    packed = pack(x, mask)
    assert packed.cu_seqlens.dtype == torch.int32 and packed.cu_seqlens.tolist() == [0, 7, 7, 9]
    assert packed.max_seqlen == 7
    torch.testing.assert_close(padding.unpack(packed.tokens, packed.token_index, 3, 7), x * mask.unsqueeze(-1))
    assert torch.equal(padding.token_index_from_cu_seqlens(packed.cu_seqlens, 7, 9), packed.token_index)
    assert torch.equal(padding.mask_from_cu_seqlens(packed.cu_seqlens, 7), mask)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(q=torch.randn(2, 5, 2, 4), k=torch.randn(2, 5, 2, 8)), r"k must have shape q's shape = \(2, 5, 2, 4\)"),
        (dict(q=torch.randn(2, 5, 2, 4), v=torch.randn(2, 5, 2, 4).half()), "v must have dtype in \\(float32\\)"),
        (dict(valid_frames=torch.ones(2, 6, dtype=torch.bool)), r"valid_frames must have shape \(B, T\) = \(2, 5\)"),
        (dict(valid_frames=torch.ones(2, 5)), "valid_frames must have dtype"),
        (dict(max_seqlen=5), "max_seqlen goes with cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([0, 5], dtype=torch.int32), max_seqlen=5), "q must be \\(total_tokens"),
        (dict(dropout_p=1.0), r"dropout_p must be in \[0, 1\)"),
        (dict(softmax_scale=float("inf")), "softmax_scale must be a finite number, got inf"),
    ],
)
def test_padded_attention_names_bad_argument(kwargs, message):
    args = dict(q=torch.randn(2, 5, 2, 4), k=torch.randn(2, 5, 2, 4), v=torch.randn(2, 5, 2, 4)) | kwargs
    with pytest.raises(ValueError, match=message):
        ops.attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(cu_seqlens=torch.tensor([0, 5], dtype=torch.int64), max_seqlen=5),
            "cu_seqlens must have dtype in \\(int32\\)",
        ),
        (dict(cu_seqlens=torch.tensor([5], dtype=torch.int32), max_seqlen=5), "cu_seqlens must have B \\+ 1 >= 2"),
        (dict(cu_seqlens=torch.tensor([0, 5], dtype=torch.int32)), "max_seqlen must be a non-negative int"),
        (dict(cu_seqlens=None), r"q must be \(B, T, heads, head_dim\) without cu_seqlens"),
    ],
)
def test_packed_attention_names_bad_argument(kwargs, message):
    q = torch.randn(5, 2, 4)
    with pytest.raises(ValueError, match=message):
        ops.attention(q, q, q, **kwargs)


@pytest.mark.parametrize(
    ("cu_seqlens", "max_seqlen", "message"),
    [
        ([0, 5], 5, "cu_seqlens must end at the token count 33, got 5"),
        ([1, 33], 32, "cu_seqlens must start at 0, got 1"),
        ([0, 20, 10, 33], 23, "cu_seqlens must be non-decreasing"),
        ([0, 10, 33], 10, "max_seqlen 10 is below the longest sequence, 23"),
    ],
)
def test_packed_attention_checks_the_values_of_cu_seqlens_on_every_backend(cu_seqlens, max_seqlen, message):
    q = torch.randn(33, 2, 4)
    with pytest.raises(ValueError, match=message):
        ops.attention(q, q, q, cu_seqlens=torch.tensor(cu_seqlens, dtype=torch.int32), max_seqlen=max_seqlen)


def test_packed_attention_compiles_with_fullgraph():
    """The host read of cu_seqlens is left out of the traced graph, which would otherwise break there."""
    q, k, v = random_qkv(12, 2, 8)
    cu_seqlens = torch.tensor([0, 5, 12], dtype=torch.int32)

    def packed(q, k, v):
        return ops.attention(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=7)

    compiled = torch.compile(packed, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), packed(q, k, v))
