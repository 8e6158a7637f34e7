"""The kernels compile for real GPUs without one, and a model using them traces into one graph."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import batch, tiny

from spidr_fast.ops import kernel_report


def test_every_kernel_compiles_for_sm90_and_sm80_without_spills():
    """Triton's compiler down to a cubin at the SpidR shapes: lowering errors and resource limits that the
    interpreter cannot see. A subprocess, because this process chose the interpreter before importing triton."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "spidr_fast.ops.kernel_report", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    names = [
        "instance_norm_stats",
        "codebook_centroids",
        "codebook_assign[l2]",
        "codebook_assign[cosine]",
        "codebook_assign[l2,config 1]",
        "codebook_statistics[deterministic]",
        "codebook_ema_update",
        "heads_forward[bf16]",
        "heads_backward[bf16]",
        "heads_forward[fp32]",
        "heads_backward[fp32]",
        "extractor_conv[K=10]",
        "extractor_conv[K=1536]",
        "extractor_conv_input_grad",
        "extractor_norm_gelu",
        "extractor_norm_gelu_backward",
    ]
    assert [(row["target"], row["kernel"]) for row in report] == [(t, n) for t in kernel_report.TARGETS for n in names]
    for row in report:
        assert row["spill_bytes"] == 0, row
        assert row["registers"] <= 255 and row["shared_bytes"] <= kernel_report.SHARED_MEMORY_LIMIT[row["target"]]


def test_assign_kernel_compiles_the_frame_index_assert_in():
    """An out-of-range frame_index must stop the assignment on a GPU (a device assert, no host sync), which a launch
    compiles in only with debug=True: the interpreter ignores device asserts, so the compiled code is the check."""
    pytest.importorskip("triton")
    script = (
        "import triton\n"
        "from triton.compiler import ASTSource\n"
        "from spidr_fast.ops import kernel_report\n"
        "for name, kernel, signature, constexprs, options in kernel_report.kernel_specs(9):\n"
        "    if name.startswith('codebook_statistics'):\n"  # the assign configs come before
        "        break\n"
        "    if name.startswith('codebook_assign'):\n"
        "        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)\n"
        "        ptx = triton.compile(source, target=kernel_report.TARGETS['sm_90'], options=options).asm['ptx']\n"
        "        print(name, '__assertfail' in ptx)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines and all(line.endswith(" True") for line in lines), lines


def test_model_with_triton_kernels_compiles_with_fullgraph(triton_device):
    """The custom ops are single graph nodes whatever runs inside; compiled training equals eager reference."""
    model = tiny(
        "spidr",
        encoder_dropout=0.0,
        encoder_attention_dropout=0.0,
        encoder_layer_drop=0.0,
        encoder_projection_dropout=0.0,
    ).train()
    reference = copy.deepcopy(model)
    waveforms, mask_indices, attention_mask = batch(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss, out = compiled(waveforms, mask_indices=mask_indices, attention_mask=attention_mask)
    loss.mean().backward()

    from spidr_fast import ops

    ops.set_backend("reference")
    expected, expected_out = reference(waveforms, mask_indices=mask_indices, attention_mask=attention_mask)
    expected.mean().backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(out["target_ppl"], expected_out["target_ppl"])
    torch.testing.assert_close(model.codebooks.stacked_codebook, reference.codebooks.stacked_codebook)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
