"""Issue 32 on the two speech ONNX models (NSNet2 16 kHz, DTLN's two per-frame files): the default calibrated
compress (held-out decision) against the old default (allocation="per-matrix", whitened on every calibration
batch, measured on the odd ones: ``validation=`` them) and uncalibrated, reported against
unseen output error and SI-SDR; tolerance mode against a dense sweep; the CLI once.

    OMP_NUM_THREADS=1 python benchmarks/bench_speech_decision.py --model nsnet2 [--parts table1 tolerance sweep drop cli]
    OMP_NUM_THREADS=1 python benchmarks/bench_speech_decision.py --model dtln --sweep-points 8

Data: the quick speech corpus. Calibration: 8 batches (compress holds every second one out). NSNet2: 200-frame
crops of train utterances 0-63, 8 a batch (the first 8 batches); DTLN: each model's inputs along the original
pipeline of train utterances 0-63, the ``--crop`` (32) frames in the middle of each (run from zero states), 8
utterances a batch (8 whole utterances, one a batch, held out 4 utterances without white noise: too few to decide on). Unseen
(disjoint, same distribution): train utterances 64-159 (NSNet2: their 200-frame crops for the error, the whole
utterances for SI-SDR) / 64-111 (DTLN: whole utterances). Errors ||y' - y|| / ||y|| of each model's first output
(NSNet2's gain, DTLN's mask / output frames) over every unit (crop or utterance); noise: per-unit paired
differences, mean +- 2 standard errors. Metric: SI-SDR (dB) of the enhanced audio against the original model's
enhanced audio (DTLN: both compressed files in the chain). ``drop``: ``compress(..., evaluate=fn, max_drop=d)`` with
fn the mean SI-SDR against clean speech (dB) on the val + test utterances (28, not the unseen set); within on
unseen: the drop of that metric on the unseen utterances. ``cli``: ``mpolstm compress FILE OUT --ratio 10
[--calibrate inputs]``, its printed output error against the written file's unseen error.
Writes benchmarks/results/issue32_<model>.json (parts merged into it) and prints Markdown tables.
"""

import argparse
import copy
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import mpolstm
import mpolstm.onnx as mo
from mpolstm.harness.audio import si_sdr
from mpolstm.harness.data.speech import load_corpus

ROOT = Path(__file__).resolve().parents[1]
METHODS = (("uncalibrated", "error", False), ("old default", "per-matrix", True), ("default", "error", True))


def _example(name: str) -> None:
    path = str(ROOT / "examples" / name)
    if path not in sys.path:
        sys.path.insert(0, path)


def rel_errors(outs, refs) -> tuple[float, list[float]]:
    """(||y' - y|| / ||y|| over all units, the same per unit)."""
    num = [float((o.double() - r.double()).pow(2).sum()) for o, r in zip(outs, refs)]
    den = [float(r.double().pow(2).sum()) for r in refs]
    return math.sqrt(sum(num) / sum(den)), [math.sqrt(n / max(d, 1e-30)) for n, d in zip(num, den)]


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a - b per unit and its standard error."""
    d = np.asarray(a) - np.asarray(b)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


class NSNet2:
    """One model (the 16 kHz file), its two GRUs compressed; units: crops (error), utterances (SI-SDR)."""

    name, labels = "nsnet2", ("gain",)

    def __init__(self) -> None:
        _example("nsnet2")
        from nsnet2 import FRONT_ENDS, model_file
        from table import _batches, _crops

        corpus = load_corpus(preset="quick")
        train = corpus["train"]
        self.files = [model_file(16000)]
        self.originals = [mo.load(self.files[0])]
        self.targets = [mo.recurrent_layers(self.originals[0])]
        self.calib = [[b.float() for b in _batches(_crops(train.noisy[:64], 16000, 200), 8, shuffle=False)[:8]]]
        self.front = FRONT_ENDS[16000]
        self.crops = torch.stack(_crops(train.noisy[64:160], 16000, 200)).float()
        self.audio = [train[k] for k in range(64, 160)]
        self.held = [corpus["val"][k] for k in range(len(corpus["val"]))] + \
            [corpus["test"][k] for k in range(len(corpus["test"]))]
        with torch.no_grad():
            self.ref = self.originals[0](self.crops)
        self.ref_audio = [self.enhance(self.originals[0], x) for x, _ in self.audio]
        self.clean_base = {key: self._clean_sdr(self.originals[0], pairs) for key, pairs in
                           (("held", self.held), ("unseen", self.audio))}

    def enhance(self, model, x: np.ndarray) -> np.ndarray:
        from nsnet2 import enhance

        with torch.no_grad():
            return enhance(lambda f: model(torch.from_numpy(f).float()).numpy(), x, self.front)

    def _clean_sdr(self, model, pairs) -> float:
        return float(np.mean([si_sdr(self.enhance(model, x), clean) for x, clean in pairs]))

    def error(self, k: int, model) -> tuple[float, list[float]]:
        with torch.no_grad():
            out = model(self.crops)
        return rel_errors(list(out), list(self.ref))

    def unseen(self, models) -> dict:
        total, units = self.error(0, models[0])
        sdr = [si_sdr(self.enhance(models[0], x), ref) for (x, _), ref in zip(self.audio, self.ref_audio)]
        return {"errors": [total], "units": [units], "sdr": sdr}

    def metric(self, k: int):
        return lambda model: self._clean_sdr(model, self.held)

    def unseen_drop(self, k: int, model) -> float:
        return self.clean_base["unseen"] - self._clean_sdr(model, self.audio)

    def cli_inputs(self, folder: Path) -> list[Path]:
        from enhance import write_calibration

        return [write_calibration(folder / "calib.safetensors")]


class DTLN:
    """Two per-frame models (model_1: mask, model_2: output frames), each compressed on its own inputs along the
    original pipeline; units: utterances; the metric runs both in the chain."""

    name, labels = "dtln", ("model_1 mask", "model_2 frames")

    def __init__(self, crop: int) -> None:
        _example("dtln")
        from dtln import model_file
        from table import _sequences, lstm_layers

        corpus = load_corpus(preset="quick")
        train = corpus["train"]
        self.files = [model_file(f"model_{k}.onnx") for k in (1, 2)]
        self.originals = [mo.load(f) for f in self.files]
        self.targets = [lstm_layers(m) for m in self.originals]
        self.crop, self.crop_refs = crop, {}
        whole = _sequences(train.noisy[:64], None)
        self.calib = [[Crops([mid(s, crop) for s in seqs[j:j + 8]]) for j in range(0, 64, 8)] for seqs in whole]
        sessions = self.sessions(self.originals)
        self.audio = [self._record(sessions, *train[k]) for k in range(64, 112)]
        self.held = [self._record(sessions, *corpus[s][k]) for s in ("val", "test") for k in range(len(corpus[s]))]
        self.clean_base = {key: float(np.mean([si_sdr(u["enhanced"], u["clean"]) for u in units]))
                           for key, units in (("held", self.held), ("unseen", self.audio))}

    @staticmethod
    def sessions(models) -> list:
        from dtln import ort_session

        return [ort_session(m if isinstance(m, Path) else mo.to_bytes(m)) for m in models]

    @staticmethod
    def frames(session, inputs: np.ndarray) -> np.ndarray:
        """The session's first output for each frame (T, features), states carried from zero."""
        from dtln import ort_step

        step = ort_step(session)
        return np.stack([step(frame).reshape(-1) for frame in inputs])

    @staticmethod
    def _audio(spec: np.ndarray, masks: np.ndarray, session_2, length: int) -> tuple[np.ndarray, np.ndarray]:
        """(model_2's inputs, the enhanced signal) of the blocks' spectra under ``masks``."""
        from dtln import BLOCK, LATENCY, overlap_add

        masked = np.fft.irfft(masks * spec, n=BLOCK).astype(np.float32)
        outs = DTLN.frames(session_2, masked)
        return masked, overlap_add(outs)[LATENCY:LATENCY + length]

    def _record(self, sessions, noisy: np.ndarray, clean: np.ndarray) -> dict:
        from dtln import blocks

        spec = np.fft.rfft(blocks(noisy))
        mags = np.abs(spec).astype(np.float32)
        masks = self.frames(sessions[0], mags)
        masked, enhanced = self._audio(spec, masks, sessions[1], len(noisy))
        outs = self.frames(sessions[1], masked)
        return {"spec": spec, "inputs": [mags, masked], "outputs": [masks, outs], "enhanced": enhanced,
                "clean": clean, "length": len(noisy)}

    def error(self, k: int, model, session=None) -> tuple[float, list[float]]:
        session = session or self.sessions([model])[0]
        outs = [torch.from_numpy(self.frames(session, u["inputs"][k])) for u in self.audio]
        return rel_errors(outs, [torch.from_numpy(u["outputs"][k]) for u in self.audio])

    def _enhanced(self, u: dict, sessions) -> np.ndarray:
        masks = self.frames(sessions[0], u["inputs"][0])
        return self._audio(u["spec"], masks, sessions[1], u["length"])[1]

    def unseen(self, models) -> dict:
        sessions = self.sessions(models)
        errors = [self.error(k, None, sessions[k]) for k in (0, 1)]
        sdr = [si_sdr(self._enhanced(u, sessions), u["enhanced"]) for u in self.audio]
        return {"errors": [e[0] for e in errors], "units": [e[1] for e in errors], "sdr": sdr,
                "crop_errors": [self.crop_error(k, sessions[k]) for k in (0, 1)]}

    def _crop(self, u: dict, k: int) -> np.ndarray:
        frames = u["inputs"][k]
        start = max(0, len(frames) // 2 - self.crop // 2)
        return frames[start:start + self.crop]

    def crop_error(self, k: int, session) -> float:
        """The error on the unseen utterances' middle crops run from zero states, like the calibration's."""
        if k not in self.crop_refs:
            ref = self.sessions(self.originals)[k]
            self.crop_refs[k] = [torch.from_numpy(self.frames(ref, self._crop(u, k))) for u in self.audio]
        outs = [torch.from_numpy(self.frames(session, self._crop(u, k))) for u in self.audio]
        return rel_errors(outs, self.crop_refs[k])[0]

    def _clean_sdr(self, k: int, model, units) -> float:
        """Mean SI-SDR against clean speech with model ``k`` replaced by ``model`` (the other the original)."""
        sessions = self.sessions([model if j == k else m for j, m in enumerate(self.originals)])
        return float(np.mean([si_sdr(self._enhanced(u, sessions), u["clean"]) for u in units]))

    def metric(self, k: int):
        return lambda model: self._clean_sdr(k, model, self.held)

    def unseen_drop(self, k: int, model) -> float:
        return self.clean_base["unseen"] - self._clean_sdr(k, model, self.audio)

    def cli_inputs(self, folder: Path) -> list[Path]:
        """Per model one sequence of frames (T, 1, 1, features): the calibration crops end to end."""
        from safetensors.torch import save_file

        paths = []
        for k, sequences in enumerate(self.calib):
            paths.append(folder / f"calib_{k + 1}.safetensors")
            frames = [s.inputs[0] for batch in sequences for s in batch.sequences]
            save_file({"input0": torch.cat(frames).contiguous()}, str(paths[-1]))
        return paths


def mid(sequence, crop: int):
    """The ``crop`` frames in the middle of an utterance's sequence (run from zero states)."""
    start = max(0, len(sequence) // 2 - crop // 2)
    return type(sequence)(tuple(x[start:start + crop] for x in sequence.inputs), sequence.pairs)


class Crops:
    """A calibration batch of several frame sequences, each run from zero states."""

    def __init__(self, sequences: list) -> None:
        self.sequences = sequences

    def __call__(self, model) -> None:
        for sequence in self.sequences:
            sequence.run(model)


def compress(bench, k: int, ratio: float | None, allocation: str = "error", calibrated: bool = True, **extra):
    """(model, report, seconds) of one compress of model ``k``."""
    config = mpolstm.CompressionConfig(target_modules=bench.targets[k], target_ratio=ratio, allocation=allocation,
                                       max_output_error=extra.pop("max_output_error", None))
    start = time.perf_counter()
    model, report = mpolstm.compress(copy.deepcopy(bench.originals[k]), config,
                                     calibration=bench.calib[k] if calibrated else None, **extra)
    return model, report, time.perf_counter() - start


def _check(report) -> dict:
    check = report.output_check
    if check is None:
        return {"error": None, "on": "none", "per_batch": []}
    on = "synthetic" if check.source.startswith("synthetic") else f"{check.batches} held out" if \
        check.source.startswith("held-out") else f"{check.batches} odd, also fitted on"
    return {"error": check.error, "on": on, "per_batch": list(check.per_batch)}


def table1(bench, ratios) -> list[dict]:
    rows = []
    for ratio in ratios:
        for name, allocation, calibrated in METHODS:
            models, reports, seconds = [], [], 0.0
            for k in range(len(bench.originals)):
                # the default at filing time: per-matrix, whitened on every batch, measured on the odd ones
                extra = {"validation": bench.calib[k][1::2]} if name == "old default" else {}
                model, report, took = compress(bench, k, ratio, allocation, calibrated, **extra)
                models.append(model)
                reports.append(report)
                seconds += took
            unseen = bench.unseen(models)
            rows.append({"ratio": ratio, "method": name, "seconds": seconds, **unseen,
                         "kept": [r.allocation.chosen if r.allocation else "-" for r in reports],
                         "notes": [r.allocation.note if r.allocation else "" for r in reports],
                         "reported": [_check(r) for r in reports], "ratio_kept": [r.ratio for r in reports]})
            _print_row1(bench, rows[-1])
    return rows


def _print_row1(bench, r: dict) -> None:
    reported = " / ".join("-" if c["error"] is None else f"{c['error']:.4f}" for c in r["reported"])
    unseen = " / ".join(f"{e:.4f}" for e in r["errors"])
    if "crop_errors" in r:
        unseen += " (crops " + " / ".join(f"{e:.4f}" for e in r["crop_errors"]) + ")"
    print(f"| {r['ratio']:g}x | {r['method']} | {' / '.join(r['kept'])} | {reported} ({r['reported'][0]['on']}) | "
          f"{unseen} | {np.mean(r['sdr']):.2f} | {r['seconds']:.1f} |", flush=True)


def compare(bench, rows) -> list[dict]:
    """Per ratio: default against uncalibrated and old default on unseen data (paired, per unit), reported against
    unseen, default's time against old default's."""
    out = []
    for ratio in sorted({r["ratio"] for r in rows}):
        by = {r["method"]: r for r in rows if r["ratio"] == ratio}
        if len(by) < 3:
            continue
        d = by["default"]
        row = {"ratio": ratio, "time_x": d["seconds"] / by["old default"]["seconds"],
               "reported_dev": [c["error"] / e - 1 for c, e in zip(d["reported"], d["errors"])]}
        for other in ("uncalibrated", "old default"):
            row[other] = {"error": [paired(a, b) for a, b in zip(d["units"], by[other]["units"])],
                          "sdr": paired(by[other]["sdr"], d["sdr"])}  # > 0: default worse
        out.append(row)
    return out


def _worse(pair: tuple[float, float]) -> str:
    mean, se = pair
    return f"{mean:+.4f} ± {2 * se:.4f}" + (" WORSE" if mean > 2 * se else "")


def print_compare(rows) -> None:
    print("| ratio | output | default − uncalibrated | default − old default | reported / unseen − 1 |")
    print("|---:|---|---:|---:|---:|")
    for c in rows:
        for k, dev in enumerate(c["reported_dev"]):
            print(f"| {c['ratio']:g}x | error {k + 1} | {_worse(c['uncalibrated']['error'][k])} | "
                  f"{_worse(c['old default']['error'][k])} | {dev:+.1%} |")
        print(f"| {c['ratio']:g}x | SI-SDR loss (dB) | {_worse(c['uncalibrated']['sdr'])} | "
              f"{_worse(c['old default']['sdr'])} | time x old default {c['time_x']:.2f} |", flush=True)


def sweep(bench, points: int) -> list[list[dict]]:
    grid = [float(r) for r in np.geomspace(1.1, 64, points)]
    result = []
    for k in range(len(bench.originals)):
        rows = []
        for ratio in grid:
            model, report, took = compress(bench, k, ratio)
            rows.append({"ratio": ratio, "reported": report.output_check.error, "unseen": bench.error(k, model)[0],
                         "mpo_params": report.mpo_params, "seconds": took, **_crops(bench, k, model)})
            print(f"sweep {bench.labels[k]} {ratio:.2f}x: reported {rows[-1]['reported']:.4f}, unseen "
                  f"{rows[-1]['unseen']:.4f}, {report.mpo_params:,} params, {took:.1f} s", flush=True)
        result.append(rows)
    return result


def tolerance(bench, tolerances) -> list[dict]:
    rows = []
    for k in range(len(bench.originals)):
        for tol in tolerances:
            rows.append(_tolerance_row(bench, k, tol, max_output_error=tol))
    return rows


def drop(bench, max_drops: list[float]) -> list[dict]:
    rows = []
    for k in range(len(bench.originals)):
        for max_drop in max_drops:
            rows.append(_tolerance_row(bench, k, max_drop, evaluate=bench.metric(k), max_drop=max_drop))
            rows[-1]["held_base"] = bench.clean_base["held"]
    return rows


def _crops(bench, k: int, model) -> dict:
    """DTLN: the unseen error on the calibration's kind of data (the unseen utterances' middle crops)."""
    return {"unseen_crops": bench.crop_error(k, bench.sessions([model])[0])} if isinstance(bench, DTLN) else {}


def _tolerance_row(bench, k: int, tol: float, **extra) -> dict:
    row = {"model": bench.labels[k], "tolerance": tol, "kind": "drop" if "evaluate" in extra else "error"}
    start = time.perf_counter()
    try:
        model, report, _ = compress(bench, k, None, **extra)
    except ValueError as exc:
        row.update(refused=str(exc), seconds=time.perf_counter() - start)
        print(f"tolerance {row}", flush=True)
        return row
    row.update(seconds=time.perf_counter() - start, kept_ratio=report.ratio, mpo_params=report.mpo_params,
               reported=report.output_check.error, curve=[list(p) for p in report.curve],
               unseen=bench.error(k, model)[0], **_crops(bench, k, model))
    if row["kind"] == "drop":
        row["unseen_drop"] = bench.unseen_drop(k, model)
        row["within"] = row["unseen_drop"] <= tol
    else:
        row["within"] = row["unseen"] <= tol
        if "unseen_crops" in row:
            row["within_on_crops"] = row["unseen_crops"] <= tol
    print(f"tolerance {json.dumps({key: v for key, v in row.items() if key != 'curve'})}", flush=True)
    return row


def summarize_tolerance(rows, sweeps, labels) -> None:
    """Adds to each error-tolerance row the sweep's smallest model within it on unseen data."""
    for row in rows:
        if row["kind"] != "error" or not sweeps:
            continue
        curve = sweeps[labels.index(row["model"])]
        ok = [s for s in curve if s["unseen"] <= row["tolerance"]]
        best = min(ok, key=lambda s: s["mpo_params"]) if ok else None
        row["sweep_best"] = None if best is None else {"ratio": best["ratio"], "mpo_params": best["mpo_params"]}
        if best is not None and "mpo_params" in row:
            row["size_x_best"] = row["mpo_params"] / best["mpo_params"]
        on_crops = [s for s in curve if s.get("unseen_crops", math.inf) <= row["tolerance"]]
        if on_crops and "mpo_params" in row:  # DTLN: the same against the sweep's error on crops
            row["size_x_best_crops"] = row["mpo_params"] / min(s["mpo_params"] for s in on_crops)


def print_tolerance(rows) -> None:
    print("| model | tolerance | kept ratio | reported | unseen error (drop dB) | within on unseen | candidates | "
          "sweep best (unseen) | size / best | time s |")
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        tol = f"{r['tolerance']:g}" + (" dB drop" if r["kind"] == "drop" else "")
        best = r.get("sweep_best")
        best = "-" if best is None else f"{best['ratio']:.2f}x"
        if "refused" in r:
            print(f"| {r['model']} | {tol} | refused | - | - | - | - | {best} | - | {r['seconds']:.0f} |")
            continue
        unseen = f"{r['unseen']:.4f}" + (f" ({r['unseen_drop']:+.3f})" if r["kind"] == "drop" else "")
        size = f"{r['size_x_best']:.2f}" if "size_x_best" in r else "-"
        print(f"| {r['model']} | {tol} | {r['kept_ratio']:.2f}x | {r['reported']:.4f} | {unseen} | "
              f"{'yes' if r['within'] else 'NO'} | {len(r['curve'])} | {best} | {size} | {r['seconds']:.0f} |")


def cli(bench) -> list[dict]:
    """``mpolstm compress FILE OUT --ratio 10`` with and without --calibrate: printed error against unseen."""
    exe = str(Path(sys.executable).parent / "mpolstm")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        calibs = bench.cli_inputs(folder)
        for calibrated in (False, True):
            models, row = [], {"calibrated": calibrated, "printed": [], "warned": [], "inspect": []}
            for k, source in enumerate(bench.files):
                out = folder / f"out_{k}_{calibrated}.onnx"
                cmd = [exe, "compress", str(source), str(out), "--ratio", "10"]
                if len(bench.files) > 1:
                    cmd += ["--target", ",".join(bench.targets[k])]
                if calibrated:
                    cmd += ["--calibrate", str(calibs[k])]
                done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                text = done.stdout + done.stderr
                found = re.search(r"model output error: ([0-9.]+)", text)
                row["printed"].append(float(found.group(1)) if found else None)
                row["warned"].append([line for line in text.splitlines() if "warn" in line.lower()])
                shown = subprocess.run([exe, "inspect", str(out)], capture_output=True, text=True, check=True).stdout
                row["inspect"].append([line for line in shown.splitlines() if "model output error" in line])
                # DTLN's written files run in onnxruntime from the file, as the package runs them
                models.append(out if isinstance(bench, DTLN) else mo.load(out))
            row.update(bench.unseen(models))
            rows.append(row)
            print(f"cli calibrated={calibrated}: printed {row['printed']}, unseen {row['errors']}, SI-SDR "
                  f"{np.mean(row['sdr']):.2f} dB, warnings {row['warned']}, inspect {row['inspect']}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("nsnet2", "dtln"), default="nsnet2")
    parser.add_argument("--parts", nargs="+", default=["table1", "sweep", "tolerance", "drop", "cli"])
    parser.add_argument("--ratios", type=float, nargs="+", default=[2, 5, 10, 30])
    parser.add_argument("--tolerances", type=float, nargs="+", default=[0.01, 0.05, 0.2])
    parser.add_argument("--max-drop", type=float, nargs="+", default=[0.1, 0.5],
                        help="dB of SI-SDR against clean speech")
    parser.add_argument("--crop", type=int, default=32, help="DTLN: frames per calibration utterance")
    parser.add_argument("--sweep-points", type=int, default=18)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    bench = NSNet2() if args.model == "nsnet2" else DTLN(args.crop)
    out = args.out or ROOT / "benchmarks" / "results" / f"issue32_{bench.name}.json"
    doc = json.loads(out.read_text()) if out.exists() else {}
    print(f"data in {time.perf_counter() - start:.0f} s; calibration batches {[len(c) for c in bench.calib]}; "
          f"clean SI-SDR of the original {bench.clean_base}", flush=True)

    def save(key, value) -> None:
        doc[key] = value
        doc.setdefault("meta", {})[key] = {"argv": sys.argv[1:], "torch": torch.__version__}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1))

    if "table1" in args.parts:
        print("| ratio | method | kept | reported error (on) | unseen error | SI-SDR vs original (dB) | time s |")
        print("|---:|---|---|---:|---:|---:|---:|")
        rows = table1(bench, args.ratios)
        save("table1", rows)
        save("compare", compare(bench, rows))
        print_compare(doc["compare"])
    if "sweep" in args.parts:
        save("sweep", sweep(bench, args.sweep_points))
    if "tolerance" in args.parts:
        save("tolerance", tolerance(bench, args.tolerances))
    if "drop" in args.parts:
        save("drop", drop(bench, args.max_drop))
    if "tolerance" in args.parts or "drop" in args.parts or "sweep" in args.parts:
        rows = doc.get("tolerance", []) + doc.get("drop", [])
        summarize_tolerance(rows, doc.get("sweep"), list(bench.labels))
        print_tolerance(rows)
    if "cli" in args.parts:
        save("cli", cli(bench))
    print(f"done in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
