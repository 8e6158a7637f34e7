"""The yardstick of speech units: k-means on MFCCs, HuBERT's first-iteration targets, scored on the same utterances,
labels and number of units as a model's units.

Features: 13 MFCCs (DCT of a 40-band log-mel, 25 ms windows) with their first and second differences, one frame
per model frame. Units: Lloyd's k-means (k-means++ start, fixed seed) over every frame of the set. The scores are
cached by everything they depend on, so a training run's validations compute them once.
"""

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from spidr_fast.data.loading import AudioSource, DataConfig, SyntheticSource
from spidr_fast.data.synthetic import LABEL_HOP, SAMPLE_RATE
from spidr_fast.metrics import joint_counts, unit_quality

CACHE = Path(os.environ.get("SPIDR_FAST_BASELINE_CACHE", Path.home() / ".cache" / "spidr_fast" / "baseline"))
VERSION = 1  # of the features and the clustering: a change makes new cache entries


def mel_filterbank(num_bands: int, n_fft: int) -> torch.Tensor:
    """(num_bands, n_fft // 2 + 1) triangular filters evenly spaced on the HTK mel scale up to Nyquist."""
    mel = torch.linspace(0, 2595 * math.log10(1 + SAMPLE_RATE / 2 / 700), num_bands + 2)
    edges = 700 * (10 ** (mel / 2595) - 1)
    bins = torch.linspace(0, SAMPLE_RATE / 2, n_fft // 2 + 1)
    rising = (bins[None] - edges[:-2, None]) / (edges[1:-1, None] - edges[:-2, None])
    falling = (edges[2:, None] - bins[None]) / (edges[2:, None] - edges[1:-1, None])
    return rising.minimum(falling).clamp(min=0)


def log_mel(waveform: torch.Tensor, hop: int, num_bands: int = 40, n_fft: int = 400) -> torch.Tensor:
    """(frames, num_bands) log mel energies, one frame every `hop` samples."""
    spectrum = torch.stft(waveform, n_fft, hop, window=torch.hann_window(n_fft), return_complex=True).abs() ** 2
    return (mel_filterbank(num_bands, n_fft) @ spectrum + 1e-6).log().T


def mfcc(waveform: torch.Tensor, hop: int, num_coefficients: int = 13) -> torch.Tensor:
    """(frames, num_coefficients) DCT-II of the log-mel bands."""
    bands = log_mel(waveform, hop)
    n = torch.arange(bands.shape[1])
    dct = torch.cos(math.pi / bands.shape[1] * (n[None] + 0.5) * torch.arange(num_coefficients)[:, None])
    return bands @ dct.T


def with_deltas(frames: torch.Tensor) -> torch.Tensor:
    """(T, D) → (T, 3D): the frames, their centred first differences and the differences of those."""

    def delta(x: torch.Tensor) -> torch.Tensor:
        padded = torch.cat([x[:1], x, x[-1:]])  # edges repeated: as many differences as frames
        return (padded[2:] - padded[:-2]) / 2

    first = delta(frames)
    return torch.cat([frames, first, delta(first)], dim=1)


def kmeans_units(frames: torch.Tensor, num_units: int, iterations: int = 30, seed: int = 0) -> torch.Tensor:
    """Unit of every frame (N, D) from Lloyd's k-means with a k-means++ start; an emptied cluster keeps its
    centroid."""
    if not 1 <= num_units <= len(frames):
        raise ValueError(f"num_units must be between 1 and the {len(frames)} frames, got {num_units}")
    generator = torch.Generator().manual_seed(seed)
    frames = frames.double()
    centroids = frames[torch.randint(len(frames), (1,), generator=generator)]
    nearest = torch.cdist(frames, centroids).squeeze(1) ** 2
    for _ in range(num_units - 1):  # k-means++: the next centre drawn in proportion to the squared distance
        pick = torch.multinomial(nearest.clamp_min(0) + 1e-30, 1, generator=generator)
        centroids = torch.cat([centroids, frames[pick]])
        nearest = nearest.minimum(torch.cdist(frames, frames[pick]).squeeze(1) ** 2)
    units = torch.cdist(frames, centroids).argmin(1)
    for _ in range(iterations):
        counts = torch.bincount(units, minlength=num_units)
        sums = torch.zeros_like(centroids).index_add_(0, units, frames)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
        updated = torch.cdist(frames, centroids).argmin(1)
        if torch.equal(updated, units):
            break
        units = updated
    return units


def mfcc_kmeans_units(
    source: AudioSource | SyntheticSource, num_units: int, hop: int, *, normalize: bool, seed: int = 0
) -> list[np.ndarray]:
    """The k-means unit of every `hop`-sample frame of every utterance of `source`."""
    features = []
    for i in range(len(source)):
        waveform = torch.from_numpy(np.ascontiguousarray(source.load(i))).float()
        if normalize:  # as the model sees it; MFCCs only shift by a constant in c0
            waveform = torch.nn.functional.layer_norm(waveform, waveform.shape)
        features.append(with_deltas(mfcc(waveform, hop)))
    units = kmeans_units(torch.cat(features), num_units, seed=seed)
    return [u.numpy() for u in units.split([len(f) for f in features])]


def _cache_key(data: DataConfig, num_units: int, hop: int, seed: int) -> str:
    described = {"version": VERSION, "data": dataclasses.asdict(data), "num_units": num_units, "hop": hop, "seed": seed}
    for field in ("manifest", "alignments_path"):  # a rewritten file is another set
        path = getattr(data, field)
        if path:
            stat = Path(path).stat()
            described[field] = [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:20]


def mfcc_kmeans_quality(
    source: AudioSource | SyntheticSource,
    data: DataConfig,
    phones: list[np.ndarray],
    num_phones: int,
    num_units: int,
    hop: int,
    *,
    seed: int = 0,
    cache: Path | None = None,
) -> dict[str, float]:
    """`metrics.unit_quality` of the MFCC k-means units of `source` (the utterances of `data`) against `phones`
    (10 ms labels), from the cache when it holds them."""
    if hop % LABEL_HOP:
        raise ValueError(f"hop must be a whole number of 10 ms labels ({LABEL_HOP} samples), got {hop}")
    path = (cache or CACHE) / f"{_cache_key(data, num_units, hop, seed)}.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    units = mfcc_kmeans_units(source, num_units, hop, normalize=data.normalize, seed=seed)
    quality = unit_quality(joint_counts(phones, units, num_phones, num_units, hop // LABEL_HOP))
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")  # another process may write the same entry
    temporary.write_text(json.dumps(quality), encoding="utf-8")
    temporary.replace(path)
    return quality
