"""From a manifest (or the synthetic corpus) to batches: decoding, length-bucketed batches under a samples budget,
distributed sharding with the same number of batches per rank, cropping or padding, and masks as indices.

Every random choice of a batch (crop offsets, masks) comes from a generator seeded by (seed, epoch, position),
so a batch is the same whichever worker makes it, and a resumed run sees exactly the batches it would have seen.
"""

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from spidr_fast.data.manifest import read_manifest
from spidr_fast.data.masking import MaskingConfig, compute_mask_indices
from spidr_fast.data.synthetic import SAMPLE_RATE, SyntheticCorpus
from spidr_fast.preemption import leave_shutdown_to_the_main_process

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataConfig:
    """The official data section; `manifest = ""` selects the built-in synthetic corpus."""

    manifest: str = ""
    enable_padding: bool = False
    rand_crop: bool = True
    normalize: bool = True
    num_buckets: int = 1000
    min_sample_size: int = 2_000
    max_sample_size: int = 320_000
    max_batch_length: int = 3_800_000
    drop_last: bool = False
    num_workers: int = 10
    pin_memory: bool = True
    prefetch_factor: int = 2
    persistent_workers: bool = True
    random_seed: int = 0
    bucket_method: str = "uniform"
    alignments_path: str | None = None
    # spidr_fast: the synthetic corpus used when no manifest is given
    synthetic_utterances: int = 512
    synthetic_seed: int = 0

    def __post_init__(self) -> None:
        if self.bucket_method not in ("uniform", "percentile"):
            raise ValueError(f"data.bucket_method must be 'uniform' or 'percentile', got {self.bucket_method!r}")
        if not 0 <= self.min_sample_size <= self.max_sample_size <= self.max_batch_length:
            raise ValueError(
                "data: need 0 <= min_sample_size <= max_sample_size <= max_batch_length, got "
                f"{self.min_sample_size}, {self.max_sample_size}, {self.max_batch_length}"
            )


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class UnusableAudio(ValueError):
    """A file that decodes but cannot be trained on (wrong rate or channels, too short, non-finite samples)."""


class AudioSource:
    """The utterances of a manifest, decoded with soundfile; only 16 kHz mono is accepted."""

    def __init__(self, manifest: str | Path) -> None:
        self.entries = read_manifest(manifest)

    def __len__(self) -> int:
        return len(self.entries)

    def num_samples(self, index: int) -> int:
        return self.entries[index].num_samples

    def name(self, index: int) -> str:
        return str(self.entries[index].path)

    def load(self, index: int) -> np.ndarray:
        import soundfile

        path = self.entries[index].path
        with soundfile.SoundFile(str(path)) as audio:
            if audio.samplerate != SAMPLE_RATE or audio.channels != 1:
                raise UnusableAudio(f"{path}: expected mono audio at {SAMPLE_RATE} Hz, "
                                    f"got {audio.channels} channel(s) at {audio.samplerate} Hz")  # fmt: skip
            return audio.read(dtype="float32")


class SyntheticSource:
    """The built-in synthetic corpus as a source of utterances."""

    def __init__(self, corpus: SyntheticCorpus) -> None:
        self.corpus = corpus
        self._lengths = [corpus.num_samples(i) for i in range(corpus.num_utterances)]

    def __len__(self) -> int:
        return self.corpus.num_utterances

    def num_samples(self, index: int) -> int:
        return self._lengths[index]

    def name(self, index: int) -> str:
        return f"synthetic utterance {index}"

    def load(self, index: int) -> np.ndarray:
        return self.corpus.waveform(index)


def build_source(cfg: DataConfig) -> AudioSource | SyntheticSource:
    if cfg.manifest:
        return AudioSource(cfg.manifest)
    return SyntheticSource(SyntheticCorpus(num_utterances=cfg.synthetic_utterances, seed=cfg.synthetic_seed))


class SpeechDataset(Dataset):
    """Items are (index, batch seed) pairs from `BucketBatchSampler`. A file that cannot be trained on (missing,
    undecodable, truncated below `min_samples`, header only, non-finite, not 16 kHz mono) gives None and a warning
    that names it, so that one bad file among millions costs a sample, not the run. So does a file in `excluded`:
    one whose decoding killed a loader worker before.

    With `workers`, each worker announces in shared memory the file it is decoding, so that when one dies (a
    decoder crash) the main process can name the file and exclude it (`files_that_killed_a_worker`)."""

    def __init__(self, source: AudioSource | SyntheticSource, *, normalize: bool, min_samples: int = 1,
                 workers: int = 0, excluded: frozenset[int] = frozenset()) -> None:  # fmt: skip
        self.source = source
        self.normalize = normalize
        self.min_samples = max(min_samples, 1)
        self.excluded = excluded
        self.decoding = torch.full((workers, 2), -1, dtype=torch.int64).share_memory_()  # (pid, index) per worker

    def files_that_killed_a_worker(self) -> list[int]:
        """The indices that workers which no longer exist were decoding when they died."""
        return [index for pid, index in self.decoding.tolist() if index >= 0 and not _process_exists(pid)]

    def __len__(self) -> int:
        return len(self.source)

    def _load_checked(self, index: int) -> Tensor:
        waveform = torch.from_numpy(np.ascontiguousarray(self.source.load(index)))
        if waveform.numel() < self.min_samples:  # truncated or header-only: the manifest promised more
            raise UnusableAudio(f"{waveform.numel()} samples decoded, fewer than data.min_sample_size = "
                                f"{self.min_samples}")  # fmt: skip
        if not bool(waveform.isfinite().all()):
            raise UnusableAudio("non-finite samples")
        return waveform

    def __getitem__(self, item: tuple[int, int]) -> tuple[Tensor | None, int]:
        index, batch_seed = item
        if index in self.excluded:
            logger.warning("skipping unusable audio %s: its decoding killed a loader worker", self.source.name(index))
            return None, batch_seed
        worker = get_worker_info()
        if worker is not None:
            self.decoding[worker.id] = torch.tensor([os.getpid(), index])
        try:
            waveform = self._load_checked(index)
        except Exception as error:  # noqa: BLE001 - any decoding failure: skip the file, keep training
            logger.warning("skipping unusable audio %s: %s", self.source.name(index), error)
            return None, batch_seed
        finally:
            if worker is not None:
                self.decoding[worker.id, 1] = -1
        if self.normalize:
            waveform = F.layer_norm(waveform, waveform.shape)
        return waveform, batch_seed


class BucketBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of utterances of similar length whose total length (capped at max_sample_size) fits
    max_batch_length; shuffled per epoch; each rank takes every world_size-th batch, padded so all ranks
    get the same count. `start` skips the batches a resumed run has already trained on."""

    def __init__(self, lengths: list[int], cfg: DataConfig, *, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        kept = [(min(n, cfg.max_sample_size), i) for i, n in enumerate(lengths) if n >= cfg.min_sample_size]
        if not kept:
            raise ValueError(f"no utterance of at least data.min_sample_size = {cfg.min_sample_size} samples")
        self.lengths = dict((i, n) for n, i in kept)
        capped = torch.tensor([n for n, _ in kept], dtype=torch.float64)
        if cfg.bucket_method == "uniform":
            boundaries = torch.linspace(cfg.min_sample_size - 1, cfg.max_sample_size + 1, cfg.num_buckets + 1)
        else:
            boundaries = torch.quantile(capped, torch.linspace(0, 1, cfg.num_buckets + 1, dtype=torch.float64))[1:]
        bucket_ids = torch.bucketize(capped, boundaries.double()).tolist()
        self.buckets: dict[int, list[int]] = {}
        for bucket, (_, index) in sorted(zip(bucket_ids, kept, strict=True)):
            self.buckets.setdefault(bucket, []).append(index)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _epoch_batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.cfg.random_seed + self.epoch)
        batches, batch, total = [], [], 0
        for indices in self.buckets.values():
            for j in torch.randperm(len(indices), generator=generator).tolist():
                index = indices[j]
                if batch and total + self.lengths[index] > self.cfg.max_batch_length:
                    batches.append(batch)
                    batch, total = [], 0
                batch.append(index)
                total += self.lengths[index]
        if batch:
            batches.append(batch)
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        if self.cfg.drop_last:
            return batches[: len(batches) - len(batches) % self.world_size]
        return batches + batches[: -len(batches) % self.world_size]

    def __len__(self) -> int:
        return len(self._epoch_batches()) // self.world_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        mine = self._epoch_batches()[self.rank :: self.world_size]
        for position in range(self.start, len(mine)):
            seed = hash((self.cfg.random_seed, self.epoch, self.rank, position)) & 0x7FFF_FFFF_FFFF
            yield [(index, seed) for index in mine[position]]


@dataclass
class Batch:
    waveforms: Tensor  # (B, samples)
    attention_mask: Tensor | None  # (B, 1, 1, T) bool, True on real frames; None when nothing is padded
    mask_indices: Tensor  # (B, M) int64
    skipped: int  # unreadable files dropped from this batch

    def pin_memory(self) -> "Batch":
        return Batch(self.waveforms.pin_memory(),
                     None if self.attention_mask is None else self.attention_mask.pin_memory(),
                     self.mask_indices.pin_memory(), self.skipped)  # fmt: skip

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.waveforms.to(device, non_blocking=True),
                     None if self.attention_mask is None else self.attention_mask.to(device, non_blocking=True),
                     self.mask_indices.to(device, non_blocking=True), self.skipped)  # fmt: skip


class Collator:
    """Crop every clip to the batch's shortest (random offsets) or pad to its longest, then draw the masks."""

    def __init__(self, cfg: DataConfig, masking: MaskingConfig, frames_of) -> None:  # noqa: ANN001 - samples → frames
        self.cfg, self.masking, self.frames_of = cfg, masking, frames_of

    def __call__(self, items: list[tuple[Tensor | None, int]]) -> Batch | None:
        seed = items[0][1]
        waveforms = [w for w, _ in items if w is not None]
        skipped = len(items) - len(waveforms)
        if not waveforms:
            return Batch(torch.zeros(0, 0), None, torch.zeros(0, 0, dtype=torch.int64), skipped)
        generator = torch.Generator().manual_seed(seed)
        lengths = [min(len(w), self.cfg.max_sample_size) for w in waveforms]
        target = max(lengths) if self.cfg.enable_padding else min(lengths)
        clips = []
        for waveform, length in zip(waveforms, lengths, strict=True):
            size = min(length, target)
            offset = 0
            if self.cfg.rand_crop and len(waveform) > size:
                offset = int(torch.randint(len(waveform) - size + 1, (1,), generator=generator))
            clips.append(F.pad(waveform[offset : offset + size], (0, target - size)))
        frames = self.frames_of(torch.tensor([min(n, target) for n in lengths]))
        total = int(frames.max())
        attention_mask = None
        if bool((frames < total).any()):
            attention_mask = (torch.arange(total) < frames.unsqueeze(1))[:, None, None, :]
        return Batch(torch.stack(clips), attention_mask, compute_mask_indices(self.masking, frames, generator), skipped)


def build_loader(
    cfg: DataConfig,
    masking: MaskingConfig,
    frames_of,  # noqa: ANN001 - callable: samples (B,) → frames (B,)
    *,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    excluded: frozenset[int] = frozenset(),
) -> DataLoader:
    """`excluded`: indices of files skipped without being read (see `SpeechDataset`)."""
    source = build_source(cfg)
    sampler = BucketBatchSampler([source.num_samples(i) for i in range(len(source))], cfg, rank=rank,
                                 world_size=world_size)  # fmt: skip
    workers = cfg.num_workers
    return DataLoader(
        SpeechDataset(source, normalize=cfg.normalize, min_samples=cfg.min_sample_size, workers=workers,
                      excluded=excluded),
        batch_sampler=sampler,
        collate_fn=Collator(cfg, masking, frames_of),
        num_workers=workers,
        pin_memory=pin_memory and cfg.pin_memory,
        prefetch_factor=cfg.prefetch_factor if workers else None,
        persistent_workers=cfg.persistent_workers and workers > 0,
        worker_init_fn=leave_shutdown_to_the_main_process,
        # Its own generator: starting an epoch must not draw from the global RNG that dropout uses, or a
        # resumed run would diverge from an uninterrupted one.
        generator=torch.Generator().manual_seed(cfg.random_seed + rank),
    )
