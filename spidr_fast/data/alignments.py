"""Phone alignments: JSONL, one record per file, {"fileid", "phones": [one phone name per 10 ms], "speaker"?}
(the official spidr layout; `SyntheticCorpus.write` writes the same)."""

import json
from pathlib import Path
from typing import Any


def read_alignments(path: str | Path) -> dict[str, dict[str, Any]]:
    """fileid → record."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"alignments not found: {path}")
    records = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            records[record["fileid"]] = record
            record["phones"]  # noqa: B018 - every record needs its phones
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(
                f"{path}, line {number}: expected a JSON record with fileid and phones ({error})"
            ) from error
    return records
