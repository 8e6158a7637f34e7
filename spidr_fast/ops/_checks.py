"""Input validation at the boundary of the ops: every error names the argument and the shapes seen."""

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_tensor(
    name: str, tensor: object, *, ndim: int | None = None, dtypes: Sequence[torch.dtype] | None = None
) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if ndim is not None and tensor.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")
    if dtypes is not None and tensor.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({allowed}), got {str(tensor.dtype).removeprefix('torch.')}")
    return tensor


def check_shape(name: str, tensor: torch.Tensor, expected: Sequence[int], *, meaning: str) -> None:
    """`expected` is the full shape; `meaning` names its dimensions, e.g. "(L, K)"."""
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {meaning} = {tuple(expected)}, got {tuple(tensor.shape)}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    named = [(name, t) for name, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, tensor in named[1:]:
        if tensor.device != first.device:
            raise ValueError(f"{name} is on {tensor.device} but {first_name} is on {first.device}")


INDEX_DTYPES = (torch.int64, torch.int32)  # what index_select and the kernels' index loads accept


def check_values_in_range(
    name: str, tensor: torch.Tensor, high: int, *, meaning: str, ignore_index: int | None = None
) -> None:
    """Every value in [0, high), or equal to ignore_index: read on the host, for CPU tensors only.

    A CUDA tensor is not read here (that would cost the step a host sync): the kernel that reads the values checks
    them on the device instead. Left out while torch.compile traces, where a data-dependent branch breaks the graph.
    """
    if tensor.device.type != "cpu" or tensor.numel() == 0 or torch.compiler.is_compiling():
        return
    valid = (tensor >= 0) & (tensor < high)
    if ignore_index is not None:
        valid |= tensor == ignore_index
    if not bool(valid.all()):
        position = tuple(int(i) for i in (~valid).nonzero()[0])
        allowed = f"[0, {high})" if ignore_index is None else f"[0, {high}) or ignore_index = {ignore_index}"
        raise ValueError(f"{name} must be in {allowed} ({meaning}), got {int(tensor[position])} at {position}")
