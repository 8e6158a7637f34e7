"""What a run reports: the metrics log (JSON lines, TensorBoard, wandb) and, in training, the progress bar and the
metrics of each log interval."""

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import Tensor

from spidr_fast.train.config import TrainConfig

logger = logging.getLogger(__name__)
# What `Trainer.train_step` returns that the interval sums.
INTERVAL_SUMS = ("loss_sum", "frames", "target_ppl", "pred_ppl", "grad_norm")


class MetricsLog:
    """JSON lines always; TensorBoard and wandb when asked for and installed."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.sinks: list[Any] = []
        if not enabled:
            return
        self.path = run_dir / "metrics.jsonl"
        if "tensorboard" in cfg.run.loggers:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.sinks.append(SummaryWriter(str(run_dir / "tensorboard")))
            except ImportError:
                logger.warning("run.loggers asks for tensorboard, which is not installed")
        if "wandb" in cfg.run.loggers:
            try:
                import wandb

                self.sinks.append(
                    wandb.init(
                        project=cfg.run.wandb_project,
                        name=cfg.run.wandb_name,
                        mode=cfg.run.wandb_mode,
                        dir=str(run_dir),
                        config=dataclasses.asdict(cfg),
                        resume="allow",
                    )
                )
            except ImportError:
                logger.warning("run.loggers asks for wandb, which is not installed")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        for sink in self.sinks:
            scalars = {f"{record['split']}/{k}": v for k, v in record.items() if isinstance(v, int | float)}
            if hasattr(sink, "add_scalar"):
                for key, value in scalars.items():
                    sink.add_scalar(key, value, step)
            else:
                sink.log(scalars, step=step)


class TrainingMetrics:
    """The metrics of each log interval: summed on the device step after step, read (a host sync) and written
    every `log_interval` steps and at the last one, and shown on the progress bar, which lives while `shown`."""

    def __init__(self, log: MetricsLog, log_interval: int, max_steps: int, progress: bool) -> None:
        self.log, self.log_interval, self.max_steps, self.progress = log, log_interval, max_steps, progress
        self.last_record: dict[str, Any] = {}
        self._interval: dict[str, Tensor] = {}
        self._interval_steps, self._interval_start, self._bar = 0, time.perf_counter(), None

    @contextlib.contextmanager
    def shown(self, step: int) -> Iterator["TrainingMetrics"]:
        """The progress bar from `step`; the first interval starts now."""
        from tqdm import tqdm

        self._interval_start = time.perf_counter()
        self._bar = tqdm(
            total=self.max_steps,
            initial=step,
            disable=not (self.log.enabled and self.progress),
            desc="training",
            unit="step",
            dynamic_ncols=True,
        )
        try:
            yield self
        finally:
            self._bar.close()

    def step_applied(self, totals: dict[str, Tensor], *, step: int, epoch: int, lr: float, skipped_files: int) -> None:
        self._bar.update()
        for key in INTERVAL_SUMS:
            self._interval[key] = self._interval.get(key, 0) + totals[key]
        self._interval_steps += 1
        if step % self.log_interval and step != self.max_steps:
            return
        interval, steps = self._interval, self._interval_steps
        seconds = time.perf_counter() - self._interval_start
        self.last_record = {
            "split": "train",
            "step": step,
            "epoch": epoch,
            "loss": float(interval["loss_sum"] / interval["frames"]),
            "target_ppl": float(interval["target_ppl"]) / steps,
            "pred_ppl": float(interval["pred_ppl"]) / steps,
            "grad_norm": float(interval["grad_norm"]) / steps,
            "lr": lr,
            "ema_decay": float(totals["ema_decay"]),
            "steps_per_s": steps / max(seconds, 1e-9),
            "skipped_files": skipped_files,
        }
        self.log.write(self.last_record)
        record = self.last_record
        self._bar.set_postfix(
            loss=f"{record['loss']:.3f}", target_ppl=f"{record['target_ppl']:.1f}", pred_ppl=f"{record['pred_ppl']:.1f}"
        )
        self._interval, self._interval_steps, self._interval_start = {}, 0, time.perf_counter()


def flatten(results: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested results → {"a/b": finite number}, what a metrics log takes."""
    flat = {}
    for key, value in results.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}/")
        elif isinstance(value, int | float) and math.isfinite(value):
            flat[f"{prefix}{key}"] = value
    return flat
