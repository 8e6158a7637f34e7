"""ABX phone discriminability, within and across speakers, as in ZeroSpeech 2021 / Libri-light.

Items come from an item file (`#file onset offset #phone prev-phone next-phone speaker`, times in seconds). An
item's frames are those whose centre, (i + 0.5) / frequency, lies in [onset, offset] (Libri-light's rule); items
with fewer than two such frames are left out, as there. Distance: DTW over the angular distance of frames
(arccos of the cosine, divided by pi), normalised by the length of the best path. A triple (A, B, X), with A and X
of the same phone and B of another, is an error when d(A, X) > d(B, X), half an error on a tie. Error rates are
averaged over contexts, then speakers (pairs of speakers across), then phone pairs.

`fastabx` (Python >= 3.12) is used instead when it is importable; the built-in implementation otherwise.
"""

import math
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
        Item(fileid, start * hop, end * hop, phones[start], phones[segments[k - 1][0]], phones[segments[k + 1][0]],
             speaker)
        for k, (start, end) in enumerate(segments[1:-1], 1)
        if phones[start] not in SILENCES
    ]  # fmt: skip


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


def dtw_distances(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
    """(len(xs), len(ys)) DTW distances over the angular distance of frames; each sequence (frames, D)."""
    xs = [torch.nn.functional.normalize(x.float(), dim=-1) for x in xs]
    ys = [torch.nn.functional.normalize(y.float(), dim=-1) for y in ys]
    padded_y, y_lengths = _pad(ys)
    max_x = max(len(x) for x in xs)
    rows = max(1, _MAX_DTW_ELEMENTS // max(1, len(ys) * max_x * padded_y.shape[1]))
    out = []
    for start in range(0, len(xs), rows):
        padded_x, x_lengths = _pad(xs[start : start + rows])
        out.append(_angular_dtw_block(padded_x, x_lengths, padded_y.to(padded_x.device), y_lengths))
    return torch.cat(out)


def _errors(d_ax: Tensor, d_bx: Tensor, same_a_x: bool) -> float:
    """Error rate over triples: d_ax (A, X), d_bx (B, X); with `same_a_x`, A and X come from one set and A = X
    is left out."""
    greater = (d_ax[:, None, :] > d_bx[None, :, :]).float() + 0.5 * (d_ax[:, None, :] == d_bx[None, :, :]).float()
    if same_a_x:
        greater = greater * (1 - torch.eye(d_ax.shape[0]))[:, None, :]
        return float(greater.sum() / ((d_ax.shape[0] - 1) * d_bx.shape[0] * d_ax.shape[1]))
    return float(greater.mean())


def _collapse(cells: dict[tuple, float]) -> float | None:
    """Cells keyed (phone_a, phone_b, speaker(s), context) → mean over context, then speakers, then phone pairs."""
    if not cells:
        return None
    by_speaker: dict[tuple, list[float]] = defaultdict(list)
    for (a, b, speakers, _context), score in cells.items():
        by_speaker[a, b, speakers].append(score)
    by_pair: dict[tuple, list[float]] = defaultdict(list)
    for (a, b, _speakers), scores in by_speaker.items():
        by_pair[a, b].append(sum(scores) / len(scores))
    means = [sum(s) / len(s) for s in by_pair.values()]
    return sum(means) / len(means)


def abx_error_rate(features: Sequence[Tensor], items: Sequence[Item], *,
                   speaker: Literal["within", "across"] = "within",
                   context: Literal["within", "any"] = "within") -> float | None:  # fmt: skip
    """ABX error rate (0 to 1) of items with their frames `features[i]` (frames, D); None when no triple exists."""
    if len(features) != len(items):
        raise ValueError(f"{len(features)} feature sequences for {len(items)} items")
    if speaker not in ("within", "across") or context not in ("within", "any"):
        raise ValueError(f"speaker must be 'within' or 'across' and context 'within' or 'any', got {speaker!r}, "
                         f"{context!r}")  # fmt: skip
    groups: dict[tuple, list[int]] = defaultdict(list)  # the items that may meet in one triple
    for index, item in enumerate(items):
        ctx = (item.prev, item.next) if context == "within" else ()
        groups[(ctx, item.speaker) if speaker == "within" else (ctx,)].append(index)
    cells: dict[tuple, float] = {}
    for key, members in groups.items():
        by_class: dict[tuple, list[int]] = defaultdict(list)  # (phone, speaker) → positions in `members`
        for position, index in enumerate(members):
            by_class[items[index].phone, items[index].speaker].append(position)
        if len({phone for phone, _ in by_class}) < 2:
            continue
        distances = dtw_distances([features[i] for i in members], [features[i] for i in members])
        for (a, spk_a), pos_a in by_class.items():
            for (b, spk_b), pos_b in by_class.items():
                if a == b or spk_a != spk_b:
                    continue
                if speaker == "within":
                    if len(pos_a) > 1:
                        d_ax = distances[pos_a][:, pos_a]
                        cells[a, b, spk_a, key] = _errors(d_ax, distances[pos_b][:, pos_a], same_a_x=True)
                    continue
                for (x, spk_x), pos_x in by_class.items():
                    if x == a and spk_x != spk_a:
                        d_ax, d_bx = distances[pos_a][:, pos_x], distances[pos_b][:, pos_x]
                        cells[a, b, (spk_a, spk_x), key] = _errors(d_ax, d_bx, same_a_x=False)
    return _collapse(cells)


def item_features(features: dict[str, Tensor], items: Sequence[Item],
                  frequency: float) -> tuple[list[Tensor], list[Item]]:  # fmt: skip
    """The frames of every item that has at least two (`frame_span`), and those items; `features` maps a file id
    to its (frames, D) features. A file missing from `features` is an error that names it."""
    selected, kept = [], []
    for item in items:
        if item.fileid not in features:
            raise ValueError(f"item file names {item.fileid!r}, which has no features (not in the manifest?)")
        span = frame_span(item.onset, item.offset, frequency, len(features[item.fileid]))
        if span is not None:
            selected.append(features[item.fileid][span])
            kept.append(item)
    return selected, kept


def fastabx_error_rate(item_file: Path, root: Path, *, speaker: str, context: str, frequency: float) -> float:
    """The reference implementation on features saved as root/<fileid>.pt (needs `fastabx`, Python >= 3.12)."""
    from fastabx import zerospeech_abx

    return float(zerospeech_abx(item_file, root, speaker=speaker, context=context, distance="angular",
                                frequency=frequency, max_size_group=None, max_x_across=None))  # fmt: skip


def fastabx_available() -> bool:
    try:
        import fastabx  # noqa: F401
    except ImportError:
        return False
    return True
