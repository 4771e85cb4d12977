"""DTLN's two per-frame ONNX files compressed and written back as ONNX: speech quality of MPO and
magnitude pruning at the same budget, without fine-tuning and after label-free distillation through time.

    python examples/dtln/table.py --out examples/dtln/results/table.json

Data: the project's synthetic noisy-speech corpus (``mpolstm data speech --preset quick``: espeak-ng
voices reading PTB sentences, white / pink / brown / babble / hum noise at -5 to 10 dB). Evaluation on
the first ``--n-test`` test utterances; calibration on ``--n-calib`` train utterances, distillation
on crops of ``--crop`` frames of ``--n-distill`` train utterances. Each model's inputs are recorded
along the original pipeline (onnxruntime) and fed as sequences of frames, the states carried from
zero (``mpolstm.onnx.as_batches``: a per-frame graph's calibration is sequences). Every row is the
two ONNX files ``mpolstm.onnx`` wrote, run frame by frame in onnxruntime through the package's front
end (dtln.py). Metrics against the clean speech: PESQ-WB, STOI, SI-SDR (dB); "vs original": SI-SDR
against the original files' output (mean and worst utterance).

Compressed (ratio r: the 8 LSTM matrices of both models, 655,872 entries, stored in at most 1/r of
their entries; everything else as it was): model_1's two LSTM nodes and model_2's four LSTM MatMuls
(its LSTMs unrolled by the exporter; named by ``target_modules``, since a graph without a recurrent
node has nothing to compress by default).

* ``mpo-calibrated``: ``compress(model, CompressionConfig(target_modules=..., target_ratio=r),
  calibration=<sequences>)`` per model.
* ``hybrid``: the same with ``layout="lowrank+sparse"`` (low rank plus a sparse residual, its share searched).
* ``mpo-output`` / ``mpo-refit`` (not in the default rows): ``allocation="output"`` / ``refit=True``.
* ``prune-global``: magnitude pruning over each model's 4 matrices to 1/r of their entries.
* ``distill`` rows: then ``--steps`` steps per model of ``mpolstm.distill`` (only the compressed
  matrices train), each step ``--batch`` crops of ``--crop`` frames run through time from zero
  states, Adam with cosine decay; model_1 matches the original's log10 mask (floored at 1e-4),
  model_2 the original's output frames (MSE), on the original pipeline's inputs. Learning rates:
  ``--lr`` for MPO, ``--prune-lr`` for pruning (at MPO's rate pruning does not move).
* latency: onnxruntime (one thread), one frame through both written files, median of a round of calls.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
from dtln import blocks, enhance, model_file, ort_session, ort_step, pipeline_frames  # noqa: E402

import mpolstm  # noqa: E402
import mpolstm.onnx as mo  # noqa: E402
from mpolstm.harness.audio import score, si_sdr  # noqa: E402
from mpolstm.onnx.frames import FrameSequence, state_pairs  # noqa: E402
from mpolstm.prune import num_weights, prunable_weights, prune_global  # noqa: E402

__all__ = ["Data", "build", "distill_model", "evaluate", "latency", "load_data", "lstm_layers", "main"]

MIN_MASK = 1e-4
OPTIONS = {"hybrid": {"layout": "lowrank+sparse"}, "mpo-output": {"allocation": "output"}, "mpo-refit": {"refit": True}}


class Data:
    """Test pairs; per model, calibration sequences and distillation crops (FrameSequence)."""

    def __init__(self, test, calib, distill) -> None:
        self.test, self.calib, self.distill = test, calib, distill


def _sequences(utterances: list[np.ndarray], crop: int | None) -> tuple[list, list]:
    """Each model's input sequences along the original pipeline (crops of ``crop`` frames, or whole)."""
    originals = [mo.load(model_file(f"model_{k}.onnx")) for k in (1, 2)]
    out: tuple[list, list] = ([], [])
    for x in utterances:
        steps = [ort_step(ort_session(model_file(f"model_{k}.onnx"))) for k in (1, 2)]
        mags, masked, _ = pipeline_frames(*steps, blocks(x))
        for k, (frames, model) in enumerate(zip((mags, masked), originals)):
            seq = FrameSequence((torch.from_numpy(frames)[:, None, None, :],), state_pairs(model))
            out[k].extend(seq.crops(crop) if crop else [seq])
    return out


def load_data(n_test: int, n_calib: int, n_distill: int, crop: int, corpus_preset: str = "quick") -> Data:
    from mpolstm.harness.data.speech import load_corpus

    corpus = load_corpus(preset=corpus_preset)
    test = [corpus["test"][k] for k in range(min(n_test, len(corpus["test"])))]
    train = corpus["train"].noisy
    calib = _sequences(train[:n_calib], None)
    distill = _sequences(train[n_calib:n_calib + n_distill], crop) if n_distill else ([], [])
    return Data(test, calib, distill)


def lstm_layers(model: mo.OnnxModel) -> list[str]:
    """The LSTM weights' layers: model_1's LSTM nodes, model_2's unrolled LSTM MatMuls."""
    return mo.recurrent_layers(model) or [n for n in model.layers if "_lstm_" in n]


def build(method: str, model: mo.OnnxModel, ratio: float, calib: list) -> tuple[mo.OnnxModel, str]:
    """Compress the model's LSTM weights in place by ``method``; returns (model, the layouts chosen)."""
    names = lstm_layers(model)
    if method == "prune-global":
        weights = [w for w in prunable_weights(model, ("rnn", "linear")) if w.split(".")[0] in names]
        prune_global(model, weights, int(num_weights(model, weights) / ratio))
        return model, ""
    config = mpolstm.CompressionConfig(target_modules=names, target_ratio=ratio, **OPTIONS.get(method, {}))
    model, report = mpolstm.compress(model, config, calibration=calib)
    return model, "; ".join(f"{m.name}.{w.removesuffix('_l0')} {r.layout}{r.bond_dims}"
                            for m in report.modules for w, r in m.weights.items())


def _target(index: int):
    """What distillation of model_1 (index 0: log10 mask) / model_2 (its output frames) matches,
    over a batch of sequences."""
    def forward(model, batch):
        out = torch.cat([seq.run(model) for seq in batch])
        return torch.log10(out.clamp_min(MIN_MASK)) if index == 0 else out
    return forward


def distill_model(model, teacher, index: int, crops: list, steps: int, lr: float, batch: int) -> float:
    """Train the compressed layers to match the teacher through time; returns the last 20 steps' mean loss."""
    names = tuple(f"{n}." for n in lstm_layers(teacher))
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(names))
    order = torch.randperm(len(crops), generator=torch.Generator().manual_seed(index)).tolist()
    batches = [[crops[i] for i in order[j:j + batch]] for j in range(0, len(order) - batch + 1, batch)]
    result = mpolstm.distill(model, teacher, batches, steps=steps, loss="mse", lr=lr, schedule="cosine",
                             forward=_target(index))
    model.eval()
    return float(np.mean(result.losses[-20:]))


def evaluate(sessions, data: Data, reference: list[np.ndarray] | None) -> tuple[dict, list[np.ndarray]]:
    """Mean PESQ-WB, STOI, SI-SDR over the test pairs (and SI-SDR against ``reference``'s outputs:
    mean and worst), and the enhanced signals."""
    scores, outs = [], []
    for k, (noisy, clean) in enumerate(data.test):
        out = noisy if sessions is None else enhance(ort_step(sessions[0]), ort_step(sessions[1]), noisy)
        row = score(clean, out)
        if reference is not None:
            row["vs_original"] = si_sdr(out, reference[k])
        scores.append(row)
        outs.append(out)
    metrics = {key: float(np.mean([s[key] for s in scores])) for key in scores[0]}
    if reference is not None:
        metrics["vs_original_worst"] = float(min(s["vs_original"] for s in scores))
    return metrics, outs


def latency(sessions, min_time: float = 0.5) -> float:
    """Median seconds of one frame through both sessions (states fed back)."""
    steps = [ort_step(s) for s in sessions]
    mag, frame = np.random.default_rng(0).random(257).astype(np.float32), np.zeros(512, np.float32)
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < min_time or len(times) < 50:
        t = time.perf_counter()
        steps[0](mag)
        steps[1](frame)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--ratios", type=float, nargs="*", default=[2, 5, 10, 30])
    parser.add_argument("--methods", nargs="+", default=["mpo-calibrated", "hybrid", "prune-global"])
    parser.add_argument("--distill-ratios", type=float, nargs="*", default=[10])
    parser.add_argument("--distill-methods", nargs="+", default=["hybrid", "prune-global", "mpo-calibrated"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--prune-lr", type=float, default=1e-2)
    parser.add_argument("--batch", type=int, default=2, help="crops per distillation step")
    parser.add_argument("--crop", type=int, default=100, help="frames per distillation crop")
    parser.add_argument("--n-test", type=int, default=8)
    parser.add_argument("--n-calib", type=int, default=4)
    parser.add_argument("--n-distill", type=int, default=16)
    parser.add_argument("--corpus", default="quick")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--render", type=Path, default=None, help="print the Markdown table of a table JSON and stop")
    return parser


def markdown(document: dict) -> str:
    lines = ["| method | ratio | fine-tuning | PESQ-WB | STOI | SI-SDR (dB) | vs original (dB) | worst (dB) | "
             "ms / frame |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in document["rows"]:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:g}x"
        vs = "- | -" if "vs_original" not in r else f"{r['vs_original']:.2f} | {r['vs_original_worst']:.2f}"
        ms = "-" if r.get("frame_ms") is None else f"{r['frame_ms']:.3f}"
        lines.append(f"| {r['method']} | {ratio} | {r['finetune']} | {r['pesq']:.3f} | {r['stoi']:.3f} | "
                     f"{r['si_sdr']:.2f} | {vs} | {ms} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = _parser().parse_args(argv)
    if args.render is not None:
        document = json.loads(args.render.read_text())
        print(markdown(document))
        return document["rows"]
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data = load_data(args.n_test, args.n_calib, args.n_distill, args.crop, args.corpus)
    originals = [mo.load(model_file(f"model_{k}.onnx")) for k in (1, 2)]
    meta = {"argv": list(sys.argv[1:] if argv is None else argv), "torch": torch.__version__,
            "threads": args.threads, "n_test": len(data.test), "calib_frames": [sum(map(len, c)) for c in data.calib],
            "distill_crops": [len(c) for c in data.distill]}
    print(f"data in {time.perf_counter() - start:.0f} s: {meta}", flush=True)
    rows: list[dict] = []

    def add(method, ratio, finetune, sessions, reference, **extra):
        metrics, outs = evaluate(sessions, data, reference)
        ms = None if sessions is None else 1e3 * latency(sessions)
        rows.append({"method": method, "ratio": ratio, "finetune": finetune,
                     **{k: round(v, 4) for k, v in metrics.items()},
                     "frame_ms": None if ms is None else round(ms, 4), **extra})
        print(json.dumps(rows[-1]), flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        return outs

    add("noisy", None, "-", None, None)
    reference = add("original", None, "-", [ort_session(model_file(f"model_{k}.onnx")) for k in (1, 2)], None)
    runs = [(m, r, "none") for r in args.ratios for m in args.methods] + \
        [(m, r, "distill") for r in args.distill_ratios for m in args.distill_methods]
    for method, ratio, finetune in runs:
        t0, models, layouts, losses = time.perf_counter(), [], [], []
        for k, original in enumerate(originals):
            model, chosen = build(method, copy.deepcopy(original), ratio, data.calib[k])
            if finetune == "distill":
                lr = args.prune_lr if method.startswith("prune") else args.lr
                losses.append(distill_model(model, original, k, data.distill[k], args.steps, lr, args.batch))
            models.append(model)
            layouts.append(chosen)
        seconds = time.perf_counter() - t0
        sessions = [ort_session(mo.to_bytes(m)) for m in models]
        add(method, ratio, finetune, sessions, reference, seconds=round(seconds, 1), layouts=" | ".join(layouts),
            **({"last_loss": [round(v, 6) for v in losses]} if losses else {}))
    print(f"done in {time.perf_counter() - start:.0f} s", flush=True)
    return rows


if __name__ == "__main__":
    main()
