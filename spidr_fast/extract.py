"""python -m spidr_fast.extract --checkpoint CKPT --manifest M --layers 5,6 --out DIR [--units]

Per-layer features (each student layer's output before the residual) and head units (argmax of each head) of
every file of a manifest, batched by length, on the GPU when there is one. Layers count from 0. One file per
utterance and layer, named after its file id, the layout ABX tools read:
`DIR/features/layer_5/<fileid>.pt` ((frames, D) float32) and `DIR/units/layer_5/<fileid>.pt` ((frames,) int64).
Files already written are skipped, so an interrupted run resumes.
"""

import argparse
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from spidr_fast.cli import ArgumentParser, positive, report_user_errors
from spidr_fast.data.loading import AudioSource, SyntheticSource
from spidr_fast.models import DinoSR, SpidR, build_model
from spidr_fast.models.components import num_frames
from spidr_fast.train.checkpoint import atomic_save
from spidr_fast.train.config import TrainConfig, config_from_dict

logger = logging.getLogger(__name__)
DEFAULT_BATCH_SAMPLES = 1_600_000  # padded samples per batch: 100 s of audio


def load_model(checkpoint: str | Path, model_type: str | None = None) -> tuple[DinoSR, TrainConfig | None]:
    """A model in eval mode from a training checkpoint of ours (its config inside; returned too) or from a state
    dict saved by the official package or by `--export` (`build_model`; config.json beside it when present).
    `model_type` is only needed for a bare state dict without config.json ("spidr" by default)."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "config" in state and "model" in state:
        cfg = config_from_dict(state["config"])
        model = build_model(cfg=cfg.model)
        model.load_state_dict(state["model"])
        return model.eval(), cfg
    if model_type is None:
        config_path = path.parent / "config.json"
        fields = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        model_type = "dinosr" if fields and "ema_timescale" not in fields.get("model", fields) else "spidr"
    return build_model(model_type=model_type, checkpoint=path).eval(), None


def head_layers(model: DinoSR) -> range:
    """The layers whose heads give units (the last `num_codebooks`)."""
    return range(len(model.student.layers) - model.num_codebooks, len(model.student.layers))


def parse_layers(spec: str | None, model: DinoSR) -> list[int]:
    """ "5,6" → [5, 6]; None → every layer. Errors name the valid layers."""
    count = len(model.student.layers)
    if spec is None:
        return list(range(count))
    try:
        layers = sorted({int(part) for part in spec.split(",") if part.strip()})
    except ValueError as error:
        raise ValueError(f"--layers must be comma-separated layer numbers, got {spec!r}") from error
    unknown = [layer for layer in layers if not 0 <= layer < count]
    if unknown or not layers:
        raise ValueError(f"unknown layer {unknown[0] if unknown else spec!r}: this model has layers 0 to {count - 1}")
    return layers


def fileids(source: AudioSource | SyntheticSource) -> list[str]:
    """Manifest file ids; the synthetic corpus's are those `SyntheticCorpus.write` gives its files."""
    if isinstance(source, SyntheticSource):
        return [f"utt{i:05d}" for i in range(len(source))]
    return [entry.fileid for entry in source.entries]


def length_batches(lengths: Sequence[int], max_samples: int, *, padding_is_exact: bool) -> list[list[int]]:
    """Indices sorted by length, grouped while the padded batch stays within `max_samples`. Without
    `padding_is_exact` (a group-norm extractor normalises over time, padding included), one file per batch."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    for index in order:
        if batches and padding_is_exact and lengths[index] * (len(batches[-1]) + 1) <= max_samples:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


@torch.inference_mode()
def iterate_outputs(
    model: DinoSR,
    source: AudioSource | SyntheticSource,
    indices: Sequence[int],
    layers: Sequence[int],
    *,
    units: Sequence[int] = (),
    normalize: bool = True,
    device: torch.device | None = None,
    max_batch_samples: int = DEFAULT_BATCH_SAMPLES,
    progress: bool = True,
) -> Iterator[tuple[int, dict[int, torch.Tensor], dict[int, torch.Tensor]]]:
    """(index, {layer: (frames, D) features}, {layer: (frames,) units}) for each utterance of `indices`, on CPU,
    in batches of similar length. `units` lists head layers."""
    from tqdm import tqdm

    device = device or next(model.parameters()).device
    first_head = head_layers(model).start
    not_heads = [layer for layer in units if layer < first_head]
    if not_heads:
        raise ValueError(
            f"layer {not_heads[0]} has no head: units come from layers {first_head} to {len(model.student.layers) - 1}"
        )
    lengths = [source.num_samples(i) for i in indices]
    batches = length_batches(lengths, max_batch_samples, padding_is_exact=model.cfg.extractor_mode == "layer_norm")
    bar = tqdm(total=len(indices), desc="extracting", unit="file", disable=not progress)
    for batch in batches:
        waves = []
        for position in batch:
            wave = torch.from_numpy(np.ascontiguousarray(source.load(indices[position])))
            waves.append(F.layer_norm(wave, wave.shape) if normalize else wave)
        samples = torch.tensor([len(w) for w in waves])
        frames = num_frames(model.cfg, samples)
        padded = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True).to(device)
        mask = None
        if len(batch) > 1 and int(samples.min()) != int(samples.max()):
            mask = (torch.arange(int(frames.max()))[None, :] < frames[:, None]).to(device)
        outputs = model.get_intermediate_outputs(padded, attention_mask=mask)
        codes: dict[int, torch.Tensor] = {}
        if units and isinstance(model, SpidR):  # its heads read these outputs: no second forward
            codes = {layer: model.heads[layer - first_head](outputs[layer]).argmax(-1) for layer in units}
        elif units:
            probs = model.get_codebooks(padded, attention_mask=mask)
            codes = {layer: probs[layer].reshape(len(batch), -1, probs[layer].shape[-1]).argmax(-1) for layer in units}
        for row, position in enumerate(batch):
            n = int(frames[row])
            feats = {layer: outputs[layer][row, :n].float().cpu() for layer in layers}
            yield indices[position], feats, {layer: codes[layer][row, :n].cpu() for layer in units}
            bar.update()
    bar.close()


def output_paths(out: Path, fileid: str, layers: Sequence[int], units: Sequence[int]) -> list[Path]:
    return [out / "features" / f"layer_{layer}" / f"{fileid}.pt" for layer in layers] + [
        out / "units" / f"layer_{layer}" / f"{fileid}.pt" for layer in units
    ]


def extract_to_folder(
    model: DinoSR,
    source: AudioSource | SyntheticSource,
    out: str | Path,
    layers: Sequence[int],
    *,
    units: bool = False,
    **options,
) -> tuple[int, int]:
    """Write every utterance's outputs under `out`; returns (written, skipped: already there)."""
    out = Path(out)
    unit_layers = [layer for layer in layers if layer in head_layers(model)] if units else []
    if units and not unit_layers:
        raise ValueError(f"--units: none of layers {list(layers)} has a head (head layers: {list(head_layers(model))})")
    names = fileids(source)
    todo = [
        i for i, name in enumerate(names) if not all(p.is_file() for p in output_paths(out, name, layers, unit_layers))
    ]
    for folder in {p.parent for p in output_paths(out, "x", layers, unit_layers)}:
        folder.mkdir(parents=True, exist_ok=True)
    for index, feats, codes in iterate_outputs(model, source, todo, layers, units=unit_layers, **options):
        for kind, tensors in (("features", feats), ("units", codes)):
            for layer, tensor in tensors.items():  # clone: a row view would save the whole batch
                atomic_save(tensor.clone(), out / kind / f"layer_{layer}" / f"{names[index]}.pt")
    return len(todo), len(names) - len(todo)


def merge_layers(
    out: str | Path, names: Sequence[str], layers: Sequence[int], unit_layers: Sequence[int]
) -> list[Path]:
    """One file per layer and kind, `out/features/layer_L.pt` (and `out/units/layer_L.pt`): {"fileids", "lengths"
    (files,), "data": every file's frames concatenated in manifest order}, from the per-utterance files."""
    out, written = Path(out), []
    for kind, kind_layers in (("features", layers), ("units", unit_layers)):
        for layer in kind_layers:
            tensors = [torch.load(out / kind / f"layer_{layer}" / f"{name}.pt") for name in names]
            path = out / kind / f"layer_{layer}.pt"
            atomic_save(
                {
                    "fileids": list(names),
                    "lengths": torch.tensor([len(t) for t in tensors]),
                    "data": torch.cat(tensors),
                },
                path,
            )
            written.append(path)
    return written


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m spidr_fast.extract", description=__doc__)
    parser.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        help="a training checkpoint (run_dir/checkpoints/step_*.pt), an exported model.pt or an official state dict",
    )
    parser.add_argument(
        "--model-type",
        choices=["spidr", "dinosr"],
        help="for a state dict without config.json beside it (default: spidr)",
    )
    parser.add_argument("--manifest", required=True, help="fairseq TSV or official spidr CSV of 16 kHz mono audio")
    parser.add_argument("--layers", help="comma-separated layers, from 0 (default: all)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--units", action="store_true", help="also write the units of the layers that have a head")
    parser.add_argument(
        "--one-file-per-layer",
        action="store_true",
        help="also gather each layer into one file, features/layer_L.pt (fileids, lengths, data)",
    )
    parser.add_argument("--device", help="torch device (default: cuda when available)")
    parser.add_argument(
        "--max-batch-samples", type=positive(int), default=DEFAULT_BATCH_SAMPLES, help="padded samples per batch"
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    return report_user_errors(_extract, args)


def _extract(args: argparse.Namespace) -> int:
    model, cfg = load_model(args.checkpoint, args.model_type)
    device = torch.device(args.device) if args.device else default_device()
    model.to(device)
    layers = parse_layers(args.layers, model)
    written, skipped = extract_to_folder(
        model,
        AudioSource(args.manifest),
        args.out,
        layers,
        units=args.units,
        device=device,
        normalize=cfg.data.normalize if cfg else True,
        max_batch_samples=args.max_batch_samples,
        progress=not args.no_progress,
    )
    print(f"wrote {written} files, skipped {skipped} already there, to {args.out}")
    if args.one_file_per_layer:
        source = AudioSource(args.manifest)
        unit_layers = [layer for layer in layers if layer in head_layers(model)] if args.units else []
        for path in merge_layers(args.out, fileids(source), layers, unit_layers):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
