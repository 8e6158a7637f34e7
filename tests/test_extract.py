"""Feature and unit extraction: checkpoints of every kind, exact batching, resume, errors, and the CLI."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_config

from spidr_fast.data.loading import AudioSource
from spidr_fast.data.synthetic import SyntheticCorpus
from spidr_fast.extract import extract_to_folder, length_batches, load_model, main, parse_layers
from spidr_fast.models import DinoSR, DinoSRConfig, build_model
from spidr_fast.models.components import num_frames
from spidr_fast.train.checkpoint import export_state_dict


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Four short wav files of different lengths, a manifest and alignments."""
    folder = tmp_path_factory.mktemp("corpus")
    manifest = SyntheticCorpus(num_utterances=4, min_seconds=0.6, max_seconds=1.2, seed=3).write(folder)
    return manifest


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A training checkpoint of a tiny SpidR (20 ms frames, 4 layers, heads on layers 1 to 3)."""
    cfg = tiny_config()
    torch.manual_seed(0)
    model = build_model(cfg=cfg.model)
    path = tmp_path_factory.mktemp("run") / "checkpoints" / "step_00000004.pt"
    path.parent.mkdir()
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(cfg), "step": 4}, path)
    return path


def test_batched_extraction_equals_one_file_at_a_time(corpus, checkpoint, tmp_path):
    model, cfg = load_model(checkpoint)
    source = AudioSource(corpus)
    assert len({source.num_samples(i) for i in range(len(source))}) == 4  # padding is exercised
    written, skipped = extract_to_folder(model, source, tmp_path, [0, 3], units=True, progress=False)
    assert (written, skipped) == (4, 0)
    for i, entry in enumerate(source.entries):
        wave = torch.from_numpy(source.load(i))
        wave = F.layer_norm(wave, wave.shape)[None]
        with torch.inference_mode():
            expected = model.get_intermediate_outputs(wave)
            probs = model.get_codebooks(wave)
        frames = int(num_frames(model.cfg, torch.tensor(entry.num_samples)))
        for layer in (0, 3):
            saved = torch.load(tmp_path / "features" / f"layer_{layer}" / f"{entry.fileid}.pt")
            assert saved.shape == (frames, cfg.model.encoder_embed_dim)
            torch.testing.assert_close(saved, expected[layer][0], atol=1e-5, rtol=1e-4)
        units = torch.load(tmp_path / "units" / "layer_3" / f"{entry.fileid}.pt")
        assert units.dtype == torch.int64 and torch.equal(units, probs[3].argmax(-1))
    assert not (tmp_path / "units" / "layer_0").exists()  # layer 0 has no head


def test_resume_skips_files_already_written(corpus, checkpoint, tmp_path):
    model, _ = load_model(checkpoint)
    source = AudioSource(corpus)
    assert extract_to_folder(model, source, tmp_path, [1], progress=False) == (4, 0)
    removed = tmp_path / "features" / "layer_1" / f"{source.entries[2].fileid}.pt"
    before = (tmp_path / "features" / "layer_1" / f"{source.entries[0].fileid}.pt").stat().st_mtime_ns
    removed.unlink()
    assert extract_to_folder(model, source, tmp_path, [1], progress=False) == (1, 3)
    assert removed.is_file()
    assert (tmp_path / "features" / "layer_1" / f"{source.entries[0].fileid}.pt").stat().st_mtime_ns == before


def test_exported_state_dict_gives_the_same_features(checkpoint, tmp_path):
    model, cfg = load_model(checkpoint)
    export_state_dict(model, cfg.model, tmp_path)
    exported, exported_cfg = load_model(tmp_path / "model.pt")
    assert exported_cfg is None and type(exported) is type(model)
    wave = torch.randn(1, 8_000)
    with torch.inference_mode():
        torch.testing.assert_close(exported.get_intermediate_outputs(wave)[2], model.get_intermediate_outputs(wave)[2])


def test_length_batches():
    assert length_batches([30, 10, 20, 10], 40, padding_is_exact=True) == [[1, 3], [2], [0]]
    assert length_batches([30, 10, 20], 100, padding_is_exact=False) == [[1], [2], [0]]


def test_clear_errors(corpus, checkpoint, tmp_path, capsys):
    model, _ = load_model(checkpoint)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_model(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="unknown layer 7: this model has layers 0 to 3"):
        parse_layers("2,7", model)
    with pytest.raises(ValueError, match="comma-separated"):
        parse_layers("two", model)
    with pytest.raises(ValueError, match="none of layers \\[0\\] has a head"):
        extract_to_folder(model, AudioSource(corpus), tmp_path, [0], units=True, progress=False)
    assert main(["--checkpoint", str(checkpoint), "--manifest", str(tmp_path / "no.tsv"), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: manifest not found: {tmp_path / 'no.tsv'}\n"  # one line, no traceback


def test_cli(corpus, checkpoint, tmp_path, capsys):
    args = [
        "--checkpoint",
        str(checkpoint),
        "--manifest",
        str(corpus),
        "--layers",
        "2,3",
        "--out",
        str(tmp_path),
        "--units",
        "--no-progress",
    ]
    assert main(args) == 0
    assert "wrote 4 files, skipped 0" in capsys.readouterr().out
    assert len(list((tmp_path / "units" / "layer_2").glob("*.pt"))) == 4
    assert main([*args, "--one-file-per-layer"]) == 0
    assert "wrote 0 files, skipped 4" in capsys.readouterr().out
    merged = torch.load(tmp_path / "features" / "layer_2.pt")
    first = torch.load(tmp_path / "features" / "layer_2" / f"{merged['fileids'][0]}.pt")
    assert merged["data"].shape == (int(merged["lengths"].sum()), first.shape[1])
    torch.testing.assert_close(merged["data"][: len(first)], first)
    assert torch.load(tmp_path / "units" / "layer_3.pt")["data"].dtype == torch.int64


def test_dinosr_state_dict_units_are_the_heads_argmax(corpus, checkpoint, tmp_path):
    """DinoSR heads all read the last layer; the model type comes from the exported config.json."""
    spidr_cfg = tiny_config().model
    fields = {f.name: getattr(spidr_cfg, f.name) for f in dataclasses.fields(DinoSRConfig)}
    dinosr = build_model(cfg=DinoSRConfig(**fields))
    export_state_dict(dinosr, dinosr.cfg, tmp_path / "export")
    model, _ = load_model(tmp_path / "export" / "model.pt")
    assert type(model) is DinoSR
    source = AudioSource(corpus)
    extract_to_folder(model, source, tmp_path / "out", [3], units=True, progress=False)
    wave = torch.from_numpy(source.load(1))
    with torch.inference_mode():
        probs = model.get_codebooks(F.layer_norm(wave, wave.shape)[None])
    units = torch.load(tmp_path / "out" / "units" / "layer_3" / f"{source.entries[1].fileid}.pt")
    assert torch.equal(units, probs[3].argmax(-1))
