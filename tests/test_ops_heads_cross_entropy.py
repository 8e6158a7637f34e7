"""Reference heads' cross-entropy against a direct float64 formula, values and gradients."""

import pytest
import torch
from helpers import TOLERANCES, direct

from spidr_fast import ops


# Per dtype: tolerance on the loss and on gradients, against float64 (the error PyTorch itself makes).
@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize(
    ("num_layers", "num_frames", "num_codewords", "dim"),
    [(1, 0, 17, 8), (3, 1, 17, 8), (2, 37, 1, 5), (8, 131, 256, 64)],
)
def test_heads_cross_entropy_matches_direct_formula(dtype, with_bias, num_layers, num_frames, num_codewords, dim):
    x = torch.randn(num_layers, num_frames, dim, dtype=torch.float64)
    weight = torch.randn(num_layers, num_codewords, dim, dtype=torch.float64) / dim**0.5
    bias = torch.randn(num_layers, num_codewords, dtype=torch.float64) if with_bias else None
    labels = torch.randint(0, num_codewords, (num_layers, num_frames))
    inputs = [t.to(dtype).requires_grad_() if t is not None else None for t in (x, weight, bias)]
    exact_inputs = [t.to(dtype).double().requires_grad_() if t is not None else None for t in (x, weight, bias)]

    loss, mean_probs = ops.heads_cross_entropy(*inputs, labels)
    expected_loss, expected_probs = direct(*exact_inputs, labels)

    tol = TOLERANCES[dtype]
    assert loss.dtype == torch.float32 and loss.shape == (num_frames,)
    assert mean_probs.shape == (num_layers, num_codewords) and not mean_probs.requires_grad
    torch.testing.assert_close(loss.double(), expected_loss, rtol=tol, atol=tol)
    if num_frames:
        torch.testing.assert_close(mean_probs.double(), expected_probs, rtol=tol, atol=tol)
    else:
        assert torch.all(mean_probs == 0)

    grad_out = torch.randn(num_frames, dtype=torch.float64)
    loss.backward(grad_out.float())
    expected_loss.backward(grad_out)
    for got, exact in zip(inputs, exact_inputs, strict=True):
        if got is not None:
            assert got.grad.dtype == dtype
            torch.testing.assert_close(got.grad.double(), exact.grad, rtol=tol, atol=tol)


def test_heads_cross_entropy_reads_expanded_input():
    """DinoSR's heads all read the same frames: an expanded (stride-0) x gives the same loss as a copy."""
    x = torch.randn(1, 23, 16).expand(4, 23, 16)
    weight, bias = torch.randn(4, 9, 16), torch.randn(4, 9)
    labels = torch.randint(0, 9, (4, 23))
    for a, b in zip(
        ops.heads_cross_entropy(x, weight, bias, labels),
        ops.heads_cross_entropy(x.contiguous(), weight, bias, labels),
        strict=True,
    ):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            (torch.randn(2, 5, 4), torch.randn(3, 7, 4), torch.randn(3, 7), torch.zeros(3, 5, dtype=torch.int64)),
            r"x must have shape \(L, N, D\) = \(3, 5, 4\)",
        ),
        (
            (torch.randn(3, 5, 4), torch.randn(3, 7, 4), torch.randn(3, 6), torch.zeros(3, 5, dtype=torch.int64)),
            r"bias must have shape \(L, K\) = \(3, 7\)",
        ),
        (
            (torch.randn(3, 5, 4), torch.randn(3, 7, 4), torch.randn(3, 7), torch.zeros(3, 5, dtype=torch.int32)),
            "labels must have dtype",
        ),
        (
            (torch.randn(3, 5, 4), torch.randn(3, 7, 4), torch.randn(3, 7), torch.zeros(3, 4, dtype=torch.int64)),
            r"labels must have shape \(L, N\) = \(3, 5\)",
        ),
        (
            (torch.randn(3, 5, 4), torch.randn(7, 4), None, torch.zeros(3, 5, dtype=torch.int64)),
            "weight must have 3 dimensions",
        ),
    ],
)
def test_heads_cross_entropy_names_bad_argument(args, message):
    with pytest.raises(ValueError, match=message):
        ops.heads_cross_entropy(*args)
