"""The training loop on CPU: CLI end to end, resume, accumulation, DDP, faults, config, schedules, compile."""

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from helpers import TINY, tiny_cli_args, tiny_config

from spidr_fast.metrics import joint_counts, took_position_shortcut, unit_quality
from spidr_fast.train import checkpoint
from spidr_fast.train import config as config_module
from spidr_fast.models import build_model
from spidr_fast.models.config import DinoSRConfig, SpidRConfig
from spidr_fast.train.__main__ import build_config, main, parse_args
from spidr_fast.distributed import Context, _first_host
from spidr_fast.train.loop import NonFiniteError, Trainer
from spidr_fast.train.optim import build_optimizer, drop_frozen_group, lr_factor

CPU = Context(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
NO_DROPOUT = dict(encoder_dropout=0.0, encoder_attention_dropout=0.0, encoder_layer_drop=0.0)


# --- end to end ----------------------------------------------------------------------------------------------------


@pytest.mark.official
def test_cli_trains_on_the_synthetic_corpus_and_exports_for_the_official_package(official, tmp_path, capsys):
    assert main(tiny_cli_args(tmp_path / "run", "--export")) == 0
    out = capsys.readouterr().out
    assert f"run folder: {tmp_path / 'run'}" in out and "final loss:" in out and "PNMI" in out
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]
    assert all(r["loss"] > 0 and r["target_ppl"] >= 1 for r in records if r["split"] == "train")
    validation = [r for r in records if r["split"] == "valid/synthetic"][-1]
    assert 0 <= validation["units/heads/layer_3/pnmi"] <= 1 and 0 <= validation["units/codebooks/layer_3/pnmi"] <= 1
    assert [p.name for p in checkpoint.checkpoints(tmp_path / "run" / "checkpoints")] == [
        "step_00000002.pt",
        "step_00000004.pt",
    ]
    loaded = official.build_model(model_type="spidr", checkpoint=tmp_path / "run" / "export" / "model.pt")
    assert loaded.codebooks[0].codebook.shape == (TINY["codebook_size"], TINY["encoder_embed_dim"])


def test_summary_puts_the_units_beside_the_mfcc_kmeans_baseline_and_plots_the_run(tmp_path, capsys):
    assert main(tiny_cli_args(tmp_path / "run")) == 0
    out = capsys.readouterr().out
    for line_start in ("student's head units:", "teacher's codebook units:", "k-means on MFCC:"):
        line = next(line for line in out.splitlines() if line.strip().startswith(line_start))
        assert all(name in line for name in ("PNMI", "phone purity", "cluster purity", "unit perplexity", "active"))
        assert ("position NMI" in line) == (line_start != "k-means on MFCC:")
    assert "the model's best units are" in out and "the baseline's PNMI" in out
    validation = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    size = TINY["codebook_size"]
    assert 0 <= validation["baseline/pnmi"] <= 1 and 1 <= validation["baseline/active_units"] <= size
    assert 0 <= validation["heads/phone_purity"] <= 1 and 0 <= validation["codebooks/cluster_purity"] <= 1
    assert 0 <= validation["units/codebooks/layer_3/position_nmi"] <= 1
    shortcut = any(
        took_position_shortcut({"pnmi": validation[f"{k}/pnmi"], "position_nmi": validation[f"{k}/position_nmi"]})
        for k in ("heads", "codebooks")
    )
    assert shortcut == ("took the position shortcut" in out)
    plotted = (tmp_path / "run" / "metrics.png").is_file()
    assert plotted == ("metrics plot:" in out) == (importlib.util.find_spec("matplotlib") is not None)


def test_cli_names_a_bad_config_field(tmp_path, capsys):
    assert main(["--run-dir", str(tmp_path), "--set", "optimizer.learning_rate=1"]) == 2
    assert "unknown field optimizer.learning_rate" in capsys.readouterr().err
    assert main(["--run-dir", str(tmp_path), "--set", "optimizer.scheduler='linear'"]) == 2
    assert "optimizer.scheduler must be one of" in capsys.readouterr().err
    assert main(["--run-dir", str(tmp_path), "--set", "optimizer.lr=abc"]) == 2
    assert "optimizer.lr must be float, got 'abc'" in capsys.readouterr().err
    assert main(["--run-dir", str(tmp_path), "--set", "model.encoder_num_layers=true"]) == 2
    assert "model.encoder_num_layers must be int, got True" in capsys.readouterr().err
    assert main(["--run-dir", str(tmp_path), "--manifest", str(tmp_path / "missing.tsv")]) == 2
    assert "manifest not found" in capsys.readouterr().err
    assert main(["--run-dir", str(tmp_path), "--set", "model.encoder_num_layers=2"]) == 2  # 4 codebooks by default
    assert "model.num_codebooks (4) must be between 1 and model.encoder_num_layers (2)" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--model", "dinosr"], ["--set", "run.model_type='dinosr'"], []])
def test_default_run_takes_each_models_own_teacher_schedule(flags):
    cfg = build_config(parse_args(flags))
    if flags:
        assert isinstance(cfg.model, DinoSRConfig) and not isinstance(cfg.model, SpidRConfig)
        assert cfg.model.ema_final_step == 300  # 100 times shorter than the official 30k, as SpidR's timescale
    else:
        assert isinstance(cfg.model, SpidRConfig) and cfg.model.ema_timescale == 200
    assert cfg.optimizer.max_steps == config_module.SYNTHETIC_DEFAULTS["optimizer"]["max_steps"]  # the same budget


def test_official_config_file_is_read_as_it_is(tmp_path):
    (tmp_path / "official.toml").write_text("""
[run]
workdir = "/tmp/w"
wandb_project = "p"
wandb_name = "n"
model_type = "spidr"
[data]
manifest = "train.tsv"
[model]
encoder_layer_drop = 0.0
[optimizer]
lr = 0.0005
[masking]
mask_prob = 0.8
[validation.dev]
manifest = "dev.tsv"
""")
    cfg = config_module.config_from_dict(config_module.read_config_file(tmp_path / "official.toml"))
    assert cfg.run.dir.as_posix() == "/tmp/w/p/n" and cfg.model.encoder_embed_dim == 768
    assert cfg.validation["dev"].manifest == "dev.tsv" and cfg.data.max_batch_length == 3_800_000


# --- exactness of the loop -----------------------------------------------------------------------------------------


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    """Two steps, stop, two more: the same weights, codebooks and teacher as four steps in a row (a schedule
    that does not depend on max_steps, so that the shortened first run keeps the same learning rates)."""
    constant_lr = {"scheduler": "constant", "warmup_steps": 2}
    straight = Trainer(tiny_config(optimizer=constant_lr, validation={}), tmp_path / "a", CPU, progress=False)
    straight.fit()
    first = Trainer(
        tiny_config(optimizer=constant_lr | {"max_steps": 2}, validation={}), tmp_path / "b", CPU, progress=False
    )
    first.fit()
    resumed = Trainer(tiny_config(optimizer=constant_lr, validation={}), tmp_path / "b", CPU, progress=False)
    assert resumed.step == 2
    resumed.fit()
    for key, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, msg=key)


def test_a_run_folder_of_another_model_is_named_not_loaded(tmp_path, capsys):
    """Resuming with a changed model config names the differing field (it raised a state-dict error), and the
    folder's config.json still describes the checkpoints in it."""
    cli = tiny_cli_args(tmp_path, "--set=optimizer.max_steps=2")
    assert main(cli) == 0
    saved_config = (tmp_path / "config.json").read_text()
    assert main([*cli, "--set=model.encoder_num_layers=3"]) == 2
    error = capsys.readouterr().err
    assert "model.encoder_num_layers: 4 in the checkpoint, 3 now" in error and "--run-dir" in error
    assert (tmp_path / "config.json").read_text() == saved_config


def _batches(trainer, count):
    it = trainer._batches()
    return [next(it) for _ in range(count)]


def _concat(batches):
    from spidr_fast.data.loading import Batch

    width = min(b.waveforms.shape[1] for b in batches)
    masks = min(b.mask_indices.shape[1] for b in batches)
    return Batch(
        torch.cat([b.waveforms[:, :width] for b in batches]),
        None,
        torch.cat([b.mask_indices[:, :masks] for b in batches]),
        0,
    )


def test_gradient_accumulation_equals_one_large_batch(tmp_path):
    cfg = tiny_config(model=NO_DROPOUT, data={"max_batch_length": 40_000})
    accumulated = Trainer(cfg, tmp_path / "a", CPU, progress=False)
    large = Trainer(cfg, tmp_path / "b", CPU, progress=False)
    micro = _batches(accumulated, 4)
    union = _concat(micro)
    # Same shapes inside each micro-batch as in the union batch, so the two computations see the same frames.
    micro = [
        type(b)(b.waveforms[:, : union.waveforms.shape[1]], None, b.mask_indices[:, : union.mask_indices.shape[1]], 0)
        for b in micro
    ]
    accumulated.train_step(micro)
    large.train_step([union])
    for key, value in large.model.state_dict().items():
        torch.testing.assert_close(accumulated.model.state_dict()[key], value, rtol=2e-5, atol=2e-6, msg=key)
    assert accumulated.step == large.step == 1


def _ddp_rank(rank, port, run_dir, results):
    import torch.distributed as dist

    from spidr_fast.distributed import setup

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    ctx = setup("cpu")
    try:
        trainer = Trainer(tiny_config(model=NO_DROPOUT), run_dir, ctx, progress=False)
        batches = _batches(Trainer(tiny_config(model=NO_DROPOUT), run_dir / "data", CPU, progress=False), 2)
        trainer.train_step([batches[rank]])
        results[rank] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    finally:
        dist.destroy_process_group()


def test_two_rank_ddp_step_equals_one_process_accumulating_both_batches(tmp_path):
    """Each rank's batch as a micro-batch of one process (which equals the union batch: the test above). Not the
    union batch itself: its forward takes other GEMM blockings than the halves, and one frame near a tie between
    two codewords then changes a codebook count by a whole 0.1 (seen with the SeedSequence batch seeds)."""
    import socket

    import torch.multiprocessing as mp

    single = Trainer(tiny_config(model=NO_DROPOUT), tmp_path / "single", CPU, progress=False)
    batches = _batches(single, 2)
    single.train_step(batches)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ddp_rank, args=(port, tmp_path / "ddp", results), nprocs=2)
        results = dict(results)
    for key, value in single.model.state_dict().items():
        for rank in (0, 1):
            torch.testing.assert_close(results[rank][key], value, rtol=2e-5, atol=2e-6, msg=f"rank {rank}: {key}")


# --- faults --------------------------------------------------------------------------------------------------------


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(run={"max_nonfinite_steps": 2}), tmp_path, CPU, progress=False)
    batches = _batches(trainer, 3)
    trainer.train_step([batches[0]])
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    forward = trainer.model.forward
    monkeypatch.setattr(
        trainer.model, "forward", lambda *a, **k: (lambda l, o: (l * float("nan"), o))(*forward(*a, **k))
    )
    _, applied, _ = trainer.train_step([batches[1]])
    assert not applied and trainer.step == 1
    for key, value in trainer.model.state_dict().items():  # no optimizer, EMA or codebook update
        assert torch.equal(value, before[key]), key
    with pytest.raises(NonFiniteError, match="2 non-finite steps in a row"):
        trainer.fit()


def test_sigterm_checkpoints_and_a_restart_resumes(tmp_path):
    trainer = Trainer(tiny_config(optimizer={"max_steps": 50}), tmp_path, CPU, progress=False)
    step_once = trainer.train_step

    def step_then_signal(*args, **kwargs):
        result = step_once(*args, **kwargs)
        if trainer.step == 2:
            threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGTERM)).start()
            threading.Event().wait(0.2)
        return result

    trainer.train_step = step_then_signal
    summary = trainer.fit()
    assert summary["preempted"] and 2 <= summary["step"] < 50
    assert Trainer(tiny_config(optimizer={"max_steps": 50}), tmp_path, CPU, progress=False).step == summary["step"]


@pytest.mark.parametrize(
    "failure", ["Exception", "cli.NonFiniteError", "cli.CheckpointWriteError"], ids=["unhandled", "nonfinite", "write"]
)
def test_a_run_that_fails_with_loader_workers_exits_instead_of_hanging(tmp_path, failure):
    """The workers ignore SIGTERM (preemption is the main process's), which exit-time cleanup sends and then waits
    on. An unhandled error used to hang the exit; a handled one (non-finite steps, a failed checkpoint write) still
    did after that fix, which looked for the error in `sys.exc_info()`, empty once handled."""
    args = tiny_cli_args(tmp_path, "--set=data.num_workers=2")
    script = (
        "import sys\n"
        "from spidr_fast.train import __main__ as cli\n"
        f"class InjectedFailure({failure}): pass\n"
        "def fail(self, micro_batches, stop):\n"
        "    self.cycle = self  # the loader then outlives main() until a garbage collection, which exit runs late\n"
        "    raise InjectedFailure('the step failed')\n"
        "cli.Trainer.train_step = fail\n"
        f"sys.exit(cli.main({args!r}))\n"
    )
    command = [sys.executable, "-c", script]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=60)
        assert process.returncode == 1 and "the step failed" in output, output
        time.sleep(0.5)
        with pytest.raises(ProcessLookupError):  # no worker left in the process group
            os.killpg(process.pid, 0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    checkpoint.save_checkpoint(folder, 1, {"step": 1}, keep_latest=-1)

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save_checkpoint(folder, 2, {"step": 2}, keep_latest=1)
    monkeypatch.undo()
    assert [p.name for p in folder.iterdir()] == ["step_00000001.pt"]
    assert checkpoint.load_latest(folder) == {"step": 1}


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path):
    checkpoint.save_checkpoint(tmp_path, 1, {"step": 1}, keep_latest=-1)
    (tmp_path / "step_00000002.pt").write_bytes(b"truncated")
    assert checkpoint.load_latest(tmp_path) == {"step": 1}


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_damaged_newest_checkpoint_never_costs_the_good_ones(tmp_path, caplog):
    """Issue 32's scenario: steps 100 and 200 saved, step 200 truncated, resume (from 100), save 150 with
    keep_latest=1. Before: pruning kept the damaged 200 and deleted 150 and 100, and the next resume started over."""
    for step in (100, 200):
        checkpoint.save_checkpoint(tmp_path, step, {"step": step}, keep_latest=-1)
    _truncate(tmp_path / "step_00000200.pt")
    checkpointer = checkpoint.Checkpointer(tmp_path, save_interval=50, keep_latest=1, enabled=True)
    assert checkpointer.load_latest() == {"step": 100}
    assert f"checkpoint {tmp_path / 'step_00000200.pt'} is unreadable" in caplog.text
    assert "renamed to step_00000200.pt.corrupt" in caplog.text
    checkpointer.save(150, lambda: {"step": 150})
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == ["step_00000100.pt", "step_00000150.pt", "step_00000200.pt.corrupt"]
    assert checkpoint.load_latest(tmp_path) == {"step": 150}


def test_a_damaged_checkpoint_that_cannot_be_renamed_holds_no_kept_slot(tmp_path, monkeypatch):
    """A folder where the rename fails, and a rank that does not write: the damaged file stays, but pruning neither
    counts it nor deletes it, and never deletes the checkpoint resumed from."""
    for step in (100, 200):
        checkpoint.save_checkpoint(tmp_path, step, {"step": step}, keep_latest=-1)
    _truncate(tmp_path / "step_00000200.pt")
    assert checkpoint.Checkpointer(tmp_path, 50, 1, enabled=False).load_latest() == {"step": 100}
    assert (tmp_path / "step_00000200.pt").exists()  # only the writing rank sets a file aside
    monkeypatch.setattr(type(tmp_path), "rename", lambda *_: (_ for _ in ()).throw(PermissionError("read-only")))
    checkpointer = checkpoint.Checkpointer(tmp_path, save_interval=50, keep_latest=1, enabled=True)
    assert checkpointer.load_latest() == {"step": 100}
    checkpointer.save(150, lambda: {"step": 150})
    checkpointer.save(160, lambda: {"step": 160})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000100.pt", "step_00000160.pt", "step_00000200.pt"]


def test_bad_files_in_a_validation_manifest_are_skipped_named_and_counted(tmp_path, caplog):
    """Truncated, NaN-filled and missing files among a labelled validation set: each is named, counted once, and
    the unit quality and the MFCC baseline are scored on the other files. Before, the unit-quality pass raised."""
    from dataclasses import replace

    import soundfile

    from spidr_fast.data.loading import DataConfig
    from spidr_fast.data.masking import MaskingConfig
    from spidr_fast.data.synthetic import SyntheticCorpus
    from spidr_fast.train.validation import validate

    manifest = SyntheticCorpus(num_utterances=3, min_seconds=1.0, max_seconds=1.5).write(tmp_path / "corpus")
    wav = tmp_path / "corpus" / "wav"
    good, _ = soundfile.read(wav / "utt00000.wav", dtype="float32")
    soundfile.write(wav / "truncated.wav", good[:1_000], 16_000)
    soundfile.write(wav / "nan.wav", np.full(len(good), np.nan, dtype=np.float32), 16_000, subtype="FLOAT")
    bad = ["truncated", "nan", "missing"]
    alignments = tmp_path / "corpus" / "alignments.jsonl"
    phones = json.loads(alignments.read_text().splitlines()[0])["phones"]
    with manifest.open("a") as f, alignments.open("a") as g:
        for name in bad:
            f.write(f"wav/{name}.wav\t{len(good)}\n")
            g.write(json.dumps({"fileid": name, "phones": phones}) + "\n")
    cfg = DataConfig(manifest=str(manifest), alignments_path=str(alignments), num_workers=0, min_sample_size=8_000)
    model = build_model(cfg=tiny_config().model, model_type="spidr")  # 20 ms frames, as the labels
    results = validate(model, cfg, MaskingConfig(), torch.device("cpu"), torch.float32)
    assert results["skipped_files"] == len(bad)
    for name in bad:
        assert f"skipping unusable audio {wav / name}.wav" in caplog.text
    assert 0 <= results["codebooks"]["pnmi"] <= 1 and 0 <= results["baseline"]["pnmi"] <= 1
    only_bad = tmp_path / "bad.tsv"
    only_bad.write_text(f"{wav.parent}\n" + "".join(f"wav/{name}.wav\t{len(good)}\n" for name in bad))
    with pytest.raises(ValueError, match=f"no usable audio in validation manifest '{only_bad}' \\(3 files skipped"):
        validate(model, replace(cfg, manifest=str(only_bad)), MaskingConfig(), torch.device("cpu"), torch.float32)


def test_unreadable_audio_is_skipped_and_counted(tmp_path):
    from spidr_fast.data.synthetic import SyntheticCorpus

    manifest = SyntheticCorpus(num_utterances=6, min_seconds=1.0, max_seconds=1.5).write(tmp_path / "corpus")
    (tmp_path / "corpus" / "wav" / "utt00002.wav").write_bytes(b"RIFF corrupt")
    cfg = tiny_config(
        data={"manifest": str(manifest), "max_batch_length": 200_000}, optimizer={"max_steps": 2}, validation={}
    )
    summary = Trainer(cfg, tmp_path / "run", CPU, progress=False).fit()
    assert summary["step"] == 2 and summary["skipped_files"] >= 1


def test_a_corpus_of_only_unreadable_audio_is_an_error(tmp_path, capsys):
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF corrupt")
    (tmp_path / "m.tsv").write_text(f"{tmp_path}\ncorrupt.wav\t40000\n")
    args = tiny_cli_args(tmp_path / "run", "--manifest", str(tmp_path / "m.tsv"), "--set=data.min_sample_size=1000")
    assert main(args) == 2
    assert "no readable audio in a whole epoch" in capsys.readouterr().err


# --- compile, schedules, metrics, environment ----------------------------------------------------------------------


def test_compiled_training_does_not_recompile_after_warm_up(tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    data = {"max_sample_size": 64_000, "max_batch_length": 140_000, "num_buckets": 3}
    trainer = Trainer(tiny_config(data=data), tmp_path, CPU, compile_backend="aot_eager", progress=False)
    batches = _batches(trainer, 6)
    assert len({tuple(b.waveforms.shape) for b in batches}) >= 3  # batch and time sizes vary
    trainer.train_step([batches[0]])
    warm = counters["stats"]["unique_graphs"]
    assert warm == 2  # the student's and the teacher's transformer
    for batch in batches[1:]:
        trainer.train_step([batch])
    assert counters["stats"]["unique_graphs"] == warm


@pytest.mark.official
@pytest.mark.parametrize("scheduler", ["tristage", "cosine", "rsqrt", "constant"])
def test_lr_schedules_equal_official(official, scheduler):
    from spidr.config import OptimizerConfig as OfficialOptimizerConfig
    from spidr.optimizer import build_scheduler

    stages = dict(warmup_steps=10, hold_steps=20, decay_steps=30, rsqrt_timescale=7, rsqrt_shift=3)
    fields = dict(scheduler=scheduler, max_steps=100, lr=1.0, **stages)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    official_scheduler = build_scheduler(optimizer, OfficialOptimizerConfig(**fields))
    ours = config_module.OptimizerConfig(**fields)
    for step in range(100):
        assert lr_factor(step, ours) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12)
        optimizer.step()
        official_scheduler.step()


def test_unit_quality_of_known_clusterings():
    phones = [torch.arange(40).remainder(4).repeat_interleave(2).numpy()]
    perfect = unit_quality(joint_counts(phones, [torch.arange(40).remainder(4).numpy()], 4, 8))
    assert perfect["pnmi"] == pytest.approx(1.0) and perfect["phone_purity"] == perfect["cluster_purity"] == 1.0
    assert perfect["unit_perplexity"] == pytest.approx(4.0) and perfect["active_units"] == 4
    constant = unit_quality(joint_counts(phones, [torch.zeros(40, dtype=torch.long).numpy()], 4, 8))
    assert constant["pnmi"] == pytest.approx(0.0) and constant["unit_perplexity"] == pytest.approx(1.0)
    rng = torch.Generator().manual_seed(0)
    random_phones = [torch.randint(0, 5, (20_000,), generator=rng).numpy()]
    independent = unit_quality(
        joint_counts(random_phones, [torch.randint(0, 7, (10_000,), generator=rng).numpy()], 5, 7)
    )
    assert independent["pnmi"] < 0.01
    with pytest.raises(ValueError, match="utterance 0: 80 phone frames but 20 unit frames"):
        joint_counts(phones, [torch.zeros(10, dtype=torch.long).numpy()], 4, 8)


def test_slurm_node_list_first_host():
    assert _first_host("gpu[03-05,09],cpu1") == "gpu03"
    assert _first_host("node7") == "node7"


def test_profile_writes_a_trace_of_the_scheduled_steps(tmp_path):
    trainer = Trainer(
        tiny_config(optimizer={"max_steps": 7}, validation={}), tmp_path, CPU, profile=True, progress=False
    )
    trainer.fit()
    assert len(list((tmp_path / "profile").glob("*.pt.trace.json"))) == 1  # steps 5 to 7


def test_a_cosine_run_that_ends_with_its_warm_up_has_a_learning_rate_at_every_step():
    cfg = config_module.OptimizerConfig(scheduler="cosine", max_steps=30, warmup_steps=30)
    assert [lr_factor(step, cfg) for step in (0, 29, 30)] == pytest.approx([cfg.init_lr_scale, 0.967, 1.0], abs=1e-3)


def test_dropping_the_frozen_group_keeps_the_schedule_at_its_step():
    cfg = tiny_config()
    model = build_model(cfg=cfg.model, model_type=cfg.run.model_type)
    optimizer, scheduler = build_optimizer(model, cfg.optimizer, torch.device("cpu"))
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    model.freeze_extractor()
    scheduler = drop_frozen_group(optimizer, scheduler, cfg.optimizer)
    assert len(optimizer.param_groups) == 1 and scheduler.last_epoch == 2
    assert scheduler.get_last_lr() == [cfg.optimizer.lr * lr_factor(2, cfg.optimizer)]
    resumed_optimizer, resumed = build_optimizer(model, cfg.optimizer, torch.device("cpu"))  # as a resumed run builds
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    resumed.load_state_dict(scheduler.state_dict())
    for each_optimizer, each_scheduler in ((optimizer, scheduler), (resumed_optimizer, resumed)):
        each_optimizer.step()
        each_scheduler.step()
    assert scheduler.get_last_lr() == resumed.get_last_lr() == [cfg.optimizer.lr * lr_factor(3, cfg.optimizer)]


def test_freeze_step_drops_the_extractor_from_the_optimizer(tmp_path):
    trainer = Trainer(tiny_config(model={"freeze_step": 2}, validation={}), tmp_path, CPU, progress=False)
    assert len(trainer.optimizer.param_groups) == 2
    trainer.fit()
    assert trainer.step == 4 and len(trainer.optimizer.param_groups) == 1
    assert not any(p.requires_grad for p in trainer.model.feature_extractor.parameters())
    resumed = Trainer(
        tiny_config(model={"freeze_step": 2}, optimizer={"max_steps": 5}, validation={}), tmp_path, CPU, progress=False
    )
    assert len(resumed.optimizer.param_groups) == 1
    resumed.fit()
    assert resumed.step == 5
