"""NSNet2 from its ONNX file, compressed and written back as ONNX: speech quality of every method
at the same budget, with and without the same distillation.

    python examples/nsnet2/table.py --out examples/nsnet2/results/table.json
    python examples/nsnet2/table.py --rate 48000 --ratios 10 --distill-ratios 10 \
        --out examples/nsnet2/results/table_48k.json

Data: the project's synthetic noisy-speech corpus (``mpolstm data speech --preset quick``: espeak-ng
voices reading PTB sentences, white / pink / brown / babble / hum noise at -5 to 10 dB). Evaluation on
the first ``--n-test`` test utterances (16 kHz; for the 48 kHz model resampled to 48 kHz and the
output back to 16 kHz); calibration on the features of ``--n-calib`` train utterances; distillation on
crops of ``--crop`` frames of every train utterance. Label-free: the teacher is the original model.
Every row is the ONNX file written by ``mpolstm.onnx`` and run in onnxruntime through the package's
front end (nsnet2.py). Metrics against the clean speech: PESQ-WB, STOI, SI-SDR (dB); "gain kept" =
(PESQ - noisy PESQ) / (original PESQ - noisy PESQ).

Methods (ratio r: the two GRUs' 4 weight matrices, 1,920,000 / 4,320,000 entries, stored in at most
1/r of their entries; the other layers stay as they are):

* ``mpo-calibrated``: ``compress(model, CompressionConfig(target_modules=<the GRUs>, target_ratio=r),
  calibration=...)`` (layout and bonds per matrix by calibration output error: what ``mpolstm compress
  model.onnx out.onnx --ratio r --calibrate ...`` does).
* ``mpo-output``: the same with ``allocation="output"`` (the model's calibration output error picks
  between that allocation, uniform ranks and ranks from each matrix's measured output sensitivity);
  ``mpo-output-refit``: also ``refit=True`` (each matrix refitted to what the compressed upstream feeds it).
* ``mpo-latency``: ``mpo-calibrated`` with ``max_macs`` = dense multiply-adds per frame / r (latency budget).
* ``hybrid``: ``mpo-calibrated`` with ``layout="lowrank+sparse"`` (sparse share searched); ``hybrid-half``
  (not in the default rows): half of each matrix's budget sparse.
* ``prune-global`` / ``prune-layerwise``: magnitude pruning over the 4 matrices / per matrix
  (``mpolstm.prune``), to 1/r of the entries.
* ``ort-int8``: ``onnxruntime.quantization.quantize_dynamic`` of the original file (its MatMuls in
  int8; onnxruntime does not quantize GRU).
Calibration: ``--n-calib`` train utterances cut into 2 s crops. Distillation (the same for every
method): ``mpolstm.distill`` of the GRU layers only (the other layers keep the original's weights),
MSE of log10 of the gain as applied (floored at -80 dB), Adam ``--lr`` with cosine decay, ``--steps``
steps over batches of ``--batch`` crops of ``--crop`` frames of every train utterance, in a fixed order.
Bytes: "stored": the GRU matrices as ``mpolstm.storage`` packs them (pruning: values + the smaller of
CSR / bitmask) plus every other weight and bias in float32; "onnx": the initializers of the written file.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
from nsnet2 import FRONT_ENDS, enhance, model_file, offline_runner, ort_session  # noqa: E402

import mpolstm  # noqa: E402
import mpolstm.onnx as mo  # noqa: E402
from mpolstm.export import onnx_weight_bytes  # noqa: E402
from mpolstm.harness.audio import resample, score  # noqa: E402
from mpolstm.prune import num_weights, prunable_weights, prune_global, prune_layerwise  # noqa: E402
from mpolstm.storage import pack_weights, packed_bytes  # noqa: E402

__all__ = ["Data", "build", "evaluate", "load_data", "main", "stored_bytes"]

METHODS = ("mpo-calibrated", "mpo-output", "mpo-output-refit", "mpo-latency", "hybrid", "prune-global",
           "prune-layerwise")
DISTILL_METHODS = ("mpo-calibrated", "mpo-output", "mpo-latency", "hybrid", "prune-global", "prune-layerwise")
OPTIONS = {"mpo-output": {"allocation": "output"}, "mpo-output-refit": {"allocation": "output", "refit": True},
           "hybrid": {"layout": "lowrank+sparse"}, "hybrid-half": {"layout": "lowrank+sparse", "sparse_share": 0.5}}
MIN_GAIN = 1e-4  # the application's floor, -80 dB


class Data:
    """Test pairs (16 kHz), calibration features, distillation batches, at one model rate."""

    def __init__(self, rate: int, test: list, calib: list[torch.Tensor], distill: list[torch.Tensor]) -> None:
        self.rate, self.test, self.calib, self.distill = rate, test, calib, distill


def _features(x: np.ndarray, rate: int) -> torch.Tensor:
    front = FRONT_ENDS[rate]
    signal = x if rate == 16000 else resample(x, 16000, rate)
    return torch.from_numpy(front.features(front.spectra(np.asarray(signal, np.float64))))


def _crops(utterances: list[np.ndarray], rate: int, frames: int) -> list[torch.Tensor]:
    """Consecutive crops of ``frames`` frames of every utterance's features."""
    out = []
    for x in utterances:
        feats = _features(x, rate)
        out += [feats[i:i + frames] for i in range(0, feats.shape[0] - frames + 1, frames)]
    return out


def _batches(crops: list[torch.Tensor], size: int, shuffle: bool) -> list[torch.Tensor]:
    order = torch.randperm(len(crops), generator=torch.Generator().manual_seed(0)).tolist() if shuffle else \
        list(range(len(crops)))
    return [torch.stack([crops[i] for i in order[j:j + size]]) for j in range(0, len(order) - size + 1, size)]


def load_data(rate: int, n_test: int, n_calib: int, crop: int, batch: int, corpus_preset: str = "quick",
              n_distill: int | None = None, calib_crop: int = 200) -> Data:
    """The first ``n_test`` test pairs; calibration: the first ``n_calib`` train utterances cut into
    crops of ``calib_crop`` frames, 16 a batch; distillation: every (or the first ``n_distill``)
    train utterance cut into crops of ``crop`` frames, ``batch`` a batch, in a fixed shuffled order."""
    from mpolstm.harness.data.speech import load_corpus

    corpus = load_corpus(preset=corpus_preset)
    test = [corpus["test"][k] for k in range(min(n_test, len(corpus["test"])))]
    train = corpus["train"].noisy
    calib_crops = _crops(train[:n_calib], rate, calib_crop)
    # 16 crops a batch, and at least 2 batches (allocation="output" holds every second one out)
    calib = _batches(calib_crops, max(1, min(16, len(calib_crops) // 2)), shuffle=False) if calib_crops else []
    distill = _batches(_crops(train[:n_distill], rate, crop), batch, shuffle=True)
    return Data(rate, test, calib, distill)


def evaluate(session, data: Data) -> dict[str, float]:
    """Mean PESQ-WB, STOI and SI-SDR over the test pairs, the ONNX ``session`` enhancing offline."""
    run, front, scores = offline_runner(session), FRONT_ENDS[data.rate], []
    for noisy, clean in data.test:
        signal = noisy if data.rate == 16000 else resample(noisy, 16000, data.rate)
        out = enhance(run, signal, front)
        out = out if data.rate == 16000 else resample(out, data.rate, 16000)[:len(clean)]
        scores.append(score(clean, out))
    return {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}


def noisy_scores(data: Data) -> dict[str, float]:
    scores = [score(clean, noisy) for noisy, clean in data.test]
    return {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}


def gru_layers(model: mo.OnnxModel) -> list[str]:
    return mo.recurrent_layers(model)


def build(method: str, model: mo.OnnxModel, ratio: float, calib: list) -> tuple[mo.OnnxModel, str]:
    """Compress the model's GRUs in place by ``method``; returns (model, the layouts chosen)."""
    names = gru_layers(model)
    if method.startswith("prune"):
        weights = prunable_weights(model, ("rnn",))
        kept = int(num_weights(model, weights) / ratio)
        (prune_global if method == "prune-global" else prune_layerwise)(model, weights, kept)
        return model, ""
    dense_macs = sum(getattr(model, n).weight_ih_l0.numel() + getattr(model, n).weight_hh_l0.numel() for n in names)
    config = mpolstm.CompressionConfig(target_modules=names, target_ratio=ratio,
                                       max_macs=int(dense_macs / ratio) if method == "mpo-latency" else None,
                                       **OPTIONS.get(method, {}))
    model, report = mpolstm.compress(model, config, calibration=calib)
    layouts = "; ".join(f"{m.name}.{w.removesuffix('_l0')} {r.layout}{r.bond_dims}"
                        + (f"+{r.sparse_params}" if r.sparse_params else "")
                        for m in report.modules for w, r in m.weights.items())
    return model, layouts


def stored_bytes(model: mo.OnnxModel, original: mo.OnnxModel) -> int:
    """The GRU matrices as mpolstm.storage packs them, plus every other weight and bias of the
    original in float32 (they are the same in every row)."""
    names = gru_layers(original)
    matrices = sum(getattr(original, n).get_parameter(w).numel() for n in names
                   for w in ("weight_ih_l0", "weight_hh_l0"))
    others = sum(t.numel() for t in [*original.parameters(), *original.buffers()] if t.is_floating_point()) - matrices
    return packed_bytes(pack_weights(model, names)[0]) + 4 * others


def log_gain(model: mo.OnnxModel, batch: torch.Tensor) -> torch.Tensor:
    """What distillation matches: log10 of the gain as the application applies it (floored at -80 dB)."""
    return torch.log10(model(batch).clamp_min(MIN_GAIN))


def distill_grus(model: mo.OnnxModel, teacher: mo.OnnxModel, data: Data, steps: int, lr: float) -> float:
    """Train the GRU layers (compressed or pruned; the other layers stay the original's) to match the
    teacher's log gains; returns the mean loss of the last 20 steps."""
    names = tuple(f"{n}." for n in gru_layers(model))
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(names))
    result = mpolstm.distill(model, teacher, data.distill, steps=steps, loss="mse", lr=lr, schedule="cosine",
                             forward=log_gain)
    model.eval()
    return float(np.mean(result.losses[-20:]))


class Table:
    """The rows so far: each is scored, printed and (with ``out``) the JSON rewritten."""

    def __init__(self, data: Data, out: Path | None, meta: dict) -> None:
        self.data, self.out, self.meta, self.rows = data, out, meta, []

    def add(self, method, ratio, finetune, session, nbytes, onnx_bytes, seconds, **extra) -> None:
        metrics = evaluate(session, self.data) if session is not None else noisy_scores(self.data)
        row = {"method": method, "ratio": ratio, "finetune": finetune, "stored_bytes": nbytes,
               "onnx_bytes": onnx_bytes, **{k: round(v, 4) for k, v in metrics.items()},
               "seconds": round(seconds, 1), **extra}
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        if self.out:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(json.dumps({"meta": self.meta, "rows": self.rows}, indent=1))


def markdown(document: dict) -> str:
    """The rows of a table JSON as a Markdown table: "gain kept" against the noisy and original rows."""
    rows = document["rows"]
    noisy = next(r["pesq"] for r in rows if r["method"] == "noisy")
    original = next(r for r in rows if r["method"] == "original")
    lines = ["| method | ratio | fine-tuning | PESQ-WB | gain kept | STOI | SI-SDR (dB) | stored bytes | x fewer | "
             "ONNX bytes | layouts |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        kept = "-" if r["method"] == "noisy" else f"{(r['pesq'] - noisy) / (original['pesq'] - noisy):.0%}"
        stored = r["stored_bytes"] or r["onnx_bytes"]
        fewer = f"{original['stored_bytes'] / stored:.2f}x" if stored else "-"
        stored, onnx_bytes = (f"{stored:,}", f"{r['onnx_bytes']:,}") if stored else ("-", "-")
        layouts = r.get("layouts", "").replace("weight_", "")
        layouts = "as above" if layouts and r["finetune"] == "distill" else layouts
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:g}x"
        lines.append(f"| {r['method']} | {ratio} | {r['finetune']} | {r['pesq']:.3f} | {kept} | {r['stoi']:.3f} | "
                     f"{r['si_sdr']:.2f} | {stored} | {fewer} | {onnx_bytes} | {layouts} |")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=16000, choices=(16000, 48000))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--ratios", type=float, nargs="*", default=[2, 5, 10, 30])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--distill-ratios", type=float, nargs="*", default=[5, 10, 30])
    parser.add_argument("--distill-methods", nargs="+", default=list(DISTILL_METHODS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=100, help="frames per distillation crop")
    parser.add_argument("--n-test", type=int, default=16)
    parser.add_argument("--n-calib", type=int, default=32)
    parser.add_argument("--n-distill", type=int, default=None, help="train utterances cropped (default all)")
    parser.add_argument("--corpus", default="quick")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--render", type=Path, default=None, help="print the Markdown table of a table JSON and stop")
    return parser


def main(argv=None) -> list[dict]:
    args = _parser().parse_args(argv)
    if args.render is not None:
        document = json.loads(args.render.read_text())
        print(markdown(document))
        return document["rows"]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    data = load_data(args.rate, args.n_test, args.n_calib, args.crop, args.batch, args.corpus, args.n_distill)
    original = mo.load(model_file(args.rate))
    meta = {"argv": list(sys.argv[1:] if argv is None else argv), "torch": torch.__version__, "threads": args.threads,
            "rate": args.rate, "n_test": len(data.test), "distill_batches": len(data.distill)}
    table = Table(data, args.out, meta)
    print(f"data in {time.perf_counter() - start:.0f} s: {len(data.test)} test utterances, {len(data.calib)} "
          f"calibration batches, {len(data.distill)} distillation batches", flush=True)
    table.add("noisy", None, "-", None, 0, 0, 0)
    source = model_file(args.rate)
    table.add("original", None, "-", ort_session(source), stored_bytes(original, original),
              onnx_weight_bytes(source), 0)
    int8 = mo.dynamic_int8(source.read_bytes())
    table.add("ort-int8", None, "none", ort_session(int8), None, _bytes_of(int8), 0)
    runs = [(m, r, "none") for r in args.ratios for m in args.methods] + \
        [(m, r, "distill") for r in args.distill_ratios for m in args.distill_methods]
    for method, ratio, finetune in runs:
        t0 = time.perf_counter()
        model, layouts = build(method, copy.deepcopy(original), ratio, data.calib)
        loss = distill_grus(model, original, data, args.steps, args.lr) if finetune == "distill" else None
        seconds = time.perf_counter() - t0
        written = mo.to_bytes(model)
        table.add(method, ratio, finetune, ort_session(written), stored_bytes(model, original), _bytes_of(written),
                  seconds, layouts=layouts, **({"last_loss": round(loss, 6)} if loss is not None else {}))
    print(f"done in {time.perf_counter() - start:.0f} s", flush=True)
    return table.rows


def _bytes_of(data: bytes) -> int:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        path.write_bytes(data)
        return onnx_weight_bytes(path)


if __name__ == "__main__":
    main()
