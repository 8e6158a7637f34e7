"""Triton heads' cross-entropy against autograd through a float64 formula: loss, mean_probs, dx, dW, db.

A covering set rather than the product: every N, K, D, L and dtype of the issue appears, with and without bias,
linear and cosine logits. Tolerances are the reference's own (tests/test_ops_heads_cross_entropy.py)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import TOLERANCES, direct

from spidr_fast import ops

CASES = [  # (L, N, K, D, dtype, bias, cosine_temperature)
    (1, 0, 17, 64, torch.float32, True, None),
    (8, 1, 17, 80, torch.bfloat16, False, None),
    (8, 37, 256, 64, torch.float16, True, None),
    (1, 37, 1024, 768, torch.bfloat16, True, 0.1),
    (1, 4099, 256, 80, torch.float32, True, None),
    (8, 37, 1024, 80, torch.float32, False, 0.1),
]


@pytest.mark.parametrize(("num_layers", "num_rows", "num_codewords", "dim", "dtype", "with_bias", "temperature"), CASES)
def test_heads_cross_entropy_kernel(
    triton_device, num_layers, num_rows, num_codewords, dim, dtype, with_bias, temperature
):
    x = torch.randn(num_layers, num_rows, dim, dtype=torch.float64)
    weight = torch.randn(num_layers, num_codewords, dim, dtype=torch.float64) / dim**0.5
    bias = torch.randn(num_layers, num_codewords, dtype=torch.float64) if with_bias else None
    labels = torch.randint(0, num_codewords, (num_layers, num_rows))
    inputs = [t.to(triton_device, dtype).requires_grad_() if t is not None else None for t in (x, weight, bias)]
    exact = [t.to(dtype).double().requires_grad_() if t is not None else None for t in (x, weight, bias)]

    loss, mean_probs = ops.heads_cross_entropy(*inputs, labels.to(triton_device), cosine_temperature=temperature)
    exact_x, exact_weight, exact_bias = exact
    if temperature is not None:
        exact_x, exact_weight = F.normalize(exact_x, dim=-1) / temperature, F.normalize(exact_weight, dim=-1)
    expected_loss, expected_probs = direct(exact_x, exact_weight, exact_bias, labels)

    tol = TOLERANCES[dtype]
    assert loss.dtype == torch.float32 and loss.shape == (num_rows,) and not mean_probs.requires_grad
    torch.testing.assert_close(loss.double().cpu(), expected_loss, rtol=tol, atol=tol)
    if num_rows:
        torch.testing.assert_close(mean_probs.double().cpu(), expected_probs, rtol=tol, atol=tol)
    else:
        assert torch.all(mean_probs == 0)

    grad_out = torch.randn(num_rows, dtype=torch.float64)
    loss.backward(grad_out.float().to(triton_device))
    expected_loss.backward(grad_out)
    for got, want in zip(inputs, exact, strict=True):
        if got is not None:
            assert got.grad.dtype == dtype
            torch.testing.assert_close(got.grad.double().cpu(), want.grad, rtol=tol, atol=tol)


def test_expanded_input_and_autocast(triton_device):
    """DinoSR's heads read one stride-0 x; under autocast the op runs in the autocast dtype."""
    x = torch.randn(1, 53, 64, device=triton_device).expand(4, 53, 64)
    weight, bias = torch.randn(4, 17, 64, device=triton_device) / 8, torch.randn(4, 17, device=triton_device)
    labels = torch.randint(0, 17, (4, 53), device=triton_device)
    for a, b in zip(
        ops.heads_cross_entropy(x, weight, bias, labels),
        ops.heads_cross_entropy(x.contiguous(), weight, bias, labels),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.autocast(triton_device.type, dtype=torch.bfloat16):
        loss, _ = ops.heads_cross_entropy(x, weight.requires_grad_(), bias, labels)
    loss.sum().backward()
    assert weight.grad.dtype == torch.float32
    expected, _ = ops.heads_cross_entropy(x, weight, bias, labels)
    torch.testing.assert_close(loss, expected, rtol=TOLERANCES[torch.bfloat16], atol=TOLERANCES[torch.bfloat16])


# The kernels' tile boundaries (kernels/heads_cross_entropy.py: the forward's 64 rows, 32 in fp32, and codeword
# tile up to 256; the backward's 128 rows and pair of 128-codeword tiles in 16 bits at 128 < K <= 256, else a loop
# over codeword tiles; 32 or 16 channels a step): a last row block of a few rows, codewords one past a tile (a
# second, one-codeword tile: the online log-sum-exp, the forward's second sweep and dx added over codeword tiles),
# a pair's second tile partly or nearly full, channels not a multiple of any channel step.
BOUNDARY_CASES = [  # (N, K, D, dtype)
    (65, 257, 47, torch.bfloat16),
    (33, 129, 33, torch.float32),
    (97, 255, 70, torch.float16),
    (131, 200, 40, torch.bfloat16),
]


@pytest.mark.parametrize(("num_rows", "num_codewords", "dim", "dtype"), BOUNDARY_CASES)
def test_heads_kernel_tile_boundaries(triton_device, num_rows, num_codewords, dim, dtype):
    """Loss, mean_probs and every gradient against float64 autograd, with ignored labels in every row block."""
    num_layers, ignore_index = 2, -100
    x = torch.randn(num_layers, num_rows, dim, dtype=torch.float64)
    weight = torch.randn(num_layers, num_codewords, dim, dtype=torch.float64) / dim**0.5
    bias = torch.randn(num_layers, num_codewords, dtype=torch.float64)
    labels = torch.randint(0, num_codewords, (num_layers, num_rows))
    labels[:, -1] = num_codewords - 1  # the last codeword of the last tile, in the last row block
    labels[:, ::7] = ignore_index
    inputs = [t.to(triton_device, dtype).requires_grad_() for t in (x, weight, bias)]
    exact = [t.to(dtype).double().requires_grad_() for t in (x, weight, bias)]

    loss, mean_probs = ops.heads_cross_entropy(*inputs, labels.to(triton_device), ignore_index=ignore_index)
    logits = torch.einsum("lnd,lkd->lnk", exact[0], exact[1]) + exact[2].unsqueeze(1)
    kept = labels != ignore_index
    nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=ignore_index, reduction="none")
    expected_loss = nll.mean(0)
    expected_probs = (torch.softmax(logits, -1) * kept.unsqueeze(-1)).sum(1) / kept.sum(1, keepdim=True)

    tol = TOLERANCES[dtype]
    torch.testing.assert_close(loss.double().cpu(), expected_loss, rtol=tol, atol=tol)
    torch.testing.assert_close(mean_probs.double().cpu(), expected_probs.detach(), rtol=tol, atol=tol)
    grad_out = torch.randn(num_rows, dtype=torch.float64)
    loss.backward(grad_out.float().to(triton_device))
    expected_loss.backward(grad_out)
    for got, want in zip(inputs, exact, strict=True):
        torch.testing.assert_close(got.grad.double().cpu(), want.grad, rtol=tol, atol=tol)


def test_heads_backward_is_the_reference_under_deterministic_algorithms(triton_device):
    """The fused backward adds dW with atomics, in no fixed order: deterministic algorithms take the reference's."""
    from spidr_fast.ops import _dispatch
    from spidr_fast.ops.kernels.heads_cross_entropy import heads_cross_entropy_backward_triton

    x, weight = torch.randn(2, 9, 16, device=triton_device), torch.randn(2, 5, 16, device=triton_device)
    labels, lse = torch.randint(0, 5, (2, 9), device=triton_device), torch.randn(2, 9, device=triton_device)
    grad = torch.randn(9, device=triton_device)
    args = (grad, x, weight, None, labels, lse, 1.0, -100)
    expected = _dispatch.reference("heads_cross_entropy_backward")(*args)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        got = heads_cross_entropy_backward_triton(*args)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason="F.linear_cross_entropy is new in torch 2.13")
def test_heads_kernel_is_torch_linear_cross_entropy(triton_device):
    """benchmarks/kernels.py times torch's fused alternative as Σ_l F.linear_cross_entropy(reduction="sum"): the
    same numbers, loss and gradients, as L times our loss summed."""
    num_layers, num_rows, num_codewords, dim = 3, 37, 256, 80
    x = torch.randn(num_layers, num_rows, dim, device=triton_device, requires_grad=True)
    weight = (torch.randn(num_layers, num_codewords, dim, device=triton_device) / dim**0.5).requires_grad_()
    bias = torch.randn(num_layers, num_codewords, device=triton_device, requires_grad=True)
    labels = torch.randint(0, num_codewords, (num_layers, num_rows), device=triton_device)
    loss, _ = ops.heads_cross_entropy(x, weight, bias, labels)
    ours = loss.sum() * num_layers
    got = torch.autograd.grad(ours, (x, weight, bias))
    theirs = sum(
        F.linear_cross_entropy(x[i], weight[i], labels[i], linear_bias=bias[i], reduction="sum")
        for i in range(num_layers)
    )
    expected = torch.autograd.grad(theirs, (x, weight, bias))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
