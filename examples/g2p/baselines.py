"""Post-training compression baselines for g2p-en's GRU model, and distillation.

All compressors act on the four GRU weight matrices of a :class:`G2PModel`
(``encoder.weight_ih_l0``, ``encoder.weight_hh_l0``, ``decoder.weight_ih_l0``,
``decoder.weight_hh_l0``; each 768 x 256 = 196,608 entries, 786,432 together, 94% of the
model's 834,890 parameters). Embeddings, biases and ``fc`` stay dense (except int8, which
also quantizes ``fc``). A ratio r means: at most numel / r stored numbers per matrix
(layer-wise) or over the four matrices (global); pruning counts kept entries only (no
index overhead).

* :func:`svd_compress`: truncated SVD per matrix, rank r_k = floor(m n / (ratio (m + n)))
  (768 x 256: 96, 38, 19, 6 at ratios 2, 5, 10, 30). Dense simulation by default; with
  ``factorized=True`` the two factors become the trainable parameters (for distillation).
* :func:`prune_layerwise`: ``torch.nn.utils.prune.l1_unstructured`` per matrix.
* :func:`prune_global`: ``torch.nn.utils.prune.global_unstructured`` (L1) over the four.
* :func:`quantize_int8`: ``torch.ao.quantization.quantize_dynamic`` on nn.GRU and nn.Linear.
* :func:`distill`: KL(teacher || student) on teacher-forced decoder logits, the decoder
  inputs being the teacher's own greedy outputs.

All but quantize_int8 modify the model in place and return it (copy first). Run
``python examples/g2p/baselines.py`` for the whole table (a few CPU minutes).
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import prune

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # run as a script or imported from elsewhere
    sys.path.insert(0, _HERE)
from evaluate import evaluate, predict, split_words
from g2p_model import G2PModel, decoder_inputs, encode_words, load_g2p

__all__ = [
    "GRU_WEIGHTS",
    "compressed_weight_count",
    "distill",
    "gru_matrices",
    "prune_global",
    "prune_layerwise",
    "quantize_int8",
    "svd_compress",
    "svd_rank",
]

GRU_WEIGHTS = ("weight_ih_l0", "weight_hh_l0")


def gru_matrices(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, parameter name) of the four GRU weight matrices, encoder first."""
    return [(getattr(model, gru), w) for gru in ("encoder", "decoder") for w in GRU_WEIGHTS]


def _weight(module: nn.Module, name: str) -> Tensor:
    """The effective weight (works under pruning / low-rank reparametrisation)."""
    return getattr(module, name)


# ----------------------------------------------------------------------------- truncated SVD


def svd_rank(m: int, n: int, ratio: float) -> int:
    """Largest rank r with r (m + n) <= m n / ratio (at least 1)."""
    return max(1, math.floor(m * n / ratio / (m + n)))


class _LowRank:
    """Forward pre-hook that sets ``module.<name> = u @ v`` from the parameters
    ``<name>_u`` (m, r) and ``<name>_v`` (r, n) before each forward, the mechanism
    torch.nn.utils.prune uses (nn.GRU's __setattr__ keeps its flat weight list in sync)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def compute(self, module: nn.Module) -> Tensor:
        return getattr(module, self.name + "_u") @ getattr(module, self.name + "_v")

    def __call__(self, module: nn.Module, inputs) -> None:
        setattr(module, self.name, self.compute(module))


def svd_compress(model: G2PModel, ratio: float, factorized: bool = False) -> G2PModel:
    """Truncated SVD of each GRU weight matrix W (m, n) at rank :func:`svd_rank`.

    factorized=False: W is replaced by the dense U_r S_r V_r^T (a simulation; same
    predictions as the factorised layer). factorized=True: W becomes a function of the
    trainable parameters ``<name>_u`` = U_r S_r^(1/2) (m, r) and ``<name>_v`` =
    S_r^(1/2) V_r^T (r, n), so distillation stays at rank r. In place; returns the model."""
    for module, name in gru_matrices(model):
        w = getattr(module, name).detach()
        m, n = w.shape
        r = svd_rank(m, n, ratio)
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        if not factorized:
            with torch.no_grad():
                getattr(module, name).copy_(((u[:, :r] * s[:r]) @ vh[:r]).to(w.dtype))
            continue
        root = s[:r].sqrt()
        del module._parameters[name]
        module.register_parameter(name + "_u", nn.Parameter((u[:, :r] * root).to(w.dtype)))
        module.register_parameter(name + "_v", nn.Parameter((root[:, None] * vh[:r]).to(w.dtype)))
        hook = _LowRank(name)
        setattr(module, name, hook.compute(module).detach())
        module.register_forward_pre_hook(hook)
    return model


# ----------------------------------------------------------------------------- pruning


def prune_layerwise(model: G2PModel, ratio: float) -> G2PModel:
    """Keep the floor(numel / ratio) largest-magnitude entries of each GRU matrix
    (``prune.l1_unstructured``; masks stay as forward pre-hooks). In place."""
    for module, name in gru_matrices(model):
        numel = getattr(module, name).numel()
        prune.l1_unstructured(module, name, amount=numel - math.floor(numel / ratio))
    return model


def prune_global(model: G2PModel, ratio: float) -> G2PModel:
    """Keep the floor(total / ratio) largest-magnitude entries over the four GRU matrices
    together (``prune.global_unstructured`` with L1). In place."""
    params = gru_matrices(model)
    total = sum(getattr(m, n).numel() for m, n in params)
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured,
                              amount=total - math.floor(total / ratio))
    return model


def compressed_weight_count(model: G2PModel) -> dict[str, int]:
    """Stored numbers per GRU matrix: factor entries (low rank), nonzeros (pruned or
    dense), keyed "encoder.weight_ih_l0" etc."""
    counts = {}
    for gru in ("encoder", "decoder"):
        module = getattr(model, gru)
        for name in GRU_WEIGHTS:
            if hasattr(module, name + "_u"):
                count = getattr(module, name + "_u").numel() + getattr(module, name + "_v").numel()
            else:
                count = int(torch.count_nonzero(_weight(module, name)))
            counts[f"{gru}.{name}"] = count
    return counts


# ----------------------------------------------------------------------------- int8


def quantize_int8(model: G2PModel) -> nn.Module:
    """Dense int8 dynamic quantization of nn.GRU and nn.Linear (a new model; the input is
    left as it is). Per-tensor int8 weights, activations quantized on the fly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization deprecation notices
        return torch.ao.quantization.quantize_dynamic(model, {nn.GRU, nn.Linear}, dtype=torch.qint8)


# ----------------------------------------------------------------------------- distillation


def distill(student: G2PModel, teacher: G2PModel, words: Sequence[str], steps: int = 1200,
            batch: int = 64, lr: float = 3e-3, seed: int = 0,
            teacher_predictions: Sequence[Sequence[str]] | None = None,
            log_every: int = 0) -> dict[str, float]:
    """Train ``student`` (all its trainable parameters; pruning masks and low-rank factors
    are kept) to match ``teacher``'s decoder distributions.

    Loss: KL(p_teacher || p_student) per position, averaged over the real positions of a
    batch of ``batch`` words sampled (with a fixed seed) from ``words``. Decoder inputs
    are <s> + the teacher's own greedy prediction (computed once, or given as
    ``teacher_predictions``); positions run up to the teacher's </s>. Adam with a cosine
    learning-rate decay from ``lr`` to 0, gradient norm clipped at 1. The student ends in
    eval mode. Returns {"seconds" (wall), "cpu_seconds" (this process, all threads),
    "teacher_seconds", "first_loss", "last_loss"} where
    the losses are means over the first / last 50 steps."""
    t0, c0 = time.perf_counter(), time.process_time()
    words = list(words)
    teacher.eval()
    if teacher_predictions is None:
        teacher_predictions = predict(teacher, words)
    t_teacher = time.perf_counter() - t0

    rng = np.random.default_rng(seed)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    student.train()
    losses = []
    for step in range(steps):
        idx = rng.choice(len(words), size=batch, replace=False)
        ids, lengths = encode_words([words[i] for i in idx])
        inputs, _, mask = decoder_inputs([teacher_predictions[i] for i in idx])
        with torch.no_grad():
            target = F.log_softmax(teacher(ids, lengths, inputs), -1)  # (B, T, V)
        logp = F.log_softmax(student(ids, lengths, inputs), -1)
        kl = (target.exp() * (target - logp)).sum(-1)  # (B, T)
        loss = kl[mask].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"    step {step + 1}/{steps}  KL {np.mean(losses[-log_every:]):.4f}", flush=True)
    student.eval()
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
            "teacher_seconds": t_teacher,
            "first_loss": float(np.mean(losses[:50])), "last_loss": float(np.mean(losses[-50:]))}


# ----------------------------------------------------------------------------- report


def _row(label: str, metrics: dict[str, float], seconds: float | None = None) -> dict:
    row = {"method": label, **{k: round(v, 4) for k, v in metrics.items()}}
    if seconds is not None:
        row["seconds"] = round(seconds, 1)
    print(f"{label:<34} agreement {metrics['agreement']:.4f}  PER {metrics['per']:.4f}  "
          f"WER {metrics['wer']:.4f}" + (f"  ({seconds:.1f} s)" if seconds is not None else ""), flush=True)
    return row


def main(ratios: Sequence[float] = (2, 5, 10, 30), distill_ratio: float = 10, steps: int = 1200,
         out: str | None = None) -> list[dict]:
    """Every baseline on the 2,000 evaluation words; returns (and prints) the rows."""
    torch.manual_seed(0)
    splits = split_words()
    words = splits["eval"]
    teacher = load_g2p()
    reference = predict(teacher, words)
    rows = [_row("original", evaluate(teacher, words, reference))]

    for ratio in ratios:
        for label, fn in (("svd", svd_compress), ("prune-layerwise", prune_layerwise),
                          ("prune-global", prune_global)):
            model = fn(load_g2p(), ratio)
            rows.append(_row(f"{label} {ratio}x", evaluate(model, words, reference)))

    t0 = time.perf_counter()
    q = quantize_int8(teacher)
    rows.append(_row("int8 dynamic", evaluate(q, words, reference), time.perf_counter() - t0))

    try:
        import mpolstm
        for ratio in (2, 10):
            t0 = time.perf_counter()
            model, report = mpolstm.compress(load_g2p(), mpolstm.CompressionConfig(
                target_modules=["encoder", "decoder"], target_ratio=ratio))
            model.eval()
            rows.append(_row(f"mpolstm.compress {ratio}x (ratio {report.ratio:.2f})",
                             evaluate(model, words, reference), time.perf_counter() - t0))
    except Exception as exc:  # noqa: BLE001 - the library API is being refactored
        print(f"mpolstm.compress skipped: {type(exc).__name__}: {exc}")

    t0 = time.perf_counter()
    teacher_preds = predict(teacher, splits["distill"])
    t_teacher = time.perf_counter() - t0
    print(f"teacher greedy outputs for {len(splits['distill'])} distillation words: {t_teacher:.1f} s")
    for label, fn in (("svd", lambda m: svd_compress(m, distill_ratio, factorized=True)),
                      ("prune-layerwise", lambda m: prune_layerwise(m, distill_ratio)),
                      ("prune-global", lambda m: prune_global(m, distill_ratio))):
        student = fn(load_g2p())
        before = compressed_weight_count(student)
        info = distill(student, teacher, splits["distill"], steps=steps, teacher_predictions=teacher_preds,
                       log_every=max(steps // 4, 1))
        assert compressed_weight_count(student) == before, "distillation changed the sparsity / rank"
        rows.append(_row(f"{label} {distill_ratio}x + distill", evaluate(student, words, reference),
                         info["seconds"]))
        rows[-1].update({k: round(v, 4) for k, v in info.items()})
    if out:
        Path(out).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main(out=sys.argv[1] if len(sys.argv) > 1 else None)
