"""python -m spidr_fast.info: what this installation runs, for bug reports and device checks.

Versions, the CUDA extension's state (built or not, for which architectures), the device, and which
implementation each op runs on that device.
"""

import importlib.metadata
import os
import platform

import torch

import spidr_fast
from spidr_fast.ops import _dispatch
from spidr_fast.ops.feature_extractor import GROUP_NORM_REASON
from spidr_fast.ops.kernels import attention as attention_kernel


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report() -> dict[str, object]:
    extension = attention_kernel.extension()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    info: dict[str, object] = {
        "spidr_fast": spidr_fast.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch cuda": torch.version.cuda or "none (CPU build)",
        "triton": _version("triton"),
        "triton interpreter": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "flash-attention extension": (
            "not built (attention runs on SDPA)"
            if extension is None
            else f"{'CPU emulator build' if extension.emulated else 'built'} ({extension.__file__})"
        ),
        "extension architectures": getattr(extension, "cuda_archs", "") or "-",
        "device": (
            f"{torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})"
            if device.type == "cuda"
            else "no CUDA device"
        ),
        "forced backend": _dispatch.forced_backend() or "none (SPIDR_FAST_BACKEND unset)",
    }
    for op in sorted(_dispatch.registered_ops()):
        backend = _dispatch.backend_name(op, device)
        if _dispatch.forced_backend(op) is not None:
            backend = f"{backend} (forced)"
        elif device.type == "cuda":  # the measurement behind the choice, or why there is none
            backend = f"{backend} ({_dispatch.gpu_default(op, _dispatch.card_family(device))[1]})"
        info[f"op {op}"] = backend
    info["op feature_extractor, group_norm mode"] = f"reference ({GROUP_NORM_REASON})"
    return info


def main() -> None:
    info = report()
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
