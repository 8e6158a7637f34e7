"""The training loop: DDP, autocast, gradient accumulation, the teacher and codebook updates, checkpoints,
validation, and faults that lose nothing (unreadable audio, non-finite steps, preemption, failed writes).

One optimizer step, on every rank:
    micro-batches → forward (codebook statistics returned, not applied) → backward (DDP syncs on the last)
    → one check of the loss and gradient norm (the step's only host sync) → skip the whole step if non-finite
    → optimizer, then the codebook EMA from the summed statistics (one all-reduce), then the teacher EMA.
"""

import contextlib
import dataclasses
import json
import logging
import math
import signal
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from spidr_fast.data.loading import Batch, build_loader
from spidr_fast.models import build_model
from spidr_fast.models.components import num_frames
from spidr_fast.preemption import Preemption
from spidr_fast.train import checkpoint
from spidr_fast.train.config import TrainConfig
from spidr_fast.train.distributed import Context
from spidr_fast.train.optim import build_optimizer
from spidr_fast.train.validation import validate

logger = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row."""


def _nvtx(name: str) -> contextlib.AbstractContextManager:
    """An NVTX range for Nsight on a GPU; nothing on a CPU."""
    if torch.cuda.is_available():
        import nvtx

        return nvtx.annotate(name)
    return contextlib.nullcontext()


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

                self.sinks.append(wandb.init(project=cfg.run.wandb_project, name=cfg.run.wandb_name, mode=cfg.run.wandb_mode,
                                             dir=str(run_dir), config=dataclasses.asdict(cfg), resume="allow"))  # fmt: skip
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


def compile_encoders(model: torch.nn.Module, backend: str = "inductor") -> None:
    """torch.compile the student's and the teacher's transformer layers (see `Trainer._wrap` for why only them)."""
    for encoder in (model.student, model.teacher):  # `_run_layers` serves every entry point
        encoder._run_layers = torch.compile(encoder._run_layers, backend=backend, dynamic=True)


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: Path, ctx: Context, *, compile_backend: str | None = None,
                 profile: bool = False, progress: bool = True, preemption: Preemption | None = None) -> None:  # fmt: skip
        """`compile_backend`: None runs eagerly; "inductor" is torch.compile's default. `preemption`: the signal
        handling already entered by the caller (the CLI, from start-up); without it, `fit` enters its own."""
        self.cfg, self.run_dir, self.ctx = cfg, run_dir, ctx
        self.preemption = preemption or Preemption()
        if ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        self.compile_backend, self.profile, self.progress = compile_backend, profile, progress
        self._compiled = False
        self.device = ctx.device
        self.dtype = DTYPES[cfg.optimizer.dtype]
        torch.manual_seed(cfg.run.random_seed)
        if cfg.run.use_deterministic:
            torch.use_deterministic_algorithms(True)
        self.model = build_model(cfg=cfg.model, model_type=cfg.run.model_type, checkpoint=cfg.run.init_ckpt)
        self.model.to(self.device).train()
        self.model.defer_codebook_updates = True
        self.loader = self._build_loader(frozenset())
        self.step, self.epoch, self.position, self.nonfinite_in_a_row, self.skipped_files = 0, 0, 0, 0, 0
        state = checkpoint.load_latest(self.checkpoint_dir)
        if state is not None:
            _check_same_model(state.get("config", {}), dataclasses.asdict(cfg), self.checkpoint_dir)
            self.model.load_state_dict(state["model"])
            self.step = state["step"]
            _carry_position_over(state, ctx.world_size)
            if self.step >= cfg.model.freeze_step:
                self.model.freeze_extractor()
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg.optimizer, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        if state is not None:
            self._restore(state)
        self._wrap()
        self.log = MetricsLog(cfg, run_dir, enabled=ctx.is_main)

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    # --- state -----------------------------------------------------------------------------------------------------

    def _wrap(self) -> None:
        """torch.compile, then DDP (every trainable parameter takes a gradient, so no find_unused_parameters;
        codebooks are kept equal by their own all-reduce, so no buffer broadcast).

        Compiled: the student and the teacher transformers, almost all of the FLOPs, with dynamic batch and time
        sizes from the first call, so cropped batches of every length share one graph each and nothing
        recompiles after warm-up. The convolutional extractor stays eager: inductor (torch 2.13) fails on the
        symbolic lengths of strided convolutions (ValueRangeError), and the alternative, padding batches to
        fixed length buckets, would spend compute on padding and change the official crop.
        """
        if self.compile_backend and not self._compiled:
            compile_encoders(self.model, self.compile_backend)
            self._compiled = True
        self.net: torch.nn.Module = self.model
        if self.ctx.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=device_ids, broadcast_buffers=False)

    def _state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step, "epoch": self.epoch, "position": self.position,
            "nonfinite_in_a_row": self.nonfinite_in_a_row, "skipped_files": self.skipped_files,
            "world_size": self.ctx.world_size,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "config": dataclasses.asdict(self.cfg),
        }  # fmt: skip

    def _restore(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.position = state["epoch"], state["position"]
        self.nonfinite_in_a_row, self.skipped_files = state["nonfinite_in_a_row"], state["skipped_files"]
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)

    def save(self) -> Path | None:
        if not self.ctx.is_main:
            return None
        return checkpoint.save_checkpoint(self.checkpoint_dir, self.step, self._state(), self.cfg.run.keep_latest)

    # --- data ------------------------------------------------------------------------------------------------------

    def _build_loader(self, excluded: frozenset[int]) -> DataLoader:
        return build_loader(self.cfg.data, self.cfg.masking, partial(num_frames, self.cfg.model), rank=self.ctx.rank,
                            world_size=self.ctx.world_size, pin_memory=self.device.type == "cuda",
                            excluded=excluded)  # fmt: skip

    def _rest_of_epoch(self) -> Iterator[Batch]:
        """This epoch's batches from the saved position. A loader worker that dies (a decoder crash) does not end
        the run: the file it was decoding is named and excluded, and a new loader resumes at the first batch not
        yet trained on, which then lacks that file like any unusable one."""
        while True:
            self.loader.batch_sampler.set_epoch(self.epoch, start=self.position)
            batches = iter(self.loader)
            if self.loader.num_workers:
                # torch's SIGCHLD handler would raise a worker's death anywhere in this process, mid-step too;
                # without it, the loader raises it here, in `next`, from its liveness check (every 5 s).
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            try:
                yield from batches
                return
            except RuntimeError:
                culprits = self.loader.dataset.files_that_killed_a_worker()
                if not culprits:
                    raise
            for index in culprits:
                logger.warning("a loader worker died decoding %s: skipping that file from now on, restarting the "
                               "loader at batch %d of epoch %d", self.loader.dataset.source.name(index),
                               self.position, self.epoch)  # fmt: skip
            self.loader = self._build_loader(self.loader.dataset.excluded | frozenset(culprits))

    def _batches(self) -> Iterator[Batch]:
        """Batches forever, epoch after epoch, from the saved position; empty batches (all files unreadable)
        are counted and passed over."""
        while True:
            start = self.position
            usable = False
            for batch in self._rest_of_epoch():
                self.position += 1
                self.skipped_files += batch.skipped
                if batch.waveforms.shape[0]:
                    usable = True
                    yield batch
            # A whole epoch without audio would loop forever; a run resumed at an epoch's end has none left in it.
            if not usable and start == 0:
                raise ValueError(f"no readable audio in a whole epoch of data.manifest {self.cfg.data.manifest!r} "
                                 f"({self.skipped_files} unreadable files skipped)")  # fmt: skip
            self.epoch, self.position = self.epoch + 1, 0

    # --- one step --------------------------------------------------------------------------------------------------

    def _forward_backward(self, batches: list[Batch], stop_flag: float) -> tuple[dict[str, Tensor], Tensor]:
        """Returns the step's summed metrics and statistics, and the stop flag summed over ranks (unread: it
        is read with the gradient norm, in the step's one host sync)."""
        # The global masked-frame count normalises the loss (the official rule) and carries the stop flag, so
        # one small all-reduce per step serves both; it stays on the device.
        local = torch.tensor([sum(b.mask_indices.numel() for b in batches), stop_flag], dtype=torch.float32)
        local = local.to(self.device)
        if self.ctx.world_size > 1:
            dist.all_reduce(local)
        global_frames, stop_votes = local[0].clamp_min(1.0), local[1]
        totals: dict[str, Tensor] = {}
        for i, cpu_batch in enumerate(batches):
            batch = cpu_batch.to(self.device)
            last = i == len(batches) - 1
            sync = contextlib.nullcontext() if last or self.ctx.world_size == 1 else self.net.no_sync()
            with sync:
                with _nvtx("forward"), torch.autocast(self.device.type, self.dtype, enabled=self.dtype != torch.float32):
                    loss, out = self.net(batch.waveforms, mask_indices=batch.mask_indices,
                                         attention_mask=batch.attention_mask)  # fmt: skip
                with _nvtx("backward"):
                    self.scaler.scale(loss.sum() * self.ctx.world_size / global_frames).backward()
            detached = {"loss_sum": loss.detach().sum(), "frames": torch.tensor(float(loss.numel())),
                        "target_ppl": out["target_ppl"].detach() / len(batches),
                        "pred_ppl": out["pred_ppl"].detach() / len(batches),
                        "codebook_counts": out["codebook_counts"], "codebook_sums": out["codebook_sums"]}  # fmt: skip
            for key, value in detached.items():
                totals[key] = totals[key] + value.to(self.device) if key in totals else value.to(self.device)
        return totals, stop_votes

    def train_step(self, batches: list[Batch], stop_flag: float = 0.0) -> tuple[dict[str, Tensor], bool, bool]:
        """One optimizer step over `batches` (the micro-batches); returns its metrics, whether it was applied,
        and whether any rank asked to stop."""
        totals, stop_votes = self._forward_backward(batches, stop_flag)
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.optimizer.max_norm)
        totals["grad_norm"] = grad_norm.detach()
        # The step's one host sync. The norm is taken after DDP's all-reduce, so every rank decides alike: NaN
        # (a non-finite loss anywhere makes NaN gradients everywhere) skips the step; inf under a GradScaler is
        # an fp16 overflow, which the scaler skips and backs off from, as in the official loop.
        norm, stop_votes = torch.stack([grad_norm.float(), stop_votes.float()]).tolist()
        stop = stop_votes > 0
        if math.isnan(norm) or (math.isinf(norm) and not self.scaler.is_enabled()):
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.update()
            self.nonfinite_in_a_row += 1
            return totals, False, stop
        with _nvtx("optimizer"):
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
        with _nvtx("codebooks"):
            self.model.update_codebooks(totals["codebook_counts"], totals["codebook_sums"])
        self.step += 1
        self.nonfinite_in_a_row = 0
        with _nvtx("ema"):
            frozen = self.model._extractor_frozen
            totals["ema_decay"] = torch.tensor(self.model.update_ema(self.step))
            if self.model._extractor_frozen and not frozen:
                self._drop_frozen_parameters()
        return totals, True, stop

    def _drop_frozen_parameters(self) -> None:
        """At freeze_step: the optimizer forgets the extractor's group and DDP stops waiting for its gradients."""
        if len(self.optimizer.param_groups) > 1:
            for param in self.optimizer.param_groups[1]["params"]:
                self.optimizer.state.pop(param, None)
            del self.optimizer.param_groups[1]
            for per_group in (self.scheduler.base_lrs, self.scheduler.lr_lambdas, self.scheduler._last_lr):
                del per_group[1]
        self._wrap()

    # --- the run ---------------------------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        with self.preemption:
            return self._fit()

    def _fit(self) -> dict[str, Any]:
        from tqdm import tqdm

        cfg = self.cfg.run
        max_steps = self.cfg.optimizer.max_steps
        batches = self._batches()
        interval: dict[str, Tensor] = {}
        interval_start, last_logged, preempted = time.perf_counter(), {}, False
        bar = tqdm(total=max_steps, initial=self.step, disable=not (self.ctx.is_main and self.progress),
                   desc="training", unit="step", dynamic_ncols=True)  # fmt: skip
        profiler = self._profiler()
        try:
            while self.step < max_steps:
                with _nvtx("data"):
                    micro_batches = [next(batches) for _ in range(cfg.accumulate)]
                totals, applied, stop = self.train_step(micro_batches, float(self.preemption.requested))
                if profiler is not None:
                    profiler.step()
                if not applied:
                    logger.warning("non-finite loss or gradient at step %d: step skipped (%d in a row)",
                                   self.step + 1, self.nonfinite_in_a_row)  # fmt: skip
                    if self.nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                        path = checkpoint.checkpoints(self.checkpoint_dir)
                        raise NonFiniteError(
                            f"{self.nonfinite_in_a_row} non-finite steps in a row at step {self.step}: stopping. "
                            f"Last good checkpoint: {path[-1] if path else 'none'}"
                        )
                else:
                    bar.update()
                    for key in ("loss_sum", "frames", "target_ppl", "pred_ppl", "grad_norm"):
                        interval[key] = interval.get(key, 0) + totals[key]
                    interval["steps"] = interval.get("steps", 0) + 1
                    if self.step % cfg.log_interval == 0 or self.step == max_steps:
                        last_logged = self._log_interval(interval, time.perf_counter() - interval_start, totals)
                        bar.set_postfix(loss=f"{last_logged['loss']:.3f}", target_ppl=f"{last_logged['target_ppl']:.1f}",
                                        pred_ppl=f"{last_logged['pred_ppl']:.1f}")  # fmt: skip
                        interval, interval_start = {}, time.perf_counter()
                    if self.step % cfg.save_interval == 0:
                        self.save()
                    if cfg.validate_interval and self.step % cfg.validate_interval == 0 and self.step < max_steps:
                        self.validate()
                # Ranks stop together, after the step whose all-reduce carried a vote; a single process needs no
                # vote and stops after the step in progress.
                if stop or (self.ctx.world_size == 1 and self.preemption.requested):
                    preempted = True
                    break
        finally:
            bar.close()
            if profiler is not None:
                profiler.stop()
        last_checkpoint = self.save()
        summary = {"run_dir": str(self.run_dir), "step": self.step, "preempted": preempted,
                   "checkpoint": str(last_checkpoint) if last_checkpoint else None,
                   "skipped_files": self.skipped_files, "train": last_logged}  # fmt: skip
        if not preempted:
            summary["validation"] = self.validate()
        return summary

    def _log_interval(self, interval: dict[str, Tensor], seconds: float, totals: dict[str, Tensor]) -> dict[str, Any]:
        steps = interval["steps"]
        record = {
            "split": "train", "step": self.step, "epoch": self.epoch,
            "loss": float(interval["loss_sum"] / interval["frames"]),
            "target_ppl": float(interval["target_ppl"]) / steps, "pred_ppl": float(interval["pred_ppl"]) / steps,
            "grad_norm": float(interval["grad_norm"]) / steps, "lr": self.scheduler.get_last_lr()[0],
            "ema_decay": float(totals["ema_decay"]), "steps_per_s": steps / max(seconds, 1e-9),
            "skipped_files": self.skipped_files,
        }  # fmt: skip
        self.log.write(record)
        return record

    def validate(self) -> dict[str, Any]:
        """On the main rank only: validation forwards need no collective. A preemption signal stops it at the
        next batch or file, unlogged, so that the checkpoint comes within the scheduler's grace period."""
        if not self.ctx.is_main:
            return {}
        results = {}
        for name, data_cfg in self.cfg.validation.items():
            result = validate(self.model, data_cfg, self.cfg.masking, self.device, self.dtype,
                              should_stop=lambda: self.preemption.requested)
            if result is None:
                logger.warning("validation [%s] interrupted by %s", name, self.preemption.signal_name)
                break
            results[name] = result
            self.log.write({"split": f"valid/{name}", "step": self.step, **_flatten(result)})
        self.model.train()
        return results

    def _profiler(self) -> torch.profiler.profile | None:
        if not (self.profile and self.ctx.is_main):
            return None
        trace_dir = self.run_dir / "profile"
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        profiler = torch.profiler.profile(
            activities=activities, schedule=torch.profiler.schedule(wait=2, warmup=2, active=3, repeat=1),
            on_trace_ready=torch.profiler.tensorboard_trace_handler(str(trace_dir)),
        )  # fmt: skip
        profiler.start()
        return profiler


def _flatten(results: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in results.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}/")
        elif isinstance(value, int | float) and math.isfinite(value):
            flat[f"{prefix}{key}"] = value
    return flat


def _carry_position_over(state: dict[str, Any], world_size: int) -> None:
    """Resuming on another number of ranks: weights, optimizer and schedule carry over, and the epoch continues
    after the batches already trained on (each rank's position counts its own shard's batches, so the global
    count is kept, rounded down: a few batches may be seen twice, none skipped)."""
    saved = state.get("world_size", world_size)
    if saved != world_size:
        position = state["position"] * saved // world_size
        logger.warning("resuming a run of %d ranks on %d: epoch %d continues at batch %d of each rank's shard "
                       "(the global batch size changes with the number of ranks)", saved, world_size,
                       state["epoch"], position)  # fmt: skip
        state["position"] = position


def _check_same_model(saved: dict[str, Any], current: dict[str, Any], folder: Path) -> None:
    """A run folder resumes only the model it holds: name the differing fields instead of a state-dict error."""
    differences = [f"{section}.{name}: {saved[section][name]!r} in the checkpoint, {value!r} now"
                   for section in ("model", "run") if section in saved
                   for name, value in current[section].items()
                   if (section == "model" or name == "model_type") and saved[section].get(name, value) != value]  # fmt: skip
    if differences:
        raise ValueError(f"{folder} holds checkpoints of another model ({'; '.join(differences)}): resume with "
                         "the same model config, or start a new run with --run-dir")
