"""Can the input pipeline feed a GPU? Audio seconds delivered per second per loader worker, end to end through the
real DataLoader (sampler, crop plan, decoding, normalisation, collation, masks, pinned memory), on audio files
written to disk in FLAC and WAV.

    python benchmarks/input_pipeline.py            # the full run (CPU work, minutes): benchmarks/results/*.json
    python benchmarks/input_pipeline.py --smoke    # a few short files, one repeat (CI)

Corpora (16-bit, 16 kHz mono, made of synthetic-corpus utterances, written once under .benchmarks/): LibriSpeech-
like utterances of 2–35 s (mean ~12.5 s) and Libri-Light-like long files of 60–120 s. Loader settings are the
official ones (crop to the batch's shortest, at most 320k samples per clip, 3.8M samples per batch) with one
worker, so a row is the rate of one decoding core; files are read from the page cache (decoding, not the disk,
is measured). Decoding modes: "crop only" (what spidr_fast does without normalize), "whole files" (the
pipeline before crops were planned: decode everything, then crop), "normalize" (the official default: whole-file
statistics, so whole files). Workers per GPU = the audio a GPU consumes per second / one worker's rate, where a
GPU consumes 3.8M samples (237.5 s) per step: at the official 135 ms step, and at 3× that speed.
"""

import statistics
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python benchmarks/input_pipeline.py` from a checkout

from benchmarks.common import ROOT, Results, measure_peaks  # noqa: E402
from spidr_fast.cli import ArgumentParser, positive, report_user_errors  # noqa: E402
from spidr_fast.data.loading import AudioSource, DataConfig, build_loader  # noqa: E402
from spidr_fast.data.masking import MaskingConfig  # noqa: E402
from spidr_fast.data.synthetic import SAMPLE_RATE, SyntheticCorpus  # noqa: E402
from spidr_fast.models import SpidRConfig  # noqa: E402
from spidr_fast.models.components import num_frames  # noqa: E402

OFFICIAL_STEP_S = 0.135  # the paper's 400k steps in 15 h on H100s
BATCH_SAMPLES = DataConfig().max_batch_length
CORPORA = {  # name: (files, shortest and longest seconds, mean seconds or None for uniform)
    "LibriSpeech-like": (72, 2.0, 35.0, 12.5),
    "Libri-Light-like long files": (12, 60.0, 120.0, None),
}
SMOKE_CORPUS = {"smoke": (4, 2.0, 4.0, None)}
MODES = ("crop only", "whole files", "normalize")


def write_corpus(
    folder: Path, audio_format: str, files: int, shortest: float, longest: float, mean: float | None
) -> Path:
    """Files of the wanted lengths, cut from concatenated synthetic utterances; reused when already written."""
    import soundfile

    manifest = folder / "manifest.tsv"
    if manifest.is_file():
        return manifest
    rng = np.random.default_rng(0)
    seconds = (
        rng.uniform(shortest, longest, files)
        if mean is None
        else np.clip(rng.normal(mean, 4.0, files), shortest, longest)
    )
    corpus = SyntheticCorpus(num_utterances=16)
    pieces = [corpus.waveform(i) for i in range(corpus.num_utterances)]
    folder.mkdir(parents=True, exist_ok=True)
    rows = [str(folder.resolve())]
    for i, length in enumerate((seconds * SAMPLE_RATE).astype(int)):
        order = rng.permutation(len(pieces))
        waveform = np.concatenate([pieces[j] for j in np.resize(order, int(length) // 32_000 + 2)])[:length]
        soundfile.write(folder / f"f{i:03d}.{audio_format}", waveform, SAMPLE_RATE, subtype="PCM_16")
        rows.append(f"f{i:03d}.{audio_format}\t{length}")
    partial_manifest = manifest.with_suffix(".partial")  # a manifest exists only once every file does
    partial_manifest.write_text("\n".join(rows) + "\n")
    partial_manifest.replace(manifest)
    return manifest


class WholeFileSource(AudioSource):
    """The decoding before crops were planned: the whole file, then the crop's samples."""

    def load(self, index: int, start: int = 0, num_samples: int = -1, out: np.ndarray | None = None) -> np.ndarray:
        waveform = super().load(index)[start : None if num_samples < 0 else start + num_samples]
        if out is not None:
            out[: len(waveform)] = waveform
        return waveform


def build(manifest: Path, mode: str, workers: int) -> DataLoader:
    cfg = DataConfig(manifest=str(manifest), normalize=mode == "normalize", num_workers=workers)
    source = (WholeFileSource if mode == "whole files" else AudioSource)(manifest)
    return build_loader(
        cfg, MaskingConfig(), partial(num_frames, SpidRConfig()), source=source, pin_memory=torch.cuda.is_available()
    )  # pinning needs a GPU (the training loop pins)


def timed_pass(loader: DataLoader, min_seconds: float) -> tuple[float, float]:
    """Audio seconds delivered per second, and ms per batch, over whole epochs lasting at least min_seconds."""
    samples, batches, start = 0, 0, time.perf_counter()
    while batches == 0 or time.perf_counter() - start < min_seconds:
        for batch in loader:
            samples += batch.waveforms.numel()  # no padding: every sample is audio
            batches += 1
    elapsed = time.perf_counter() - start
    if not samples:
        raise RuntimeError("the loader delivered no audio: every file was skipped (see the warnings)")
    return samples / SAMPLE_RATE / elapsed, 1000 * elapsed / batches


def compare_modes(manifest: Path, *, workers: int, repeats: int, min_seconds: float) -> dict[str, tuple[float, float]]:
    """Per decoding mode, the median (audio-s/s, ms per batch) of `repeats` passes, the modes taking turns so that
    a busy machine slows them alike."""
    loaders = {mode: build(manifest, mode, workers) for mode in MODES}
    for loader in loaders.values():  # start the workers, fill the page cache
        timed_pass(loader, 0.0)
    passes: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
    for _ in range(repeats):
        for mode, loader in loaders.items():
            passes[mode].append(timed_pass(loader, min_seconds))
    return {
        mode: (statistics.median(r for r, _ in runs), statistics.median(ms for _, ms in runs))
        for mode, runs in passes.items()
    }


def main(argv: list[str] | None = None) -> Results:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="a few short files, one repeat")
    parser.add_argument("--workers", type=positive(int), default=1, help="loader workers (the rate is divided by them)")
    parser.add_argument("--repeats", type=positive(int), default=5, help="timed passes; the median is reported")
    parser.add_argument("--output", type=str, default=None, help="results JSON path (default benchmarks/results/)")
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    results = Results(
        "input_pipeline",
        device,
        measure_peaks(device),
        None if args.output is None else Path(args.output),
        smoke=args.smoke,
    )
    corpora = SMOKE_CORPUS if args.smoke else CORPORA
    repeats, min_seconds = (1, 0.0) if args.smoke else (args.repeats, 2.0)
    needed = {"official step": BATCH_SAMPLES / SAMPLE_RATE / OFFICIAL_STEP_S}
    needed["3× the official step"] = 3 * needed["official step"]
    results.extra["audio_seconds_per_gpu_second"] = needed
    per_worker: dict[str, float] = {}
    for corpus, spec in corpora.items():
        for audio_format in ("flac", "wav"):
            files, shortest, longest, _ = spec  # in the folder's name: another corpus is written anew, not reused
            name = f"{corpus.split()[0].lower()}-{files}x{shortest:g}-{longest:g}s-{audio_format}"
            folder = ROOT / ".benchmarks" / "input_pipeline" / name
            manifest = write_corpus(folder, audio_format, *spec)
            measured = compare_modes(manifest, workers=args.workers, repeats=repeats, min_seconds=min_seconds)
            for mode, (rate, ms) in measured.items():
                rate /= args.workers
                per_worker[f"{corpus}, {audio_format}, {mode}"] = rate
                workers = ", ".join(f"{need / rate:.1f} at {name}" for name, need in needed.items())
                results.add(
                    f"{corpus}, {audio_format}",
                    f"{BATCH_SAMPLES / 1e6:.1f}M samples/batch",
                    mode,
                    ms,
                    note=f"{rate:.0f} audio-s/s per worker; workers per GPU: {workers}",
                )
    results.extra["audio_seconds_per_second_per_worker"] = per_worker
    results.extra["workers"] = args.workers
    results.write()
    return results


if __name__ == "__main__":
    sys.exit(report_user_errors(main))
