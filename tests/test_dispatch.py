"""The single dispatch point: CPU tensors run the reference; a forced backend applies to every op that has it; CUDA
defaults follow the committed measurements, per card family."""

import json
from pathlib import Path

import pytest
import torch

from spidr_fast import ops
from spidr_fast.ops import _dispatch


@pytest.fixture(autouse=True)
def hopper(monkeypatch):
    """Any CUDA device here is an sm_90 card (only the device type is read otherwise: no GPU needed)."""
    monkeypatch.setattr(_dispatch, "card_family", lambda device: "sm_90")


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
    monkeypatch.setitem(_dispatch.MEASURED_GPU_DEFAULTS, "fake_op", {"sm_90": ("reference", "measured slower")})
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
    assert report["op attention"].startswith("reference (SDPA: at B12 T1000 our flash-attention")
    assert report["op heads_cross_entropy"].startswith("triton (at L8 N7200 D768 K256")
    assert report["op instance_norm_assign"].startswith("reference (at L8 B12 T1000 the Triton kernel took 3.60 ms")
    assert report["op codebook_assign"] == report["op instance_norm_assign"]  # the same distance kernel


def test_a_card_family_nobody_measured_runs_the_reference_of_measured_ops(fake_triton_op, monkeypatch):
    """The measured defaults used to apply to every CUDA card, though only sm_90 was measured."""
    monkeypatch.setattr(_dispatch, "card_family", lambda device: "sm_80")
    cuda = torch.device("cuda")
    assert _dispatch.backend_name("heads_cross_entropy", cuda) == "reference"
    assert _dispatch.backend_name("heads_cross_entropy_backward", cuda) == "reference"  # its forward's choice
    assert "measured on sm_90 only, not on sm_80" in _dispatch.gpu_default("heads_cross_entropy", "sm_80")[1]
    _dispatch.implementation("fake_op", cuda)()  # never measured anywhere: the fused kernel until it is
    assert fake_triton_op == ["triton"]


# Results written before `environment` recorded the card family.
FAMILY_OF_DEVICE = {"NVIDIA H100 80GB HBM3": "sm_90", "NVIDIA H200": "sm_90"}
# op -> (cases, shape at SpidR's official batch, fused implementation and its backend, the reference it must beat)
OFFICIAL_SHAPE_ROWS = {
    "attention": (("attention fwd", "attention bwd"), "B12 T1000 H12 d64", "ours (csrc)", "cuda", "SDPA flash"),
    "instance_norm_assign": (("codebook assign",), "L8 B12 T1000 N7199", "fused (triton)", "triton", "reference eager"),
    "codebook_ema_update_": (("codebook update",), "L8 K256 D768", "fused (triton)", "triton", "reference eager"),
    "heads_cross_entropy": (
        ("heads_cross_entropy fwd+bwd",),
        "L8 N7200 D768 K256",
        "fused (triton)",
        "triton",
        "reference eager",
    ),
}


def defaults_from_results() -> dict[str, dict[str, str]]:
    """op -> card family -> backend: the fused one where it beat the reference at the official shape on every card
    of the family measured in benchmarks/results/, else the reference."""
    wins: dict[tuple[str, str], list[bool]] = {}
    for path in sorted((Path(__file__).parent.parent / "benchmarks" / "results").glob("kernels-*.json")):
        payload = json.loads(path.read_text())
        if payload["cpu_smoke_run"]:
            continue
        env = payload["environment"]
        family = env.get("card_family") or FAMILY_OF_DEVICE[env["device"]]
        for op, (cases, shape, fused, _, reference) in OFFICIAL_SHAPE_ROWS.items():
            ms = {impl: 0.0 for impl in (fused, reference)}
            for row in payload["rows"]:
                if row["case"] in cases and row["shape"] == shape and row["impl"] in ms:
                    ms[row["impl"]] += row["ms"]
            wins.setdefault((op, family), []).append(ms[fused] < ms[reference])
    derived: dict[str, dict[str, str]] = {}
    for (op, family), won in wins.items():
        derived.setdefault(op, {})[family] = OFFICIAL_SHAPE_ROWS[op][3] if all(won) else "reference"
    return derived


def test_the_cuda_defaults_follow_the_committed_results():
    """New results that change a winner fail this until MEASURED_GPU_DEFAULTS (and its reasons) follow them. The
    committed ones: Triton's codebook assign is slower than the eager reference at the official batch on both
    cards, so it is off there; the EMA update and the heads run their Triton kernels; attention runs SDPA."""
    chosen = {
        op: {family: backend for family, (backend, _) in families.items()}
        for op, families in _dispatch.MEASURED_GPU_DEFAULTS.items()
    }
    assert chosen == defaults_from_results()
    assert chosen["instance_norm_assign"] == {"sm_90": "reference"}
