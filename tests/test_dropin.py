"""The drop-in example (examples/dropin_hubert.py) and the drop-in benchmark (benchmarks/dropin.py) run, at a few
steps and a smoke size, on CPU."""

import importlib.util
import math
import re
import runpy
import sys
from pathlib import Path

from benchmarks import dropin

ROOT = Path(__file__).parents[1]


def run_script(path: Path, argv: list[str], monkeypatch, capsys) -> str:
    monkeypatch.setattr(sys, "argv", [str(path), *argv])
    runpy.run_path(str(path), run_name="__main__")
    return capsys.readouterr().out


def test_dropin_example_trains(monkeypatch, capsys):
    out = run_script(ROOT / "examples" / "dropin_hubert.py", ["--steps", "3"], monkeypatch, capsys)
    losses = [float(loss) for loss in re.findall(r"loss (\S+)", out)]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses), out
    assert all(int(n) > 1 for n in re.findall(r"codewords assigned (\d+)", out)), out


def test_dropin_benchmark_smoke(tmp_path):
    """Ours measured in every row; VectorQuantize's too where the optional extra is installed, else a note."""
    rows = dropin.main(["--smoke", "--output", str(tmp_path / "dropin.json")]).rows
    ours = [row for row in rows if row.impl.startswith("OnlineCodebook")]
    theirs = [row for row in rows if row.impl.startswith("VectorQuantize")]
    assert len(ours) == len(theirs) == 4 and all(row.ms is not None and not row.error for row in ours)
    installed = importlib.util.find_spec("vector_quantize_pytorch") is not None
    assert all((row.ms is not None) == installed for row in theirs), theirs
