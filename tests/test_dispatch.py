"""The single dispatch point: CPU tensors run the reference; a forced backend applies to every op that has it."""

import pytest
import torch

from spidr_fast import ops
from spidr_fast.ops import _dispatch


@pytest.fixture
def fake_triton_op():
    """A throwaway op with a reference and a 'triton' implementation, removed afterwards."""
    calls = []
    _dispatch.register("fake_op", "reference")(lambda: calls.append("reference"))
    _dispatch.register("fake_op", "triton")(lambda: calls.append("triton"))
    yield calls
    del _dispatch._registry["fake_op"]
    ops.set_backend(None)


def test_cpu_tensors_run_the_reference(fake_triton_op):
    _dispatch.implementation("fake_op", torch.device("cpu"))()
    assert fake_triton_op == ["reference"]


def test_cuda_tensors_prefer_the_fused_backend(fake_triton_op):
    _dispatch.implementation("fake_op", torch.device("cuda"))()  # only the device type is read: no GPU needed
    assert fake_triton_op == ["triton"]


def test_forced_backend_applies_everywhere_and_falls_back_to_reference(fake_triton_op):
    ops.set_backend("triton")
    assert ops.forced_backend() == "triton"
    _dispatch.implementation("fake_op", torch.device("cpu"))()
    assert fake_triton_op == ["triton"]
    ops.set_backend("cuda")  # fake_op has no CUDA implementation
    _dispatch.implementation("fake_op", torch.device("cuda"))()
    assert fake_triton_op == ["triton", "reference"]
    ops.set_backend("auto")
    assert ops.forced_backend() is None


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        ops.set_backend("fast")
    with pytest.raises(ValueError, match="backend must be one of"):
        _dispatch.register("fake_op", "numba")
