"""Post-training compression of nano-ocr's CRNN: the BiLSTM (and, separately, the convolutions)
against truncated SVD, magnitude pruning and int8, with and without distillation.

    python examples/ocr/table.py --out examples/ocr/results/table.json

Evaluation: 1,000 PTB test-split words rendered and degraded (words.py); "agreement" = share of
images read exactly as the original model reads them, "accuracy" = share read as the true word
(case-insensitive). The BiLSTM rows compress its four weight matrices (1,572,864 weights); the
convolutions stay as they are, so their features are computed once and the recurrent head
(BiLSTM + fc) alone runs in calibration, distillation and evaluation. Ratio r: at most
1,572,864 / r stored numbers (pruning: kept values; hybrid: factor entries + sparse values).

Methods:
* ``mpo-calibrated``: ``compress(head, CompressionConfig(target_modules=["rnn"], target_ratio=r),
  calibration=...)`` on the features of the 200 calibration words.
* ``hybrid``: the same with ``layout="lowrank+sparse"`` (``--sparse-share``; none = searched).
* ``svd``: truncated SVD per matrix at rank floor(m n / (r (m + n))) (``layout="lowrank"``,
  ``max_bond=rank``, uncalibrated: exactly the truncated SVD).
* ``prune``: layer-wise magnitude pruning (``mpolstm.prune.prune_layerwise``).
* ``int8``: torch's dynamic int8 quantization of the LSTM.
Distillation (``--distill-ratios``): ``mpolstm.distill`` for every method alike on the features of
``--distill-words`` train-split words (KL on the logits, Adam, ``--steps``, cosine schedule).
Bytes: ``mpolstm.storage.pack_weights`` (cores; pruned and sparse parts as values + the smaller
of CSR / bitmask; int8 1 byte an entry + scale and zero point).

``--conv-ratios`` adds the seven convolutions compressed instead (3.19M weights; calibrated MPO,
hybrid, SVD, pruning; no fine-tuning), evaluated on ``--conv-eval`` words through the whole model.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
from ocr_model import CRNN, ctc_decode, load_crnn
from words import split_words, word_images

import mpolstm
from mpolstm.mpo import decompose
from mpolstm.nn.registry import is_mpo_module, layer_type, replace_module
from mpolstm.prune import prunable_weights, prune_layerwise
from mpolstm.storage import pack_weights, packed_bytes, sparse_bytes

__all__ = ["Head", "build", "evaluate", "features", "main"]

RNN_WEIGHTS = 4 * 1024 * 256 + 2 * 1024 * 256  # 2 x (1024 x 512 + 1024 x 256)


class Head(nn.Module):
    """The recurrent head of the CRNN: conv features (N, 33, 512) -> logits (33, N, 66)."""

    def __init__(self, crnn: CRNN) -> None:
        super().__init__()
        self.rnn, self.fc = crnn.rnn, crnn.fc

    def forward(self, feats: Tensor) -> Tensor:
        out, _ = self.rnn(feats)
        return self.fc(out).permute(1, 0, 2)


@torch.no_grad()
def features(model: CRNN, images: Tensor, batch: int = 128) -> Tensor:
    return torch.cat([model.features(images[i:i + batch]) for i in range(0, images.shape[0], batch)])


@torch.no_grad()
def evaluate(model: nn.Module, inputs: Tensor, words: Sequence[str], reference: Sequence[str],
             batch: int = 256) -> dict[str, float]:
    model.eval()
    texts = []
    for i in range(0, inputs.shape[0], batch):
        texts += ctc_decode(model(inputs[i:i + batch]))
    n = max(len(words), 1)
    return {"agreement": sum(t == r for t, r in zip(texts, reference)) / n,
            "accuracy": sum(t.lower() == w for t, w in zip(texts, words)) / n}


def svd_rank(m: int, n: int, ratio: float) -> int:
    return max(1, math.floor(m * n / ratio / (m + n)))


def build(method: str, module: str, model: nn.Module, ratio: float, calib, sparse_share) -> tuple[nn.Module, dict]:
    """Compress ``model.<module>`` (the head's "rnn" or the CRNN's "cnn") in place by ``method``."""
    if method in ("mpo-calibrated", "hybrid"):
        layout = "lowrank+sparse" if method == "hybrid" else "auto"
        config = mpolstm.CompressionConfig(target_modules=module if module == "rnn" else r"cnn\.\d+",
                                           target_ratio=ratio, layout=layout,
                                           sparse_share=sparse_share if method == "hybrid" else None)
        model, report = mpolstm.compress(model, config, calibration=calib)
        return model, {"layouts": _layouts(report), "params": report.mpo_params}
    if method == "svd":
        params = 0
        for name, sub in list(model.named_modules()):
            if not name.startswith(module) or not isinstance(sub, (nn.LSTM, nn.Conv2d)):
                continue
            entry = layer_type(sub)
            mpos = {}
            for wname, (matrix, _) in entry.matrices(sub).items():
                rows, cols = matrix.shape
                mpos[wname] = decompose(matrix.detach(), (rows, 1), (1, cols), max_bond=svd_rank(rows, cols, ratio))
                params += mpos[wname].num_params
            replace_module(model, name, entry.from_torch(sub, mpos=mpos))
        return model, {"layouts": "lowrank, rank floor(m n / (r (m + n))) per matrix", "params": params}
    if method == "prune":
        names = [n for n in prunable_weights(model, ("rnn", "conv")) if n.startswith(module)]
        total = sum(model.get_parameter(n).numel() for n in names)
        kept = prune_layerwise(model, names, int(total / ratio))
        return model, {"layouts": "", "params": sum(kept.values())}
    raise ValueError(method)


def _layouts(report) -> str:
    return "; ".join(f"{m.name}.{w} {r.layout}{r.bond_dims}" + (f"+{r.sparse_params}" if r.sparse_params else "")
                     for m in report.modules for w, r in m.weights.items())


def stored_bytes(model: nn.Module, module: str) -> int:
    """Bytes of the compressed weights as ``mpolstm.storage`` packs them ("rnn", or every conv of "cnn")."""
    names = ["rnn"] if module == "rnn" else [
        n for n, m in model.named_modules() if n.startswith("cnn.") and (isinstance(m, nn.Conv2d) or is_mpo_module(m))]
    pruned = [n for n in names if hasattr(model.get_submodule(n), "weight_mask")]
    dense = sum(min(sparse_bytes(model.get_submodule(n).weight.detach().reshape(
        model.get_submodule(n).weight.shape[0], -1)).values()) for n in pruned)  # conv kernels as matrices
    rest = [n for n in names if n not in pruned]
    return dense + (packed_bytes(pack_weights(model, rest)[0]) if rest else 0)


def int8_row(head: Head) -> tuple[nn.Module, int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(head), {nn.LSTM}, dtype=torch.qint8)
    return q, packed_bytes(pack_weights(q, ["rnn"])[0])


def _distill_batches(feats: Tensor, batch: int) -> list[Tensor]:
    order = torch.randperm(feats.shape[0], generator=torch.Generator().manual_seed(0))
    return [feats[order[i:i + batch]] for i in range(0, feats.shape[0] - batch + 1, batch)]


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--ratios", type=float, nargs="*", default=[2, 5, 10, 30])
    parser.add_argument("--methods", nargs="+", default=["mpo-calibrated", "hybrid", "svd", "prune"])
    parser.add_argument("--distill-ratios", type=float, nargs="*", default=[5, 10, 30])
    parser.add_argument("--distill-methods", nargs="+", default=["mpo-calibrated", "hybrid", "svd", "prune"])
    parser.add_argument("--conv-ratios", type=float, nargs="*", default=[])
    parser.add_argument("--sparse-share", type=float, default=None)
    parser.add_argument("--distill-share", type=float, default=0.5, help="hybrid's sparse share when distilled")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--n-eval", type=int, default=1000)
    parser.add_argument("--distill-words", type=int, default=4000)
    parser.add_argument("--conv-eval", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    splits = split_words()
    words = splits["eval"][:args.n_eval]
    crnn = load_crnn()
    eval_feats = features(crnn, word_images(words))
    calib_feats = features(crnn, word_images(splits["calib"], seed=1))
    print(f"torch {torch.__version__}, {args.threads} thread(s); features in {time.perf_counter() - t0:.0f} s",
          flush=True)
    head = Head(crnn).eval()
    reference = evaluate(head, eval_feats, words, [""] * len(words))  # accuracy of the original
    texts = []
    with torch.no_grad():
        texts = ctc_decode(head(eval_feats))
    rows: list[dict] = []

    def add(method, ratio, finetune, params, nbytes, metrics, seconds, **extra):
        row = {"part": extra.pop("part", "bilstm"), "method": method, "ratio": ratio, "finetune": finetune,
               "params": params, "bytes": nbytes, **{k: round(v, 4) for k, v in metrics.items()},
               "seconds": round(seconds, 1), **extra}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            meta = {"argv": list(sys.argv[1:] if argv is None else argv), "torch": torch.__version__,
                    "threads": args.threads, "n_eval": len(words)}
            Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))

    dense_bytes = RNN_WEIGHTS * 4
    add("original", None, "-", RNN_WEIGHTS, dense_bytes, {"agreement": 1.0, "accuracy": reference["accuracy"]}, 0)
    q, qbytes = int8_row(head)
    add("int8", None, "none", RNN_WEIGHTS, qbytes, evaluate(q, eval_feats, words, texts), 0)
    calib = [calib_feats]
    for ratio in args.ratios:
        for method in args.methods:
            c = time.perf_counter()
            model, info = build(method, "rnn", copy.deepcopy(head), ratio, calib, args.sparse_share)
            secs = time.perf_counter() - c
            add(method, ratio, "none", info["params"], stored_bytes(model, "rnn"),
                evaluate(model, eval_feats, words, texts), secs, layouts=info["layouts"])
    if args.distill_ratios:
        dwords = splits["distill"][:args.distill_words]
        batches = _distill_batches(features(crnn, word_images(dwords, seed=2)), args.batch)
    for ratio in args.distill_ratios:
        for method in args.distill_methods:
            c = time.perf_counter()
            share = args.distill_share if method == "hybrid" else None
            model, info = build(method, "rnn", copy.deepcopy(head), ratio, calib, share)
            result = mpolstm.distill(model, head, batches, steps=args.steps, lr=args.lr, schedule="cosine")
            add(method, ratio, "distill", info["params"], stored_bytes(model, "rnn"),
                evaluate(model, eval_feats, words, texts), time.perf_counter() - c, layouts=info["layouts"],
                last_loss=round(sum(result.losses[-50:]) / len(result.losses[-50:]), 4))
    if args.conv_ratios:
        conv_words = words[:args.conv_eval]
        images = word_images(conv_words)
        conv_calib = [word_images(splits["calib"], seed=1)]
        for ratio in args.conv_ratios:
            for method in args.methods:
                c = time.perf_counter()
                model, info = build(method, "cnn", copy.deepcopy(crnn), ratio, conv_calib, args.sparse_share)
                secs = time.perf_counter() - c
                add(method, ratio, "none", info["params"], stored_bytes(model, "cnn"),
                    evaluate(model, images, conv_words, texts[:len(conv_words)]), secs, part="conv",
                    layouts=info["layouts"])
    return rows


if __name__ == "__main__":
    main()
