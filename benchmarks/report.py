"""The performance tables, generated from the committed results (never typed by hand).

    python -m benchmarks.report            # rewrite every table between its markers
    python -m benchmarks.report --check    # exit 1 when a table is not what the results give (CI)

It takes, per benchmark and device, the newest results file in benchmarks/results/ that is not a CPU smoke run, and
writes the full tables into docs/performance.md (perf-table markers), the headline rows of the latest GPU into
README.md and those of every GPU into benchmarks/README.md (perf-summary markers): the step against the official
eager step, its MFU, and each op against its compiled reference.
"""

import json
import re
import sys
from pathlib import Path

from benchmarks.common import RESULTS_DIR, ROOT
from spidr_fast.cli import ArgumentParser, report_user_errors

README = ROOT / "README.md"
PERFORMANCE_DOC = ROOT / "docs" / "performance.md"
BENCHMARKS_README = ROOT / "benchmarks" / "README.md"
STEP_BENCHMARKS = ("train_step", "train_step_compiled")
OP_BENCHMARKS = ("kernels", "kernels_compiled")
# Our implementation → what the headline compares it with: the compiled reference, or for attention the SDPA
# backend that runs by default.
OP_BASELINES = {"fused (triton)": "reference compiled", "ours (csrc)": "SDPA flash"}


def newest_gpu_results(results_dir: Path = RESULTS_DIR) -> list[dict]:
    chosen: dict[tuple[str, str], dict] = {}
    for path in sorted(results_dir.glob("*.json")):
        payload = json.loads(path.read_text())
        if payload.get("cpu_smoke_run", True):
            continue
        key = (payload["benchmark"], payload["environment"]["device"])
        if key not in chosen or payload["environment"]["date"] > chosen[key]["environment"]["date"]:
            chosen[key] = recount_flops({**payload, "file": path.name})
    return [chosen[key] for key in sorted(chosen)]


def recount_flops(payload: dict) -> dict:
    """A train-step result measured with an older FLOP count (before `flop_count_version` 2 the positional
    convolution counted the stack's kernel, 95, in each of its 5 layers: 1.3 TFLOP a step too many) with its
    TFLOP/s and MFU recomputed from today's count, and each such row marked; the file itself is left as measured."""
    from benchmarks.train_step import FLOP_COUNT_VERSION, step_flops
    from spidr_fast.models import SpidRConfig

    if payload["benchmark"] not in STEP_BENCHMARKS or payload.get("flop_count_version", 1) >= FLOP_COUNT_VERSION:
        return payload
    rows = []
    for row in payload["rows"]:
        shape = re.fullmatch(r"B(\d+) x ([\d.]+)s \((\d+) frames, (\d+) masked\)", row["shape"])
        if row["tflop_per_s"] is not None and shape:  # GPU runs measure spidr-base
            batch, seconds, _, masked = shape.groups()
            counted = step_flops(SpidRConfig(), int(batch), round(float(seconds) * 16000), int(masked))["total"]
            scale = counted / (row["tflop_per_s"] * row["ms"] * 1e9)  # over the count it was measured with
            recounted = f"TFLOP/s and MFU recomputed with FLOP count {FLOP_COUNT_VERSION} (measured with the old one)"
            row = {
                **row,
                "tflop_per_s": row["tflop_per_s"] * scale,
                "share_of_peak": row["share_of_peak"] * scale,
                "note": f"{row['note']}; {recounted}" if row["note"] else recounted,
            }
        rows.append(row)
    return {**payload, "rows": rows}


def _cell(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def table(results: list[dict]) -> str:
    if not results:
        return (
            "No GPU results are committed yet: run `bash benchmarks/device_check.sh` on a GPU machine, copy its "
            "`kernels.json` and `train_step.json` into `benchmarks/results/`, then `python -m benchmarks.report`."
        )
    lines = []
    for payload in results:
        env = payload["environment"]
        peaks = (
            ""
            if str(env["device"]).startswith("CPU")
            # a benchmark of CPU work rates no GPU peak
            else (
                f"; measured peaks: copy {payload['peaks']['copy_gb_per_s']:.0f} GB/s, bf16 matmul "
                f"{payload['peaks']['bf16_matmul_tflop_per_s']:.0f} TFLOP/s"
            )
        )
        lines += [
            f"**{payload['benchmark']}** on {env['device']}, {env['date'][:10]}, commit {env['commit'][:10]}, "
            f"torch {env['torch']}, triton {env['triton']} (`benchmarks/results/{payload['file']}`){peaks}.",
            "",
            "| case | shape | implementation | ms (median) | GB/s | TFLOP/s | share of peak | note |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
        ]
        for row in payload["rows"]:
            lines.append(
                f"| {row['case']} | {row['shape']} | {row['impl']} | {_cell(row['ms'], '.3f')} | "
                f"{_cell(row['gb_per_s'], '.0f')} | {_cell(row['tflop_per_s'], '.1f')} | "
                f"{_cell(row['share_of_peak'], '.0%')} | {note(row)} |"
            )
        lines.append("")
    return "\n".join(lines).rstrip()


def note(row: dict) -> str:
    """The row's note, its peak memory, and its error (and why it is a known one) where it failed."""
    parts = [row["note"]] if row["note"] else []
    if row.get("peak_memory_gib") is not None:
        parts.append(f"peak memory {row['peak_memory_gib']:.1f} GiB")
    if row.get("error"):
        parts.append(f"FAILED: {row['error']}" + (f" (known: {row['known_failure']})" if row["known_failure"] else ""))
    return "; ".join(parts)


def where_the_time_goes(results: list[dict], top: int = 8) -> str:
    """Per GPU with a profile: each profiled step's top kernels (calls, ms and share of the step), and what ncu
    read of our kernels."""
    profiles = [payload for payload in results if payload["benchmark"] == "profile"]
    if not profiles:
        return (
            "No profile is committed yet: the device check's second call (`bash benchmarks/device_check.sh "
            "compiled`) returns `profile.json`; copy it into `benchmarks/results/` as `profile-<card>-<date>.json`."
        )
    lines = []
    for payload in profiles:
        env = payload["environment"]
        steps = {row["impl"]: row["ms"] for row in payload["rows"] if row["case"] == "profiled step"}
        lines += [
            f"**{env['device']}**, {env['date'][:10]}, commit {env['commit'][:10]} (`benchmarks/results/"
            f"{payload['file']}`): the top {top} kernels of each step by total time.",
            "",
            "| step (ms) | kernel | calls | ms | share of the step |",
            "| --- | --- | ---: | ---: | ---: |",
        ]
        for step, kernels in payload.get("top_kernels", {}).items():
            for kernel in kernels[:top]:
                lines.append(
                    f"| {step} ({_cell(steps.get(step), '.1f')}) | `{kernel['name'][:70]}` | {kernel['calls']:g} | "
                    f"{kernel['ms']:.2f} | {kernel['share']:.0%} |"
                )
        if isinstance(payload.get("ncu"), list) and payload["ncu"]:
            lines += [
                "",
                "| our kernel (ncu) | DRAM GB/s | SM throughput | occupancy | registers |",
                "| --- | ---: | ---: | ---: | ---: |",
            ]
            for kernel in payload["ncu"]:
                lines.append(
                    f"| `{kernel['name'][:70]}` | {_cell(kernel['dram_gb_per_s'], '.0f')} | "
                    f"{_cell(kernel['sm_throughput_pct'], '.0f')}% | {_cell(kernel['achieved_occupancy_pct'], '.0f')}% "
                    f"| {_cell(kernel['registers_per_thread'], '.0f')} |"
                )
        lines.append("")
    return "\n".join(lines).rstrip()


def _gpu_devices(results: list[dict]) -> list[str]:
    """GPUs with results, the newest first."""
    newest: dict[str, str] = {}
    for payload in results:
        env = payload["environment"]
        if not str(env["device"]).startswith("CPU"):
            newest[env["device"]] = max(newest.get(env["device"], ""), env["date"])
    return sorted(newest, key=newest.__getitem__, reverse=True)


def _span(values: list[float], spec: str) -> str:
    low, high = format(min(values), spec), format(max(values), spec)
    return low if low == high else f"{low}-{high}"


def summary(results: list[dict], device: str) -> str:
    """The headline rows of one GPU: each measured step against the official eager step, with its MFU, and each of
    our ops against its baseline (over the benchmark's shapes)."""
    mine = [payload for payload in results if payload["environment"]["device"] == device]
    date = max(payload["environment"]["date"] for payload in mine)[:10]
    files = ", ".join(f"`{payload['file']}`" for payload in mine)
    lines = [
        f"**{device}**, {date} (from {files}).",
        "",
        "| measured | ms | against | its ms | speed | MFU |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    steps = [row for p in mine if p["benchmark"] in STEP_BENCHMARKS for row in p["rows"] if row["ms"] is not None]
    official = next((row["ms"] for row in steps if row["impl"] == "official eager"), None)
    for row in steps:
        speed = "–" if official is None else f"{official / row['ms']:.2f}x"
        lines.append(
            f"| train step, {row['impl']} | {row['ms']:.1f} | official eager | {_cell(official, '.1f')} | {speed} | "
            f"{_cell(row['share_of_peak'], '.0%')} |"
        )
    ops = {
        (row["case"], row["shape"], row["impl"]): row["ms"]
        for p in mine
        if p["benchmark"] in OP_BENCHMARKS
        for row in p["rows"]
        if row["ms"] is not None
    }
    for case in dict.fromkeys(case for case, _, _ in ops):
        for ours, baseline in OP_BASELINES.items():
            pairs = [
                (ms, ops[(case, shape, baseline)])
                for (c, shape, impl), ms in ops.items()
                if c == case and impl == ours and (case, shape, baseline) in ops
            ]
            if pairs:
                lines.append(
                    f"| {case}, {ours} | {_span([a for a, _ in pairs], '.3f')} | {baseline} | "
                    f"{_span([b for _, b in pairs], '.3f')} | {_span([b / a for a, b in pairs], '.2f')}x | – |"
                )
    return "\n".join(lines)


def generated(results: list[dict]) -> dict[Path, dict[str, str]]:
    """file → marker name → the text between its markers."""
    devices = _gpu_devices(results)
    latest = summary(results, devices[0]) if devices else table([])
    return {
        README: {"perf-summary": latest},
        PERFORMANCE_DOC: {"perf-table": table(results)},
        BENCHMARKS_README: {
            "perf-summary": "\n\n".join(summary(results, d) for d in devices) or table([]),
            "perf-profile": where_the_time_goes(results),
        },
    }


def render(text: str, name: str, content: str, path: Path) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if text.count(start) != 1 or text.count(end) != 1:
        raise ValueError(f"{path} needs one {start} and one {end} line, where the generated table goes")
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    return f"{before}{start}\n{content}\n{end}{after}"


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="only check that every table is up to date")
    args = parser.parse_args(argv)
    stale = []
    for path, blocks in generated(newest_gpu_results()).items():
        current = path.read_text()
        wanted = current
        for name, content in blocks.items():
            wanted = render(wanted, name, content, path)
        if wanted != current:
            stale.append(path.relative_to(ROOT))
            if not args.check:
                path.write_text(wanted)
    if args.check and stale:
        names = ", ".join(map(str, stale))
        print(f"stale performance tables in {names}: run python -m benchmarks.report", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(report_user_errors(main))
