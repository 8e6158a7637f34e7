"""The training loop: DDP, autocast, gradient accumulation, the teacher and codebook updates, checkpoints,
validation, and faults that lose nothing (unreadable audio, non-finite steps, preemption, failed writes).

One optimizer step, on every rank:
    micro-batches → forward (codebook statistics returned, not applied) → backward (DDP syncs on the last)
    → one check of the loss and gradient norm (the step's only host sync) → skip the whole step if non-finite
    → optimizer, then the codebook EMA from the summed statistics (one all-reduce), then the teacher EMA.
"""

import contextlib
import dataclasses
import logging
import math
import signal
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from spidr_fast.data.loading import Batch, build_loader
from spidr_fast.distributed import Context, sum_over_ranks
from spidr_fast.models import build_model
from spidr_fast.models.components import num_frames
from spidr_fast.preemption import Preemption
from spidr_fast.train import checkpoint
from spidr_fast.train.config import TrainConfig
from spidr_fast.train.optim import build_optimizer, drop_frozen_group
from spidr_fast.train.profiling import nvtx, profiled_steps
from spidr_fast.train.reporting import MetricsLog, TrainingMetrics
from spidr_fast.train.validation import Validator

logger = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row."""


class NonFiniteGuard:
    """The non-finite policy: a skipped step is logged, and `max_in_a_row` of them in a row stop the run, naming
    the last good checkpoint."""

    def __init__(self, max_in_a_row: int, checkpointer: checkpoint.Checkpointer) -> None:
        self.max_in_a_row, self.checkpointer, self.in_a_row = max_in_a_row, checkpointer, 0

    def record(self, applied: bool, step: int) -> None:
        """After each step, whether it was `applied`; `step`: the steps applied so far."""
        if applied:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        logger.warning("non-finite loss or gradient at step %d: step skipped (%d in a row)", step + 1, self.in_a_row)
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteError(
                f"{self.in_a_row} non-finite steps in a row at step {step}: stopping. "
                f"Last good checkpoint: {self.checkpointer.latest() or 'none'}"
            )


class Trainer:
    """A run: the model, its data, optimizer and state, and the collaborators that `fit` calls around each step:
    the checkpointer, the metrics, the validator, the non-finite guard and the profiler."""

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: Path,
        ctx: Context,
        *,
        compile_backend: str | None = None,
        profile: bool = False,
        progress: bool = True,
        preemption: Preemption | None = None,
    ) -> None:
        """`compile_backend`: None runs eagerly; "inductor" is torch.compile's default. `preemption`: the signal
        handling already entered by the caller (the CLI, from start-up); without it, `fit` enters its own."""
        self.cfg, self.run_dir, self.ctx = cfg, run_dir, ctx
        self.preemption = preemption or Preemption()
        if ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        self.device = ctx.device
        self.dtype = DTYPES[cfg.optimizer.dtype]
        torch.manual_seed(cfg.run.random_seed)
        if cfg.run.use_deterministic:
            torch.use_deterministic_algorithms(True)
        self.model = build_model(cfg=cfg.model, model_type=cfg.run.model_type, checkpoint=cfg.run.init_ckpt)
        self.model.to(self.device).train()
        self.model.defer_codebook_updates = True
        self.loader = self._build_loader(frozenset())
        self.checkpointer = checkpoint.Checkpointer(
            run_dir / "checkpoints", cfg.run.save_interval, cfg.run.keep_latest, enabled=ctx.is_main
        )
        self.nonfinite = NonFiniteGuard(cfg.run.max_nonfinite_steps, self.checkpointer)
        self.step, self.epoch, self.position, self.skipped_files = 0, 0, 0, 0
        self.worker_deaths: dict[int, int] = {}  # file index → loader workers that died decoding it
        self.excluded_files: list[dict[str, str]] = []  # {"file", "reason"} of each file excluded this run
        state = self.checkpointer.load_latest()
        if state is not None:
            _check_same_model(state.get("config", {}), dataclasses.asdict(cfg), self.checkpointer.folder)
            self.model.load_state_dict(state["model"])
            self.step = state["step"]
            _carry_position_over(state, ctx.world_size)
            if self.step >= cfg.model.freeze_step:
                self.model.freeze_extractor()
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg.optimizer, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        if state is not None:
            self._restore(state)
        if compile_backend:  # see `DinoSR.compile_encoders` for what is compiled, and why only that
            self.model.compile_encoders(compile_backend)
        self._wrap()
        log = MetricsLog(cfg, run_dir, enabled=ctx.is_main)
        self.metrics = TrainingMetrics(log, cfg.run.log_interval, cfg.optimizer.max_steps, progress)
        self.validator = Validator(cfg, log, self.preemption, self.device, self.dtype)
        self.trace_dir = run_dir / "profile" if profile and ctx.is_main else None

    # --- state -----------------------------------------------------------------------------------------------------

    def _wrap(self) -> None:
        """DDP (every trainable parameter takes a gradient, so no find_unused_parameters; codebooks are kept equal
        by their own all-reduce, so no buffer broadcast); again when the extractor freezes."""
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
            "step": self.step,
            "epoch": self.epoch,
            "position": self.position,
            "nonfinite_in_a_row": self.nonfinite.in_a_row,
            "skipped_files": self.skipped_files,
            "world_size": self.ctx.world_size,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "config": dataclasses.asdict(self.cfg),
        }

    def _restore(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.position = state["epoch"], state["position"]
        self.nonfinite.in_a_row, self.skipped_files = state["nonfinite_in_a_row"], state["skipped_files"]
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)

    def save(self) -> Path | None:
        return self.checkpointer.save(self.step, self._state)

    # --- data ------------------------------------------------------------------------------------------------------

    def _build_loader(self, excluded: frozenset[int]) -> DataLoader:
        return build_loader(
            self.cfg.data,
            self.cfg.masking,
            partial(num_frames, self.cfg.model),
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
            pin_memory=self.device.type == "cuda",
            excluded=excluded,
        )

    def _rest_of_epoch(self) -> Iterator[Batch]:
        """This epoch's batches from the saved position. A loader worker that dies does not end the run: the file
        it was decoding is named and a new loader resumes at the first batch not yet trained on. The first death
        is retried, since the OOM killer or an operator may have killed the worker; a second one (a decoder crash)
        excludes the file, which is listed in the metrics and from then on missing from its batch like any
        unusable one."""
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
            excluded = set(self.loader.dataset.excluded)
            for index in culprits:
                name = self.loader.dataset.source.name(index)
                self.worker_deaths[index] = self.worker_deaths.get(index, 0) + 1
                if self.worker_deaths[index] == 1:
                    action = "retrying it once"
                else:
                    action = "skipping that file from now on"
                    excluded.add(index)
                    reason = f"its decoding killed a loader worker {self.worker_deaths[index]} times"
                    self.excluded_files.append({"file": name, "reason": reason})
                    self.metrics.log.write({"split": "excluded", "step": self.step, "file": name, "reason": reason})
                logger.warning(
                    "a loader worker died decoding %s (death %d): %s, restarting the loader at batch %d of epoch %d",
                    name,
                    self.worker_deaths[index],
                    action,
                    self.position,
                    self.epoch,
                )
            self.loader = self._build_loader(frozenset(excluded))

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
                raise ValueError(
                    f"no readable audio in a whole epoch of data.manifest {self.cfg.data.manifest!r} "
                    f"({self.skipped_files} unreadable files skipped)"
                )
            self.epoch, self.position = self.epoch + 1, 0

    # --- one step --------------------------------------------------------------------------------------------------

    def _forward_backward(self, batches: list[Batch], stop_flag: float) -> tuple[dict[str, Tensor], Tensor]:
        """Returns the step's summed metrics and statistics, and the stop flag summed over ranks (unread: it
        is read with the gradient norm, in the step's one host sync)."""
        # The global masked-frame count normalises the loss (the official rule) and carries the stop flag, so
        # one small all-reduce per step serves both; it stays on the device.
        local = torch.tensor([sum(b.mask_indices.numel() for b in batches), stop_flag], dtype=torch.float32)
        (local,) = sum_over_ranks(local.to(self.device))
        global_frames, stop_votes = local[0].clamp_min(1.0), local[1]
        totals: dict[str, Tensor] = {}
        for i, cpu_batch in enumerate(batches):
            batch = cpu_batch.to(self.device)
            last = i == len(batches) - 1
            sync = contextlib.nullcontext() if last or self.ctx.world_size == 1 else self.net.no_sync()
            with sync:
                with nvtx("forward"), torch.autocast(self.device.type, self.dtype, enabled=self.dtype != torch.float32):
                    loss, out = self.net(
                        batch.waveforms, mask_indices=batch.mask_indices, attention_mask=batch.frame_mask
                    )
                with nvtx("backward"):
                    self.scaler.scale(loss.sum() * self.ctx.world_size / global_frames).backward()
            detached = {
                "loss_sum": loss.detach().sum(),
                "frames": torch.tensor(float(loss.numel())),
                "target_ppl": out["target_ppl"].detach() / len(batches),
                "pred_ppl": out["pred_ppl"].detach() / len(batches),
                "codebook_counts": out["codebook_counts"],
                "codebook_sums": out["codebook_sums"],
            }
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
        applied = not (math.isnan(norm) or (math.isinf(norm) and not self.scaler.is_enabled()))
        if applied:
            with nvtx("optimizer"):
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
            with nvtx("codebooks"):
                self.model.update_codebooks(totals["codebook_counts"], totals["codebook_sums"])
            self.step += 1
            with nvtx("ema"):
                was_frozen = self.model.extractor_frozen
                totals["ema_decay"] = torch.tensor(self.model.update_ema(self.step))
                if self.model.extractor_frozen and not was_frozen:
                    # The optimizer forgets the extractor and DDP stops waiting for its gradients.
                    self.scheduler = drop_frozen_group(self.optimizer, self.scheduler, self.cfg.optimizer)
                    self._wrap()
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.update()
        self.nonfinite.record(applied, self.step)
        return totals, applied, stop

    # --- the run ---------------------------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train to optimizer.max_steps or a stop signal, checkpoint, and validate unless stopped."""
        with self.preemption:
            preempted = self._train()
            last_checkpoint = self.save()
            summary = {
                "run_dir": str(self.run_dir),
                "step": self.step,
                "preempted": preempted,
                "checkpoint": str(last_checkpoint) if last_checkpoint else None,
                "skipped_files": self.skipped_files,
                "excluded_files": self.excluded_files,
                "train": self.metrics.last_record,
            }
            if not preempted:
                summary["validation"] = self.validate()
            return summary

    def _train(self) -> bool:
        """Steps until max_steps; returns whether a stop signal ended them first."""
        batches = self._batches()
        with self.metrics.shown(self.step), profiled_steps(self.trace_dir, self.device) as profile_step:
            while self.step < self.cfg.optimizer.max_steps:
                with nvtx("data"):
                    micro_batches = [next(batches) for _ in range(self.cfg.run.accumulate)]
                totals, applied, stop = self.train_step(micro_batches, float(self.preemption.requested))
                profile_step()
                if applied:
                    self.metrics.step_applied(
                        totals,
                        step=self.step,
                        epoch=self.epoch,
                        lr=self.scheduler.get_last_lr()[0],
                        skipped_files=self.skipped_files,
                    )
                    self.checkpointer.save_if_due(self.step, self._state)
                    if self.validator.due(self.step):
                        self.validate()
                # Ranks stop together, after the step whose all-reduce carried a vote; a single process needs no
                # vote and stops after the step in progress.
                if stop or (self.ctx.world_size == 1 and self.preemption.requested):
                    return True
        return False

    def validate(self) -> dict[str, Any]:
        return self.validator(self.model, self.step)


def _carry_position_over(state: dict[str, Any], world_size: int) -> None:
    """Resuming on another number of ranks: weights, optimizer and schedule carry over, and the epoch continues
    after the batches already trained on (each rank's position counts its own shard's batches, so the global
    count is kept, rounded down: a few batches may be seen twice, none skipped)."""
    saved = state.get("world_size", world_size)
    if saved != world_size:
        position = state["position"] * saved // world_size
        logger.warning(
            "resuming a run of %d ranks on %d: epoch %d continues at batch %d of each rank's shard "
            "(the global batch size changes with the number of ranks)",
            saved,
            world_size,
            state["epoch"],
            position,
        )
        state["position"] = position


def _check_same_model(saved: dict[str, Any], current: dict[str, Any], folder: Path) -> None:
    """A run folder resumes only the model it holds: name the differing fields instead of a state-dict error."""
    differences = [
        f"{section}.{name}: {saved[section][name]!r} in the checkpoint, {value!r} now"
        for section in ("model", "run")
        if section in saved
        for name, value in current[section].items()
        if (section == "model" or name == "model_type") and saved[section].get(name, value) != value
    ]
    if differences:
        raise ValueError(
            f"{folder} holds checkpoints of another model ({'; '.join(differences)}): resume with "
            "the same model config, or start a new run with --run-dir"
        )
