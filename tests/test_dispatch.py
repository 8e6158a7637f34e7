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


def test_cuda_tensors_take_the_measured_default_until_an_override(fake_triton_op, monkeypatch):
    monkeypatch.setitem(_dispatch.MEASURED_GPU_DEFAULTS, "fake_op", ("reference", "measured slower"))
    _dispatch.implementation("fake_op", torch.device("cuda"))()
    ops.set_backend("triton", op="fake_op")
    assert ops.forced_backend("fake_op") == "triton" and ops.forced_backend() is None
    _dispatch.implementation("fake_op", torch.device("cuda"))()
    ops.set_backend(None, op="fake_op")
    _dispatch.implementation("fake_op", torch.device("cuda"))()
    assert fake_triton_op == ["reference", "triton", "reference"]


def test_an_op_override_beats_the_backend_forced_for_every_op(fake_triton_op):
    with _dispatch.backends("reference", fake_op="triton"):
        _dispatch.implementation("fake_op", torch.device("cpu"))()
        assert _dispatch.backend_name("heads_cross_entropy", torch.device("cuda")) == "reference"
    assert ops.forced_backend() is None and ops.forced_backend("fake_op") is None  # restored
    _dispatch.implementation("fake_op", torch.device("cpu"))()
    assert fake_triton_op == ["triton", "reference"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", (None, {})),
        ("triton", ("triton", {})),
        ("attention=cuda", (None, {"attention": "cuda"})),
        ("triton, attention=cuda", ("triton", {"attention": "cuda"})),
        ("auto,attention=auto", (None, {})),
    ],
)
def test_environment_variable_sets_every_op_and_single_ops(value, expected):
    assert _dispatch._parse_environment(value) == expected


def test_environment_variable_names_a_bad_backend():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        _dispatch._parse_environment("attention=fast")


def test_info_says_why_a_measured_default_was_chosen(monkeypatch):
    from spidr_fast import info

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (9, 0))
    report = info.report()
    assert report["op attention"].startswith("reference (SDPA: on an H100")
    assert report["op heads_cross_entropy"] == "triton"
