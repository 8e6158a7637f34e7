"""The performance tables, generated from the committed results (never typed by hand).

    python -m benchmarks.report            # rewrite every table between its markers
    python -m benchmarks.report --check    # exit 1 when a table is not what the results give (CI)

It takes, per benchmark and device, the newest results file in benchmarks/results/ that is not a CPU smoke run, and
writes the full tables into docs/performance.md (perf-table markers), the headline rows of the latest GPU into
README.md and those of every GPU into benchmarks/README.md (perf-summary markers): the step against the official
eager step, its MFU, and each op against its compiled reference.
"""

import json
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
            chosen[key] = {**payload, "file": path.name}
    return [chosen[key] for key in sorted(chosen)]


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
                f"{_cell(row['share_of_peak'], '.0%')} | {row['note']} |"
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
        BENCHMARKS_README: {"perf-summary": "\n\n".join(summary(results, d) for d in devices) or table([])},
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
