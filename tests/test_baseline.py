"""The k-means-on-MFCC baseline: the clustering on known clusters, the deltas, its scores on a tiny synthetic
corpus, and its cache; and the training run's metrics plot."""

import json
import sys

import numpy as np
import pytest
import torch

from spidr_fast import baseline
from spidr_fast.data.loading import DataConfig, build_source
from spidr_fast.metrics import joint_counts, unit_quality
from spidr_fast.plots import plot_training
from spidr_fast.train.validation import frame_labels


def test_kmeans_finds_well_separated_clusters():
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    num_clusters, dim = 7, 5
    centres = 20 * torch.randn(num_clusters, dim, generator=generator)
    truth = torch.randint(num_clusters, (1003,), generator=generator)
    truth[:num_clusters] = torch.arange(num_clusters)  # every cluster present
    frames = centres[truth] + 0.1 * torch.randn(len(truth), dim, generator=generator)
    units = baseline.kmeans_units(frames, num_clusters, seed=3)
    quality = unit_quality(joint_counts([truth.numpy()], [units.numpy()], num_clusters, num_clusters, repeat=1))
    assert quality["pnmi"] == pytest.approx(1.0, abs=1e-12) and quality["active_units"] == num_clusters
    assert torch.equal(units, baseline.kmeans_units(frames, num_clusters, seed=3))  # the seed fixes the result
    with pytest.raises(ValueError, match="num_units must be between 1 and the 1003 frames, got 0"):
        baseline.kmeans_units(frames, 0)


def test_deltas_are_centred_differences_with_repeated_edges():
    frames = torch.randn(9, 3, dtype=torch.float64)
    padded = np.concatenate([frames[:1], frames, frames[-1:]])
    first = (padded[2:] - padded[:-2]) / 2
    padded_first = np.concatenate([first[:1], first, first[-1:]])
    second = (padded_first[2:] - padded_first[:-2]) / 2
    expected = np.concatenate([frames.numpy(), first, second], axis=1)
    np.testing.assert_allclose(baseline.with_deltas(frames).numpy(), expected, rtol=0, atol=1e-15)


def test_baseline_on_a_tiny_corpus_is_scored_then_cached(tmp_path, monkeypatch):
    data = DataConfig(synthetic_utterances=4, synthetic_seed=7)
    source = build_source(data)
    phones, num_phones = frame_labels(source, data)
    quality = baseline.mfcc_kmeans_quality(source, data, phones, num_phones, 16, 320, cache=tmp_path)
    assert set(quality) == {"pnmi", "phone_purity", "cluster_purity", "unit_perplexity", "active_units"}
    # MFCCs separate the corpus's phones: far above the PNMI of units that ignore them (about 0 on this corpus).
    assert 0.3 < quality["pnmi"] <= 1 and quality["active_units"] == 16 and 1 <= quality["unit_perplexity"] <= 16
    units = baseline.mfcc_kmeans_units(source, 16, 320, normalize=True)
    assert [len(u) for u in units] == [len(p) // 2 + 1 for p in phones]  # one unit per 20 ms, centred windows
    assert len(list(tmp_path.iterdir())) == 1

    def no_recompute(*args, **kwargs):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(baseline, "mfcc_kmeans_units", no_recompute)
    assert baseline.mfcc_kmeans_quality(source, data, phones, num_phones, 16, 320, cache=tmp_path) == quality
    with pytest.raises(AssertionError, match="recomputed"):  # another number of units is another entry
        baseline.mfcc_kmeans_quality(source, data, phones, num_phones, 8, 320, cache=tmp_path)
    with pytest.raises(ValueError, match="hop must be a whole number of 10 ms labels"):
        baseline.mfcc_kmeans_quality(source, data, phones, num_phones, 16, 300, cache=tmp_path)


def _metrics_log(path):
    records = [
        {"split": "train", "step": s, "loss": 4 / s, "target_ppl": 10 + s, "pred_ppl": 60 - s}
        for s in range(10, 101, 10)
    ]
    records += [
        {"split": "valid/synthetic", "step": s, "heads/pnmi": s / 200, "codebooks/pnmi": s / 150, "baseline/pnmi": 0.6}
        for s in (50, 100)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_training_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    assert plot_training(_metrics_log(tmp_path / "metrics.jsonl"), tmp_path / "metrics.png")
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_plot_without_matplotlib_is_a_logged_note(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    assert not plot_training(_metrics_log(tmp_path / "metrics.jsonl"), tmp_path / "metrics.png")
    assert "matplotlib is not installed" in caplog.text and not (tmp_path / "metrics.png").exists()
