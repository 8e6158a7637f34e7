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

import argparse
import math
import time

import torch

from spidr_fast import abx
from spidr_fast.data.synthetic import LABEL_HOP, PHONE_NAMES, SAMPLE_RATE, SyntheticCorpus


def mel_filterbank(num_bands: int, n_fft: int) -> torch.Tensor:
    """(num_bands, n_fft // 2 + 1) triangular filters evenly spaced on the HTK mel scale up to Nyquist."""
    mel = torch.linspace(0, 2595 * math.log10(1 + SAMPLE_RATE / 2 / 700), num_bands + 2)
    edges = 700 * (10 ** (mel / 2595) - 1)
    bins = torch.linspace(0, SAMPLE_RATE / 2, n_fft // 2 + 1)
    rising = (bins[None] - edges[:-2, None]) / (edges[1:-1, None] - edges[:-2, None])
    falling = (edges[2:, None] - bins[None]) / (edges[2:, None] - edges[1:-1, None])
    return rising.minimum(falling).clamp(min=0)


def log_mel(waveform: torch.Tensor, hop: int, num_bands: int = 40, n_fft: int = 400) -> torch.Tensor:
    """(frames, num_bands) log mel energies, one frame every `hop` samples."""
    spectrum = torch.stft(waveform, n_fft, hop, window=torch.hann_window(n_fft), return_complex=True).abs() ** 2
    return (mel_filterbank(num_bands, n_fft) @ spectrum + 1e-6).log().T


def mfcc(waveform: torch.Tensor, hop: int, num_coefficients: int = 13) -> torch.Tensor:
    bands = log_mel(waveform, hop)
    n = torch.arange(bands.shape[1])
    dct = torch.cos(math.pi / bands.shape[1] * (n[None] + 0.5) * torch.arange(num_coefficients)[:, None])
    return bands @ dct.T


def kmeans_units(frames: torch.Tensor, num_units: int, iterations: int = 20, seed: int = 0) -> torch.Tensor:
    """Unit of every frame from Lloyd's k-means started on random frames."""
    g = torch.Generator().manual_seed(seed)
    centroids = frames[torch.randperm(len(frames), generator=g)[:num_units]].clone()
    for _ in range(iterations):
        units = torch.cdist(frames, centroids).argmin(1)
        for k in range(num_units):
            if (units == k).any():
                centroids[k] = frames[units == k].mean(0)
    return torch.cdist(frames, centroids).argmin(1)


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
    features = {"log-mel 100 Hz": (rate, mel), "MFCC 50 Hz": (rate / 2, cepstra),
                f"{num_units} units 50 Hz": (rate / 2, one_hot)}  # fmt: skip
    return features, items


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--utterances", type=int, default=256, help="synthetic utterances (2-4 s) for context within")
    parser.add_argument("--utterances-any", type=int, default=16, help="synthetic utterances for context any")
    parser.add_argument("--units", type=int, default=32, help="k-means units")
    args = parser.parse_args(argv)
    if not abx.fastabx_available():
        raise SystemExit("fastabx is not importable: it needs Python >= 3.12 (pip install -e '.[abx]')")
    torch.set_num_threads(1)  # the built-in's many small ops: threads only add contention on a shared CPU
    print("| features | speaker | context | utterances | items scored | built-in % | fastabx % | difference | "
          "built-in s | fastabx s |\n" + "| --- " * 10 + "|")  # fmt: skip
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
                scores = "no cell | no cell | |" if builtin is None else (
                    f"{100 * builtin:.4f} | {100 * fast:.4f} | {100 * (builtin - fast):+.1e} |")
                print(f"| {name} | {speaker} | {context} | {utterances} | {used} of {len(kept)} | {scores} "
                      f"{middle - start:.1f} | {end - middle:.1f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
