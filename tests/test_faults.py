"""Faults as a cluster delivers them, on real training processes: preemption signals sent to the whole process
group (DataLoader workers included) at every moment of a run, SIGKILL mid-write, a full or read-only disk, a dead
DDP rank, and bad audio files. Each test checks that nothing is lost: the run exits as documented, its latest
checkpoint is its last finished step, and finishing it gives what an uninterrupted run gives."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from helpers import tiny_cli_args

import spidr_fast
from spidr_fast.data.synthetic import SyntheticCorpus
from spidr_fast.preemption import STOPPED_STATUS, requeue_slurm_job
from spidr_fast.train import checkpoint
from spidr_fast.train.loop import _carry_position_over

HARNESS = Path(__file__).with_name("fault_harness.py")
# Every run of this module imports the package from one copy of it (see `frozen_code`).
FROZEN_CODE: Path | None = None
MAX_STEPS = 8
# Two loader workers, as in a real run: they receive the process group's signals too. Small batches and one
# validation utterance: a step and a validation take a fraction of a second.
RUN_FLAGS = (
    f"--set=optimizer.max_steps={MAX_STEPS}",
    "--set=data.num_workers=2",
    "--set=run.validate_interval=2",
    "--set=data.max_sample_size=16000",
    "--set=data.max_batch_length=32000",
    "--set=validation.synthetic.synthetic_utterances=1",
)
SLOW_SECONDS = 1.5  # a slow phase of the harness: long enough to land a signal in it


@pytest.fixture(scope="module", autouse=True)
def frozen_code(tmp_path_factory) -> Path:
    """A copy of the package and the harness, which every run of this module imports. The runs that a test
    compares start minutes apart, each importing the source as it is then: in a working tree being edited (several
    engineers, an editor's save), one edit that changes an op's rounding made the resumed runs of the preemption
    test differ from the uninterrupted one, first at the step after the first optimizer update (AdamW's first
    steps turn a rounding difference in a near-zero gradient into a whole update): the test's one failure, a
    5.6e-6 relative difference at step 2. The runs themselves are bitwise reproducible, under load too."""
    global FROZEN_CODE
    FROZEN_CODE = tmp_path_factory.mktemp("code")
    package = Path(spidr_fast.__file__).parent
    shutil.copytree(package, FROZEN_CODE / package.name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(HARNESS, FROZEN_CODE)
    return FROZEN_CODE


def launch(
    run_dir: Path,
    *extra: str,
    harness: tuple[str, Path] | None = None,
    env: dict | None = None,
    prefix: tuple[str, ...] = (),
    log: Path | None = None,
    slow_seconds: float = SLOW_SECONDS,
) -> subprocess.Popen:
    """The training CLI in its own process group (as under SLURM or torchrun), its output appended to `log`
    (default run_dir.log); `harness`: (phase, events folder) to make that phase `slow_seconds` slow; `prefix`: a
    command that runs it."""
    entry = (
        ["-m", "spidr_fast.train"]
        if harness is None
        else [str(FROZEN_CODE / HARNESS.name), harness[0], str(slow_seconds), str(harness[1])]
    )
    command = [*prefix, sys.executable, *entry, *tiny_cli_args(run_dir, *RUN_FLAGS, *extra)]
    with (log or run_dir.with_suffix(".log")).open("ab") as output:
        return subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True, **frozen_environment(env)
        )


def frozen_environment(env: dict | None = None) -> dict:
    """Popen's `env` and `cwd` for a process that imports the frozen copy: first on the path, and run from it
    (`-m` puts the current folder first)."""
    path = os.pathsep.join(filter(None, [str(FROZEN_CODE), os.environ.get("PYTHONPATH")]))
    return {"env": {**os.environ, "PYTHONPATH": path, **(env or {})}, "cwd": FROZEN_CODE}


def test_every_run_imports_the_frozen_copy_of_the_package():
    done = subprocess.run(
        [sys.executable, "-c", "import spidr_fast; print(spidr_fast.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        **frozen_environment(),
    )
    assert Path(done.stdout.strip()) == FROZEN_CODE / "spidr_fast" / "__init__.py"


def wait_until(condition, process: subprocess.Popen, timeout: float = 120.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run exited ({process.returncode}) before the moment to interrupt it"
        assert time.monotonic() < deadline, "timed out waiting for the moment to interrupt the run"
        time.sleep(0.05)


def finish(process: subprocess.Popen, timeout: float = 180.0) -> int:
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise


def train_records(run_dir: Path) -> dict[int, dict]:
    """The last train record of every step (a step re-run after a SIGKILL is logged twice), from the complete
    lines of a log that may be being written."""
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().split("\n")[:-1]] if path.exists() else []
    return {r["step"]: r for r in records if r["split"] == "train"}


def latest_step(run_dir: Path) -> int:
    """The step of the newest complete checkpoint, read without touching the folder (as a restart would)."""
    return torch.load(checkpoint.checkpoints(run_dir / "checkpoints")[-1], weights_only=False)["step"]


def assert_checkpoint_of_the_last_finished_step(run_dir: Path) -> None:
    assert not list((run_dir / "checkpoints").glob(".*.tmp")), "a partial checkpoint was left behind"
    assert latest_step(run_dir) == max(train_records(run_dir))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """A run of the frozen code, as every run it is compared to (not this process, which imported the package
    earlier)."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert finish(launch(run_dir)) == 0, run_dir.with_suffix(".log").read_text()
    return run_dir


def assert_equals_uninterrupted(run_dir: Path, uninterrupted: Path) -> None:
    """Same loss at every step, same final weights, codebooks, teacher and optimizer state."""
    ours, reference = train_records(run_dir), train_records(uninterrupted)
    assert sorted(ours) == sorted(reference) == list(range(1, MAX_STEPS + 1))
    for step, record in reference.items():
        assert ours[step]["loss"] == pytest.approx(record["loss"], rel=1e-6), f"step {step}"
    final, expected = (checkpoint.load_latest(d / "checkpoints") for d in (run_dir, uninterrupted))
    assert final["step"] == expected["step"] == MAX_STEPS
    for key, value in expected["model"].items():
        torch.testing.assert_close(final["model"][key], value, msg=key)
    torch.testing.assert_close(final["optimizer"]["state"], expected["optimizer"]["state"])


# --- preemption ----------------------------------------------------------------------------------------------------


def fake_scontrol(folder: Path) -> dict[str, str]:
    """The environment of a SLURM job whose `scontrol` only records its arguments in folder/scontrol.log."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {folder / "scontrol.log"}\n')
    script.chmod(0o755)
    return {"SLURM_JOB_ID": "4242", "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


def test_preemption_of_the_whole_process_group_at_every_moment_loses_nothing(tmp_path, uninterrupted):
    """SIGTERM or SIGUSR1 to the process group during start-up, mid-step (as a SLURM job), during a checkpoint
    write (then a second SIGTERM during it) and during validation: each time exit STOPPED_STATUS (75, never 0:
    the run is not finished) with a checkpoint of the last finished step, and the SLURM job requeued; the run
    finished by restarts equals an uninterrupted one. Before: the workers died first and the run exited 1 from
    inside the forward pass, without a checkpoint; later it exited 0, as a finished run, and was not requeued."""
    run_dir, events, slurm = tmp_path / "run", tmp_path / "events", tmp_path / "slurm"
    log = run_dir.with_suffix(".log")

    process = launch(run_dir)  # start-up: the signal lands while torch is being imported
    time.sleep(1.0)
    os.killpg(process.pid, signal.SIGTERM)
    assert finish(process) == STOPPED_STATUS, log.read_text()
    assert_checkpoint_of_the_last_finished_step(run_dir)
    assert latest_step(run_dir) == 1  # the step in progress finishes, then the run stops

    process = launch(run_dir, env=fake_scontrol(slurm))  # mid-step, once the resumed run has trained a step
    wait_until(lambda: max(train_records(run_dir)) >= 2, process)
    os.killpg(process.pid, signal.SIGUSR1)
    assert finish(process) == STOPPED_STATUS, log.read_text()
    assert_checkpoint_of_the_last_finished_step(run_dir)
    assert (slurm / "scontrol.log").read_text() == "requeue 4242\n"
    assert "requeued SLURM job 4242" in log.read_text()

    process = launch(run_dir, harness=("save", events))  # during a checkpoint write, twice
    wait_until(lambda: any(events.glob("save-*")), process)
    os.killpg(process.pid, signal.SIGTERM)
    time.sleep(SLOW_SECONDS / 3)
    os.killpg(process.pid, signal.SIGTERM)
    assert finish(process) == STOPPED_STATUS, log.read_text()
    assert_checkpoint_of_the_last_finished_step(run_dir)
    assert "received SIGTERM again" in log.read_text()

    process = launch(run_dir, harness=("validation", events))
    wait_until(lambda: any(events.glob("validation-*")), process)
    os.killpg(process.pid, signal.SIGTERM)
    assert finish(process) == STOPPED_STATUS, log.read_text()
    assert_checkpoint_of_the_last_finished_step(run_dir)
    assert "validation [synthetic] interrupted by SIGTERM" in log.read_text()
    assert latest_step(run_dir) < MAX_STEPS, "too late: the run ended before it could be interrupted"

    assert finish(launch(run_dir)) == 0, log.read_text()
    assert_equals_uninterrupted(run_dir, uninterrupted)


def test_a_slurm_job_requeues_itself_by_its_own_or_its_array_tasks_id(tmp_path, monkeypatch, caplog):
    for name, value in fake_scontrol(tmp_path).items():
        monkeypatch.setenv(name, value)
    requeue_slurm_job()
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4200")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    requeue_slurm_job()
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\nrequeue 4200_7\n"
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    requeue_slurm_job()  # no scontrol: logged, not raised; the checkpoint is written either way
    assert "could not requeue SLURM job 4200_7" in caplog.text
    monkeypatch.delenv("SLURM_JOB_ID")
    requeue_slurm_job()  # not under SLURM: nothing to do
    assert (tmp_path / "scontrol.log").read_text().count("requeue") == 2


@pytest.mark.slow
def test_preemption_during_compilation_checkpoints_the_compiled_step(tmp_path):
    """--compile, SIGTERM to the process group while inductor compiles the first step (its compile workers are in
    the group too): the compilation and the step finish, a checkpoint is written, exit STOPPED_STATUS. About 1-2
    minutes on 2 CPU cores, most of it compiling."""
    run_dir = tmp_path / "run"
    process = launch(run_dir, "--compile")
    time.sleep(20.0)  # imports take a few seconds, the first compiled step more than a minute
    assert not train_records(run_dir), "the first step finished before the signal: not during compilation"
    os.killpg(process.pid, signal.SIGTERM)
    assert finish(process, timeout=600) == STOPPED_STATUS, run_dir.with_suffix(".log").read_text()
    assert_checkpoint_of_the_last_finished_step(run_dir)


def test_sigkill_mid_write_resumes_from_the_previous_checkpoint(tmp_path, uninterrupted):
    """SIGKILL to the process group halfway through a checkpoint write: the partial file is ignored, named and
    removed at restart, which resumes from the previous complete checkpoint and ends as an uninterrupted run."""
    run_dir, events = tmp_path / "run", tmp_path / "events"
    log = run_dir.with_suffix(".log")
    process = launch(run_dir, harness=("save", events))
    wait_until(lambda: len(list(events.glob("save-*"))) >= 2, process)  # the second write: one complete before it
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(60)
    (partial,) = (run_dir / "checkpoints").glob(".step_*.pt.tmp")
    assert latest_step(run_dir) == 2
    assert finish(launch(run_dir)) == 0, log.read_text()
    assert f"removing {partial}, a checkpoint write that did not complete" in log.read_text()
    assert_equals_uninterrupted(run_dir, uninterrupted)


# --- the disk ------------------------------------------------------------------------------------------------------


def _can_mount_in_a_user_namespace() -> bool:
    if shutil.which("unshare") is None:
        return False
    return (
        subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "none", "/mnt"], capture_output=True).returncode == 0
    )


needs_mounts = pytest.mark.skipif(
    not _can_mount_in_a_user_namespace(),
    reason="needs unshare -rm (user namespaces) to mount a small or read-only folder",
)


def in_a_mount_namespace(script: str) -> tuple[str, ...]:
    """A command prefix: `script` runs as root of a private mount namespace, then runs the command ("$@")."""
    return ("unshare", "-rm", "sh", "-c", script, "sh")


@needs_mounts
def test_a_full_disk_is_an_error_naming_the_folder_and_the_space_needed(tmp_path):
    """The run folder on a 4.3 MB filesystem: the first checkpoint (2.7 MB) fits, the second does not. The run
    stops with an error naming the folder and the space needed, and the first checkpoint is intact."""
    run_dir, copy = tmp_path / "run", tmp_path / "copy"
    run_dir.mkdir()
    log = run_dir.with_suffix(".log")
    script = f'mount -t tmpfs -o size=4400k none {run_dir} && "$@"; status=$?; cp -a {run_dir} {copy}; exit $status'
    assert finish(launch(run_dir, prefix=in_a_mount_namespace(script))) == 1, log.read_text()
    error = log.read_text()
    assert f"cannot write checkpoint step_00000004.pt to {run_dir / 'checkpoints'}" in error
    assert "(not enough space: " in error and re.search(r"it needs about 3\.\d MB", error)
    assert f"The previous checkpoint is intact: {run_dir / 'checkpoints' / 'step_00000002.pt'}" in error
    assert [p.name for p in (copy / "checkpoints").iterdir()] == ["step_00000002.pt"]
    assert checkpoint.load_latest(copy / "checkpoints")["step"] == 2


@needs_mounts
def test_a_read_only_checkpoint_folder_is_an_error_naming_it(tmp_path):
    """The checkpoint folder turns read-only (a remount, a quota): the next save is an error naming the folder;
    the previous checkpoint is intact."""
    run_dir = tmp_path / "run"
    log = run_dir.with_suffix(".log")
    assert finish(launch(run_dir, "--set=optimizer.max_steps=2", "--set=run.validate_interval=0")) == 0
    folder = run_dir / "checkpoints"
    script = f'mount --bind {folder} {folder} && mount -o remount,ro,bind {folder} && "$@"'
    assert finish(launch(run_dir, prefix=in_a_mount_namespace(script))) == 1, log.read_text()
    assert f"cannot write checkpoint step_00000004.pt to {folder} ([Errno 30] Read-only file system" in log.read_text()
    assert [p.name for p in folder.iterdir()] == ["step_00000002.pt"]
    assert checkpoint.load_latest(folder)["step"] == 2


# --- distributed ---------------------------------------------------------------------------------------------------


def launch_ranks(run_dir: Path, world_size: int, *extra: str, **options) -> list[subprocess.Popen]:  # noqa: ANN003
    """`world_size` gloo ranks on the CPU, as torchrun starts them, each in its own process group; `options`: those
    of `launch`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [
        launch(
            run_dir,
            "--set=data.num_workers=0",
            *extra,
            **options,
            log=run_dir.parent / f"rank{rank}.log",
            env={
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(world_size),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            },
        )
        for rank in range(world_size)
    ]


def test_a_dead_rank_stops_the_others_with_an_error_and_a_restart_resumes(tmp_path):
    """SIGKILL to rank 1 of 2: rank 0 exits 1 within the collective timeout, saying what happened and where a
    restart resumes; restarting both resumes from the latest checkpoint. Resuming on one rank follows the
    documented rule: everything carries over, the epoch continues after the batches already trained on."""
    run_dir = tmp_path / "run"
    logs = [tmp_path / f"rank{rank}.log" for rank in range(2)]
    timeout = "--set=run.collective_timeout=30"
    ranks = launch_ranks(run_dir, 2, timeout)
    wait_until(lambda: max(train_records(run_dir), default=0) >= 3, ranks[0])
    os.killpg(ranks[1].pid, signal.SIGKILL)
    killed_at = time.monotonic()
    assert finish(ranks[0], timeout=90) == 1, logs[0].read_text()
    assert time.monotonic() - killed_at < 60
    latest = checkpoint.checkpoints(run_dir / "checkpoints")[-1]
    assert "error: rank 0 of 2 stopped (" in logs[0].read_text()
    assert f"Restart every rank to resume from {latest}" in logs[0].read_text()

    ranks = launch_ranks(run_dir, 2, timeout, "--set=optimizer.max_steps=6")
    assert [finish(rank) for rank in ranks] == [0, 0], logs[0].read_text() + logs[1].read_text()
    assert all(f"resuming from {latest}" in log.read_text() for log in logs)
    assert latest_step(run_dir) == 6

    assert finish(launch(run_dir, "--set=optimizer.max_steps=7")) == 0
    assert "resuming a run of 2 ranks on 1" in run_dir.with_suffix(".log").read_text()
    assert latest_step(run_dir) == 7


def test_a_validation_longer_than_the_collective_timeout_does_not_stop_the_other_ranks(tmp_path):
    """2 gloo ranks, run.collective_timeout 8 s, rank 0's first validation 16 s long: rank 1 waits for it outside
    the collective timeout and both finish. Before, rank 1's next all-reduce timed out and the run ended."""
    run_dir = tmp_path / "run"
    flags = ("--set=run.collective_timeout=8", "--set=optimizer.max_steps=3")
    ranks = launch_ranks(run_dir, 2, *flags, harness=("validation", tmp_path / "events"), slow_seconds=16.0)
    statuses = [finish(rank) for rank in ranks]
    assert statuses == [0, 0], "".join((tmp_path / f"rank{rank}.log").read_text() for rank in range(2))
    assert sorted(train_records(run_dir)) == [1, 2, 3]


def test_world_size_change_keeps_the_global_count_of_batches_trained_on():
    for saved, position, now, expected in ((2, 6, 1, 12), (1, 12, 2, 6), (2, 5, 3, 3), (4, 4, 4, 4)):
        state = {"world_size": saved, "position": position, "epoch": 1}
        _carry_position_over(state, now)
        assert state["position"] == expected, (saved, position, now)


# --- audio ---------------------------------------------------------------------------------------------------------


def test_bad_audio_files_are_skipped_named_and_counted_and_the_run_goes_on(tmp_path):
    """Among good files: truncated, zero-length, header-only, NaN-filled, missing, 8 kHz and stereo files, read by
    two loader workers. Each is skipped and named, counted in the metrics, and the run trains to its end (a wrong
    rate or channel count used to stop it with an exception; a NaN file made a non-finite step)."""
    manifest = SyntheticCorpus(num_utterances=6, min_seconds=1.0, max_seconds=1.5).write(tmp_path / "corpus")
    wav = tmp_path / "corpus" / "wav"
    good = soundfile.read(wav / "utt00000.wav", dtype="float32")[0]
    soundfile.write(wav / "truncated.wav", good, 16_000, subtype="PCM_16")
    (wav / "truncated.wav").write_bytes((wav / "truncated.wav").read_bytes()[:2_044])  # 1,000 samples of 16,000+
    (wav / "zero_length.wav").write_bytes(b"")
    soundfile.write(wav / "header_only.wav", np.zeros(0, dtype=np.float32), 16_000)
    soundfile.write(wav / "nan.wav", np.full(len(good), np.nan, dtype=np.float32), 16_000, subtype="FLOAT")
    soundfile.write(wav / "rate_8k.wav", good, 8_000)
    soundfile.write(wav / "stereo.wav", np.stack([good, good], axis=1), 16_000)
    bad = ["truncated", "zero_length", "header_only", "nan", "missing", "rate_8k", "stereo"]
    with manifest.open("a") as f:
        f.writelines(f"wav/{name}.wav\t{len(good)}\n" for name in bad)
    run_dir = tmp_path / "run"
    # Every file in one batch, so that each step reads each file once.
    process = launch(
        run_dir,
        "--manifest",
        str(manifest),
        "--set=optimizer.max_steps=2",
        "--set=run.validate_interval=0",
        "--set=data.max_batch_length=1000000",
        "--set=data.num_buckets=1",
    )
    log = run_dir.with_suffix(".log")
    assert finish(process) == 0, log.read_text()
    for name in bad:
        assert f"skipping unusable audio {wav / name}.wav" in log.read_text(), name
    assert [r["skipped_files"] for r in train_records(run_dir).values()] == [len(bad), 2 * len(bad)]
    assert "non-finite" not in log.read_text().replace("non-finite samples", "")


def test_a_loader_worker_killed_by_its_decoder_names_the_file_and_the_run_goes_on(tmp_path):
    """A file whose decoding kills the worker every time (SIGSEGV, as a crashing native decoder), and one that
    kills it once (SIGKILL, as the OOM killer): the run names both and restarts the loader at the batch it was
    making; the first is excluded after its second death, listed in the metrics with the reason, the second is
    trained on; the run trains to its end. Before, the worker's death was raised in the main process wherever it
    was, and the run exited 1; later, a single death excluded the file, whatever had killed the worker."""
    manifest = SyntheticCorpus(num_utterances=6, min_seconds=1.0, max_seconds=1.5).write(tmp_path / "corpus")
    wav = tmp_path / "corpus" / "wav"
    for name in ("crash", "flaky"):
        shutil.copy(wav / "utt00000.wav", wav / f"{name}.wav")
        with manifest.open("a") as f:
            f.write(f"wav/{name}.wav\t{soundfile.info(wav / f'{name}.wav').frames}\n")
    run_dir = tmp_path / "run"
    process = launch(
        run_dir,
        "--manifest",
        str(manifest),
        "--set=optimizer.max_steps=3",
        "--set=run.validate_interval=0",
        "--set=data.max_batch_length=1000000",
        "--set=data.num_buckets=1",
        harness=("decoder-crash", tmp_path / "events"),
    )
    log = run_dir.with_suffix(".log")
    assert finish(process) == 0, log.read_text()
    text = log.read_text()
    assert f"a loader worker died decoding {wav / 'flaky.wav'} (death 1): retrying it once" in text
    assert f"{wav / 'flaky.wav'} (death 2)" not in text
    assert f"a loader worker died decoding {wav / 'crash.wav'} (death 1): retrying it once" in text
    assert f"a loader worker died decoding {wav / 'crash.wav'} (death 2): skipping that file from now on" in text
    assert [r["skipped_files"] for r in train_records(run_dir).values()] == [1, 2, 3]  # one batch per epoch
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    excluded = [(r["file"], r["reason"]) for r in records if r["split"] == "excluded"]
    assert excluded == [(str(wav / "crash.wav"), "its decoding killed a loader worker 2 times")]
    assert f"excluded: {wav / 'crash.wav'} (its decoding killed a loader worker 2 times)" in text
