"""Micro-benchmarks with pytest-benchmark: each op, reference against fused, on this machine's device.

    pytest benchmarks --benchmark-only                 # CPU: tiny shapes; Triton runs interpreted
    pytest benchmarks --benchmark-only --benchmark-json out.json

On a CPU these only show that the paths run (Triton's interpreter is not a speed); kernels.py measures GPUs.
"""

import pytest
import torch
import torch.nn.functional as F

from spidr_fast import ops

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SMALL = DEVICE.type == "cpu"
L, N, D, K = (2, 97, 64, 32) if SMALL else (8, 7200, 768, 256)


def _synchronised(fn):
    def run():
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    return run


@pytest.fixture
def backend(request):
    previous = ops.forced_backend()
    ops.set_backend(request.param)
    yield request.param
    ops.set_backend(previous)


@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
def test_codebook_targets(benchmark, backend):
    layers = torch.randn(L, 3, N, D, device=DEVICE)
    frame_index = torch.arange(0, 3 * N, 2, device=DEVICE)
    codebook, counts = torch.randn(L, K, D, device=DEVICE), torch.ones(L, K, device=DEVICE)
    benchmark.pedantic(
        _synchronised(lambda: ops.instance_norm_assign(layers, frame_index, codebook, counts)),
        rounds=5,
        warmup_rounds=1,
    )


@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
def test_codebook_ema_update(benchmark, backend):
    codebook, counts = torch.randn(L, K, D, device=DEVICE), torch.ones(L, K, device=DEVICE)
    batch_counts, batch_sums = torch.ones(L, K, device=DEVICE), torch.randn(L, K, D, device=DEVICE)
    benchmark.pedantic(
        _synchronised(lambda: ops.codebook_ema_update_(codebook, counts, batch_counts, batch_sums, 0.9)),
        rounds=5,
        warmup_rounds=1,
    )


@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
def test_heads_cross_entropy_forward_backward(benchmark, backend):
    x = torch.randn(L, N, D, device=DEVICE, requires_grad=True)
    weight = torch.randn(L, K, D, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, K, (L, N), device=DEVICE)

    def step():
        loss, _ = ops.heads_cross_entropy(x, weight, None, labels)
        loss.sum().backward()

    benchmark.pedantic(_synchronised(step), rounds=5, warmup_rounds=1)


def test_attention_sdpa_forward_backward(benchmark):
    q, k, v = (torch.randn(2, N, 2, 64, device=DEVICE, requires_grad=True) for _ in "qkv")

    def step():
        F.scaled_dot_product_attention(q, k, v).sum().backward()

    benchmark.pedantic(_synchronised(step), rounds=5, warmup_rounds=1)
