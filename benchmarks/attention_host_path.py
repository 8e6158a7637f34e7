"""Host time of one eager flash-attention call, forward and backward, with the extension stubbed out: what the
Python side costs before any kernel runs. A/B in one process: "custom op" is the path eager calls took before
issue 31 (torch.library custom op with register_autograd, a zero rng_state and a zero-filled dQ workspace per
call), "autograd.Function" the one they take now (spidr_fast/ops/kernels/attention.py).

    python benchmarks/attention_host_path.py      # seconds on a CPU; medians and minimums of 7 rounds of 500 calls

Registering autograd on the custom op changes this process only. docs/flash-attention.md has the figures.
"""

import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python benchmarks/...` from a checkout

from spidr_fast.ops.kernels import attention

TOKENS, HEADS, HEAD_DIM, ROUNDS, CALLS = 32, 12, 64, 7, 500


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, key_mask, rng_state, max_seqlen, dropout_p, softmax_scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_seqlens, key_mask, rng_state)
    ctx.max_seqlen, ctx.dropout_p, ctx.softmax_scale = max_seqlen, dropout_p, softmax_scale


def _custom_op_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens, key_mask, rng_state = ctx.saved_tensors
    torch.zeros(q.shape, dtype=torch.float32)  # the zero-filled dQ workspace it allocated
    grads = attention._backward_op(
        grad_out, q, k, v, out, lse, cu_seqlens, key_mask, rng_state, ctx.max_seqlen, ctx.dropout_p, ctx.softmax_scale
    )
    return (*grads, None, None, None, None, None, None)


def _microseconds(fn) -> list[float]:
    for _ in range(50):
        fn()
    rounds = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(CALLS):
            fn()
        rounds.append((time.perf_counter() - start) / CALLS * 1e6)
    return rounds


def main() -> None:
    attention.use_extension(types.SimpleNamespace(emulated=True, forward=lambda *a: None, backward=lambda *a: None))
    attention._forward_op.register_autograd(_custom_op_backward, setup_context=_setup_context)
    q, k, v = (torch.randn(TOKENS, HEADS, HEAD_DIM, dtype=torch.bfloat16, requires_grad=True) for _ in "qkv")
    cu_seqlens = torch.tensor([0, TOKENS], dtype=torch.int32)
    grad = torch.randn_like(q)

    def custom_op():
        rng_state = torch.zeros(2, dtype=torch.int64)
        return attention._forward_op(q, k, v, cu_seqlens, None, rng_state, TOKENS, 0.0, HEAD_DIM**-0.5)[0]

    def function():
        return attention.flash_attention_varlen(q, k, v, cu_seqlens, TOKENS)

    for name, forward in (("custom op", custom_op), ("autograd.Function", function)):
        out = forward()

        def backward(out=out):
            return torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)

        for case, fn in (("forward", forward), ("backward", backward)):
            times = _microseconds(fn)
            print(f"{name:18} {case:8} median {statistics.median(times):6.0f} us   min {min(times):6.0f} us")


if __name__ == "__main__":
    main()
