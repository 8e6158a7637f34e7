"""The benchmarks run (CPU smoke sizes), write their results, and the performance tables are generated from them."""

import json

import pytest

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
    # Attention at dropout 0 keeps the case names the CUDA defaults are derived from (tests/test_dispatch.py); at
    # dropout 0.1 every implementation has its own rows, measured, or not applicable with the reason.
    assert [kernels.attention_case(d, 0.0) for d in ("fwd", "bwd")] == ["attention fwd", "attention bwd"]
    attention = {(row["case"], row["shape"], row["impl"]): row for row in payload["rows"] if "attention" in row["case"]}
    for (case, shape, impl), row in list(attention.items()):
        if "dropout" not in case:
            with_dropout = attention[(f"{case} dropout 0.1", shape, impl)]
            assert with_dropout["ms"] is not None or with_dropout["note"], with_dropout
            assert not with_dropout["error"]
    if payload["cpu_smoke_run"]:  # SDPA math runs with dropout on a CPU
        assert {("attention fwd dropout 0.1", "SDPA math"), ("attention bwd dropout 0.1", "SDPA math")} <= impls


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
    assert {"official eager, frozen extractor", "ours eager (default ops), frozen extractor"} <= set(measured)
    assert payload["speedup_vs_official"]["official eager"] == 1.0
    assert payload["flops_per_step"]["total"] > payload["flops_per_step_frozen_extractor"]["total"] > 0
    assert payload["flop_count_version"] == train_step.FLOP_COUNT_VERSION
    assert not any(row["error"] for row in payload["rows"])
    for ops_name in ("reference ops", "default ops"):
        phases = payload["breakdown_ms_ours_eager"][ops_name]
        assert phases["whole step"] > 0
        assert phases["feature extractor (fwd)"] > 0 and phases["feature extractor (bwd)"] > 0  # apart
        assert "backward" not in phases and phases["backward (encoders, heads)"] > 0


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


def test_report_headline_rows_compare_with_the_official_step_and_the_compiled_reference():
    def row(case, shape, impl, ms, share=None):
        return {
            "case": case,
            "shape": shape,
            "impl": impl,
            "ms": ms,
            "share_of_peak": share,
            "gb_per_s": None,
            "tflop_per_s": None,
            "note": "",
        }

    def payload(benchmark, device, date, rows):
        env = {"device": device, "date": date, "commit": "abc", "torch": "2.11", "triton": "3.6"}
        peaks = {"copy_gb_per_s": 3000, "bf16_matmul_tflop_per_s": 700}
        return {"benchmark": benchmark, "environment": env, "peaks": peaks, "file": f"{benchmark}.json", "rows": rows}

    results = [
        payload("kernels", "H100", "2026-11-27", [row("assign", "B1", "fused (triton)", 4.0)]),
        payload(
            "kernels",
            "H200",
            "2026-11-28",
            [
                row("assign", "B1", "fused (triton)", 4.0),
                row("assign", "B2", "fused (triton)", 3.0),
                row("attention fwd", "B1", "ours (csrc)", 2.0),
                row("attention fwd", "B1", "SDPA flash", 1.0),
                row("attention fwd dropout 0.1", "B1", "ours (csrc)", 3.0),
                row("attention fwd dropout 0.1", "B1", "SDPA flash", 1.5),
            ],
        ),
        payload(
            "kernels_compiled",
            "H200",
            "2026-11-28",
            [row("assign", "B1", "reference compiled", 1.0), row("assign", "B2", "reference compiled", 1.5)],
        ),
        payload(
            "train_step",
            "H200",
            "2026-11-28",
            [row("step", "s", "official eager", 120.0, 0.2), row("step", "s", "ours eager", 100.0, 0.24)],
        ),
        payload("train_step_compiled", "H200", "2026-11-28", [row("step", "s", "official compiled", None)]),
    ]
    latest = report.generated(results)[report.README]["perf-summary"]
    assert latest.startswith("**H200**, 2026-11-28") and "H100" not in latest
    assert "| train step, ours eager | 100.0 | official eager | 120.0 | 1.20x | 24% |" in latest
    assert "official compiled" not in latest  # unmeasured: the full tables say why
    # over the shapes: ours 3-4 ms against 1-1.5 ms, the compiled reference's time over ours 0.25-0.50
    assert "| assign, fused (triton) | 3.000-4.000 | reference compiled | 1.000-1.500 | 0.25-0.50x | – |" in latest
    assert "| attention fwd, ours (csrc) | 2.000 | SDPA flash | 1.000 | 0.50x | – |" in latest
    assert "| attention fwd dropout 0.1, ours (csrc) | 3.000 | SDPA flash | 1.500 | 0.50x | – |" in latest  # apart
    every_card = report.generated(results)[report.BENCHMARKS_README]["perf-summary"]
    assert every_card.index("**H200**") < every_card.index("**H100**")


def test_report_names_the_file_that_lacks_its_markers(tmp_path):
    with pytest.raises(ValueError, match="notes.md needs one <!-- perf-table:start -->"):
        report.render("no markers", "perf-table", "table", tmp_path / "notes.md")


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


def test_step_flops_count_the_positional_convolution_as_the_model_runs_it():
    """Each of spidr-base's 5 positional layers has kernel 95 // 5 = 19: counting 95 in each overstated a step by
    1.3 TFLOP (9 %). torch's own FLOP counter, over the real module, is the judge."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from spidr_fast.models import SpidRConfig
    from spidr_fast.models.components import ConvPositionalEmbedding

    cfg = SpidRConfig()
    module = ConvPositionalEmbedding(
        cfg.encoder_embed_dim, cfg.encoder_pos_conv_kernel, cfg.encoder_pos_conv_groups, cfg.encoder_pos_conv_depth
    )
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(torch.randn(1, 40, cfg.encoder_embed_dim), None)
    assert train_step.positional_flops(cfg, 40) == counter.get_total_flops()
    total = train_step.step_flops(cfg, 12, 320_000, 6156)["total"]
    assert abs(total - 13.868e12) < 0.001e12  # 15.211 TFLOP in the results measured with the old count


def _train_step_payload(rows: list[dict], **extra) -> dict:
    env = {"device": "NVIDIA H200", "date": "2026-11-28T00:00:00+00:00", "commit": "abc", "torch": "2.11"}
    return {"benchmark": "train_step", "environment": env, "rows": rows, "cpu_smoke_run": False, **extra}


def test_report_recomputes_mfu_measured_with_the_old_flop_count():
    old_total, new_total, ms, peak = 15211127070720.0, 13867673149440.0, 116.09, 701.0
    row = {
        "case": "train step",
        "shape": "B12 x 20.0s (11988 frames, 6156 masked)",
        "impl": "official eager",
        "ms": ms,
        "tflop_per_s": old_total / ms / 1e9,
        "share_of_peak": old_total / ms / 1e9 / peak,
        "note": "103,265 frames/s",
    }
    recounted = report.recount_flops(_train_step_payload([row]))["rows"][0]
    assert abs(recounted["tflop_per_s"] - new_total / ms / 1e9) < 0.01
    assert abs(recounted["share_of_peak"] - new_total / ms / 1e9 / peak) < 1e-4
    assert recounted["note"].startswith("103,265 frames/s; TFLOP/s and MFU recomputed")
    current = _train_step_payload([row], flop_count_version=train_step.FLOP_COUNT_VERSION)
    assert report.recount_flops(current)["rows"][0] == row  # measured with today's count: as it is


def test_report_notes_peak_memory_and_errors():
    row = {"note": "", "peak_memory_gib": 31.25, "error": "InductorError: x", "known_failure": "torch 2.11"}
    assert report.note(row) == "peak memory 31.2 GiB; FAILED: InductorError: x (known: torch 2.11)"


def test_report_says_where_the_time_goes():
    kernels = [{"name": "sm90_xmma_gemm_bf16", "calls": 84, "ms": 30.5, "share": 0.28}]
    payload = {
        "benchmark": "profile",
        "file": "profile-nvidia-h200-2026-12-07.json",
        "environment": {"device": "NVIDIA H200", "date": "2026-12-07T00:00:00+00:00", "commit": "abc"},
        "rows": [{"case": "profiled step", "impl": "official eager", "ms": 110.0}],
        "top_kernels": {"official eager": kernels},
        "ncu": [
            {
                "name": "_assign_kernel",
                "dram_gb_per_s": 812.0,
                "sm_throughput_pct": 41.0,
                "achieved_occupancy_pct": 22.5,
                "registers_per_thread": 128.0,
            }
        ],
    }
    text = report.where_the_time_goes([payload])
    assert "| official eager (110.0) | `sm90_xmma_gemm_bf16` | 84 | 30.50 | 28% |" in text
    assert "| `_assign_kernel` | 812 | 41% | 22% | 128 |" in text
    assert "No profile is committed yet" in report.where_the_time_goes([])


def test_a_failed_variant_fails_the_run_and_a_known_failure_does_not(tmp_path):
    """One measured row used to pass a run whose other variants crashed."""
    import pytest
    import torch

    from benchmarks.common import Peaks, Results

    results = Results("kernels", torch.device("cpu"), Peaks(1.0, 1.0), tmp_path / "r.json")
    results.add("case", "shape", "works", 2.0)
    results.add("case", "shape", "official compiled", None, error="InductorError: x", known_failure="torch 2.11")
    results.finish()  # a known failure outside the project passes, with its error kept
    results.add("case", "shape", "crashes", None, error="RuntimeError: boom")
    with pytest.raises(SystemExit, match="1 implementation\\(s\\) failed: case / crashes: RuntimeError: boom"):
        results.finish()
    assert json.loads((tmp_path / "r.json").read_text())["rows"][2]["error"] == "RuntimeError: boom"


def test_attention_rows_time_our_kernel_and_its_deterministic_backward(emulated_flash):
    """Through the emulator, our kernel's rows run on the CPU as they will on a GPU: forward, backward, and the
    backward in deterministic mode (dQ by its own pass), at dropout 0 and 0.1."""
    import torch

    from benchmarks.common import Peaks, Results

    results = Results("kernels", torch.device("cpu"), Peaks(1.0, 1.0), None)
    kernels.bench_attention(results, torch.device("cpu"), [(2, 40)], torch.bfloat16, heads=2, head_dim=64)
    ours = {(row.case, row.impl): row for row in results.rows if row.impl.startswith("ours")}
    for dropout in ("", " dropout 0.1"):
        for case, impl in (("fwd", "ours (csrc)"), ("bwd", "ours (csrc)"), ("bwd", "ours (csrc), deterministic")):
            row = ours.pop((f"attention {case}{dropout}", impl))
            assert row.ms is not None and not row.error, row
    assert not ours


def test_ncu_raw_csv_gives_each_kernel_its_metrics():
    """ncu --csv --page raw --print-units base: lines of its own first, a header, a units row, one row per launch."""
    from benchmarks import step_profile

    header = ["ID", "Kernel Name", *step_profile.NCU_METRICS.values()]
    units = ["", "", "byte/second", "%", "%", "register/thread"]
    launch = ["0", "_instance_norm_assign_kernel", "1234500000000", "41.5", "22.25", "128"]
    text = "==PROF== Connected to process 1\n" + "\n".join(
        ",".join(f'"{cell}"' for cell in line) for line in (header, units, launch)
    )
    (kernel,) = step_profile.parse_ncu_csv(text)
    assert kernel == {
        "name": "_instance_norm_assign_kernel",
        "dram_gb_per_s": 1234.5,
        "sm_throughput_pct": 41.5,
        "achieved_occupancy_pct": 22.25,
        "registers_per_thread": 128.0,
    }


def test_ncu_leaves_the_clocks_alone(monkeypatch):
    """The lent card's clocks are not ours to change: ncu's default locks them to base while it profiles."""
    import subprocess

    from benchmarks import step_profile

    commands = []
    monkeypatch.setattr(subprocess, "run", lambda command, **_: commands.append(command) or _Done())
    step_profile.ncu_kernels()
    (command,) = commands
    assert command[command.index("--clock-control") + 1] == "none"


class _Done:
    returncode, stdout, stderr = 0, "", ""


def test_only_the_official_dynamic_compile_failing_in_inductor_is_a_known_failure():
    """It failed on both cards in torch 2.11's inductor; any other error, or that error elsewhere, fails the run."""
    assert "torch 2.11's inductor" in train_step.known_failure("official compiled", "InductorError: AssertionError: ")
    assert train_step.known_failure("official compiled", "OutOfMemoryError: CUDA out of memory") == ""
    assert train_step.known_failure("ours compiled (default ops)", "InductorError: AssertionError: ") == ""
