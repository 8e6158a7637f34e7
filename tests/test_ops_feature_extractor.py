"""ops.feature_extractor: the channels-last path (its PyTorch reference and its Triton kernels, interpreted on CPU)
against the official layer stack, forward and backward, at odd lengths, in every dtype, under torch.compile."""

import importlib

import pytest
import torch
from helpers import TINY

from spidr_fast import ops
from spidr_fast.models import SpidR, SpidRConfig
from spidr_fast.ops import _dispatch
from spidr_fast.ops.feature_extractor import _feature_extractor_reference, channels_last_feature_extractor, num_frames

# Every layer shape of the official extractor, small: k 10 stride 5 from one channel, k 3 stride 2, k 2 stride 2;
# 24 channels, so a tile (16 or 128 wide) is never a multiple of them.
LAYERS = [(24, 10, 5), (24, 3, 2), (24, 3, 2), (24, 2, 2)]
HOP = 5 * 2 * 2 * 2
FIELD = 10 + 5 * (2 + 2 * (2 + 2 * 1))  # samples of the first frame: 60
STRIDES = [stride for _, _, stride in LAYERS]
# Exactly one frame, one and a remainder at every stride, a multiple of the hop, and a longer prime.
LENGTHS = [FIELD, FIELD + HOP - 1, 6 * HOP, 997]


def make_parameters(mode="layer_norm", dtype=torch.float64, bias=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weights, biases, norm_weights, norm_biases, in_channels = [], [], [], [], 1
    for i, (channels, kernel, _) in enumerate(LAYERS):
        weights.append(torch.randn(channels, in_channels, kernel, generator=generator) / (in_channels * kernel) ** 0.5)
        biases.append(0.1 * torch.randn(channels, generator=generator) if bias else None)
        normalised = mode == "layer_norm" or i == 0
        norm_weights.append(1 + 0.2 * torch.randn(channels, generator=generator) if normalised else None)
        norm_biases.append(0.2 * torch.randn(channels, generator=generator) if normalised else None)
        in_channels = channels
    cast = [[None if t is None else t.to(dtype).requires_grad_() for t in group]
            for group in (weights, biases, norm_weights, norm_biases)]  # fmt: skip
    return cast


def parameters_of(params):
    return [t for group in params for t in group if t is not None]


def run(fn, waveforms, params, mode="layer_norm"):
    return fn(waveforms, *params, STRIDES, mode, 1e-5)


def forward_backward(fn, waveforms, params, grad_out=None, mode="layer_norm"):
    """Output, gradients of the parameters and of the waveforms, for a fixed output gradient."""
    waveforms = waveforms.detach().requires_grad_()
    out = run(fn, waveforms, params, mode)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)) if grad_out is None else grad_out
    leaves = [waveforms, *parameters_of(params)]
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return out, grads, grad_out


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30)).item()


def cast_parameters(params, dtype):
    return [[None if t is None else t.detach().to(dtype).requires_grad_() for t in group] for group in params]


@pytest.mark.parametrize("samples", LENGTHS)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_channels_last_equals_the_official_stack_in_float32(samples, batch, backend):
    """The channels-last path (its layers' PyTorch reference, then their Triton kernels) against the official stack:
    same frames and the same gradients of every parameter and of the waveforms, at fp32 rounding."""
    if backend == "triton":
        pytest.importorskip("triton")
    params = make_parameters(dtype=torch.float32, bias=True)
    waveforms = torch.randn(batch, samples, generator=torch.Generator().manual_seed(samples))
    expected, expected_grads, grad_out = forward_backward(_feature_extractor_reference, waveforms, params)
    with _dispatch.backends(backend):
        out, grads, _ = forward_backward(channels_last_feature_extractor, waveforms, params, grad_out)
    assert out.shape == expected.shape == (batch, num_frames(samples, [(k, s) for _, k, s in LAYERS]), LAYERS[-1][0])
    assert out.dtype == torch.float32
    if out.numel():
        assert relative_error(out, expected) < 1e-5
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert grad.shape == expected_grad.shape
        assert relative_error(grad, expected_grad) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_path_in_16_bit_is_within_twice_the_official_stacks_error(dtype):
    """The project's rule: against a float64 run, the fused path's error is that of the official stack in the
    same dtype (both round the convolution output once and the gradients where autograd does)."""
    pytest.importorskip("triton")
    params64 = make_parameters(dtype=torch.float64, bias=True)
    waveforms = torch.randn(2, 6 * HOP + 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    exact, exact_grads, grad_out = forward_backward(_feature_extractor_reference, waveforms, params64)
    params = cast_parameters(params64, dtype)
    official, official_grads, _ = forward_backward(_feature_extractor_reference, waveforms.to(dtype), params, grad_out)
    with _dispatch.backends("triton"):
        ours, ours_grads, _ = forward_backward(channels_last_feature_extractor, waveforms.to(dtype), params, grad_out)
    assert ours.dtype == official.dtype == dtype
    # The margin: two independent roundings of the same values differ by up to their sum.
    assert relative_error(ours, exact) <= 2 * relative_error(official, exact)
    for name, mine, theirs, truth in zip(
        ["waveforms", *(f"parameter {i}" for i in range(len(exact_grads) - 1))],
        ours_grads,
        official_grads,
        exact_grads,
        strict=True,
    ):
        assert relative_error(mine, truth) <= 2 * relative_error(theirs, truth) + 1e-6, name


def test_autocast_casts_as_autocast_casts_the_official_layers():
    """Under autocast the convolutions take the autocast dtype and the result has the official's dtype; the
    parameters keep float32 gradients."""
    pytest.importorskip("triton")
    params = make_parameters(dtype=torch.float32)
    waveforms = torch.randn(2, 4 * HOP)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = run(_feature_extractor_reference, waveforms, params)
        with _dispatch.backends("triton"):
            out = run(channels_last_feature_extractor, waveforms, params)
    assert out.dtype == expected.dtype
    assert relative_error(out, expected) < 2e-2
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in parameters_of(params))


def test_public_op_dispatches_by_device_and_gives_no_frame_for_short_input():
    params = make_parameters(dtype=torch.float32)
    waveforms = torch.randn(2, 3 * HOP)
    expected = run(_feature_extractor_reference, waveforms, params)
    assert torch.equal(ops.feature_extractor(waveforms, *params, STRIDES), expected)  # CPU: the reference
    assert num_frames(FIELD - 1, [(k, s) for _, k, s in LAYERS]) == 0
    for backend in ("reference", "triton"):
        with _dispatch.backends(backend):
            empty = ops.feature_extractor(torch.randn(2, FIELD - 1), *params, STRIDES)
        assert empty.shape == (2, 0, LAYERS[-1][0])


def test_group_norm_mode_runs_the_reference():
    params = make_parameters(mode="group_norm", dtype=torch.float32)
    waveforms = torch.randn(2, 3 * HOP)
    expected = run(_feature_extractor_reference, waveforms, params, mode="group_norm")
    with _dispatch.backends("triton"):
        assert torch.equal(ops.feature_extractor(waveforms, *params, STRIDES, mode="group_norm"), expected)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.update(waveforms=a["waveforms"][0]), "waveforms must have 2 dimensions"),
        (lambda a: a.update(waveforms=a["waveforms"].long()), "waveforms must have dtype"),
        (lambda a: a["conv_weights"].__setitem__(1, torch.randn(24, 23, 3)), r"conv_weights\[1\] must have 24 input"),
        (lambda a: a["norm_weights"].__setitem__(2, torch.randn(23)), r"norm_weights\[2\] must have shape"),
        (lambda a: a["norm_biases"].__setitem__(0, None), r"norm_biases\[0\] is needed in layer_norm mode"),
        (lambda a: a.update(strides=[5, 2, 0, 2]), r"strides\[2\] must be a positive int"),
        (lambda a: a.update(strides=[5, 2]), "one entry per layer"),
        (lambda a: a.update(mode="instance_norm"), "mode must be one of"),
    ],
)
def test_bad_input_names_the_argument(change, message):
    weights, biases, norm_weights, norm_biases = (list(g) for g in make_parameters(dtype=torch.float32))
    args = dict(waveforms=torch.randn(2, 3 * HOP), conv_weights=weights, conv_biases=biases,
                norm_weights=norm_weights, norm_biases=norm_biases, strides=list(STRIDES), mode="layer_norm")  # fmt: skip
    change(args)
    with pytest.raises(ValueError, match=message):
        ops.feature_extractor(**args)


def test_channels_last_path_compiles_with_fullgraph_and_dynamic_lengths(triton_device):
    """Custom ops with fake implementations and autograd: one graph over the whole extractor, dynamic in the batch
    and the number of samples, gradients equal to eager."""
    model = SpidR(SpidRConfig(**TINY | {"extractor_conv_layer_config": LAYERS}))
    extractor = model.feature_extractor
    torch._dynamo.reset()
    compiled = torch.compile(extractor, fullgraph=True, dynamic=True, backend="aot_eager")
    for batch, samples in ((2, 6 * HOP + 3), (3, 997)):
        waveforms = torch.randn(batch, samples, device=triton_device)
        expected = extractor(waveforms)
        grad = torch.autograd.grad(expected.sum(), list(extractor.parameters()))
        out = compiled(waveforms)
        assert out.shape == expected.shape
        assert relative_error(out, expected) < 1e-6
        for mine, theirs in zip(torch.autograd.grad(out.sum(), list(extractor.parameters())), grad, strict=True):
            assert relative_error(mine, theirs) < 1e-5


@pytest.mark.official
def test_model_extractor_equals_the_official_extractor_on_every_path(official):
    """Our model's extractor, through the reference and the channels-last paths, against the official module with the
    same weights: frames and parameter gradients."""
    official_config = importlib.import_module("spidr.config")
    overrides = TINY | {"extractor_conv_layer_config": LAYERS, "extractor_conv_bias": True}
    theirs = official.SpidR(official_config.SpidRConfig(**overrides)).feature_extractor
    ours = SpidR(SpidRConfig(**overrides)).feature_extractor
    ours.load_state_dict(theirs.state_dict(), strict=True)
    waveforms = torch.randn(3, 997)
    expected = theirs(waveforms)
    expected_grads = torch.autograd.grad(expected.square().sum(), list(theirs.parameters()))
    for backend in ("reference", "triton"):
        with _dispatch.backends(feature_extractor=backend):
            out = ours(waveforms)
        assert relative_error(out, expected) < 1e-5, backend
        grads = torch.autograd.grad(out.square().sum(), list(ours.parameters()))
        for mine, theirs_grad in zip(grads, expected_grads, strict=True):
            assert relative_error(mine, theirs_grad) < 1e-5, backend
