"""Compile every Triton kernel for sm_90 and sm_80 at the SpidR shapes, without a GPU, and print its resources.

    python -m spidr_fast.ops.kernel_report [--json]

Runs Triton's real compiler (not the interpreter: run it without TRITON_INTERPRET=1) down to a cubin with the
ptxas that ships with Triton, which catches lowering errors and shared-memory and register limits that the CPU
interpreter cannot. Registers and spills come from `cuobjdump --dump-resource-usage` on the cubin.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from spidr_fast.ops.kernels import codebook, feature_extractor, heads_cross_entropy

# SpidR base: 8 codebooks of 256 codewords over 768 channels; ~12k frames per batch (16 × 750), bf16 teacher layers.
NUM_LAYERS, NUM_CODEWORDS, DIM, FRAMES = 8, 256, 768, 12_000
TARGETS = {"sm_90": GPUTarget("cuda", 90, 32), "sm_80": GPUTarget("cuda", 80, 32)}
SHARED_MEMORY_LIMIT = {"sm_90": 227 * 1024, "sm_80": 163 * 1024}  # per block, opt-in maximum
_TRITON_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64"}


def _signature(kernel: triton.JITFunction, pointers: dict[str, torch.dtype], floats: tuple[str, ...] = ()) -> dict:
    """Every argument of `kernel`: pointers with their element type, floats as fp32, constexprs, the rest i32."""
    signature = {}
    for param in kernel.params:
        if param.is_constexpr:
            signature[param.name] = "constexpr"
        elif param.name in pointers:
            signature[param.name] = "*" + _TRITON_DTYPES[pointers[param.name]]
        else:
            signature[param.name] = "fp32" if param.name in floats else "i32"
    return signature


def _split(config: dict) -> tuple[dict, dict]:
    """A launcher's config → (constexprs, compile options)."""
    keys = ("num_warps", "num_stages", "debug", "sanitize_overflow")
    options = {key: config.pop(key) for key in keys if key in config}
    return config, options


def kernel_specs(capability: int) -> Iterator[tuple[str, triton.JITFunction, dict, dict, dict]]:
    """(name, kernel, signature, constexprs, options) of each kernel as the launchers call it at SpidR shapes on a
    GPU of this compute capability (major)."""
    bf16, fp32, i64 = torch.bfloat16, torch.float32, torch.int64
    rows = dict(x_ptr=bf16, index_ptr=i64, mean_ptr=fp32, rstd_ptr=fp32)
    stats = dict(labels_ptr=i64, batch_counts_ptr=fp32, batch_sums_ptr=fp32)
    centroids = dict(codebook_ptr=fp32, counts_ptr=fp32, centroid_hi_ptr=fp32, centroid_lo_ptr=fp32, norms_ptr=fp32)

    config, options = _split(codebook.stats_config(DIM))
    kernel = codebook._instance_norm_stats_kernel
    signature = _signature(kernel, dict(x_ptr=bf16, lengths_ptr=i64, mean_ptr=fp32, rstd_ptr=fp32), ("eps",))
    yield "instance_norm_stats", kernel, signature, dict(HAS_LENGTHS=True, **config), options

    config, options = _split(codebook.centroids_config(DIM))
    kernel = codebook._centroids_kernel
    yield "codebook_centroids", kernel, _signature(kernel, centroids), config, options

    kernel = codebook._assign_kernel
    flags = dict(GATHER=True, NORMALIZE=True, ATOMIC_STATS=True)
    for i, config in enumerate(codebook.assign_configs(capability)):  # each one autotune may pick there
        config, options = _split(config)
        for metric in ("l2", "cosine") if i == 0 else ("l2",):
            constexprs = dict(COSINE=metric == "cosine", **flags, **config)
            name = f"codebook_assign[{metric}]" if i == 0 else f"codebook_assign[l2,config {i}]"
            yield name, kernel, _signature(kernel, rows | centroids | stats), constexprs, options

    config, options = _split(codebook.statistics_config(NUM_CODEWORDS, DIM))
    kernel = codebook._statistics_kernel
    constexprs = dict(GATHER=True, NORMALIZE=True, **config)
    yield "codebook_statistics[deterministic]", kernel, _signature(kernel, rows | stats), constexprs, options

    config, options = _split(codebook.ema_config(DIM))
    kernel = codebook._ema_update_kernel
    pointers = dict(codebook_ptr=fp32, counts_ptr=fp32, batch_counts_ptr=fp32, batch_sums_ptr=fp32)
    yield "codebook_ema_update", kernel, _signature(kernel, pointers, ("decay",)), config, options

    for dtype in (bf16, fp32):
        heads = dict(x_ptr=dtype, w_ptr=dtype, b_ptr=dtype, labels_ptr=i64, lse_ptr=fp32)
        # Multiples of 16 at SpidR's shapes, as a launch specialises them: pointers, K, D and the row strides.
        aligned = ("num_codewords", "dim", "stride_xl", "stride_xn", "stride_wl", "stride_wk", "stride_bl")
        name = _TRITON_DTYPES[dtype]
        config, options = _split(heads_cross_entropy.heads_config(NUM_CODEWORDS, DIM, dtype))
        config["DOT_UPCAST"] = False  # what a GPU runs
        kernel = heads_cross_entropy._forward_kernel
        pointers = heads | dict(nll_ptr=fp32, prob_sums_ptr=fp32, labels_ok_ptr=fp32)
        options["divisible_by_16"] = (*pointers, *aligned)
        signature = _signature(kernel, pointers, ("scale",))
        constexprs = dict(HAS_BIAS=True, ONE_TILE=True, **config)
        yield f"heads_forward[{name}]", kernel, signature, constexprs, options
        config, options = _split(heads_cross_entropy.backward_config(NUM_CODEWORDS, DIM, dtype, capability))
        config["DOT_UPCAST"] = False
        kernel = heads_cross_entropy._backward_kernel
        pointers = heads | dict(grad_loss_ptr=fp32, grad_x_ptr=dtype, grad_w_ptr=fp32, bias_grad_ptr=fp32)
        options["divisible_by_16"] = (*pointers, *aligned)
        signature = _signature(kernel, pointers, ("scale", "inv_layers"))
        yield f"heads_backward[{name}]", kernel, signature, dict(HAS_BIAS=True, **config), options

    yield from _feature_extractor_specs()


def _feature_extractor_specs() -> Iterator[tuple[str, triton.JITFunction, dict, dict, dict]]:
    """The extractor's kernels as its bf16 layers call them: K = 10 (layer 1), 1536 (k 3 × 512), C = 512, with the
    arguments that are multiples of 16 there marked so (as a launch specialises them)."""
    bf16, fp32 = torch.bfloat16, torch.float32
    gemm = dict(x_ptr=bf16, w_ptr=bf16, bias_ptr=bf16, pre_ptr=bf16, grad_pre_ptr=bf16, grad_x_ptr=bf16)
    kernel = feature_extractor._conv_forward_kernel
    for reduction in (10, 1536):
        config, options = _split(feature_extractor._gemm_config(bf16, reduction))
        config["DOT_UPCAST"] = False  # what a GPU runs
        aligned = (*gemm, "out_channels") + (("row_step", "reduction") if reduction % 16 == 0 else ())
        options["divisible_by_16"] = aligned
        constexprs = dict(HAS_BIAS=False, **config)
        yield f"extractor_conv[K={reduction}]", kernel, _signature(kernel, gemm), constexprs, options
    config, options = _split(feature_extractor._gemm_config(bf16, 512))
    config["DOT_UPCAST"] = False
    options["divisible_by_16"] = (*gemm, "out_channels", "frame_width", "reduction")
    kernel = feature_extractor._conv_input_grad_kernel
    yield "extractor_conv_input_grad", kernel, _signature(kernel, gemm), dict(NUM_GROUPS=2, **config), options
    norm = dict(pre_ptr=bf16, norm_w_ptr=fp32, norm_b_ptr=fp32, y_ptr=bf16, grad_y_ptr=bf16, grad_pre_ptr=bf16,
                partials_ptr=fp32)  # fmt: skip
    flags = dict(HAS_NORM=True, HAS_NORM_BIAS=True)
    for name, kernel in (("extractor_norm_gelu", feature_extractor._norm_gelu_forward_kernel),
                         ("extractor_norm_gelu_backward", feature_extractor._norm_gelu_backward_kernel)):  # fmt: skip
        config, options = _split(feature_extractor._norm_config(512))
        options["divisible_by_16"] = (*norm, "channels")
        yield name, kernel, _signature(kernel, norm, ("eps",)), dict(**flags, **config), options


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack bytes per thread) from `cuobjdump --dump-resource-usage`; with the ABI that
    Triton uses, a non-zero stack holds register spills."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as file:
            file.write(cubin)
        command = [triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", path]
        usage = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return int(re.search(r"REG:(\d+)", usage).group(1)), int(re.search(r"STACK:(\d+)", usage).group(1))


def compile_all() -> list[dict]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("run without TRITON_INTERPRET=1: the interpreter does not compile kernels")
    report = []
    for target_name, target in TARGETS.items():
        for name, kernel, signature, constexprs, options in kernel_specs(target.arch // 10):
            # What a launch specialises on: arguments that are multiples of 16 (aligned pointers, channel counts)
            # let the loads vectorise and the loops pipeline, which changes registers and shared memory.
            aligned = options.pop("divisible_by_16", ())
            attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(signature) if name in aligned}
            source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
            compiled = triton.compile(source, target=target, options=options)
            registers, spills = _resource_usage(compiled.asm["cubin"])
            report.append(
                dict(
                    kernel=name,
                    target=target_name,
                    num_warps=options["num_warps"],
                    registers=registers,
                    spill_bytes=spills,
                    shared_bytes=compiled.metadata.shared,
                )
            )
    return report


def main() -> None:
    report = compile_all()
    if "--json" in sys.argv[1:]:
        print(json.dumps(report))
        return
    print(f"SpidR shapes: L={NUM_LAYERS}, K={NUM_CODEWORDS}, D={DIM}, ~{FRAMES} frames")
    print(f"{'kernel':<36}{'target':<8}{'warps':>6}{'registers':>11}{'spills (B)':>12}{'shared (B)':>12}")
    for row in report:
        print(
            f"{row['kernel']:<36}{row['target']:<8}{row['num_warps']:>6}{row['registers']:>11}"
            f"{row['spill_bytes']:>12}{row['shared_bytes']:>12}"
        )


if __name__ == "__main__":
    main()
