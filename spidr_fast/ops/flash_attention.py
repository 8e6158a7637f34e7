"""spidr_fast's own CUDA flash-attention (csrc/), as torch.library custom ops with autograd.

    q, k, v      (total_tokens, heads, head_dim)  bfloat16 or float16, head_dim 64 or 128, unit stride on head_dim
    cu_seqlens   (B + 1,) int32                    sequence b is tokens [cu_seqlens[b], cu_seqlens[b + 1])
    rng_state    (2,) int64 [seed, offset]         dropout's Philox key and counter offset; drawn per call

The compiled module `spidr_fast._flash_attn` takes raw pointers; this file checks what it is given and
allocates every output. `use_extension` swaps in another build of it: the tests load the CPU emulator build
(csrc/emulate/), which runs the same kernel code on CPU tensors.
"""

import functools
import importlib
import math
from types import ModuleType

import numpy as np
import torch

HEAD_DIMS = (64, 128)
DTYPES = (torch.bfloat16, torch.float16)
_ALIGNMENT = 8  # elements: the kernels move 16 bytes at a time


def _import_extension() -> ModuleType | None:
    try:
        return importlib.import_module("spidr_fast._flash_attn")
    except ImportError:
        return None


_extension: ModuleType | None = _import_extension()


def extension() -> ModuleType | None:
    """The module in use, or None when the CUDA extension is not built."""
    return _extension


def use_extension(module: ModuleType | None) -> ModuleType | None:
    """Run `module` (a build of csrc/bindings.cpp) from now on; returns the one it replaces."""
    global _extension  # noqa: PLW0603 - one process-wide module, like the backend switch
    previous, _extension = _extension, module
    return previous


def unsupported_reason(q: torch.Tensor) -> str | None:
    """Why the extension cannot run attention on `q` (and tensors like it), or None when it can."""
    if _extension is None:
        return "the CUDA extension spidr_fast._flash_attn is not built"
    if q.device.type != "cuda" and not _extension.emulated:
        return f"tensors are on {q.device}, the extension runs on CUDA devices"
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype} (the kernels take bfloat16 or float16)"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head_dim {q.shape[-1]} (the kernels take {HEAD_DIMS})"
    if torch.are_deterministic_algorithms_enabled() and torch.is_grad_enabled() and q.requires_grad:
        return "deterministic algorithms are on, and the backward adds dQ with atomics"
    return None


def _check_layout(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in DTYPES:
        raise ValueError(f"{name} must be bfloat16 or float16, got {tensor.dtype}")
    if tensor.dim() != 3 or tensor.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"{name} must be (total_tokens, heads, head_dim in {HEAD_DIMS}), got {tuple(tensor.shape)}")
    if tensor.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous along head_dim, got strides {tensor.stride()}")


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` itself when the kernels can read it in place (16-byte aligned rows), else an aligned copy.
    Called inside the custom ops, on real tensors: addresses are unknown while torch.compile traces."""
    strides_ok = tensor.stride(-1) == 1 and all(stride % _ALIGNMENT == 0 for stride in tensor.stride()[:-1])
    return tensor if strides_ok and tensor.data_ptr() % 16 == 0 else tensor.clone(memory_format=torch.contiguous_format)


def check_cu_seqlens(cu_seqlens: torch.Tensor, total_tokens: int, max_seqlen: int) -> None:
    """Values of cu_seqlens (reads them on the host): from 0, non-decreasing, up to total_tokens."""
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be (B + 1,) int32, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
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


def _view(tensor: torch.Tensor) -> tuple[int, int, int]:
    return tensor.data_ptr(), tensor.stride(0), tensor.stride(1)


def _address(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.data_ptr()


def _stream(tensor: torch.Tensor) -> int:
    return torch.cuda.current_stream(tensor.device).cuda_stream if tensor.is_cuda else 0


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


@torch.library.custom_op("spidr_fast::flash_attention_forward", mutates_args=())
def _forward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    key_mask: torch.Tensor | None,
    rng_state: torch.Tensor,
    max_seqlen: int,
    dropout_p: float,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    total, heads, head_dim = q.shape
    q, k, v = (aligned(t) for t in (q, k, v))
    out = torch.empty((total, heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((heads, total), dtype=torch.float32, device=q.device)
    _extension.forward(
        _dtype_name(q), _view(q), _view(k), _view(v), _view(out), lse.data_ptr(), cu_seqlens.data_ptr(),
        _address(key_mask), cu_seqlens.numel() - 1, heads, head_dim, max_seqlen, total, softmax_scale, dropout_p,
        rng_state.data_ptr(), _stream(q),
    )  # fmt: skip
    return out, lse


@_forward_op.register_fake
def _(q, k, v, cu_seqlens, key_mask, rng_state, max_seqlen, dropout_p, softmax_scale):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("spidr_fast::flash_attention_backward", mutates_args=())
def _backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    key_mask: torch.Tensor | None,
    rng_state: torch.Tensor,
    max_seqlen: int,
    dropout_p: float,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    total, heads, head_dim = q.shape
    grad_out, q, k, v, out = (aligned(t) for t in (grad_out, q, k, v, out))
    grad_q, grad_k, grad_v = (torch.empty((total, heads, head_dim), dtype=q.dtype, device=q.device) for _ in "qkv")
    delta = torch.empty((heads, total), dtype=torch.float32, device=q.device)
    grad_q_accum = torch.zeros((total, heads, head_dim), dtype=torch.float32, device=q.device)
    _extension.backward(
        _dtype_name(q), _view(q), _view(k), _view(v), _view(out), _view(grad_out), lse.data_ptr(),
        delta.data_ptr(), grad_q_accum.data_ptr(), grad_q.data_ptr(), grad_k.data_ptr(), grad_v.data_ptr(),
        cu_seqlens.data_ptr(), _address(key_mask), cu_seqlens.numel() - 1, heads, head_dim, max_seqlen, total,
        softmax_scale, dropout_p, rng_state.data_ptr(), _stream(q),
    )  # fmt: skip
    return grad_q, grad_k, grad_v


@_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens, key_mask, rng_state, max_seqlen, dropout_p, softmax_scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, key_mask, rng_state, max_seqlen, dropout_p, softmax_scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_seqlens, key_mask, rng_state)
    ctx.max_seqlen, ctx.dropout_p, ctx.softmax_scale = max_seqlen, dropout_p, softmax_scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens, key_mask, rng_state = ctx.saved_tensors
    grad_q, grad_k, grad_v = _backward_op(
        grad_out, q, k, v, out, lse, cu_seqlens, key_mask, rng_state, ctx.max_seqlen, ctx.dropout_p, ctx.softmax_scale
    )
    return grad_q, grad_k, grad_v, None, None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        _check_layout(name, tensor)
        if tensor.shape != q.shape or tensor.dtype != q.dtype:
            raise ValueError(f"{name} must match q's shape and dtype {tuple(q.shape)} {q.dtype}, got "
                             f"{tuple(tensor.shape)} {tensor.dtype}")  # fmt: skip
    reason = unsupported_reason(q)
    if reason is not None:
        raise ValueError(f"spidr_fast's flash-attention cannot run: {reason}")


def _rng_state(q: torch.Tensor, dropout_p: float, rng_state: torch.Tensor | None) -> torch.Tensor:
    if rng_state is None:
        if dropout_p > 0:  # from torch's generator on q's device: torch.manual_seed reproduces a run
            return torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64, device=q.device)
        return torch.zeros(2, dtype=torch.int64, device=q.device)
    if rng_state.shape != (2,) or rng_state.dtype != torch.int64 or rng_state.device != q.device:
        raise ValueError(f"rng_state must be (2,) int64 [seed, offset] on q's device {q.device}, got "
                         f"{rng_state.dtype} {tuple(rng_state.shape)} on {rng_state.device}")  # fmt: skip
    return rng_state


def _softmax_scale(q: torch.Tensor, softmax_scale: float | None) -> float:
    """1/√head_dim by default; any finite scale, of either sign, otherwise (the kernels mask after scaling)."""
    if softmax_scale is None:
        return q.shape[-1] ** -0.5
    if not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be a finite number, got {softmax_scale}")
    return float(softmax_scale)


def flash_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    rng_state: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ · scale) v within each packed sequence, by the extension (see `unsupported_reason`).

    Args:
        q, k, v: (total_tokens, heads, head_dim), same shape and dtype.
        cu_seqlens: (B + 1,) int32, trusted here: `check_cu_seqlens` validates user input.
        rng_state: (2,) int64 [seed, offset]; drawn from torch's generator on q's device when None.
    Returns:
        (total_tokens, heads, head_dim), contiguous.
    """
    _check_inputs(q, k, v)
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens must be (B + 1,) int32 on q's device {q.device}, got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)} on {cu_seqlens.device}")  # fmt: skip
    scale = _softmax_scale(q, softmax_scale)
    rng_state = _rng_state(q, dropout_p, rng_state)
    out, _ = _forward_op(q, k, v, cu_seqlens, None, rng_state, max_seqlen, float(dropout_p), scale)
    return out


def flash_attention_padded(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    *,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    rng_state: torch.Tensor | None = None,
) -> torch.Tensor:
    """SDPA's padded attention by the extension: every query, padded ones too, attends to the real keys of its row.

    The kernel reads the padded layout in place and skips masked keys, so nothing is packed or copied, nothing
    waits on the host, and padded frames get exactly what SDPA gives them (which the official model's later
    layers and its instance-normalised targets see). A row with no real key gets zeros.

    Args:
        q, k, v: (B, T, heads, head_dim), same shape and dtype; strided views (a fused projection's) are fine.
        key_padding_mask: (B, T) bool, True on real frames; None when nothing is padded.
    Returns:
        (B, T, heads, head_dim), contiguous.
    """
    if q.dim() != 4:
        raise ValueError(f"q must be (B, T, heads, head_dim), got shape {tuple(q.shape)}")
    batch, frames = q.shape[:2]
    packed = [t.flatten(0, 1) for t in (q, k, v)]  # a view: B and T merge without a copy for such layouts
    _check_inputs(*packed)
    key_mask = None
    if key_padding_mask is not None:
        if key_padding_mask.shape != (batch, frames) or key_padding_mask.dtype != torch.bool:
            raise ValueError(f"key_padding_mask must be (B, T) = {(batch, frames)} bool, got "
                             f"{tuple(key_padding_mask.shape)} {key_padding_mask.dtype}")  # fmt: skip
        key_mask = key_padding_mask.reshape(-1).contiguous()
    cu_seqlens = torch.arange(0, (batch + 1) * frames, frames, dtype=torch.int32, device=q.device)
    scale = _softmax_scale(q, softmax_scale)
    rng_state = _rng_state(q, dropout_p, rng_state)
    out, _ = _forward_op(*packed, cu_seqlens, key_mask, rng_state, frames, float(dropout_p), scale)
    return out.view(q.shape)


# The generator of csrc/flash/philox.h in NumPy, for tests and for the reference of dropout masks.
_PHILOX_M = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))
_PHILOX_W = (np.uint32(0x9E3779B9), np.uint32(0xBB67AE85))
_LOW32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(counter: np.ndarray, key0: int, key1: int) -> np.ndarray:
    """counter (..., 4) uint32 → (..., 4) uint32 draws, Philox4x32 with 10 rounds."""
    x, y, z, w = (counter[..., i].astype(np.uint64) for i in range(4))
    k0, k1 = np.uint32(key0), np.uint32(key1)
    with np.errstate(over="ignore"):
        for round_index in range(10):
            if round_index:
                k0, k1 = k0 + _PHILOX_W[0], k1 + _PHILOX_W[1]
            product0, product1 = _PHILOX_M[0] * x, _PHILOX_M[1] * z
            x, y, z, w = (
                (product1 >> np.uint64(32)) ^ y ^ np.uint64(k0),
                product1 & _LOW32,
                (product0 >> np.uint64(32)) ^ w ^ np.uint64(k1),
                product0 & _LOW32,
            )
    return np.stack([x, y, z, w], axis=-1).astype(np.uint32)


def dropout_keep_mask(
    rng_state: torch.Tensor, heads: int, query_start: int, length: int, dropout_p: float
) -> torch.Tensor:
    """(heads, length, length) bool: which attention weights of the sequence starting at token `query_start`
    the kernels keep, for the same rng_state (csrc/flash/philox.h: one draw of four per 2x2 block of weights)."""
    seed, offset = (int(x) & 0xFFFFFFFFFFFFFFFF for x in rng_state.cpu().tolist())
    return _dropout_keep_mask(seed, offset, heads, query_start, length, dropout_p).clone()


@functools.lru_cache(maxsize=8)  # a test's float32 and low-precision references ask for the same mask
def _dropout_keep_mask(seed: int, offset: int, heads: int, query_start: int, length: int, dropout_p: float) -> torch.Tensor:
    blocks = (length + 1) // 2  # one Philox call per 2x2 block: draw 2*(query & 1) + (key & 1) of its four
    head, query_block, key_block = np.meshgrid(np.arange(heads), np.arange(blocks), np.arange(blocks), indexing="ij")
    counter = np.stack(
        [query_start + 2 * query_block, key_block, head, np.full_like(key_block, offset & 0xFFFFFFFF)], axis=-1
    ).astype(np.uint32)
    draws = philox4x32_10(counter, seed & 0xFFFFFFFF, seed >> 32).reshape(heads, blocks, blocks, 2, 2)
    draws = draws.transpose(0, 1, 3, 2, 4).reshape(heads, 2 * blocks, 2 * blocks)[:, :length, :length]
    threshold = int(np.ldexp(dropout_p, 32))
    return torch.from_numpy(draws >= np.uint32(min(threshold, 2**32 - 1)))
