"""Evaluation: unit-quality metrics on hand-computed cases, the built-in ABX (DTW, triples, averaging order, frame
selection, item files), fastabx on the same items where it is importable, clear errors, and the CLI end to end on a
tiny checkpoint."""

import dataclasses
import json
import math
from decimal import Decimal

import numpy as np
import pytest
import torch
from helpers import tiny_config

from spidr_fast import abx, evaluate
from spidr_fast.data.synthetic import SyntheticCorpus
from spidr_fast.evaluate import MIN_ABX_CELLS, abx_implementation, format_rate, main
from spidr_fast.metrics import bitrate, joint_counts, position_nmi, took_position_shortcut, unit_quality
from spidr_fast.models import build_model

# --- unit quality --------------------------------------------------------------------------------------------------


def test_perfect_clustering_scores_one():
    phones = [np.array([0, 0, 1, 1, 2, 2, 2, 2])]
    units = [np.array([5, 3, 1, 1])]  # one unit per two labels, a unit per phone
    counts = joint_counts(phones, units, num_phones=3, num_units=8)
    q = unit_quality(counts)
    assert q["pnmi"] == pytest.approx(1.0) and q["phone_purity"] == 1.0 and q["cluster_purity"] == 1.0
    assert q["active_units"] == 3
    assert q["unit_perplexity"] == pytest.approx(2**1.5)  # probabilities 1/4, 1/4, 1/2: entropy 1.5 bits
    assert bitrate(counts, 50) == pytest.approx(75.0)


def test_independent_units_score_about_zero():
    rng = np.random.default_rng(0)
    phones = [rng.integers(0, 4, 200_000)]
    units = [rng.integers(0, 8, 100_000)]
    assert unit_quality(joint_counts(phones, units, 4, 8))["pnmi"] < 1e-3


def test_position_nmi_tells_units_that_encode_the_position_from_units_that_follow_the_content():
    rng = np.random.default_rng(0)
    lengths = rng.integers(80, 200, 40)
    by_position = [np.arange(n) * 10 // n for n in lengths]  # a unit per tenth of the utterance
    by_content = [rng.integers(0, 16, n) for n in lengths]
    assert position_nmi(by_position, 16) == pytest.approx(1.0)
    assert position_nmi(by_content, 16) < 0.02
    assert position_nmi([np.zeros(n, dtype=np.int64) for n in lengths], 16) == 0.0
    # the flag, on the measured synthetic runs: collapsed, first steps, learning phones
    assert took_position_shortcut({"pnmi": 0.068, "position_nmi": 0.227})
    assert not took_position_shortcut({"pnmi": 0.063, "position_nmi": 0.092})
    assert not took_position_shortcut({"pnmi": 0.170, "position_nmi": 0.048})


def test_hand_computed_counts():
    q = unit_quality(np.array([[2, 0], [1, 1]]))  # phones × units
    # p(phone) = (1/2, 1/2): H = 1; p(unit) = (3/4, 1/4); joint (1/2, 0, 1/4, 1/4): H = 1.5
    h_units = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert q["pnmi"] == pytest.approx(1 + h_units - 1.5)
    assert q["phone_purity"] == pytest.approx(0.75) and q["cluster_purity"] == pytest.approx(0.75)


# --- ABX -----------------------------------------------------------------------------------------------------------

requires_fastabx = pytest.mark.skipif(
    not abx.fastabx_available(),
    reason="fastabx is not importable: it needs Python >= 3.12 (pip install -e '.[abx]' there)",
)


def _naive_dtw(x, y):
    x, y = torch.nn.functional.normalize(x, dim=-1), torch.nn.functional.normalize(y, dim=-1)
    d = torch.arccos((x @ y.T).clamp(-1, 1)) / math.pi
    best = {}
    for i in range(len(x)):
        for j in range(len(y)):
            previous = [best[p] for p in ((i - 1, j - 1), (i - 1, j), (i, j - 1)) if p in best]
            cost, length = min(previous, key=lambda c: c[0]) if previous else (0.0, 0)
            best[i, j] = (cost + float(d[i, j]), length + 1)
    cost, length = best[len(x) - 1, len(y) - 1]
    return cost / length


def test_dtw_matches_a_direct_implementation():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, 5, generator=g) for n in (1, 3, 6)]
    ys = [torch.randn(n, 5, generator=g) for n in (2, 5)]
    expected = torch.tensor([[_naive_dtw(x, y) for y in ys] for x in xs])
    torch.testing.assert_close(abx.dtw_distances(xs, ys), expected)


def test_silent_frames_sit_in_the_uniform_direction():
    # fastabx's rule: an all-zero frame is the direction (1, 1) here: two of them at distance 0, one and (1, 0) at 45
    # degrees (not 0.5 from everything, as a zero vector's cosine would give).
    zero, uniform, east = torch.zeros(2, 2), torch.ones(3, 2), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    silent = abx.dtw_distances([zero, east], [zero])
    assert torch.equal(silent, abx.dtw_distances([uniform, east], [uniform]))
    # arccos near 1 in float32: up to sqrt(2 * 2**-24) / pi = 1.1e-4 off, as for any two equal frames
    torch.testing.assert_close(silent, torch.tensor([[0.0], [0.25]]), rtol=0, atol=1.2e-4)


def _classes(separation, per_class=12, seed=0):
    """Items of 3 phones by 2 speakers in one context; frames around one direction per phone."""
    g = torch.Generator().manual_seed(seed)
    items, features = [], []
    for speaker in ("s1", "s2"):
        for k, phone in enumerate(("a", "b", "c")):
            for _ in range(per_class):
                items.append(abx.Item("f", 0.0, 1.0, phone, "x", "y", speaker))
                frames = int(torch.randint(2, 7, (1,), generator=g))
                features.append(separation * torch.eye(8)[k] + torch.randn(frames, 8, generator=g))
    return features, items


@pytest.mark.parametrize("speaker", ["within", "across"])
def test_abx_identical_classes_give_chance(speaker):
    features, items = _classes(separation=0.0)
    assert abx.abx_error_rate(features, items, speaker=speaker) == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("speaker", ["within", "across"])
def test_abx_well_separated_classes_give_zero(speaker):
    features, items = _classes(separation=50.0)
    assert abx.abx_error_rate(features, items, speaker=speaker) == 0.0


def test_abx_context_conditions_and_no_triple():
    features, items = _classes(separation=0.0, per_class=3)
    other_context = [i._replace(prev=f"p{n}") for n, i in enumerate(items)]  # every item alone in its context
    assert abx.abx_error_rate(features, other_context) is None
    assert abx.abx_error_rate(features, other_context, context="any") is not None


def _constant_items(specs):
    """Two-frame items from (phone, context, speaker, direction)."""
    items = [abx.Item("f", 0.0, 1.0, phone, ctx, ctx, spk) for phone, ctx, spk, _ in specs]
    return [torch.tensor([d, d]) for *_, d in specs], items


def test_across_speakers_averages_contexts_and_x_speakers_together():
    # A and B come from s1 only (one item each), X from s2 and s3: three cells of one triple each.
    features, items = _constant_items(
        [
            ("a", "c1", "s1", [1.0, 0.0]),
            ("b", "c1", "s1", [0.0, 1.0]),
            ("a", "c1", "s2", [0.2, 1.0]),  # nearer B: cell (c1, X from s2) scores 1
            ("a", "c1", "s3", [1.0, 0.1]),  # cell (c1, X from s3) scores 0
            ("a", "c2", "s1", [1.0, 0.0]),
            ("b", "c2", "s1", [0.0, 1.0]),
            ("a", "c2", "s2", [1.0, 0.2]),  # cell (c2, X from s2) scores 0
        ]
    )
    # Contexts and X speakers together: (1 + 0 + 0) / 3. Contexts first, then (A, X) speaker pairs would give
    # ((1 + 0) / 2 + 0) / 2 = 1/4.
    assert abx.abx_error_rate(features, items, speaker="across") == pytest.approx(1 / 3)
    # One context: the c1 items and the c2 items meet; X from s2 scores (1 + 0) / 2 over two X, X from s3 0.
    assert abx.abx_error_rate(features, items, speaker="across", context="any") == pytest.approx(1 / 4)
    assert abx.abx_error_rate(features, items, speaker="within") is None  # no speaker has two items of a phone
    assert abx.cell_items(abx.abx_cells(items, speaker="across")) == set(range(7))


def test_frame_selection_at_boundaries():
    # 50 Hz: frame i is centred at 20 i + 10 ms; centres within [onset, offset] count, both ends included.
    assert abx.frame_span(0.03, 0.09, 50, 100) == slice(1, 5)
    assert abx.frame_span(0.07, 0.11, 50, 100) == slice(3, 6)  # 0.07 s × 50 is 3.5000000000000004
    assert abx.frame_span(0.031, 0.089, 50, 100) == slice(2, 4)
    assert abx.frame_span(0.00, 0.02, 50, 100) is None  # a single frame: left out
    assert abx.frame_span(0.05, 0.50, 50, 6) == slice(2, 6)  # clipped at the end of the file
    assert abx.frame_span(0.13, 0.20, 50, 6) is None  # begins after the last frame


def test_item_files(tmp_path):
    phones = ["sil"] * 3 + ["a"] * 4 + ["b"] * 2 + ["sil"] * 2 + ["c"] * 3
    items = abx.items_from_alignment("u1", "s1", phones)
    assert items == [
        abx.Item("u1", 0.03, 0.07, "a", "sil", "b", "s1"),
        abx.Item("u1", 0.07, 0.09, "b", "a", "sil", "s1"),
    ]
    path = tmp_path / "x.item"
    abx.write_items(items, path)
    assert path.read_text().splitlines()[0] == abx.ITEM_HEADER
    assert abx.read_items(path) == items
    path.write_text(abx.ITEM_HEADER + "\nu1 0.1 0.2 a b\n")
    with pytest.raises(ValueError, match="x.item:2: expected 7 fields"):
        abx.read_items(path)
    with pytest.raises(ValueError, match="'u9', which has no features"):
        abx.item_features({"u1": torch.zeros(10, 2)}, [items[0]._replace(fileid="u9")], 50)


def _fastabx_frames(item, frequency):
    """fastabx's own rule on the item file's decimal strings: [ceil(onset f - 1/2), floor(offset f - 1/2) + 1[."""
    f = Decimal(str(frequency))
    onset, offset = (Decimal(f"{t:.4f}") for t in (item.onset, item.offset))
    return int((onset * f - Decimal("0.5")).__ceil__()), int((offset * f - Decimal("0.5")).__floor__()) + 1


@pytest.mark.parametrize("frequency", [50, 100, 100 / 3])
def test_item_file_handed_on_selects_the_frames_scored(frequency, tmp_path):
    features = {"u1": torch.randn(12, 3), "u2": torch.randn(7, 3)}
    items = [
        abx.Item("u1", 0.07, 0.11, "a", "x", "y", "s"),  # 0.07 s × 50 is 3.5000000000000004
        abx.Item("u1", 0.031, 0.089, "b", "x", "y", "s"),
        abx.Item("u1", 0.0, 0.012, "c", "x", "y", "s"),  # one frame at 50 Hz: left out there
        abx.Item("u2", 0.05, 0.50, "a", "x", "y", "s"),  # runs past the last frame: clipped
        abx.Item("u2", 0.40, 0.60, "b", "x", "y", "s"),
    ]  # begins after the last frame: left out
    selected, kept = abx.item_features(features, items, frequency)
    spans = [abx.frame_span(i.onset, i.offset, frequency, len(features[i.fileid])) for i in items]
    assert [i.phone for i in kept] == [i.phone for i, span in zip(items, spans, strict=True) if span is not None]
    path = tmp_path / "kept.item"
    abx.write_items(kept, path)
    for item, frames in zip(abx.read_items(path), selected, strict=True):
        start, end = _fastabx_frames(item, frequency)
        assert 0 <= start and end <= len(features[item.fileid])  # fastabx raises FeaturesSizeError past the end
        torch.testing.assert_close(features[item.fileid][start:end], frames, rtol=0, atol=0)
        span = abx.frame_span(item.onset, item.offset, frequency, len(features[item.fileid]))
        assert (span.start, span.stop) == (start, end)


def _corpus(seed, num_files=6, dim=5):
    """Random features of odd lengths (a silent frame among them) and items in few contexts, by three speakers."""
    g = torch.Generator().manual_seed(seed)
    features, items = {}, []
    for n in range(num_files):
        frames = int(torch.randint(40, 60, (1,), generator=g))
        features[f"dir/u{n}"] = torch.randn(frames, dim, generator=g)
        features[f"dir/u{n}"][3] = 0.0
        t = 0
        while t < frames + 3:  # the last items run past the end of the file
            length = int(torch.randint(1, 6, (1,), generator=g))
            phone, ctx = (
                ["a", "b", "c"][int(torch.randint(0, 3, (1,), generator=g))],
                ["x", "y"][int(torch.randint(0, 2, (1,), generator=g))],
            )
            items.append(abx.Item(f"dir/u{n}", t / 50, (t + length) / 50, phone, ctx, "z", f"s{n % 3}"))
            t += length
    return features, items


@requires_fastabx
@pytest.mark.parametrize("context", ["within", "any"])
def test_fastabx_scores_as_the_builtin(context):
    features, items = _corpus(seed=1)
    selected, kept = abx.item_features(features, items, 50)
    rates = abx.fastabx_error_rates(features, kept, 50.0, context=context)
    for speaker in ("within", "across"):
        expected = abx.abx_error_rate(selected, kept, speaker=speaker, context=context)
        assert rates[speaker] == pytest.approx(expected, abs=1e-7)  # fastabx keeps cell scores in float32 (6e-8)
    no_cell = [i._replace(prev=f"p{n}") for n, i in enumerate(kept)]  # fastabx alone raises EmptyTaskError
    assert abx.fastabx_error_rates(features, no_cell, 50, context="within") == {"within": None, "across": None}
    features["dir/u0"][5] = float("nan")
    failure = rf"fastabx failed on {len(kept)} items \(within speakers, context {context}"
    with pytest.raises(RuntimeError, match=failure):
        abx.fastabx_error_rates(features, kept, 50, context=context)


# --- the CLI -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder with a training checkpoint of a tiny SpidR (20 ms frames), and a written synthetic corpus."""
    root = tmp_path_factory.mktemp("eval")
    cfg = tiny_config()
    torch.manual_seed(0)
    model = build_model(cfg=cfg.model)
    checkpoint = root / "runs" / "spidr_fast" / "synthetic" / "checkpoints" / "step_00000004.pt"
    checkpoint.parent.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(cfg), "step": 4}, checkpoint)
    manifest = SyntheticCorpus(num_utterances=8, min_seconds=1.0, max_seconds=1.5, seed=5).write(root / "corpus")
    return root, checkpoint, manifest


def scored_on_alignments(checkpoint, manifest, layers):
    """evaluate's arguments for `layers` of `checkpoint` on `manifest` and its alignments, in any context."""
    alignments = manifest.parent / "alignments.jsonl"
    paths = ["--checkpoint", str(checkpoint), "--manifest", str(manifest), "--alignments", str(alignments)]
    return [*paths, "--layers", layers, "--context", "any", "--no-progress"]


def test_cli_on_a_manifest_with_alignments(run, tmp_path, capsys, caplog):
    root, checkpoint, manifest = run
    args = [*scored_on_alignments(checkpoint, manifest, "0,3"), "--out", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "matplotlib is not installed" in caplog.text or (tmp_path / "metrics.png").is_file()
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["abx"] == abx_implementation("auto") and abx.read_items(tmp_path / "items.item")
    counts = report["abx_items"]
    assert counts["in_file"] == len(abx.read_items(tmp_path / "items.item")) >= counts["with_two_frames"]
    assert counts["with_two_frames"] >= max(counts["within"], counts["across"]) > 0
    assert set(report["layers"]) == {"layer_0", "layer_3"}
    assert set(report["layers"]["layer_0"]) == {"abx_within", "abx_across"}  # no head on layer 0
    head = report["layers"]["layer_3"]
    assert 0 <= head["pnmi"] <= 1 and 1 <= head["active_units"] <= 17
    assert head["bitrate"] == pytest.approx(50 * math.log2(head["unit_perplexity"]), abs=1e-9)
    assert 0 <= head["position_nmi"] <= 1 and f"position_nmi {head['position_nmi']:.3f}" in out
    for name in ("abx_within", "abx_across", "abx_units_within", "abx_units_across"):
        assert 0 <= head[name] <= 100
    assert report["abx_min_cells"] == MIN_ABX_CELLS and set(report["abx_cells"]) == {"within", "across"}
    assert f"abx_within {format_rate(head['abx_within'], report['abx_cells']['within'])}" in out
    assert 0 <= report["baseline"]["pnmi"] <= 1 and 1 <= report["baseline"]["active_units"] <= 17
    assert f"k-means on MFCC, 17 units: PNMI {report['baseline']['pnmi']:.3f}" in out


def test_abx_rates_name_their_cells_and_flag_too_few():
    assert format_rate(14.2857, 3) == f"14.286 (3 cells: too few to trust, under {MIN_ABX_CELLS})"
    assert format_rate(2.5, MIN_ABX_CELLS) == f"2.500 ({MIN_ABX_CELLS} cells)"
    assert format_rate(None, 0) == "none (no cell)"


def test_cli_errors_name_the_problem(run, tmp_path, capsys):
    root, checkpoint, manifest = run
    records = [json.loads(line) for line in (manifest.parent / "alignments.jsonl").read_text().splitlines()]
    records[1]["phones"] = records[1]["phones"][:50]
    alignments = tmp_path / "short.jsonl"
    alignments.write_text("\n".join(json.dumps(r) for r in records))
    args = ["--checkpoint", str(checkpoint), "--manifest", str(manifest), "--out", str(tmp_path), "--no-progress"]

    def error_of(*extra: str) -> str:  # one line on stderr and exit status 2, no traceback
        assert main([*args, *extra]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ")
        return lines[0]

    assert f"alignment of {records[1]['fileid']} does not match its audio" in error_of(
        "--alignments", str(alignments), "--layers", "3"
    )
    alignments.write_text("\n".join(json.dumps(r) for r in records[1:]))
    assert f"no alignment for file {records[0]['fileid']}" in error_of("--alignments", str(alignments))
    assert "unknown layer 4" in error_of("--alignments", str(manifest.parent / "alignments.jsonl"), "--layers", "4")
    args = ["--checkpoint", str(tmp_path / "none.pt")]
    assert "checkpoint not found" in error_of()


@requires_fastabx
def test_cli_with_fastabx_scores_as_the_builtin(run, tmp_path):
    root, checkpoint, manifest = run
    args = scored_on_alignments(checkpoint, manifest, "3")
    reports = {}
    for implementation in ("fastabx", "builtin"):
        assert main([*args, "--abx", implementation, "--out", str(tmp_path / implementation)]) == 0
        reports[implementation] = json.loads((tmp_path / implementation / "results.json").read_text())
        assert reports[implementation]["abx"] == implementation
    assert reports["fastabx"]["abx_items"] == reports["builtin"]["abx_items"]
    fast, built = reports["fastabx"]["layers"]["layer_3"], reports["builtin"]["layers"]["layer_3"]
    for name in ("abx_within", "abx_across", "abx_units_within", "abx_units_across"):
        assert fast[name] == pytest.approx(built[name], abs=1e-5)  # points: float32 cell scores


def test_fastabx_asked_for_but_missing_is_a_clear_error(run, monkeypatch, capsys):
    monkeypatch.setattr(abx, "fastabx_available", lambda: False)
    assert main(["--abx", "fastabx", "--checkpoint", str(run[1])]) == 2
    assert capsys.readouterr().err.startswith(
        "error: --abx fastabx: fastabx is not importable (it needs Python >= 3.12"
    )
    assert abx_implementation("auto") == "builtin"


def test_cli_without_arguments_evaluates_the_default_run(run, monkeypatch):
    root, checkpoint, _ = run
    monkeypatch.chdir(root)
    monkeypatch.setattr(evaluate, "SYNTHETIC_UTTERANCES", 5)  # the validation set's 3, extended
    assert main([]) == 0
    report = json.loads((checkpoint.parent / "eval_step_00000004" / "results.json").read_text())
    assert report["checkpoint"] == str(checkpoint.relative_to(root))
    assert set(report["layers"]) == {f"layer_{i}" for i in range(4)}
    assert 0 <= report["layers"]["layer_1"]["pnmi"] <= 1
    assert len({item.fileid for item in abx.read_items(report["items"])}) == 5
