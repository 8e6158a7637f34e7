"""The one place that decides which implementation of an op runs.

Each op registers its implementations by backend name. CUDA tensors take the fastest registered backend
("cuda", then "triton"); every other tensor takes the plain-PyTorch reference, so a CPU tensor always works.
`SPIDR_FAST_BACKEND=reference|triton|cuda` (read at import) or `set_backend` forces one backend for every op
that has it; an op without that backend runs its reference.
"""

import os
from collections.abc import Callable

import torch

BACKENDS = ("reference", "triton", "cuda")
_GPU_PREFERENCE = ("cuda", "triton")
_registry: dict[str, dict[str, Callable]] = {}


def _parse_backend(name: str | None) -> str | None:
    if name in (None, "", "auto"):
        return None
    if name not in BACKENDS:
        raise ValueError(f"SPIDR_FAST_BACKEND: unknown backend {name!r}, expected one of {BACKENDS} or 'auto'")
    return name


_forced: str | None = _parse_backend(os.environ.get("SPIDR_FAST_BACKEND"))


def set_backend(name: str | None) -> None:
    """Force `name` for every op from now on; `None` or "auto" restores the choice by device."""
    global _forced  # noqa: PLW0603 - the single process-wide switch, by design
    _forced = _parse_backend(name)


def forced_backend() -> str | None:
    return _forced


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: `fn` implements `op` on `backend`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def decorator(fn: Callable) -> Callable:
        _registry.setdefault(op, {})[backend] = fn
        return fn

    return decorator


def backend_name(op: str, device: torch.device) -> str:
    """The backend whose implementation of `op` runs for tensors on `device`."""
    impls = _registry[op]
    if _forced is not None:
        return _forced if _forced in impls else "reference"
    if device.type == "cuda":
        for backend in _GPU_PREFERENCE:
            if backend in impls:
                return backend
    return "reference"


def implementation(op: str, device: torch.device) -> Callable:
    """The implementation of `op` that runs for tensors on `device`."""
    return _registry[op][backend_name(op, device)]


def reference(op: str) -> Callable:
    """The plain-PyTorch implementation of `op` itself, for callers that trace through it (torch.compile)."""
    return _registry[op]["reference"]


def registered_ops() -> list[str]:
    return list(_registry)
