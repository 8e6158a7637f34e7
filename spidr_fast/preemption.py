"""Preemption as clusters deliver it: SLURM (on preemption, `scancel`, the time limit), torchrun and `timeout` send
SIGTERM or SIGUSR1 to the whole process group, data-loading workers included. The main process owns shutdown:
the signal only sets a flag that the training loop reads at a step boundary, and the workers ignore it, since one
that died would take the step in progress, and the checkpoint after it, with it.

Imports nothing heavy, so that the CLI can catch a signal from its first instruction."""

import logging
import os
import signal
import subprocess
from typing import Any

logger = logging.getLogger(__name__)
SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# The exit status of a run stopped before its end with its checkpoint written (EX_TEMPFAIL: "try again"), never 0,
# so that a SLURM `afterok` dependency or a pipeline does not take it for a finished run.
STOPPED_STATUS = 75


class Preemption:
    """While entered (re-entrantly), SIGTERM and SIGUSR1 only set `requested`: the training loop finishes the
    step in progress (with several ranks, the next one, whose all-reduce carries the vote), checkpoints it and
    returns, and validation stops early. A second signal is logged and changes nothing, so a checkpoint being
    written completes."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        self._depth = 0

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            logger.warning("received %s again: still finishing the last step and its checkpoint", name)
        else:
            logger.warning("received %s: checkpointing after the step in progress, then exiting", name)
        self.signal_name = name

    def __enter__(self) -> "Preemption":
        if self._depth == 0:
            self._previous = {s: signal.signal(s, self._handle) for s in SHUTDOWN_SIGNALS}
        self._depth += 1
        return self

    def __exit__(self, *_exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            for s, handler in self._previous.items():
                signal.signal(s, handler)


def leave_shutdown_to_the_main_process(_worker_id: int) -> None:
    """A DataLoader `worker_init_fn`: the worker ignores the signals the main process handles."""
    for signum in SHUTDOWN_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def requeue_slurm_job() -> None:
    """Under SLURM (SLURM_JOB_ID set), put this job back in the queue, as submitit does: a run stopped by the
    time limit's `--signal=USR1@120` or by preemption resumes from its checkpoint when the job starts again.
    A failure is logged, not raised: the checkpoint is written either way."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return
    if "SLURM_ARRAY_JOB_ID" in os.environ:  # an array task is requeued by its own id
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        logger.warning("could not requeue SLURM job %s (%s): submit it again to resume", job, error)
        return
    if done.returncode:
        logger.warning(
            "could not requeue SLURM job %s (scontrol: %s): submit it again to resume", job, done.stderr.strip()
        )
    else:
        logger.info("requeued SLURM job %s: it resumes from its checkpoint when it starts again", job)
