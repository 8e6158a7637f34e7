"""The training CLI with one phase made slow or faulty, so that a test can signal or kill the process group in the
middle of it: `python tests/fault_harness.py PHASE SECONDS EVENTS_DIR CLI_ARGS...`, PHASE "save" (each checkpoint
write stops halfway through the file for SECONDS: a slow disk), "validation" (the first validation starts SECONDS
late)
or "decoder-crash" (decoding a file whose name contains "crash" kills the loader worker with SIGSEGV, as a
crashing native decoder does; one whose name contains "flaky" kills it the first time only, as the OOM killer
does). Each slow phase first creates EVENTS_DIR/<PHASE>-<n>, which the test waits for."""

import io
import itertools
import os
import signal
import sys
import time
from pathlib import Path

import torch

from spidr_fast.data.loading import AudioSource
from spidr_fast.train import validation
from spidr_fast.train.__main__ import main


def run_with_a_slow_phase(phase: str, seconds: float, events: Path, argv: list[str]) -> int:
    events.mkdir(parents=True, exist_ok=True)
    count = itertools.count()

    def announce() -> None:
        (events / f"{phase}-{next(count)}").touch()

    if phase == "save":
        save = torch.save

        def slow_save(obj, f, *args, **kwargs):  # noqa: ANN001, ANN202 - torch.save's signature
            buffer = io.BytesIO()
            save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            announce()
            time.sleep(seconds)
            f.write(data[len(data) // 2 :])

        torch.save = slow_save
    elif phase == "validation":
        validate = validation.validate

        def slow_validate(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            if not any(events.glob("validation-*")):
                announce()
                time.sleep(seconds)
            return validate(*args, **kwargs)

        validation.validate = slow_validate
    elif phase == "decoder-crash":
        load = AudioSource.load

        def crashing_load(self: AudioSource, index: int, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            if "crash" in self.name(index):
                os.kill(os.getpid(), signal.SIGSEGV)
            if "flaky" in self.name(index) and not (events / "flaky-killed").exists():
                (events / "flaky-killed").touch()
                os.kill(os.getpid(), signal.SIGKILL)
            return load(self, index, *args, **kwargs)

        AudioSource.load = crashing_load
    else:
        raise ValueError(f"PHASE must be 'save', 'validation' or 'decoder-crash', got {phase!r}")
    return main(argv)


if __name__ == "__main__":
    sys.exit(run_with_a_slow_phase(sys.argv[1], float(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:]))
