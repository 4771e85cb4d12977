"""Running the protocol: the dense model, then every (row, ratio) of the table, results written
to a folder (optionally built in a staging folder beside it and moved into place at the end).

The rows themselves are in :mod:`.rows`; see the package docstring for what they are.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence, cast

import torch
from torch import nn

from ...atomic import atomic_write_bytes
from ...compression import CompressionConfig, compress
from ...errors import ConfigError, FieldNames, must_be
from ...nn import replace_module
from ...storage import file_data_bytes, pack_weights, packed_bytes, save_packed
from ..distributed import barrier, is_main, setup
from ..tasks import save_model
from ..tasks.base import Task
from ..training import Distillation, evaluate, fit, seed_everything
from ..usermodels import STORED_WEIGHTS
from .measure import compressed_params, dense_params, latencies, recurrent_weight_names
from .paper import PAPER_BONDS, PAPER_ROWS, paper_lstm
from .report import markdown_table, plot_results
from .rows import LAYOUT, ROWS, Infeasible, RowContext, Trained, TrainFn
from .schedule import BondSchedule, mpo_bonds

__all__ = ["ROWS", "BondSchedule", "ProtocolConfig", "StagingError", "mpo_bonds", "run_protocol", "run_staged",
           "staging_dir", "write_results"]


@dataclass
class ProtocolConfig:
    """Which rows and budgets to run; epochs default to the task's preset.

    layout: "interleaved" (the MPO rows' TT-SVD at each ratio, bonds allocated globally) or "paper"
        (the paper's gate-sharing layout with its Table 2 bonds: ratios must be Table 2 rates, rows
        those of :data:`~.paper.PAPER_ROWS`; see :mod:`.paper`)."""

    ratios: Sequence[float] = (10.0, 30.0, 100.0)
    rows: Sequence[str] = tuple(ROWS)
    seed: int = 0
    distill: bool = False
    dense_epochs: int | None = None
    finetune_epochs: int | None = None
    layout: str = LAYOUT

    def __post_init__(self) -> None:
        unknown = [r for r in self.rows if r not in ROWS]
        if unknown:
            raise ConfigError("rows", lambda n: f"unknown protocol {n('rows')} {unknown}; expected a subset of "
                                                f"{list(ROWS)}")
        if self.layout not in (LAYOUT, "paper"):
            raise must_be("layout", f"{LAYOUT!r} or 'paper'", self.layout)
        if self.layout == "paper":
            off_grid = [r for r in self.rows if r not in PAPER_ROWS]
            rates = [r for r in self.ratios if r not in PAPER_BONDS]
            if off_grid:
                raise ConfigError("rows", lambda n: f"{n('rows')} {off_grid} cannot run on the paper's layout; "
                                                    f"expected a subset of {list(PAPER_ROWS)}")
            if rates:
                raise ConfigError("ratios", lambda n: f"{n('ratios')} {rates} are not in the paper's Table 2; "
                                                      f"expected some of {sorted(PAPER_BONDS)}")
        for name in ("dense_epochs", "finetune_epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(name, _at_least_one(name, value))
        if not self.ratios or any(not (isinstance(r, (int, float)) and r > 1) for r in self.ratios):
            raise must_be("ratios", "numbers > 1", list(self.ratios))


def _at_least_one(name: str, value: Any) -> Callable[[FieldNames], str]:
    return lambda n: f"{n(name)} must be >= 1, got {value}"


@dataclass
class _EpochLog:
    """A callback that logs one line per finished epoch of a run, so a table shows progress from
    its first epoch on (and in a log file, where there is no progress bar)."""

    log: Callable[[str], None]
    run: str
    metric: str
    started: float = 0.0

    def on_epoch_start(self, state) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, state) -> None:
        record = state.record
        self.log(f"  {self.run} epoch {record['epoch']}/{state.epochs}: loss {record['train_loss']:.4f}, "
                 f"val {self.metric} {record[f'val_{self.metric}']:.4f} ({time.perf_counter() - self.started:.0f}s)")


def _train(task: Task, seed: int, runs: Path, resume: bool, log: Callable[[str], None], model: nn.Module,
           epochs: int, run: str, callbacks=(), distill: Distillation | None = None) -> float:
    """Fit ``model`` on the task, checkpointing under ``runs/<run>`` and logging each epoch; returns
    the summed epoch times (so they survive a resume)."""
    result = fit(model, task.train_loader, task.val_loader, task.loss_fn, task.metric, epochs=epochs,
                 lr=task.lr, optimizer=task.optimizer, grad_clip=task.grad_clip, seed=seed,
                 out_dir=runs / run, callbacks=(*callbacks, _EpochLog(log, run, task.metric.name)),
                 forward_fn=task.forward_fn, distill=distill, progress=False, resume=resume)
    return sum(record["time_s"] for record in result.history)




def _is_quantized(model: nn.Module) -> bool:
    return any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules())


def _record(task: Task, out: Path, dense_count: int, log: Callable[[str], None], row: str, ratio: float | None,
            trained: Trained) -> dict[str, Any]:
    """Save the row's final model (and its LSTM weights in their stored form), measure it and
    return its results row. ``bytes`` is computed from the stored form; ``file_bytes`` is the data
    size of the file written, which equals it."""
    model, names = trained.model, list(task.recurrent)
    run = row if ratio is None else f"{row}-{ratio:g}x"
    folder = out / "models" / run
    tensors, formats = pack_weights(model, names, int8_cores=trained.int8_cores, int8_values=trained.int8_values)
    stored = packed_bytes(tensors)
    file_bytes = stored
    if is_main():
        if task.architecture and not _is_quantized(model):  # torch's quantized modules: stored weights only
            save_model(model, trained.architecture or task.architecture, folder, overwrite=True)  # a rerun row
        folder.mkdir(parents=True, exist_ok=True)
        file_bytes = file_data_bytes(save_packed(tensors, formats, folder / STORED_WEIGHTS))
    metric = evaluate(model, task.test_loader, task.metric, forward_fn=task.forward_fn)
    params = compressed_params(model, names)
    recurrent = model.get_submodule(names[0])
    total = trained.total_params if trained.total_params is not None else sum(p.numel() for p in model.parameters())
    entry = {"row": row, "target_ratio": ratio, task.metric.name: metric, "params": params,
             "ratio": dense_count / params, "bytes": stored, "bytes_ratio": 4 * dense_count / stored,
             "storage": "+".join(sorted(set(formats.values()))), "file_bytes": file_bytes,
             "total_params": total, "hidden": recurrent.hidden_size, "train_s": trained.seconds,
             **latencies(model, task), **trained.extra}
    if task.test_report is not None:
        entry.update(task.test_report(model))
    log(f"{row:15s} ratio {'-' if ratio is None else f'{ratio:g}x':>5s}  {task.metric.name} {metric:.4f}  "
        f"params {params:,}  bytes {stored:,} ({entry['storage']})  train {trained.seconds:.0f}s")
    return entry


def _ratio_context(task: Task, config: ProtocolConfig, ratio: float, dense: nn.Module,
                   teacher: Distillation | None, train: TrainFn) -> RowContext:
    """What every row at ``ratio`` shares: the TT-SVD of the dense model at that ratio and its budget."""
    names = list(task.recurrent)
    if config.layout == "paper":
        decomposed = copy.deepcopy(dense)
        replace_module(decomposed, names[0], paper_lstm(cast(nn.LSTM, dense.get_submodule(names[0])), int(ratio)))
    else:
        config_at_ratio = CompressionConfig(target_modules=names, target_ratio=ratio, layout=LAYOUT)
        decomposed, _ = compress(copy.deepcopy(dense), config_at_ratio)
    ft_epochs = config.finetune_epochs
    assert ft_epochs is not None  # run_protocol sets it
    return RowContext(
        task=task, config=config, ratio=ratio, names=names, weights=recurrent_weight_names(dense, names),
        dense=dense, decomposed=decomposed, target=mpo_bonds(decomposed, names),
        budget=compressed_params(decomposed, names), teacher=teacher,
        schedule_end=min(ft_epochs - 1, (2 * ft_epochs) // 3),  # AGP / bond shrinking reach the target here
        train_fn=train)


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
    config = replace(config, dense_epochs=dense_epochs,
                     finetune_epochs=config.finetune_epochs if config.finetune_epochs is not None else task.finetune_epochs)
    train = partial(_train, task, config.seed, out / "runs", resume, log)

    seed_everything(config.seed)
    dense = task.build_model()
    seconds = train(dense, dense_epochs, "dense")
    dense_count = dense_params(dense, list(task.recurrent))
    record = partial(_record, task, out, dense_count, log)
    rows = [record("dense", None, Trained(dense, seconds))]
    skipped = []
    teacher = Distillation(copy.deepcopy(dense)) if config.distill else None

    for ratio in config.ratios:
        context = _ratio_context(task, config, ratio, dense, teacher, train)
        for name, row in ROWS.items():
            if row.recipe is None or name not in config.rows or (row.once and ratio != config.ratios[0]):
                continue
            run_ratio = None if row.once else ratio
            try:
                trained = row.recipe(replace(context, run=name if row.once else f"{name}-{ratio:g}x"))
            except Infeasible as exc:
                log(f"{name:15s} ratio {ratio:g}x  skipped: {exc}")
                skipped.append({"row": name, "target_ratio": run_ratio, "reason": str(exc)})
                continue
            rows.append(record(name, run_ratio, trained))

    document = {
        "task": task.name, "metric": task.metric.name, "higher_is_better": task.metric.mode == "max",
        "meta": task.meta, "seed": config.seed, "distill": config.distill, "dense_epochs": config.dense_epochs,
        "finetune_epochs": config.finetune_epochs, "layout": config.layout, "dense_recurrent_params": dense_count,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows, "skipped": skipped,
    }
    if is_main():  # under torchrun every rank computes the same document; rank 0 writes it
        write_results(document, out)
    return document


def write_results(document: dict[str, Any], out: Path) -> None:
    """results.json, results.md, results.png (metric vs parameters) and results-bytes.png (metric
    vs bytes) of a results document in ``out``."""
    atomic_write_bytes(out / "results.json", json.dumps(document, indent=2).encode())
    atomic_write_bytes(out / "results.md", markdown_table(document).encode())
    plot_results(document, out / "results.png")
    plot_results(document, out / "results-bytes.png", x="bytes")


class StagingError(ValueError):
    """:func:`run_staged` refuses to start: the output folder or an interrupted run's staging
    folder would be overwritten."""


def staging_dir(out: str | Path) -> Path:
    """Where :func:`run_staged` builds the table for ``out``: ``.<name>.staging`` beside it."""
    out = Path(out)
    return out.parent / f".{out.name}.staging"


RESUME_WITH_MAKE = "with make: make demo ARGS=--resume"


def run_staged(task: Task, config: ProtocolConfig, out: str | Path, log: Callable[[str], None] = print,
               resume: bool = False) -> dict[str, Any]:
    """:func:`run_protocol` in :func:`staging_dir` and moved to ``out`` at the end (its per-run
    checkpoints dropped, the final models kept), so a failed run never leaves a half-written
    ``out``. An interrupted run keeps its staging folder; ``resume`` continues it, and a fresh run
    refuses to discard it (:class:`StagingError`, raised before anything starts, as when ``out``
    holds anything but an earlier table). Under torchrun every rank runs the protocol, rank 0
    writes the results and alone calls ``log``."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "results.json").exists():
        raise StagingError(f"--out {out} exists and is not an earlier results folder; refusing to replace it")
    staging = staging_dir(out)
    if staging.exists() and not resume:
        raise StagingError(f"an interrupted run of this table is in {staging}; pass --resume to continue it "
                           f"({RESUME_WITH_MAKE}), or delete that folder to start over")
    setup()
    main_rank = is_main()
    emit = log if main_rank else (lambda line: None)
    if main_rank:
        staging.mkdir(parents=True, exist_ok=True)
    barrier()
    try:
        document = run_protocol(task, config, staging, log=emit, resume=resume)
    except BaseException:
        emit(f"stopped; the finished runs and checkpoints are in {staging}: rerun the same command with "
             f"--resume to continue ({RESUME_WITH_MAKE})")
        raise
    if main_rank:
        shutil.rmtree(staging / "runs", ignore_errors=True)  # per-run checkpoints; the final models stay
        if out.exists():
            shutil.rmtree(out)
        staging.replace(out)
    barrier()
    return document
