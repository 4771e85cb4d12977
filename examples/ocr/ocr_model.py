"""nano-ocr's pretrained CRNN in torch, its preprocessing and CTC decoding.

PyPI ``nano-ocr`` 0.1.0 ships a CRNN (seven convolutions, a bidirectional LSTM 512 -> 256 and a
Linear 512 -> 66) as a torch state_dict, ``nano_ocr/model/nano_ocr_ftr.pth`` (4.8M parameters).
This module

* finds that file without importing ``nano_ocr`` (its ``__init__`` imports torchvision, which is
  not needed): :func:`find_weights`;
* builds the same network from standard torch layers (parameter names identical to the
  package's, so its state_dict loads strictly) and loads the weights with
  ``torch.load(weights_only=True)`` (plain tensors; nothing is unpickled): :func:`load_crnn`;
* prepares an image as the package does (grayscale, resized to 128 x 32 with bilinear
  interpolation, scaled to [-1, 1]): :func:`preprocess`, with PIL instead of torchvision;
* decodes greedy CTC (blank 0, repeats merged): :func:`ctc_decode`.

The model: input (N, 1, 32, 128) -> conv features (N, 512, 1, 33) -> 33 frames of 512 -> BiLSTM
(hidden 256 each way; 4 weight matrices, 1,572,864 weights) -> Linear 512 -> 66 classes (blank +
``0-9 a-z A-Z . - space``) -> logits (33, N, 66), time first (CTC's layout).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["CHARS", "CRNN", "ctc_decode", "find_weights", "load_crnn", "preprocess", "read"]

INSTALL_HINT = "pip install --no-deps nano-ocr==0.1.0"
CHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.- "
HEIGHT, WIDTH = 32, 128


def find_weights() -> Path:
    """Path of ``nano_ocr_ftr.pth`` inside the installed package (found with ``find_spec``,
    which does not run the package's ``__init__``). FileNotFoundError with the install command
    when nano-ocr is not installed."""
    spec = importlib.util.find_spec("nano_ocr")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        locations = [os.path.join(p, "nano_ocr") for p in sys.path if p]
    for location in locations:
        path = Path(location) / "model" / "nano_ocr_ftr.pth"
        if path.is_file():
            return path
    raise FileNotFoundError(f"nano-ocr's weights were not found: install the package without its dependencies "
                            f"(torchvision is not needed): `{INSTALL_HINT}`")


class CRNN(nn.Module):
    """nano-ocr's network with standard layers; ``cnn``, ``rnn`` (nn.LSTM 512 -> 256,
    bidirectional, batch_first) and ``fc`` are replaceable by modules with the same interface."""

    def __init__(self, num_classes: int = len(CHARS) + 1) -> None:
        super().__init__()
        self.cnn = nn.Sequential(
            nn.Conv2d(1, 64, 3, padding=1), nn.ReLU(True), nn.MaxPool2d(2, 2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(True), nn.MaxPool2d(2, 2),
            nn.Conv2d(128, 256, 3, padding=1), nn.BatchNorm2d(256), nn.ReLU(True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(True), nn.MaxPool2d((2, 2), (2, 1), (0, 1)),
            nn.Conv2d(256, 512, 3, padding=1), nn.BatchNorm2d(512), nn.ReLU(True), nn.MaxPool2d((2, 2), (2, 1), (0, 1)),
            nn.Conv2d(512, 512, 2, padding=0), nn.BatchNorm2d(512), nn.ReLU(True))
        self.rnn = nn.LSTM(512, 256, bidirectional=True, batch_first=True)
        self.fc = nn.Linear(512, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Conv features as a sequence: (N, 1, 32, 128) -> (N, 33, 512)."""
        return self.cnn(x).squeeze(2).permute(0, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (T=33, N, 66) for images (N, 1, 32, 128) in [-1, 1]."""
        out, _ = self.rnn(self.features(x))
        return self.fc(out).permute(1, 0, 2)


def load_crnn() -> CRNN:
    """nano-ocr's pretrained CRNN, float32, eval mode, CPU."""
    state = torch.load(find_weights(), map_location="cpu", weights_only=True)
    model = CRNN()
    model.load_state_dict(state, strict=True)
    return model.float().eval()


def preprocess(images: Sequence) -> Tensor:
    """PIL images -> (N, 1, 32, 128) float32 in [-1, 1]: grayscale, bilinear resize to 128 x 32,
    /255, (x - 0.5) / 0.5 (nano-ocr's transform, computed with PIL and numpy)."""
    from PIL import Image  # examples only

    arrays = [np.asarray(img.convert("L").resize((WIDTH, HEIGHT), Image.BILINEAR), dtype=np.float32) / 255.0
              for img in images]
    batch = torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros(0, HEIGHT, WIDTH)
    return ((batch - 0.5) / 0.5).unsqueeze(1)


def ctc_decode(logits: Tensor) -> list[str]:
    """Greedy CTC: argmax per frame, repeats merged, blanks (0) dropped. logits (T, N, C)."""
    best = logits.argmax(-1).T.tolist()  # (N, T)
    texts = []
    for seq in best:
        chars, prev = [], 0
        for token in seq:
            if token != 0 and token != prev:
                chars.append(CHARS[token - 1] if token - 1 < len(CHARS) else "")
            prev = token
        texts.append("".join(chars))
    return texts


@torch.no_grad()
def read(model: nn.Module, images: Tensor, batch_size: int = 256) -> list[str]:
    """Text read by ``model`` from preprocessed images (N, 1, 32, 128), in batches."""
    model.eval()
    out: list[str] = []
    for start in range(0, images.shape[0], batch_size):
        out += ctc_decode(model(images[start:start + batch_size]))
    return out
