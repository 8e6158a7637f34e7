"""Data: masks, the synthetic corpus, manifests, decoding faults, bucketed distributed batches, collation."""

import importlib.util
import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from spidr_fast.data import manifest as manifest_module
from spidr_fast.data.loading import (
    AudioSource,
    BucketBatchSampler,
    Clip,
    Collator,
    DataConfig,
    SpeechDataset,
    build_loader,
    build_source,
)
from spidr_fast.data.masking import MaskingConfig, compute_mask_indices
from spidr_fast.data.synthetic import LABEL_HOP, PHONE_NAMES, PHONES, SAMPLE_RATE, SyntheticCorpus
from spidr_fast.models import SpidRConfig
from spidr_fast.models.components import num_frames

# --- masks ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("selection", ["static", "uniform", "normal", "poisson"])
def test_masks_are_sorted_distinct_inside_each_row_and_equal_in_count(selection):
    lengths = torch.tensor([250, 180, 37, 250])
    masks = compute_mask_indices(
        MaskingConfig(mask_selection=selection, mask_other=2.0), lengths, torch.Generator().manual_seed(0)
    )
    assert masks.dtype == torch.int64 and masks.shape[0] == 4 and masks.shape[1] > 0
    for row, length in zip(masks, lengths, strict=True):
        assert torch.all(row < length) and torch.all(row[1:] > row[:-1])


@pytest.mark.official
def test_masks_have_the_official_size(official):
    """Same number of masked frames per row as the official masking, on average over draws."""
    from spidr.config import MaskingConfig as OfficialMaskingConfig

    # spidr.data's __init__ imports torchcodec, which masking does not need: load the one file.
    path = Path(official.__file__).parents[1] / "data" / "masks.py"
    spec = importlib.util.spec_from_file_location("official_masks", path)
    masks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(masks)
    MaskGenerator = masks.MaskGenerator  # noqa: N806
    lengths = torch.tensor([300, 300, 260, 300, 180, 300, 300, 290])
    padding = torch.arange(300) >= lengths.unsqueeze(1)
    official_generator = MaskGenerator(OfficialMaskingConfig())
    ours = [
        compute_mask_indices(MaskingConfig(), lengths, torch.Generator().manual_seed(s)).shape[1] for s in range(40)
    ]
    theirs = [official_generator(padding, generator=torch.Generator().manual_seed(s))[0].shape[1] for s in range(40)]
    assert abs(np.mean(ours) - np.mean(theirs)) < 0.05 * np.mean(theirs)


def test_masks_are_deterministic_given_the_generator():
    lengths = torch.tensor([120, 99])
    first = compute_mask_indices(MaskingConfig(), lengths, torch.Generator().manual_seed(7))
    assert torch.equal(first, compute_mask_indices(MaskingConfig(), lengths, torch.Generator().manual_seed(7)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(mask_prob=1.5), "masking.mask_prob"),
        (dict(mask_length=0), "masking.mask_length"),
        (dict(no_mask_overlap=True), "masking.no_mask_overlap"),
    ],
)
def test_bad_masking_config_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MaskingConfig(**kwargs)


# --- synthetic corpus ----------------------------------------------------------------------------------------------


def test_synthetic_corpus_is_deterministic_and_seeded():
    corpus = SyntheticCorpus(num_utterances=4)
    assert np.array_equal(corpus.waveform(2), SyntheticCorpus(num_utterances=4).waveform(2))
    assert np.array_equal(corpus.labels(2), corpus.labels(2))
    assert not np.array_equal(corpus.waveform(2)[:1000], SyntheticCorpus(seed=1).waveform(2)[:1000])
    assert len(PHONES) == 30 and len(set(PHONE_NAMES)) == 30


def test_synthetic_labels_align_with_the_audio():
    corpus = SyntheticCorpus(num_utterances=8)
    energies = {"silence": [], "vowel": []}
    for i in range(8):
        waveform, labels = corpus.waveform(i), corpus.labels(i)
        assert waveform.dtype == np.float32 and len(waveform) == len(labels) * LABEL_HOP
        assert labels[0] == 0 and labels[-1] == 0  # starts and ends on silence
        frames = waveform.reshape(-1, LABEL_HOP)
        for kind in energies:
            chosen = [PHONES[p].kind == kind for p in labels]
            energies[kind].append(np.sqrt((frames[chosen] ** 2).mean()))
    assert np.mean(energies["vowel"]) > 10 * np.mean(energies["silence"])


def test_synthetic_corpus_writes_wavs_manifest_and_alignments(tmp_path):
    corpus = SyntheticCorpus(num_utterances=3)
    manifest = corpus.write(tmp_path)
    entries = manifest_module.read_manifest(manifest)
    assert [e.fileid for e in entries] == ["utt00000", "utt00001", "utt00002"]
    audio, rate = soundfile.read(entries[1].path, dtype="float32")
    assert rate == SAMPLE_RATE and len(audio) == entries[1].num_samples == corpus.num_samples(1)
    records = [json.loads(line) for line in (tmp_path / "alignments.jsonl").read_text().splitlines()]
    assert records[1]["fileid"] == "utt00001" and len(records[1]["phones"]) == len(corpus.labels(1))


# --- manifests and decoding ----------------------------------------------------------------------------------------


def write_wav(path, num_samples, rate=SAMPLE_RATE, channels=1):
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, np.random.default_rng(0).uniform(-0.5, 0.5, (num_samples, channels)), rate)


def test_manifest_formats_and_writer(tmp_path, capsys):
    write_wav(tmp_path / "audio" / "a.wav", 16_000)
    write_wav(tmp_path / "audio" / "sub" / "b.flac", 8_000)
    (tmp_path / "audio" / "broken.wav").write_bytes(b"RIFF not really a wav")
    manifest_module.main([str(tmp_path / "audio"), "-o", str(tmp_path / "train.tsv"), "--workers", "2"])
    assert "wrote 2 files" in capsys.readouterr().out
    entries = manifest_module.read_manifest(tmp_path / "train.tsv")
    assert [(e.fileid, e.num_samples) for e in entries] == [("a", 16_000), ("b", 8_000)]
    assert entries[1].path == (tmp_path / "audio" / "sub" / "b.flac").resolve()

    csv = tmp_path / "train.csv"
    csv.write_text(f"fileid,path,num_samples\nx,{entries[0].path},16000\n")
    assert manifest_module.read_manifest(csv) == [manifest_module.Entry("x", entries[0].path, 16_000)]


def test_bad_manifest_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        manifest_module.read_manifest(tmp_path / "none.tsv")
    bad = tmp_path / "bad.tsv"
    bad.write_text("/root\nno-tab-here\n")
    with pytest.raises(ValueError, match="bad.tsv: expected a fairseq TSV"):
        manifest_module.read_manifest(bad)


def test_unusable_audio_is_skipped_and_named(tmp_path, caplog):
    """Corrupt, missing, wrong rate or channels, shorter than the manifest says, header-only, non-finite: each
    gives None and a warning naming the file and why (a wrong format used to raise, a crash at hour ten)."""
    write_wav(tmp_path / "good.wav", 4_000)
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00garbage")
    write_wav(tmp_path / "stereo.wav", 4_000, channels=2)
    write_wav(tmp_path / "slow.wav", 4_000, rate=8_000)
    write_wav(tmp_path / "short.wav", 1_000)
    write_wav(tmp_path / "header_only.wav", 0)
    soundfile.write(tmp_path / "nan.wav", np.full(4_000, np.nan, dtype=np.float32), 16_000, subtype="FLOAT")
    names = ["good", "corrupt", "stereo", "slow", "short", "header_only", "nan", "missing"]
    (tmp_path / "m.tsv").write_text(f"{tmp_path}\n" + "".join(f"{name}.wav\t4000\n" for name in names))
    dataset = SpeechDataset(AudioSource(tmp_path / "m.tsv"), normalize=True)
    clips = [Clip(index, 0, 4_000, torch.Generator().get_state()) for index in range(len(names))]
    waveform = dataset[clips[0]]
    assert waveform.shape == (4_000,) and abs(float(waveform.mean())) < 1e-5
    reasons = {
        "corrupt": "",
        "stereo": "expected mono audio at 16000 Hz, got 2 channel(s) at 16000 Hz",
        "slow": "got 1 channel(s) at 8000 Hz",
        "short": "the manifest says 4000 samples, the file ends before",
        "header_only": "the file ends before sample 4000",
        "nan": "non-finite samples",
        "missing": "",
    }
    for index, name in enumerate(names[1:], start=1):
        caplog.clear()
        assert dataset[clips[index]] is None
        assert f"skipping unusable audio {tmp_path / name}.wav: " in caplog.text and reasons[name] in caplog.text


@pytest.mark.parametrize("normalize", [False, True])
def test_a_file_shorter_than_its_manifest_says_is_skipped_and_named(tmp_path, caplog, normalize):
    write_wav(tmp_path / "short.wav", 3_000)
    (tmp_path / "m.tsv").write_text(f"{tmp_path}\nshort.wav\t4000\n")
    clip = Clip(0, 500, 3_000, torch.Generator().get_state())
    assert SpeechDataset(AudioSource(tmp_path / "m.tsv"), normalize=normalize)[clip] is None
    assert "short.wav: the manifest says 4000 samples, the file ends before sample 3500" in caplog.text


# --- batches -------------------------------------------------------------------------------------------------------


def test_batches_fit_the_budget_and_cover_every_utterance_once():
    lengths = [int(n) for n in np.random.default_rng(0).integers(2_000, 40_000, 200)]
    cfg = DataConfig(max_sample_size=32_000, max_batch_length=100_000, num_buckets=8)
    sampler = BucketBatchSampler(lengths, cfg)
    batches = [[clip.index for clip in b] for b in sampler]
    assert all(sum(min(lengths[i], 32_000) for i in b) <= 100_000 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(200))
    sampler.set_epoch(1)
    assert [[clip.index for clip in b] for b in sampler] != batches  # reshuffled


def test_ranks_get_the_same_number_of_distinct_batches_and_resume_skips():
    lengths = [20_000] * 23
    cfg = DataConfig(max_sample_size=32_000, max_batch_length=40_000, num_buckets=1)
    ranks = [list(BucketBatchSampler(lengths, cfg, rank=r, world_size=3)) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1 and len(ranks[0]) == len(BucketBatchSampler(lengths, cfg, world_size=3))
    states = [b[0].batch_rng_state for r in ranks for b in r]
    assert all(not torch.equal(a, b) for i, a in enumerate(states) for b in states[:i])  # each batch its own crops
    resumed = BucketBatchSampler(lengths, cfg, rank=1, world_size=3)
    resumed.set_epoch(0, start=2)
    assert all(
        a.index == b.index and a.start == b.start and torch.equal(a.batch_rng_state, b.batch_rng_state)
        for a, b in zip(sum(list(resumed), []), sum(ranks[1][2:], []), strict=True)
    )


def test_fewer_batches_than_ranks_is_an_error_on_every_rank_naming_the_numbers():
    """Before: 2 batches for 4 ranks gave ranks 2 and 3 none, so they raised while ranks 0 and 1 waited for them."""
    lengths = [20_000] * 4
    cfg = DataConfig(max_sample_size=32_000, max_batch_length=40_000, num_buckets=1)
    for rank in range(4):
        with pytest.raises(ValueError, match=r"^2 batch\(es\) of at most data.max_batch_length = 40000 samples fro"):
            BucketBatchSampler(lengths, cfg, rank=rank, world_size=4)
    assert len(BucketBatchSampler(lengths, cfg, rank=1, world_size=2)) == 1


def test_the_length_of_an_epoch_does_not_reshuffle_it(monkeypatch):
    sampler = BucketBatchSampler([20_000] * 23, DataConfig(max_sample_size=32_000, max_batch_length=40_000))
    batches = [[clip.index for clip in batch] for batch in sampler]
    draws = []
    monkeypatch.setattr(torch, "randperm", lambda *a, **k: draws.append(a) or torch.arange(a[0]))
    assert len(sampler) == len(batches) and [[clip.index for clip in batch] for batch in sampler] == batches
    assert not draws
    sampler.set_epoch(1)
    assert len(sampler) == len(batches) and draws  # a new epoch is shuffled once


def test_batch_seeds_are_an_explicit_mix_not_pythons_hash():
    """The seeds of (random_seed, epoch, rank, position) are NumPy SeedSequence's, fixed across Python versions:
    a run resumed under another Python sees the same crops and masks."""
    cfg = DataConfig(random_seed=3, max_sample_size=32_000, max_batch_length=40_000)
    sampler = BucketBatchSampler([20_000] * 8, cfg, rank=1, world_size=2)
    sampler.set_epoch(2)
    expected = int(np.random.SeedSequence([3, 2, 1, 5]).generate_state(1, np.uint64)[0]) & 0x7FFF_FFFF_FFFF
    assert sampler.batch_seed(5) == expected == 127489236486768


def whole_file_batch(source, indices, seed, cfg, masking, frames_of):
    """The pipeline before crops were planned, as an oracle: decode whole files, normalise, crop in the collator."""
    generator = torch.Generator().manual_seed(seed)
    waveforms = [torch.from_numpy(source.load(i)) for i in indices]
    if cfg.normalize:
        waveforms = [torch.nn.functional.layer_norm(w, w.shape) for w in waveforms]
    lengths = [min(len(w), cfg.max_sample_size) for w in waveforms]
    target = max(lengths) if cfg.enable_padding else min(lengths)
    clips = []
    for waveform, length in zip(waveforms, lengths, strict=True):
        size, offset = min(length, target), 0
        if cfg.rand_crop and len(waveform) > size:
            offset = int(torch.randint(len(waveform) - size + 1, (1,), generator=generator))
        clips.append(torch.nn.functional.pad(waveform[offset : offset + size], (0, target - size)))
    frames = frames_of(torch.tensor([min(n, target) for n in lengths]))
    return torch.stack(clips), frames, compute_mask_indices(masking, frames, generator)


@pytest.mark.parametrize("audio_format", ["flac", "wav"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("padding", [False, True])
def test_decoding_only_the_crop_gives_the_batches_of_whole_files_bit_for_bit(
    tmp_path, audio_format, normalize, padding
):
    manifest = SyntheticCorpus(num_utterances=9, min_seconds=0.5, max_seconds=2.0).write(tmp_path, audio_format)
    sizes = dict(max_sample_size=12_000, max_batch_length=40_000, num_buckets=3)
    cfg = DataConfig(manifest=str(manifest), normalize=normalize, enable_padding=padding, **sizes)
    model_cfg, masking = SpidRConfig(), MaskingConfig()
    frames_of = partial(num_frames, model_cfg)
    source = build_source(cfg)
    sampler = BucketBatchSampler([source.num_samples(i) for i in range(len(source))], cfg)
    dataset, collate = SpeechDataset(source, normalize=normalize), Collator(masking, frames_of)
    cropped = 0
    for position, clips in enumerate(sampler):
        batch = collate(dataset.__getitems__(clips))
        waveforms, frames, mask_indices = whole_file_batch(
            source, [c.index for c in clips], sampler.batch_seed(position), cfg, masking, frames_of
        )
        assert torch.equal(batch.waveforms, waveforms) and torch.equal(batch.mask_indices, mask_indices)
        if padding and bool((frames < frames.max()).any()):
            assert batch.frame_mask.sum(1).tolist() == frames.tolist()
        else:
            assert batch.frame_mask is None
        cropped += sum(c.num_samples < source.num_samples(c.index) for c in clips)
    assert cropped > 0  # the case that decodes less was tried


def test_a_loader_worker_delivers_the_batches_of_the_main_process(tmp_path):
    # A worker decodes into shared memory (no copy on the way back): the batches must not depend on where they
    # were made.
    manifest = SyntheticCorpus(num_utterances=7, min_seconds=0.5, max_seconds=1.5).write(tmp_path, "flac")
    batches = {}
    for workers in (0, 1):
        sizes = dict(max_sample_size=12_000, max_batch_length=30_000, num_buckets=3)
        cfg = DataConfig(manifest=str(manifest), num_workers=workers, normalize=False, **sizes)
        batches[workers] = list(build_loader(cfg, MaskingConfig(), partial(num_frames, SpidRConfig())))
    assert len(batches[0]) == len(batches[1]) > 1
    for here, there in zip(batches[0], batches[1], strict=True):
        assert torch.equal(here.waveforms, there.waveforms) and here.waveforms.abs().sum() > 0
        assert torch.equal(here.mask_indices, there.mask_indices)


def test_a_batch_drops_the_rows_of_unreadable_files_and_pads_to_the_longest_left(tmp_path, caplog):
    for name, samples in (("a.wav", 16_000), ("b.wav", 24_000), ("c.wav", 20_000)):
        write_wav(tmp_path / name, samples)
    (tmp_path / "d.wav").write_bytes(b"RIFF\x00\x00garbage")
    (tmp_path / "m.tsv").write_text(f"{tmp_path}\na.wav\t16000\nb.wav\t24000\nc.wav\t20000\nd.wav\t30000\n")
    dataset = SpeechDataset(AudioSource(tmp_path / "m.tsv"), normalize=False)
    state = torch.Generator().manual_seed(5).get_state()
    clips = [Clip(i, 0, n, state) for i, n in enumerate((16_000, 24_000, 20_000, 30_000))]
    model_cfg = SpidRConfig()
    collate = Collator(MaskingConfig(), partial(num_frames, model_cfg))
    batch = collate(dataset.__getitems__(clips))
    assert batch.skipped == 1 and batch.waveforms.shape == (3, 24_000) and "d.wav" in caplog.text
    for row, index in zip(batch.waveforms, range(3), strict=True):
        assert torch.equal(row[: clips[index].num_samples], dataset[clips[index]])
        assert not row[clips[index].num_samples :].any()
    frames = num_frames(model_cfg, torch.tensor([16_000, 24_000, 20_000]))
    assert batch.frame_mask.shape == (3, int(frames.max()))
    assert batch.frame_mask.sum(1).tolist() == frames.tolist()
    assert int(batch.mask_indices.max()) < int(frames.max())
    assert torch.equal(collate(dataset.__getitems__(clips[:3])).mask_indices, batch.mask_indices)  # the batch's seed
