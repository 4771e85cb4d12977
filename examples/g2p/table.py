"""MPO compression of g2p-en's GRU against truncated SVD, pruning and int8, with and without distillation.

    python examples/g2p/table.py --out examples/g2p/results/table.json

prints a Markdown table (and writes it next to the JSON as ``.md``) with, per method and ratio:
the stored numbers of the four GRU weight matrices (encoder / decoder ``weight_ih_l0``,
``weight_hh_l0``; 786,432 dense entries, 94% of the model), their bytes, and agreement (share
of the 2,000 evaluation words predicted exactly as by the original model), PER and WER
against CMUdict (see evaluate.py). Embeddings, biases and ``fc`` stay dense float32 in every
row except int8, which also quantizes ``fc`` (torch's dynamic quantization of nn.GRU and
nn.Linear); their bytes are not counted anywhere.

Methods (a ratio r: at most 786,432 / r stored numbers over the four matrices):

* ``mpo``: ``mpolstm.compress(model, CompressionConfig(target_modules=["encoder", "decoder"],
  target_ratio=r))``: layout search per weight, layout and bonds allocated by weight error.
* ``mpo-calibrated``: the same with ``calibration=`` a callable that runs the original model
  teacher-forced on the 200 calibration words, one word at a time (no padding: every step
  the GRUs see is a step they take in use), the decoder inputs being <s> + the original
  model's own greedy output, i.e. exactly the inputs of greedy decoding.
* ``svd``: truncated SVD per matrix at rank floor(m n / (r (m + n))) (baselines.svd_compress).
* ``prune-layerwise`` / ``prune-global``: L1 magnitude pruning per matrix / over the four
  (baselines; torch.nn.utils.prune, masks kept as forward pre-hooks).
* ``int8``: dense int8 dynamic quantization (baselines.quantize_int8), once.
* ``mpo-output`` / ``mpo-output-refit``: calibrated with ``allocation="output"`` on the calibration
  words in 8 batches of callables (the held-out half's output error picks per-matrix, uniform or
  sensitivity-weighted allocation), without /
  with ``refit=True`` (each weight refitted to the inputs the compressed upstream feeds it).
* ``hybrid``: calibrated ``layout="lowrank+sparse"``, ``sparse_share=--sparse-share``.

Bytes: float32 = 4 bytes per stored number (MPO cores, SVD factors, dense). int8: 1 byte per
entry plus a 4-byte scale and a 4-byte zero point per tensor (per-tensor affine; per row if
the quantizer used per-channel). Pruning: 4 bytes per kept value plus, per matrix, the
smaller of a bitmask (one bit per entry) and CSR indices (the column index of every kept
value and rows + 1 row pointers, each in the narrowest unsigned integer that fits: 1 byte
for 256 columns) -- the most favourable standard encoding for pruning.

Distillation (``--distill-ratios``, default 10 and 30, then 5): ``mpolstm.distill`` for
EVERY method with the same budget: the same list of batches (64 distillation words each,
fixed order), the same steps, lr, temperature 1, KL loss, and the same ``forward``: logits
of the teacher-forced decoder at the real positions (decoder inputs <s> + the teacher's
greedy output, up to its </s>). All parameters of the student train (embeddings, biases and
fc included); the compressed structure is kept: MPO cores and SVD factors keep their
shapes, pruning masks stay as torch.nn.utils.prune pre-hooks. Each run is checked
afterwards (masks unchanged and applied, parameter counts unchanged). Defaults: 1,200 steps
(the slowest student, MPO, stays under 5 CPU-minutes per run with one thread), Adam lr 3e-3
constant (mpolstm.distill has no schedule; in 400-step probes at 10x, 3e-3 was better than
1e-3 for pruning and equal for SVD and MPO, so the choice does not favour MPO).

``--diagnostics`` adds, without fine-tuning, ``mpo-calibrated-uniform``: calibrated low rank
at the SVD's uniform rank (``max_bond=rank, layout="lowrank"``), which separates the gain of
calibration (whitening) from the budget allocation across the four matrices; and
``prune-layerwise-bytes``: layer-wise pruning at the same *bytes* as a ratio-r float32
factorisation (values + index within 4 floor(numel / r) bytes per matrix), also available to
``--distill-methods``.

Timing: ``torch.set_num_threads(1)`` (``--threads``) on a shared 2-core machine; every
row records its wall and CPU seconds (compression or compression + distillation; the
evaluation on 2,000 words is reported separately).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import prune

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # run as a script or imported from elsewhere
    sys.path.insert(0, _HERE)
from baselines import (
    GRU_WEIGHTS,
    prune_global,
    prune_layerwise,
    quantize_int8,
    svd_compress,
    svd_rank,
)
from evaluate import evaluate, predict, split_words
from g2p_model import G2PModel, decoder_inputs, encode_words, load_g2p

import mpolstm
from mpolstm.storage import pack_weights, packed_bytes

__all__ = [
    "MATRICES",
    "calibration_fn",
    "compress_mpo",
    "distill_batches",
    "distill_forward",
    "gru_bytes",
    "gru_params",
    "int8_bytes",
    "keep_for_bytes",
    "main",
    "prune_layerwise_bytes",
    "pruned_bytes",
    "structure",
]

MATRICES = tuple(f"{gru}.{w}" for gru in ("encoder", "decoder") for w in GRU_WEIGHTS)
SHORT = {"encoder.weight_ih_l0": "enc ih", "encoder.weight_hh_l0": "enc hh",
         "decoder.weight_ih_l0": "dec ih", "decoder.weight_hh_l0": "dec hh"}
DENSE_PARAMS = 4 * 768 * 256
FLOAT_BYTES = 4


# ----------------------------------------------------------------------------- compression


def calibration_fn(words: Sequence[str], teacher: G2PModel) -> Callable[[nn.Module], None]:
    """A callable for ``compress(calibration=...)``: runs the model teacher-forced on each
    word alone (no padding), decoder inputs <s> + ``teacher``'s greedy output. With the
    original model as the one run, these are exactly the steps of its greedy decoding."""
    words = list(words)
    outputs = predict(teacher, words)

    def run(model: nn.Module) -> None:
        with torch.no_grad():
            for word, phonemes in zip(words, outputs):
                model.teacher_forced_logits([word], [phonemes])
    return run


def compress_mpo(ratio: float, calibration: Callable[[nn.Module], None] | None = None):
    """(model, report): a fresh g2p model with its two GRUs compressed by mpolstm."""
    config = mpolstm.CompressionConfig(target_modules=["encoder", "decoder"], target_ratio=ratio)
    model, report = mpolstm.compress(load_g2p(), config, calibration=calibration)
    return model.eval(), report


def mpo_layouts(report) -> str:
    """"enc ih lowrank(22), enc hh ..." from a CompressionReport."""
    parts = []
    for module in report.modules:
        for wname, w in module.weights.items():
            bonds = ",".join(map(str, w.bond_dims)) + (f"+{w.sparse_params}" if w.sparse_params else "")
            parts.append(f"{SHORT[f'{module.name}.{wname}']} {w.layout}({bonds})")
    return "; ".join(parts)


def mpo_weights(report) -> dict[str, dict]:
    return {f"{m.name}.{wname}": {"layout": w.layout, "bonds": list(w.bond_dims), "params": w.mpo_params, "sparse": w.sparse_params,
                                  "rel_error": w.rel_error, "output_error": w.output_error}
            for m in report.modules for wname, w in m.weights.items()}


# ----------------------------------------------------------------------------- sizes


def _uint_bytes(max_value: int) -> int:
    """Narrowest of 1, 2, 4, 8 bytes whose unsigned range holds ``max_value``."""
    for size in (1, 2, 4, 8):
        if max_value < 256 ** size:
            return size
    raise ValueError(max_value)


def pruned_bytes(mask: Tensor) -> dict[str, int]:
    """Bytes of one pruned float32 matrix with this 0/1 mask (rows, cols): 4 per kept value
    plus the smaller index: bitmask ceil(rows cols / 8) or CSR (kept column indices and
    rows + 1 row pointers in the narrowest unsigned ints)."""
    rows, cols = mask.shape
    nnz = int(torch.count_nonzero(mask))
    bitmask = math.ceil(rows * cols / 8)
    csr = nnz * _uint_bytes(cols - 1) + (rows + 1) * _uint_bytes(nnz)
    index = min(bitmask, csr)
    return {"values": nnz * FLOAT_BYTES, "index": index, "index_kind": "bitmask" if bitmask <= csr else "csr",
            "total": nnz * FLOAT_BYTES + index}


def keep_for_bytes(rows: int, cols: int, nbytes: int) -> int:
    """Most entries a pruned float32 (rows, cols) matrix may keep within ``nbytes``
    (values + the smaller index, as :func:`pruned_bytes`)."""
    lo, hi = 0, rows * cols
    while lo < hi:  # pruned bytes grow with the kept count
        mid = (lo + hi + 1) // 2
        mask = torch.zeros(rows * cols)
        mask[:mid] = 1
        if pruned_bytes(mask.reshape(rows, cols))["total"] <= nbytes:
            lo = mid
        else:
            hi = mid - 1
    return lo


def prune_layerwise_bytes(model: G2PModel, ratio: float) -> G2PModel:
    """Layer-wise L1 pruning at the float32 byte budget of a ratio-r factorisation: each
    matrix keeps the most entries whose values + index fit in 4 floor(numel / r) bytes. In place."""
    for key in MATRICES:
        module, name = _matrix_owner(model, key)
        rows, cols = getattr(module, name).shape
        keep = keep_for_bytes(rows, cols, FLOAT_BYTES * math.floor(rows * cols / ratio))
        prune.l1_unstructured(module, name, amount=rows * cols - keep)
    return model


def _matrix_owner(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    gru, name = key.split(".")
    return getattr(model, gru), name


def gru_params(model: nn.Module, report=None) -> int:
    """Stored numbers of the four GRU matrices: MPO cores (from the report), low-rank
    factors, kept entries (pruned) or all entries (dense)."""
    if report is not None:
        return report.mpo_params
    total = 0
    for key in MATRICES:
        module, name = _matrix_owner(model, key)
        if hasattr(module, name + "_u"):
            total += getattr(module, name + "_u").numel() + getattr(module, name + "_v").numel()
        elif hasattr(module, name + "_mask"):
            total += int(torch.count_nonzero(getattr(module, name + "_mask")))
        else:
            total += getattr(module, name).numel()
    return total


def gru_bytes(model: nn.Module, report=None) -> tuple[int, str]:
    """(bytes, note) of the four GRU matrices of a float32 model (MPO, SVD, pruned, dense); an
    mpolstm model's as ``mpolstm.storage.pack_weights`` stores them (cores, and a hybrid's sparse
    part as values + the smaller of a CSR and a bitmask index)."""
    if report is not None:
        tensors, formats = pack_weights(model, ["encoder", "decoder"])
        kinds = sorted({f for k, f in formats.items() if k.endswith(".sparse")})
        return packed_bytes(tensors), "float32 cores" + (" + sparse values and " + "/".join(kinds) + " index"
                                                         if kinds else "")
    total, kinds = 0, set()
    for key in MATRICES:
        module, name = _matrix_owner(model, key)
        if hasattr(module, name + "_mask"):
            sizes = pruned_bytes(getattr(module, name + "_mask"))
            total += sizes["total"]
            kinds.add(sizes["index_kind"])
        else:
            total += gru_params_single(module, name) * FLOAT_BYTES
            kinds.add("float32")
    if kinds == {"float32"}:
        return total, "float32"
    return total, "float32 values + " + "/".join(sorted(kinds - {"float32"})) + " index"


def gru_params_single(module: nn.Module, name: str) -> int:
    if hasattr(module, name + "_u"):
        return getattr(module, name + "_u").numel() + getattr(module, name + "_v").numel()
    return getattr(module, name).numel()


def int8_bytes(qmodel: nn.Module) -> int:
    """Bytes of the four quantized GRU matrices: 1 per entry + 4 (scale) + 4 (zero point)
    per tensor, or per row for a per-channel scheme."""
    total = 0
    for gru in ("encoder", "decoder"):
        for name, w in getattr(qmodel, gru).get_weight().items():
            if not name.startswith("weight"):
                continue
            per_channel = w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
            total += w.numel() + 8 * (w.shape[0] if per_channel else 1)
    return total


# ----------------------------------------------------------------------------- distillation


def distill_batches(words: Sequence[str], teacher: G2PModel, batch: int = 64, seed: int = 0
                    ) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """(ids, lengths, decoder inputs, mask) per batch of ``batch`` words (a fixed shuffle;
    the last incomplete batch dropped); decoder inputs are <s> + the teacher's greedy output."""
    words = list(words)
    outputs = predict(teacher, words)
    order = np.random.default_rng(seed).permutation(len(words))
    batches = []
    for start in range(0, len(order) - batch + 1, batch):
        chunk = order[start:start + batch]
        ids, lengths = encode_words([words[i] for i in chunk])
        inputs, _, mask = decoder_inputs([outputs[i] for i in chunk])
        batches.append((ids, lengths, inputs, mask))
    return batches


def distill_forward(model: nn.Module, batch) -> Tensor:
    """Decoder logits at the real positions (N, V): what mpolstm.distill compares."""
    ids, lengths, inputs, mask = batch
    return model(ids, lengths, inputs)[mask]


def structure(model: nn.Module) -> dict[str, object]:
    """What distillation must not change: parameter shapes, and pruning masks."""
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    masks = {n: b.clone() for n, b in model.named_buffers() if n.endswith("_mask")}
    return {"shapes": shapes, "masks": masks}


def check_structure(model: nn.Module, before: dict[str, object]) -> dict[str, object]:
    """Raise if distillation changed shapes or masks or if a mask is no longer applied;
    returns what was checked."""
    after = structure(model)
    if after["shapes"] != before["shapes"]:
        raise AssertionError("distillation changed parameter shapes")
    if set(after["masks"]) != set(before["masks"]):
        raise AssertionError("distillation removed or added pruning masks")
    for name, mask in before["masks"].items():
        if not torch.equal(after["masks"][name], mask):
            raise AssertionError(f"pruning mask {name} changed")
    if before["masks"]:
        x = (torch.zeros(1, 3, dtype=torch.long), torch.tensor([3]), torch.zeros(1, 2, dtype=torch.long))
        model(*x)  # the pre-hooks recompute weight = weight_orig * mask
        for key in MATRICES:
            module, name = _matrix_owner(model, key)
            if not hasattr(module, name + "_mask"):
                continue
            weight, mask = getattr(module, name), getattr(module, name + "_mask")
            if bool((weight[mask == 0] != 0).any()):
                raise AssertionError(f"{key}: pruned entries are non-zero after distillation")
            flat = dict(zip(module._flat_weights_names, module._flat_weights))
            if flat[name] is not weight:
                raise AssertionError(f"{key}: nn.GRU does not run on the masked weight")
    return {"shapes": len(before["shapes"]), "masks": len(before["masks"]),
            "kept": sum(int(m.sum()) for m in before["masks"].values())}


# ----------------------------------------------------------------------------- table


class Clock:
    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def _row(method: str, ratio: float | None, finetune: str, params: int, nbytes: int, metrics: dict,
         clock: Clock | None, eval_seconds: float, **extra) -> dict:
    row = {"method": method, "ratio": ratio, "finetune": finetune, "gru_params": params, "bytes": nbytes,
           "bytes_ratio": round(DENSE_PARAMS * FLOAT_BYTES / nbytes, 2),
           **{k: round(v, 4) for k, v in metrics.items()},
           "wall_s": None if clock is None else round(clock.wall, 1),
           "cpu_s": None if clock is None else round(clock.cpu, 1),
           "eval_s": round(eval_seconds, 1), **extra}
    print(f"{method:<16} {'' if ratio is None else ratio:>3} {finetune:<8} params {params:>7,}  bytes {nbytes:>9,}  "
          f"agreement {metrics['agreement']:.4f}  PER {metrics['per']:.4f}  WER {metrics['wer']:.4f}"
          + ("" if clock is None else f"  wall {clock.wall:.1f} s  cpu {clock.cpu:.1f} s")
          + (f"  [{extra['layouts']}]" if extra.get("layouts") else ""), flush=True)
    return row


def _evaluate(model, words, reference) -> tuple[dict, float]:
    t0 = time.perf_counter()
    metrics = evaluate(model, words, reference)
    return metrics, time.perf_counter() - t0


def markdown(rows: Sequence[dict]) -> str:
    head = ("| method | ratio | fine-tuning | params (4 GRU matrices) | bytes | bytes ratio | agreement | PER | WER "
            "| wall s (CPU s) | layouts (MPO: layout(bonds); SVD: rank) |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        seconds = "-" if r["wall_s"] is None else f"{r['wall_s']} ({r['cpu_s']})"
        lines.append(
            f"| {r['method']} | {'-' if r['ratio'] is None else str(r['ratio']) + 'x'} | {r['finetune']} "
            f"| {r['gru_params']:,} | {r['bytes']:,} | {r['bytes_ratio']:.2f}x | {r['agreement']:.4f} "
            f"| {r['per']:.4f} | {r['wer']:.4f} | {seconds} "
            f"| {r.get('layouts') or ''} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="JSON file for the rows (a .md table is written beside it)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[2, 5, 10, 30])
    parser.add_argument("--distill-ratios", type=float, nargs="*", default=[10, 30, 5])
    parser.add_argument("--distill-methods", nargs="+",
                        default=["mpo-calibrated", "mpo", "svd", "prune-layerwise"])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--n-eval", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=["mpo", "mpo-calibrated", "svd", "prune-layerwise",
                                                         "prune-global"],
                        help="methods without fine-tuning (hybrid: calibrated lowrank+sparse)")
    parser.add_argument("--sparse-share", type=float, default=0.5,
                        help="hybrid: share of each matrix's budget held by the sparse part")
    parser.add_argument("--schedule", choices=["constant", "cosine"], default="constant",
                        help="distillation learning-rate schedule (the same for every method)")
    parser.add_argument("--clip", type=float, default=None, help="distillation: clip the gradient norm to this")
    parser.add_argument("--hidden", action="store_true",
                        help="distillation also matches the encoder's and decoder's hidden states")
    parser.add_argument("--distill-loss", choices=["kl", "ce"], default="kl",
                        help="kl: the teacher's distribution at every position; ce: its argmax "
                             "(sequence-level distillation on the teacher's decoded outputs)")
    parser.add_argument("--diagnostics", action="store_true",
                        help="also (no fine-tuning) mpo-calibrated-uniform: calibrated low rank at the SVD's "
                             "uniform rank (max_bond, layout='lowrank'), separating whitening from allocation")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, torch.set_num_threads({args.threads}); "
          f"distillation: {args.steps} steps x {args.batch} words, Adam lr {args.lr}", flush=True)
    ratios = [int(r) if float(r).is_integer() else r for r in args.ratios]
    splits = split_words()
    words = splits["eval"][:args.n_eval]
    teacher = load_g2p()
    reference = predict(teacher, words)
    calibrate = calibration_fn(splits["calib"], teacher)
    rows: list[dict] = []
    reports: dict[str, dict] = {}

    def save() -> None:
        if args.out:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            meta = {"threads": args.threads, "torch": torch.__version__, "n_eval": len(words),
                    "argv": list(sys.argv[1:] if argv is None else argv),
                    "distill": {"steps": args.steps, "batch": args.batch, "lr": args.lr, "loss": args.distill_loss,
                                "schedule": args.schedule, "hidden": args.hidden, "clip": args.clip,
                                "temperature": 1.0, "words": len(splits["distill"])}}
            out.write_text(json.dumps({"meta": meta, "rows": rows, "reports": reports}, indent=1))
            out.with_suffix(".md").write_text(markdown(rows) + "\n")

    metrics, secs = _evaluate(teacher, words, reference)
    rows.append(_row("original", None, "-", DENSE_PARAMS, DENSE_PARAMS * FLOAT_BYTES, metrics, None, secs,
                     layouts="dense float32"))

    def build(method: str, ratio) -> tuple[nn.Module, object]:
        if method == "mpo":
            return compress_mpo(ratio)
        if method == "mpo-calibrated":
            return compress_mpo(ratio, calibrate)
        if method == "mpo-calibrated-uniform":
            config = mpolstm.CompressionConfig(target_modules=["encoder", "decoder"], layout="lowrank",
                                               max_bond=svd_rank(768, 256, ratio))
            model, report = mpolstm.compress(load_g2p(), config, calibration=calibrate)
            return model.eval(), report
        if method in ("mpo-output", "mpo-output-refit"):
            config = mpolstm.CompressionConfig(target_modules=["encoder", "decoder"], target_ratio=ratio,
                                               allocation="output", refit=method.endswith("refit"))
            batches = [calibration_fn(splits["calib"][i::8], teacher) for i in range(8)]  # half held out
            model, report = mpolstm.compress(load_g2p(), config, calibration=batches)
            return model.eval(), report
        if method == "hybrid":
            config = mpolstm.CompressionConfig(target_modules=["encoder", "decoder"], target_ratio=ratio,
                                               layout="lowrank+sparse", sparse_share=args.sparse_share)
            model, report = mpolstm.compress(load_g2p(), config, calibration=calibrate)
            return model.eval(), report
        if method == "svd":
            return svd_compress(load_g2p(), ratio, factorized=True), None
        if method == "prune-layerwise":
            return prune_layerwise(load_g2p(), ratio), None
        if method == "prune-layerwise-bytes":
            return prune_layerwise_bytes(load_g2p(), ratio), None
        if method == "prune-global":
            return prune_global(load_g2p(), ratio), None
        raise ValueError(method)

    def describe(method: str, ratio, model, report) -> dict:
        if report is not None:
            reports[f"{method} {ratio}x"] = mpo_weights(report)
            return {"layouts": mpo_layouts(report)}
        if method == "svd":
            return {"layouts": f"lowrank({svd_rank(768, 256, ratio)}) x4"}
        return {"layouts": ""}

    for ratio in ratios:
        methods = list(args.methods)
        for method in methods + (["mpo-calibrated-uniform", "prune-layerwise-bytes"] if args.diagnostics else []):
            with Clock() as clock:
                model, report = build(method, ratio)
            nbytes, note = gru_bytes(model, report)
            metrics, secs = _evaluate(model, words, reference)
            rows.append(_row(method, ratio, "none", gru_params(model, report), nbytes, metrics, clock, secs,
                             bytes_note=note, **describe(method, ratio, model, report)))
            if report is not None:
                print(report, flush=True)
        save()

    with Clock() as clock:
        qmodel = quantize_int8(teacher)
    metrics, secs = _evaluate(qmodel, words, reference)
    rows.append(_row("int8 dynamic", None, "none", DENSE_PARAMS, int8_bytes(qmodel), metrics, clock, secs,
                     bytes_note="int8 + per-tensor scale/zero point; fc quantized too", layouts=""))
    save()

    if args.distill_ratios:
        t0 = time.perf_counter()
        batches = distill_batches(splits["distill"], teacher, args.batch)
        print(f"{len(batches)} distillation batches of {args.batch} words "
              f"(teacher greedy outputs: {time.perf_counter() - t0:.1f} s)", flush=True)
    for ratio in [int(r) if float(r).is_integer() else r for r in args.distill_ratios]:
        for method in args.distill_methods:
            with Clock() as clock:
                student, report = build(method, ratio)
                before = structure(student)
                result = mpolstm.distill(student, teacher, batches, steps=args.steps, loss=args.distill_loss,
                                         lr=args.lr, temperature=1.0, forward=distill_forward,
                                         schedule=args.schedule,
                                         hidden=["encoder", "decoder"] if args.hidden else (),
                                         clip_grad_norm=args.clip)
            student.eval()
            checked = check_structure(student, before)
            nbytes, note = gru_bytes(student, report)
            metrics, secs = _evaluate(student, words, reference)
            losses = result.losses
            rows.append(_row(method, ratio, "distill", gru_params(student, report), nbytes, metrics, clock, secs,
                             bytes_note=note, distill_s=round(result.seconds, 1),
                             first_loss=round(float(np.mean(losses[:50])), 4),
                             last_loss=round(float(np.mean(losses[-50:])), 4), checked=checked,
                             **describe(method, ratio, student, report)))
            if clock.cpu > 300:
                print(f"  warning: {clock.cpu:.0f} CPU-seconds, over the 5-minute budget", flush=True)
            save()

    print()
    print(markdown(rows))
    save()
    return rows


if __name__ == "__main__":
    main()
