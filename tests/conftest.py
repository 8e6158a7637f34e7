"""Shared fixtures: tiny model configs, and the official spidr 0.2.0 package for parity tests.

The official wheel requires Python >= 3.12 but is pure Python and runs on 3.11, so it is not a dependency:
it is downloaded once into a cache folder and put on sys.path. Offline, parity tests skip, except under CI
(CI=true), where they fail so that a green run always includes them.
"""

import importlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter, which must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

OFFICIAL_VERSION = "0.2.0"
OFFICIAL_CACHE = Path(os.environ.get("SPIDR_OFFICIAL_CACHE", Path.home() / ".cache" / "spidr_fast" / "official"))


def _fetch_official() -> Path:
    target = OFFICIAL_CACHE / OFFICIAL_VERSION
    if not (target / "spidr" / "models" / "__init__.py").is_file():
        wheels = target / "wheel"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                f"spidr=={OFFICIAL_VERSION}",
                "--no-deps",
                "--only-binary=:all:",
                "--python-version",
                "3.12",
                "-d",
                str(wheels),
                "-q",
            ],
            check=True,
            capture_output=True,
            timeout=300,
        )
        with zipfile.ZipFile(next(wheels.glob("spidr-*.whl"))) as wheel:
            wheel.extractall(target)
    return target


@pytest.fixture(scope="session")
def official():
    """The official `spidr.models` module."""
    try:
        return importlib.import_module("spidr.models")
    except ImportError:
        pass
    try:
        sys.path.insert(0, str(_fetch_official()))
        return importlib.import_module("spidr.models")
    except Exception as error:  # noqa: BLE001 - any failure to fetch means "no official package here"
        message = f"official spidr {OFFICIAL_VERSION} unavailable: {error}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under SPIDR_FAST_REQUIRE_GPU=1 (benchmarks/device_check.sh), a `gpu` test that skips is a failure: a missing
    device or extension must not pass as green."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("SPIDR_FAST_REQUIRE_GPU") == "1" and item.get_closest_marker("gpu"):
        report.outcome = "failed"
        report.longrepr = f"SPIDR_FAST_REQUIRE_GPU=1 but this gpu test skipped: {report.longrepr}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def triton_device():
    """Force the Triton backend of every op for one test (compiled on a GPU, interpreted on CPU); the device."""
    pytest.importorskip("triton")
    from spidr_fast import ops

    ops.set_backend("triton")
    yield torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ops.set_backend(None)


@pytest.fixture(scope="session")
def flash_emulator():
    """The CPU emulator build of csrc/ (same kernel code as the CUDA build), built once per cache."""
    from spidr_fast import build_extension

    try:
        path, _ = build_extension.build(emulate=True)
    except (FileNotFoundError, RuntimeError) as error:  # no cmake, ninja or compiler here
        if os.environ.get("CI"):
            pytest.fail(f"the flash-attention emulator does not build: {error}")
        pytest.skip(f"the flash-attention emulator does not build: {error}")
    return build_extension.load(path)


@pytest.fixture
def emulated_flash(flash_emulator):
    """Run spidr_fast's flash-attention through the emulator, and force the "cuda" backend, for one test."""
    from spidr_fast import ops
    from spidr_fast.ops.kernels import attention as attention_kernel

    previous_module, previous_backend = attention_kernel.use_extension(flash_emulator), ops.forced_backend()
    ops.set_backend("cuda")
    yield flash_emulator
    attention_kernel.use_extension(previous_module)
    ops.set_backend(previous_backend)
