"""What every benchmark shares: timing, the device's measured peaks, the environment, results files.

Timing on a GPU is triton.testing.do_bench: CUDA events, warm-up excluded, the L2 cache flushed before every
timed run (so inputs are never served from cache), the median of the runs. On a CPU it is the median of
perf_counter runs, and the numbers only smoke-test the code: CPU times say nothing about GPU speed.
"""

import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
SMOKE_DIR = ROOT / ".benchmarks" / "smoke"  # ignored by git
CPU_DISCLAIMER = "CPU smoke run: these times check that the code runs; they say nothing about GPU speed."


def median_ms(fn: Callable[[], object], *, device: torch.device, rep_ms: int = 200, min_runs: int = 3) -> float:
    """Median milliseconds of fn() on `device`."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))
    fn()  # warm-up
    times, deadline = [], time.perf_counter() + rep_ms / 1000
    while len(times) < min_runs or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


@dataclass(frozen=True)
class Peaks:
    """Measured in the same run: a large device-to-device copy, and a large bf16 matmul."""

    copy_gb_per_s: float
    bf16_matmul_tflop_per_s: float


def measure_peaks(device: torch.device) -> Peaks:
    size, n = (1 << 30, 8192) if device.type == "cuda" else (1 << 24, 512)
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    copy_ms = median_ms(lambda: target.copy_(source), device=device)
    a, b = (torch.randn(n, n, dtype=torch.bfloat16, device=device) for _ in range(2))
    matmul_ms = median_ms(lambda: a @ b, device=device)
    return Peaks(copy_gb_per_s=2 * size / copy_ms / 1e6, bf16_matmul_tflop_per_s=2 * n**3 / matmul_ms / 1e9)


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def _commit() -> tuple[str, bool | None]:
    """The commit and whether tracked files differ from it. $SPIDR_FAST_COMMIT, when set, wins (cleanliness then
    unknown, None): a device machine's copy may carry a stale .git beside the sent working tree."""
    if os.environ.get("SPIDR_FAST_COMMIT"):
        return os.environ["SPIDR_FAST_COMMIT"], None
    return _git("rev-parse", "HEAD"), bool(_git("status", "--porcelain", "--untracked-files=no"))


def environment(device: torch.device) -> dict[str, object]:
    commit, dirty = _commit()
    info: dict[str, object] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit,
        "dirty": dirty,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
    }
    if device.type == "cuda":
        from spidr_fast.ops._dispatch import card_family

        info["card_family"] = card_family(device)  # what the CUDA defaults are chosen per (spidr_fast.ops._dispatch)
        info["cuda"] = torch.version.cuda
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            info["driver"] = "unknown"
    return info


@dataclass
class Row:
    """One measurement: `impl` of `case` at `shape`, and what it achieved."""

    case: str
    shape: str
    impl: str
    ms: float | None  # None: this implementation cannot run here (see note)
    gb_per_s: float | None = None
    tflop_per_s: float | None = None
    share_of_peak: float | None = None
    note: str = ""
    error: str = ""  # why this implementation failed: the run, and its device-check stage, fail
    known_failure: str = ""  # set with `error` when the failure is a known one outside this project (why)
    peak_memory_gib: float | None = None  # what it allocated at its peak beyond what was allocated before it


@dataclass
class Results:
    """Rows of one benchmark run. Each row is printed and the whole file rewritten the moment it is measured,
    so a run killed at its time limit keeps every row before the kill."""

    benchmark: str
    device: torch.device
    peaks: Peaks
    output: Path | None = None  # None: benchmarks/results/, or .benchmarks/smoke/ for a smoke run; card and date
    rows: list[Row] = field(default_factory=list)
    extra: dict[str, object] = field(default_factory=dict)
    smoke: bool | None = None  # None: a run on a CPU is a smoke run (not so for a benchmark of CPU work)

    def __post_init__(self) -> None:
        if self.output is not None:  # a wrong --output fails now, not after the first measurement
            try:
                self.output.parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise ValueError(f"--output {self.output}: cannot make its folder ({error.strerror})") from error
        self._environment = environment(self.device)  # once: every row rewrites the file
        if self.smoke is None:
            self.smoke = self.device.type != "cuda"
        if self.smoke:
            print(CPU_DISCLAIMER)
        print(
            f"peaks measured here: copy {self.peaks.copy_gb_per_s:.0f} GB/s, "
            f"bf16 matmul {self.peaks.bf16_matmul_tflop_per_s:.1f} TFLOP/s"
        )
        print(_HEADER)

    def add(
        self,
        case: str,
        shape: str,
        impl: str,
        ms: float | None,
        *,
        bytes_moved: float | None = None,
        flops: float | None = None,
        note: str = "",
        error: str = "",
        known_failure: str = "",
        peak_memory_gib: float | None = None,
    ) -> Row:
        if known_failure and not error:
            raise ValueError("known_failure explains an error: pass the error too")
        row = Row(
            case, shape, impl, ms, note=note, error=error, known_failure=known_failure, peak_memory_gib=peak_memory_gib
        )
        if ms is not None and bytes_moved is not None:
            row.gb_per_s = bytes_moved / ms / 1e6
            row.share_of_peak = row.gb_per_s / self.peaks.copy_gb_per_s
        if ms is not None and flops is not None:
            row.tflop_per_s = flops / ms / 1e9
            row.share_of_peak = row.tflop_per_s / self.peaks.bf16_matmul_tflop_per_s
        self.rows.append(row)
        print(_format_row(row), flush=True)
        self.write(quiet=True)
        return row

    def failures(self) -> list[Row]:
        """The rows whose implementation failed, known failures outside this project excepted."""
        return [row for row in self.rows if row.error and not row.known_failure]

    def finish(self) -> None:
        """Write the file, then exit with an error when an implementation failed or nothing was measured: one
        measured row must not make a run of failures read as a result (the errors stay in the file)."""
        self.write()
        failed = self.failures()
        if failed:
            names = "; ".join(f"{row.case} / {row.impl}: {row.error}" for row in failed)
            raise SystemExit(f"{self.benchmark}: {len(failed)} implementation(s) failed: {names}")
        if not any(row.ms is not None for row in self.rows):
            raise SystemExit(f"{self.benchmark}: no implementation ran (see the notes in {self.output})")

    def print_table(self) -> None:
        print(_HEADER)
        for row in self.rows:
            print(_format_row(row))

    def write(self, *, quiet: bool = False) -> Path:
        env = self._environment
        path = self.output
        if path is None:
            card = str(env["device"]).split("(")[0].strip().replace(" ", "-").lower()
            folder = SMOKE_DIR if self.smoke else RESULTS_DIR  # smoke runs are not committed
            path = self.output = folder / f"{self.benchmark}-{card}-{str(env['date'])[:10]}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "benchmark": self.benchmark,
            "environment": env,
            "command": _portable_command(),
            "peaks": asdict(self.peaks),
            "cpu_smoke_run": self.smoke,
            "rows": [asdict(r) for r in self.rows],
            **self.extra,
        }
        partial = path.with_name(path.name + ".partial")  # a kill mid-write leaves the previous file whole
        partial.write_text(json.dumps(payload, indent=2) + "\n")
        partial.replace(path)
        if not quiet:
            print(f"results: {path}")
        return path


def _portable_command() -> str:
    """The command line, with paths relative to the checkout (a path elsewhere keeps only its file name), so a
    committed results file names no folder of the machine that wrote it."""
    words = []
    for word in sys.argv:
        path = Path(word)
        if path.is_absolute():
            word = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name
        words.append(word)
    return " ".join(words)


_HEADER = f"{'case':<26} {'shape':<30} {'impl':<34} {'ms':>9} {'GB/s':>8} {'TFLOP/s':>8} {'peak':>6}"


def _format_row(row: Row) -> str:
    fmt = lambda x, spec, width: ("-" if x is None else format(x, spec)).rjust(width)  # noqa: E731
    note = "".join(f"  {text}" for text in (row.note, row.error and f"FAILED: {row.error}") if text)
    if row.known_failure:
        note += f" (known: {row.known_failure})"
    return (
        f"{row.case:<26} {row.shape:<30} {row.impl:<34} {fmt(row.ms, '.3f', 9)} {fmt(row.gb_per_s, '.0f', 8)} "
        f"{fmt(row.tflop_per_s, '.1f', 8)} {fmt(row.share_of_peak, '.0%', 6)}{note}"
    )


def on_backend(backend: str | None, fn: Callable[[], object], **per_op: str) -> Callable[[], object]:
    """fn, run with `backend` forced at spidr_fast's ops seam (None: the default dispatch) and op=backend overrides."""
    from spidr_fast.ops import _dispatch

    def run() -> object:
        with _dispatch.backends(backend, **per_op):
            return fn()

    return run


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True) -> Iterator[None]:
    """torch.use_deterministic_algorithms(enabled) for a block, warn_only: ops around the one measured or tested (a
    float32 reference's cuBLAS calls, say) warn instead of raising without CUBLAS_WORKSPACE_CONFIG."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def try_run(fn: Callable[[], object]) -> str | None:
    """None when fn() runs, else its error (one line), which the caller records as the row's error."""
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - any failure means "this implementation does not run here"
        return f"{type(error).__name__}: {str(error).splitlines()[0][:120]}" if str(error) else type(error).__name__
    return None


def import_official():
    """The official `spidr` 0.2.0 package: importable, or unpacked at $SPIDR_OFFICIAL_PATH or in the tests' cache
    (~/.cache/spidr_fast/official/0.2.0); None when absent (the machine may have no internet)."""
    candidates = [os.environ.get("SPIDR_OFFICIAL_PATH"), Path.home() / ".cache" / "spidr_fast" / "official" / "0.2.0"]
    for candidate in [None, *candidates]:
        if candidate is not None:
            if not (Path(candidate) / "spidr").is_dir():
                continue
            sys.path.insert(0, str(candidate))
        try:
            import spidr.models

            return spidr
        except ImportError:
            continue
    return None
