"""The one place that decides which implementation of an op runs.

Each op registers its implementations by backend name. CUDA tensors take what the committed measurements chose
for the op on the device's card family (`MEASURED_GPU_DEFAULTS`: the fused kernel where it measured fastest at
SpidR's shapes, else the reference); an op measured on other families only runs its reference; an op never
measured yet runs "cuda", then "triton". Every other tensor takes the plain-PyTorch reference, so a CPU tensor
always works. `python -m spidr_fast.info` prints each choice with the measurement behind it.

Overrides, strongest first: one op's backend (`set_backend("cuda", op="attention")`), then one backend for every
op that has it (`set_backend("triton")`); an op without the forced backend runs its reference.
`SPIDR_FAST_BACKEND` sets both at import: `triton`, `attention=cuda`, or `triton,attention=cuda`.
"""

import contextlib
import functools
import os
from collections.abc import Callable, Iterator

import torch

BACKENDS = ("reference", "triton", "cuda")
_GPU_PREFERENCE = ("cuda", "triton")
_registry: dict[str, dict[str, Callable]] = {}

# op -> card family -> (backend, the measurement behind it): the faster of the fused kernel and the eager reference
# at SpidR's official batch in the committed results (benchmarks/results/kernels-*.json). tests/test_dispatch.py
# derives this table from those files and fails when they disagree: new results, new defaults.
MEASURED_GPU_DEFAULTS: dict[str, dict[str, tuple[str, str]]] = {
    "attention": {
        "sm_90": (
            "reference",
            "SDPA: at B12 T1000 our flash-attention's forward + backward took 1.24 ms against SDPA flash's 0.62 on an "
            "H100 (2026-11-27) and 1.17 against 0.60 on an H200 (2026-11-28)",
        )
    },
    "instance_norm_assign": {
        "sm_90": (
            "reference",
            "at L8 B12 T1000 the Triton kernel took 3.60 ms against the eager reference's 3.25 on an H100 "
            "(2026-11-27) and 3.59 against 2.98 on an H200 (2026-11-28; 3.09 against 2.86 inside its step): its "
            "distances run on CUDA cores",
        )
    },
    "codebook_ema_update_": {
        "sm_90": (
            "triton",
            "at L8 K256 D768 the Triton kernel took 0.071 ms against the eager reference's 0.382 on an H100 "
            "(2026-11-27) and 0.039 against 0.142 on an H200 (2026-11-28)",
        )
    },
    "heads_cross_entropy": {
        "sm_90": (
            "triton",
            "at L8 N7200 D768 K256 (forward + backward) the Triton kernels took 1.09 ms against the eager "
            "reference's 1.74 on an H100 (2026-11-27) and 1.51 against 1.98 on an H200 (2026-11-28)",
        )
    },
}
# Ops that take another op's choice: the same kernels (codebook_assign's distances are instance_norm_assign's), or
# the backward of a forward.
FOLLOWS = {
    "codebook_assign": "instance_norm_assign",
    "heads_cross_entropy_backward": "heads_cross_entropy",
    "feature_conv_layer": "feature_extractor",
    "feature_conv_layer_backward": "feature_extractor",
}


def card_family(device: torch.device) -> str:
    """The compute capability of a CUDA device, as `sm_90` for an H100 or an H200."""
    return _card_family(torch.device(device).index)


@functools.cache
def _card_family(index: int | None) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}"


def gpu_default(op: str, family: str) -> tuple[str, str]:
    """The backend CUDA tensors on a card of `family` take for `op` when nothing is forced, and why."""
    impls = _registry[op]
    measured = MEASURED_GPU_DEFAULTS.get(FOLLOWS.get(op, op))
    if measured is None:
        backend = next((b for b in _GPU_PREFERENCE if b in impls), "reference")
        return backend, "not measured on any card yet: the fused kernel by default"
    if family not in measured:
        return "reference", f"measured on {', '.join(measured)} only, not on {family}: the reference"
    backend, why = measured[family]
    return (backend, why) if backend in impls else ("reference", f"no {backend} implementation here")


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
        return gpu_default(op, card_family(device))[0]
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
