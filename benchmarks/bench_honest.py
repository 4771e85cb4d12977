"""Issue 32's evidence on a trained torch model: the default calibrated compress against uncalibrated and
the old default, its reported output error against unseen data, tolerance mode against a dense sweep.

    OMP_NUM_THREADS=1 python benchmarks/bench_honest.py --model g2p|ocr|seqmnist|seqmnist-val|tutorial
        [--ratios 2 5 10 30] [--sweep 16] [--tolerances 0.01 0.05 0.2] [--max-drop 0.01] [--out PATH]

Every model comes with 8 calibration batches (compress holds out every second one), an unseen set of the
same distribution cut into batches (for the noise of every comparison: paired per-batch differences), a
metric measured per unseen batch, and a held-out split for ``compress(evaluate=..., max_drop=...)`` that is
not the unseen set. Output error is ||y' - y|| / ||y|| over the model's first output tensor
(mpolstm.compression.checks, the report's definition). Tables (Markdown, docs/results.md):

1. ratio 2 / 5 / 10 / 30: uncalibrated, old default (the code when issue 32 was filed: ``allocation="per-matrix"``,
   whitened on every calibration batch, its error reported on the odd-numbered ones: ``validation=``), default;
2. tolerance mode (``max_output_error`` e, and ``max_drop`` of the metric), each checked on unseen data and
   sized against the smallest model of a dense sweep (default compress, geometric ratios 1.1x-64x plus the
   ratios of table 1) that meets the tolerance on unseen data.

Models: ``g2p`` (g2p-en's GRU encoder-decoder, examples/g2p), ``ocr`` (nano-ocr's BiLSTM head, the loaders
of bench_output_allocation.py), ``seqmnist`` (the seqcls task's quick-preset dense LSTM, trained here once,
seed 0, cached; calibrated on training digits, or ``seqmnist-val`` on validation digits), ``tutorial``
(docs/tutorial.md's Speller trained here on a synthetic transcription task).
benchmarks/bench_recall.py runs the same routine (``run``) on the recall model.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from mpolstm import CompressionConfig, compress
from mpolstm.compression.checks import batch_errors, batch_outputs, total_error

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TABLE_RATIOS = (2.0, 5.0, 10.0, 30.0)
TOLERANCES = (0.01, 0.05, 0.2)


@dataclass
class Setup:
    """A trained model and its data. ``metric(model)``: the task metric per unseen batch (higher is better);
    ``evaluate(model)``: the metric on a held-out split that is not the unseen set (for max_drop)."""

    name: str
    model: nn.Module
    modules: Any  # CompressionConfig.target_modules (None: the default selection)
    calibration: list
    unseen: list
    metric: Callable[[nn.Module], list[float]]
    metric_name: str
    evaluate: Callable[[nn.Module], float]
    description: str


# ----------------------------------------------------------------------------- measuring


def _config(setup: Setup, **fields: Any) -> CompressionConfig:
    return CompressionConfig(target_modules=setup.modules, **fields)


def measure(setup: Setup, reference: list, config: CompressionConfig, calibration: list | None,
            **tolerance: Any) -> dict:
    """One compress of a copy of the model (timed, wall and CPU), measured on the unseen batches; a
    ValueError (tolerance mode: no ratio within it) is a row with ``refused``. ``tolerance``: compress's
    keyword arguments (evaluate, max_drop, validation)."""
    start, cpu = time.perf_counter(), time.process_time()
    try:
        small, report = compress(copy.deepcopy(setup.model), config, calibration=calibration, **tolerance)
    except ValueError as exc:
        return {"refused": str(exc), "seconds": round(time.perf_counter() - start, 2)}
    row = {"seconds": round(time.perf_counter() - start, 2), "cpu_seconds": round(time.process_time() - cpu, 2)}
    per_batch = batch_errors(small.eval(), setup.unseen, reference)
    metric = setup.metric(small)
    check = report.output_check
    row.update(ratio=round(report.ratio, 4), params=report.mpo_params,
               kept=report.allocation.chosen if report.allocation else "-",
               decision=str(report.allocation) if report.allocation else "",
               reported=check.error if check else None, reported_on=check.source if check else None,
               reported_batches=check.batches if check else 0,
               unseen=total_error(per_batch), unseen_per_batch=[math.sqrt(n / d) for n, d in per_batch],
               metric=sum(metric) / len(metric), metric_per_batch=metric,
               curve=[list(p) for p in report.curve], tolerance_note=getattr(report, "tolerance", ""))
    return row


def paired(ours: list[float], other: list[float]) -> tuple[float, float]:
    """(mean of ours - other over the unseen batches, its standard error)."""
    diffs = [a - b for a, b in zip(ours, other)]
    mean = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / max(len(diffs) - 1, 1))
    return mean, sd / math.sqrt(len(diffs))


def table1(setup: Setup, reference: list, ratios: tuple[float, ...]) -> list[dict]:
    rows = []
    for ratio in ratios:
        # the old default (the code at issue 32's filing): per-matrix, whitened on every calibration batch,
        # its error reported on the odd-numbered ones
        for method, allocation, calibration, extra in (
                ("uncalibrated", "error", None, {}),
                ("old default", "per-matrix", setup.calibration, {"validation": setup.calibration[1::2]}),
                ("default", "error", setup.calibration, {})):
            row = measure(setup, reference, _config(setup, target_ratio=ratio, allocation=allocation), calibration,
                          **extra)
            rows.append({"target": ratio, "method": method, **row})
            print(json.dumps({k: v for k, v in rows[-1].items() if not k.endswith("per_batch")}), flush=True)
    return rows


def verdicts(rows: list[dict]) -> list[dict]:
    """Per ratio: the default against uncalibrated and the old default on unseen data (error and metric),
    worse beyond the noise when the paired mean difference exceeds 2 standard errors; its reported error
    against the unseen one; its CPU time against the old default's."""
    out = []
    for ratio in sorted({r["target"] for r in rows}):
        at = {r["method"]: r for r in rows if r["target"] == ratio}
        ours = at["default"]
        for other in ("uncalibrated", "old default"):
            d_err, se_err = paired(ours["unseen_per_batch"], at[other]["unseen_per_batch"])
            d_met, se_met = paired(ours["metric_per_batch"], at[other]["metric_per_batch"])
            out.append({"target": ratio, "against": other, "d_error": d_err, "se_error": se_err,
                        "d_metric": d_met, "se_metric": se_met,
                        "worse_error": d_err > 2 * se_err, "worse_metric": -d_met > 2 * se_met})
        out[-1]["cpu_x_old"] = ours["cpu_seconds"] / at["old default"]["cpu_seconds"]
    return out


def sweep_grid(points: int) -> list[float]:
    return sorted({round(1.1 * (64 / 1.1) ** (k / (points - 1)), 3) for k in range(points)} | set(TABLE_RATIOS))


def sweep(setup: Setup, reference: list, table: list[dict], points: int) -> list[dict]:
    """Default compress over the grid; table 1's default rows are reused at its ratios."""
    known = {r["target"]: r for r in table if r["method"] == "default"}
    rows = []
    for ratio in sweep_grid(points):
        row = known.get(ratio) or {"target": ratio, **measure(setup, reference, _config(setup, target_ratio=ratio),
                                                             setup.calibration)}
        rows.append(row)
        print(json.dumps({k: row.get(k) for k in ("target", "ratio", "kept", "reported", "unseen", "metric",
                                                  "seconds", "refused")}), flush=True)
    return rows


def smallest_within(rows: list[dict], within: Callable[[dict], bool]) -> dict | None:
    """The sweep's smallest model (largest ratio) that meets the tolerance on unseen data."""
    held = [r for r in rows if "refused" not in r and within(r)]
    return max(held, key=lambda r: r["ratio"]) if held else None


def table2(setup: Setup, reference: list, swept: list[dict], tolerances: tuple[float, ...], max_drop: float,
           dense_metric: float) -> list[dict]:
    rows = []
    cases: list[tuple[str, float, dict, Callable[[dict], bool]]] = [
        ("max_output_error", e, {"config": _config(setup, max_output_error=e)},
         lambda r, e=e: r["unseen"] <= e) for e in tolerances]
    cases.append(("max_drop", max_drop, {"config": _config(setup), "evaluate": setup.evaluate, "max_drop": max_drop},
                  lambda r: dense_metric - r["metric"] <= max_drop))
    for kind, value, call, within in cases:
        config = call.pop("config")
        row = {"kind": kind, "tolerance": value,
               **measure(setup, reference, config, setup.calibration, **call)}
        best = smallest_within(swept, within)
        row["sweep_best_ratio"] = best["ratio"] if best else None
        if "refused" not in row:
            row["within_unseen"] = within(row)
            row["size_x_best"] = best["ratio"] / row["ratio"] if best else None
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("per_batch")}), flush=True)
    return rows


# ----------------------------------------------------------------------------- printing


def _reported(row: dict) -> str:
    if row["reported"] is None:
        return "none (not measured)"
    on = ("synthetic" if row["reported_on"].startswith("synthetic") else
          f"{row['reported_batches']} seen by the fit" if row["reported_on"].startswith("validation") else
          f"{row['reported_batches']} held out")
    return f"{row['reported']:.4f} ({on})"


def _yes(flag: bool) -> str:
    return "YES" if flag else "no"


def markdown(setup: Setup, result: dict) -> str:
    name = setup.metric_name
    lines = [f"dense unseen {name} {result['dense_metric']:.4f}", "",
             f"| ratio | method | kept | reported error (on) | unseen error | unseen {name} | time s (CPU s) |",
             "|---:|---|---|---:|---:|---:|---:|"]
    for r in result["table1"]:
        lines.append(f"| {r['target']:g}x | {r['method']} | {r['kept']} | {_reported(r)} | "
                     f"{r['unseen']:.4f} | {r['metric']:.4f} | {r['seconds']:.1f} ({r['cpu_seconds']:.1f}) |")
    lines += ["", f"| ratio | default against | unseen error diff +- 2 se | {name} diff +- 2 se | worse beyond noise "
                  "(error, metric) | reported / unseen | CPU x old default |", "|---:|---|---:|---:|---|---:|---:|"]
    table = {(r["target"], r["method"]): r for r in result["table1"]}
    for v in result["verdicts"]:
        ours = table[(v["target"], "default")]
        extra = (f"{ours['reported'] / ours['unseen']:.3f} | {v['cpu_x_old']:.2f}" if "cpu_x_old" in v else " | ")
        lines.append(f"| {v['target']:g}x | {v['against']} | {v['d_error']:+.4f} +- {2 * v['se_error']:.4f} | "
                     f"{v['d_metric']:+.4f} +- {2 * v['se_metric']:.4f} | {_yes(v['worse_error'])}, {_yes(v['worse_metric'])} | {extra} |")
    lines += ["", f"| tolerance | kept ratio | reported | unseen error | unseen {name} | within on unseen | "
                  "sweep best | size x best | candidates | time s |", "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in result["table2"]:
        what = f"error {r['tolerance']:g}" if r["kind"] == "max_output_error" else f"{name} drop {r['tolerance']:g}"
        best = f"{r['sweep_best_ratio']:.2f}x" if r["sweep_best_ratio"] else "none"
        if "refused" in r:
            lines.append(f"| {what} | refused | - | - | - | - | {best} | - | - | {r['seconds']:.0f} |")
            continue
        size = f"{r['size_x_best']:.2f}" if r["size_x_best"] else "-"
        lines.append(f"| {what} | {r['ratio']:.2f}x | {r['reported']:.4f} | {r['unseen']:.4f} | {r['metric']:.4f} | "
                     f"{'yes' if r['within_unseen'] else 'NO'} | {best} | {size} | {len(r['curve'])} | "
                     f"{r['seconds']:.0f} |")
    lines += ["", "sweep (ratio: reported / unseen error / " + name + "): " + "; ".join(
        f"{r['ratio']:.2f}x {r['reported']:.3f}/{r['unseen']:.3f}/{r['metric']:.3f}" if "refused" not in r
        else f"{r['target']}x refused" for r in result["sweep"])]
    return "\n".join(lines)


def run(setup: Setup, args: argparse.Namespace) -> dict:
    """Tables 1 and 2 for ``setup``; prints them and writes the JSON (``args.out``)."""
    load = os.getloadavg()[0]
    print(f"{setup.name}: {setup.description}\nload average at start {load:.2f}", flush=True)
    reference = batch_outputs(setup.model.eval(), setup.unseen)
    dense_metric = sum(setup.metric(setup.model)) / len(setup.unseen)
    table = table1(setup, reference, tuple(args.ratios))
    swept = sweep(setup, reference, table, args.sweep) if args.sweep else []
    result = {"model": setup.name, "description": setup.description, "argv": sys.argv, "threads": 1,
              "torch": torch.__version__, "load_at_start": load, "dense_metric": dense_metric,
              "metric": setup.metric_name, "table1": table, "verdicts": verdicts(table), "sweep": swept,
              "table2": table2(setup, reference, swept, tuple(args.tolerances), args.max_drop, dense_metric)
              if args.sweep else []}
    print(markdown(setup, result))
    out = args.out or RESULTS / f"honest_{setup.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result


def arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--ratios", type=float, nargs="+", default=list(TABLE_RATIOS))
    parser.add_argument("--sweep", type=int, default=16, help="geometric sweep points 1.1x-64x (0: table 1 only)")
    parser.add_argument("--tolerances", type=float, nargs="+", default=list(TOLERANCES))
    parser.add_argument("--max-drop", type=float, default=0.01)
    parser.add_argument("--out", type=Path, default=None)
    return parser


# ----------------------------------------------------------------------------- models


def _accuracy(model: nn.Module, batches: list[tuple]) -> list[float]:
    with torch.no_grad():
        return [float((model(x).argmax(-1) == y).float().mean()) for x, y in batches]


def g2p_setup() -> Setup:
    sys.path.insert(0, str(ROOT / "examples" / "g2p"))
    from evaluate import predict, split_words
    from g2p_model import load_g2p
    from table import calibration_fn

    splits, model = split_words(), load_g2p()
    words, held = splits["eval"], splits["distill"][:500]
    reference, held_reference = predict(model, words), predict(model, held)
    phonemes = dict(zip(words, reference))

    def teacher_forced(ws: list[str]) -> Callable[[nn.Module], None]:
        """Runs ``ws`` teacher-forced on the original's phonemes, words of one phoneme count a call: the
        logits equal one word a call's (the encoder's state is read before its padding)."""
        groups: dict[int, list[str]] = {}
        for w in ws:
            groups.setdefault(len(phonemes[w]), []).append(w)

        def call(small: nn.Module) -> None:
            with torch.no_grad():
                for group in groups.values():
                    small.teacher_forced_logits(group, [phonemes[w] for w in group])
        return call

    def agreement(small: nn.Module, ws: list[str], ref: list) -> list[bool]:
        return [p == r for p, r in zip(predict(small, ws), ref)]

    def metric(small: nn.Module) -> list[float]:
        same = agreement(small, words, reference)
        return [sum(same[i:i + 100]) / 100 for i in range(0, len(words), 100)]

    return Setup("g2p", model, ["encoder", "decoder"],
                 [calibration_fn(splits["calib"][i::8], model) for i in range(8)],
                 [teacher_forced(words[i:i + 100]) for i in range(0, len(words), 100)],
                 metric, "agreement", lambda small: sum(agreement(small, held, held_reference)) / len(held),
                 "g2p-en 2.1.0's GRU encoder-decoder, its two GRUs compressed; 8 calibration batches of 25 "
                 "CMUdict words; unseen: the 2,000 evaluation words (20 batches of 100, teacher-forced on the "
                 "original's greedy phonemes); metric: greedy agreement with the original; max_drop "
                 "measured on 500 distillation-split words")


def ocr_setup() -> Setup:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_output_allocation import ocr_setup as load

    loaded = load()  # puts examples/ocr on sys.path
    from ocr_model import load_crnn
    from table import features
    from words import split_words, word_images

    unseen = list(loaded["held"][0].split(100))
    held = [features(load_crnn(), word_images(split_words()["distill"][:200], seed=2))]
    with torch.no_grad():
        reference, held_reference = [loaded["model"](b) for b in unseen], [loaded["model"](held[0])]
    return Setup("ocr", loaded["model"], loaded["modules"], loaded["calib"], unseen,
                 lambda small: [loaded["agreement"](small, [b], [r]) for b, r in zip(unseen, reference)],
                 "agreement", lambda small: loaded["agreement"](small, held, held_reference),
                 "nano-ocr's CRNN, its BiLSTM(512 -> 256) head compressed; 8 calibration batches of 25 word "
                 "images; unseen: 1,000 evaluation word images (10 batches of 100); metric: decoded-word agreement "
                 "with the original; max_drop measured on 200 distillation-split words")


def seqmnist_setup(calibrate_on: str = "train") -> Setup:
    """``calibrate_on``: "train" (the first 400 training digits, inputs the model was trained on) or "val"
    (the first 400 validation digits, like the unseen test digits new to the model)."""
    from safetensors.torch import load_file, save_file

    from mpolstm.harness.tasks.seqcls import make_task
    from mpolstm.harness.training.loop import fit, seed_everything

    task = make_task("quick", seed=0)
    seed_everything(0)
    model = task.build_model()
    cache = RESULTS / "seqmnist_quick_seed0.safetensors"  # ignored by git (results/)
    if cache.is_file():
        model.load_state_dict(load_file(str(cache)))
    else:
        fit(model, task.train_loader, task.val_loader, task.loss_fn, task.metric, epochs=task.dense_epochs,
            lr=task.lr, optimizer=task.optimizer, grad_clip=task.grad_clip, seed=0, progress=False)
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(cache))
    train_x = task.train_loader.dataset.tensors[0]
    test, val = task.test_loader.dataset.tensors, task.val_loader.dataset.tensors
    unseen = list(zip(test[0].split(100), test[1].split(100)))
    calibration = (train_x if calibrate_on == "train" else val[0])[:400]
    return Setup("seqmnist" if calibrate_on == "train" else "seqmnist-val", model.eval(), "lstm",
                 list(calibration.split(50)), [x for x, _ in unseen],
                 lambda small: _accuracy(small, unseen), "accuracy", lambda small: _accuracy(small, [val])[0],
                 "the seqcls task's quick preset (sequential MNIST, 28 rows of 28, LSTM 128), trained 10 epochs, "
                 f"seed 0, one thread; its LSTM compressed; 8 calibration batches of 50 {calibrate_on} digits; "
                 "unseen: the 1,000 test digits (10 batches of 100); metric: test accuracy; max_drop on the 500 "
                 "validation digits")


def _speller_class() -> type:
    """docs/tutorial.md's Speller, from the tutorial's first Python block (so it is the tutorial's model)."""
    block = re.search(r"```python\n(.*?)```", (ROOT / "docs" / "tutorial.md").read_text(), re.S)
    namespace: dict[str, Any] = {}
    exec(block.group(1), namespace)  # noqa: S102 - the repository's own tutorial
    return namespace["Speller"]


def speller_data(gen: torch.Generator, rows: int, tokens: int = 6) -> tuple[tuple, torch.Tensor]:
    """Synthetic transcription: ``tokens`` tokens (1..63) spoken 5 frames each: 32 feature channels a fixed
    random prototype of the token plus noise, 8 a one-hot of the segment. ((feats (N, 40, 5L), previous
    tokens (N, L): 0 then the first L - 1), targets (N, L))."""
    prototypes = torch.randn(64, 32, generator=torch.Generator().manual_seed(123))
    y = torch.randint(1, 64, (rows, tokens), generator=gen)
    sound = prototypes[y].repeat_interleave(5, 1) + 0.5 * torch.randn(rows, 5 * tokens, 32, generator=gen)
    where = nn.functional.one_hot(torch.arange(tokens).repeat_interleave(5), 8).float().expand(rows, -1, -1)
    feats = torch.cat([sound, where], -1).transpose(1, 2)
    return (feats, torch.cat([torch.zeros(rows, 1, dtype=torch.long), y[:, :-1]], 1)), y


def tutorial_setup(steps: int = 600) -> Setup:
    torch.manual_seed(0)
    model, gen = _speller_class()(), torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(steps):
        inputs, y = speller_data(gen, 32)
        loss = nn.functional.cross_entropy(model(*inputs).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    gen = torch.Generator().manual_seed(1)
    calibration = [speller_data(gen, 16)[0] for _ in range(8)]
    unseen = [speller_data(gen, 64) for _ in range(16)]
    held = speller_data(gen, 256)

    def accuracy(small: nn.Module, batches: list) -> list[float]:
        with torch.no_grad():
            return [float((small(*x).argmax(-1) == y).float().mean()) for x, y in batches]

    return Setup("tutorial", model, None, calibration, [x for x, _ in unseen], lambda small: accuracy(small, unseen),
                 "token accuracy", lambda small: accuracy(small, [held])[0],
                 f"docs/tutorial.md's Speller (Conv1d front, LSTMCell attention decoder, tied embedding/output), "
                 f"trained {steps} Adam steps (seed 0) to transcribe 6 tokens of 5 noisy frames each; default "
                 "target modules; 8 calibration batches of 16; unseen: 16 batches of 64; metric: token accuracy; "
                 "max_drop on 256 other sequences")


SETUPS = {"g2p": g2p_setup, "ocr": ocr_setup, "seqmnist": seqmnist_setup,
          "seqmnist-val": lambda: seqmnist_setup("val"), "tutorial": tutorial_setup}


def main() -> None:
    parser = arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--model", choices=sorted(SETUPS), required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    run(SETUPS[args.model](), args)


if __name__ == "__main__":
    main()
