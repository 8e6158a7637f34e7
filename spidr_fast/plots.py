"""Figures, when matplotlib is installed (the optional extra `eval`): without it, a logged note and no figure."""

import json
import logging
import math
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
# (panel title, metrics.jsonl split, keys plotted in that panel)
TRAINING_PANELS = (
    ("training loss", "train", ("loss",)),
    ("codebook (target) perplexity", "train", ("target_ppl",)),
    ("prediction perplexity", "train", ("pred_ppl",)),
    ("validation PNMI", "valid", ("heads/pnmi", "codebooks/pnmi", "baseline/pnmi")),
)
LEGEND = {
    "heads/pnmi": "student's heads (best layer)",
    "codebooks/pnmi": "teacher's codebooks (best layer)",
    "baseline/pnmi": "k-means on MFCC",
}


def pyplot() -> Any:
    """matplotlib.pyplot drawing to files (Agg), or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot (pip install 'spidr_fast[eval]')")
        return None
    return plt


def plot_training(metrics_log: Path, path: Path) -> bool:
    """Loss (beside ln of the target perplexity, the loss of predicting only the targets' frequencies), codebook
    and prediction perplexity, and validation PNMI (the model's best layers and the k-means baseline of every
    validation set) against steps, from a run's metrics.jsonl; False when not drawn."""
    plt = pyplot()
    if plt is None:
        return False
    records = [json.loads(line) for line in metrics_log.read_text(encoding="utf-8").splitlines() if line.strip()]
    fig, axes = plt.subplots(1, len(TRAINING_PANELS), figsize=(4 * len(TRAINING_PANELS), 3.2))
    for ax, (title, split, keys) in zip(axes, TRAINING_PANELS, strict=True):
        splits = sorted({r["split"] for r in records if r["split"].startswith(split)})
        for name in splits:
            for key in keys:
                points = [(r["step"], r[key]) for r in records if r["split"] == name and key in r]
                if points:
                    label = LEGEND.get(key, key) + (f" [{name.split('/', 1)[1]}]" if len(splits) > 1 else "")
                    ax.plot(
                        *zip(*points, strict=True),
                        marker="." if len(points) < 30 else None,
                        label=label,
                        linestyle="--" if key.startswith("baseline") else "-",
                    )
        if keys == ("loss",):  # the loss of a student that ignores its input and predicts the targets' frequencies
            marginal = [(r["step"], math.log(r["target_ppl"])) for r in records if r["split"] == "train"]
            if marginal:
                ax.plot(*zip(*marginal, strict=True), linestyle="--", label="ln(target perplexity): no learning")
                ax.legend(fontsize=7)
        ax.set_title(title)
        ax.set_xlabel("step")
        if split == "valid" and ax.has_data():
            ax.set_ylim(0, 1)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
