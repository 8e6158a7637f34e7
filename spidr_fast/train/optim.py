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
        span = cfg.max_steps - cfg.warmup_steps
        return cfg.final_lr_scale + (1 - cfg.final_lr_scale) * (1 + math.cos(math.pi * after_warmup / span)) / 2
    if after_warmup < cfg.hold_steps:
        return 1.0
    decaying = after_warmup - cfg.hold_steps
    if cfg.scheduler == "tristage":
        return math.exp(math.log(cfg.final_lr_scale) * decaying / cfg.decay_steps)
    return 1 / math.sqrt(1 + (decaying + cfg.rsqrt_shift) / cfg.rsqrt_timescale)


def build_optimizer(
    model: nn.Module, cfg: OptimizerConfig, device: torch.device
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """Group 0: trained throughout; group 1: the parameters frozen at freeze_step (official layout)."""
    groups: list[dict] = [{"params": []}, {"params": []}]
    for name, param in model.named_parameters():
        if not param.requires_grad or name.startswith(tuple(cfg.exclude_from_optimizer)):
            continue
        groups[1 if name.startswith(tuple(cfg.to_freeze)) else 0]["params"].append(param)
    optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
        weight_decay=cfg.weight_decay, fused=device.type == "cuda",
    )  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
    return optimizer, scheduler
