"""The one place that decides which implementation of an op runs.

Each op registers its implementations by backend name. CUDA tensors take the fastest registered backend: the one
the committed H100 measurements chose for the op (`MEASURED_GPU_DEFAULTS`), else "cuda", then "triton". Every
other tensor takes the plain-PyTorch reference, so a CPU tensor always works.

Overrides, strongest first: one op's backend (`set_backend("cuda", op="attention")`), then one backend for every
op that has it (`set_backend("triton")`); an op without the forced backend runs its reference.
`SPIDR_FAST_BACKEND` sets both at import: `triton`, `attention=cuda`, or `triton,attention=cuda`.
"""

import contextlib
import os
from collections.abc import Callable, Iterator

import torch

BACKENDS = ("reference", "triton", "cuda")
_GPU_PREFERENCE = ("cuda", "triton")
_registry: dict[str, dict[str, Callable]] = {}

# Ops whose fused implementation the H100 results in benchmarks/results/ show slower than its alternative at
# SpidR's shapes: CUDA tensors take the faster one until a faster kernel lands (python -m spidr_fast.info prints why).
MEASURED_GPU_DEFAULTS: dict[str, tuple[str, str]] = {
    "attention": (
        "reference",
        "SDPA: on an H100 (2026-11-27) our flash-attention's forward + backward took 2.4-2.9x SDPA cuDNN's and "
        "1.9-2.4x SDPA flash's at T = 250-1000, and SpidR's training step 1.10x longer with it",
    )
}


def _parse_backend(name: str | None) -> str | None:
    if name in (None, "", "auto"):
        return None
    if name not in BACKENDS:
        raise ValueError(f"SPIDR_FAST_BACKEND: unknown backend {name!r}, expected one of {BACKENDS} or 'auto'")
    return name


def _parse_environment(value: str | None) -> tuple[str | None, dict[str, str]]:
    """SPIDR_FAST_BACKEND: an optional backend for every op, and op=backend pairs, separated by commas."""
    forced, per_op = None, {}
    for item in filter(None, (part.strip() for part in (value or "").split(","))):
        op, _, backend = item.rpartition("=")
        if op:
            per_op[op] = _parse_backend(backend)
        else:
            forced = _parse_backend(backend)
    return forced, {op: backend for op, backend in per_op.items() if backend is not None}


_forced, _per_op = _parse_environment(os.environ.get("SPIDR_FAST_BACKEND"))


def set_backend(name: str | None, *, op: str | None = None) -> None:
    """Force `name` for every op (or for `op` alone) from now on; `None` or "auto" restores the default."""
    global _forced  # noqa: PLW0603 - the single process-wide switch, by design
    backend = _parse_backend(name)
    if op is None:
        _forced = backend
    elif backend is None:
        _per_op.pop(op, None)
    else:
        _per_op[op] = backend


def forced_backend(op: str | None = None) -> str | None:
    """The backend forced for every op, or for `op` when given (its own override first)."""
    return _per_op.get(op, _forced) if op is not None else _forced


@contextlib.contextmanager
def backends(forced: str | None = None, **per_op: str | None) -> Iterator[None]:
    """Within the block: `forced` for every op, and op=backend overrides; everything as before afterwards."""
    global _forced, _per_op  # noqa: PLW0603
    saved = _forced, dict(_per_op)
    try:
        set_backend(forced)
        for op, backend in per_op.items():
            set_backend(backend, op=op)
        yield
    finally:
        _forced, _per_op = saved


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
    forced = forced_backend(op)
    if forced is not None:
        return forced if forced in impls else "reference"
    if device.type == "cuda":
        if op in MEASURED_GPU_DEFAULTS:
            return MEASURED_GPU_DEFAULTS[op][0]
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


def custom_op(name: str, *, fake: Callable, mutates_args: tuple[str, ...] = ()) -> torch.library.CustomOpDef:
    """Declare `torch.ops.spidr_fast.<name>` once its reference is registered: its schema is the reference's
    signature, its body runs the implementation that `implementation` picks for the device of its first argument,
    and `fake` (same arguments) gives torch.compile the outputs' shapes and dtypes without running anything.

    Why every op is a custom op: torch.compile, with fullgraph=True too, traces it as one node whatever backend runs
    inside, instead of tracing into a Triton launch or a raw-pointer extension call it cannot follow. Autocast does
    not see inside either: the public function casts its inputs where autocast would.
    """
    schema = torch.library.infer_schema(reference(name), mutates_args=mutates_args)

    def run(*args: object) -> object:
        return implementation(name, args[0].device)(*args)

    op = torch.library.custom_op(f"spidr_fast::{name}", run, mutates_args=mutates_args, schema=schema)
    op.register_fake(fake)
    return op
