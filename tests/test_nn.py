"""The drop-in modules, the docs/ops.md example that puts them into a HuBERT-style model, and OnlineCodebook
against a plain PyTorch version of its objective."""

import copy
import os
import re
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import tiny

from spidr_fast import ops
from spidr_fast.nn import EMACodebooks, FusedHeads, OnlineCodebook

OPS_DOC = Path(__file__).parents[1] / "docs" / "ops.md"


def test_docs_hubert_example_runs():
    section = OPS_DOC.read_text().split("## Fused ops in other models", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    namespace: dict = {}
    exec(compile(code, str(OPS_DOC), "exec"), namespace)  # noqa: S102 - our own docs
    assert torch.isfinite(namespace["loss"])
    assert namespace["mean_probs"].shape == (2, 32)


def test_ema_codebooks_keep_the_official_buffer_names():
    assert type(tiny("dinosr").codebooks) is EMACodebooks  # the models' own
    assert set(EMACodebooks(2, 5, 3, decay=0.9).state_dict()) == {"0.codebook", "0.counts", "1.codebook", "1.counts"}


def test_fused_heads_are_the_op_with_shared_or_per_head_inputs():
    heads = FusedHeads(3, 16, 9, cosine_temperature=0.1)
    x, labels = torch.randn(23, 16), torch.randint(0, 9, (3, 23))
    loss, mean_probs = heads(x, labels)
    expected = ops.heads_cross_entropy(x.expand(3, 23, 16), heads.weight, heads.bias, labels, cosine_temperature=0.1)
    torch.testing.assert_close(loss, expected[0], rtol=0, atol=0)
    torch.testing.assert_close(mean_probs, expected[1], rtol=0, atol=0)
    loss.mean().backward()
    assert heads.weight.grad.shape == (3, 9, 16) and heads.bias.grad.shape == (3, 9)


def test_fused_heads_pass_their_ignore_index():
    heads = FusedHeads(2, 16, 9, ignore_index=4)
    x, labels = torch.randn(2, 23, 16), torch.randint(0, 9, (2, 23))
    expected = ops.heads_cross_entropy(x, heads.weight, heads.bias, labels, ignore_index=4)
    for got, want in zip(heads(x, labels), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# --- OnlineCodebook -------------------------------------------------------------------------------------------------


def plain_step(codebook, counts, x, valid, decay, metric):
    """The module's objective in plain PyTorch, float64 state: labels of the valid frames (-100 elsewhere), then
    the official EMA rule. Returns labels, codebook, counts."""
    rows = x.double()[valid]
    centroids = codebook / counts.unsqueeze(-1)
    if metric == "l2":
        chosen = torch.cdist(rows, centroids).argmin(-1)
    else:
        chosen = (F.normalize(rows, dim=-1) @ F.normalize(centroids, dim=-1).t()).argmax(-1)
    batch_counts = torch.bincount(chosen, minlength=codebook.shape[0]).double()
    batch_sums = torch.zeros_like(codebook).index_add_(0, chosen, rows)
    assigned = batch_counts > 0
    counts = torch.where(assigned, decay * counts + (1 - decay) * batch_counts, counts)
    codebook = torch.where(assigned.unsqueeze(-1), decay * codebook + (1 - decay) * batch_sums, codebook)
    labels = torch.full(valid.shape, -100, dtype=torch.int64)
    labels[valid] = chosen
    return labels, codebook, counts


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("padding", ["mask", "lengths", None])
def test_online_codebook_is_its_plain_pytorch_objective(metric, padding):
    """Five training steps: labels identical to the plain version's, the state within fp32 rounding of its float64
    one, and heads_cross_entropy on the labels (ignore_index) equal to F.cross_entropy on the plain ones."""
    torch.manual_seed(0)
    module = OnlineCodebook(16, 24, decay=0.8, metric=metric).train()
    codebook, counts = module.codebook.double(), module.counts.double()
    heads = FusedHeads(1, 16, 24)
    lengths = torch.tensor([40, 33, 7])
    valid = torch.arange(40) < lengths.unsqueeze(1)
    for _ in range(5):
        x = torch.randn(3, 40, 16) + 2
        kwargs = {"mask": dict(mask=valid), "lengths": dict(lengths=lengths), None: {}}[padding]
        labels = module(x, **kwargs)
        expected, codebook, counts = plain_step(
            codebook, counts, x, valid if padding else torch.ones_like(valid), 0.8, metric
        )
        assert torch.equal(labels, expected)
        torch.testing.assert_close(module.codebook, codebook.float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(module.counts, counts.float(), rtol=1e-6, atol=1e-6)
        loss, _ = heads(x.flatten(0, 1), labels.view(1, -1))
        logits = x.flatten(0, 1) @ heads.weight[0].t() + heads.bias[0]
        plain_loss = F.cross_entropy(logits, expected.view(-1))
        torch.testing.assert_close(loss.sum() / (expected != -100).sum(), plain_loss, rtol=1e-6, atol=1e-6)


def test_online_codebook_does_not_update_in_eval_mode_or_at_decay_one():
    module = OnlineCodebook(8, 5).eval()
    state = copy.deepcopy(module.state_dict())
    module(torch.randn(2, 9, 8))
    OnlineCodebook.load_state_dict(frozen := OnlineCodebook(8, 5, decay=1.0), state)
    frozen.train()(torch.randn(2, 9, 8))
    for name, tensor in state.items():
        assert torch.equal(module.state_dict()[name], tensor) and torch.equal(frozen.state_dict()[name], tensor)


def test_online_codebook_compiles_with_fullgraph():
    """The training step (assignment, padding taken out of the statistics, EMA update) traces as one graph: no
    host read of a device value anywhere."""
    torch.manual_seed(0)
    eager = OnlineCodebook(16, 12, metric="cosine").train()
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    x, mask = torch.randn(2, 30, 16), torch.rand(2, 30) < 0.7
    for _ in range(2):
        assert torch.equal(compiled(x, mask=mask), eager(x, mask=mask))
    torch.testing.assert_close(compiled_module.codebook, eager.codebook, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_online_codebook_in_a_cast_model(dtype):
    """model.to(dtype) casts the model's layers but leaves the codebook's state float32; a 16-bit batch runs."""
    model = torch.nn.ModuleDict({"proj": torch.nn.Linear(8, 8), "codebook": OnlineCodebook(8, 6)})
    model.to(dtype).train()
    assert model["proj"].weight.dtype == dtype
    assert model["codebook"].codebook.dtype == model["codebook"].counts.dtype == torch.float32
    x = model["proj"](torch.randn(2, 7, 8, dtype=dtype))
    labels = model["codebook"](x, lengths=torch.tensor([7, 2]))
    assert labels.shape == (2, 7) and torch.all(labels[1, 2:] == -100) and torch.all(labels[:, :2] >= 0)


def test_online_codebook_state_dict_round_trip():
    source = OnlineCodebook(8, 6, kmeans_init=True).train()
    source(torch.randn(3, 10, 8))
    assert set(source.state_dict()) == {"codebook", "counts", "initted"}
    target = OnlineCodebook(8, 6, kmeans_init=True, decay=1.0)
    target.load_state_dict(source.state_dict())
    x = torch.randn(2, 5, 8)
    assert torch.equal(target.eval()(x), source.eval()(x))
    target.train()(x)  # initialised by the load: no second k-means on this batch, and decay 1 updates nothing
    assert torch.equal(target.codebook, source.codebook) and torch.equal(target.counts, source.counts)


def blobs(num_clusters=4, per_cluster=50, dim=8):
    centers = torch.eye(num_clusters, dim) * 10
    return centers, (centers.repeat_interleave(per_cluster, 0) + 0.1 * torch.randn(num_clusters * per_cluster, dim))


def test_online_codebook_kmeans_init_finds_the_clusters():
    torch.manual_seed(0)
    centers, x = blobs()
    module = OnlineCodebook(8, 4, kmeans_init=True, decay=1.0).train()
    labels = module(x.unsqueeze(0)).view(4, 50)
    assert all(len(row.unique()) == 1 for row in labels) and len(labels[:, 0].unique()) == 4  # one code a cluster
    torch.testing.assert_close(module.centroids[labels[:, 0]], centers, atol=0.1, rtol=0)
    assert bool(module.initted)


def test_online_codebook_restarts_dead_codes_on_real_frames():
    """Codewords whose running count fell below the threshold restart on a frame of the batch (count 1), never on
    a padding frame; the others keep their state."""
    torch.manual_seed(0)
    module = OnlineCodebook(8, 6, decay=1.0, threshold_ema_dead_code=0.5).train()
    module.counts[[1, 4]] = 0.1
    alive = module.codebook[[0, 2, 3, 5]].clone()
    x = torch.randn(2, 10, 8) + 3
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, :3] = True
    module(x, mask=mask)
    assert torch.equal(module.counts[[1, 4]], torch.ones(2))
    real = x[mask]
    for code in (1, 4):
        assert torch.any(torch.all(real == module.codebook[code], dim=-1)), code
    assert torch.equal(module.codebook[[0, 2, 3, 5]], alive)


def test_online_codebook_checks_its_arguments():
    module = OnlineCodebook(8, 6)
    with pytest.raises(ValueError, match="metric must be one of"):
        OnlineCodebook(8, 6, metric="cos")
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\]"):
        OnlineCodebook(8, 6, decay=1.5)
    with pytest.raises(ValueError, match=r"x must have shape \(B, T, D\) = \(2, 5, 8\)"):
        module(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="pass mask or lengths, not both"):
        module(torch.randn(2, 5, 8), mask=torch.ones(2, 5, dtype=torch.bool), lengths=torch.tensor([5, 5]))
    with pytest.raises(ValueError, match=r"lengths must be in \[0, 6\) \(at most T = 5"):
        module(torch.randn(2, 5, 8), lengths=torch.tensor([6, 5]))
    with pytest.raises(ValueError, match=r"mask must have shape \(B, T\)"):
        module(torch.randn(2, 5, 8), mask=torch.ones(2, 4, dtype=torch.bool))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_steps(rank: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        module = OnlineCodebook(8, 6, kmeans_init=True, threshold_ema_dead_code=0.3).train()
        x = torch.randn(4, 20, 8)
        for _ in range(3):
            module(x[2 * rank : 2 * rank + 2])
        results[rank] = (module.codebook.clone(), module.counts.clone())
    finally:
        dist.destroy_process_group()


def test_online_codebook_syncs_ranks():
    """Two gloo ranks on halves of a batch (k-means init, EMA, dead-code restarts) keep the same codebook."""
    results = mp.Manager().dict()
    mp.spawn(_rank_steps, args=(_free_port(), results), nprocs=2)
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
