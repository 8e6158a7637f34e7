"""A full SpidR training step, side by side: the official spidr 0.2.0 model and spidr_fast's, same config,
same weights, same batch, same dtype, in one process.

    python benchmarks/train_step.py                       # on a GPU: spidr-base at the official per-GPU batch
    python benchmarks/train_step.py --variants compiled   # only the compiled variants (minutes of compilation)
    python benchmarks/train_step.py --smoke               # a tiny model and batch (the default without a GPU)

A step is what the official loop does: bf16 autocast forward (student, teacher, codebook assignment and EMA
codebook update), backward, gradient clipping, fused AdamW, teacher EMA. Variants: official eager, official
compiled (`model.compile(dynamic=True)`, as its train.py; torch 2.11's inductor fails on it, a known failure
recorded as such), a labelled stand-in for it that torch 2.11 compiles (`dynamic=False`: the batch has the fixed
official crop, so nothing is lost), and ours, eager and compiled, on the reference ops, on the default ops (what
spidr_fast.ops picks on the device) and with our flash-attention forced. "frozen extractor" variants are the step
after `freeze_step` (200k of the 400k steps): the feature extractor and projection take no gradient, as the
official code freezes them. Each row is printed and saved as soon as it is measured; a variant that fails keeps its
error in the file and makes the run exit 1. Reported: ms/step (median), frames/s, model FLOPs utilisation against
the bf16 matmul peak measured in the same run, the projected hours for 400k steps (per-GPU step time;
data-parallel communication not included), peak memory per variant, and a per-phase breakdown of our eager step
(the feature extractor's forward and backward apart).
"""

import contextlib
import copy
import dataclasses
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python benchmarks/train_step.py` from a checkout

from benchmarks.common import Results, import_official, measure_peaks, median_ms, on_backend, try_run  # noqa: E402
from spidr_fast import ops  # noqa: E402
from spidr_fast.cli import ArgumentParser, positive, report_user_errors  # noqa: E402
from spidr_fast.data.masking import MaskingConfig, compute_mask_indices  # noqa: E402
from spidr_fast.models import SpidR, SpidRConfig  # noqa: E402
from spidr_fast.models.components import ConvPositionalEmbedding, num_frames  # noqa: E402

TOTAL_STEPS = 400_000
# SpidR's layout at toy sizes: three 32-channel convolutions, four 128-wide layers of two heads.
SMOKE_EXTRACTOR = dict(extractor_conv_layer_config=[(32, 10, 5), (32, 3, 2), (32, 2, 2)])
SMOKE_ENCODER = dict(encoder_embed_dim=128, encoder_num_heads=2, encoder_num_layers=4, encoder_ff_interm_features=256)
SMOKE_POSITIONS = dict(encoder_pos_conv_kernel=16, encoder_pos_conv_groups=4, encoder_pos_conv_depth=2)
SMOKE_CONFIG = SMOKE_EXTRACTOR | SMOKE_ENCODER | SMOKE_POSITIONS | dict(codebook_size=32, num_codebooks=2)
# 2: the positional convolution counted at its per-layer kernel (19 for spidr-base), not the whole stack's 95 in
# each of its 5 layers (1.3 TFLOP a step too many). Results without it are recomputed by benchmarks/report.py.
FLOP_COUNT_VERSION = 2
# Failures outside this project, recorded as known (the run still passes): variant -> (the errors it raises, why).
# Any other error of the variant fails the run.
KNOWN_FAILURES = {
    "official compiled": (
        ("InductorError", "BackendCompilerFailed"),  # how torch 2.11's dynamo reports an inductor failure
        (
            "torch 2.11's inductor fails on the official model.compile(dynamic=True) after about 2 minutes (H100 "
            "2026-11-27, H200 2026-11-28); see the stand-in row"
        ),
    )
}


def known_failure(variant: str, error: str) -> str:
    """Why `error` of `variant` is a known failure outside this project, or "" when it is not one."""
    errors, why = KNOWN_FAILURES.get(variant, ((), ""))
    return why if error.startswith(errors) else ""


def positional_flops(cfg: SpidRConfig, tokens: int) -> int:
    """Forward FLOPs of the positional convolution over `tokens` frames: each layer at its own kernel, as the model
    builds it (95 // 5 = 19 for spidr-base), not the stack's 95."""
    with torch.device("meta"):  # the layers exactly as the model makes them, nothing allocated
        convs = ConvPositionalEmbedding(
            cfg.encoder_embed_dim, cfg.encoder_pos_conv_kernel, cfg.encoder_pos_conv_groups, cfg.encoder_pos_conv_depth
        ).convs
    return sum(
        2 * tokens * conv.out_channels * (conv.in_channels // conv.groups) * conv.kernel_size[0] for conv in convs
    )


def step_flops(
    cfg: SpidRConfig, batch: int, samples: int, masked: int, *, frozen_extractor: bool = False
) -> dict[str, float]:
    """Model FLOPs of one step (multiply-add = 2), by part; backward = 2× forward for what trains (not the
    extractor and projection when `frozen_extractor`)."""
    flops: dict[str, float] = {}
    length, channels, extractor = samples, 1, 0.0
    for out_channels, kernel, stride in cfg.extractor_conv_layer_config:
        length = (length - kernel) // stride + 1
        extractor += 2 * channels * out_channels * kernel * length * batch
        channels = out_channels
    frames = length
    d, f = cfg.encoder_embed_dim, cfg.encoder_ff_interm_features
    tokens = batch * frames
    projection = 2 * tokens * channels * d
    positional = positional_flops(cfg, tokens)
    dense = 2 * tokens * (4 * d * d + 2 * d * f) * cfg.encoder_num_layers
    attention = 4 * batch * frames**2 * d * cfg.encoder_num_layers
    if frozen_extractor:
        flops["feature extractor (fwd, frozen)"] = extractor + projection
    else:
        flops["feature extractor (fwd+bwd)"] = 3 * (extractor + projection)
    flops["student (fwd+bwd)"] = 3 * (positional + dense + attention)
    flops["  of which attention"] = 3 * attention
    flops["teacher (fwd)"] = positional + dense + attention
    flops["heads (fwd+bwd)"] = 3 * 2 * masked * d * cfg.codebook_size * cfg.num_codebooks
    flops["total"] = sum(v for k, v in flops.items() if not k.startswith(" "))
    return flops


@dataclasses.dataclass
class Batch:
    waveforms: torch.Tensor
    mask_indices: torch.Tensor


def make_batch(cfg: SpidRConfig, batch: int, samples: int, device: torch.device) -> Batch:
    generator = torch.Generator().manual_seed(0)
    frames = int(num_frames(cfg, torch.tensor(samples)))
    lengths = torch.full((batch,), frames, dtype=torch.int64)
    mask_indices = compute_mask_indices(MaskingConfig(), lengths, generator)
    waveforms = torch.randn(batch, samples, generator=generator)
    return Batch(waveforms.to(device), mask_indices.to(device))


class PhaseTimer:
    """Times named phases of a step; on a GPU with CUDA events, read once after the step."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.spans = device, defaultdict(list)

    def now(self) -> object:
        """A point in the device's time: a recorded CUDA event, or the host clock on a CPU."""
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str):
        start = self.now()
        yield
        self.spans[name].append((start, self.now()))

    def wrap(self, owner: object, attribute: str, name: str) -> Callable[[], None]:
        """Time every call of owner.attribute as `name`; returns the undo."""
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            with self.phase(name):
                return original(*args, **kwargs)

        setattr(owner, attribute, timed)
        return lambda: setattr(owner, attribute, original)

    def milliseconds(self) -> dict[str, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return {k: sum(s.elapsed_time(e) for s, e in v) for k, v in self.spans.items()}
        return {k: sum(e - s for s, e in v) * 1000 for k, v in self.spans.items()}


def make_step(model, batch: Batch, dtype: torch.dtype, timer: PhaseTimer | None = None) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    fused = batch.waveforms.is_cuda
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=fused)
    phase = timer.phase if timer else lambda _name: contextlib.nullcontext()
    counter = [0]

    def step() -> None:
        with torch.autocast(batch.waveforms.device.type, dtype):
            loss, _ = model(batch.waveforms, mask_indices=batch.mask_indices)
        with phase("backward"):
            (loss.sum() / loss.numel()).backward()
        with phase("optimizer (clip + AdamW)"):
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        with phase("teacher EMA"):
            counter[0] += 1
            model.update_ema(counter[0])

    return step


def breakdown(model, batch: Batch, dtype: torch.dtype, device: torch.device) -> dict[str, float]:
    """ms per phase of our eager step (the phases synchronise nothing; events are read after the step). The
    backward splits where the features' gradient is complete: everything after it is the feature extractor's and
    projection's backward, since the features are their only way into the graph."""
    timer = PhaseTimer(device)
    undo = [
        timer.wrap(model, "_student_predictions", "student (fwd)"),
        timer.wrap(model.teacher, "run_layers", "teacher (fwd)"),
        timer.wrap(model.codebooks, "assign_layers", "codebooks: norm + assign"),
        timer.wrap(model.codebooks, "update_", "codebooks: EMA update"),
        timer.wrap(ops, "heads_cross_entropy", "heads + loss (fwd)"),
    ]
    features, features_grad_done = model._features, []

    def timed_features(waveforms: torch.Tensor) -> torch.Tensor:
        with timer.phase("feature extractor (fwd)"):
            out = features(waveforms)
        if out.requires_grad:
            out.register_hook(lambda _grad: features_grad_done.append(timer.now()))
        return out

    model._features = timed_features
    step = make_step(model, batch, dtype, timer)
    step()  # warm-up
    timer.spans.clear()
    features_grad_done.clear()
    with timer.phase("whole step"):
        step()
    for restore in undo:
        restore()
    del model._features
    if features_grad_done:
        ((start, end),), (split,) = timer.spans.pop("backward"), features_grad_done
        timer.spans["backward (encoders, heads)"].append((start, split))
        timer.spans["feature extractor (bwd)"].append((split, end))
    return timer.milliseconds()


def official_spidr(official: ModuleType | None, ours: SpidR) -> torch.nn.Module:
    """The official spidr 0.2.0 SpidR of `ours`'s config and weights, on its device, in training mode. Without the
    package (`official` None) it raises: the official rows are the baselines, and each fails without it."""
    if official is None:
        raise ImportError("the official spidr 0.2.0 package is not importable (carry its wheel)")
    from spidr.config import SpidRConfig as OfficialConfig

    device = next(ours.parameters()).device
    model = official.models.SpidR(OfficialConfig(**dataclasses.asdict(ours.cfg))).to(device).train()
    model.load_state_dict(ours.state_dict(), strict=True)
    return model


def main(argv: list[str] | None = None) -> Results:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny model and batch (the default without a GPU)")
    parser.add_argument("--batch", type=positive(int), default=None, help="clips per step (default: 12 on a GPU)")
    parser.add_argument("--seconds", type=positive(float), default=None, help="clip length (default: 20 s on a GPU)")
    parser.add_argument(
        "--variants",
        choices=("eager", "compiled", "all"),
        default=None,
        help="eager variants and the phase breakdown, compiled variants, or both "
        "(default: both on a GPU; a smoke run compiles nothing)",
    )
    parser.add_argument("--skip", nargs="*", default=[], help="variants to leave out, e.g. 'official compiled'")
    parser.add_argument("--only", nargs="*", default=None, help="only these variants (default: every one)")
    parser.add_argument("--output", type=str, default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = args.smoke or device.type != "cuda"
    variants = args.variants or ("eager" if smoke else "all")
    run = {"eager", "compiled"} if variants == "all" else {variants}
    # The official per-GPU batch: 3.8M samples, about 12 clips of 20 s at 16 kHz.
    batch_size = args.batch or (2 if smoke else 12)
    samples = int((args.seconds or (0.5 if smoke else 20.0)) * 16000)
    dtype = torch.bfloat16
    cfg = SpidRConfig(**SMOKE_CONFIG) if smoke else SpidRConfig()
    batch = make_batch(cfg, batch_size, samples, device)
    masked = batch.mask_indices.numel()
    frames = batch_size * int(num_frames(cfg, torch.tensor(samples)))
    flops = step_flops(cfg, batch_size, samples, masked)
    flops_frozen = step_flops(cfg, batch_size, samples, masked, frozen_extractor=True)
    name = "train_step" if "eager" in run else "train_step_compiled"  # one results file per call of the device check
    results = Results(name, device, measure_peaks(device), None if args.output is None else Path(args.output))
    results.extra["flop_count_version"] = FLOP_COUNT_VERSION
    shape = f"B{batch_size} x {samples / 16000:.1f}s ({frames} frames, {masked} masked)"
    # A smoke run's "compiled" variants trace with dynamo but generate no code (inductor takes minutes on a CPU).
    compile_backend = "eager" if smoke else "inductor"
    if smoke and "compiled" in run:
        results.extra["compiled_variants"] = "smoke run: torch.compile with backend='eager' (dynamo only, no inductor)"

    torch.manual_seed(0)
    ours_template = SpidR(cfg).to(device).train()
    variants: dict[str, Callable[[], Callable[[], None]]] = {}
    official = import_official()

    def official_model(compile_dynamic: bool | None, frozen: bool = False):
        def build():
            model = official_spidr(official, ours_template)
            if frozen:
                model.freeze_extractor()
            if compile_dynamic is not None:
                model.compile(dynamic=compile_dynamic, backend=compile_backend)
            return make_step(model, batch, dtype)

        return build

    variants["official eager"] = official_model(None)
    variants["official eager, frozen extractor"] = official_model(None, frozen=True)

    def ours(backend: str | None, compiled: bool, frozen: bool = False, **per_op: str):
        def build():
            model = copy.deepcopy(ours_template)
            if frozen:
                model.freeze_extractor()
            if compiled:
                model.compile_encoders(compile_backend)
            return on_backend(backend, make_step(model, batch, dtype), **per_op)

        return build

    # "default ops": what the dispatch picks on this device; "+ our flash-attention" forces csrc/'s attention too.
    variants["ours eager (reference ops)"] = ours("reference", False)
    variants["ours eager (default ops)"] = ours(None, False)
    variants["ours eager (default ops), frozen extractor"] = ours(None, False, frozen=True)
    variants["ours eager + our flash-attention"] = ours(None, False, attention="cuda")
    variants["ours compiled (default ops)"] = ours(None, True)  # first: the row a short run must keep
    # What torch 2.11 can compile of the official model: the batch has the fixed official crop, one shape.
    variants["official compiled (stand-in: dynamic=False)"] = official_model(False)
    variants["ours compiled (default ops), frozen extractor"] = ours(None, True, frozen=True)
    variants["ours compiled (reference ops)"] = ours("reference", True)
    variants["ours compiled + our flash-attention"] = ours(None, True, attention="cuda")
    # Last: on torch 2.11 its compilation ran for minutes, then failed in inductor.
    variants["official compiled"] = official_model(True)
    unknown = (set(args.skip) | set(args.only or ())) - set(variants)
    if unknown:
        raise ValueError(f"--skip/--only: no variant {sorted(unknown)}; the variants: {list(variants)}")

    times: dict[str, float | None] = {}
    for name, build in variants.items():
        wanted = args.only is None or name in args.only
        if not wanted or name in args.skip or ("compiled" if "compiled" in name else "eager") not in run:
            continue
        counted = flops_frozen if "frozen" in name else flops
        if "flash-attention" in name and device.type != "cuda":
            note = "our flash-attention runs on CUDA devices (its CPU emulator build is for the tests)"
            results.add("train step", shape, name, None, note=note)
            continue
        memory_before = _reset_peak_memory(device)
        step: Callable[[], None] | None = None
        try:
            step = build()
            failure = try_run(step) or (None if smoke else try_run(step))  # warm-up, compilation included
        except Exception as error:  # noqa: BLE001 - a variant that fails is recorded, then fails the run
            failure = f"{type(error).__name__}: {error}"[:160]
        # A smoke run's time means nothing: one timed step after the warm-up is enough.
        ms = (
            None if failure else median_ms(step, device=device, rep_ms=0 if smoke else 1500, min_runs=1 if smoke else 3)
        )
        times[name] = ms
        rate = (
            "" if ms is None else f"{frames / ms * 1000:,.0f} frames/s, {ms * TOTAL_STEPS / 3.6e6:.1f} h for 400k steps"
        )
        results.add(
            "train step",
            shape,
            name,
            ms,
            flops=counted["total"],
            note=rate,
            error=failure or "",
            known_failure=known_failure(name, failure or ""),
            peak_memory_gib=_peak_memory_gib(device, memory_before),
        )
        del step
        if device.type == "cuda":
            torch.cuda.empty_cache()

    baselines = ("official compiled", "official compiled (stand-in: dynamic=False)", "official eager")
    baseline = next((b for b in baselines if times.get(b)), None)
    if baseline:
        results.extra["speedup_vs_official"] = {k: times[baseline] / v for k, v in times.items() if v}
        results.extra["speedup_baseline"] = baseline
    results.extra["flops_per_step"] = flops
    results.extra["flops_per_step_frozen_extractor"] = flops_frozen
    breakdowns = {}
    if "eager" in run and args.only is None:
        for backend, ops_name in (("reference", "reference ops"), (None, "default ops")):
            phases = on_backend(backend, lambda: breakdown(copy.deepcopy(ours_template), batch, dtype, device))
            breakdowns[ops_name] = phases()
            results.extra["breakdown_ms_ours_eager"] = breakdowns
            results.write(quiet=True)
    results.print_table()
    if baseline:
        for name, ratio in results.extra["speedup_vs_official"].items():
            print(f"  {name:<44} {ratio:5.2f}x the {baseline} step")
    print("model FLOPs per step:")
    for part, value in flops.items():
        print(f"  {part:<30} {value / 1e12:9.3f} TFLOP")
    for ops_name, phases in breakdowns.items():
        print(
            f"breakdown of our eager step on the {ops_name} (ms; one process, so no communication: DDP adds the "
            "gradient buckets' all-reduce and one flat codebook all-reduce per step):"
        )
        for part, ms in phases.items():
            print(f"  {part:<30} {ms:9.2f}")
    results.finish()
    return results


def _reset_peak_memory(device: torch.device) -> int:
    """Bytes allocated now, with the peak counter restarted from here (0 on a CPU)."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _peak_memory_gib(device: torch.device, before: int) -> float | None:
    """GiB allocated at the peak since `_reset_peak_memory`, beyond what was allocated then: the variant's model
    copy, optimizer state and activations (torch.cuda.max_memory_allocated); None on a CPU."""
    if device.type != "cuda":
        return None
    return (torch.cuda.max_memory_allocated(device) - before) / 2**30


if __name__ == "__main__":
    sys.exit(report_user_errors(main))
