"""Every command line names a wrong path or value in one line on stderr, with exit status 2 and no traceback."""

import subprocess
import sys

import pytest
from helpers import TINY

from benchmarks import common, input_pipeline, kernels, report, train_step
from spidr_fast import evaluate, extract
from spidr_fast.cli import report_user_errors
from spidr_fast.models import DinoSRConfig, SpidR
from spidr_fast.train import __main__ as train
from spidr_fast.train.checkpoint import export_state_dict


def error_line(capsys, main, *argv: str) -> str:
    """The one line that `main(argv)`, run as its module's `__main__` runs it, prints on stderr for exit status 2."""
    try:
        status = report_user_errors(main, list(argv))
    except SystemExit as exit_:  # argparse's errors
        status = exit_.code
    assert status == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny model as `python -m spidr_fast.train --export` writes it."""
    folder = tmp_path_factory.mktemp("export")
    return export_state_dict(SpidR(DinoSRConfig(**TINY)), DinoSRConfig(**TINY), folder)


@pytest.fixture
def fast_peaks(monkeypatch):
    """The benchmarks' peak measurement, which a wrong path or value never reaches, made instant."""
    peaks = common.Peaks(copy_gb_per_s=1.0, bf16_matmul_tflop_per_s=1.0)
    for module in (kernels, train_step, input_pipeline):
        monkeypatch.setattr(module, "measure_peaks", lambda _device: peaks)


def test_train(tmp_path, capsys):
    missing = tmp_path / "missing.toml"
    assert str(missing) in error_line(capsys, train.main, "--config", str(missing))
    assert "argument --max-steps: invalid int value: 'many'" in error_line(capsys, train.main, "--max-steps", "many")


def test_evaluate(exported, tmp_path, capsys):
    manifest = tmp_path / "missing.tsv"
    line = error_line(
        capsys,
        evaluate.main,
        "--checkpoint",
        str(exported),
        "--manifest",
        str(manifest),
        "--alignments",
        str(tmp_path / "a.jsonl"),
        "--out",
        str(tmp_path),
    )
    assert f"manifest not found: {manifest}" in line
    assert "argument --context: invalid choice: 'all'" in error_line(capsys, evaluate.main, "--context", "all")


def test_extract(exported, tmp_path, capsys):
    args = ["--manifest", str(tmp_path / "missing.tsv"), "--out", str(tmp_path / "out")]
    assert "checkpoint not found" in error_line(capsys, extract.main, "--checkpoint", str(tmp_path / "none.pt"), *args)
    assert "manifest not found" in error_line(capsys, extract.main, "--checkpoint", str(exported), *args)
    line = error_line(capsys, extract.main, "--checkpoint", str(exported), *args, "--max-batch-samples", "0")
    assert "argument --max-batch-samples: must be above 0, got 0" in line


def test_benchmarks(tmp_path, capsys, fast_peaks):
    folder_that_is_a_file = tmp_path / "file"
    folder_that_is_a_file.write_text("")
    output = folder_that_is_a_file / "results.json"
    for main in (kernels.main, train_step.main, input_pipeline.main):
        line = error_line(capsys, main, "--smoke", "--output", str(output))
        assert f"--output {output}: cannot make its folder" in line
    assert "argument --variants: invalid choice: 'fast'" in error_line(capsys, kernels.main, "--variants", "fast")
    assert "argument --batch: must be above 0, got 0" in error_line(capsys, train_step.main, "--batch", "0")
    assert "argument --workers: must be above 0, got -1" in error_line(capsys, input_pipeline.main, "--workers=-1")
    assert "unrecognized arguments: --fix" in error_line(capsys, report.main, "--fix")


def test_a_module_run_from_the_shell_prints_no_traceback(tmp_path):
    missing = tmp_path / "none.pt"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "spidr_fast.extract",
            "--checkpoint",
            str(missing),
            "--manifest",
            "m.tsv",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: checkpoint not found: {missing}"
