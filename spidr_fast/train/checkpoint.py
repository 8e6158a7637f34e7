"""Checkpoints that are never lost: written to a temporary file, flushed, then renamed over the target, so a
failed or killed write leaves the previous checkpoint intact; the latest N are kept."""

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)
_NAME = re.compile(r"^step_(\d+)\.pt$")


def atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints of a run folder, oldest first."""
    found = [(int(m.group(1)), p) for p in folder.glob("step_*.pt") if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(folder: Path, step: int, state: dict[str, Any], keep_latest: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:08d}.pt"
    atomic_save(state, path)
    if keep_latest > 0:
        for old in checkpoints(folder)[:-keep_latest]:
            old.unlink(missing_ok=True)
    return path


def load_latest(folder: Path) -> dict[str, Any] | None:
    """The newest checkpoint that loads; a corrupt one is reported and the one before it is used."""
    for path in reversed(checkpoints(folder)):
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:  # noqa: BLE001 - any unreadable checkpoint: fall back to the previous one
            logger.warning("checkpoint %s is unreadable (%s); trying the previous one", path, error)
            continue
        logger.info("resuming from %s", path)
        return state
    return None


def export_state_dict(model: torch.nn.Module, model_config: Any, folder: Path) -> Path:
    """`model.pt` ({"model": state dict}) and `config.json` ({"model": fields}): what the official
    `spidr.models.build_model(model_type=..., checkpoint=...)` and ours load."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.pt"
    atomic_save({"model": model.state_dict()}, path)
    (folder / "config.json").write_text(json.dumps({"model": dataclasses.asdict(model_config)}, indent=2))
    return path
