"""The inputs a user of another model sends (issue 37's table), on the reference and on the Triton backend (in the
interpreter without a GPU): an error that names the argument, or PyTorch's answer; and both backends give the same
labels on every input they accept."""

import pytest
import torch
import torch.nn.functional as F
from helpers import random_codebooks

from spidr_fast import ops
from spidr_fast.nn import EMACodebooks
from spidr_fast.ops._dispatch import backends


@pytest.fixture(params=["reference", "triton"])
def backend(request):
    if request.param == "triton":
        pytest.importorskip("triton")
    ops.set_backend(request.param)
    yield request.param
    ops.set_backend(None)


def heads_inputs(num_layers=2, num_frames=37, num_codewords=16, dim=8):
    x = torch.randn(num_layers, num_frames, dim, requires_grad=True)
    weight = (torch.randn(num_layers, num_codewords, dim) / dim**0.5).requires_grad_()
    bias = torch.randn(num_layers, num_codewords, requires_grad=True)
    return x, weight, bias, torch.randint(0, num_codewords, (num_layers, num_frames))


@pytest.mark.parametrize("bad", [16, 17, -1, -99])
def test_heads_cross_entropy_names_a_label_out_of_range(backend, bad):
    x, weight, bias, labels = heads_inputs()
    labels[1, 5] = bad
    with pytest.raises(
        ValueError, match=rf"labels must be in \[0, 16\) or ignore_index = -100 .*got {bad} at \(1, 5\)"
    ):
        ops.heads_cross_entropy(x, weight, bias, labels)


def test_heads_cross_entropy_kernel_flags_a_label_out_of_range():
    """Past the host check (a CUDA tensor is not read there), the Triton kernel itself refuses the label."""
    pytest.importorskip("triton")
    from spidr_fast.ops.kernels.heads_cross_entropy import heads_cross_entropy_triton

    x, weight, bias, labels = (t.detach() for t in heads_inputs())
    heads_cross_entropy_triton(x, weight, bias, labels, 1.0, -100)  # in range: no error
    labels[0, 36] = 16
    with pytest.raises(RuntimeError, match=r"labels must be in \[0, 16\) or ignore_index = -100"):
        heads_cross_entropy_triton(x, weight, bias, labels, 1.0, -100)


@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_heads_cross_entropy_ignore_index_is_f_cross_entropy(backend, ignore_index):
    """Forward and backward against F.cross_entropy(ignore_index=...): ignored frames add nothing to the loss, the
    gradients or mean_probs (one head ignores every frame: its mean_probs are zeros)."""
    x, weight, bias, labels = heads_inputs(num_layers=3)
    labels[:, ::3] = ignore_index
    labels[1, 4] = ignore_index
    labels[2] = ignore_index
    loss, mean_probs = ops.heads_cross_entropy(x, weight, bias, labels, ignore_index=ignore_index)
    grad_out = torch.randn(loss.shape)
    grads = torch.autograd.grad(loss, (x, weight, bias), grad_out)

    logits = torch.einsum("lnd,lkd->lnk", x, weight) + bias.unsqueeze(1)
    per_head = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=ignore_index, reduction="none")
    expected = per_head.sum(0) / 3
    expected_grads = torch.autograd.grad(expected, (x, weight, bias), grad_out)
    kept = (labels != ignore_index).unsqueeze(-1)
    expected_probs = (logits.softmax(-1) * kept).sum(1) / kept.sum(1).clamp_min(1)

    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean_probs, expected_probs.detach(), rtol=1e-5, atol=1e-6)
    assert torch.all(mean_probs[2] == 0)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    mean = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=ignore_index)  # the docstring's formula
    torch.testing.assert_close(loss.sum() * 3 / (labels != ignore_index).sum(), mean, rtol=1e-5, atol=1e-6)


def assign_inputs(num_layers=2, batch=3, frames=11, num_codewords=9, dim=6):
    codebook, counts = random_codebooks(num_layers, num_codewords, dim)
    return torch.randn(num_layers, batch, frames, dim), codebook, counts


@pytest.mark.parametrize(("bad", "position"), [(33, 2), (34, 0), (-1, 1)])
def test_instance_norm_assign_names_a_frame_index_out_of_range(backend, bad, position):
    layers, codebook, counts = assign_inputs()
    frame_index = torch.tensor([0, 5, 32])
    frame_index[position] = bad
    with pytest.raises(ValueError, match=rf"frame_index must be in \[0, 33\) \(B \* T = 33 .*got {bad}"):
        ops.instance_norm_assign(layers, frame_index, codebook, counts)
    with pytest.raises(ValueError, match=rf"frame_index must be in \[0, 33\) .*got {bad}"):
        ops.instance_norm_select(layers, frame_index)


def test_instance_norm_assign_names_lengths_longer_than_t(backend):
    layers, codebook, counts = assign_inputs()
    with pytest.raises(ValueError, match=r"lengths must be in \[0, 12\) \(at most T = 11 .*got 12 at \(1,\)"):
        ops.instance_norm_assign(layers, torch.arange(5), codebook, counts, lengths=torch.tensor([11, 12, 3]))


def test_codebook_ema_update_names_a_decay_above_one(backend):
    codebook, counts = random_codebooks(2, 5, 3)
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\], got 1.5"):
        ops.codebook_ema_update_(codebook, counts, torch.ones(2, 5), torch.randn(2, 5, 3), 1.5)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_a_codeword_of_count_zero_is_never_assigned(backend, metric):
    """vector-quantize-pytorch starts its counts at 0: here such a codeword has no centroid and takes no rows, on
    every backend, whatever its sums (zero, or left over)."""
    x, codebook, counts = torch.randn(2, 200, 6), *random_codebooks(2, 9, 6)
    counts[:, 3] = 0
    codebook[1, 3] = 0
    labels, batch_counts, _ = ops.codebook_assign(x, codebook, counts, metric=metric)
    assert not torch.any(labels == 3)
    assert torch.all(batch_counts[:, 3] == 0)
    with backends("reference"):
        expected, _, _ = ops.codebook_assign(x, codebook, counts, metric=metric)
    assert torch.equal(labels, expected)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_backends_agree_on_int32_indices_and_lengths(backend, metric):
    """int32 frame_index and lengths (index_select takes them) give the int64 labels, and the same labels on both
    backends."""
    layers, codebook, counts = assign_inputs(frames=23, dim=16)
    frame_index = torch.randperm(3 * 23)[:40]
    lengths = torch.tensor([23, 17, 4])
    labels, batch_counts, batch_sums = ops.instance_norm_assign(
        layers, frame_index.int(), codebook, counts, lengths=lengths.int(), metric=metric
    )
    with backends("reference"):
        expected = ops.instance_norm_assign(layers, frame_index, codebook, counts, lengths=lengths, metric=metric)
    assert torch.equal(labels, expected[0])
    torch.testing.assert_close(batch_counts, expected[1], rtol=0, atol=0)
    torch.testing.assert_close(batch_sums, expected[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        ops.instance_norm_select(layers, frame_index.int()), ops.instance_norm_select(layers, frame_index)
    )


def test_ema_codebooks_reject_an_unknown_metric_when_built():
    with pytest.raises(ValueError, match=r"metric must be one of \('l2', 'cosine'\), got 'cos'"):
        EMACodebooks(2, 5, 3, decay=0.9, metric="cos")


@pytest.mark.parametrize("cast", ["bfloat16", "half"])
def test_ema_codebooks_stay_float32_in_a_cast_model(backend, cast):
    """model.bfloat16() leaves the codebooks float32 (the ops read float32; 16-bit EMA sums lose the updates) and
    tied to the per-layer buffers of the state dict; the next assignment and update run."""
    model = torch.nn.ModuleDict({"proj": torch.nn.Linear(6, 6), "codebooks": EMACodebooks(2, 9, 6, decay=0.9)})
    before = {name: tensor.clone() for name, tensor in model["codebooks"].state_dict().items()}
    getattr(model, cast)()
    codebooks = model["codebooks"]
    assert model["proj"].weight.dtype == getattr(torch, cast)
    for name, tensor in codebooks.state_dict().items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, before[name]), name
    assert codebooks[1].codebook.data_ptr() == codebooks.stacked_codebook[1].data_ptr()
    layers = torch.randn(2, 3, 11, 6, dtype=getattr(torch, cast))
    labels, batch_counts, batch_sums = codebooks.assign_layers(layers, torch.arange(20))
    codebooks.update_(batch_counts, batch_sums)
    assert labels.shape == (2, 20) and not torch.equal(codebooks.state_dict()["0.counts"], before["0.counts"])
