"""The benchmarks run (CPU smoke sizes), write their results, and the README's table is generated from them."""

import json

from benchmarks import input_pipeline, kernels, report, train_step


def test_kernels_smoke_run_writes_results(tmp_path):
    out = tmp_path / "kernels.json"
    kernels.main(["--smoke", "--output", str(out)])
    payload = json.loads(out.read_text())
    assert payload["cpu_smoke_run"] is (payload["environment"]["device"].startswith("CPU"))
    impls = {(row["case"], row["impl"]) for row in payload["rows"] if row["ms"] is not None}
    for case in ("codebook assign", "codebook update", "heads_cross_entropy fwd+bwd"):
        assert (case, "fused (triton)") in impls and (case, "reference eager") in impls
    assert ("heads_cross_entropy fwd+bwd", "F.linear_cross_entropy") in impls


def test_input_pipeline_smoke_run_measures_every_decoding_mode(tmp_path):
    out = tmp_path / "input_pipeline.json"
    input_pipeline.main(["--smoke", "--output", str(out)])
    payload = json.loads(out.read_text())
    assert payload["cpu_smoke_run"] is True
    rows = {(row["case"], row["impl"]): row for row in payload["rows"]}
    for audio_format in ("flac", "wav"):
        for mode in ("crop only", "whole files", "normalize"):
            assert rows[(f"smoke, {audio_format}", mode)]["ms"] > 0
    rates = payload["audio_seconds_per_second_per_worker"]
    assert len(rates) == 6 and all(rate > 0 for rate in rates.values())
    assert payload["audio_seconds_per_gpu_second"]["official step"] > 1_700  # 3.8M samples per 135 ms step


def test_train_step_smoke_run_compares_with_the_official(tmp_path, official):
    out = tmp_path / "train_step.json"
    train_step.main(["--smoke", "--output", str(out)])
    payload = json.loads(out.read_text())
    measured = {row["impl"]: row for row in payload["rows"] if row["ms"] is not None}
    assert {"official eager", "ours eager (reference ops)", "ours eager (default ops)"} <= set(measured)
    assert payload["speedup_vs_official"]["official eager"] == 1.0
    assert payload["flops_per_step"]["total"] > 0
    assert payload["breakdown_ms_ours_eager"]["reference ops"]["whole step"] > 0
    assert payload["breakdown_ms_ours_eager"]["default ops"]["whole step"] > 0


def test_readme_performance_table_is_generated_from_the_results():
    assert report.main(["--check"]) == 0


def test_report_renders_gpu_results_only(tmp_path):
    row = {
        "case": "c",
        "shape": "s",
        "impl": "i",
        "ms": 1.0,
        "gb_per_s": None,
        "tflop_per_s": 2.0,
        "share_of_peak": 0.5,
        "note": "",
    }
    env = {
        "device": "NVIDIA H100",
        "date": "2026-11-27T00:00:00+00:00",
        "commit": "abc",
        "torch": "2.11",
        "triton": "3.6",
    }
    for name, smoke in (("gpu.json", False), ("cpu.json", True)):
        payload = {
            "benchmark": "kernels",
            "environment": env,
            "peaks": {"copy_gb_per_s": 3000, "bf16_matmul_tflop_per_s": 700},
            "cpu_smoke_run": smoke,
            "rows": [row],
        }
        (tmp_path / name).write_text(json.dumps(payload))
    results = report.newest_gpu_results(tmp_path)
    assert [r["file"] for r in results] == ["gpu.json"]
    assert "| c | s | i | 1.000 | – | 2.0 | 50% |  |" in report.table(results)


def test_results_name_the_commit_the_caller_sent(monkeypatch):
    """A device machine's copy may carry a stale .git (seen on the first H100 run): the commit named in
    SPIDR_FAST_COMMIT wins, its cleanliness unknown."""
    import torch

    from benchmarks.common import environment

    monkeypatch.setenv("SPIDR_FAST_COMMIT", "d606cf4")
    env = environment(torch.device("cpu"))
    assert env["commit"] == "d606cf4" and env["dirty"] is None


def test_rows_are_saved_as_they_are_measured(tmp_path):
    """A benchmark killed at its stage limit keeps every row measured before the kill."""
    import json

    import torch

    from benchmarks.common import Peaks, Results

    out = tmp_path / "partial.json"
    results = Results("kernels", torch.device("cpu"), Peaks(1.0, 1.0), out)
    results.add("case", "shape", "impl", 2.0, flops=4e9)
    assert json.loads(out.read_text())["rows"][0]["tflop_per_s"] == 2.0


def test_results_name_no_folder_of_the_machine_that_wrote_them(monkeypatch, tmp_path):
    import sys

    from benchmarks.common import ROOT, _portable_command

    elsewhere = tmp_path / "out" / "kernels.json"  # a folder outside the checkout
    monkeypatch.setattr(sys, "argv", [str(ROOT / "benchmarks" / "kernels.py"), "--output", str(elsewhere)])
    assert _portable_command() == "benchmarks/kernels.py --output kernels.json"
