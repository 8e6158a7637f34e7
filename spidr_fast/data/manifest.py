"""Manifests: the fairseq TSV (a root line, then `relative_path<TAB>num_samples`) and the official spidr CSV
(`fileid,path,num_samples`). `python -m spidr_fast.data.manifest AUDIO_DIR -o train.tsv` writes a TSV."""

import argparse
import csv
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

logger = logging.getLogger(__name__)
AUDIO_SUFFIXES = (".flac", ".wav")


class Entry(NamedTuple):
    fileid: str
    path: Path
    num_samples: int


def read_manifest(path: str | Path) -> list[Entry]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        raise ValueError(f"manifest {path} is empty")
    try:
        if lines[0].replace(" ", "").startswith("fileid,path,num_samples"):
            return [Entry(row["fileid"], Path(row["path"]), int(row["num_samples"])) for row in csv.DictReader(lines)]
        root = Path(lines[0].strip())
        entries = []
        for line in lines[1:]:
            if line.strip():
                relative, num_samples = line.rstrip("\n").split("\t")[:2]
                entries.append(Entry(Path(relative).stem, root / relative, int(num_samples)))
        return entries
    except (ValueError, KeyError) as error:
        raise ValueError(
            f"manifest {path}: expected a fairseq TSV (root line, then path<TAB>num_samples) or a CSV with header "
            f"fileid,path,num_samples ({error})"
        ) from error


def _info(path: Path) -> int | None:
    import soundfile

    try:
        return soundfile.info(str(path)).frames
    except (RuntimeError, soundfile.LibsndfileError) as error:
        logger.warning("skipping unreadable audio file %s: %s", path, error)
        return None


def write_manifest(audio_dir: str | Path, output: str | Path, *, workers: int | None = None) -> int:
    """Write a fairseq TSV of every readable .flac/.wav below `audio_dir`; returns the number of files listed."""
    from tqdm import tqdm

    root = Path(audio_dir).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"audio folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
    with ThreadPoolExecutor(workers or min(32, (os.cpu_count() or 1) * 4)) as pool:
        lengths = list(tqdm(pool.map(_info, files), total=len(files), desc="reading audio headers", unit="file"))
    rows = [f"{p.relative_to(root)}\t{n}" for p, n in zip(files, lengths, strict=True) if n]
    Path(output).write_text("\n".join([str(root), *rows]) + "\n", encoding="utf-8")
    return len(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m spidr_fast.data.manifest", description=__doc__)
    parser.add_argument("audio_dir", help="folder searched recursively for .flac and .wav files")
    parser.add_argument("-o", "--output", required=True, help="manifest to write (fairseq TSV)")
    parser.add_argument("--workers", type=int, default=None, help="parallel header readers")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    count = write_manifest(args.audio_dir, args.output, workers=args.workers)
    print(f"wrote {count} files to {args.output}")


if __name__ == "__main__":
    main()
