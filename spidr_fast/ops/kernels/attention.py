"""The "cuda" backend of the attention op: spidr_fast's own flash-attention (csrc/), as torch.library custom ops
with autograd.

    q, k, v      (total_tokens, heads, head_dim)  bfloat16 or float16, head_dim 64 or 128
    cu_seqlens   (B + 1,) int32                    sequence b is tokens [cu_seqlens[b], cu_seqlens[b + 1]); None
                                                   for a padded batch: B sequences of max_seqlen tokens
    rng_state    (2,) int64 [seed, offset]         dropout's Philox key and counter offset; drawn per call, None
                                                   without dropout

The inputs are trusted: `ops.attention` checks them, and `unsupported_reason` decides once per call whether the
extension runs; the extension's own checks (csrc/bindings.cpp) are the last line. The compiled module
`spidr_fast._flash_attn` takes raw pointers; this file allocates every output. `use_extension` swaps in another
build of it: the tests load the CPU emulator build (csrc/emulate/), which runs the same kernel code on CPU tensors.
"""

import importlib
from types import ModuleType

import torch

from spidr_fast.ops._checks import check_same_device, check_shape, check_tensor
from spidr_fast.ops._dispatch import forced_backend, reference, register

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
    return None


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` itself when the kernels can read it in place (16-byte aligned rows), else an aligned copy.
    Called inside the custom ops, on real tensors: addresses are unknown while torch.compile traces."""
    strides_ok = tensor.stride(-1) == 1 and all(stride % _ALIGNMENT == 0 for stride in tensor.stride()[:-1])
    return tensor if strides_ok and tensor.data_ptr() % 16 == 0 else tensor.clone(memory_format=torch.contiguous_format)


def _view(tensor: torch.Tensor) -> tuple[int, int, int]:
    return tensor.data_ptr(), tensor.stride(0), tensor.stride(1)


def _address(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.data_ptr()


def _stream(tensor: torch.Tensor) -> int:
    return torch.cuda.current_stream(tensor.device).cuda_stream if tensor.is_cuda else 0


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _batch(total: int, cu_seqlens: torch.Tensor | None, max_seqlen: int) -> int:
    if cu_seqlens is not None:
        return cu_seqlens.numel() - 1
    return total // max_seqlen if max_seqlen else 0


def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None, key_mask: torch.Tensor | None,
    rng_state: torch.Tensor | None, max_seqlen: int, dropout_p: float, softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    total, heads, head_dim = q.shape
    q, k, v = (aligned(t) for t in (q, k, v))
    out = torch.empty((total, heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((heads, total), dtype=torch.float32, device=q.device)
    _extension.forward(
        _dtype_name(q), _view(q), _view(k), _view(v), _view(out), lse.data_ptr(), _address(cu_seqlens),
        _address(key_mask), _batch(total, cu_seqlens, max_seqlen), heads, head_dim, max_seqlen, total, softmax_scale,
        dropout_p, _address(rng_state), _stream(q),
    )
    return out, lse


def _backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    cu_seqlens: torch.Tensor | None, key_mask: torch.Tensor | None, rng_state: torch.Tensor | None, max_seqlen: int,
    dropout_p: float, softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    total, heads, head_dim = q.shape
    grad_out, q, k, v, out = (aligned(t) for t in (grad_out, q, k, v, out))
    grad_q, grad_k, grad_v = (torch.empty((total, heads, head_dim), dtype=q.dtype, device=q.device) for _ in "qkv")
    delta = torch.empty((heads, total), dtype=torch.float32, device=q.device)
    # dQ's fp32 accumulator for the atomic backward (zeroed by the kernels); deterministic mode passes none, and the
    # extension sums dQ in a pass of its own, in a fixed order.
    deterministic = torch.are_deterministic_algorithms_enabled()
    grad_q_accum = None if deterministic else torch.empty((total, heads, head_dim), dtype=torch.float32, device=q.device)
    _extension.backward(
        _dtype_name(q), _view(q), _view(k), _view(v), _view(out), _view(grad_out), lse.data_ptr(),
        delta.data_ptr(), _address(grad_q_accum), grad_q.data_ptr(), grad_k.data_ptr(), grad_v.data_ptr(),
        _address(cu_seqlens), _address(key_mask), _batch(total, cu_seqlens, max_seqlen), heads, head_dim, max_seqlen,
        total, softmax_scale, dropout_p, _address(rng_state), _stream(q),
    )
    return grad_q, grad_k, grad_v


# The same two functions as custom ops, for torch.compile: their fake implementations give the traced shapes.
_forward_op = torch.library.custom_op("spidr_fast::flash_attention_forward", _forward, mutates_args=())
_backward_op = torch.library.custom_op("spidr_fast::flash_attention_backward", _backward, mutates_args=())


@_forward_op.register_fake
def _(q, k, v, cu_seqlens, key_mask, rng_state, max_seqlen, dropout_p, softmax_scale):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens, key_mask, rng_state, max_seqlen, dropout_p, softmax_scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


class _FlashAttention(torch.autograd.Function):
    """Eager calls go straight to `_forward` and `_backward`: torch.library's custom-op path (dispatcher, its
    autograd wrapper, argument re-binding) costs 3-4x the launch itself on the host, more than a short sequence's
    forward takes on the GPU (docs/flash-attention.md). While torch.compile traces, the custom ops stand in."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, key_mask, rng_state, max_seqlen, dropout_p, softmax_scale):
        forward = _forward_op if torch.compiler.is_compiling() else _forward
        out, lse = forward(q, k, v, cu_seqlens, key_mask, rng_state, max_seqlen, dropout_p, softmax_scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, key_mask, rng_state)
        ctx.max_seqlen, ctx.dropout_p, ctx.softmax_scale = max_seqlen, dropout_p, softmax_scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_seqlens, key_mask, rng_state = ctx.saved_tensors
        backward = _backward_op if torch.compiler.is_compiling() else _backward
        grad_q, grad_k, grad_v = backward(
            grad_out, q, k, v, out, lse, cu_seqlens, key_mask, rng_state, ctx.max_seqlen, ctx.dropout_p,
            ctx.softmax_scale,
        )
        return grad_q, grad_k, grad_v, None, None, None, None, None, None


def _rng_state(q: torch.Tensor, dropout_p: float, rng_state: torch.Tensor | None) -> torch.Tensor | None:
    if rng_state is None:
        if dropout_p > 0:  # from torch's generator on q's device: torch.manual_seed reproduces a run
            return torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64, device=q.device)
        return None  # no dropout, no generator state: nothing to allocate
    # Not an argument of ops.attention: checked here, where it enters.
    check_tensor("rng_state", rng_state, dtypes=(torch.int64,))
    check_shape("rng_state", rng_state, (2,), meaning="[seed, offset]")
    check_same_device(q=q, rng_state=rng_state)
    return rng_state


def _softmax_scale(q: torch.Tensor, softmax_scale: float | None) -> float:
    """1/√head_dim by default; any finite scale, of either sign, otherwise (the kernels mask after scaling)."""
    return q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)


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
        q, k, v: (total_tokens, heads, head_dim), same shape and dtype, as `ops.attention` checks them.
        cu_seqlens: (B + 1,) int32 on q's device, values as `ops.attention` checks them.
        rng_state: (2,) int64 [seed, offset]; drawn from torch's generator on q's device when None.
    Returns:
        (total_tokens, heads, head_dim), contiguous.
    """
    scale = _softmax_scale(q, softmax_scale)
    rng_state = _rng_state(q, dropout_p, rng_state)
    return _FlashAttention.apply(q, k, v, cu_seqlens, None, rng_state, max_seqlen, float(dropout_p), scale)


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
    frames = q.shape[1]
    packed = [t.flatten(0, 1) for t in (q, k, v)]  # a view: B and T merge without a copy for such layouts
    key_mask = None if key_padding_mask is None else key_padding_mask.reshape(-1).contiguous()
    scale = _softmax_scale(q, softmax_scale)
    rng_state = _rng_state(q, dropout_p, rng_state)
    out = _FlashAttention.apply(*packed, None, key_mask, rng_state, frames, float(dropout_p), scale)
    return out.view(q.shape)


@register("attention", "cuda")
def _attention_flash(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, softmax_scale):  # noqa: ANN001, ANN202
    """The extension where it supports the inputs (see `unsupported_reason`), the SDPA reference elsewhere; where
    "cuda" was forced, unsupported inputs raise instead: a forced backend never hands its work to another."""
    reason = unsupported_reason(q)
    if reason is not None:
        if forced_backend("attention") == "cuda":
            raise RuntimeError(f"attention: the 'cuda' backend is forced but cannot run these inputs: {reason}")
        return reference("attention")(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, softmax_scale)
    options = dict(dropout_p=dropout_p, softmax_scale=softmax_scale)
    if cu_seqlens is not None:
        return flash_attention_varlen(q, k, v, cu_seqlens, max_seqlen, **options)
    # Padded: in place, masked keys skipped; padded queries get SDPA's values, which the model's later layers use.
    return flash_attention_padded(q, k, v, key_padding_mask, **options)
