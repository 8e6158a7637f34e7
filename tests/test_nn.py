"""The drop-in modules and the docs/ops.md example that puts them into a HuBERT-style model."""

import re
from pathlib import Path

import torch
from helpers import tiny

from spidr_fast import ops
from spidr_fast.nn import EMACodebooks, FusedHeads

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
