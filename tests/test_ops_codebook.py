"""Reference codebook ops against direct float64 formulas."""

import pytest
import torch
import torch.nn.functional as F
from helpers import random_codebooks

from spidr_fast import ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def direct_scores(x: torch.Tensor, codebook: torch.Tensor, counts: torch.Tensor, metric: str) -> torch.Tensor:
    """(L, N, K) float64 scores where the label is the argmin."""
    centroids = codebook.double() / counts.double().unsqueeze(-1)
    if metric == "l2":
        return torch.cdist(x.double(), centroids).square()
    return -(F.normalize(x.double(), dim=-1) @ F.normalize(centroids, dim=-1).transpose(1, 2))


def assert_labels_are_nearest(labels: torch.Tensor, scores: torch.Tensor, rtol: float = 1e-5) -> None:
    """Every label is the best codeword, or within rtol of it (a tie at float32 precision)."""
    best = scores.min(-1).values
    chosen = scores.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert torch.all(chosen - best <= rtol * best.abs().clamp_min(1e-12)), (chosen - best).max()


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("num_layers", "num_frames", "num_codewords", "dim"),
    [(1, 0, 17, 5), (3, 1, 17, 5), (3, 37, 1, 7), (2, 37, 17, 64), (1, 4099, 256, 13)],
)
def test_codebook_assign_matches_direct_formula(metric, dtype, num_layers, num_frames, num_codewords, dim):
    codebook, counts = random_codebooks(num_layers, num_codewords, dim)
    x = torch.randn(num_layers, num_frames, dim).to(dtype)
    labels, batch_counts, batch_sums = ops.codebook_assign(x, codebook, counts, metric=metric)

    assert labels.shape == (num_layers, num_frames) and labels.dtype == torch.int64
    assert_labels_are_nearest(labels, direct_scores(x, codebook, counts, metric))
    onehot = F.one_hot(labels, num_codewords).double()
    torch.testing.assert_close(batch_counts, onehot.sum(1).float(), rtol=0, atol=0)
    expected_sums = onehot.transpose(1, 2) @ x.double()
    assert batch_sums.dtype == torch.float32
    torch.testing.assert_close(batch_sums.double(), expected_sums, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_codebook_assign_ties_go_to_lowest_index(metric):
    codebook, counts = random_codebooks(2, 9, 6)
    codebook[:, 7], counts[:, 7] = codebook[:, 2], counts[:, 2]  # codeword 7 duplicates codeword 2
    x = (codebook[:, [2, 7, 2]] / counts[:, [2, 7, 2]].unsqueeze(-1)).contiguous()  # rows exactly on it
    labels, batch_counts, _ = ops.codebook_assign(x, codebook, counts, metric=metric)
    assert torch.all(labels == 2)
    assert torch.all(batch_counts[:, 7] == 0) and torch.all(batch_counts[:, 2] == 3)


def test_codebook_assign_ignores_autocast():
    codebook, counts = random_codebooks(2, 17, 32)
    x = torch.randn(2, 301, 32)
    expected = ops.codebook_assign(x, codebook, counts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = ops.codebook_assign(x, codebook, counts)
    for a, b in zip(result, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((torch.randn(3, 4), torch.randn(1, 5, 4), torch.ones(1, 5)), "x must have 3 dimensions"),
        ((torch.randn(2, 4, 4), torch.randn(1, 5, 4), torch.ones(1, 5)), r"x must have shape \(L, N, D\) with L = 1"),
        ((torch.randn(1, 4, 3), torch.randn(1, 5, 4), torch.ones(1, 5)), "D = 4"),
        ((torch.randn(1, 4, 4), torch.randn(1, 5, 4), torch.ones(1, 6)), r"counts must have shape \(L, K\) = \(1, 5\)"),
        ((torch.randn(1, 4, 4), torch.randn(1, 5, 4).double(), torch.ones(1, 5)), "codebook must have dtype"),
        ((torch.randint(0, 3, (1, 4, 4)), torch.randn(1, 5, 4), torch.ones(1, 5)), "x must have dtype"),
    ],
)
def test_codebook_assign_names_bad_argument(args, message):
    with pytest.raises(ValueError, match=message):
        ops.codebook_assign(*args)


def test_codebook_assign_rejects_unknown_metric():
    with pytest.raises(ValueError, match="metric must be one of"):
        ops.codebook_assign(torch.randn(1, 2, 3), torch.randn(1, 4, 3), torch.ones(1, 4), metric="dot")


@pytest.mark.parametrize(("num_layers", "num_codewords", "dim"), [(1, 1, 1), (3, 17, 5), (8, 256, 64)])
def test_codebook_ema_update_follows_official_rule(num_layers, num_codewords, dim):
    codebook, counts = random_codebooks(num_layers, num_codewords, dim)
    batch_counts = torch.randint(0, 3, (num_layers, num_codewords)).float()  # some codewords never assigned
    batch_sums = torch.randn(num_layers, num_codewords, dim) * batch_counts.unsqueeze(-1)
    decay = 0.9
    assigned = batch_counts != 0
    expected_counts = torch.where(assigned, decay * counts.double() + (1 - decay) * batch_counts.double(), counts)
    expected_codebook = torch.where(
        assigned.unsqueeze(-1), decay * codebook.double() + (1 - decay) * batch_sums.double(), codebook
    )
    untouched_counts, untouched_codebook = counts[~assigned].clone(), codebook[~assigned].clone()

    ops.codebook_ema_update_(codebook, counts, batch_counts, batch_sums, decay)

    torch.testing.assert_close(counts, expected_counts.float())  # float32 tolerances
    torch.testing.assert_close(codebook, expected_codebook.float())
    assert torch.equal(counts[~assigned], untouched_counts)  # bit for bit
    assert torch.equal(codebook[~assigned], untouched_codebook)


def test_codebook_ema_update_with_decay_one_changes_nothing():
    codebook, counts = random_codebooks(2, 5, 3)
    before = codebook.clone(), counts.clone()
    ops.codebook_ema_update_(codebook, counts, torch.ones(2, 5), torch.randn(2, 5, 3), 1.0)
    assert torch.equal(codebook, before[0]) and torch.equal(counts, before[1])


def test_codebook_ema_update_names_bad_argument():
    codebook, counts = random_codebooks(2, 5, 3)
    with pytest.raises(ValueError, match=r"batch_sums must have shape \(L, K, D\) = \(2, 5, 3\)"):
        ops.codebook_ema_update_(codebook, counts, torch.ones(2, 5), torch.randn(2, 5, 4), 0.9)
    with pytest.raises(ValueError, match="batch_counts must have dtype"):
        ops.codebook_ema_update_(codebook, counts, torch.ones(2, 5, dtype=torch.int64), torch.randn(2, 5, 3), 0.9)
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\]"):
        ops.codebook_ema_update_(codebook, counts, torch.ones(2, 5), torch.randn(2, 5, 3), -0.1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("num_layers", "batch", "frames", "dim", "num_selected"), [(1, 1, 2, 3, 0), (3, 2, 37, 5, 1), (2, 3, 101, 64, 53)]
)
def test_instance_norm_select_matches_direct_formula(dtype, num_layers, batch, frames, dim, num_selected):
    layers = (torch.randn(num_layers, batch, frames, dim) * 3 + 1).to(dtype)
    frame_index = torch.randperm(batch * frames)[:num_selected]
    targets = ops.instance_norm_select(layers, frame_index)

    x = layers.double()
    mean, var = x.mean(2, keepdim=True), x.var(2, unbiased=False, keepdim=True)
    expected = ((x - mean) / torch.sqrt(var + 1e-5)).flatten(1, 2)[:, frame_index]
    assert targets.dtype == torch.float32 and targets.shape == (num_layers, num_selected, dim)
    torch.testing.assert_close(targets.double(), expected, rtol=1e-5, atol=1e-5)


def test_instance_norm_select_names_bad_argument():
    with pytest.raises(ValueError, match="layers must have 4 dimensions"):
        ops.instance_norm_select(torch.randn(2, 3, 4), torch.arange(3))
    with pytest.raises(ValueError, match="frame_index must have dtype"):
        ops.instance_norm_select(torch.randn(1, 2, 3, 4), torch.arange(3, dtype=torch.int16))
