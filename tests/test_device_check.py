"""benchmarks/device_check.sh reports FAIL, never PASS, when a stage cannot do its job: the extension is missing, a
GPU test fails, or a stage is killed at its time limit. Each case runs the real script on a copy of the tree as the
device receives it (no .git, no built extension), with the fault injected from outside."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = "benchmarks/device_check.sh"

# A pytest plugin that the check's test runs load through PYTEST_ADDOPTS: every test fails, or hangs.
FAULTS = textwrap.dedent(
    """
    import os, time
    import pytest

    def pytest_runtest_setup(item):
        if os.environ["DEVICE_CHECK_FAULT"] == "hang":
            time.sleep(600)
        pytest.fail("injected: this GPU test fails")
    """
)


@pytest.fixture(scope="module")
def device_copy(tmp_path_factory) -> Path:
    """The tree as the device tool copies it, without the extension a CUDA toolkit may have built here."""
    copy = tmp_path_factory.mktemp("device") / "spidr_fast"
    ignore = shutil.ignore_patterns("*.so", "__pycache__", ".*", "*.egg-info", "runs", "build")
    for part in ("benchmarks", "spidr_fast", "tests", "csrc"):
        shutil.copytree(ROOT / part, copy / part, ignore=ignore)
    for part in ("pyproject.toml", "CMakeLists.txt"):
        shutil.copy2(ROOT / part, copy / part)
    (copy / "faults").mkdir()
    (copy / "faults" / "device_check_faults.py").write_text(FAULTS)
    return copy


def run_check(copy: Path, results: Path, *args: str, **env: str) -> tuple[int, list[str]]:
    environment = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **env)
    environment.pop("OUT", None)
    done = subprocess.run(
        ["bash", SCRIPT, *args, str(results)], cwd=copy, env=environment, capture_output=True, text=True, timeout=300
    )
    return done.returncode, (results / "summary.txt").read_text().splitlines()


def test_a_missing_extension_fails_the_import_stage(device_copy, tmp_path):
    # An extension that does not load, as after a failed build; the editable install of the checkout would otherwise
    # find the one built here.
    broken = device_copy / "spidr_fast" / "_flash_attn.py"
    broken.write_text("raise ImportError('injected: the build made no extension')\n")
    try:
        code, summary = run_check(device_copy, tmp_path, "--only", "import")
    finally:
        broken.unlink()
    assert code == 1
    assert summary[0] == "FAIL: import (eager mode)"
    assert "spidr_fast._flash_attn does not import" in (tmp_path / "check.log").read_text()


def test_a_failing_gpu_test_fails_the_tests_stage(device_copy, tmp_path):
    faults = "-x -p device_check_faults"
    code, summary = run_check(
        device_copy,
        tmp_path,
        "--rehearse",
        "--only",
        "tests",
        PYTEST_ADDOPTS=faults,
        PYTHONPATH=str(device_copy / "faults"),
        DEVICE_CHECK_FAULT="fail",
    )
    assert code == 1
    assert summary[0] == "FAIL: tests (rehearse mode)"
    assert "injected: this GPU test fails" in (tmp_path / "check.log").read_text()


def test_a_stage_killed_at_its_limit_fails_and_the_check_goes_on(device_copy, tmp_path):
    # The rehearsal's tests stage has 400 s; scaled by 0.01 it has 4 s, and its first test hangs.
    code, summary = run_check(
        device_copy,
        tmp_path,
        "--rehearse",
        "--only",
        "tests,sanitizer",
        PYTEST_ADDOPTS="-p device_check_faults",
        PYTHONPATH=str(device_copy / "faults"),
        DEVICE_CHECK_FAULT="hang",
        DEVICE_CHECK_LIMIT_SCALE="0.01",
    )
    assert code == 1
    assert summary[0] == "FAIL: tests (rehearse mode)"
    assert summary[1].startswith("tests: TIMED OUT")
    assert summary[2].startswith("sanitizer: ok")


def test_an_unknown_stage_is_named(device_copy, tmp_path):
    done = subprocess.run(
        ["bash", SCRIPT, "--only", "kernles", str(tmp_path)], cwd=device_copy, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "no stage 'kernles'" in done.stderr
