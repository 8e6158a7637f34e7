"""Validation: loss and perplexities on masked batches, and the unit quality of every head's units against
frame labels (the synthetic corpus's own, or an alignments JSONL of {"fileid", "phones": [one per 10 ms]}), beside
that of k-means on MFCCs with as many units."""

import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch

from spidr_fast.baseline import mfcc_kmeans_quality
from spidr_fast.data.alignments import read_alignments
from spidr_fast.data.loading import (
    AudioSource,
    Clip,
    DataConfig,
    SpeechDataset,
    SyntheticSource,
    build_loader,
    build_source,
)
from spidr_fast.data.masking import MaskingConfig
from spidr_fast.data.synthetic import PHONES
from spidr_fast.distributed import wait_for_main_rank
from spidr_fast.metrics import joint_counts, position_nmi, unit_quality
from spidr_fast.models import DinoSR
from spidr_fast.models.components import frame_hop, num_frames
from spidr_fast.preemption import Preemption
from spidr_fast.train.config import TrainConfig
from spidr_fast.train.reporting import MetricsLog, flatten

logger = logging.getLogger(__name__)


def frame_labels(source: AudioSource | SyntheticSource, cfg: DataConfig) -> tuple[list[np.ndarray], int] | None:
    """Phone index of every 10 ms frame of every utterance, and the number of phones; None without labels."""
    if isinstance(source, SyntheticSource):
        return [source.corpus.labels(i) for i in range(len(source))], len(PHONES)
    if not cfg.alignments_path:
        return None
    records = read_alignments(cfg.alignments_path)
    phones = {fileid: r["phones"] for fileid, r in records.items()}
    inventory = {name: i for i, name in enumerate(sorted({p for r in phones.values() for p in r}))}
    missing = [e.fileid for e in source.entries if e.fileid not in phones]
    if missing:
        raise ValueError(f"{cfg.alignments_path}: no alignment for file {missing[0]} ({len(missing)} missing)")
    return [np.array([inventory[p] for p in phones[e.fileid]]) for e in source.entries], len(inventory)


@torch.no_grad()
def validate(
    model: DinoSR,
    cfg: DataConfig,
    masking: MaskingConfig,
    device: torch.device,
    dtype: torch.dtype,
    should_stop: Callable[[], bool] = lambda: False,
) -> dict[str, Any] | None:
    """The results, or None when `should_stop()` became true before the end (checked at every batch and file).
    A file that cannot be used (missing, undecodable, truncated, non-finite, not 16 kHz mono) is skipped with a
    warning naming it, as in training, and counted in `skipped_files`; the scores are those of the other files."""
    model.eval()
    autocast = torch.autocast(device.type, dtype, enabled=dtype != torch.float32)
    loss_sum, frames, target_ppl, pred_ppl, batches, skipped = 0.0, 0, 0.0, 0.0, 0, 0
    for batch in build_loader(cfg, masking, partial(num_frames, model.cfg)):
        if should_stop():
            return None
        skipped += batch.skipped
        if not batch.waveforms.shape[0]:
            continue
        batch = batch.to(device)
        with autocast:
            loss, out = model(batch.waveforms, mask_indices=batch.mask_indices, attention_mask=batch.frame_mask)
        loss_sum, frames = loss_sum + float(loss.sum()), frames + loss.numel()
        target_ppl, pred_ppl, batches = (
            target_ppl + float(out["target_ppl"]),
            pred_ppl + float(out["pred_ppl"]),
            batches + 1,
        )
    results: dict[str, Any] = {
        "loss": loss_sum / max(frames, 1),
        "target_ppl": target_ppl / max(batches, 1),
        "pred_ppl": pred_ppl / max(batches, 1),
        "skipped_files": skipped,  # each unusable file once: the pass below skips the same ones
    }

    source = build_source(cfg)
    labels = frame_labels(source, cfg)
    if labels is not None:
        phones, num_phones = labels
        units: dict[str, list[np.ndarray]] = {}  # "heads/layer_i" and "codebooks/layer_i" → units per file
        first_head = len(model.student.layers) - model.num_codebooks
        decoder = SpeechDataset(source, normalize=cfg.normalize)  # its checks and warnings, as in training
        kept = []
        for i in range(len(source)):
            if should_stop():
                return None
            waveform = decoder[Clip(i, 0, source.num_samples(i), torch.empty(0))]
            if waveform is None:
                continue
            kept.append(i)
            waveform = waveform.to(device)
            with autocast:
                probs = model.get_codebooks(waveform.unsqueeze(0))[first_head:]
                targets = model.get_targets(waveform.unsqueeze(0))
            for j, (p, t) in enumerate(zip(probs, targets, strict=True)):
                units.setdefault(f"heads/layer_{first_head + j}", []).append(
                    p.reshape(-1, p.shape[-1]).argmax(-1).cpu().numpy()
                )
                units.setdefault(f"codebooks/layer_{first_head + j}", []).append(t[0].cpu().numpy())
        if not kept:
            raise ValueError(f"no usable audio in validation manifest {cfg.manifest!r} ({len(source)} files skipped)")
        if len(kept) < len(source):  # only a manifest's files can be unusable: `source` is an AudioSource
            phones, source = [phones[i] for i in kept], source.subset(kept)
        quality = {
            name: {
                **unit_quality(joint_counts(phones, u, num_phones, model.cfg.codebook_size)),
                "position_nmi": position_nmi(u, model.cfg.codebook_size),
            }
            for name, u in units.items()
        }
        results["units"] = quality
        for kind in ("heads", "codebooks"):  # the student's predicted units, and the teacher's target units
            best = max((k for k in quality if k.startswith(kind)), key=lambda k: quality[k]["pnmi"])
            results[kind] = {"best_layer": best.split("/")[1], **quality[best]}
        results["baseline"] = mfcc_kmeans_quality(
            source, cfg, phones, num_phones, model.cfg.codebook_size, frame_hop(model.cfg)
        )
    return results


class Validator:
    """Every validation set of a run, every `run.validate_interval` steps and at its end, on the main rank only
    (validation forwards need no collective). A preemption signal stops it at the next batch or file, unlogged,
    so that the checkpoint comes within the scheduler's grace period.

    The other ranks wait for it outside the collective timeout (`distributed.wait_for_main_rank`): otherwise a
    validation longer than run.collective_timeout (the first MFCC k-means baseline of a large dev set) failed
    their next collective and ended the run. Waiting, rather than every rank validating its shard and reducing
    the scores, keeps the scores those of one process (the k-means baseline and the unit quality are fitted and
    scored over the whole set, not sums of shards) and needs no change to validation itself."""

    def __init__(
        self, cfg: TrainConfig, log: MetricsLog, preemption: Preemption, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.cfg, self.log, self.preemption, self.device, self.dtype = cfg, log, preemption, device, dtype

    def due(self, step: int) -> bool:
        """Whether to validate after `step` within the run (the last step's validation is the run's closing one)."""
        interval = self.cfg.run.validate_interval
        return bool(interval) and step % interval == 0 and step < self.cfg.optimizer.max_steps

    def __call__(self, model: DinoSR, step: int) -> dict[str, Any]:
        """Each set's results, logged; {} on the other ranks. Leaves the model in training mode."""
        if not self.log.enabled:  # the log is the main rank's
            wait_for_main_rank()
            return {}
        results = {}
        for name, data_cfg in self.cfg.validation.items():
            result = validate(
                model,
                data_cfg,
                self.cfg.masking,
                self.device,
                self.dtype,
                should_stop=lambda: self.preemption.requested,
            )
            if result is None:
                logger.warning("validation [%s] interrupted by %s", name, self.preemption.signal_name)
                break
            results[name] = result
            self.log.write({"split": f"valid/{name}", "step": step, **flatten(result)})
        model.train()
        wait_for_main_rank()
        return results
