"""Where a training step's time goes: torch.profiler over a few steps of our compiled step and of the official eager
step, the top CUDA kernels of each by total time; and, where Nsight Compute (`ncu`) is on the machine, each of
our Triton and CUDA kernels at the official shapes with what it achieved.

    python benchmarks/step_profile.py                 # on a GPU: spidr-base at the official per-GPU batch
    python benchmarks/step_profile.py --smoke         # a tiny model, eager, CPU ops (the default without a GPU)

The results file (`profile-<card>-<date>.json`, or --output) holds one row per profiled step (ms per step, median
of the profiled steps) and, per step, the top kernels: name, calls per step, ms per step and share of the step.
`ncu` reads, per kernel launched by our ops (codebook assignment and update, the heads' cross-entropy, our
flash-attention, the feature extractor's forward and backward): DRAM GB/s, SM throughput (% of peak), achieved
occupancy (%) and registers per thread. A step or an ncu run that fails keeps its error and makes the run exit 1.
`python -m benchmarks.report` renders the "where the time goes" table from the committed files.
"""

import argparse
import copy
import csv
import io
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python benchmarks/step_profile.py` from a checkout

from benchmarks.common import Results, import_official, measure_peaks, on_backend, try_run  # noqa: E402
from benchmarks.train_step import SMOKE_CONFIG, make_batch, make_step, official_spidr  # noqa: E402
from spidr_fast.cli import ArgumentParser, positive, report_user_errors  # noqa: E402
from spidr_fast.models import SpidR, SpidRConfig  # noqa: E402

TOP = 25
NCU_TIMEOUT_S = 45  # inside the profile stage's 100 s, after the profiled steps
NCU_LAUNCHES = 200  # our ops at the official shapes launch fewer; a cap keeps a surprise from eating the stage
# ncu's metrics, in the order the results keep them: name in the file -> ncu metric.
NCU_METRICS = {
    "dram_gb_per_s": "dram__bytes.sum.per_second",
    "sm_throughput_pct": "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "achieved_occupancy_pct": "sm__warps_active.avg.pct_of_peak_sustained_active",
    "registers_per_thread": "launch__registers_per_thread",
}


def top_kernels(profile: torch.profiler.profile, steps: int, step_ms: float, device: torch.device) -> list[dict]:
    """The `TOP` kernels (CPU ops on a CPU) by total self time: calls and ms per step, share of the step."""
    on_gpu = device.type == "cuda"
    rows = []
    for event in profile.key_averages():
        if on_gpu and event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        total_us = event.self_device_time_total if on_gpu else event.self_cpu_time_total
        if total_us > 0:
            rows.append((total_us, event.key, event.count))
    rows.sort(reverse=True)
    return [
        {
            "name": name[:160],
            "calls": round(count / steps, 2),
            "ms": total_us / 1000 / steps,
            "share": total_us / 1000 / steps / step_ms,
        }
        for total_us, name, count in rows[:TOP]
    ]


def profile_step(step, device: torch.device, steps: int) -> tuple[list[float], torch.profiler.profile]:
    """ms of each of `steps` steps (host clock after a synchronize: the profiler's own cost included), profiled."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    times = []
    with torch.profiler.profile(activities=activities) as profile:
        for _ in range(steps):
            start = _synchronized_clock(device)
            step()
            times.append((_synchronized_clock(device) - start) * 1000)
    return times, profile


def _synchronized_clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def ncu_kernels() -> tuple[list[dict], str]:
    """Each kernel that `--ncu-target` launches between cudaProfilerStart and Stop, with NCU_METRICS: the rows and
    an error ('' when ncu ran). ncu's own output ends up in the log (no extra file: a device call returns 8)."""
    command = [
        "ncu",
        "--clock-control",  # ncu locks the clocks to base by default; the card's settings are not ours to change
        "none",
        "--profile-from-start",
        "off",
        "--csv",
        "--page",
        "raw",
        "--print-units",
        "base",
        "--launch-count",
        str(NCU_LAUNCHES),
        "--metrics",
        ",".join(NCU_METRICS.values()),
        sys.executable,
        str(Path(__file__).resolve()),
        "--ncu-target",
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=NCU_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return [], f"ncu did not finish in {NCU_TIMEOUT_S} s"
    print(done.stdout[-5000:], done.stderr[-5000:], sep="\n")
    if done.returncode != 0:
        return [], f"ncu exited {done.returncode}: {(done.stderr or done.stdout).strip().splitlines()[-1:]}"
    return parse_ncu_csv(done.stdout), ""


def parse_ncu_csv(text: str) -> list[dict]:
    """ncu --csv --page raw: a header line, a units line, then one line per kernel launch (other output before)."""
    lines = text[text.index('"ID"') :] if '"ID"' in text else ""
    table = list(csv.DictReader(io.StringIO(lines)))[1:]  # the first row gives the units
    kernels = []
    for launch in table:
        row = {"name": launch.get("Kernel Name", "")[:160]}
        for name, metric in NCU_METRICS.items():
            value = launch.get(metric, "").replace(",", "")
            row[name] = float(value) if value.replace(".", "", 1).isdigit() else None
        if row["dram_gb_per_s"] is not None:  # ncu gives bytes per second
            row["dram_gb_per_s"] /= 1e9
        kernels.append(row)
    return kernels


def ncu_target() -> None:
    """Run each of our ops once at the official shapes, forward and backward, between cudaProfilerStart and Stop:
    the inputs are made before, so ncu measures our kernels (and the GEMMs our ops call) only."""
    from spidr_fast import ops
    from spidr_fast.ops.kernels.attention import flash_attention_varlen

    device, bf16 = torch.device("cuda"), torch.bfloat16
    layers, codebooks, frames, dim, codewords = 8, 8, 12 * 1000, 768, 256
    teacher = torch.randn(layers, 12, 1000, dim, device=device, dtype=bf16)
    frame_index = torch.randperm(frames, device=device)[:7200].sort().values
    codebook = torch.randn(codebooks, codewords, dim, device=device)
    counts = torch.ones(codebooks, codewords, device=device)
    x = torch.randn(codebooks, 7200, dim, device=device, dtype=bf16, requires_grad=True)
    weight = (torch.randn(codebooks, codewords, dim, device=device, dtype=bf16) * dim**-0.5).requires_grad_()
    labels = torch.randint(0, codewords, (codebooks, 7200), device=device)
    q, k, v = (torch.randn(frames, 12, 64, device=device, dtype=bf16, requires_grad=True) for _ in "qkv")
    cu_seqlens = torch.arange(0, frames + 1, 1000, dtype=torch.int32, device=device)
    model = SpidR(SpidRConfig()).to(device).train()
    waveforms = torch.randn(12, 320_000, device=device)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    _, batch_counts, batch_sums = ops.instance_norm_assign(teacher, frame_index, codebook, counts)
    ops.codebook_ema_update_(codebook, counts, batch_counts, batch_sums, 0.9)
    ops.heads_cross_entropy(x, weight, None, labels)[0].sum().backward()
    flash_attention_varlen(q, k, v, cu_seqlens, 1000).float().sum().backward()
    with torch.autocast("cuda", bf16):
        model._features(waveforms).float().sum().backward()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def main(argv: list[str] | None = None) -> Results:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny model and batch (the default without a GPU)")
    parser.add_argument("--steps", type=positive(int), default=3, help="profiled steps per variant (default 3)")
    parser.add_argument("--no-ncu", action="store_true", help="skip Nsight Compute even where it is installed")
    parser.add_argument("--ncu-target", action="store_true", help=argparse.SUPPRESS)  # what ncu runs
    parser.add_argument("--output", type=str, default=None)
    args = parser.parse_args(argv)
    if args.ncu_target:
        ncu_target()
        sys.exit(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = args.smoke or device.type != "cuda"
    cfg = SpidRConfig(**SMOKE_CONFIG) if smoke else SpidRConfig()
    batch_size, samples = (2, 8000) if smoke else (12, 320_000)
    batch = make_batch(cfg, batch_size, samples, device)
    results = Results("profile", device, measure_peaks(device), None if args.output is None else Path(args.output))
    shape = f"B{batch_size} x {samples / 16000:.1f}s, {args.steps} profiled steps"
    torch.manual_seed(0)
    template = SpidR(cfg).to(device).train()
    official = import_official()

    def ours():
        model = copy.deepcopy(template)
        if not smoke:  # a smoke run compiles nothing (minutes on a CPU)
            model.compile_encoders()
        return on_backend(None, make_step(model, batch, torch.bfloat16))

    def official_eager():
        return make_step(official_spidr(official, template), batch, torch.bfloat16)

    ours_name = "ours eager (default ops; smoke: nothing compiled)" if smoke else "ours compiled (default ops)"
    steps: dict[str, list[dict]] = {}
    for name, build in ((ours_name, ours), ("official eager", official_eager)):
        try:
            step = build()
            failure = try_run(step) or try_run(step)  # warm-up, compilation included
        except Exception as error:  # noqa: BLE001 - recorded, then fails the run
            failure = f"{type(error).__name__}: {error}"[:160]
        if failure:
            results.add("profiled step", shape, name, None, error=failure)
            continue
        times, profile = profile_step(step, device, args.steps)
        ms = statistics.median(times)
        steps[name] = top_kernels(profile, args.steps, ms, device)
        results.extra["top_kernels"] = steps
        results.add("profiled step", shape, name, ms, note=f"top {TOP} {'kernels' if not smoke else 'CPU ops'}")
        del step
    if device.type == "cuda" and shutil.which("ncu") and not args.no_ncu:
        kernels, error = ncu_kernels()
        results.extra["ncu"] = kernels
        if error:
            results.add("ncu", "our ops at the official shapes", "ncu", None, error=error)
    else:
        results.extra["ncu"] = "not run: " + ("no CUDA device" if device.type != "cuda" else "no ncu on this machine")
    results.finish()
    return results


if __name__ == "__main__":
    sys.exit(report_user_errors(main))
