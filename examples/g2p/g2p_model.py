"""g2p-en's pretrained GRU encoder-decoder, in numpy (reference) and in torch.

g2p-en 2.1.0 (https://github.com/Kyubyong/g2p, PyPI ``g2p-en``) ships a small
grapheme-to-phoneme model as numpy weights, ``checkpoint20.npz`` (834,890 float32
parameters), and runs it with a hand-written numpy GRU. This module

* finds that file without importing ``g2p_en`` (its ``__init__`` imports nltk and tries
  to download NLTK data, which fails offline): :func:`find_checkpoint`;
* ports g2p-en's numpy inference line by line: :func:`numpy_predict`;
* loads the same weights into a torch module built from standard layers
  (``nn.Embedding``, ``nn.GRU``, ``nn.Linear``): :class:`G2PModel`, :func:`load_g2p`.

The model (sizes from the checkpoint; the comments in g2p-en's source say 64/128, which
are stale)::

    graphemes (29): <pad> <unk> </s> a..z         enc_emb  29 x 256
    encoder GRU 256 -> 256 over the letters followed by </s>
    decoder GRU 256 -> 256, h0 = encoder state after </s>, first input <s>
    phonemes (74): <pad> <unk> <s> </s> + 70 ARPAbet symbols   dec_emb 74 x 256
    fc Linear 256 -> 74, greedy argmax, stops at </s> or after 20 steps

GRU formulation. g2p-en's cell is::

    r, z = sigmoid(W_ih[:2H] x + b_ih[:2H] + W_hh[:2H] h + b_hh[:2H])   (r first, then z)
    n    = tanh(W_ih[2H:] x + b_ih[2H:] + r * (W_hh[2H:] h + b_hh[2H:]))
    h'   = (1 - z) * n + z * h

which is *exactly* torch.nn.GRU's (same gate order r, z, n; b_hn inside the reset
product; same interpolation h' = (1-z) n + z h). The weights therefore map one to one,
``weight_ih_l0 = enc_w_ih`` etc., with no reordering: g2p-en's model was trained in torch
and exported.

Only torch, numpy and the standard library are used.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "GRAPHEMES",
    "PHONEMES",
    "G2PModel",
    "find_checkpoint",
    "load_g2p",
    "load_weights",
    "numpy_predict",
]

INSTALL_HINT = "pip install --no-deps g2p-en==2.1.0"

# Vocabularies, copied from g2p_en/g2p.py (G2p.__init__). Note the bare "UW" (index 66)
# next to UW0/UW1/UW2: CMUdict never uses it, g2p-en's list has it anyway.
GRAPHEMES: list[str] = ["<pad>", "<unk>", "</s>"] + list("abcdefghijklmnopqrstuvwxyz")
PHONEMES: list[str] = ["<pad>", "<unk>", "<s>", "</s>"] + [
    "AA0", "AA1", "AA2", "AE0", "AE1", "AE2", "AH0", "AH1", "AH2", "AO0",
    "AO1", "AO2", "AW0", "AW1", "AW2", "AY0", "AY1", "AY2", "B", "CH", "D", "DH",
    "EH0", "EH1", "EH2", "ER0", "ER1", "ER2", "EY0", "EY1",
    "EY2", "F", "G", "HH",
    "IH0", "IH1", "IH2", "IY0", "IY1", "IY2", "JH", "K", "L",
    "M", "N", "NG", "OW0", "OW1",
    "OW2", "OY0", "OY1", "OY2", "P", "R", "S", "SH", "T", "TH",
    "UH0", "UH1", "UH2", "UW",
    "UW0", "UW1", "UW2", "V", "W", "Y", "Z", "ZH"]
G2IDX = {g: i for i, g in enumerate(GRAPHEMES)}
P2IDX = {p: i for i, p in enumerate(PHONEMES)}
G_PAD, G_UNK, G_EOS = 0, 1, 2
P_PAD, P_UNK, P_BOS, P_EOS = 0, 1, 2, 3
MAX_LEN = 20  # g2p-en's decoding limit

WEIGHT_NAMES = ("enc_emb", "enc_w_ih", "enc_w_hh", "enc_b_ih", "enc_b_hh",
                "dec_emb", "dec_w_ih", "dec_w_hh", "dec_b_ih", "dec_b_hh", "fc_w", "fc_b")


# ----------------------------------------------------------------------------- checkpoint


def find_checkpoint() -> Path:
    """Path of g2p-en's ``checkpoint20.npz`` inside the installed package.

    The package is located with ``importlib.util.find_spec`` on the top-level name, which
    does not execute ``g2p_en/__init__.py``. Raises FileNotFoundError with the install
    command when g2p-en is not installed."""
    spec = importlib.util.find_spec("g2p_en")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:  # fall back to a plain scan of sys.path (e.g. odd import hooks)
        locations = [os.path.join(p, "g2p_en") for p in sys.path if p]
    for location in locations:
        path = Path(location) / "checkpoint20.npz"
        if path.is_file():
            return path
    raise FileNotFoundError(
        "g2p-en's checkpoint20.npz was not found: install the package without its "
        f"dependencies (nltk, inflect are not needed): `{INSTALL_HINT}`")


@lru_cache(maxsize=1)
def load_weights() -> dict[str, np.ndarray]:
    """The 12 float32 arrays of ``checkpoint20.npz`` (read once, cached; do not mutate).

    Shapes: enc_emb (29, 256), enc_w_ih / enc_w_hh (768, 256), enc_b_ih / enc_b_hh (768,),
    dec_emb (74, 256), dec_w_ih / dec_w_hh (768, 256), dec_b_ih / dec_b_hh (768,),
    fc_w (74, 256), fc_b (74,)."""
    with np.load(find_checkpoint()) as npz:
        weights = {name: np.asarray(npz[name]) for name in WEIGHT_NAMES}
    for array in weights.values():
        array.setflags(write=False)
    return weights


# ----------------------------------------------------------------------------- numpy reference


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def _grucell(x: np.ndarray, h: np.ndarray, w_ih: np.ndarray, w_hh: np.ndarray,
             b_ih: np.ndarray, b_hh: np.ndarray) -> np.ndarray:
    """One GRU step, as g2p_en.G2p.grucell. x (B, E), h (B, H) -> h' (B, H)."""
    rzn_ih = np.matmul(x, w_ih.T) + b_ih
    rzn_hh = np.matmul(h, w_hh.T) + b_hh

    rz_ih, n_ih = rzn_ih[:, :rzn_ih.shape[-1] * 2 // 3], rzn_ih[:, rzn_ih.shape[-1] * 2 // 3:]
    rz_hh, n_hh = rzn_hh[:, :rzn_hh.shape[-1] * 2 // 3], rzn_hh[:, rzn_hh.shape[-1] * 2 // 3:]

    rz = _sigmoid(rz_ih + rz_hh)
    r, z = np.split(rz, 2, -1)

    n = np.tanh(n_ih + r * n_hh)
    return (1 - z) * n + z * h


def _gru(x: np.ndarray, steps: int, w_ih, w_hh, b_ih, b_hh, h0: np.ndarray | None = None) -> np.ndarray:
    """GRU over ``steps`` steps, as g2p_en.G2p.gru. x (B, T, E) -> outputs (B, steps, H)."""
    if h0 is None:
        h0 = np.zeros((x.shape[0], w_hh.shape[1]), np.float32)
    h = h0
    outputs = np.zeros((x.shape[0], steps, w_hh.shape[1]), np.float32)
    for t in range(steps):
        h = _grucell(x[:, t, :], h, w_ih, w_hh, b_ih, b_hh)
        outputs[:, t, ::] = h
    return outputs


def numpy_predict(word: str) -> list[str]:
    """Phonemes of ``word`` by g2p-en's own numpy routine (G2p.encode + G2p.predict).

    Faithful port: same float32 arrays, same operations in the same order, characters
    outside a-z map to <unk>, greedy decoding for at most 20 steps stopping at </s>.
    Only the model part of g2p-en (no text normalisation, no CMUdict lookup)."""
    v = load_weights()
    # encoder (G2p.encode)
    chars = list(word) + ["</s>"]
    x = [G2IDX.get(char, G2IDX["<unk>"]) for char in chars]
    x = np.take(v["enc_emb"], np.expand_dims(x, 0), axis=0)  # (1, len+1, 256)
    enc = _gru(x, len(word) + 1, v["enc_w_ih"], v["enc_w_hh"], v["enc_b_ih"], v["enc_b_hh"],
               h0=np.zeros((1, v["enc_w_hh"].shape[-1]), np.float32))
    last_hidden = enc[:, -1, :]

    # decoder
    dec = np.take(v["dec_emb"], [P_BOS], axis=0)  # (1, 256), <s>
    h = last_hidden
    preds = []
    for _ in range(MAX_LEN):
        h = _grucell(dec, h, v["dec_w_ih"], v["dec_w_hh"], v["dec_b_ih"], v["dec_b_hh"])
        logits = np.matmul(h, v["fc_w"].T) + v["fc_b"]
        pred = logits.argmax()
        if pred == P_EOS:
            break
        preds.append(pred)
        dec = np.take(v["dec_emb"], [pred], axis=0)
    return [PHONEMES[idx] if 0 <= idx < len(PHONEMES) else "<unk>" for idx in preds]


# ----------------------------------------------------------------------------- torch model


def encode_words(words: Sequence[str]) -> tuple[Tensor, Tensor]:
    """Grapheme ids of ``words`` followed by </s>, right-padded with <pad>.

    Returns ids (B, Lmax + 1) int64 and lengths (B,) int64, the length counting </s>.
    Characters outside a-z map to <unk>, as in g2p-en."""
    lengths = [len(w) + 1 for w in words]
    ids = torch.full((len(words), max(lengths, default=1)), G_PAD, dtype=torch.long)
    for i, word in enumerate(words):
        ids[i, :len(word) + 1] = torch.tensor([G2IDX.get(c, G_UNK) for c in word] + [G_EOS])
    return ids, torch.tensor(lengths, dtype=torch.long)


def phonemes_to_ids(phonemes: Sequence[str]) -> list[int]:
    """Phoneme ids; unknown symbols map to <unk>."""
    return [P2IDX.get(p, P_UNK) for p in phonemes]


def decoder_inputs(phoneme_seqs: Sequence[Sequence[str]]) -> tuple[Tensor, Tensor, Tensor]:
    """Teacher-forcing tensors for phoneme sequences.

    Returns inputs (B, T) = <s> p_1 .. p_n <pad>..., targets (B, T) = p_1 .. p_n </s> <pad>...
    and mask (B, T) bool (True on the n + 1 real positions), T = max n + 1."""
    seqs = [phonemes_to_ids(s) for s in phoneme_seqs]
    t = max((len(s) for s in seqs), default=0) + 1
    inputs = torch.full((len(seqs), t), P_PAD, dtype=torch.long)
    targets = torch.full((len(seqs), t), P_PAD, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.bool)
    for i, s in enumerate(seqs):
        inputs[i, :len(s) + 1] = torch.tensor([P_BOS] + s)
        targets[i, :len(s) + 1] = torch.tensor(s + [P_EOS])
        mask[i, :len(s) + 1] = True
    return inputs, targets, mask


class G2PModel(nn.Module):
    """g2p-en's GRU encoder-decoder with standard torch layers.

    Attributes (replaceable by modules with the same call interface, e.g. an MPO GRU or a
    dynamically quantized GRU; every forward path goes through them):
        enc_emb: nn.Embedding(29, 256)
        encoder: nn.GRU(256, 256, batch_first=True)
        dec_emb: nn.Embedding(74, 256)
        decoder: nn.GRU(256, 256, batch_first=True)
        fc: nn.Linear(256, 74)
    """

    def __init__(self, emb: int = 256, hidden: int = 256,
                 n_graphemes: int = len(GRAPHEMES), n_phonemes: int = len(PHONEMES)) -> None:
        super().__init__()
        self.enc_emb = nn.Embedding(n_graphemes, emb)
        self.encoder = nn.GRU(emb, hidden, batch_first=True)
        self.dec_emb = nn.Embedding(n_phonemes, emb)
        self.decoder = nn.GRU(emb, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, n_phonemes)

    @classmethod
    def from_npz(cls, weights: dict[str, np.ndarray] | None = None) -> G2PModel:
        """Model holding g2p-en's weights (float32). Torch's GRU gate layout (r, z, n rows;
        b_ih and b_hh separate, b_hn inside the reset product) is g2p-en's, so the arrays
        are copied as they are."""
        v = load_weights() if weights is None else weights
        emb, hidden = v["enc_emb"].shape[1], v["enc_w_hh"].shape[1]
        model = cls(emb, hidden, v["enc_emb"].shape[0], v["dec_emb"].shape[0])

        def t(name: str) -> Tensor:
            return torch.from_numpy(np.array(v[name], dtype=np.float32))

        with torch.no_grad():
            model.enc_emb.weight.copy_(t("enc_emb"))
            model.dec_emb.weight.copy_(t("dec_emb"))
            for prefix, gru in (("enc", model.encoder), ("dec", model.decoder)):
                gru.weight_ih_l0.copy_(t(f"{prefix}_w_ih"))
                gru.weight_hh_l0.copy_(t(f"{prefix}_w_hh"))
                gru.bias_ih_l0.copy_(t(f"{prefix}_b_ih"))
                gru.bias_hh_l0.copy_(t(f"{prefix}_b_hh"))
            model.fc.weight.copy_(t("fc_w"))
            model.fc.bias.copy_(t("fc_b"))
        return model

    def _device(self) -> torch.device:
        return self.enc_emb.weight.device

    def encode(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """Encoder state after each word's </s>.

        ids (B, L) int64 from :func:`encode_words`, lengths (B,) -> h (1, B, H).
        The padded batch runs through ``self.encoder`` whole; the state is read from the
        output at position length - 1 (a unidirectional GRU's output there does not depend
        on the padding after it), so no PackedSequence support is needed."""
        out, _ = self.encoder(self.enc_emb(ids))  # (B, L, H)
        rows = torch.arange(ids.shape[0], device=ids.device)
        return out[rows, lengths.to(ids.device) - 1].unsqueeze(0)

    def decode_logits(self, h0: Tensor, inputs: Tensor) -> Tensor:
        """Teacher-forced decoder: h0 (1, B, H), inputs (B, T) phoneme ids -> logits (B, T, V)."""
        out, _ = self.decoder(self.dec_emb(inputs), h0)
        return self.fc(out)

    def forward(self, ids: Tensor, lengths: Tensor, dec_inputs: Tensor) -> Tensor:
        """Logits (B, T, V) for grapheme ids (B, L), lengths (B,), decoder inputs (B, T)."""
        return self.decode_logits(self.encode(ids, lengths), dec_inputs)

    def teacher_forced_logits(self, words: Sequence[str], phonemes: Sequence[Sequence[str]]
                              ) -> tuple[Tensor, Tensor, Tensor]:
        """Logits for ``words`` with decoder inputs <s> + ``phonemes`` (one list per word).

        Returns logits (B, T, V), targets (B, T) (the phonemes then </s>) and mask (B, T)
        bool, T = longest phoneme list + 1; position t predicts the token after input t."""
        device = self._device()
        ids, lengths = encode_words(words)
        inputs, targets, mask = decoder_inputs(phonemes)
        logits = self(ids.to(device), lengths.to(device), inputs.to(device))
        return logits, targets.to(device), mask.to(device)

    @torch.no_grad()
    def predict_ids(self, words: Sequence[str], max_len: int = MAX_LEN) -> list[list[int]]:
        """Greedy decoding of one batch, as g2p-en: at most ``max_len`` steps, each word
        stopping at its first </s> (not included). Returns phoneme ids per word."""
        device = self._device()
        ids, lengths = encode_words(words)
        h = self.encode(ids.to(device), lengths.to(device))  # (1, B, H)
        token = torch.full((len(words), 1), P_BOS, dtype=torch.long, device=device)
        steps = []
        done = torch.zeros(len(words), dtype=torch.bool, device=device)
        for _ in range(max_len):
            out, h = self.decoder(self.dec_emb(token), h)  # out (B, 1, H)
            token = self.fc(out).argmax(-1)  # (B, 1)
            steps.append(token[:, 0])
            done |= token[:, 0] == P_EOS
            if bool(done.all()):
                break
        seqs = torch.stack(steps, 1).tolist() if steps else [[] for _ in words]
        return [s[:s.index(P_EOS)] if P_EOS in s else s for s in seqs]

    def predict(self, words: Sequence[str], max_len: int = MAX_LEN, batch_size: int = 512
                ) -> list[list[str]]:
        """Phonemes of each word (greedy, batched ``batch_size`` words at a time; words are
        grouped by length to limit padding). Returns one list of ARPAbet symbols per word."""
        order = sorted(range(len(words)), key=lambda i: len(words[i]))
        result: list[list[str]] = [[] for _ in words]
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            for i, seq in zip(chunk, self.predict_ids([words[i] for i in chunk], max_len)):
                result[i] = [PHONEMES[t] for t in seq]
        return result


def load_g2p() -> G2PModel:
    """g2p-en's pretrained model as a float32 :class:`G2PModel` in eval mode (CPU)."""
    return G2PModel.from_npz().float().eval()
