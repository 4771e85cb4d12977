"""int8 cores (``mpolstm.quantize``): bytes, the error the rounding adds, and its accuracy cost on g2p.

    python benchmarks/bench_int8.py                       # all four parts
    python benchmarks/bench_int8.py --parts bytes,error   # without the g2p evaluation
    python benchmarks/bench_int8.py --out results/bench_int8.json

Four parts, one torch thread:

- ``bytes``: a 2-layer LSTM (hidden 512 and 1024, input = hidden) compressed by ``compress`` at 10x and
  30x (the paper's interleaved layout and the layout search), saved with ``mpolstm.save`` with float32
  and with int8 cores: the data bytes of the LSTM's cores (+ scales) in each file and their ratio.
  The weights are random (the bytes depend on the bonds only).
- ``error``: g2p-en's four trained GRU matrices (examples/g2p) compressed at 10x and 30x; the relative
  Frobenius error int8 rounding adds to the rebuilt weights, ||W_int8 - W|| / ||W|| over the four,
  with one scale per core ("tensor"), per slice of the right bond ("right") and per slice of the
  larger bond ("larger", what ``quantize`` does), and the scales each takes.
- ``equal``: the same matrices at exactly the bytes of a float32 MPO at 10x / 30x, stored with int8
  cores as the protocol's ``mpo-int8`` row sizes them (entries + 4 bytes a scale within the bytes),
  with one scale per core or per slice of the larger bond: entries, scales, and the error of the
  rounded MPO against the dense weights (truncation and rounding together).
- ``g2p``: g2p-en compressed as examples/g2p/table.py's ``mpo`` method (layout search) at 2x and 5x
  (no fine-tuning) and at 10x and 30x distilled as that table does (KL, Adam 3e-3, 64-word
  batches, ``--distill-steps``): agreement with the original model's greedy predictions on the
  2,000 evaluation words (examples/g2p/evaluate.py) before and after ``quantize`` (and after
  rounding with one scale per core instead).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

import mpolstm
from mpolstm import mpo as mpo_math
from mpolstm.mpo import core_scale_shape, dequantize_int8, quantize_int8

G2P = Path(__file__).resolve().parent.parent / "examples" / "g2p"
LAYOUTS = ("interleaved", "auto")
RATIOS = (10.0, 30.0)


def lstm_core_bytes(folder: Path) -> int:
    """Data bytes of the LSTM's cores and scales in a folder written by ``mpolstm.save``."""
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        tensors = [f.get_tensor(k) for k in f.keys() if "_cores." in k or "_scales." in k]
    return sum(t.numel() * t.element_size() for t in tensors)


def bytes_part(out: Path) -> list[dict]:
    rows = []
    for hidden in (512, 1024):
        torch.manual_seed(0)
        dense = nn.Sequential()
        dense.lstm = nn.LSTM(hidden, hidden, num_layers=2)
        for layout in LAYOUTS:
            for ratio in RATIOS:
                config = mpolstm.CompressionConfig(target_modules=["lstm"], target_ratio=ratio, layout=layout)
                model, _ = mpolstm.compress(copy.deepcopy(dense), config)
                sizes = {}
                for kind in ("float32", "int8"):
                    if kind == "int8":
                        mpolstm.quantize(model)
                    sizes[kind] = lstm_core_bytes(mpolstm.save(model, out / f"{hidden}-{layout}-{ratio:g}-{kind}"))
                row = {"hidden": hidden, "layout": layout, "ratio": ratio, "float32_bytes": sizes["float32"],
                       "int8_bytes": sizes["int8"], "int8_over_float": sizes["int8"] / sizes["float32"]}
                print(f"2x{hidden} {layout:11s} {ratio:g}x  float32 {sizes['float32']:,} B  int8 {sizes['int8']:,} B  "
                      f"ratio {row['int8_over_float']:.4f}", flush=True)
                rows.append(row)
    return rows


def _round(core: torch.Tensor, scheme: str) -> tuple[torch.Tensor, int]:
    """(the core rounded to int8 under ``scheme``, its number of scales)."""
    shape = {"tensor": (1, 1, 1, 1), "right": (1, 1, 1, core.shape[3]), "larger": core_scale_shape(core.shape)}[scheme]
    q, scale = quantize_int8(core, [d for d, n in enumerate(shape) if n == 1])
    return dequantize_int8(q, scale, core.dtype), scale.numel()


def g2p_models():
    """(layout, ratio, compressed g2p model) for every layout and ratio, and the original model."""
    sys.path.insert(0, str(G2P))
    from g2p_model import load_g2p

    for layout in LAYOUTS:
        for ratio in RATIOS:
            config = mpolstm.CompressionConfig(target_modules=["encoder", "decoder"], target_ratio=ratio, layout=layout)
            yield layout, ratio, mpolstm.compress(load_g2p(), config)[0].eval()


def error_part() -> list[dict]:
    rows = []
    for layout, ratio, model in g2p_models():
        row = {"layout": layout, "ratio": ratio}
        for scheme in ("tensor", "right", "larger"):
            err = ref = 0.0
            scales = 0
            for module in (model.encoder, model.decoder):
                for cores in module.mpo_weights().values():
                    cores = [c.detach() for c in cores]
                    rounded = [_round(c, scheme) for c in cores]
                    weight = mpo_math.cores_to_matrix(cores)
                    err += float((mpo_math.cores_to_matrix([r for r, _ in rounded]) - weight).norm() ** 2)
                    ref += float(weight.norm() ** 2)
                    scales += sum(n for _, n in rounded)
            row[scheme] = {"rel_error": (err / ref) ** 0.5, "scales": scales}
        row["entries"] = sum(c.numel() for m in (model.encoder, model.decoder)
                             for cores in m.mpo_weights().values() for c in cores)
        print(f"g2p {layout:11s} {ratio:g}x  " + "  ".join(f"{s} {row[s]['rel_error']:.4f} ({row[s]['scales']} scales)"
                                                         for s in ("tensor", "right", "larger")), flush=True)
        rows.append(row)
    return rows


def equal_bytes_part() -> list[dict]:
    sys.path.insert(0, str(G2P))
    from g2p_model import load_g2p

    dense = load_g2p()
    weights = {(m, w): getattr(getattr(dense, m), w).detach() for m in ("encoder", "decoder")
               for w in ("weight_ih_l0", "weight_hh_l0")}
    rows = []
    for layout in LAYOUTS:
        for ratio in RATIOS:
            row = {"layout": layout, "ratio": ratio, "bytes": 4 * int(sum(w.numel() for w in weights.values()) / ratio)}
            for scheme in ("tensor", "larger"):
                entries = row["bytes"]
                for _ in range(4):  # as the mpo-int8 row: leave room for the scales
                    config = mpolstm.CompressionConfig(target_modules=["encoder", "decoder"], max_params=entries,
                                                       layout=layout)
                    model = mpolstm.compress(load_g2p(), config)[0]
                    rounded = {(m, w): [_round(c.detach(), scheme) for c in cores] for m in ("encoder", "decoder")
                               for w, cores in getattr(model, m).mpo_weights().items()}
                    scales = sum(n for cores in rounded.values() for _, n in cores)
                    count = sum(c.numel() for cores in rounded.values() for c, _ in cores)
                    if count + 4 * scales <= row["bytes"]:
                        break
                    entries = row["bytes"] - 4 * scales
                err = sum(float((mpo_math.cores_to_matrix([c for c, _ in cores], transpose=True) - weights[k]).norm()
                                ** 2) for k, cores in rounded.items())
                ref = sum(float(w.norm() ** 2) for w in weights.values())
                row[scheme] = {"entries": count, "scales": scales, "rel_error_vs_dense": (err / ref) ** 0.5}
            print(f"g2p {layout:11s} {ratio:g}x, {row['bytes']:,} B  " + "  ".join(
                f"{s}: {row[s]['entries']:,} entries + {row[s]['scales']} scales, error vs dense "
                f"{row[s]['rel_error_vs_dense']:.5f}" for s in ("tensor", "larger")), flush=True)
            rows.append(row)
    return rows


G2P_MODELS = ((2.0, 0), (5.0, 0), (10.0, None), (30.0, None))
"""(ratio, distillation steps; None: --distill-steps) of the g2p models whose agreement is measured."""


def g2p_part(distill_steps: int) -> list[dict]:
    sys.path.insert(0, str(G2P))
    from evaluate import evaluate, load_lexicon, predict, split_words
    from g2p_model import load_g2p
    from table import distill_batches, distill_forward

    splits, lexicon = split_words(), load_lexicon()
    teacher = load_g2p().eval()
    words, batches = splits["eval"], None
    reference = predict(teacher, words)
    rows = []
    for ratio, steps in G2P_MODELS:
        steps = distill_steps if steps is None else steps
        config = mpolstm.CompressionConfig(target_modules=["encoder", "decoder"], target_ratio=ratio)
        model = mpolstm.compress(load_g2p(), config)[0]
        if steps:
            batches = batches or distill_batches(splits["distill"], teacher, 64)
            mpolstm.distill(model, teacher, batches, steps=steps, loss="kl", lr=3e-3, temperature=1.0,
                            forward=distill_forward)
        model.eval()
        before = evaluate(model, words, reference, lexicon)
        per_tensor = copy.deepcopy(model)
        with torch.no_grad():
            for module in (per_tensor.encoder, per_tensor.decoder):
                for core in (c for cores in module.mpo_weights().values() for c in cores):
                    core.copy_(_round(core, "tensor")[0])
        tensor = evaluate(per_tensor, words, reference, lexicon)
        after = evaluate(mpolstm.quantize(model), words, reference, lexicon)
        row = {"ratio": ratio, "distill_steps": steps, "before": before, "after": after, "per_tensor": tensor,
               "agreement_cost": before["agreement"] - after["agreement"]}
        print(f"g2p {ratio:g}x, {steps} distillation steps: agreement {before['agreement']:.4f} -> "
              f"{after['agreement']:.4f} (one scale per core: {tensor['agreement']:.4f}), PER {before['per']:.4f} -> "
              f"{after['per']:.4f}", flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="bytes,error,equal,g2p")
    parser.add_argument("--out", type=Path, default=None, help="Write the results as JSON here.")
    parser.add_argument("--distill-steps", type=int, default=1200, help="g2p at 10x and 30x: distillation steps "
                        "(examples/g2p/table.py's default).")
    parser.add_argument("--scratch", type=Path, default=Path("results/bench_int8"), help="Folder for the saved models.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    parts = {"bytes": lambda: bytes_part(args.scratch), "error": error_part, "equal": equal_bytes_part, "g2p": lambda: g2p_part(args.distill_steps)}
    start = time.perf_counter()
    results = {name: parts[name]() for name in args.parts.split(",")}
    results["seconds"] = time.perf_counter() - start
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
