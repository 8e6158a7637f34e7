"""The built-in ABX against fastabx on the same features of the synthetic corpus, in the four ZeroSpeech modes.

    python benchmarks/abx_parity.py     # needs fastabx: Python >= 3.12, pip install -e ".[abx]"; ~3 min on a CPU
    python benchmarks/abx_parity.py --utterances 128 --utterances-any 8      # ~1 min

Features, computed here from the waveforms so that no model is involved: log-mel (40 bands, 25 ms windows) at
100 Hz, MFCC (13 coefficients of the log-mel) at 50 Hz, and one-hot k-means units of the MFCC at 50 Hz (the ties
of discrete units test the tie rule). Items come from the corpus labels; both implementations score the items
`abx.item_features` keeps, with no subsampling. Prints a Markdown table of error rates (%) and seconds.

Two corpus sizes: the corpus's random phone sequences rarely repeat a context, so "context within" needs a few
hundred utterances to have cells, while "context any" compares every item with every other one (the built-in's DTW
loops over frame pairs in Python: about 5 s for 240 items on one CPU thread, growing with the square).
"""

import time

import torch

from spidr_fast import abx
from spidr_fast.cli import ArgumentParser
from spidr_fast.baseline import kmeans_units, log_mel, mfcc
from spidr_fast.data.synthetic import LABEL_HOP, PHONE_NAMES, SAMPLE_RATE, SyntheticCorpus


def corpus_features(utterances: int, num_units: int) -> tuple[dict[str, tuple[float, dict]], list[abx.Item]]:
    """{name: (frequency, {fileid: (frames, D)})} and the items of the corpus labels."""
    corpus = SyntheticCorpus(num_utterances=utterances, seed=3)
    names = [f"utt{i:05d}" for i in range(utterances)]
    items, mel, cepstra = [], {}, {}
    for i, name in enumerate(names):
        waveform = torch.from_numpy(corpus.waveform(i)).float()
        mel[name], cepstra[name] = log_mel(waveform, LABEL_HOP), mfcc(waveform, 2 * LABEL_HOP)
        phones = [PHONE_NAMES[p] for p in corpus.labels(i)]
        items += abx.items_from_alignment(name, f"spk{corpus.speaker_of(i)}", phones)
    units = kmeans_units(torch.cat(list(cepstra.values())), num_units).split([len(c) for c in cepstra.values()])
    one_hot = {name: torch.nn.functional.one_hot(u, num_units).float() for name, u in zip(names, units, strict=True)}
    rate = SAMPLE_RATE / LABEL_HOP
    features = {
        "log-mel 100 Hz": (rate, mel),
        "MFCC 50 Hz": (rate / 2, cepstra),
        f"{num_units} units 50 Hz": (rate / 2, one_hot),
    }
    return features, items


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--utterances", type=int, default=256, help="synthetic utterances (2-4 s) for context within")
    parser.add_argument("--utterances-any", type=int, default=16, help="synthetic utterances for context any")
    parser.add_argument("--units", type=int, default=32, help="k-means units")
    args = parser.parse_args(argv)
    if not abx.fastabx_available():
        raise SystemExit("fastabx is not importable: it needs Python >= 3.12 (pip install -e '.[abx]')")
    torch.set_num_threads(1)  # the built-in's many small ops: threads only add contention on a shared CPU
    print(
        "| features | speaker | context | utterances | items scored | built-in % | fastabx % | difference | "
        "built-in s | fastabx s |\n" + "| --- " * 10 + "|"
    )
    for context, utterances in (("within", args.utterances), ("any", args.utterances_any)):
        features, items = corpus_features(utterances, args.units)
        for name, (frequency, store) in features.items():
            selected, kept = abx.item_features(store, items, frequency)
            for speaker in ("within", "across"):
                start = time.perf_counter()
                builtin = abx.abx_error_rate(selected, kept, speaker=speaker, context=context)
                middle = time.perf_counter()
                fast = abx.fastabx_error_rates(store, kept, frequency, context=context, speakers=[speaker])[speaker]
                end = time.perf_counter()
                used = len(abx.cell_items(abx.abx_cells(kept, speaker=speaker, context=context)))
                scores = (
                    "no cell | no cell | |"
                    if builtin is None
                    else (f"{100 * builtin:.4f} | {100 * fast:.4f} | {100 * (builtin - fast):+.1e} |")
                )
                print(
                    f"| {name} | {speaker} | {context} | {utterances} | {used} of {len(kept)} | {scores} "
                    f"{middle - start:.1f} | {end - middle:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
