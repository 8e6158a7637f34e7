"""The README's performance table, generated from the committed GPU results (never typed by hand).

    python -m benchmarks.report            # rewrite the table between the README's perf-table markers
    python -m benchmarks.report --check    # exit 1 when the README's table is not what the results give (CI)

It takes, per benchmark and device, the newest results file in benchmarks/results/ that is not a CPU smoke run.
"""

import json
import sys
from pathlib import Path

from benchmarks.common import RESULTS_DIR, ROOT
from spidr_fast.cli import ArgumentParser, report_user_errors

README = ROOT / "README.md"
START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"


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


def render(readme: str, results: list[dict]) -> str:
    before, rest = readme.split(START, 1)
    _, after = rest.split(END, 1)
    return f"{before}{START}\n{table(results)}\n{END}{after}"


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="only check that the README is up to date")
    args = parser.parse_args(argv)
    current = README.read_text()
    wanted = render(current, newest_gpu_results())
    if args.check:
        if wanted != current:
            print("README.md's performance table is stale: run python -m benchmarks.report", file=sys.stderr)
            return 1
        return 0
    README.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(report_user_errors(main))
