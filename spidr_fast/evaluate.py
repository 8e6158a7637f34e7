"""python -m spidr_fast.evaluate [--checkpoint CKPT --manifest M --alignments A] [--items ITEMS] [--layers 5,6]
                              [--abx auto|builtin|fastabx]

Per layer: the unit quality of the head units against 10 ms phone labels (PNMI, phone and cluster purity, unit
perplexity, active units, bitrate), and ABX error rates within and across speakers on the continuous features and
on the units (as one-hot vectors), from an item file or one generated from the alignments, by the built-in ABX or
fastabx (Python >= 3.12) on the same items; each rate with the number of cells it averages, flagged when too few.
Beside them, the unit quality of k-means on MFCCs with as many units, on the same utterances. Writes results.json
(which ABX scored, how many items and cells each score rests on, the baseline), the item file used, and
metrics.png when matplotlib is installed, into --out (default: eval_<checkpoint name>/ beside the checkpoint).

With no arguments: the latest checkpoint of the default training run (runs/spidr_fast/synthetic) on the synthetic
validation utterances of its config extended to 256, with their own labels.
"""

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch

from spidr_fast import abx
from spidr_fast.baseline import mfcc_kmeans_quality
from spidr_fast.cli import ArgumentParser, report_user_errors
from spidr_fast.data.alignments import read_alignments
from spidr_fast.data.loading import AudioSource, DataConfig, SyntheticSource, build_source
from spidr_fast.data.synthetic import LABEL_HOP, PHONE_NAMES, SAMPLE_RATE
from spidr_fast.extract import default_device, fileids, head_layers, iterate_outputs, load_model, parse_layers
from spidr_fast.metrics import MAX_LENGTH_MISMATCH, bitrate, describe, joint_counts, position_nmi, unit_quality
from spidr_fast.models import DinoSR
from spidr_fast.models.components import frame_hop
from spidr_fast.plots import pyplot
from spidr_fast.train.checkpoint import checkpoints
from spidr_fast.train.config import RunConfig, TrainConfig
from spidr_fast.train.validation import frame_labels

logger = logging.getLogger(__name__)
ABX_CONDITIONS = ("within", "across")
ABX_IMPLEMENTATIONS = ("auto", "builtin", "fastabx")
# An ABX rate over fewer cells (phone pair x context x speaker) is flagged: on MFCCs of the synthetic corpus, 13
# cells within speakers gave 3.8 % and 114 gave 2.8 %, against 1.9 % on 855 (measured on 128, 256, 512 utterances).
MIN_ABX_CELLS = 100
# Synthetic utterances evaluated with no manifest: the random phone sequences rarely repeat a context, and 256
# utterances (2-4 s) give 114 cells within speakers and 1504 across, where the 64 of validation give 2 and 21.
SYNTHETIC_UTTERANCES = 256


def latest_checkpoint(run_dir: Path) -> Path:
    found = checkpoints(run_dir / "checkpoints")
    if not found:
        raise FileNotFoundError(
            f"no checkpoint in {run_dir / 'checkpoints'}: train first (python -m spidr_fast.train) or give --checkpoint"
        )
    return found[-1]


def synthetic_data(cfg: TrainConfig | None) -> DataConfig:
    """The first synthetic validation set of a training config (else the default run's), extended to
    `SYNTHETIC_UTTERANCES`: the same utterances first, as utterance i depends only on the seed and i."""
    data = next(
        (d for d in (cfg.validation.values() if cfg else []) if not d.manifest),
        DataConfig(synthetic_utterances=64, synthetic_seed=1),
    )
    return dataclasses.replace(data, synthetic_utterances=max(data.synthetic_utterances, SYNTHETIC_UTTERANCES))


def generate_items(source: AudioSource | SyntheticSource, alignments: Path | None) -> list[abx.Item]:
    """Items from the phone labels: the corpus's own, or the alignments' (which need a "speaker")."""
    names = fileids(source)
    items: list[abx.Item] = []
    if isinstance(source, SyntheticSource):
        for i, name in enumerate(names):
            phones = [PHONE_NAMES[p] for p in source.corpus.labels(i)]
            items += abx.items_from_alignment(name, f"spk{source.corpus.speaker_of(i)}", phones)
        return items
    records = read_alignments(alignments)
    for name in names:
        if name not in records:
            raise ValueError(f"{alignments}: no alignment for file {name}")
        if "speaker" not in records[name]:
            raise ValueError(
                f"{alignments}: the record of {name} has no 'speaker', needed to generate ABX items (or give --items)"
            )
        items += abx.items_from_alignment(name, str(records[name]["speaker"]), records[name]["phones"])
    return items


def abx_implementation(choice: str) -> str:
    """ "builtin" or "fastabx" for --abx `choice`; auto: fastabx when importable."""
    if choice not in ABX_IMPLEMENTATIONS:
        raise ValueError(f"abx must be one of {ABX_IMPLEMENTATIONS}, got {choice!r}")
    if choice == "auto":
        return "fastabx" if abx.fastabx_available() else "builtin"
    if choice == "fastabx" and not abx.fastabx_available():
        raise ValueError(
            "--abx fastabx: fastabx is not importable (it needs Python >= 3.12: "
            "pip install -e '.[abx]'); --abx builtin scores the same items"
        )
    return choice


def _abx(
    store: dict[str, torch.Tensor], items: list[abx.Item], frequency: float, context: str, implementation: str
) -> dict[str, float | None]:
    """Error rates (%) within and across speakers, both implementations on the same items."""
    selected, kept = abx.item_features(store, items, frequency)
    if implementation == "fastabx":
        rates = abx.fastabx_error_rates(store, kept, frequency, context=context, speakers=ABX_CONDITIONS)
    else:
        rates = {s: abx.abx_error_rate(selected, kept, speaker=s, context=context) for s in ABX_CONDITIONS}
    return {s: None if r is None else 100 * r for s, r in rates.items()}


def abx_task_size(
    store: dict[str, torch.Tensor], items: list[abx.Item], frequency: float, context: str
) -> dict[str, dict[str, int]]:
    """{"abx_items": how many items the file holds, how many have two frames or more, and how many each score
    rests on; "abx_cells": how many cells each score averages}."""
    _, kept = abx.item_features(store, items, frequency)
    cells = {s: abx.abx_cells(kept, speaker=s, context=context) for s in ABX_CONDITIONS}
    used = {s: len(abx.cell_items(c)) for s, c in cells.items()}
    return {
        "abx_items": {"in_file": len(items), "with_two_frames": len(kept), **used},
        "abx_cells": {s: len(c) for s, c in cells.items()},
    }


def format_rate(rate: float | None, cells: int) -> str:
    """An ABX rate with the number of cells behind it, flagged below `MIN_ABX_CELLS`."""
    if rate is None:
        return "none (no cell)"
    flag = f": too few to trust, under {MIN_ABX_CELLS}" if cells < MIN_ABX_CELLS else ""
    return f"{rate:.3f} ({cells} cells{flag})"


def evaluate(
    model: DinoSR,
    source: AudioSource | SyntheticSource,
    data: DataConfig,
    layers: list[int],
    items: list[abx.Item],
    *,
    context: str = "within",
    abx_choice: str = "auto",
    device: torch.device,
    progress: bool = True,
) -> dict[str, Any]:
    """{"abx": the implementation, "abx_items": item counts, "abx_cells": cell counts, "abx_min_cells",
    "baseline": the unit quality of k-means on MFCCs with as many units, "layers": {"layer_L": metrics}}."""
    implementation = abx_implementation(abx_choice)
    hop = frame_hop(model.cfg)
    if hop % LABEL_HOP:
        raise ValueError(f"frames of {hop} samples are not a whole number of 10 ms labels")
    labels = frame_labels(source, data)
    if labels is None:
        raise ValueError("no phone labels: give --alignments")
    phones, num_phones = labels
    names = fileids(source)
    unit_layers = [layer for layer in layers if layer in head_layers(model)]
    features: dict[int, dict[str, torch.Tensor]] = {layer: {} for layer in layers}
    units: dict[int, dict[str, torch.Tensor]] = {layer: {} for layer in unit_layers}
    outputs = iterate_outputs(
        model,
        source,
        range(len(source)),
        layers,
        units=unit_layers,
        normalize=data.normalize,
        device=device,
        progress=progress,
    )
    for index, feats, codes in outputs:
        for layer, tensor in feats.items():
            features[layer][names[index]] = tensor
        for layer, tensor in codes.items():
            units[layer][names[index]] = tensor
    repeat, frequency = hop // LABEL_HOP, SAMPLE_RATE / hop
    for i, name in enumerate(names):  # checked here to name the file: joint_counts only knows its position
        frames = len(next(iter(features.values()))[name])
        if abs(len(phones[i]) - repeat * frames) > MAX_LENGTH_MISMATCH * repeat:
            raise ValueError(
                f"alignment of {name} does not match its audio: {len(phones[i])} labels of 10 ms for "
                f"{frames} frames of {1000 / frequency:g} ms"
            )
    results: dict[str, Any] = {}
    for layer in layers:
        row: dict[str, Any] = {}
        if layer in units:
            per_file = [units[layer][name].numpy() for name in names]
            counts = joint_counts(phones, per_file, num_phones, model.cfg.codebook_size, repeat)
            row.update(
                unit_quality(counts),
                bitrate=bitrate(counts, frequency),
                position_nmi=position_nmi(per_file, model.cfg.codebook_size),
            )
        for speaker, rate in _abx(features[layer], items, frequency, context, implementation).items():
            row[f"abx_{speaker}"] = rate
        if layer in units:
            size = model.cfg.codebook_size
            one_hot = {n: torch.nn.functional.one_hot(u, size).float() for n, u in units[layer].items()}
            for speaker, rate in _abx(one_hot, items, frequency, context, implementation).items():
                row[f"abx_units_{speaker}"] = rate
        results[f"layer_{layer}"] = row
    sizes = abx_task_size(features[layers[0]], items, frequency, context)  # every layer has the same frames
    baseline = mfcc_kmeans_quality(source, data, phones, num_phones, model.cfg.codebook_size, hop)
    return {"abx": implementation, **sizes, "abx_min_cells": MIN_ABX_CELLS, "baseline": baseline, "layers": results}


def describe_value(metric: str, value: Any, abx_cells: dict[str, int]) -> str:
    if metric.startswith("abx_"):
        return format_rate(value, abx_cells[metric.rsplit("_", 1)[1]])
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def plot(results: dict[str, Any], path: Path) -> bool:
    """One panel per metric, by layer; False (and a logged note) without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    metrics = sorted({m for row in results.values() for m, v in row.items() if v is not None})
    fig, axes = plt.subplots(1, len(metrics), figsize=(3 * len(metrics), 3), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        points = [(int(k.split("_")[1]), row[metric]) for k, row in results.items() if row.get(metric) is not None]
        ax.plot(*zip(*points, strict=True), marker="o")
        ax.set_title(metric)
        ax.set_xlabel("layer")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m spidr_fast.evaluate", description=__doc__)
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="training checkpoint, exported model.pt or official state "
        "dict (default: the latest checkpoint of runs/spidr_fast/synthetic)",
    )
    parser.add_argument(
        "--model-type",
        choices=["spidr", "dinosr"],
        help="for a state dict without config.json beside it (default: spidr)",
    )
    parser.add_argument("--manifest", help="fairseq TSV or official spidr CSV (default: the synthetic corpus)")
    parser.add_argument("--alignments", type=Path, help='JSONL of {"fileid", "speaker", "phones": [one per 10 ms]}')
    parser.add_argument("--items", type=Path, help="ABX item file (default: generated from the alignments)")
    parser.add_argument("--layers", help="comma-separated layers, from 0 (default: all)")
    parser.add_argument(
        "--context",
        choices=["within", "any"],
        default="within",
        help="ABX context condition; 'any' gives many more triples on the synthetic corpus, whose "
        "random phone sequences rarely repeat a context, at a much higher cost",
    )
    parser.add_argument(
        "--abx",
        choices=ABX_IMPLEMENTATIONS,
        default="auto",
        help="ABX implementation (default auto: fastabx when importable, else the built-in); both score the same items",
    )
    parser.add_argument("--out", type=Path, help="output folder (default: eval_<checkpoint name> beside it)")
    parser.add_argument("--device", help="torch device (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if bool(args.manifest) != bool(args.alignments):
        parser.error("--manifest and --alignments go together (neither: the synthetic corpus)")
    return report_user_errors(_evaluate_and_report, args)


def _evaluate_and_report(args: argparse.Namespace) -> int:
    abx_implementation(args.abx)  # before the model loads
    checkpoint = args.checkpoint or latest_checkpoint(RunConfig().dir)
    model, cfg = load_model(checkpoint, args.model_type)
    device = torch.device(args.device) if args.device else default_device()
    model.to(device)
    layers = parse_layers(args.layers, model)
    if args.manifest:
        data = DataConfig(
            manifest=args.manifest, alignments_path=str(args.alignments), normalize=cfg.data.normalize if cfg else True
        )
    else:
        data = synthetic_data(cfg)
    source = build_source(data)
    out = args.out or checkpoint.parent / f"eval_{checkpoint.stem}"
    out.mkdir(parents=True, exist_ok=True)
    if args.items:
        item_file, items = args.items, abx.read_items(args.items)
    else:
        item_file, items = out / "items.item", generate_items(source, args.alignments)
        abx.write_items(items, item_file)
    scored = evaluate(
        model,
        source,
        data,
        layers,
        items,
        context=args.context,
        abx_choice=args.abx,
        device=device,
        progress=not args.no_progress,
    )
    report = {"checkpoint": str(checkpoint), "items": str(item_file), "context": args.context, **scored}
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    results = scored["layers"]
    print(f"ABX by {scored['abx']}; items: " + ", ".join(f"{k} {v}" for k, v in scored["abx_items"].items()))
    for name, row in results.items():
        print(name, " ".join(f"{k} {describe_value(k, v, scored['abx_cells'])}" for k, v in row.items()))
    print(f"k-means on MFCC, {model.cfg.codebook_size} units: {describe(scored['baseline'])}")
    if plot(results, out / "metrics.png"):
        print(f"plot: {out / 'metrics.png'}")
    print(f"results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
