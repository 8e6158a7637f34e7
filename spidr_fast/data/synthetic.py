"""A procedural, deterministic speech-like corpus with frame labels, so that training runs with no data at all.

About 30 phone-like units with distinct spectra — vowels (formant triples), nasals, fricatives (shaped noise),
stops (closure then burst) and silence — spoken by several speakers (pitch, vocal-tract scaling, speaking rate),
with random durations and coarticulated formant transitions. 16 kHz audio, one label every 10 ms.
Utterance `i` of a corpus depends only on (seed, i): any worker can make any utterance in any order.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

SAMPLE_RATE = 16_000
LABEL_HOP = 160  # samples per 10 ms label


class Phone(NamedTuple):
    name: str
    kind: str  # vowel | nasal | fricative | stop | silence
    formants: tuple[float, float, float] = (0.0, 0.0, 0.0)  # Hz, voiced kinds
    noise_band: tuple[float, float] = (0.0, 0.0)  # centre and width in Hz, fricatives and stop bursts
    voiced: bool = False


PHONES: tuple[Phone, ...] = (
    Phone("sil", "silence"),
    *(
        Phone(n, "vowel", f, voiced=True)
        for n, f in [
            ("iy", (270, 2290, 3010)),
            ("ih", (390, 1990, 2550)),
            ("eh", (530, 1840, 2480)),
            ("ae", (660, 1720, 2410)),
            ("aa", (730, 1090, 2440)),
            ("ao", (570, 840, 2410)),
            ("uh", (440, 1020, 2240)),
            ("uw", (300, 870, 2240)),
            ("ah", (640, 1190, 2390)),
            ("er", (490, 1350, 1690)),
            ("ey", (480, 2100, 2700)),
            ("ow", (500, 900, 2300)),
        ]
    ),
    *(
        Phone(n, "nasal", f, voiced=True)
        for n, f in [("m", (250, 1100, 2200)), ("n", (250, 1600, 2600)), ("ng", (250, 2000, 2800))]
    ),
    *(
        Phone(n, "fricative", noise_band=b, voiced=v)
        for n, b, v in [
            ("s", (6000, 2500), False),
            ("sh", (3500, 1500), False),
            ("f", (5000, 5000), False),
            ("th", (4500, 4000), False),
            ("h", (1500, 2000), False),
            ("z", (6000, 2500), True),
            ("zh", (3500, 1500), True),
            ("v", (4000, 4000), True),
        ]
    ),
    *(
        Phone(n, "stop", noise_band=b, voiced=v)
        for n, b, v in [
            ("p", (800, 1200), False),
            ("t", (4500, 3000), False),
            ("k", (2200, 1500), False),
            ("b", (800, 1200), True),
            ("d", (4500, 3000), True),
            ("g", (2200, 1500), True),
        ]
    ),
)
PHONE_NAMES = tuple(p.name for p in PHONES)
# Mean duration of each kind, in 10 ms frames, before the speaker's rate.
_MEAN_FRAMES = {"vowel": 11, "nasal": 7, "fricative": 10, "stop": 8, "silence": 15}


@dataclass(frozen=True)
class Speaker:
    pitch: float  # Hz
    tract_scale: float  # multiplies every formant
    rate: float  # multiplies every duration


@dataclass(frozen=True)
class SyntheticCorpus:
    """`num_utterances` utterances of `min_seconds` to `max_seconds` by `num_speakers` speakers."""

    num_utterances: int = 512
    num_speakers: int = 8
    min_seconds: float = 2.0
    max_seconds: float = 4.0
    seed: int = 0

    def speaker(self, index: int) -> Speaker:
        rng = np.random.default_rng([self.seed, 1, index])
        female = index % 2 == 1
        return Speaker(
            pitch=float(rng.uniform(170, 250) if female else rng.uniform(90, 140)),
            tract_scale=float(rng.uniform(1.05, 1.2) if female else rng.uniform(0.9, 1.02)),
            rate=float(rng.uniform(0.8, 1.25)),
        )

    def speaker_of(self, utterance: int) -> int:
        return utterance % self.num_speakers

    def labels(self, utterance: int) -> np.ndarray:
        """Phone index of every 10 ms frame, (frames,) int64."""
        rng = np.random.default_rng([self.seed, 2, utterance])
        rate = self.speaker(self.speaker_of(utterance)).rate
        target = int(rng.uniform(self.min_seconds, self.max_seconds) * SAMPLE_RATE / LABEL_HOP)
        labels, previous = [], -1
        while len(labels) < target:
            phone = 0 if not labels else int(rng.integers(1, len(PHONES)))
            if phone == previous:
                continue
            frames = max(3, round(rng.gamma(6.0, _MEAN_FRAMES[PHONES[phone].kind] / 6.0) * rate))
            labels += [phone] * frames
            previous = phone
        labels = labels[: target - 10] + [0] * 10  # end on silence
        return np.asarray(labels, dtype=np.int64)

    def num_samples(self, utterance: int) -> int:
        return len(self.labels(utterance)) * LABEL_HOP

    def waveform(self, utterance: int) -> np.ndarray:
        """(samples,) float32 in [-1, 1]."""
        return _synthesize(
            self.labels(utterance),
            self.speaker(self.speaker_of(utterance)),
            np.random.default_rng([self.seed, 3, utterance]),
        )

    def write(self, out_dir: str | Path, audio_format: str = "wav") -> Path:
        """Write 16-bit audio files (`audio_format`: wav or flac), `alignments.jsonl` (phones every 10 ms) and a
        fairseq manifest; returns the manifest."""
        import soundfile

        if audio_format not in ("wav", "flac"):
            raise ValueError(f"audio_format must be 'wav' or 'flac', got {audio_format!r}")
        out = Path(out_dir)
        (out / audio_format).mkdir(parents=True, exist_ok=True)
        rows, alignments = [str(out.resolve())], []
        for i in range(self.num_utterances):
            name = f"utt{i:05d}"
            waveform = self.waveform(i)
            soundfile.write(out / audio_format / f"{name}.{audio_format}", waveform, SAMPLE_RATE, subtype="PCM_16")
            rows.append(f"{audio_format}/{name}.{audio_format}\t{len(waveform)}")
            phones = [PHONE_NAMES[p] for p in self.labels(i)]
            alignments.append(json.dumps({"fileid": name, "speaker": f"spk{self.speaker_of(i)}", "phones": phones}))
        (out / "alignments.jsonl").write_text("\n".join(alignments) + "\n", encoding="utf-8")
        manifest = out / "manifest.tsv"
        manifest.write_text("\n".join(rows) + "\n", encoding="utf-8")
        return manifest


def _smooth(track: np.ndarray, width: int) -> np.ndarray:
    """Moving average along time (axis 0): the coarticulation between neighbouring phones."""
    kernel = np.ones(width) / width
    padded = np.pad(track, ((width // 2, width - 1 - width // 2),) + ((0, 0),) * (track.ndim - 1), mode="edge")
    return np.stack([np.convolve(padded[:, j], kernel, mode="valid") for j in range(track.shape[1])], axis=1)


def _band_noise(rng: np.random.Generator, num: int, centre: float, width: float) -> np.ndarray:
    if num == 0:  # a stop cut short at the end of an utterance has no burst
        return np.zeros(0)
    spectrum = np.fft.rfft(rng.standard_normal(num))
    freqs = np.fft.rfftfreq(num, 1 / SAMPLE_RATE)
    noise = np.fft.irfft(spectrum * np.exp(-0.5 * ((freqs - centre) / (width / 2)) ** 2), num)
    return noise / (noise.std() + 1e-8)


def _synthesize(labels: np.ndarray, speaker: Speaker, rng: np.random.Generator) -> np.ndarray:
    num_frames = len(labels)
    phones = [PHONES[p] for p in labels]
    formants = np.array([p.formants for p in phones], dtype=np.float64) * speaker.tract_scale
    voicing = np.array([1.0 if p.kind in ("vowel", "nasal") else 0.3 if p.voiced else 0.0 for p in phones])
    loudness = np.array([0.5 if p.kind == "nasal" else 1.0 for p in phones])
    # Hold the neighbours' formants through unvoiced frames so that transitions glide between voiced phones.
    voiced = formants[:, 0] > 0
    if voiced.any():
        idx = np.maximum.accumulate(np.where(voiced, np.arange(num_frames), 0))
        first = int(np.argmax(voiced))
        formants = formants[np.where(voiced | (np.arange(num_frames) >= first), idx, first)]
    formants = _smooth(formants, 5)
    voicing = _smooth(voicing[:, None], 3)[:, 0] * loudness

    samples = num_frames * LABEL_HOP
    frame_time = (np.arange(num_frames) + 0.5) * LABEL_HOP
    sample_time = np.arange(samples)
    pitch_track = speaker.pitch * (1 + 0.08 * np.sin(2 * np.pi * np.arange(num_frames) / rng.uniform(40, 90)))
    pitch = np.interp(sample_time, frame_time, pitch_track * (1 + 0.01 * rng.standard_normal(num_frames)))
    phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE

    # Voiced source: harmonics of the pitch weighted by a three-formant envelope, evaluated per frame.
    harmonics = np.arange(1, int(SAMPLE_RATE / 2 / speaker.pitch * 0.85))
    harmonic_freqs = harmonics[None, :] * pitch_track[:, None]  # (frames, H)
    envelope = (
        sum(
            gain / (1 + ((harmonic_freqs - formants[:, [j]]) / (60 + 0.05 * formants[:, [j]])) ** 2)
            for j, gain in enumerate((1.0, 0.6, 0.3))
        )
        * voicing[:, None]
        / np.sqrt(harmonics)[None, :]
    )
    amplitudes = np.stack([np.interp(sample_time, frame_time, envelope[:, h]) for h in range(len(harmonics))], axis=1)
    signal = (amplitudes * np.sin(phase[:, None] * harmonics[None, :])).sum(1)

    # Noise: frication for whole fricatives, a closure then a burst for stops, a floor everywhere.
    boundaries = np.flatnonzero(np.diff(labels)) + 1
    for start, end in zip(np.r_[0, boundaries], np.r_[boundaries, num_frames], strict=True):
        phone = phones[start]
        if phone.kind == "fricative":
            segment = slice(start * LABEL_HOP, end * LABEL_HOP)
            ramp = np.minimum(
                1,
                np.minimum(np.arange(segment.stop - segment.start), np.arange(segment.stop - segment.start)[::-1])
                / 240,
            )
            signal[segment] += 0.25 * ramp * _band_noise(rng, segment.stop - segment.start, *phone.noise_band)
        elif phone.kind == "stop":
            closure_end = start + max(1, (end - start) * 2 // 3)
            signal[start * LABEL_HOP : closure_end * LABEL_HOP] *= 0.05
            burst = slice(closure_end * LABEL_HOP, end * LABEL_HOP)
            decay = np.exp(-np.arange(burst.stop - burst.start) / 200)
            signal[burst] += 0.5 * decay * _band_noise(rng, burst.stop - burst.start, *phone.noise_band)
    signal += 0.003 * rng.standard_normal(samples)
    return (0.9 * signal / (np.abs(signal).max() + 1e-8)).astype(np.float32)
