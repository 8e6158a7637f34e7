"""python -m spidr_fast.train [--config FILE] [--manifest M] [--compile] ...

With no arguments: a small SpidR trained on the built-in synthetic corpus, 600 steps of three 2 s clips (about 7
minutes on 2 CPU cores), with a progress bar, and in runs/spidr_fast/synthetic its config.json, checkpoints/,
metrics.jsonl and metrics.png; it ends with a summary of the units' quality against the phone labels, beside
k-means on MFCCs. Relaunching the same command resumes the run; SIGTERM or SIGUSR1 stops it after writing a checkpoint
(exit status 75; under SLURM it requeues the job).
On real speech: --manifest (python -m spidr_fast.data.manifest writes one) and an official config (--config);
under torchrun or srun, one process per GPU.
"""

import argparse
import dataclasses
import json
import logging
import multiprocessing
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from spidr_fast.cli import ArgumentParser, report_user_errors
from spidr_fast.preemption import STOPPED_STATUS, Preemption, requeue_slurm_job

if __name__ == "__main__":  # before the imports below, which take seconds: a signal during start-up is not lost
    STARTUP_PREEMPTION = Preemption().__enter__()

from spidr_fast import distributed  # noqa: E402
from spidr_fast.metrics import describe, took_position_shortcut  # noqa: E402
from spidr_fast.plots import plot_training  # noqa: E402
from spidr_fast.train import checkpoint  # noqa: E402
from spidr_fast.train import config as config_module  # noqa: E402
from spidr_fast.train.checkpoint import CheckpointWriteError, export_state_dict  # noqa: E402
from spidr_fast.train.loop import NonFiniteError, Trainer  # noqa: E402

# flag → (section, field)
FIELD_FLAGS = {
    "model": ("run", "model_type"),
    "manifest": ("data", "manifest"),
    "max_steps": ("optimizer", "max_steps"),
    "accumulate": ("run", "accumulate"),
    "dtype": ("optimizer", "dtype"),
    "lr": ("optimizer", "lr"),
    "seed": ("run", "random_seed"),
    "log_interval": ("run", "log_interval"),
    "save_interval": ("run", "save_interval"),
    "keep_latest": ("run", "keep_latest"),
    "validate_interval": ("run", "validate_interval"),
    "num_workers": ("data", "num_workers"),
    "max_batch_length": ("data", "max_batch_length"),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m spidr_fast.train", description=__doc__)
    parser.add_argument(
        "--config",
        help="TOML or JSON config with the official sections (run, data, model, "
        "optimizer, masking, validation); without it, the small synthetic-corpus run",
    )
    parser.add_argument("--model", choices=["spidr", "dinosr"], help="run.model_type")
    parser.add_argument("--manifest", help="data.manifest: a fairseq TSV or an official spidr CSV of 16 kHz mono audio")
    parser.add_argument("--max-steps", type=int, help="optimizer.max_steps")
    parser.add_argument(
        "--run-dir", type=Path, help="run folder (default: run.workdir/run.wandb_project/run.wandb_name)"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (dynamic batch and time)")
    parser.add_argument("--accumulate", type=int, help="run.accumulate: micro-batches per optimizer step")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="optimizer.dtype: autocast dtype")
    parser.add_argument("--lr", type=float, help="optimizer.lr: peak learning rate")
    parser.add_argument("--seed", type=int, help="run.random_seed")
    parser.add_argument("--log-interval", type=int, help="run.log_interval, in steps")
    parser.add_argument("--save-interval", type=int, help="run.save_interval, in steps")
    parser.add_argument("--keep-latest", type=int, help="run.keep_latest: checkpoints kept (-1: all)")
    parser.add_argument("--validate-interval", type=int, help="run.validate_interval, in steps (0: at the end)")
    parser.add_argument("--num-workers", type=int, help="data.num_workers: data-loading processes")
    parser.add_argument("--max-batch-length", type=int, help="data.max_batch_length: samples per batch and GPU")
    parser.add_argument("--device", help="torch device (default: this rank's GPU, else the CPU)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override any config field, value in TOML syntax (repeatable)",
    )
    parser.add_argument("--profile", action="store_true", help="write a torch profiler trace of a few steps")
    parser.add_argument(
        "--export",
        action="store_true",
        help="at the end, write export/model.pt and config.json that the official spidr loads",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> config_module.TrainConfig:
    overrides: dict[str, Any] = {}
    for flag, (section, name) in FIELD_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            overrides = config_module.merge(overrides, {section: {name: value}})
    for assignment in args.set:
        overrides = config_module.merge(overrides, config_module.parse_override(assignment))
    if args.config:
        raw = config_module.read_config_file(args.config)
    else:
        raw = config_module.synthetic_defaults(overrides.get("run", {}).get("model_type", "spidr"))
    return config_module.config_from_dict(config_module.merge(raw, overrides))


def print_summary(summary: dict[str, Any], export: Path | None, plot: Path | None) -> None:
    train = summary.get("train") or {}
    lines = [f"run folder: {summary['run_dir']}", f"steps: {summary['step']}"]
    if summary["preempted"]:
        lines.append(
            f"stopped by a signal: checkpoint written, exit status {STOPPED_STATUS}; "
            "run the same command again to resume"
        )
    if summary["checkpoint"]:
        lines.append(f"checkpoint: {summary['checkpoint']}")
    if export:
        lines.append(f"export (official format): {export}")
    if train:
        lines.append(
            f"final loss: {train['loss']:.4f} (target ppl {train['target_ppl']:.1f}, pred ppl {train['pred_ppl']:.1f})"
        )
    if summary["skipped_files"]:
        lines.append(f"unreadable audio files skipped: {summary['skipped_files']}")
    for excluded in summary["excluded_files"]:
        lines.append(f"excluded: {excluded['file']} ({excluded['reason']})")
    for name, result in (summary.get("validation") or {}).items():
        line = f"validation [{name}]: loss {result['loss']:.4f}"
        if result["skipped_files"]:
            line += f" ({result['skipped_files']} unreadable files skipped)"
        for kind, what in (("heads", "student's head units"), ("codebooks", "teacher's codebook units")):
            if kind in result:
                line += f"\n  {what + ':':26} {describe(result[kind])}, best: {result[kind]['best_layer']}"
        if "baseline" in result:
            line += f"\n  {'k-means on MFCC:':26} {describe(result['baseline'])}, as many units"
            best_pnmi = max(result[kind]["pnmi"] for kind in ("heads", "codebooks"))
            verdict = "above" if best_pnmi > result["baseline"]["pnmi"] else "not yet above"
            line += f"\n  the model's best units are {verdict} the baseline's PNMI"
        if any(took_position_shortcut(result[kind]) for kind in ("heads", "codebooks") if kind in result):
            line += (
                "\n  the units say more about where a frame sits in its clip than about its phone: masked prediction"
                "\n  took the position shortcut (docs/synthetic-runs.md: What the collapse is)"
            )
        lines.append(line)
    lines.append(f"metrics log: {Path(summary['run_dir']) / 'metrics.jsonl'}")
    if plot:
        lines.append(f"metrics plot: {plot}")
    print("\n".join(lines))


def main(argv: list[str] | None = None, preemption: Preemption | None = None) -> int:
    """`preemption`: the signal handling entered at start-up, if any; kept until the last checkpoint is written."""
    with preemption or Preemption() as active:
        return report_user_errors(_main, argv, active)


def _stop_loader_workers() -> None:
    """The loader's workers ignore SIGTERM (the main process stops them), and exit-time cleanup stops them with
    SIGTERM and waits: whatever path a run leaves by, an error handled or not, stop them, or it never exits."""
    for worker in multiprocessing.active_children():
        worker.kill()


def _main(argv: list[str] | None, preemption: Preemption) -> int:
    """0: finished; STOPPED_STATUS: stopped by a signal, checkpoint written (requeued under SLURM); 1: a failure a
    restart may cure."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = build_config(args)
    run_dir = (args.run_dir or cfg.run.dir).resolve()
    ctx = distributed.setup(args.device, cfg.run.collective_timeout)
    try:
        trainer = Trainer(
            cfg,
            run_dir,
            ctx,
            compile_backend="inductor" if args.compile or cfg.run.compile else None,
            profile=args.profile,
            progress=not args.no_progress,
            preemption=preemption,
        )
        if ctx.is_main:  # after the Trainer: a folder holding another model's run keeps its config.json
            (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        summary = trainer.fit()
        export = (
            export_state_dict(trainer.model, cfg.model, run_dir / "export") if args.export and ctx.is_main else None
        )
        if ctx.is_main:
            plot = run_dir / "metrics.png"
            print_summary(summary, export, plot if plot_training(run_dir / "metrics.jsonl", plot) else None)
        if not summary["preempted"]:
            return 0
        if ctx.is_main:
            requeue_slurm_job()
        return STOPPED_STATUS
    except (NonFiniteError, CheckpointWriteError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except RuntimeError as error:
        if ctx.world_size == 1:
            raise
        # A dead or stuck peer surfaces as an error in whichever collective comes next (gloo at once, NCCL after
        # run.collective_timeout): leave at once, with every rank's state on disk as of the latest checkpoint.
        traceback.print_exc()
        latest = checkpoint.checkpoints(run_dir / "checkpoints")
        print(
            f"error: rank {ctx.rank} of {ctx.world_size} stopped ({str(error).splitlines()[0]}); when a rank "
            "dies, the others stop in their next collective. Restart every rank to resume from "
            f"{latest[-1] if latest else 'the start (no checkpoint yet)'}",
            file=sys.stderr,
            flush=True,
        )
        _stop_loader_workers()
        os._exit(1)  # destroying a process group whose peer is gone can block
    finally:
        _stop_loader_workers()
        distributed.teardown()


if __name__ == "__main__":
    sys.exit(main(preemption=STARTUP_PREEMPTION))
