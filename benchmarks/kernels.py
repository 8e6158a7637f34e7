"""Each fused op against its reference (eager and under torch.compile), the official implementation where it
has one, and the public alternatives, at the SpidR shapes and over a sweep of sizes.

    python benchmarks/kernels.py                       # on a GPU: the full sweep, benchmarks/results/*.json
    python benchmarks/kernels.py --variants compiled   # only the torch.compile rows (slow to build: a second call)
    python benchmarks/kernels.py --smoke               # tiny shapes, no torch.compile (the default without a GPU)

"reference compiled" compiles the plain-PyTorch reference functions themselves (not the custom ops, which
torch.compile treats as opaque calls). Every row is printed and saved the moment it is measured.

Cases, named by the op's stem (`--only` takes the stems), and what is counted (the minimum traffic or the useful
FLOPs, by the usual conventions):
  codebook assign              instance_norm_assign: instance norm + masked-frame selection + nearest codeword +
                               batch statistics, 8 layers; bytes = the teacher layers read once + the codebooks;
                               FLOPs = 2·L·N·K·D (the distances, which bound it on an H100: share of peak is then
                               against the bf16 matmul rate)
  codebook update              codebook_ema_update_, in place over 8 layers; bytes = codebook and counts read and
                               written, statistics read
  heads_cross_entropy fwd+bwd  8 heads' logits, cross-entropy and gradients; FLOPs = 6·L·N·D·K (logits, dx, dW)
  attention fwd                FLOPs = 4·B·T²·H·d;  attention bwd: 2.5× that (flash-attention's convention)
  attention fwd dropout 0.1    the same shapes and FLOP count with dropout_p=0.1 (issue 31's target is measured at
                               both rates); a backend that refuses dropout is not applicable, its reason noted
  dropin                       spidr_fast.nn.OnlineCodebook against vector-quantize-pytorch's VectorQuantize
                               (benchmarks/dropin.py's rows: 8192 frames x 768, 256 codewords, bf16)
  feature_extractor fwd        the 7 official layers (conv k 10/3/2, stride 5/2/2, 512 channels, LayerNorm, GELU)
                               under bf16 autocast, waveforms of B × 20 s; FLOPs = Σ 2·B·T_l·C_out·C_in·k;
                               fwd+bwd adds the weight gradients (the same again) and the input gradients of
                               layers 2-7; "layer i fwd+bwd" rows time one layer alone, channels-last (ours) or
                               as the official module runs it (reference), for its share of the matmul peak
"""

import functools
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # the Triton kernels run in Triton's interpreter, chosen before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python benchmarks/kernels.py` from a checkout

from benchmarks.common import (  # noqa: E402
    Results,
    deterministic_algorithms,
    import_official,
    measure_peaks,
    median_ms,
    on_backend,
    try_run,
)
from spidr_fast import ops  # noqa: E402
from spidr_fast.cli import ArgumentParser, report_user_errors  # noqa: E402
from spidr_fast.ops import _dispatch  # noqa: E402
from spidr_fast.ops.kernels import attention as attention_kernel  # noqa: E402

LAYERS, DIM, CODEWORDS = 8, 768, 256
VARIANTS = ("eager", "compiled")
STEMS = ("codebook", "heads_cross_entropy", "attention", "dropin", "feature_extractor")
RUN = {"eager"}  # which variants this run measures: "eager" (everything not compiled), "compiled"
COMPILE_BACKEND = "inductor"  # a smoke run's is "eager": dynamo only, no code generation (minutes on a CPU)


def _select(impls: dict, compiled: dict | None = None) -> dict:
    """The implementations this run measures: the eager ones and/or the torch.compile ones."""
    chosen = dict(impls) if "eager" in RUN else {}
    if "compiled" in RUN and compiled:
        chosen.update(
            {name: torch.compile(fn, dynamic=False, backend=COMPILE_BACKEND) for name, fn in compiled.items()}
        )
    return chosen


def _time(results, case, shape, impl, fn, device, **counts):
    failure = try_run(fn)
    ms = None if failure else median_ms(fn, device=device)
    results.add(case, shape, impl, ms, error=failure or "", **counts)


def bench_codebook_assign(results, device, frames_list, dtype, official):
    for batch, frames in frames_list:
        n = int(0.6 * batch * frames)  # about the official masked share
        layers = torch.randn(LAYERS, batch, frames, DIM, device=device, dtype=dtype)
        frame_index = torch.randperm(batch * frames, device=device)[:n].sort().values
        codebook = torch.randn(LAYERS, CODEWORDS, DIM, device=device)
        counts = torch.ones(LAYERS, CODEWORDS, device=device)
        shape = f"L{LAYERS} B{batch} T{frames} N{n}"
        nbytes = layers.numel() * layers.element_size() + codebook.numel() * 4
        flops = 2 * LAYERS * n * CODEWORDS * DIM

        def reference():
            return ops.codebook_assign(ops.instance_norm_select(layers, frame_index), codebook, counts)

        def fused():
            return ops.instance_norm_assign(layers, frame_index, codebook, counts)

        def reference_inline():  # the reference functions themselves, which torch.compile can fuse
            return _dispatch.reference("instance_norm_assign")(layers, frame_index, codebook, counts, None, "l2", False)

        impls = {"fused (triton)": on_backend("triton", fused), "reference eager": on_backend("reference", reference)}
        if official is not None:
            impls["official eager"] = functools.partial(_official_targets, official, layers, frame_index, codebook)
        for impl, fn in _select(impls, {"reference compiled": reference_inline}).items():
            _time(results, "codebook assign", shape, impl, fn, device, bytes_moved=nbytes, flops=flops)


def _official_targets(official, layers, frame_index, codebook):
    """The official path: per layer, instance norm over time, masked-frame selection, Codebooks.quantize (with its
    statistics and update)."""
    codebooks = _official_codebooks(official, codebook)
    targets = [
        F.instance_norm(layer.float().transpose(1, 2)).transpose(1, 2).flatten(0, 1)[frame_index] for layer in layers
    ]
    return codebooks.quantize(targets)


@functools.cache
def _official_codebooks_for(official, device, dim, k, layers):
    from spidr.models.components import Codebook, Codebooks

    return Codebooks([Codebook(dim, k, 0.9) for _ in range(layers)]).to(device).train()


def _official_codebooks(official, codebook):
    return _official_codebooks_for(official, codebook.device, codebook.shape[2], codebook.shape[1], codebook.shape[0])


def bench_codebook_update(results, device, official):
    codebook = torch.randn(LAYERS, CODEWORDS, DIM, device=device)
    counts = torch.rand(LAYERS, CODEWORDS, device=device) + 1
    batch_counts = torch.randint(0, 3, (LAYERS, CODEWORDS), device=device).float()
    batch_sums = torch.randn(LAYERS, CODEWORDS, DIM, device=device)
    shape = f"L{LAYERS} K{CODEWORDS} D{DIM}"
    nbytes = (3 * codebook.numel() + 3 * counts.numel()) * 4

    def update():
        ops.codebook_ema_update_(codebook, counts, batch_counts, batch_sums, 0.9)

    def update_inline():
        _dispatch.reference("codebook_ema_update_")(codebook, counts, batch_counts, batch_sums, 0.9)

    impls = {"fused (triton)": on_backend("triton", update), "reference eager": on_backend("reference", update)}
    if official is not None:
        codebooks = _official_codebooks(official, codebook)
        impls["official eager"] = lambda: [cb.update(c, m) for cb, c, m in zip(codebooks, batch_counts, batch_sums)]
    for impl, fn in _select(impls, {"reference compiled": update_inline}).items():
        _time(results, "codebook update", shape, impl, fn, device, bytes_moved=nbytes)


def bench_heads_cross_entropy(results, device, sizes, dtype):
    for n in sizes:
        x = torch.randn(LAYERS, n, DIM, device=device, dtype=dtype, requires_grad=True)
        weight = (torch.randn(LAYERS, CODEWORDS, DIM, device=device, dtype=dtype) * DIM**-0.5).requires_grad_()
        bias = torch.zeros(LAYERS, CODEWORDS, device=device, dtype=dtype, requires_grad=True)
        labels = torch.randint(0, CODEWORDS, (LAYERS, n), device=device)
        shape = f"L{LAYERS} N{n} D{DIM} K{CODEWORDS}"
        flops = 6 * LAYERS * n * DIM * CODEWORDS

        def fused_step():
            loss, _ = ops.heads_cross_entropy(x, weight, bias, labels)
            loss.sum().backward()

        def linear_cross_entropy():  # torch's public fused alternative, one head at a time
            loss = sum(
                F.linear_cross_entropy(x[i], weight[i], labels[i], linear_bias=bias[i], reduction="sum")
                for i in range(LAYERS)
            )
            loss.backward()

        impls = {
            "fused (triton)": on_backend("triton", fused_step),
            "reference eager": on_backend("reference", fused_step),
        }
        if hasattr(F, "linear_cross_entropy"):
            impls["F.linear_cross_entropy"] = linear_cross_entropy
        elif "eager" in RUN:
            results.add(
                "heads_cross_entropy fwd+bwd",
                shape,
                "F.linear_cross_entropy",
                None,
                note=f"not in torch {torch.__version__}",
            )
        # The backward of a compiled forward is compiled too (AOT autograd); compile it here, not in _select.
        compiled = {}
        if "compiled" in RUN:
            reference_loss = torch.compile(
                lambda: _dispatch.reference("heads_cross_entropy")(x, weight, bias, labels, 1.0, -100)[0].sum(),
                dynamic=False,
                backend=COMPILE_BACKEND,
            )
            compiled["reference compiled"] = lambda: reference_loss().backward()
        for impl, fn in {**_select(impls), **compiled}.items():
            _time(results, "heads_cross_entropy fwd+bwd", shape, impl, fn, device, flops=flops)


ATTENTION_DROPOUT_RATES = (0.0, 0.1)  # issue 31's target is measured at both


def attention_case(direction: str, dropout_p: float) -> str:
    """The case's name: `attention fwd` / `attention bwd` at dropout 0 (the rows the CUDA defaults are derived
    from), else `attention fwd dropout 0.1`: a case of its own, so the report and the derivation never mix them."""
    return f"attention {direction}" + (f" dropout {dropout_p:g}" if dropout_p else "")


def _sdpa_refusal(fn) -> str | None:
    """Why SDPA's chosen backend refuses to run fn (torch's warnings say it, the error only "No available kernel"),
    or None when fn runs or fails otherwise (a failure, which the timing records as one)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        failure = try_run(fn)
    if failure is None or not failure.startswith("RuntimeError: No available kernel"):
        return None
    reasons = [str(w.message).split(" (Triggered internally")[0] for w in caught]
    reasons = [r for r in reasons if not r.endswith("not used because:")] or [failure]
    return "; ".join(dict.fromkeys(reasons))


def _deterministic(fn):
    def run():
        with deterministic_algorithms():
            return fn()

    return run


def bench_attention(results, device, frames_list, dtype, heads, head_dim, dropout_rates=ATTENTION_DROPOUT_RATES):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # Every shape at dropout 0 first: a run cut off in its dropout rows keeps the rows the CUDA defaults rest on.
    for dropout_p in dropout_rates:
        fwd, bwd = attention_case("fwd", dropout_p), attention_case("bwd", dropout_p)
        for batch, frames in frames_list:
            shape = f"B{batch} T{frames} H{heads} d{head_dim}"
            flops_forward = 4 * batch * frames**2 * heads * head_dim  # dropout changes no FLOP count
            q, k, v = (
                torch.randn(batch, frames, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
                for _ in "qkv"
            )
            grad = torch.randn_like(q)
            cu_seqlens = torch.arange(0, (batch + 1) * frames, frames, dtype=torch.int32, device=device)
            packed = [t.detach().flatten(0, 1).requires_grad_() for t in (q, k, v)]

            def ours(packed=packed, cu_seqlens=cu_seqlens, frames=frames, dropout_p=dropout_p):
                return attention_kernel.flash_attention_varlen(*packed, cu_seqlens, frames, dropout_p=dropout_p)

            def sdpa(backend, q=q, k=k, v=v, dropout_p=dropout_p):
                def run():
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(
                            *(t.transpose(1, 2) for t in (q, k, v)), dropout_p=dropout_p
                        )

                return run

            impls = {"ours (csrc)": (ours, packed, grad.flatten(0, 1))}
            for name, backend in (
                ("SDPA flash", SDPBackend.FLASH_ATTENTION),
                ("SDPA memory-efficient", SDPBackend.EFFICIENT_ATTENTION),
                ("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION),
                ("SDPA math", SDPBackend.MATH),
            ):
                if device.type == "cuda" and backend == SDPBackend.MATH:
                    continue
                if device.type != "cuda" and backend in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
                    for case in (fwd, bwd):  # CUDA-only backends: not applicable, not failed
                        results.add(case, shape, name, None, note=f"a CUDA backend: none on {device.type}")
                    continue
                refusal = _sdpa_refusal(sdpa(backend)) if dropout_p else None
                if refusal is not None:  # a backend without dropout (at dropout 0 the same inputs are its to run)
                    for case in (fwd, bwd):
                        results.add(case, shape, name, None, note=f"not applicable at dropout {dropout_p:g}: {refusal}")
                    continue
                impls[name] = (sdpa(backend), (q, k, v), grad.transpose(1, 2))
            for impl, (forward, inputs, out_grad) in impls.items():
                reason = attention_kernel.unsupported_reason(packed[0]) if impl == "ours (csrc)" else None
                if reason is not None:  # on a GPU our kernel must run: its absence fails the run
                    for case in (fwd, bwd):
                        results.add(case, shape, impl, None, **{"error" if device.type == "cuda" else "note": reason})
                    continue
                _time(results, fwd, shape, impl, forward, device, flops=flops_forward)
                failure = try_run(forward)
                if failure:
                    results.add(bwd, shape, impl, None, error=failure)
                    continue
                out = forward()  # with dropout, the backward replays this forward's mask
                backward = functools.partial(torch.autograd.grad, out, inputs, out_grad, retain_graph=True)
                _time(results, bwd, shape, impl, backward, device, flops=2.5 * flops_forward)
                if impl == "ours (csrc)":  # the same backward in deterministic mode: dQ by its own pass, no atomics
                    _time(
                        results,
                        bwd,
                        shape,
                        f"{impl}, deterministic",
                        _deterministic(backward),
                        device,
                        flops=2.5 * flops_forward,
                    )


def _extractor_flops(layers, batch, samples):
    """(forward FLOPs of each layer, input-gradient FLOPs of each layer) of the extractor on `samples` samples."""
    forward, input_grad, in_channels = [], [], 1
    for i, (out_channels, kernel, stride) in enumerate(layers):
        samples = (samples - kernel) // stride + 1
        forward.append(2 * batch * samples * out_channels * in_channels * kernel)
        input_grad.append(0 if i == 0 else forward[-1])  # the waveforms take no gradient
        in_channels = out_channels
    return forward, input_grad


def bench_feature_extractor(results, device, batch, seconds, layers, official):
    """The whole extractor forward and forward + backward, then each layer alone, under bf16 autocast."""
    from spidr_fast.models import SpidRConfig
    from spidr_fast.models.components import FeatureExtractor
    from spidr_fast.ops.feature_extractor import _conv_layer_op

    extractor = FeatureExtractor(SpidRConfig(extractor_conv_layer_config=layers)).to(device)
    waveforms = torch.randn(batch, int(seconds * 16_000), device=device)
    forward_flops, input_grad_flops = _extractor_flops(layers, batch, waveforms.shape[1])
    shape = f"B{batch} S{waveforms.shape[1]} C{layers[0][0]}"

    def forward():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return extractor(waveforms)

    def forward_backward(fn, parameters):
        def run():
            out = fn()
            torch.autograd.grad(out.float().square().mean(), parameters)

        return run

    impls = {"fused (triton)": on_backend("triton", forward), "reference eager": on_backend("reference", forward)}
    if official is not None:
        import importlib

        official_config = importlib.import_module("spidr.config").SpidRConfig(extractor_conv_layer_config=layers)
        theirs = official.models.SpidR(official_config).feature_extractor  # the official modules, with our weights
        theirs.load_state_dict(extractor.state_dict(), strict=True)
        theirs.to(device)

        def official_forward():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return theirs(waveforms)

        impls["official eager"] = official_forward
    reference = on_backend("reference", forward)
    flops = sum(forward_flops)
    backward_flops = 2 * flops + sum(input_grad_flops)
    for impl, fn in _select(impls, {"reference compiled": reference}).items():
        parameters = list((theirs if impl == "official eager" else extractor).parameters())
        _time(results, "feature_extractor fwd", shape, impl, fn, device, flops=flops)
        case = "feature_extractor fwd+bwd"
        _time(results, case, shape, impl, forward_backward(fn, parameters), device, flops=backward_flops)
    if "eager" not in RUN:
        return
    # Each layer alone: ours on its channels-last buffer, the reference on its (B, C, T) input, as the official runs.
    x_flat = F.pad(waveforms, (0, -waveforms.shape[1] % 320)).to(torch.bfloat16).reshape(-1, 1)
    x_official = waveforms.to(torch.bfloat16).unsqueeze(1)
    for i, (layer, (_, _, stride)) in enumerate(zip(extractor.conv_layers, layers, strict=True)):
        weight = layer.conv.weight.detach().to(torch.bfloat16).requires_grad_()
        norm = layer.layer_norm
        inputs_flat = x_flat.detach().requires_grad_(i > 0)
        inputs_official = x_official.detach().requires_grad_(i > 0)

        def ours(inputs=inputs_flat, weight=weight, norm=norm, stride=stride, i=i):
            y, _ = _conv_layer_op(inputs, weight, None, norm.weight, norm.bias, stride, norm.eps, torch.bfloat16)
            torch.autograd.grad(y.float().sum(), [weight, *([inputs] if i else [])])
            return y

        def theirs_layer(inputs=inputs_official, weight=weight, norm=norm, stride=stride, i=i):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                y = F.conv1d(inputs, weight, None, stride)  # the official (B, C, T) layer: LayerNorm transposed
                y = F.gelu(norm(y.transpose(1, 2)).transpose(1, 2))
            torch.autograd.grad(y.float().sum(), [weight, *([inputs] if i else [])])
            return y

        layer_flops = 2 * forward_flops[i] + input_grad_flops[i]
        case = f"feature_extractor layer {i + 1} fwd+bwd"
        _time(results, case, shape, "fused (triton)", on_backend("triton", ours), device, flops=layer_flops)
        _time(results, case, shape, "reference eager", theirs_layer, device, flops=layer_flops)
        with torch.no_grad():  # the next layer's inputs (their values do not change the timings)
            x_flat = _conv_layer_op(x_flat, weight, None, norm.weight, norm.bias, stride, norm.eps, torch.bfloat16)[0]
            x_official = F.conv1d(x_official, weight, None, stride)


def bench_input_checks(results, device, sizes, dtype):
    """What the value checks of the labels cost against the op they guard (the note; target under 1 %): on CPU
    tensors the host read at the public function, on CUDA the heads kernel's flag and its asynchronous assert."""
    from spidr_fast.ops._checks import check_values_in_range

    for n in sizes:
        x = torch.randn(LAYERS, n, DIM, device=device, dtype=dtype)
        weight = torch.randn(LAYERS, CODEWORDS, DIM, device=device, dtype=dtype) * DIM**-0.5
        labels = torch.randint(0, CODEWORDS, (LAYERS, n), device=device)
        op_ms = median_ms(lambda: ops.heads_cross_entropy(x, weight, None, labels), device=device)

        def check():
            if device.type == "cuda":
                return torch._assert_async(torch.ones(1, dtype=torch.int32, device=device))
            return check_values_in_range("labels", labels, CODEWORDS, meaning="K", ignore_index=-100)

        impl = "labels flag + async assert" if device.type == "cuda" else "labels host check"
        ms = median_ms(check, device=device)
        note = f"{ms / op_ms:.2%} of heads_cross_entropy forward ({op_ms:.3f} ms)"
        results.add("input checks", f"L{LAYERS} N{n} K{CODEWORDS}", impl, ms, note=note)


def main(argv: list[str] | None = None) -> Results:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (the default without a GPU)")
    parser.add_argument(
        "--variants",
        choices=(*VARIANTS, "all"),
        default=None,
        help="eager rows, torch.compile rows, or both (default: both on a GPU, eager in a smoke run)",
    )
    parser.add_argument("--output", type=str, default=None, help="results JSON path (default benchmarks/results/)")
    parser.add_argument("--only", nargs="*", choices=STEMS, default=None, help="the ops to measure (default: all)")
    args = parser.parse_args(argv)
    global LAYERS, DIM, CODEWORDS, RUN, COMPILE_BACKEND  # noqa: PLW0603 - the sizes and variants of this run
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = args.smoke or device.type != "cuda"
    variants = args.variants or ("eager" if smoke else "all")
    RUN = set(VARIANTS) if variants == "all" else {variants}
    dtype = torch.bfloat16
    official = import_official()
    name = "kernels" if "eager" in RUN else "kernels_compiled"  # one results file per call of the device check
    results = Results(name, device, measure_peaks(device), None if args.output is None else Path(args.output))
    results.extra["official_spidr"] = "0.2.0 imported" if official else "not importable: official columns absent"
    only = set(args.only or STEMS)
    if smoke:  # SpidR's channel counts, few frames: every path runs, quickly, also in Triton's interpreter
        LAYERS, DIM, CODEWORDS, COMPILE_BACKEND = 2, 64, 16, "eager"
        frames_list, head_sizes, attention_list = [(2, 37)], [53], [(2, 40)]
    else:
        frames_list = [(48, 250), (24, 500), (12, 1000)]  # about 12k frames: the official per-GPU batch
        head_sizes = [1024, 7200, 16384]
        attention_list = [(48, 250), (24, 500), (12, 1000)]
    if "codebook" in only:
        bench_codebook_assign(results, device, frames_list, dtype, official)
        bench_codebook_update(results, device, official)
    if "heads_cross_entropy" in only:
        bench_heads_cross_entropy(results, device, head_sizes, dtype)
        bench_input_checks(results, device, head_sizes, dtype)
    if "attention" in only and "eager" in RUN:  # attention has no compiled variant: SDPA's backends are the bar
        bench_attention(results, device, attention_list, dtype, heads=12 if not smoke else 2, head_dim=64)
    if "dropin" in only and "eager" in RUN:  # OnlineCodebook against VectorQuantize (benchmarks/dropin.py)
        from benchmarks.dropin import bench_dropin

        bench_dropin(results, device, smoke)
    # Last, being the longest (a cut-off then costs the rows measured before it least): the official batch,
    # 12 × 20 s; a smoke run: 0.1 s through two small layers.
    if "feature_extractor" in only:
        extractor = [(32, 10, 5), (32, 3, 2)] if smoke else [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2
        bench_feature_extractor(results, device, 1 if smoke else 12, 0.1 if smoke else 20, extractor, official)
    results.finish()
    return results


if __name__ == "__main__":
    sys.exit(report_user_errors(main))
