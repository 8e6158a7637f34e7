"""Profiling a run: NVTX ranges for Nsight on a GPU, and a torch profiler trace of a few steps."""

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch


def nvtx(name: str) -> contextlib.AbstractContextManager:
    """An NVTX range for Nsight on a GPU; nothing on a CPU."""
    if torch.cuda.is_available():
        import nvtx as nvtx_ranges

        return nvtx_ranges.annotate(name)
    return contextlib.nullcontext()


@contextlib.contextmanager
def profiled_steps(trace_dir: Path | None, device: torch.device) -> Iterator[Callable[[], None]]:
    """Yields what to call after each step: with a `trace_dir`, a torch profiler traces steps 5 to 7 into it (after
    2 steps of waiting and 2 of warm-up), viewable in TensorBoard; without one, nothing."""
    if trace_dir is None:
        yield lambda: None
        return
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(wait=2, warmup=2, active=3, repeat=1),
        on_trace_ready=torch.profiler.tensorboard_trace_handler(str(trace_dir)),
    ) as profiler:
        yield profiler.step
