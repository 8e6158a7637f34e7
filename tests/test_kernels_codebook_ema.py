"""Triton EMA codebook update, all layers in one launch, against the reference rule."""

import pytest
import torch
from test_ops_codebook import random_codebooks

from spidr_fast import ops


@pytest.mark.parametrize(("num_layers", "num_codewords", "dim"), [(1, 17, 64), (8, 256, 768), (8, 1024, 80)])
def test_codebook_ema_update_kernel(triton_device, num_layers, num_codewords, dim):
    codebook, counts = random_codebooks(num_layers, num_codewords, dim)
    batch_counts = torch.randint(0, 3, (num_layers, num_codewords)).float()  # a third never assigned
    batch_sums = torch.randn(num_layers, num_codewords, dim) * batch_counts.unsqueeze(-1)
    decay, assigned = 0.9, batch_counts != 0
    expected_counts = torch.where(assigned, decay * counts.double() + (1 - decay) * batch_counts.double(), counts)
    expected_codebook = torch.where(
        assigned.unsqueeze(-1), decay * codebook.double() + (1 - decay) * batch_sums.double(), codebook
    )
    on = lambda t: t.to(triton_device)  # noqa: E731
    got_codebook, got_counts = on(codebook), on(counts)
    ops.codebook_ema_update_(got_codebook, got_counts, on(batch_counts), on(batch_sums), decay)

    torch.testing.assert_close(got_counts.cpu(), expected_counts.float())  # float32 tolerances
    torch.testing.assert_close(got_codebook.cpu(), expected_codebook.float())
    assert torch.equal(got_counts.cpu()[~assigned], counts[~assigned])  # bit for bit
    assert torch.equal(got_codebook.cpu()[~assigned], codebook[~assigned])


def test_update_reads_the_flat_statistics_of_the_assignment(triton_device):
    """The assignment's statistics (views of one flat buffer) feed the update directly; it matches the reference."""
    codebook, counts = (t.to(triton_device) for t in random_codebooks(8, 17, 64))
    x = torch.randn(8, 37, 64, device=triton_device)
    _, batch_counts, batch_sums = ops.codebook_assign(x, codebook, counts)
    expected_codebook, expected_counts = codebook.clone(), counts.clone()
    ops.codebook_ema_update_(codebook, counts, batch_counts, batch_sums, 0.99)
    ops.set_backend("reference")
    ops.codebook_ema_update_(expected_codebook, expected_counts, batch_counts, batch_sums, 0.99)
    torch.testing.assert_close(codebook, expected_codebook)
    torch.testing.assert_close(counts, expected_counts)
