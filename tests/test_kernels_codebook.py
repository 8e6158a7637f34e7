"""Triton codebook ops against float64, on fresh random inputs: the assignment (plain and fused with the instance
norm) and the EMA update of all layers in one launch.

A covering set rather than the product: every N, K, D, L and dtype of the issue appears, and both metrics and both
ways of summing the statistics (atomic, deterministic) across the cases."""

import pytest
import torch
import torch.nn.functional as F
from helpers import random_codebooks

from spidr_fast import ops

NEAR_TIE = 1e-4  # labels may differ from float64 only where the two best distances are this close (relative)


def distances64(rows: torch.Tensor, codebook: torch.Tensor, counts: torch.Tensor, metric: str) -> torch.Tensor:
    """(L, N, K) float64 distances: squared Euclidean, or 1 - cosine similarity."""
    centroids = codebook.double() / counts.double().unsqueeze(-1)
    if metric == "l2":
        return torch.cdist(rows, centroids).square()
    return 1 - F.normalize(rows, dim=-1) @ F.normalize(centroids, dim=-1).transpose(1, 2)


def check_assignment(result, rows64, rows32, codebook, counts, metric):
    """Labels against the float64 argmin (near-ties excepted), counts exact, sums as close to float64 as PyTorch's
    float32 sums of its own float32 rows (rows32) with the same labels."""
    labels, batch_counts, batch_sums = result
    num_layers, num_codewords = counts.shape
    assert labels.shape == rows64.shape[:2] and labels.dtype == torch.int64
    if rows64.shape[1]:
        distances = distances64(rows64, codebook, counts, metric)
        two_best = distances.topk(min(2, num_codewords), dim=-1, largest=False).values
        best, second = two_best[..., 0], two_best[..., -1]
        chosen = distances.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        differs = labels != distances.argmin(-1)
        assert torch.all(~differs | (second - best <= NEAR_TIE * best.abs())), "label differs away from a near-tie"
        assert torch.all(chosen - best <= NEAR_TIE * best.abs())
    onehot = F.one_hot(labels, num_codewords).double()
    assert torch.equal(batch_counts, onehot.sum(1).float())
    expected = onehot.transpose(1, 2) @ rows64
    torch_sums = torch.zeros(num_layers, num_codewords, rows64.shape[-1]).scatter_add_(
        1, labels.unsqueeze(-1).expand(rows64.shape), rows32
    )
    bar = (torch_sums.double() - expected).abs().max().item() if labels.numel() else 0.0
    assert batch_sums.dtype == torch.float32
    assert (batch_sums.double() - expected).abs().max().item() <= 2 * bar + 1e-6


CASES = [  # (L, N, K, D, dtype)
    (1, 0, 17, 64, torch.float32),
    (8, 1, 17, 80, torch.bfloat16),
    (8, 37, 256, 64, torch.float16),
    (1, 37, 1024, 768, torch.bfloat16),
    (1, 4099, 17, 80, torch.float32),
    (2, 129, 300, 72, torch.float32),  # a row tile and one row, three codeword tiles (the last partial), 4.5 chunks
]


@pytest.mark.parametrize(("metric", "deterministic"), [("l2", False), ("cosine", True)])
@pytest.mark.parametrize(("num_layers", "num_rows", "num_codewords", "dim", "dtype"), CASES)
def test_codebook_assign_kernel(triton_device, metric, deterministic, num_layers, num_rows, num_codewords, dim, dtype):
    codebook, counts = random_codebooks(num_layers, num_codewords, dim)
    x = torch.randn(num_layers, num_rows, dim).to(dtype)
    on = lambda t: t.to(triton_device)  # noqa: E731
    result = ops.codebook_assign(on(x), on(codebook), on(counts), metric=metric, deterministic=deterministic)
    check_assignment([t.cpu() for t in result], x.double(), x.float(), codebook, counts, metric)


def instance_norm(layers: torch.Tensor, lengths: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Per utterance and channel over the valid frames, computed in dtype."""
    x = layers.to(dtype)
    frames = torch.arange(x.shape[2])
    valid = (frames < (x.shape[2] if lengths is None else lengths[:, None])).expand(x.shape[1:3]).unsqueeze(-1)
    count = valid.sum(1, keepdim=True).clamp_min(1)
    mean = torch.where(valid, x, 0).sum(2, keepdim=True) / count
    var = torch.where(valid, (x - mean).square(), 0).sum(2, keepdim=True) / count
    return (x - mean) / torch.sqrt(var + 1e-5)


FUSED_CASES = [  # (L, B, T, D, N, K, dtype); lengths ragged per utterance
    (1, 2, 5, 64, 0, 17, torch.float32),
    (8, 3, 50, 64, 37, 256, torch.bfloat16),
    (8, 2, 20, 768, 1, 17, torch.float16),
    (1, 9, 1000, 80, 4099, 17, torch.float32),
]


@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize(("num_layers", "batch", "frames", "dim", "num_rows", "num_codewords", "dtype"), FUSED_CASES)
def test_instance_norm_assign_kernel(
    triton_device, ragged, num_layers, batch, frames, dim, num_rows, num_codewords, dtype
):
    codebook, counts = random_codebooks(num_layers, num_codewords, dim)
    layers = (torch.randn(num_layers, batch, frames, dim) * 3 + 2).to(dtype)
    lengths = torch.randint(frames // 2 + 1, frames + 1, (batch,)) if ragged else None
    valid = torch.ones(batch, frames, dtype=torch.bool)
    if ragged:  # padding far off the frames' scale: the statistics must not see it
        valid = torch.arange(frames) < lengths[:, None]
        layers = layers.where(valid[:, :, None], layers.new_tensor(1e4))
    frame_index = valid.flatten().nonzero().squeeze(1)[torch.randperm(int(valid.sum()))[:num_rows]]
    metric = "cosine" if num_codewords == 256 else "l2"
    on = lambda t: None if t is None else t.to(triton_device)  # noqa: E731
    result = ops.instance_norm_assign(
        on(layers), on(frame_index), on(codebook), on(counts), lengths=on(lengths), metric=metric, deterministic=ragged
    )
    rows64, rows32 = (
        instance_norm(layers, lengths, dtype).flatten(1, 2)[:, frame_index] for dtype in (torch.float64, torch.float32)
    )
    check_assignment([t.cpu() for t in result], rows64, rows32, codebook, counts, metric)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_ties_go_to_the_lowest_index_and_an_unused_codeword_stays_empty(triton_device, metric):
    codebook, counts = random_codebooks(8, 17, 64)
    codebook[:, 7], counts[:, 7] = codebook[:, 2], counts[:, 2]  # codeword 7 duplicates codeword 2
    codebook[:, 5] = -1e3 * counts[:, 5:6]  # far from, and opposite to, every row: never assigned
    on_two = codebook[:, [2, 7, 2]] / counts[:, [2, 7, 2]].unsqueeze(-1)
    x = torch.cat([on_two.abs(), torch.randn(8, 40, 64).abs()], dim=1)
    codebook[:, [2, 7]] = codebook[:, [2, 7]].abs()  # the rows on codeword 2 stay exactly on it
    for deterministic in (False, True):
        labels, batch_counts, batch_sums = ops.codebook_assign(
            x.to(triton_device),
            codebook.to(triton_device),
            counts.to(triton_device),
            metric=metric,
            deterministic=deterministic,
        )
        assert torch.all(labels[:, :3] == 2) and torch.all(labels != 7)
        assert torch.all(batch_counts[:, 5] == 0) and torch.all(batch_sums[:, 5] == 0)


def test_deterministic_statistics_repeat_bit_for_bit(triton_device):
    codebook, counts = random_codebooks(2, 17, 80)
    x = torch.randn(2, 300, 80, device=triton_device)
    codebook, counts = codebook.to(triton_device), counts.to(triton_device)
    first = ops.codebook_assign(x, codebook, counts, deterministic=True)
    second = ops.codebook_assign(x, codebook, counts, deterministic=True)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    fast = ops.codebook_assign(x, codebook, counts, deterministic=False)
    assert torch.equal(fast[0], first[0]) and torch.equal(fast[1], first[1])
    torch.testing.assert_close(fast[2], first[2])


def test_statistics_are_views_of_one_flat_buffer(triton_device):
    codebook, counts = (t.to(triton_device) for t in random_codebooks(2, 17, 64))
    _, batch_counts, batch_sums = ops.codebook_assign(torch.randn(2, 9, 64, device=triton_device), codebook, counts)
    assert batch_counts.untyped_storage().data_ptr() == batch_sums.untyped_storage().data_ptr()
    assert batch_sums.storage_offset() == batch_counts.numel()


# --- EMA update -------------------------------------------------------------------------------------------------------


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


# --- tensor-core precision on realistic inputs ------------------------------------------------------------------------


def teacher_layers(batch: int, prototypes: torch.Tensor, frames: int = 500) -> torch.Tensor:
    """(1, B, T, D) float32 like a teacher layer: runs of 2-12 frames near one of the prototypes (P, D), smoothed in
    time, each utterance with its own per-channel offset and scale (what the instance norm removes)."""
    utterances = []
    for _ in range(batch):
        runs = torch.randint(2, 13, (frames,))
        phones = torch.randint(prototypes.shape[0], (frames,)).repeat_interleave(runs)[:frames]
        x = prototypes[phones] + 0.7 * torch.randn(frames, prototypes.shape[1])
        x = F.avg_pool1d(x.t().unsqueeze(0), 3, stride=1, padding=1, count_include_pad=False).squeeze(0).t()
        utterances.append(x * torch.exp(0.3 * torch.randn(x.shape[1])) + 2 * torch.randn(x.shape[1]))
    return torch.stack(utterances).unsqueeze(0)


def trained_codebook(rows: torch.Tensor, num_codewords: int, steps: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, K, D) running sums and (1, K) counts of a codebook trained by Lloyd steps in float64 on other rows (N, D)
    of the same distribution, as the EMA trains on earlier batches: a batch's rows then often lie near the boundary
    of two cells."""
    rows = rows.double()
    centroids = rows[torch.randperm(rows.shape[0])[:num_codewords]]
    for _ in range(steps):
        labels = torch.cdist(rows, centroids).argmin(1)
        counts = torch.bincount(labels, minlength=num_codewords).double()
        sums = torch.zeros_like(centroids).index_add_(0, labels, rows)
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centroids)
    counts = counts.clamp_min(1)  # the EMA's counts: about a batch's assignments to each codeword
    return (centroids * counts[:, None]).float().unsqueeze(0), counts.float().unsqueeze(0)


def tf32(x: torch.Tensor) -> torch.Tensor:
    """x rounded to TF32 (ties away from zero): plain TF32 products of rounded operands, the control. (Plain "tf32"
    on a GPU reads an fp32 operand's top 19 bits, which errs more.)"""
    return ((x.view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)


def beyond_fp32_ties(labels, reference, rows, codebook, counts) -> torch.Tensor:
    """(N,) True where labels differ from the reference's although the float64 distances of the two codewords differ
    by more than 4 fp32 roundings of what the official addmm adds: |c|² and 2x·c, at most |c|² + 2|x||c|."""
    centroids = (codebook.double() / counts.double().unsqueeze(-1))[0]
    rows = rows.double()[0]
    distances = torch.cdist(rows, centroids).square()
    norms = centroids.norm(dim=1)[reference]
    gap = (distances.gather(1, labels[:, None]) - distances.gather(1, reference[:, None])).abs().squeeze(1)
    return (labels != reference) & (gap > 4 * 2.0**-24 * (norms.square() + 2 * rows.norm(dim=1) * norms))


def test_tensor_core_labels_equal_the_fp32_reference_except_at_fp32_ties(triton_device):
    """Normalised teacher-like layers against a trained-like codebook (K 256, D 768): the fused kernel's labels
    equal the official fp32 `addmm` labels except at fp32 ties, and differ at a rate below 1e-3. On such rows plain
    TF32 distances break the rule at about 5e-4 (measured on 12k rows): too rare to see in 1536 rows, hence the next
    test."""
    prototypes = torch.randn(48, 768)
    ops.set_backend("reference")
    codebook, counts = trained_codebook(
        ops.instance_norm_select(teacher_layers(12, prototypes), torch.arange(6000))[0], 256
    )
    layers = teacher_layers(4, prototypes)
    frame_index = torch.randperm(2000)[:1536].sort().values  # the masked frames, in order as masked_frame_index
    rows = ops.instance_norm_select(layers, frame_index)  # (1, N, D) float32: the official targets
    reference = ops.codebook_assign(rows, codebook, counts)[0][0]  # the official addmm, in fp32
    ops.set_backend("triton")
    on = lambda t: t.to(triton_device)  # noqa: E731
    labels = ops.instance_norm_assign(on(layers), on(frame_index), on(codebook), on(counts))[0][0].cpu()
    assert not beyond_fp32_ties(labels, reference, rows, codebook, counts).any()
    assert (labels != reference).double().mean().item() <= 1e-3


def test_tensor_core_distances_resolve_gaps_that_tf32_misorders(triton_device):
    """Rows moved along the line between their two nearest codewords until those are 10 tie-widths (40 fp32
    roundings) apart: fp32 and the kernel's split TF32 order them as float64 does; plain TF32 (checked here as the
    control) gets a large share wrong."""
    prototypes = torch.randn(48, 768)
    ops.set_backend("reference")
    train = ops.instance_norm_select(teacher_layers(12, prototypes), torch.arange(6000))
    codebook, counts = trained_codebook(train[0], 256)
    rows = ops.instance_norm_select(teacher_layers(1, prototypes), torch.arange(500))[0].double()
    centroids = (codebook.double() / counts.double().unsqueeze(-1))[0]
    first, second = torch.cdist(rows, centroids).topk(2, largest=False).indices.unbind(1)
    a, b = centroids[first], centroids[second]
    norms = a.norm(dim=1)
    gap = 40 * 2.0**-24 * (norms.square() + 2 * rows.norm(dim=1) * norms)
    # |x - b|² - |x - a|² = 2 x·(a - b) + |b|² - |a|², linear along a - b: set it to +gap.
    now = 2 * (rows * (a - b)).sum(1) + b.square().sum(1) - a.square().sum(1)
    rows = (rows + ((gap - now) / (2 * (a - b).square().sum(1)))[:, None] * (a - b)).float().unsqueeze(0)
    expected = torch.cdist(rows[0].double(), centroids).argmin(1)
    assert torch.equal(ops.codebook_assign(rows, codebook, counts)[0][0], expected)  # fp32 resolves them

    ops.set_backend("triton")
    labels = ops.codebook_assign(rows.to(triton_device), codebook.to(triton_device), counts.to(triton_device))[0][0]
    assert torch.equal(labels.cpu(), expected)
    plain = (centroids.float().square().sum(1) - 2 * tf32(rows[0]) @ tf32(centroids.float()).t()).argmin(1)
    assert (plain != expected).double().mean().item() > 0.1
