"""Checkpoints that are never lost: written to a temporary file, flushed, then renamed over the target, so a
failed or killed write leaves the previous checkpoint intact; the latest N are kept. A write that cannot fit or
fails is an error naming the folder and the space it needs; a partial file left by a killed write is named and
removed at the next start; a complete file that does not load (a dying disk, a killed copy) is named and renamed
aside to `step_N.pt.corrupt`, so that it never holds a kept slot, and the checkpoint resumed from is never
pruned."""

import dataclasses
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

logger = logging.getLogger(__name__)
_NAME = re.compile(r"^step_(\d+)\.pt$")
_PARTIAL = ".step_*.pt.tmp"  # what atomic_save leaves behind when the process is killed mid-write
_MB = 2**20


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (disk full, read-only folder, ...); the previous one is intact."""


def atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:  # the rename itself survives a power loss only once its folder is synced
            os.fsync(directory)
        finally:
            os.close(directory)
    finally:
        tmp.unlink(missing_ok=True)


def _tensor_bytes(obj: Any) -> int:
    """The bytes of every tensor in a nested state: about what torch.save writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints of a run folder, oldest first."""
    found = [(int(m.group(1)), p) for p in folder.glob("step_*.pt") if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(
    folder: Path,
    step: int,
    state: dict[str, Any],
    keep_latest: int,
    *,
    keep: Path | None = None,
    unreadable: frozenset[Path] = frozenset(),
) -> Path:
    """Writes the checkpoint, then deletes all but the latest `keep_latest` (-1: none), never `keep` (the one a
    run resumed from: the only one known to load) and never an `unreadable` one (it holds no slot; it is left for
    inspection). Raises CheckpointWriteError, naming the folder and the space needed, before writing when the disk
    cannot hold the checkpoint, or when the write fails."""
    path = folder / f"step_{step:08d}.pt"
    needed = _tensor_bytes(state) + _MB  # the pickled structure around the tensors is small
    try:
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
        if free < needed:
            raise OSError(f"not enough space: {free / _MB:.1f} MB free")
        atomic_save(state, path)
    except OSError as error:
        previous = checkpoints(folder) if folder.is_dir() else []
        raise CheckpointWriteError(
            f"cannot write checkpoint {path.name} to {folder} ({error}); it needs about {needed / _MB:.1f} MB. "
            f"The previous checkpoint {'is intact: ' + str(previous[-1]) if previous else 'does not exist'}"
        ) from error
    if keep_latest > 0:
        for old in [p for p in checkpoints(folder) if p not in unreadable][:-keep_latest]:
            if old != keep:
                old.unlink(missing_ok=True)
    return path


class Resumed(NamedTuple):
    """What `find_latest` found: the newest checkpoint that loads (None: none does) and the newer ones that
    did not."""

    path: Path | None
    state: dict[str, Any] | None
    unreadable: frozenset[Path]


def find_latest(folder: Path, *, set_aside: bool = True) -> Resumed:
    """The newest checkpoint that loads. A partial write left by a killed process is named and removed; a newer
    complete one that does not load is named and, with `set_aside` (only one rank of a run may rename), renamed
    to `step_N.pt.corrupt`: kept for inspection, out of the way of resuming and pruning."""
    for partial in folder.glob(_PARTIAL):
        logger.warning("removing %s, a checkpoint write that did not complete", partial)
        partial.unlink(missing_ok=True)
    unreadable = set()
    for path in reversed(checkpoints(folder)):
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:  # noqa: BLE001 - any unreadable checkpoint: fall back to the previous one
            unreadable.add(path)
            if set_aside:
                try:
                    path.rename(path.with_name(path.name + ".corrupt"))
                    logger.warning("checkpoint %s is unreadable (%s): renamed to %s.corrupt", path, error, path.name)
                except OSError as rename_error:
                    logger.warning("checkpoint %s is unreadable (%s) and stays (%s)", path, error, rename_error)
            else:
                logger.warning("checkpoint %s is unreadable (%s)", path, error)
            continue
        logger.info("resuming from %s", path)
        return Resumed(path, state, frozenset(unreadable))
    return Resumed(None, None, frozenset(unreadable))


def load_latest(folder: Path) -> dict[str, Any] | None:
    """The state of `find_latest`, if any."""
    return find_latest(folder).state


class Checkpointer:
    """A run's checkpoints, in `folder`: the one to resume from, one every `save_interval` steps and one at the
    end, the latest `keep_latest` kept. Only the main rank writes (`enabled`); every rank resumes."""

    def __init__(self, folder: Path, save_interval: int, keep_latest: int, enabled: bool) -> None:
        self.folder, self.save_interval, self.keep_latest, self.enabled = folder, save_interval, keep_latest, enabled
        self.resumed_from: Path | None = None
        self.unreadable: frozenset[Path] = frozenset()

    def load_latest(self) -> dict[str, Any] | None:
        """The newest state that loads; the unreadable ones are set aside by the writing rank only."""
        self.resumed_from, state, self.unreadable = find_latest(self.folder, set_aside=self.enabled)
        return state

    def latest(self) -> Path | None:
        """The newest complete checkpoint, if any."""
        found = checkpoints(self.folder)
        return found[-1] if found else None

    def save(self, step: int, state: Callable[[], dict[str, Any]]) -> Path | None:
        """`state()` gives what to write; the other ranks do not call it."""
        if not self.enabled:
            return None
        return save_checkpoint(
            self.folder, step, state(), self.keep_latest, keep=self.resumed_from, unreadable=self.unreadable
        )

    def save_if_due(self, step: int, state: Callable[[], dict[str, Any]]) -> None:
        if step % self.save_interval == 0:
            self.save(step, state)


def export_state_dict(model: torch.nn.Module, model_config: Any, folder: Path) -> Path:
    """`model.pt` ({"model": state dict}) and `config.json` ({"model": fields}): what the official
    `spidr.models.build_model(model_type=..., checkpoint=...)` and ours load."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.pt"
    atomic_save({"model": model.state_dict()}, path)
    (folder / "config.json").write_text(json.dumps({"model": dataclasses.asdict(model_config)}, indent=2))
    return path
