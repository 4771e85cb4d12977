"""The paper's experiments: ``demo``, ``reproduce``, ``paper-grid`` (the MPO-versus-baselines protocol)
and ``train`` (a task's dense model)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .. import distributed
from .common import Preset, TaskName, _fail, _log, _said, app, console

_PROTOCOL_FLAGS = {"dense_epochs": "--dense-epochs", "finetune_epochs": "--finetune-epochs", "rows": "--rows",
                   "ratios": "--ratios", "data_dir": "--data-dir", "dataset": "--dataset"}


def _parse_ratios(text: str) -> tuple[float, ...]:
    try:
        ratios = tuple(float(r) for r in text.split(",") if r.strip())
    except ValueError:
        _fail(f"--ratios must be comma-separated numbers > 1, got {text!r}")
    if not ratios or any(r <= 1 for r in ratios):
        _fail(f"--ratios must be comma-separated numbers > 1, got {text!r}")
    return ratios


def _protocol_config(ratios: tuple[float, ...], seed: int, distill: bool, rows: Optional[str], **kwargs):
    from ..protocol import ROWS, ProtocolConfig

    selected = tuple(ROWS) if rows is None else tuple(r.strip() for r in rows.split(",") if r.strip())
    flags = {**_PROTOCOL_FLAGS, "ratios": "--rates" if kwargs.get("layout") == "paper" else "--ratios"}
    try:
        return ProtocolConfig(ratios=ratios, rows=selected, seed=seed, distill=distill, **kwargs)
    except ValueError as exc:
        _fail(_said(exc, flags))


def _staged(run, *args, **kwargs):
    """``run(*args, log=..., **kwargs)`` (a protocol runner); a refused staging folder, or one that
    cannot be written, is one error line."""
    from ..protocol import StagingError

    try:
        return run(*args, log=_log, **kwargs)
    except StagingError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot write the results under --out: {exc}")


def _run_protocol(task, ratios: tuple[float, ...], out: Path, seed: int, distill: bool, rows: Optional[str],
                  resume: bool = False) -> None:
    """Run the protocol in a staging folder beside ``out`` and move it in place at the end
    (:func:`~mpolstm.harness.protocol.run_staged`), then print the table."""
    from ..protocol import run_staged

    _staged(run_staged, task, _protocol_config(ratios, seed, distill, rows), out, resume=resume)
    if distributed.is_main():
        console.print((out / "results.md").read_text(), highlight=False)
        console.print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}, "
                      f"{out / 'results-bytes.png'} and {out / 'models'}")


def _parse_seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        seeds = ()
    if not seeds or len(set(seeds)) != len(seeds):
        _fail(f"--seeds must be distinct comma-separated integers, got {text!r}")
    return seeds


@app.command()
def demo(
    out: Path = typer.Option(Path("results/demo"), help="Output folder (json, md, png)."),
    ratios: str = typer.Option("10,30,100", help="Compression ratios of the LSTM weights, comma-separated."),
    seed: int = typer.Option(0, help="Random seed."),
    resume: bool = typer.Option(False, help="Continue an interrupted run of the same command."),
) -> None:
    """MPO-LSTM vs pruning and the other baselines on sequential MNIST, end to end (quick preset, ~6 min on 2 cores)."""
    import json

    from ..protocol.spread import spread_table

    built = _make_task(TaskName("seqcls"), Preset.quick, seed)
    _run_protocol(built, _parse_ratios(ratios), out, seed, False, None, resume)
    if distributed.is_main():
        console.print(spread_table(json.loads((out / "results.json").read_text())), highlight=False)


@app.command()
def reproduce(
    task: TaskName = typer.Option(..., help="The task (see docs/architecture.md for adding one)."),
    preset: Preset = typer.Option(Preset.quick, help="quick: minutes per task on 2 CPU cores (seq. MNIST ~6); standard: "
                                  "<= 90 min on 2 CPU cores (PTB and speech: the baseline rows as a second --rows command, see "
                                  "docs/results.md); paper: paper-scale, for a GPU."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default results/<task>-<preset>)."),
    ratios: str = typer.Option("10,30,100", help="Compression ratios of the LSTM weights, comma-separated."),
    rows: Optional[str] = typer.Option(None, help="Comma-separated subset of rows (default: all)."),
    dataset: str = typer.Option("mnist", help="seqcls dataset: mnist, mnist1d or imdb (needs --data-dir)."),
    data_dir: Optional[Path] = typer.Option(None, help="Folder of the aclImdb data set (seqcls --dataset imdb)."),
    seed: int = typer.Option(0, help="Random seed."),
    seeds: Optional[str] = typer.Option(None, help="Comma-separated seeds (e.g. 0,1,2): one table per seed in "
                                        "OUT/seed-<s>, then OUT/summary.{md,json,png} with mean ± std."),
    distill: bool = typer.Option(False, help="Distil from the dense model in every fine-tuning row."),
    resume: bool = typer.Option(False, help="Continue an interrupted run of the same command (same options)."),
) -> None:
    """Run the comparison of MPO with pruning and the other baselines for one task; write json, md and png."""
    ratio_values = _parse_ratios(ratios)
    if data_dir is not None and not data_dir.is_dir():
        _fail(f"--data-dir {data_dir} is not a folder")
    folder = out or Path(f"results/{task.value}-{preset.value}")
    if seeds is None:
        built = _make_task(task, preset, seed, dataset=dataset, data_dir=data_dir)
        _run_protocol(built, ratio_values, folder, seed, distill, rows, resume)
        return
    from ..protocol import run_seeds

    seed_values = _parse_seeds(seeds)
    config = _protocol_config(ratio_values, seed_values[0], distill, rows)
    make = lambda s: _make_task(task, preset, s, dataset=dataset, data_dir=data_dir)  # noqa: E731
    _staged(run_seeds, make, config, folder, seed_values, resume=resume)
    if distributed.is_main():
        console.print((folder / "summary.md").read_text(), highlight=False)
        console.print(f"wrote {folder / 'summary.json'}, {folder / 'summary.md'}, {folder / 'summary.png'} and "
                      f"one table per seed in {folder}/seed-<s>")


@app.command("paper-grid")
def paper_grid(
    task: TaskName = typer.Option(TaskName["seqcls"], help="seqcls (sequential MNIST, or --dataset imdb) or speech."),
    preset: Preset = typer.Option(Preset.quick, help="Data and epochs of the task's preset; the LSTM is always "
                                  "the paper's (one layer, hidden 256)."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default results/paper-grid-<task>-<preset>)."),
    rates: str = typer.Option("5,10,15,20,25,50,75,100", help="Table 2 compression rates, comma-separated."),
    rows: str = typer.Option("dense,mpo-decomp,mpo-scratch,prune-agp", help="Rows to run (see docs/results.md)."),
    dataset: str = typer.Option("mnist", help="seqcls dataset: mnist or imdb (the paper's: needs --data-dir)."),
    data_dir: Optional[Path] = typer.Option(None, help="The aclImdb folder (--dataset imdb)."),
    dense_epochs: Optional[int] = typer.Option(None, help="Dense epochs (default: the preset's)."),
    finetune_epochs: Optional[int] = typer.Option(None, help="Fine-tuning epochs (default: the preset's)."),
    seed: int = typer.Option(0, help="Random seed."),
    resume: bool = typer.Option(False, help="Continue an interrupted run of the same command."),
) -> None:
    """The paper's own grid: its LSTM layout and Table 2 bonds, MPO vs pruning, beside its Tables 3-5."""
    from ..protocol import run_staged
    from ..protocol.paper import PAPER_HIDDEN, grid_markdown

    if task.value not in ("seqcls", "speech"):
        _fail(f"--task must be seqcls or speech for the paper grid, got {task.value!r}")
    if data_dir is not None and not data_dir.is_dir():
        _fail(f"--data-dir {data_dir} is not a folder")
    rate_values = _parse_ratios(rates)
    config = _protocol_config(rate_values, seed, False, rows, layout="paper", dense_epochs=dense_epochs,
                              finetune_epochs=finetune_epochs)
    options = {"hidden_size": PAPER_HIDDEN, "layers": 1, "dataset": dataset, "data_dir": data_dir,
               "embedding_dim": PAPER_HIDDEN}
    built = _make_task(task, preset, seed, **options)
    folder = out or Path(f"results/paper-grid-{task.value}-{preset.value}")
    document = _staged(run_staged, built, config, folder, resume=resume)
    if distributed.is_main():
        from ...atomic import atomic_write_bytes

        mpo_rows = [r for r in ("mpo-scratch", "mpo-decomp", "mpo-central") if r in config.rows]
        pruning = next((r for r in ("prune-agp", "prune-oneshot") if r in config.rows), None)
        text = "\n".join(grid_markdown(document, m, pruning) for m in mpo_rows) if pruning else ""
        atomic_write_bytes(folder / "paper-grid.md", text.encode())
        console.print(text, highlight=False)
        console.print(f"wrote {folder / 'paper-grid.md'} and the full table in {folder / 'results.md'}")


def _make_task(task: TaskName, preset: Preset, seed: int, **options):
    """Build a registered task at ``preset``; ``options`` (e.g. ``dataset``) go to the tasks that take them."""
    from ..data.speech import EspeakMissingError
    from ..tasks import get_task

    try:
        task_type = get_task(task.value)
        accepted = {k: v for k, v in options.items() if k in task_type.options}
        return task_type.make_task(preset.value, seed=seed, **accepted)
    except (ValueError, FileNotFoundError, EspeakMissingError) as exc:
        _fail(_said(exc, _PROTOCOL_FLAGS))


@app.command()
def train(
    task: TaskName = typer.Option(..., help="The task (see docs/architecture.md for adding one)."),
    out: Path = typer.Option(..., help="Run folder: metrics.jsonl, checkpoints, and the final model in out/model."),
    preset: Preset = typer.Option(Preset.quick, help="Model size and data budget (as for reproduce)."),
    epochs: Optional[int] = typer.Option(None, help="Epochs (default: the preset's dense epochs)."),
    dataset: str = typer.Option("mnist", help="seqcls dataset: mnist, mnist1d or imdb."),
    data_dir: Optional[Path] = typer.Option(None, help="aclImdb folder for --dataset imdb."),
    seed: int = typer.Option(0, help="Random seed."),
    resume: bool = typer.Option(False, help="Continue from out/checkpoint.safetensors."),
    patience: Optional[int] = typer.Option(None, help="Early stopping after this many epochs without improvement."),
) -> None:
    """Train the dense model of a task (checkpointed every epoch, resumable) and save it."""
    from ..tasks import save_model
    from ..training import fit, seed_everything

    if epochs is not None and epochs < 1:
        _fail(f"--epochs must be >= 1, got {epochs}")
    if patience is not None and patience < 1:
        _fail(f"--patience must be >= 1, got {patience}")
    if out.exists() and not out.is_dir():
        _fail(f"--out {out} exists and is not a folder")
    built = _make_task(task, preset, seed, dataset=dataset, data_dir=data_dir)
    seed_everything(seed)
    model = built.build_model()
    try:
        result = fit(model, built.train_loader, built.val_loader, built.loss_fn, built.metric,
                     epochs=epochs or built.dense_epochs, lr=built.lr, optimizer=built.optimizer,
                     grad_clip=built.grad_clip, seed=seed, out_dir=out, patience=patience, resume=resume,
                     forward_fn=built.forward_fn)
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    if not distributed.is_main():
        return
    save_model(model, built.architecture, out / "model", overwrite=True)  # the run folder's own (--resume)
    console.print(f"best val {built.metric.name} {result.best_metric:.4f} at epoch {result.best_epoch}; "
                  f"model saved to {out / 'model'}")
