"""From a manifest (or the synthetic corpus) to batches: length-bucketed batches under a samples budget,
distributed sharding with the same number of batches per rank, crops planned before decoding, padding, and masks
as indices.

Every random choice of a batch (crop offsets, masks) comes from a generator seeded by (seed, epoch, position),
so a batch is the same whichever worker makes it, and a resumed run sees exactly the batches it would have seen.
The crops depend only on that generator and the manifest's lengths, so the sampler draws them and a worker
decodes just the samples its crop keeps (FLAC and WAV seek by sample). With `normalize`, the whole file is still
decoded: the official recipe normalises over the whole utterance, and the crop's own statistics would differ.
"""

import copy
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

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

    def subset(self, indices: list[int]) -> "AudioSource":
        """The utterances at `indices`, in that order."""
        chosen = copy.copy(self)
        chosen.entries = [self.entries[i] for i in indices]
        return chosen

    def load(self, index: int, start: int = 0, num_samples: int = -1, out: np.ndarray | None = None) -> np.ndarray:
        """Samples [start, start + num_samples) of the utterance (to its end with -1), float32; decoded into `out`
        (its first samples, returned) when given. Fewer samples come back when the file ends sooner."""
        import soundfile

        path = self.entries[index].path
        with soundfile.SoundFile(str(path)) as audio:
            if audio.samplerate != SAMPLE_RATE or audio.channels != 1:
                raise UnusableAudio(
                    f"{path}: expected mono audio at {SAMPLE_RATE} Hz, "
                    f"got {audio.channels} channel(s) at {audio.samplerate} Hz"
                )
            if start:
                audio.seek(start)
            return audio.read(frames=num_samples, dtype="float32", out=out)


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

    def load(self, index: int, start: int = 0, num_samples: int = -1, out: np.ndarray | None = None) -> np.ndarray:
        waveform = self.corpus.waveform(index)[start : None if num_samples < 0 else start + num_samples]
        if out is None:
            return waveform
        out[: len(waveform)] = waveform
        return out[: len(waveform)]


def build_source(cfg: DataConfig) -> AudioSource | SyntheticSource:
    if cfg.manifest:
        return AudioSource(cfg.manifest)
    return SyntheticSource(SyntheticCorpus(num_utterances=cfg.synthetic_utterances, seed=cfg.synthetic_seed))


class Clip(NamedTuple):
    """One item of a batch: samples [start, start + num_samples) of utterance `index`, and the state of the batch's
    generator after its crops were drawn (the collator draws the masks from it)."""

    index: int
    start: int
    num_samples: int
    batch_rng_state: Tensor


def plan_crops(lengths: list[int], cfg: DataConfig, seed: int) -> tuple[list[tuple[int, int]], Tensor]:
    """Crop every utterance to the batch's shortest (capped at max_sample_size; random offsets with rand_crop) or,
    with enable_padding, keep it up to max_sample_size; returns each (start, num_samples) and the generator state."""
    generator = torch.Generator().manual_seed(seed)
    capped = [min(n, cfg.max_sample_size) for n in lengths]
    clip_samples = max(capped) if cfg.enable_padding else min(capped)
    crops = []
    for length, kept in zip(lengths, capped, strict=True):
        size = min(kept, clip_samples)
        start = 0
        if cfg.rand_crop and length > size:
            start = int(torch.randint(length - size + 1, (1,), generator=generator))
        crops.append((start, size))
    return crops, generator.get_state()


class DecodedClips(NamedTuple):
    """A batch's clips as decoded by `SpeechDataset.__getitems__`, for the collator."""

    waveforms: Tensor  # (B, samples) float32: the clips that decoded, zero-padded to the longest
    lengths: list[int]  # samples of each
    skipped: int  # clips dropped: their file was unreadable or shorter than the manifest says
    batch_rng_state: Tensor


def _batch_buffer(rows: int, samples: int) -> Tensor:
    """An uninitialised (rows, samples) float32 tensor; inside a loader worker, in shared memory, so the batch
    reaches the main process without another copy (what torch's default_collate does for its stacks)."""
    if get_worker_info() is None:
        return torch.empty(rows, samples)
    storage = torch.UntypedStorage._new_shared(rows * samples * 4)  # noqa: SLF001 - as default_collate does
    return torch.empty(0).set_(storage, 0, (rows, samples))


class SpeechDataset(Dataset):
    """Decodes the `Clip`s that `BucketBatchSampler` plans, a batch at a time (the DataLoader calls
    `__getitems__`), each straight into its row of the batch. A file that cannot be trained on (missing,
    undecodable, shorter than the manifest says or header only, non-finite, not 16 kHz mono) is dropped from its
    batch with a warning that names it, so that one bad file among millions costs a sample, not the run. So is a
    file in `excluded`: one whose decoding killed a loader worker before.

    With `workers`, each worker announces in shared memory the file it is decoding, so that when one dies (a
    decoder crash) the main process can name the file and exclude it (`files_that_killed_a_worker`)."""

    def __init__(
        self,
        source: AudioSource | SyntheticSource,
        *,
        normalize: bool,
        workers: int = 0,
        excluded: frozenset[int] = frozenset(),
    ) -> None:
        self.source = source
        self.normalize = normalize
        self.excluded = excluded
        self.decoding = torch.full((workers, 2), -1, dtype=torch.int64).share_memory_()  # (pid, index) per worker

    def files_that_killed_a_worker(self) -> list[int]:
        """The indices that workers which no longer exist were decoding when they died."""
        return [index for pid, index in self.decoding.tolist() if index >= 0 and not _process_exists(pid)]

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, clip: Clip) -> Tensor | None:
        """One clip's samples, or None when its file cannot be trained on."""
        decoded = self.__getitems__([clip])
        return None if decoded.skipped else decoded.waveforms[0]

    def __getitems__(self, clips: list[Clip]) -> DecodedClips:
        waveforms = _batch_buffer(len(clips), max(clip.num_samples for clip in clips))
        worker = get_worker_info()
        kept = []
        for i, (clip, row) in enumerate(zip(clips, waveforms, strict=True)):
            if worker is not None:
                self.decoding[worker.id] = torch.tensor([os.getpid(), clip.index])
            try:
                self._decode_into(clip, row)
                kept.append(i)
            except Exception as error:  # noqa: BLE001 - any decoding failure: skip the file, keep training
                logger.warning("skipping unusable audio %s: %s", self.source.name(clip.index), error)
            finally:
                if worker is not None:
                    self.decoding[worker.id, 1] = -1
        lengths = [clips[i].num_samples for i in kept]
        if len(kept) < len(clips):  # rare: drop the rows of the files that failed
            waveforms = waveforms[kept, : max(lengths, default=0)]
        return DecodedClips(waveforms, lengths, len(clips) - len(kept), clips[0].batch_rng_state)

    def _decode_into(self, clip: Clip, row: Tensor) -> None:
        """The clip's samples into row[:num_samples], zeros after them; UnusableAudio when they cannot be."""
        if clip.index in self.excluded:
            raise UnusableAudio("its decoding killed a loader worker")
        if self.normalize:  # over the whole utterance, as the official recipe does, then the crop
            waveform = torch.from_numpy(np.ascontiguousarray(self.source.load(clip.index)))
            waveform = F.layer_norm(waveform, waveform.shape)[clip.start : clip.start + clip.num_samples]
            row[: len(waveform)] = waveform
            decoded = len(waveform)
        else:
            out = row[: clip.num_samples].numpy()
            decoded = len(self.source.load(clip.index, clip.start, clip.num_samples, out))
        if decoded < clip.num_samples:  # truncated or header only
            raise UnusableAudio(
                f"the manifest says {self.source.num_samples(clip.index)} samples, the file ends "
                f"before sample {clip.start + clip.num_samples}"
            )
        if not bool(row[: clip.num_samples].isfinite().all()):
            raise UnusableAudio("non-finite samples")
        row[clip.num_samples :] = 0


class BucketBatchSampler(Sampler[list[Clip]]):
    """Batches of utterances of similar length whose total length (capped at max_sample_size) fits
    max_batch_length; shuffled per epoch; each rank takes every world_size-th batch, padded so all ranks
    get the same count. `start` skips the batches a resumed run has already trained on. Each batch comes with
    its crops planned (`plan_crops`). Fewer batches than ranks is an error on every rank (each computes the same
    count), not a run where some ranks get none and the others wait for them."""

    def __init__(self, lengths: list[int], cfg: DataConfig, *, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.num_samples = lengths
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
        self._shuffled: tuple[int, list[list[int]]] | None = None  # (epoch, its batches): shuffled once an epoch
        if len(self._shuffle()) < world_size:
            raise ValueError(
                f"{len(self._shuffle())} batch(es) of at most data.max_batch_length = {cfg.max_batch_length} "
                f"samples from {len(kept)} utterance(s) for {world_size} ranks: every rank needs at least one. "
                "Lower data.max_batch_length, add data or use fewer ranks"
            )

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _shuffle(self) -> list[list[int]]:
        """This epoch's batches in their shuffled order, before sharding; computed once an epoch."""
        if self._shuffled is None or self._shuffled[0] != self.epoch:
            self._shuffled = self.epoch, self._draw_batches()
        return self._shuffled[1]

    def _draw_batches(self) -> list[list[int]]:
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
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def _epoch_batches(self) -> list[list[int]]:
        """This epoch's batches, trimmed (drop_last) or padded by repeating the first ones to a multiple of the
        number of ranks."""
        batches = self._shuffle()
        if self.cfg.drop_last:
            return batches[: len(batches) - len(batches) % self.world_size]
        return batches + batches[: -len(batches) % self.world_size]

    def __len__(self) -> int:
        return len(self._epoch_batches()) // self.world_size

    def batch_seed(self, position: int) -> int:
        """The seed of this rank's batch at `position` in the epoch: its crops and masks come from it. An explicit
        mix (NumPy's SeedSequence), not Python's hash(), whose values a Python version may change: a run resumed
        under another Python sees the same batches."""
        entropy = [self.cfg.random_seed % 2**64, self.epoch, self.rank, position]
        return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]) & 0x7FFF_FFFF_FFFF

    def __iter__(self) -> Iterator[list[Clip]]:
        mine = self._epoch_batches()[self.rank :: self.world_size]
        for position in range(self.start, len(mine)):
            crops, rng_state = plan_crops(
                [self.num_samples[i] for i in mine[position]], self.cfg, self.batch_seed(position)
            )
            yield [
                Clip(index, start, size, rng_state) for index, (start, size) in zip(mine[position], crops, strict=True)
            ]


@dataclass
class Batch:
    waveforms: Tensor  # (B, samples)
    frame_mask: Tensor | None  # (B, T) bool, True on real frames (the model's layout); None when nothing is padded
    mask_indices: Tensor  # (B, M) int64
    skipped: int  # unreadable files dropped from this batch

    def pin_memory(self) -> "Batch":
        return Batch(
            self.waveforms.pin_memory(),
            None if self.frame_mask is None else self.frame_mask.pin_memory(),
            self.mask_indices.pin_memory(),
            self.skipped,
        )

    def to(self, device: torch.device) -> "Batch":
        return Batch(
            self.waveforms.to(device, non_blocking=True),
            None if self.frame_mask is None else self.frame_mask.to(device, non_blocking=True),
            self.mask_indices.to(device, non_blocking=True),
            self.skipped,
        )


class Collator:
    """The decoded clips, their frame counts and padding mask, and masks drawn from the batch's generator."""

    def __init__(self, masking: MaskingConfig, frames_of) -> None:  # noqa: ANN001 - samples → frames
        self.masking, self.frames_of = masking, frames_of

    def __call__(self, decoded: DecodedClips) -> Batch:
        if not decoded.lengths:
            return Batch(torch.zeros(0, 0), None, torch.zeros(0, 0, dtype=torch.int64), decoded.skipped)
        generator = torch.Generator()
        generator.set_state(decoded.batch_rng_state)
        frames = self.frames_of(torch.tensor(decoded.lengths))
        total = int(frames.max())
        frame_mask = None
        if bool((frames < total).any()):
            frame_mask = torch.arange(total) < frames.unsqueeze(1)
        mask_indices = compute_mask_indices(self.masking, frames, generator)
        return Batch(decoded.waveforms, frame_mask, mask_indices, decoded.skipped)


def build_loader(
    cfg: DataConfig,
    masking: MaskingConfig,
    frames_of,  # noqa: ANN001 - callable: samples (B,) → frames (B,)
    *,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    source: AudioSource | SyntheticSource | None = None,
    excluded: frozenset[int] = frozenset(),
) -> DataLoader:
    """Batches of `source` (default: the one `cfg` names) on this rank, with `cfg`'s loader settings; `excluded`:
    indices of files skipped without being read (see `SpeechDataset`)."""
    source = source or build_source(cfg)
    sampler = BucketBatchSampler(
        [source.num_samples(i) for i in range(len(source))], cfg, rank=rank, world_size=world_size
    )
    workers = cfg.num_workers
    return DataLoader(
        SpeechDataset(source, normalize=cfg.normalize, workers=workers, excluded=excluded),
        batch_sampler=sampler,
        collate_fn=Collator(masking, frames_of),
        num_workers=workers,
        pin_memory=pin_memory and cfg.pin_memory,
        prefetch_factor=cfg.prefetch_factor if workers else None,
        persistent_workers=cfg.persistent_workers and workers > 0,
        worker_init_fn=leave_shutdown_to_the_main_process,
        # Its own generator: starting an epoch must not draw from the global RNG that dropout uses, or a
        # resumed run would diverge from an uninterrupted one.
        generator=torch.Generator().manual_seed(cfg.random_seed + rank),
    )
