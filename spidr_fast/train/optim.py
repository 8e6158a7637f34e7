"""AdamW with the official parameter groups, and the official learning-rate schedules as one factor function."""

import math

import torch
from torch import nn

from spidr_fast.train.config import OptimizerConfig


def lr_factor(step: int, cfg: OptimizerConfig) -> float:
    """Multiplier of cfg.lr after `step` scheduler steps: the official tristage, cosine, rsqrt or constant."""
    init = cfg.init_lr_scale if cfg.warmup_steps > 0 else 1.0
    warmup_end = 1.0
    if cfg.scheduler == "rsqrt":
        warmup_end = 1 / math.sqrt(1 + cfg.rsqrt_shift / cfg.rsqrt_timescale)
    if step < cfg.warmup_steps:
        return init + (warmup_end - init) * step / cfg.warmup_steps
    after_warmup = step - cfg.warmup_steps
    if cfg.scheduler == "constant":
        return 1.0
    if cfg.scheduler == "cosine":
        span = max(cfg.max_steps - cfg.warmup_steps, 1)  # a run that ends within its warm-up never decays
        return cfg.final_lr_scale + (1 - cfg.final_lr_scale) * (1 + math.cos(math.pi * after_warmup / span)) / 2
    if after_warmup < cfg.hold_steps:
        return 1.0
    decaying = after_warmup - cfg.hold_steps
    if cfg.scheduler == "tristage":
        return math.exp(math.log(cfg.final_lr_scale) * decaying / cfg.decay_steps)
    return 1 / math.sqrt(1 + (decaying + cfg.rsqrt_shift) / cfg.rsqrt_timescale)


Scheduler = torch.optim.lr_scheduler.LambdaLR
FROZEN_GROUP = 1  # the index of the parameters frozen at freeze_step, when there are any


def build_optimizer(
    model: nn.Module, cfg: OptimizerConfig, device: torch.device
) -> tuple[torch.optim.AdamW, Scheduler]:
    """Group 0: trained throughout; group 1: the parameters frozen at freeze_step (official layout), absent
    when they are frozen already."""
    groups: list[dict] = [{"params": []}, {"params": []}]
    for name, param in model.named_parameters():
        if not param.requires_grad or name.startswith(tuple(cfg.exclude_from_optimizer)):
            continue
        groups[FROZEN_GROUP if name.startswith(tuple(cfg.to_freeze)) else 0]["params"].append(param)
    optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=device.type == "cuda",
    )
    return optimizer, _schedule(optimizer, cfg, steps_done=0)


def _schedule(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, steps_done: int) -> Scheduler:
    """The official schedule, `steps_done` scheduler steps in: each group's lr is its initial lr times the factor."""
    return Scheduler(optimizer, lambda step: lr_factor(step, cfg), last_epoch=steps_done - 1)


def drop_frozen_group(optimizer: torch.optim.Optimizer, scheduler: Scheduler, cfg: OptimizerConfig) -> Scheduler:
    """At freeze_step: the optimizer forgets the frozen group and its state, as if built without it (what a run
    resumed after freeze_step builds); returns the schedule for the groups left, at the same step. The schedule is
    rebuilt through its constructor because a scheduler keeps per-group lists that it has no public way to shrink."""
    if len(optimizer.param_groups) <= FROZEN_GROUP:
        return scheduler
    for param in optimizer.param_groups.pop(FROZEN_GROUP)["params"]:
        optimizer.state.pop(param, None)
    return _schedule(optimizer, cfg, steps_done=scheduler.last_epoch)
