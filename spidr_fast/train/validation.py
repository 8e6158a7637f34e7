"""Validation: loss and perplexities on masked batches, and the unit quality of every head's units against
frame labels (the synthetic corpus's own, or an alignments JSONL of {"fileid", "phones": [one per 10 ms]})."""

import json
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from spidr_fast.data.loading import AudioSource, DataConfig, SyntheticSource, build_loader, build_source
from spidr_fast.data.masking import MaskingConfig
from spidr_fast.data.synthetic import PHONES
from spidr_fast.metrics import joint_counts, unit_quality
from spidr_fast.models import DinoSR
from spidr_fast.models.components import num_frames


def frame_labels(source: AudioSource | SyntheticSource, cfg: DataConfig) -> tuple[list[np.ndarray], int] | None:
    """Phone index of every 10 ms frame of every utterance, and the number of phones; None without labels."""
    if isinstance(source, SyntheticSource):
        return [source.corpus.labels(i) for i in range(len(source))], len(PHONES)
    if not cfg.alignments_path:
        return None
    path = Path(cfg.alignments_path)
    if not path.is_file():
        raise FileNotFoundError(f"data.alignments_path not found: {path}")
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    phones = {r["fileid"]: r["phones"] for r in records}
    inventory = {name: i for i, name in enumerate(sorted({p for r in records for p in r["phones"]}))}
    missing = [e.fileid for e in source.entries if e.fileid not in phones]
    if missing:
        raise ValueError(f"{path}: no alignment for file {missing[0]} ({len(missing)} missing)")
    return [np.array([inventory[p] for p in phones[e.fileid]]) for e in source.entries], len(inventory)


@torch.no_grad()
def validate(model: DinoSR, cfg: DataConfig, masking: MaskingConfig, device: torch.device,
             dtype: torch.dtype) -> dict[str, Any]:  # fmt: skip
    model.eval()
    autocast = torch.autocast(device.type, dtype, enabled=dtype != torch.float32)
    loss_sum, frames, target_ppl, pred_ppl, batches = 0.0, 0, 0.0, 0.0, 0
    for batch in build_loader(cfg, masking, partial(num_frames, model.cfg)):
        if not batch.waveforms.shape[0]:
            continue
        batch = batch.to(device)
        with autocast:
            loss, out = model(batch.waveforms, mask_indices=batch.mask_indices, attention_mask=batch.attention_mask)
        loss_sum, frames = loss_sum + float(loss.sum()), frames + loss.numel()
        target_ppl, pred_ppl, batches = target_ppl + float(out["target_ppl"]), pred_ppl + float(out["pred_ppl"]), batches + 1
    results: dict[str, Any] = {"loss": loss_sum / max(frames, 1), "target_ppl": target_ppl / max(batches, 1),
                               "pred_ppl": pred_ppl / max(batches, 1)}  # fmt: skip

    source = build_source(cfg)
    labels = frame_labels(source, cfg)
    if labels is not None:
        phones, num_phones = labels
        per_layer: dict[int, list[np.ndarray]] = {}
        for i in range(len(source)):
            waveform = torch.from_numpy(np.ascontiguousarray(source.load(i))).to(device)
            if cfg.normalize:
                waveform = F.layer_norm(waveform, waveform.shape)
            with autocast:
                probs = model.get_codebooks(waveform.unsqueeze(0))
            for layer, p in enumerate(probs):
                if p is not None:
                    per_layer.setdefault(layer, []).append(p.reshape(-1, p.shape[-1]).argmax(-1).cpu().numpy())
        quality = {f"layer_{layer}": unit_quality(joint_counts(phones, units, num_phones, model.cfg.codebook_size))
                   for layer, units in per_layer.items()}  # fmt: skip
        best = max(quality, key=lambda k: quality[k]["pnmi"])
        results |= {"units": quality, "best_layer": best, "pnmi": quality[best]["pnmi"],
                    "unit_perplexity": quality[best]["unit_perplexity"]}  # fmt: skip
    return results
