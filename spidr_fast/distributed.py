"""Everything that talks to other ranks: process-group setup from torchrun's or SLURM's environment, and the sums
over ranks that the model (codebook statistics) and the trainer (frame count, stop vote) take. A single process
needs no process group, and every sum is then the identity.

Imports only torch: the models and the trainer both use it."""

import os
import re
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

# How long the other ranks wait for rank 0 to finish validating: outside run.collective_timeout, since the first
# validation of a large dev set (its MFCC k-means baseline) can take longer than a collective should. A dead rank 0
# still ends the wait at once (gloo sees its connections close).
MAIN_RANK_WAIT = timedelta(days=1)
_main_rank_wait: dist.ProcessGroup | None = None


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_host(nodelist: str) -> str:
    """First host of a SLURM node list such as "gpu[03-05,09],cpu1" → "gpu03"."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if match is None:
        raise ValueError(f"cannot read SLURM node list {nodelist!r}; set MASTER_ADDR")
    prefix, ranges = match.groups()
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def setup(device: str | None = None, timeout_s: int = 600) -> Context:
    """`timeout_s`: how long a collective waits for a peer before it fails instead of hanging."""
    global _main_rank_wait
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun
        rank, world_size, local_rank = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif int(env.get("SLURM_NTASKS", "1")) > 1:  # srun, one task per GPU
        rank, world_size, local_rank = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env["SLURM_LOCALID"])
        env.setdefault("MASTER_ADDR", _first_host(env["SLURM_JOB_NODELIST"]))
        env.setdefault("MASTER_PORT", "29500")
    else:
        rank, world_size, local_rank = 0, 1, 0
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    torch_device = torch.device(device)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
            device_id=torch_device if torch_device.type == "cuda" else None,
        )
    if world_size > 1:
        _main_rank_wait = dist.new_group(backend="gloo", timeout=MAIN_RANK_WAIT)
    return Context(rank, world_size, local_rank, torch_device)


def wait_for_main_rank() -> None:
    """Every rank waits here until all, rank 0 included, have arrived (after rank 0's validation), under
    MAIN_RANK_WAIT rather than the collective timeout; nothing to wait for in a single process."""
    if _main_rank_wait is not None:
        dist.barrier(group=_main_rank_wait)


def teardown() -> None:
    global _main_rank_wait
    _main_rank_wait = None
    if dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def sum_over_ranks(*tensors: Tensor) -> list[Tensor]:
    """Each tensor summed over ranks, in a single all-reduce of one flat buffer; unchanged in a single process."""
    if not is_distributed():
        return list(tensors)
    flat = torch.cat([t.flatten() for t in tensors])
    dist.all_reduce(flat)
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)]
