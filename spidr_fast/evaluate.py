"""python -m spidr_fast.evaluate [--checkpoint CKPT --manifest M --alignments A] [--items ITEMS] [--layers 5,6]

Per layer: the unit quality of the head units against 10 ms phone labels (PNMI, phone and cluster purity, unit
perplexity, active units, bitrate), and ABX error rates within and across speakers on the continuous features and
on the units (as one-hot vectors), from an item file or one generated from the alignments. Writes results.json,
the item file used, and metrics.png when matplotlib is installed.

With no arguments: the latest checkpoint of the default training run (runs/spidr_fast/synthetic) on the synthetic
validation utterances of its config, with their own labels.
"""

import argparse
import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import torch

from spidr_fast import abx
from spidr_fast.data.alignments import read_alignments
from spidr_fast.data.loading import AudioSource, DataConfig, SyntheticSource, build_source
from spidr_fast.data.synthetic import LABEL_HOP, PHONE_NAMES, SAMPLE_RATE
from spidr_fast.extract import default_device, fileids, head_layers, iterate_outputs, load_model, parse_layers
from spidr_fast.metrics import MAX_LENGTH_MISMATCH, bitrate, joint_counts, unit_quality
from spidr_fast.models import DinoSR
from spidr_fast.train.checkpoint import checkpoints
from spidr_fast.train.config import RunConfig, TrainConfig
from spidr_fast.train.validation import frame_labels

logger = logging.getLogger(__name__)
ABX_CONDITIONS = ("within", "across")


def latest_checkpoint(run_dir: Path) -> Path:
    found = checkpoints(run_dir / "checkpoints")
    if not found:
        raise FileNotFoundError(f"no checkpoint in {run_dir / 'checkpoints'}: train first (python -m spidr_fast.train) "
                                "or give --checkpoint")  # fmt: skip
    return found[-1]


def frame_hop(model: DinoSR) -> int:
    """Samples per feature frame."""
    return math.prod(stride for _, _, stride in model.cfg.extractor_conv_layer_config)


def synthetic_data(cfg: TrainConfig | None) -> DataConfig:
    """The first synthetic validation set of a training config, else the default run's."""
    for data in (cfg.validation.values() if cfg else []):
        if not data.manifest:
            return data
    return DataConfig(synthetic_utterances=64, synthetic_seed=1)


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
            raise ValueError(f"{alignments}: the record of {name} has no 'speaker', needed to generate ABX items "
                             "(or give --items)")  # fmt: skip
        items += abx.items_from_alignment(name, str(records[name]["speaker"]), records[name]["phones"])
    return items


def _abx(store: dict[str, torch.Tensor], items: list[abx.Item], frequency: float, context: str,
         item_file: Path) -> dict[str, float | None]:  # fmt: skip
    """Error rates (%) within and across speakers; fastabx when importable, on the same features."""
    if abx.fastabx_available():
        with tempfile.TemporaryDirectory() as root:
            for name, tensor in store.items():
                torch.save(tensor, Path(root) / f"{name}.pt")
            return {s: 100 * abx.fastabx_error_rate(item_file, Path(root), speaker=s, context=context,
                                                    frequency=frequency) for s in ABX_CONDITIONS}  # fmt: skip
    selected, kept = abx.item_features(store, items, frequency)
    rates = {s: abx.abx_error_rate(selected, kept, speaker=s, context=context) for s in ABX_CONDITIONS}
    return {s: None if r is None else 100 * r for s, r in rates.items()}


def evaluate(model: DinoSR, source: AudioSource | SyntheticSource, data: DataConfig, layers: list[int],
             items: list[abx.Item], item_file: Path, *, context: str = "within", device: torch.device,
             progress: bool = True) -> dict[str, Any]:  # fmt: skip
    hop = frame_hop(model)
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
    outputs = iterate_outputs(model, source, range(len(source)), layers, units=unit_layers, normalize=data.normalize,
                              device=device, progress=progress)  # fmt: skip
    for index, feats, codes in outputs:
        for layer, tensor in feats.items():
            features[layer][names[index]] = tensor
        for layer, tensor in codes.items():
            units[layer][names[index]] = tensor
    repeat, frequency = hop // LABEL_HOP, SAMPLE_RATE / hop
    for i, name in enumerate(names):  # checked here to name the file: joint_counts only knows its position
        frames = len(next(iter(features.values()))[name])
        if abs(len(phones[i]) - repeat * frames) > MAX_LENGTH_MISMATCH * repeat:
            raise ValueError(f"alignment of {name} does not match its audio: {len(phones[i])} labels of 10 ms for "
                             f"{frames} frames of {1000 / frequency:g} ms")  # fmt: skip
    results: dict[str, Any] = {}
    for layer in layers:
        row: dict[str, Any] = {}
        if layer in units:
            per_file = [units[layer][name].numpy() for name in names]
            counts = joint_counts(phones, per_file, num_phones, model.cfg.codebook_size, repeat)
            row.update(unit_quality(counts), bitrate=bitrate(counts, frequency))
        for speaker, rate in _abx(features[layer], items, frequency, context, item_file).items():
            row[f"abx_{speaker}"] = rate
        if layer in units:
            size = model.cfg.codebook_size
            one_hot = {n: torch.nn.functional.one_hot(u, size).float() for n, u in units[layer].items()}
            for speaker, rate in _abx(one_hot, items, frequency, context, item_file).items():
                row[f"abx_units_{speaker}"] = rate
        results[f"layer_{layer}"] = row
    return results


def plot(results: dict[str, Any], path: Path) -> bool:
    """One panel per metric, by layer; False (and a message) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'spidr_fast[eval]')")
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
    parser = argparse.ArgumentParser(prog="python -m spidr_fast.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--checkpoint", type=Path, help="training checkpoint, exported model.pt or official state "
                        "dict (default: the latest checkpoint of runs/spidr_fast/synthetic)")  # fmt: skip
    parser.add_argument("--model-type", choices=["spidr", "dinosr"],
                        help="for a state dict without config.json beside it (default: spidr)")  # fmt: skip
    parser.add_argument("--manifest", help="fairseq TSV or official spidr CSV (default: the synthetic corpus)")
    parser.add_argument("--alignments", type=Path, help='JSONL of {"fileid", "speaker", "phones": [one per 10 ms]}')
    parser.add_argument("--items", type=Path, help="ABX item file (default: generated from the alignments)")
    parser.add_argument("--layers", help="comma-separated layers, from 0 (default: all)")
    parser.add_argument("--context", choices=["within", "any"], default="within",
                        help="ABX context condition; 'any' gives many more triples on the synthetic corpus, whose "
                        "random phone sequences rarely repeat a context, at a much higher cost")  # fmt: skip
    parser.add_argument("--out", type=Path, help="output folder (default: eval_<checkpoint name> beside it)")
    parser.add_argument("--device", help="torch device (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if bool(args.manifest) != bool(args.alignments):
        parser.error("--manifest and --alignments go together (neither: the synthetic corpus)")
    checkpoint = args.checkpoint or latest_checkpoint(RunConfig().dir)
    model, cfg = load_model(checkpoint, args.model_type)
    device = torch.device(args.device) if args.device else default_device()
    model.to(device)
    layers = parse_layers(args.layers, model)
    if args.manifest:
        data = DataConfig(manifest=args.manifest, alignments_path=str(args.alignments),
                          normalize=cfg.data.normalize if cfg else True)  # fmt: skip
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
    results = evaluate(model, source, data, layers, items, item_file, context=args.context, device=device,
                       progress=not args.no_progress)  # fmt: skip
    report = {"checkpoint": str(checkpoint), "items": str(item_file), "context": args.context,
              "abx": "fastabx" if abx.fastabx_available() else "built-in", "layers": results}  # fmt: skip
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    for name, row in results.items():
        print(name, " ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    if plot(results, out / "metrics.png"):
        print(f"plot: {out / 'metrics.png'}")
    print(f"results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
