"""Unit quality against frame-level phone labels, with the SpidR paper's definitions: PNMI, phone purity,
cluster purity, and the perplexity and count of the units used."""

import numpy as np

MAX_LENGTH_MISMATCH = 2  # frames; the feature extractor drops a few samples at the end of each file


def joint_counts(
    phones: list[np.ndarray], units: list[np.ndarray], num_phones: int, num_units: int, repeat: int = 2
) -> np.ndarray:
    """(num_phones, num_units) co-occurrence counts of 10 ms phone labels and units repeated `repeat` times
    (20 ms units against 10 ms labels)."""
    counts = np.zeros((num_phones, num_units), dtype=np.int64)
    for i, (p, u) in enumerate(zip(phones, units, strict=True)):
        u = np.repeat(np.asarray(u), repeat)
        if abs(len(p) - len(u)) > MAX_LENGTH_MISMATCH * repeat:
            raise ValueError(f"utterance {i}: {len(p)} phone frames but {len(u)} unit frames after repetition")
        n = min(len(p), len(u))
        np.add.at(counts, (np.asarray(p[:n]), u[:n]), 1)
    return counts


def _entropy(probs: np.ndarray) -> float:
    nonzero = probs[probs > 0]
    return float(-(nonzero * np.log2(nonzero)).sum())


def unit_quality(counts: np.ndarray) -> dict[str, float]:
    """Metrics of a (phones, units) count matrix."""
    total = counts.sum()
    if total == 0:
        raise ValueError("no frame to score: the count matrix is empty")
    joint = counts / total
    phone_probs, unit_probs = joint.sum(1), joint.sum(0)
    phone_entropy = _entropy(phone_probs)
    mutual_information = max(0.0, phone_entropy + _entropy(unit_probs) - _entropy(joint.ravel()))  # rounding
    return {
        "pnmi": mutual_information / phone_entropy if phone_entropy > 0 else 0.0,
        "phone_purity": float(joint.max(0).sum()),
        "cluster_purity": float(joint.max(1).sum()),
        "unit_perplexity": float(2 ** _entropy(unit_probs)),
        "active_units": int((unit_probs > 0).sum()),
    }


def position_nmi(units: list[np.ndarray], num_units: int, parts: int = 10) -> float:
    """How much the units say where their frame sits in its utterance (`parts` equal parts): their mutual
    information with that part over its entropy, as PNMI is for phones. Near 0 for units that follow the content;
    high for units that encode the position, a shortcut of masked prediction on short clips."""
    positions = [np.minimum(np.arange(len(u)) * parts // max(len(u), 1), parts - 1) for u in units]
    return unit_quality(joint_counts(positions, units, parts, num_units, repeat=1))["pnmi"]


def took_position_shortcut(quality: dict[str, float]) -> bool:
    """Whether units say clearly more about position than about phones. Measured on the synthetic corpus: collapsed
    runs reach position NMI 0.23 against PNMI 0.07; a model's first steps already show about 0.09 against 0.06,
    and runs that learn phones stay under 0.05."""
    return quality["position_nmi"] > max(2 * quality["pnmi"], 0.15)


def bitrate(counts: np.ndarray, units_per_second: float) -> float:
    """Bits per second of the unit stream of a (phones, units) count matrix: units per second times the entropy
    (bits) of the unit distribution."""
    units = counts.sum(0)
    return units_per_second * _entropy(units / units.sum()) + 0.0  # + 0.0: no "-0.0" for a single unit


def describe(quality: dict[str, float]) -> str:
    """One line of the `unit_quality` scores that the summaries print."""
    position = f", position NMI {quality['position_nmi']:.3f}" if "position_nmi" in quality else ""
    return (
        f"PNMI {quality['pnmi']:.3f}, phone purity {quality['phone_purity']:.3f}, cluster purity "
        f"{quality['cluster_purity']:.3f}, unit perplexity {quality['unit_perplexity']:.1f} "
        f"({quality['active_units']} active){position}"
    )
