"""SpidR and DinoSR: official parity, state dicts, objective, schedules, codebook storage, bad inputs."""

import dataclasses
import importlib
import json
import math

import pytest
import torch
from helpers import MODELS, NUM_SAMPLES, TINY, batch, tiny

from spidr_fast.models import DinoSR, DinoSRConfig, SpidR, SpidRConfig, build_model, masked_frame_index

VARIANTS = [dict(), dict(extractor_mode="group_norm", encoder_layer_norm_first=True, encoder_qkv_bias=True)]


def official_pair(official, name, **overrides):
    """(official model, our model) with the same tiny config and the official's weights in ours."""
    official_config = importlib.import_module("spidr.config")
    theirs_class = {"spidr": official.SpidR, "dinosr": official.DinoSR}[name]
    theirs_config = {"spidr": official_config.SpidRConfig, "dinosr": official_config.DinoSRConfig}[name]
    ours_class, ours_config = MODELS[name]
    theirs = theirs_class(theirs_config(**TINY | overrides))
    ours = ours_class(ours_config(**TINY | overrides))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# --- compatibility with the official package -----------------------------------------------------------------------


@pytest.mark.official
@pytest.mark.parametrize("name", list(MODELS))
def test_default_state_dict_loads_both_ways(official, name):
    theirs = {"spidr": official.SpidR, "dinosr": official.DinoSR}[name]()
    ours = MODELS[name][0]()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)


@pytest.mark.official
@pytest.mark.parametrize("overrides", VARIANTS)
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("padded", [False, True])
def test_outputs_equal_official(official, name, overrides, padded):
    theirs, ours = official_pair(official, name, **overrides)
    waveforms, mask_indices, attention_mask = batch(ours, padded=padded)
    for mode in ("eval", "train"):
        getattr(theirs, mode)()
        getattr(ours, mode)()
        torch.manual_seed(1)  # the same dropout draws: both models consume the generator in the same order
        loss_theirs, out_theirs = theirs(waveforms, mask_indices=mask_indices, attention_mask=attention_mask)
        torch.manual_seed(1)
        loss_ours, out_ours = ours(waveforms, mask_indices=mask_indices, attention_mask=attention_mask)
        assert loss_ours.shape == loss_theirs.shape == (mask_indices.numel(),)
        assert relative_error(loss_ours, loss_theirs) < 1e-5
        for key in ("target_ppl", "pred_ppl"):
            assert relative_error(out_ours[key], out_theirs[key]) < 1e-5
    for i in range(ours.num_codebooks):  # the training step updated both sets of codebooks alike
        torch.testing.assert_close(ours.codebooks[i].codebook, theirs.codebooks[i].codebook)
        torch.testing.assert_close(ours.codebooks[i].counts, theirs.codebooks[i].counts)


@pytest.mark.official
@pytest.mark.parametrize("name", list(MODELS))
def test_features_and_units_equal_official(official, name):
    theirs, ours = official_pair(official, name)
    theirs.eval()
    ours.eval()
    waveforms, _, attention_mask = batch(ours)
    for a, b in zip(
        ours.get_intermediate_outputs(waveforms, attention_mask=attention_mask),
        theirs.get_intermediate_outputs(waveforms, attention_mask=attention_mask),
        strict=True,
    ):
        assert relative_error(a, b) < 1e-5
    for onehot in (False, True):
        ours_units = ours.get_codebooks(waveforms, attention_mask=attention_mask, onehot=onehot)
        theirs_units = theirs.get_codebooks(waveforms, attention_mask=attention_mask, onehot=onehot)
        assert [u is None for u in ours_units] == [u is None for u in theirs_units]
        for a, b in zip(ours_units, theirs_units, strict=True):
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.official
@pytest.mark.parametrize("name", list(MODELS))
def test_teacher_schedule_equals_official(official, name):
    schedule = dict(ema_final_step=100, freeze_step=300) | (dict(ema_timescale=50.0) if name == "spidr" else {})
    theirs, ours = official_pair(official, name, **schedule)
    for step in [0, 1, 7, 99, 100, 101, 299, 300, 301, 2_000, 10**6]:
        assert ours.ema_decay(step) == theirs.ema_scheduler(step)


@pytest.mark.official
def test_build_model_loads_official_checkpoint(official, tmp_path):
    theirs, _ = official_pair(official, "spidr", codebook_size=23)
    torch.save({"model": {f"module.{k}": v for k, v in theirs.state_dict().items()}}, tmp_path / "ckpt.pt")
    (tmp_path / "config.json").write_text(json.dumps({"model": TINY | {"codebook_size": 23}}))
    ours = build_model(model_type="spidr", checkpoint=tmp_path / "ckpt.pt")
    assert isinstance(ours, SpidR) and ours.cfg.codebook_size == 23
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value)


# --- the objective -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_boolean_mask_equals_mask_indices(name):
    model = tiny(name).eval()
    waveforms, mask_indices, attention_mask = batch(model)
    mask = torch.zeros(3, attention_mask.shape[-1], dtype=torch.bool).scatter_(1, mask_indices, True)
    sorted_indices = mask_indices.sort(1).values  # a boolean mask lists frames in time order
    loss_indices, out_indices = model(waveforms, mask_indices=sorted_indices, attention_mask=attention_mask)
    loss_mask, out_mask = model(waveforms, mask=mask, attention_mask=attention_mask.view(3, -1))
    torch.testing.assert_close(loss_mask, loss_indices)
    torch.testing.assert_close(out_mask, out_indices)


def test_boolean_mask_may_differ_per_row():
    model = tiny("spidr").eval()
    waveforms, _, _ = batch(model, padded=False)
    mask = torch.rand(3, 199) < torch.tensor([[0.1], [0.5], [0.9]])
    loss, _ = model(waveforms, mask=mask)
    assert loss.shape == (int(mask.sum()),)


def test_no_mask_takes_a_loss_on_every_frame():
    model = tiny("dinosr").eval()
    loss, out = model(torch.randn(2, NUM_SAMPLES))
    assert loss.shape == (2 * 199,) and torch.isfinite(loss).all()
    assert 1 <= out["target_ppl"] <= TINY["codebook_size"]


def direct_loss(model, waveforms, mask_indices):
    """The objective written out with plain torch ops, frame by frame of the definitions."""
    feats = model.feature_projection(model.feature_extractor(waveforms))
    masked = torch.zeros(feats.shape[:2], dtype=torch.bool).scatter_(1, mask_indices, True)
    x = torch.where(masked.unsqueeze(-1), model.mask_embedding, feats)
    student = model.student.get_intermediate_outputs(x)[-model.num_codebooks :]
    teacher = model.teacher.get_intermediate_outputs(feats)[-model.num_codebooks :]
    losses = []
    for i, (s, t) in enumerate(zip(student, teacher, strict=True)):
        t = (t - t.mean(1, keepdim=True)) / torch.sqrt(t.var(1, unbiased=False, keepdim=True) + 1e-5)
        centroids = model.codebooks[i].codebook / model.codebooks[i].counts.unsqueeze(1)
        rows = masked_frame_index(mask_indices, feats.shape[1])
        labels = torch.cdist(t.flatten(0, 1)[rows], centroids).argmin(1)
        losses.append(
            torch.nn.functional.cross_entropy(model.heads[i][0](s.flatten(0, 1)[rows]), labels, reduction="none")
        )
    return torch.stack(losses).mean(0)


def test_spidr_loss_equals_direct_formula():
    model = tiny("spidr").eval()
    waveforms, mask_indices, _ = batch(model, padded=False)
    loss, _ = model(waveforms, mask_indices=mask_indices)
    torch.testing.assert_close(loss, direct_loss(model, waveforms, mask_indices), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_backward_reaches_every_trainable_parameter(name):
    """What DDP needs to run without find_unused_parameters: every trainable parameter takes a gradient."""
    model = tiny(name).train()
    waveforms, mask_indices, attention_mask = batch(model)
    loss, _ = model(waveforms, mask_indices=mask_indices, attention_mask=attention_mask)
    loss.mean().backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("teacher.") for n in trainable)
    missing = [n for n, p in trainable.items() if p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in trainable.values())


@pytest.mark.parametrize("layer_norm_first", [False, True])
def test_spidr_freezes_its_unused_last_norm(layer_norm_first):
    model = tiny("spidr", encoder_layer_norm_first=layer_norm_first)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad and not n.startswith("teacher.")}
    expected = (
        "student.layer_norm"
        if layer_norm_first
        else f"student.layers.{TINY['encoder_num_layers'] - 1}.final_layer_norm"
    )
    assert frozen == {f"{expected}.weight", f"{expected}.bias"}


@pytest.mark.parametrize("name", list(MODELS))
def test_bf16_autocast_forward_and_backward(name):
    model = tiny(name, encoder_dropout=0.0, encoder_attention_dropout=0.0, encoder_layer_drop=0.0).eval()
    waveforms, mask_indices, attention_mask = batch(model)
    reference_loss, _ = model(waveforms, mask_indices=mask_indices, attention_mask=attention_mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, out = model(waveforms, mask_indices=mask_indices, attention_mask=attention_mask)
    assert loss.dtype == torch.float32
    assert abs(loss.mean().item() - reference_loss.mean().item()) < 2e-2 * reference_loss.mean().item()
    loss.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_compiles_with_fullgraph():
    model = tiny("spidr").train()
    waveforms, mask_indices, attention_mask = batch(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss, out = compiled(waveforms, mask_indices=mask_indices, attention_mask=attention_mask)
    loss.mean().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(out["pred_ppl"])


# --- codebooks and teacher -----------------------------------------------------------------------------------------


def test_training_step_updates_codebooks_and_eval_does_not():
    model = tiny("spidr")
    waveforms, mask_indices, _ = batch(model, padded=False)
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("codebooks.")}
    model.eval()(waveforms, mask_indices=mask_indices)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    model.train()(waveforms, mask_indices=mask_indices)
    changed = [k for k, v in before.items() if not torch.equal(model.state_dict()[k], v)]
    assert len(changed) == 2 * TINY["num_codebooks"]  # every layer's codebook and counts


def test_codebook_buffers_stay_views_of_the_stacked_storage():
    model = tiny("dinosr")
    state = {k: v.clone() + 1 for k, v in model.state_dict().items()}
    for apply in (
        lambda m: m.double(),
        lambda m: m.float(),
        lambda m: m.load_state_dict(state),
        lambda m: m.load_state_dict(state, assign=True),
    ):
        apply(model)
        codebooks = model.codebooks
        for i, layer in enumerate(codebooks):
            assert layer.codebook.data_ptr() == codebooks.stacked_codebook[i].data_ptr()
            assert layer.counts.data_ptr() == codebooks.stacked_counts[i].data_ptr()
    assert torch.equal(model.codebooks[1].counts, state["codebooks.1.counts"])


@pytest.mark.parametrize("name", list(MODELS))
def test_update_ema_lerps_copies_and_freezes(name):
    model = tiny(name, freeze_step=10)
    teacher_before = {n: p.clone() for n, p in model.teacher.named_parameters()}
    decay = model.update_ema(3)
    assert 0 < decay < 1 and model.current_step.item() == 3
    for (n, t), s in zip(model.teacher.named_parameters(), model.student.parameters(), strict=True):
        expected = s if n.startswith("pos_conv_embed") else teacher_before[n] + (1 - decay) * (s - teacher_before[n])
        torch.testing.assert_close(t, expected)
    assert all(p.requires_grad for p in model.feature_extractor.parameters())
    model.update_ema(10)
    assert not any(p.requires_grad for p in model.feature_extractor.parameters())
    assert not any(p.requires_grad for p in model.feature_projection.parameters())


def test_run_layers_hands_down_the_last_layers_stacked_and_takes_gradients():
    encoder = tiny("spidr").student.eval()  # no dropout: two calls give the same outputs
    x = torch.randn(2, 17, TINY["encoder_embed_dim"], requires_grad=True)
    frame_mask = torch.arange(17) < torch.tensor([[17], [11]])
    every_layer = encoder.get_intermediate_outputs(x, frame_mask)
    last, kept = encoder.run_layers(x, frame_mask, keep_last=3)
    assert kept.shape == (3, 2, 17, TINY["encoder_embed_dim"])
    assert torch.equal(kept, torch.stack(every_layer[-3:]))
    assert encoder.run_layers(x, frame_mask)[1] is None
    (expected,) = torch.autograd.grad(torch.stack(every_layer[-3:]).square().sum(), x)
    (through_the_buffer,) = torch.autograd.grad(kept.square().sum(), x)
    torch.testing.assert_close(through_the_buffer, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(MODELS))
def test_extractor_frozen_is_public(name):
    model = tiny(name)
    assert not model.extractor_frozen
    model.freeze_extractor()
    assert model.extractor_frozen and not any(p.requires_grad for p in model.feature_extractor.parameters())


def test_teacher_schedules_by_hand():
    dinosr = tiny("dinosr", ema_final_step=100, freeze_step=300)
    assert dinosr.ema_decay(0) == pytest.approx(0.999)
    assert dinosr.ema_decay(50) == pytest.approx((0.999 + 0.9999) / 2)
    assert dinosr.ema_decay(100) == dinosr.ema_decay(299) == pytest.approx(0.9999)
    assert dinosr.ema_decay(300) == 1.0
    spidr = tiny("spidr", ema_timescale=50.0)
    assert spidr.ema_decay(0) == pytest.approx(0.999)
    assert spidr.ema_decay(50) == pytest.approx(1 - 0.001 / math.e)
    assert spidr.ema_decay(50 * math.ceil(math.log(0.001 / 1e-7))) == 1.0  # below the threshold: frozen


def test_teacher_stays_in_eval_mode():
    model = tiny("spidr").train()
    assert model.student.training and not model.teacher.training


# --- building and bad inputs ---------------------------------------------------------------------------------------


def test_build_model_from_config_and_our_checkpoint(tmp_path):
    model = build_model(cfg=SpidRConfig(**TINY))
    assert type(model) is SpidR and type(build_model(cfg=DinoSRConfig(**TINY))) is DinoSR
    torch.save({f"_orig_mod.{k}": v for k, v in model.state_dict().items()}, tmp_path / "model.pt")
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(model.cfg)))
    loaded = build_model(model_type="spidr", checkpoint=tmp_path / "model.pt")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(checkpoint="model.ckpt", model_type="spidr"), ValueError, "must be a .pt file"),
        (dict(checkpoint="missing.pt", model_type="spidr"), FileNotFoundError, "missing.pt"),
        (dict(checkpoint="missing.pt", model_type="hubert"), ValueError, "model_type must be one of"),
        (dict(cfg={"encoder_embed_dim": 64}), ValueError, "give cfg"),
    ],
)
def test_build_model_names_the_problem(kwargs, error, message):
    with pytest.raises(error, match=message):
        build_model(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(waveforms=torch.randn(NUM_SAMPLES)), r"waveforms must be float of shape \(B, samples\)"),
        (dict(mask_indices=torch.zeros(2, 5, dtype=torch.int32)), "mask_indices must be int64"),
        (
            dict(mask_indices=torch.zeros(3, 5, dtype=torch.int64)),
            r"mask_indices must be int64 of shape \(B, M\) with B = 2",
        ),
        (dict(mask=torch.zeros(2, 198, dtype=torch.bool)), r"mask must be bool of shape \(B, T\) = \(2, 199\)"),
        (
            dict(mask=torch.zeros(2, 199, dtype=torch.bool), mask_indices=torch.zeros(2, 5, dtype=torch.int64)),
            "not both",
        ),
        (dict(attention_mask=torch.ones(2, 1, 199)), "attention_mask must be bool of shape"),
    ],
)
def test_forward_names_bad_argument(kwargs, message):
    model = tiny("spidr")
    waveforms = kwargs.pop("waveforms", torch.randn(2, NUM_SAMPLES))
    with pytest.raises(ValueError, match=message):
        model(waveforms, **kwargs)


def test_rejects_unknown_extractor_mode():
    with pytest.raises(ValueError, match="extractor_mode must be"):
        tiny("spidr", extractor_mode="batch_norm")


def test_deferred_codebook_updates_over_micro_batches_equal_one_batch():
    """Gradient accumulation: statistics of two micro-batches summed, applied once, equal one update on both."""
    no_dropout = dict(encoder_dropout=0.0, encoder_attention_dropout=0.0, encoder_layer_drop=0.0)
    whole = tiny("spidr", **no_dropout).train()
    split = tiny("spidr", **no_dropout).train()
    split.load_state_dict(whole.state_dict())
    split.defer_codebook_updates = True
    waveforms, mask_indices, _ = batch(whole, num_utterances=4, padded=False)
    whole(waveforms, mask_indices=mask_indices)

    before = split.codebooks.stacked_codebook.clone()
    stats = [split(waveforms[half], mask_indices=mask_indices[half])[1] for half in (slice(0, 2), slice(2, 4))]
    assert torch.equal(split.codebooks.stacked_codebook, before)  # nothing applied yet
    split.update_codebooks(sum(s["codebook_counts"] for s in stats), sum(s["codebook_sums"] for s in stats))
    torch.testing.assert_close(split.codebooks.stacked_codebook, whole.codebooks.stacked_codebook)
    torch.testing.assert_close(split.codebooks.stacked_counts, whole.codebooks.stacked_counts)


def test_get_targets_are_the_nearest_codewords_of_the_normalised_teacher_layers():
    model = tiny("spidr").eval()
    waveforms = torch.randn(2, NUM_SAMPLES)
    targets = model.get_targets(waveforms)
    feats = model.feature_projection(model.feature_extractor(waveforms))
    teacher = model.teacher.get_intermediate_outputs(feats)[-model.num_codebooks :]
    assert targets.shape == (model.num_codebooks, 2, feats.shape[1])
    for i, t in enumerate(teacher):
        t = (t - t.mean(1, keepdim=True)) / torch.sqrt(t.var(1, unbiased=False, keepdim=True) + 1e-5)
        centroids = model.codebooks[i].codebook / model.codebooks[i].counts.unsqueeze(1)
        assert torch.equal(targets[i], torch.cdist(t, centroids.expand(2, -1, -1)).argmin(-1))
