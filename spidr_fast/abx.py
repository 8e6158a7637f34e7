"""ABX phone discriminability, within and across speakers, as in ZeroSpeech 2021 / Libri-light, scored as fastabx
scores it.

Items come from an item file (`#file onset offset #phone prev-phone next-phone speaker`, times in seconds). An
item's frames are those whose centre, (i + 0.5) / frequency, lies in [onset, offset] (Libri-light's rule); items
with fewer than two such frames are left out, as there. Distance: DTW over the angular distance of frames
(arccos of the cosine, divided by pi; an all-zero frame counts as the uniform direction, as in fastabx),
normalised by the length of the best path. A cell holds the triples (A, B, X) of one phone pair in one context
(and one speaker within speakers): A and B of one speaker, X of A's phone, from A's speaker (never A itself) or,
across speakers, from one other speaker. A triple is an error when d(A, X) > d(B, X), half an error on a tie.
Cell error rates are averaged over contexts and X speakers together, then over the speaker of A and B, then over
phone pairs (fastabx's and Libri-light's order; `--context any` has a single context).

`fastabx_error_rates` runs `fastabx` itself (Python >= 3.12) on the same items and features.
"""

import math
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from torch import Tensor

ITEM_HEADER = "#file onset offset #phone prev-phone next-phone speaker"
SILENCES = frozenset({"sil", "SIL", "sp", "spn", ""})
_MAX_DTW_ELEMENTS = 1 << 24  # distance-matrix entries per DTW chunk (64 MiB in float32)


class Item(NamedTuple):
    fileid: str
    onset: float
    offset: float
    phone: str
    prev: str
    next: str
    speaker: str


def read_items(path: str | Path) -> list[Item]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"item file not found: {path}")
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 7:
            raise ValueError(f"{path}:{number}: expected 7 fields ({ITEM_HEADER}), got {len(fields)}")
        try:
            onset, offset = float(fields[1]), float(fields[2])
        except ValueError as error:
            raise ValueError(f"{path}:{number}: onset and offset must be seconds ({error})") from error
        items.append(Item(fields[0], onset, offset, fields[3], fields[4], fields[5], fields[6]))
    if not items:
        raise ValueError(f"item file {path} has no item")
    return items


def write_items(items: Sequence[Item], path: str | Path) -> None:
    rows = [f"{i.fileid} {i.onset:.4f} {i.offset:.4f} {i.phone} {i.prev} {i.next} {i.speaker}" for i in items]
    Path(path).write_text("\n".join([ITEM_HEADER, *rows]) + "\n", encoding="utf-8")


def items_from_alignment(fileid: str, speaker: str, phones: Sequence[str], hop: float = 0.01) -> list[Item]:
    """One item per phone segment (a run of equal labels every `hop` seconds) that has a segment on both sides
    and is not silence."""
    bounds = [0] + [t for t in range(1, len(phones)) if phones[t] != phones[t - 1]] + [len(phones)]
    segments = list(zip(bounds[:-1], bounds[1:], strict=True))
    return [
        Item(
            fileid,
            start * hop,
            end * hop,
            phones[start],
            phones[segments[k - 1][0]],
            phones[segments[k + 1][0]],
            speaker,
        )
        for k, (start, end) in enumerate(segments[1:-1], 1)
        if phones[start] not in SILENCES
    ]


def frame_span(onset: float, offset: float, frequency: float, num_frames: int) -> slice | None:
    """The frames of an item: centres (i + 0.5) / frequency within [onset, offset]; None under two frames.
    Rounded to 1e-6 frame so that times like 0.07 s (3.5000000000000004 frames) fall where they should."""
    start = max(0, math.ceil(round(frequency * onset - 0.5, 6)))
    end = min(num_frames - 1, math.floor(round(frequency * offset - 0.5, 6)))
    if start >= num_frames or end <= start:
        return None
    return slice(start, end + 1)


def _angular_dtw_block(xs: Tensor, x_lengths: Tensor, ys: Tensor, y_lengths: Tensor) -> Tensor:
    """xs (n, Lx, D), ys (m, Ly, D) unit-norm frames, zero-padded → (n, m) path-normalised DTW costs."""
    (n, lx, dim), (m, ly, _) = xs.shape, ys.shape
    cos = (xs.reshape(n * lx, dim) @ ys.reshape(m * ly, dim).T).view(n, lx, m, ly).transpose(1, 2)  # one GEMM
    dist = torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi
    cost = torch.empty_like(dist)
    length = torch.empty_like(dist)
    for i in range(lx):  # a cell depends only on cells above and to the left: padding never leaks in
        for j in range(ly):
            if i == 0 and j == 0:
                cost[:, :, 0, 0], length[:, :, 0, 0] = dist[:, :, 0, 0], 1.0
                continue
            moves = [(i - 1, j - 1)] if i and j else []
            moves += [(i - 1, j)] if i else []
            moves += [(i, j - 1)] if j else []
            costs = torch.stack([cost[:, :, a, b] for a, b in moves])
            lengths = torch.stack([length[:, :, a, b] for a, b in moves])
            best = costs.argmin(0, keepdim=True)
            cost[:, :, i, j] = dist[:, :, i, j] + costs.gather(0, best)[0]
            length[:, :, i, j] = lengths.gather(0, best)[0] + 1.0
    rows = torch.arange(n)[:, None]
    cols = torch.arange(m)[None, :]
    last_x, last_y = (x_lengths - 1)[:, None], (y_lengths - 1)[None, :]
    return cost[rows, cols, last_x, last_y] / length[rows, cols, last_x, last_y]


def _pad(sequences: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    lengths = torch.tensor([len(s) for s in sequences])
    return torch.nn.utils.rnn.pad_sequence(list(sequences), batch_first=True), lengths


def _unit_frames(frames: Tensor) -> Tensor:
    """Frames scaled to unit norm; an all-zero frame becomes the uniform direction, where fastabx puts it (its
    extra 1e-12 coordinate changes no float32 cosine), so that two silent frames are at distance 0."""
    frames = frames.float()
    norms = frames.norm(dim=-1, keepdim=True)
    silent = norms == 0
    uniform = frames.new_full((), frames.shape[-1] ** -0.5)
    return torch.where(silent, uniform, frames / norms.masked_fill(silent, 1.0))


def dtw_distances(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
    """(len(xs), len(ys)) DTW distances over the angular distance of frames; each sequence (frames, D)."""
    xs = [_unit_frames(x) for x in xs]
    ys = [_unit_frames(y) for y in ys]
    padded_y, y_lengths = _pad(ys)
    max_x = max(len(x) for x in xs)
    rows = max(1, _MAX_DTW_ELEMENTS // max(1, len(ys) * max_x * padded_y.shape[1]))
    out = []
    for start in range(0, len(xs), rows):
        padded_x, x_lengths = _pad(xs[start : start + rows])
        out.append(_angular_dtw_block(padded_x, x_lengths, padded_y.to(padded_x.device), y_lengths))
    return torch.cat(out)


class Cell(NamedTuple):
    """The triples of one phone pair in one group of items: A from `a`, B from `b`, X from `x` (indices into the
    items; within speakers `x` is `a`, and an item is never its own X)."""

    phone_a: str
    phone_b: str
    speaker: str  # of A and B
    group: tuple  # the context, and the speaker within speakers: the items that may meet in one triple
    a: list[int]
    b: list[int]
    x: list[int]


def abx_cells(
    items: Sequence[Item],
    *,
    speaker: Literal["within", "across"] = "within",
    context: Literal["within", "any"] = "within",
) -> list[Cell]:
    """Every cell of the task, as fastabx builds them (within speakers, only A sets of two items or more)."""
    if speaker not in ("within", "across") or context not in ("within", "any"):
        raise ValueError(
            f"speaker must be 'within' or 'across' and context 'within' or 'any', got {speaker!r}, {context!r}"
        )
    groups: dict[tuple, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        ctx = (item.prev, item.next) if context == "within" else ()
        groups[(ctx, item.speaker) if speaker == "within" else (ctx,)].append(index)
    cells = []
    for group, members in groups.items():
        by_class: dict[tuple[str, str], list[int]] = defaultdict(list)  # (phone, speaker) → item indices
        for index in members:
            by_class[items[index].phone, items[index].speaker].append(index)
        for (a, spk_a), indices_a in by_class.items():
            for (b, spk_b), indices_b in by_class.items():
                if a == b or spk_a != spk_b:
                    continue
                if speaker == "within":
                    if len(indices_a) > 1:
                        cells.append(Cell(a, b, spk_a, group, indices_a, indices_b, indices_a))
                    continue
                cells += [
                    Cell(a, b, spk_a, group, indices_a, indices_b, indices_x)
                    for (x, spk_x), indices_x in by_class.items()
                    if x == a and spk_x != spk_a
                ]
    return cells


def cell_items(cells: Sequence[Cell]) -> set[int]:
    """The items that some triple of `cells` uses: those a score rests on."""
    return {index for cell in cells for index in (*cell.a, *cell.b, *cell.x)}


def _errors(d_ax: Tensor, d_bx: Tensor, same_a_x: bool) -> float:
    """Error rate over triples: d_ax (A, X), d_bx (B, X); with `same_a_x`, A and X come from one set and A = X
    is left out."""
    greater = (d_ax[:, None, :] > d_bx[None, :, :]).float() + 0.5 * (d_ax[:, None, :] == d_bx[None, :, :]).float()
    if same_a_x:
        greater = greater * (1 - torch.eye(d_ax.shape[0]))[:, None, :]
        return float(greater.sum() / ((d_ax.shape[0] - 1) * d_bx.shape[0] * d_ax.shape[1]))
    return float(greater.mean())


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _collapse(scores: Sequence[tuple[Cell, float]]) -> float | None:
    """Mean over contexts and X speakers together, then over the speaker of A and B, then over phone pairs."""
    if not scores:
        return None
    by_speaker: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for cell, score in scores:
        by_speaker[cell.phone_a, cell.phone_b, cell.speaker].append(score)
    by_pair: dict[tuple[str, str], list[float]] = defaultdict(list)
    for (a, b, _speaker), cell_scores in by_speaker.items():
        by_pair[a, b].append(_mean(cell_scores))
    return _mean([_mean(pair_scores) for pair_scores in by_pair.values()])


def abx_error_rate(
    features: Sequence[Tensor],
    items: Sequence[Item],
    *,
    speaker: Literal["within", "across"] = "within",
    context: Literal["within", "any"] = "within",
) -> float | None:
    """ABX error rate (0 to 1) of items with their frames `features[i]` (frames, D); None when no cell exists."""
    if len(features) != len(items):
        raise ValueError(f"{len(features)} feature sequences for {len(items)} items")
    by_group: dict[tuple, list[Cell]] = defaultdict(list)
    for cell in abx_cells(items, speaker=speaker, context=context):
        by_group[cell.group].append(cell)
    scores = []
    for cells in by_group.values():  # one DTW matrix per group: its cells share items
        members = sorted(cell_items(cells))
        position = {index: p for p, index in enumerate(members)}
        distances = dtw_distances([features[i] for i in members], [features[i] for i in members])
        for cell in cells:
            pos_a, pos_b, pos_x = ([position[i] for i in indices] for indices in (cell.a, cell.b, cell.x))
            d_ax, d_bx = distances[pos_a][:, pos_x], distances[pos_b][:, pos_x]
            scores.append((cell, _errors(d_ax, d_bx, same_a_x=speaker == "within")))
    return _collapse(scores)


def item_features(
    features: dict[str, Tensor], items: Sequence[Item], frequency: float
) -> tuple[list[Tensor], list[Item]]:
    """The frames of every item that has at least two (`frame_span`), and those items with their times moved to
    the edges of those frames, so that any tool reading them (fastabx) selects the same frames and none past the
    end of the file. `features` maps a file id to its (frames, D) features; a missing file is an error naming it."""
    selected, kept = [], []
    for item in items:
        if item.fileid not in features:
            raise ValueError(f"item file names {item.fileid!r}, which has no features (not in the manifest?)")
        span = frame_span(item.onset, item.offset, frequency, len(features[item.fileid]))
        if span is not None:
            selected.append(features[item.fileid][span])
            kept.append(item._replace(onset=span.start / frequency, offset=span.stop / frequency))
    return selected, kept


def _fastabx_frequency(frequency: float) -> int | str:
    """fastabx takes the frequency as an exact decimal: an int or a string, never a float."""
    return int(frequency) if float(frequency).is_integer() else repr(float(frequency))


def fastabx_error_rates(
    features: dict[str, Tensor],
    items: Sequence[Item],
    frequency: float,
    *,
    context: Literal["within", "any"] = "within",
    speakers: Sequence[str] = ("within", "across"),
) -> dict[str, float | None]:
    """fastabx's ZeroSpeech ABX (needs `fastabx`, Python >= 3.12) of `items` as `item_features` keeps them, on
    `features` (file id → (frames, D)), per speaker condition; None where no cell exists, as `abx_error_rate`."""
    from fastabx import zerospeech_abx

    rates: dict[str, float | None] = {}
    with tempfile.TemporaryDirectory() as tmp:
        item_file, root = Path(tmp, "items.item"), Path(tmp, "features")
        write_items(items, item_file)
        for fileid in {item.fileid for item in items}:
            path = root / f"{fileid}.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(features[fileid].float().contiguous(), path)
        for speaker in speakers:
            if not abx_cells(items, speaker=speaker, context=context):  # fastabx would raise EmptyTaskError
                rates[speaker] = None
                continue
            try:
                rate = zerospeech_abx(
                    item_file,
                    root,
                    speaker=speaker,
                    context=context,
                    distance="angular",
                    frequency=_fastabx_frequency(frequency),
                    max_size_group=None,
                    max_x_across=None,
                    progress=False,
                )
            except (ValueError, TypeError) as error:
                raise RuntimeError(
                    f"fastabx failed on {len(items)} items ({speaker} speakers, context {context}, "
                    f"{frequency:g} Hz): {error}. The built-in ABX scores the same items."
                ) from error
            rates[speaker] = float(rate)
    return rates


def fastabx_available() -> bool:
    try:
        import fastabx  # noqa: F401
    except ImportError:
        return False
    return True
