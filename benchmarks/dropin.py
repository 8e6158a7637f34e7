"""spidr_fast.nn.OnlineCodebook against vector-quantize-pytorch's VectorQuantize (cosine similarity, EMA updates),
at SpidR's shapes: 8192 frames of 768 channels, 256 codewords, bf16 input.

    python benchmarks/dropin.py            # on a GPU: the SpidR shapes, benchmarks/results/dropin-*.json
    python benchmarks/dropin.py --smoke    # 512 frames x 64 channels, 32 codewords (the default without a GPU)
    python benchmarks/dropin.py --spidr-shapes   # SpidR's shapes on a CPU (reference ops; seconds per row)

Rows: the training forward (assignment + EMA update: VectorQuantize's also returns the quantised frames and its
commitment loss, which a masked-prediction objective does not need) and the eval forward (assignment alone), each
with and without a padding mask. The GPU target is ours at least 2x faster than VectorQuantize's training forward
(docs/dropin.md). VectorQuantize is an optional extra: `pip install -e ".[vq]"` (see docs/dropin.md); without it
its rows say so and ours still run.
"""

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the Triton kernels run in Triton's interpreter, chosen before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python benchmarks/dropin.py` from a checkout

from benchmarks.common import Results, measure_peaks, median_ms, try_run  # noqa: E402
from spidr_fast.cli import ArgumentParser, report_user_errors  # noqa: E402
from spidr_fast.nn import OnlineCodebook  # noqa: E402

DECAY = 0.8  # VectorQuantize's default; the same for both


def vector_quantize(dim: int, codebook_size: int):
    """VectorQuantize with cosine similarity and EMA updates, or None when vector-quantize-pytorch is absent."""
    try:
        from vector_quantize_pytorch import VectorQuantize
    except ImportError:
        return None
    return VectorQuantize(dim=dim, codebook_size=codebook_size, use_cosine_sim=True, decay=DECAY)


def bench_dropin(results: Results, device: torch.device, smoke: bool) -> None:
    """The rows, into `results` (this script's own file, or the device check's kernels.json)."""
    frames, dim, codebook_size = (512, 64, 32) if smoke else (8192, 768, 256)
    batch = 16  # utterances: 16 x 512 frames at SpidR's shapes
    shape = f"{batch}x{frames // batch}x{dim} K{codebook_size} bf16"
    x = torch.randn(batch, frames // batch, dim, device=device, dtype=torch.bfloat16)
    lengths = torch.randint(frames // batch // 2, frames // batch + 1, (batch,), device=device)
    mask = torch.arange(frames // batch, device=device) < lengths.unsqueeze(1)
    ours = OnlineCodebook(dim, codebook_size, decay=DECAY, metric="cosine").to(device)
    theirs = vector_quantize(dim, codebook_size)
    theirs = theirs.to(device) if theirs is not None else None
    impls = {"OnlineCodebook (spidr_fast)": ours, "VectorQuantize (vector-quantize-pytorch)": theirs}
    for mode in ("train", "eval"):
        for padded in (False, True):
            case = f"{mode} forward" + (", mask" if padded else "")
            for impl, module in impls.items():
                if module is None:
                    results.add(case, shape, impl, None, note="vector-quantize-pytorch not installed")
                    continue
                module.train(mode == "train")

                def forward(module=module, padded=padded):
                    with torch.no_grad():
                        return module(x, mask=mask if padded else None)

                failure = try_run(forward)
                ms = None if failure else median_ms(forward, device=device)
                results.add(case, shape, impl, ms, bytes_moved=x.numel() * x.element_size(), error=failure or "")


def main(argv: list[str] | None = None) -> Results:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (the default without a GPU)")
    parser.add_argument("--spidr-shapes", action="store_true", help="SpidR's shapes on a CPU too")
    parser.add_argument("--output", type=str, default=None, help="results JSON path (default benchmarks/results/)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = args.smoke or (device.type != "cuda" and not args.spidr_shapes)
    results = Results("dropin", device, measure_peaks(device), None if args.output is None else Path(args.output))
    bench_dropin(results, device, smoke)
    results.finish()
    return results


if __name__ == "__main__":
    sys.exit(report_user_errors(main))
