"""The paper's comparison: MPO-LSTM versus magnitude pruning at equal parameter counts.

For each compression ratio r of the recurrent weights (W_ih, W_hh of the task's ``lstm``):

- ``mpo-decomp``  (a) TT-SVD of the trained dense LSTM, bonds allocated across all weights and
  bonds from their singular spectra (``compress(target_ratio=r)``), then fine-tuning.
- ``mpo-scratch`` (b) the same MPO structure, re-initialised and trained from scratch (the paper's way).
- ``mpo-central`` (c) as (a), but with the central tensors frozen (MPOP lightweight fine-tuning).
- ``prune-agp``   (d) gradual magnitude pruning (AGP, cubic) of the dense LSTM to exactly the MPO's
  parameter count, during fine-tuning.
- ``prune-oneshot`` (e) one-shot global magnitude pruning to that count, then fine-tuning.
- ``mpo-gradual`` (f) TT-SVD at ratio 2, bonds shrunk on a cubic schedule to (a)'s bonds during
  fine-tuning (MPOP's dimension squeezing, the MPO counterpart of AGP).

Epochs are equal in total: the dense model trains ``dense_epochs``; rows (a), (c)-(f) fine-tune it
for ``finetune_epochs``; row (b) trains ``dense_epochs + finetune_epochs`` from scratch. With
``distill=True`` every fine-tuning row adds a KL loss to the dense model's outputs.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils import benchmark

from ...compression import CompressionConfig, compress, freeze_central
from ...nn import is_mpo_module
from ...atomic import atomic_write_bytes
from ..distributed import is_main
from ...mpo import MPO, bond_dims
from ...nn import init_cores_
from ...prune import AGPPruner, count_nonzero, make_permanent, prune_global
from ..training import Callback, Distillation, TrainState, evaluate, fit, seed_everything
from ..tasks import save_model
from ..tasks.base import Task, lstm_cell_step

__all__ = ["ROWS", "BondSchedule", "ProtocolConfig", "run_protocol", "markdown_table", "plot_results"]

ROWS = {
    "dense": "dense LSTM",
    "mpo-decomp": "(a) MPO from TT-SVD of the dense model + fine-tuning",
    "mpo-scratch": "(b) MPO trained from scratch",
    "mpo-central": "(c) MPO, central tensors frozen (MPOP)",
    "prune-agp": "(d) AGP magnitude pruning + fine-tuning",
    "prune-oneshot": "(e) one-shot magnitude pruning + fine-tuning",
    "mpo-gradual": "(f) gradual bond truncation during fine-tuning",
}
GRADUAL_START_RATIO = 2.0


@dataclass
class ProtocolConfig:
    """Which rows and budgets to run; epochs default to the task's preset."""

    ratios: Sequence[float] = (10.0, 30.0, 100.0)
    rows: Sequence[str] = tuple(ROWS)
    seed: int = 0
    distill: bool = False
    dense_epochs: int | None = None
    finetune_epochs: int | None = None

    def __post_init__(self) -> None:
        unknown = [r for r in self.rows if r not in ROWS]
        if unknown:
            raise ValueError(f"unknown protocol rows {unknown}; expected a subset of {list(ROWS)}")
        if self.finetune_epochs is not None and self.finetune_epochs < 1:
            raise ValueError(f"finetune_epochs must be >= 1, got {self.finetune_epochs}")
        if not self.ratios or any(not (isinstance(r, (int, float)) and r > 1) for r in self.ratios):
            raise ValueError(f"ratios must be numbers > 1, got {list(self.ratios)}")


# ----------------------------------------------------------------------------- bond schedule


def _module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def mpo_bonds(model: nn.Module, names: Sequence[str]) -> dict[str, dict[str, tuple[int, ...]]]:
    """{module name: {weight name: internal bond dims}} of the named MPO modules."""
    return {
        n: {w: bond_dims(cores) for w, cores in _module(model, n).mpo_weights().items()}
        for n in names
    }


@torch.no_grad()
def truncate_bonds(model: nn.Module, bonds: dict[str, dict[str, Sequence[int]]]) -> None:
    """TT-round each named MPO weight (in place) to at most the given internal bonds."""
    for name, weights in bonds.items():
        cores_by_weight = _module(model, name).mpo_weights()
        for wname, caps in weights.items():
            cores = cores_by_weight[wname]
            current = bond_dims(cores)
            if all(c <= b for c, b in zip(current, caps)):
                continue
            rounded = MPO([c.detach() for c in cores]).truncate(max_bond=list(caps))
            for k, core in enumerate(rounded.cores):
                cores[k] = nn.Parameter(core.contiguous())


class BondSchedule(Callback):
    """Shrink MPO bonds on Zhu & Gupta's cubic schedule during :func:`~mpolstm.train.fit`.

    At the start of epoch e the bonds of every weight are
    ``target + ceil((initial - target) * (1 - e / end)^3)`` (per bond), reaching ``target`` at
    epoch ``end`` (``end=0``: at once); each shrink is a TT-rounding of the current cores, so training continues from
    the best approximation. On resume the bonds of the last completed epoch are re-applied before
    the checkpoint is loaded."""

    def __init__(self, target: dict[str, dict[str, tuple[int, ...]]], end: int) -> None:
        if end < 0:
            raise ValueError(f"BondSchedule end must be >= 0 epochs, got {end}")
        self.target, self.end = target, end
        self.initial: dict[str, dict[str, tuple[int, ...]]] | None = None

    def bonds_at(self, epoch: int) -> dict[str, dict[str, tuple[int, ...]]]:
        remaining = 0.0 if epoch >= self.end else (1.0 - epoch / self.end) ** 3
        return {
            n: {w: tuple(t + math.ceil((max(i, t) - t) * remaining) for i, t in zip(self.initial[n][w], tgt))
                for w, tgt in weights.items()}
            for n, weights in self.target.items()
        }

    def on_fit_start(self, state: TrainState) -> None:
        self.initial = mpo_bonds(state.model, list(self.target))
        if state.resumed and state.epoch > 0:
            truncate_bonds(state.model, self.bonds_at(state.epoch - 1))

    def on_epoch_start(self, state: TrainState) -> None:
        truncate_bonds(state.model, self.bonds_at(state.epoch))

    def on_epoch_end(self, state: TrainState) -> None:
        state.record["mpo_params"] = _compressed_params(state.model, list(self.target))

    def ready(self, state: TrainState) -> bool:
        return state.epoch >= self.end


# ----------------------------------------------------------------------------- measurements


def _recurrent_weight_names(model: nn.Module, names: Sequence[str]) -> list[str]:
    return [f"{n}.{p}" for n in names for p, _ in _module(model, n).named_parameters() if p.startswith("weight")]


def _dense_params(model: nn.Module, names: Sequence[str]) -> int:
    return sum(p.numel() for n in names for k, p in _module(model, n).named_parameters() if k.startswith("weight"))


def _compressed_params(model: nn.Module, names: Sequence[str]) -> int:
    """Entries of the recurrent weights as stored: MPO cores, or non-zeros of (pruned) dense weights."""
    total = 0
    for n in names:
        module = _module(model, n)
        if is_mpo_module(module):
            total += sum(c.numel() for cores in module.mpo_weights().values() for c in cores)
        else:
            total += count_nonzero(model, [f"{n}.{w}" for w in module._flat_weights_names if w.startswith("weight")])
    return total


def _median_seconds(fn: Callable[[], Any]) -> float:
    return benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=0.2).median


@torch.no_grad()
def _latencies(model: nn.Module, task: Task) -> dict[str, float]:
    """Batched forward of ``task.example_batch`` and one streaming LSTM step at batch 1 (ms)."""
    model.eval()
    batch = task.example_batch
    batched = _median_seconds(lambda: model(batch))
    lstm = _module(model, task.recurrent[0])
    frame = task.step_input
    step_fn = lstm.step if hasattr(lstm, "step") else (lambda x, s=None: lstm_cell_step(lstm, x, s))
    state = step_fn(frame)[1]
    step = _median_seconds(lambda: step_fn(frame, state))
    return {"batched_ms": 1e3 * batched, "step_ms": 1e3 * step}


# ----------------------------------------------------------------------------- the protocol


def _reinit(model: nn.Module, names: Sequence[str]) -> None:
    """Fresh initialisation: torch's defaults for dense layers; MPO cores scaled so each rebuilt
    LSTM weight entry has the variance of torch's U(-1/sqrt(H), 1/sqrt(H)) (= 1 / (3H))."""
    for module in model.modules():
        if hasattr(module, "reset_parameters") and not is_mpo_module(module):
            module.reset_parameters()
    for n in names:
        module = _module(model, n)
        std = 1.0 / math.sqrt(3 * module.hidden_size)
        for cores in module.mpo_weights().values():
            init_cores_(list(cores), std)
        with torch.no_grad():
            for k, p in module.named_parameters():
                if k.startswith("bias"):
                    p.uniform_(-math.sqrt(3) * std, math.sqrt(3) * std)


def run_protocol(task: Task, config: ProtocolConfig, out_dir: str | Path,
                 log: Callable[[str], None] = print, resume: bool = False) -> dict[str, Any]:
    """Run the dense model and every (row, ratio) of ``config``; write results.json, results.md,
    results.png and every final model (``models/<row>-<ratio>x``, loadable with
    ``tasks.load_model``) to ``out_dir`` and return the results document.

    Every training run checkpoints under ``out_dir/runs/<run>``; with ``resume`` each run continues
    from its checkpoint (a finished run just reloads its best weights), so an interrupted table
    resumes where it stopped with the same results. Training seconds are the sum of the epochs'
    times, so they survive a resume."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dense_epochs = config.dense_epochs if config.dense_epochs is not None else task.dense_epochs
    ft_epochs = config.finetune_epochs if config.finetune_epochs is not None else task.finetune_epochs
    names = list(task.recurrent)
    rows: list[dict[str, Any]] = []

    schedule_end = min(ft_epochs - 1, (2 * ft_epochs) // 3)  # AGP / bond shrinking reach the target here

    def train(model: nn.Module, epochs: int, run: str, callbacks=(), distill=None) -> float:
        result = fit(model, task.train_loader, task.val_loader, task.loss_fn, task.metric, epochs=epochs,
                     lr=task.lr, optimizer=task.optimizer, grad_clip=task.grad_clip, seed=config.seed,
                     out_dir=out / "runs" / run, callbacks=callbacks, forward_fn=task.forward_fn, distill=distill,
                     progress=False, resume=resume)
        return sum(record["time_s"] for record in result.history)

    def record(row: str, ratio: float | None, model: nn.Module, seconds: float, dense_count: int) -> None:
        run = row if ratio is None else f"{row}-{ratio:g}x"
        if task.architecture and is_main():
            save_model(model, task.architecture, out / "models" / run)
        metric = evaluate(model, task.test_loader, task.metric, forward_fn=task.forward_fn)
        params = _compressed_params(model, names)
        entry = {"row": row, "target_ratio": ratio, task.metric.name: metric, "params": params,
                 "ratio": dense_count / params, "train_s": seconds, **_latencies(model, task)}
        if task.test_report is not None:
            entry.update(task.test_report(model))
        rows.append(entry)
        log(f"{row:14s} ratio {'-' if ratio is None else f'{ratio:g}x':>5s}  {task.metric.name} {metric:.4f}  "
            f"params {params:,}  train {seconds:.0f}s")

    seed_everything(config.seed)
    dense = task.build_model()
    seconds = train(dense, dense_epochs, "dense")
    dense_count = _dense_params(dense, names)
    record("dense", None, dense, seconds, dense_count)
    teacher = Distillation(copy.deepcopy(dense)) if config.distill else None

    for ratio in config.ratios:
        tag = f"{ratio:g}x"
        decomposed, _ = compress(copy.deepcopy(dense), CompressionConfig(target_modules=names, target_ratio=ratio))
        target = mpo_bonds(decomposed, names)
        budget = _compressed_params(decomposed, names)
        if "mpo-decomp" in config.rows:
            model = copy.deepcopy(decomposed)
            record("mpo-decomp", ratio, model, train(model, ft_epochs, f"mpo-decomp-{tag}", distill=teacher), dense_count)
        if "mpo-scratch" in config.rows:
            seed_everything(config.seed)
            model = copy.deepcopy(decomposed)
            _reinit(model, names)
            record("mpo-scratch", ratio, model, train(model, dense_epochs + ft_epochs, f"mpo-scratch-{tag}"),
                   dense_count)
        if "mpo-central" in config.rows:
            model = copy.deepcopy(decomposed)
            freeze_central(model)
            record("mpo-central", ratio, model, train(model, ft_epochs, f"mpo-central-{tag}", distill=teacher),
                   dense_count)
        weights = _recurrent_weight_names(dense, names)
        if "prune-agp" in config.rows:
            model = copy.deepcopy(dense)
            agp = AGPPruner(weights, budget, start=0, end=schedule_end, method="global")
            seconds = train(model, ft_epochs, f"prune-agp-{tag}", callbacks=[agp], distill=teacher)
            make_permanent(model)
            record("prune-agp", ratio, model, seconds, dense_count)
        if "prune-oneshot" in config.rows:
            model = copy.deepcopy(dense)
            prune_global(model, weights, budget)
            seconds = train(model, ft_epochs, f"prune-oneshot-{tag}", distill=teacher)
            make_permanent(model)
            record("prune-oneshot", ratio, model, seconds, dense_count)
        if "mpo-gradual" in config.rows:
            start_ratio = min(GRADUAL_START_RATIO, ratio)
            model, _ = compress(copy.deepcopy(dense), CompressionConfig(target_modules=names, target_ratio=start_ratio))
            schedule = BondSchedule(target, end=schedule_end)
            seconds = train(model, ft_epochs, f"mpo-gradual-{tag}", callbacks=[schedule], distill=teacher)
            record("mpo-gradual", ratio, model, seconds, dense_count)

    document = {
        "task": task.name, "metric": task.metric.name, "higher_is_better": task.metric.mode == "max",
        "meta": task.meta, "seed": config.seed, "distill": config.distill, "dense_epochs": dense_epochs,
        "finetune_epochs": ft_epochs, "dense_recurrent_params": dense_count,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows,
    }
    if is_main():  # under torchrun every rank computes the same document; rank 0 writes it
        atomic_write_bytes(out / "results.json", json.dumps(document, indent=2).encode())
        atomic_write_bytes(out / "results.md", markdown_table(document).encode())
        plot_results(document, out / "results.png")
    return document


def markdown_table(document: dict[str, Any]) -> str:
    """The results as a Markdown table (one line per row and ratio)."""
    metric = document["metric"]
    standard = {"row", "target_ratio", metric, "params", "ratio", "train_s", "batched_ms", "step_ms"}
    extra = [k for k in document["rows"][0] if k not in standard]
    lines = [
        f"Task `{document['task']}`, seed {document['seed']}, dense {document['dense_epochs']} epochs, "
        f"fine-tuning {document['finetune_epochs']} epochs (from scratch: both), distillation "
        f"{'on' if document['distill'] else 'off'}; params = entries of the LSTM weights "
        f"(MPO cores or non-zeros), dense {document['dense_recurrent_params']:,}.",
        "",
        f"| row | target | {metric} | params | compression | train s | batched ms | step ms |"
        + "".join(f" {k} |" for k in extra),
        "|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(extra),
    ]
    for r in document["rows"]:
        target = "-" if r["target_ratio"] is None else f"{r['target_ratio']:g}x"
        lines.append(f"| {r['row']} | {target} | {r[metric]:.4f} | {r['params']:,} | {r['ratio']:.1f}x | "
                     f"{r['train_s']:.0f} | {r['batched_ms']:.2f} | {r['step_ms']:.3f} |"
                     + "".join(f" {r[k]:.3f} |" for k in extra))
    return "\n".join(lines) + "\n"


def plot_results(document: dict[str, Any], path: str | Path) -> None:
    """Metric versus parameter count (log x), one line per method, dense as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    metric = document["metric"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for row in ROWS:
        points = sorted((r["params"], r[metric]) for r in document["rows"] if r["row"] == row)
        if not points:
            continue
        if row == "dense":
            ax.axhline(points[0][1], color="black", linestyle="--", label=f"dense ({points[0][0]:,} params)")
        else:
            ax.plot(*zip(*points), marker="o", label=ROWS[row])
    ax.set_xscale("log")
    ax.set_xlabel("LSTM weight parameters (MPO entries / non-zeros)")
    ax.set_ylabel(metric)
    ax.set_title(document["task"])
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
