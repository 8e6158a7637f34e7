"""benchmarks/device_check.sh reports FAIL, never PASS, when a stage cannot do its job: the extension is missing (in
either call), torch or the official package is missing, a GPU test fails, a benchmark variant fails, the sanitizer's
padded or fp16 case fails, or a stage is killed at its time limit. Each case runs the real script on a copy of the
tree as the device receives it (no .git, no built extension), with the fault injected from outside. The calls' plans
fit the lease: each call's limits under 560 s, both calls' expected times within 12 minutes with the start."""

import json
import os
import re
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

# Imported at every Python start-up from PYTHONPATH (sitecustomize): DEVICE_CHECK_FAULT picks a module to break
# the moment it is imported: our flash-attention's padded path or its fp16 inputs, or the reference EMA update (one
# benchmark variant among several).
SITE_FAULTS = textwrap.dedent(
    """
    import importlib.abc, importlib.util, os, sys

    FAULT = os.environ.get("DEVICE_CHECK_FAULT", "")

    def break_attention(module):
        import torch

        for name in ("flash_attention_varlen", "flash_attention_padded"):
            def faulty(q, *args, _original=getattr(module, name), _name=name, **kwargs):
                if (FAULT == "padded" and _name == "flash_attention_padded") or (
                    FAULT == "fp16" and q.dtype == torch.float16
                ):
                    raise RuntimeError(f"injected: {FAULT} fails in {_name}")
                return _original(q, *args, **kwargs)

            setattr(module, name, faulty)

    def break_ema_update(module):
        def broken(*args, **kwargs):
            raise RuntimeError("injected: the EMA update fails")

        module._dispatch._registry["codebook_ema_update_"]["reference"] = broken

    TARGETS = {
        "padded": ("spidr_fast.ops.kernels.attention", break_attention),
        "fp16": ("spidr_fast.ops.kernels.attention", break_attention),
        "variant": ("spidr_fast.ops", break_ema_update),
    }

    class Inject(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if FAULT not in TARGETS or fullname != TARGETS[FAULT][0]:
                return None
            sys.meta_path.remove(self)  # once: the module is imported once
            spec = importlib.util.find_spec(fullname)
            execute = spec.loader.exec_module

            def exec_module(module):
                execute(module)
                TARGETS[FAULT][1](module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, Inject())
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
    (copy / "site_faults").mkdir()
    (copy / "site_faults" / "sitecustomize.py").write_text(SITE_FAULTS)
    (copy / "no_torch").mkdir()
    (copy / "no_torch" / "torch.py").write_text("raise ImportError('injected: no torch on this machine')\n")
    return copy


def run_check(copy: Path, results: Path, *args: str, **env: str) -> tuple[int, list[str]]:
    """The check's verdict and summary. Limits are 5x the GPU's unless `env` says otherwise: a busy CPU can take
    20 s to import torch, and a stage killed at its limit would fail for the wrong reason."""
    env = {"DEVICE_CHECK_LIMIT_SCALE": "5", **env}
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
    assert summary[0] == "FAIL: tests (eager mode, rehearsed on a CPU)"
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
    assert summary[0].startswith("FAIL: tests")
    assert summary[1].startswith("tests: TIMED OUT")
    # The next stage ran (the rehearsal's sanitizer runs real cases: at 0.01x its limit it may be killed too).
    assert summary[2].startswith("sanitizer: ") and "=== sanitizer" in (tmp_path / "check.log").read_text()


def test_an_unknown_stage_is_named(device_copy, tmp_path):
    done = subprocess.run(
        ["bash", SCRIPT, "--only", "kernles", str(tmp_path)], cwd=device_copy, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "no stage 'kernles'" in done.stderr


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_a_missing_extension_fails_the_import_stage_of_either_call(device_copy, tmp_path, mode):
    broken = device_copy / "spidr_fast" / "_flash_attn.py"
    broken.write_text("raise ImportError('injected: the build made no extension')\n")
    try:
        code, summary = run_check(
            device_copy, tmp_path, *(["compiled"] if mode == "compiled" else []), "--only", "import"
        )
    finally:
        broken.unlink()
    assert code == 1
    assert summary[0] == f"FAIL: import ({mode} mode)"


def test_the_environment_stage_fails_without_torch(device_copy, tmp_path):
    """Its last command used to be an echo, whose status was the stage's: ok, and a PASS, with no torch at all."""
    code, summary = run_check(device_copy, tmp_path, "--only", "environment", PYTHONPATH=str(device_copy / "no_torch"))
    assert code == 1
    assert summary[0] == "FAIL: environment (eager mode)"
    assert "injected: no torch" in (tmp_path / "check.log").read_text()


def test_a_missing_official_package_fails_the_environment_stage(device_copy, tmp_path):
    """Its rows are the baselines: without it the verdict used to stay PASS, with a note."""
    empty = tmp_path / "no_wheels"
    empty.mkdir()
    results = tmp_path / "results"
    code, summary = run_check(
        device_copy, results, "--only", "environment", WHEELS=str(empty), HOME=str(tmp_path), SPIDR_OFFICIAL_PATH=""
    )
    assert code == 1
    assert summary[0] == "FAIL: environment (eager mode)"
    assert "the official spidr 0.2.0 is not importable" in (results / "check.log").read_text()


@pytest.mark.parametrize("fault", ["padded", "fp16"])
def test_the_sanitizer_runs_the_padded_path_and_fp16(device_copy, tmp_path, fault):
    """The rehearsal runs the sanitizer's cases through the emulator: a fault in either path fails the stage."""
    code, summary = run_check(
        device_copy,
        tmp_path,
        "--rehearse",
        "--only",
        "sanitizer",
        PYTHONPATH=str(device_copy / "site_faults"),
        DEVICE_CHECK_FAULT=fault,
    )
    assert code == 1, summary
    assert summary[0] == "FAIL: sanitizer (eager mode, rehearsed on a CPU)"
    assert f"injected: {fault} fails" in (tmp_path / "check.log").read_text()


def test_one_failed_benchmark_variant_fails_its_stage(device_copy, tmp_path):
    """A stage used to be ok as soon as one row was measured; the failed row now keeps its error and fails it."""
    code, summary = run_check(
        device_copy,
        tmp_path,
        "--rehearse",
        "--only",
        "kernels_compiled",
        PYTHONPATH=str(device_copy / "site_faults"),
        DEVICE_CHECK_FAULT="variant",
    )
    assert code == 1
    assert summary[0] == "FAIL: kernels_compiled (eager mode, rehearsed on a CPU)"
    rows = json.loads((tmp_path / "kernels_compiled.json").read_text())["rows"]
    failed = [row for row in rows if row["error"]]
    assert [(row["case"], row["impl"]) for row in failed] == [("codebook update", "reference compiled")]
    assert "injected: the EMA update fails" in failed[0]["error"]
    assert any(row["ms"] is not None for row in rows)  # the codebook assignment was measured


def _plan(*args: str) -> tuple[dict[str, tuple[int, int]], int, int]:
    done = subprocess.run(["bash", SCRIPT, "--plan", *args], cwd=ROOT, capture_output=True, text=True, check=True)
    *stages, total = done.stdout.strip().splitlines()
    plan = {}
    for line in stages:
        name, expected, limit = re.fullmatch(r"(\w+) expected (\d+) s, limit (\d+) s", line).groups()
        plan[name] = (int(expected), int(limit))
    limits, expected = map(int, re.search(r"limits (\d+) s, expected (\d+) s", total).groups())
    return plan, limits, expected


def test_each_call_fits_its_command_and_both_fit_the_lease():
    eager, eager_limits, eager_expected = _plan()
    compiled, compiled_limits, compiled_expected = _plan("compiled")
    for plan, limits in ((eager, eager_limits), (compiled, compiled_limits)):
        assert limits == sum(limit for _, limit in plan.values()) < 560  # under the 600 s command, with margin
        assert all(limit > expected for expected, limit in plan.values())
    assert eager_expected + compiled_expected + 75 <= 12 * 60  # the machine's start, "a minute or more", included
    assert list(compiled)[-1] == "official_compiled"  # the known failure last, where a cut-off costs least
    assert "profile" in compiled and "kernels_compiled" in eager
