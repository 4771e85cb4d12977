"""The ``mpolstm`` command line (typer + rich).

Every usage error (bad option value, missing file) prints one line, naming the option the user
typed, and exits with code 2. Output to a pipe or a file is not wrapped at 80 columns.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from ..compression.layouts import describe_layouts
from ..errors import ConfigError
from ..export import FORMATS as EXPORT_FORMATS
from ..export import RUNTIMES, WRITERS
from . import distributed
from .tasks.registry import PRESETS, task_names

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress LSTM networks with Matrix Product Operators.")
# plain text: no markup or highlighting of what is printed, and no wrapping in pipes and logs
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 1000, markup=False, highlight=False)
err_console = Console(stderr=True)


TaskName = Enum("TaskName", [(name, name) for name in task_names()], type=str)
"""The registered tasks (see :mod:`mpolstm.harness.tasks.registry`)."""

Preset = Enum("Preset", [(name, name) for name in PRESETS], type=str)
"""The preset vocabulary every task uses (each task checks it has the one asked for)."""


@app.callback()
def _global_options(
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default: one per core). On a "
                                          "machine shared with other jobs, use the cores that are free (e.g. "
                                          "--threads 1); OMP_WAIT_POLICY=PASSIVE is set unless you set it."),
) -> None:
    """Options for every command: mpolstm --threads N COMMAND ..."""
    if threads is not None:
        if threads < 1:
            _fail(f"--threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)


def _fail(message: str) -> None:
    """Print one clear line and exit with code 2 (bad usage or input)."""
    err_console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def _said(exc: ValueError, flags: dict[str, str]) -> str:
    """The message of a library error; a :class:`ConfigError`'s with its fields named by the flags the
    user typed (``flags``: field -> flag, e.g. ``{"target_ratio": "--ratio"}``)."""
    return exc.render(flags) if isinstance(exc, ConfigError) else str(exc)


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
    from .protocol import ROWS, ProtocolConfig

    selected = tuple(ROWS) if rows is None else tuple(r.strip() for r in rows.split(",") if r.strip())
    flags = {**_PROTOCOL_FLAGS, "ratios": "--rates" if kwargs.get("layout") == "paper" else "--ratios"}
    try:
        return ProtocolConfig(ratios=ratios, rows=selected, seed=seed, distill=distill, **kwargs)
    except ValueError as exc:
        _fail(_said(exc, flags))


def _log(line: str) -> None:
    console.print(line)


def _staged(run, *args, **kwargs):
    """``run(*args, log=..., **kwargs)`` (a protocol runner); a refused staging folder, or one that
    cannot be written, is one error line."""
    from .protocol import StagingError

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
    from .protocol import run_staged

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

    from .protocol.spread import spread_table

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
    from .protocol import run_seeds

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
    task: TaskName = typer.Option(TaskName("seqcls"), help="seqcls (sequential MNIST, or --dataset imdb) or speech."),
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
    from .protocol import run_staged
    from .protocol.paper import PAPER_HIDDEN, grid_markdown

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
        from ..atomic import atomic_write_bytes

        mpo_rows = [r for r in ("mpo-scratch", "mpo-decomp", "mpo-central") if r in config.rows]
        pruning = next((r for r in ("prune-agp", "prune-oneshot") if r in config.rows), None)
        text = "\n".join(grid_markdown(document, m, pruning) for m in mpo_rows) if pruning else ""
        atomic_write_bytes(folder / "paper-grid.md", text.encode())
        console.print(text, highlight=False)
        console.print(f"wrote {folder / 'paper-grid.md'} and the full table in {folder / 'results.md'}")


def _make_task(task: TaskName, preset: Preset, seed: int, **options):
    """Build a registered task at ``preset``; ``options`` (e.g. ``dataset``) go to the tasks that take them."""
    from .data.speech import EspeakMissingError
    from .tasks import get_task

    try:
        task_type = get_task(task.value)
        accepted = {k: v for k, v in options.items() if k in task_type.options}
        return task_type.make_task(preset.value, seed=seed, **accepted)
    except (ValueError, FileNotFoundError, EspeakMissingError) as exc:
        _fail(_said(exc, _PROTOCOL_FLAGS))


def _load_model(path: Path):
    from .tasks import load_model

    if not path.exists():
        _fail(f"model {path} does not exist")
    try:
        return load_model(path)
    except ValueError as exc:
        _fail(str(exc))


def _check_output(path: Path, overwrite: bool, what: str, folder: bool = True) -> None:
    """The one rule for every output (``mpolstm.atomic``): an existing ``path`` (but an empty folder) is
    refused unless --overwrite; ``what`` names it as the user typed it (e.g. "--out x", "OUT x")."""
    from ..atomic import check_target

    if (path.exists() or path.is_symlink()) and folder != path.is_dir():
        _fail(f"{what} is {'a file' if folder else 'a folder'}; the output is {'a folder' if folder else 'one file'}: "
              "choose another path")
    try:
        check_target(path, overwrite, folder)
    except ValueError:
        _fail(f"{what} already exists; choose a new path, or add --overwrite to replace it (the whole "
              f"{'folder' if folder else 'file'})")


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
    from .tasks import save_model
    from .training import fit, seed_everything

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


def _source_model(model_in: Optional[Path], factory: Optional[str], weights: Optional[Path], random_init: bool):
    """(model, task spec or None): a saved task-model folder, or a user's factory + weights (or, with
    ``random_init``, the factory's own initialisation)."""
    from .usermodels import build_model

    if factory is None:
        if weights is not None or random_init:
            _fail(f"{'--weights' if weights is not None else '--random-init'} needs --factory (the function that "
                  "builds the dense architecture)")
        if model_in is None:
            _fail("give a saved model folder, or --factory package.module:function --weights FILE")
        return _load_model(model_in)
    if model_in is not None:
        _fail("give either a saved model folder or --factory/--weights, not both")
    if weights is None and not random_init:
        _fail(f"--factory {factory} without --weights would compress the model's random initialisation: pass "
              "--weights FILE (its trained state dict), or --random-init if that is what you want")
    if weights is not None and random_init:
        _fail("--random-init and --weights contradict each other; give one")
    try:
        model, note = build_model(factory, weights)
    except ValueError as exc:
        _fail(str(exc))
    if note:
        console.print(f"note: {note}")
    return model, None


def _batches(inputs: tuple, size: int) -> list[tuple]:
    """Split one batch of inputs (first axis) into batches of ``size`` rows."""
    rows = inputs[0].shape[0]
    return [tuple(x[i:i + size] for x in inputs) for i in range(0, rows, size)]


_COMPRESS_FLAGS = {"target_ratio": "--ratio", "max_bond": "--max-bond", "rel_tol": "--rel-tol", "num_cores": "--num-cores",
                   "layout": "--layout", "target_modules": "--target", "max_macs": "--max-macs",
                   "calibration": "--calibrate"}


def _compression_config(target: str, max_bond: Optional[int], rel_tol: Optional[float], ratio: Optional[float],
                        num_cores: int, layout: str, max_macs: Optional[int] = None):
    """The CompressionConfig of compress's flags; a bad value or combination is one error line naming
    the flags (the config's own rules, said with the flags' names)."""
    from ..compression import CompressionConfig

    targets = [t.strip() for t in target.split(",") if t.strip()]
    if not targets:
        _fail(f"--target must name at least one module, got {target!r}")
    try:
        return CompressionConfig(target_modules=targets if len(targets) > 1 else targets[0], max_bond=max_bond,
                                 rel_tol=rel_tol, target_ratio=ratio, num_cores=num_cores, layout=layout,
                                 max_macs=max_macs)
    except ValueError as exc:
        _fail(_said(exc, _COMPRESS_FLAGS))


def _check_targets(model, config) -> None:
    """``--target`` must select modules compress can replace; if not, the error lists the model's modules."""
    from ..compression.config import select_modules

    try:
        select_modules(model, config)
    except ValueError as exc:
        modules = [f"{name} ({type(module).__name__})" for name, module in model.named_modules() if name]
        shown = ", ".join(modules[:30]) + (f", ... ({len(modules) - 30} more)" if len(modules) > 30 else "")
        _fail(f"{_said(exc, _COMPRESS_FLAGS)}; the model's modules: {shown}")


def _stored_bytes(model, names: list[str]) -> int:
    """Bytes of the named MPO modules' weights as stored (int8 ones as int8), as inspect reads them from the file."""
    from ..storage import pack_weights, packed_bytes

    return packed_bytes(pack_weights(model, names, int8_cores=True)[0])


@app.command("compress")
def compress_cmd(
    paths: list[Path] = typer.Argument(..., metavar="[IN] OUT", help="IN: a saved task-model folder (mpolstm "
                                       "train/reproduce), left out with --factory; OUT: the folder to write "
                                       "(new or empty, or any with --overwrite; missing parents are created)."),
    max_bond: Optional[int] = typer.Option(None, help="Cap every bond of every compressed weight."),
    rel_tol: Optional[float] = typer.Option(None, help="Per-weight relative Frobenius error bound, in (0, 1)."),
    ratio: Optional[float] = typer.Option(None, help="Global budget: dense / MPO parameters of the selected weights."),
    max_macs: Optional[int] = typer.Option(None, help="Latency budget: most multiply-adds per time step at batch 1 "
                                           "over the selected weights (alone or with --ratio)."),
    target: str = typer.Option("lstm", help="Comma-separated module names (or one regex) to compress."),
    num_cores: int = typer.Option(4, help="Cores of the paper's interleaved layout."),
    layout: str = typer.Option("auto", help="auto (search per weight) or one of: " + describe_layouts() + "."),
    factory: Optional[str] = typer.Option(None, help="package.module:function building your dense model (looked "
                                          "up in the current directory first, as python -m does)."),
    weights: Optional[Path] = typer.Option(None, help="Its weights: safetensors or a state dict (.pt), also inside a "
                                           "checkpoint under \"model\" or \"state_dict\"."),
    random_init: bool = typer.Option(False, "--random-init", help="With --factory and no --weights: compress the "
                                     "factory's random initialisation (for trying the command; refused otherwise)."),
    calibrate: Optional[Path] = typer.Option(None, help="Safetensors file of model inputs (input0, input1, ...): "
                                             "minimise the output error on them, not the weight error."),
    distill_steps: int = typer.Option(0, help="Then distil from the original on the --calibrate inputs for N steps."),
    batch_size: int = typer.Option(32, help="Rows per distillation batch."),
    int8: bool = typer.Option(False, "--int8", help="Then store the MPO cores (and a hybrid's sparse values) as int8 "
                              "with float32 scales (mpolstm.quantize: ~4x fewer bytes; the model computes in float32)."),
    int8_dense: bool = typer.Option(False, "--int8-dense", help="ONNX in and out: also store the weights of the "
                                    "dense MatMuls (layers left uncompressed) as int8."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists (the whole folder: nothing "
                                   "of the old one is kept)."),
) -> None:
    """Compress the selected layers of a saved model (or of your own, with --factory) into MPOs and save it,
    with its report (compression.json, shown by inspect)."""
    import copy

    from ..compression import compress
    from ..distill import distill
    from ..io import save
    from ..quantization import quantize
    from .tasks import save_model
    from .usermodels import compression_files, read_inputs

    if paths[0].suffix.lower() == ".onnx":  # an ONNX model in, an ONNX model out (harness/onnxfiles.py)
        return _onnx_command("compress_onnx", paths, factory=factory, weights=weights, target=target,
                             max_bond=max_bond, rel_tol=rel_tol, ratio=ratio, max_macs=max_macs, num_cores=num_cores,
                             layout=layout, calibrate=calibrate, distill_steps=distill_steps, batch_size=batch_size,
                             int8=int8, int8_dense=int8_dense, overwrite=overwrite)
    if int8_dense:
        _fail("--int8-dense is for an ONNX model (mpolstm compress MODEL.onnx OUT.onnx --int8-dense)")
    if len(paths) not in (1, 2) or (len(paths) == 1) != (factory is not None):
        _fail("usage: mpolstm compress IN OUT, or mpolstm compress --factory MOD:FN [--weights FILE] OUT")
    model_in, model_out = (paths[0], paths[1]) if len(paths) == 2 else (None, paths[0])
    if distill_steps < 0 or batch_size < 1:
        _fail(f"--distill-steps must be >= 0 and --batch-size >= 1, got {distill_steps} and {batch_size}")
    if distill_steps and calibrate is None:
        _fail("--distill-steps needs --calibrate (the inputs to distil on)")
    _check_output(model_out, overwrite, f"OUT {model_out}")
    config = _compression_config(target, max_bond, rel_tol, ratio, num_cores, layout, max_macs)
    try:
        inputs = read_inputs(calibrate, "--calibrate") if calibrate is not None else None
    except ValueError as exc:
        _fail(str(exc))
    model, spec = _source_model(model_in, factory, weights, random_init)
    _check_targets(model, config)
    teacher = copy.deepcopy(model) if distill_steps else None
    try:
        model, report = compress(model, config, calibration=None if inputs is None else [inputs])
        console.print(str(report))
        if teacher is not None:
            result = distill(model, teacher, _batches(inputs, batch_size), steps=distill_steps, progress=True)
            console.print(f"distilled {distill_steps} steps on the --calibrate inputs: loss {result.losses[0]:.4f} -> "
                          f"{result.losses[-1]:.4f} (the errors above were measured before distillation)")
    except ValueError as exc:
        _fail(_said(exc, _COMPRESS_FLAGS))
    if int8:
        try:
            quantize(model)
        except ValueError as exc:
            _fail(f"--int8: {exc}")
        stored = _stored_bytes(model, [m.name for m in report.modules])
        console.print(f"int8: {report.stored_bytes:,} -> {stored:,} bytes as stored (the cores and sparse values as "
                      "int8 with float32 scales)")
    files = compression_files(report, distill_steps, factory if spec is None else None)
    try:
        if spec is not None:
            save_model(model, spec, model_out, overwrite=overwrite, files=files)
        else:
            save(model, model_out, overwrite=overwrite, files=files)
    except (OSError, ValueError) as exc:
        _fail(f"cannot write OUT {model_out}: {exc}")
    console.print(f"saved {model_out}")


@app.command()
def inspect(
    model_path: Path = typer.Argument(..., metavar="MODEL", help="A folder written by mpolstm.save (any model)."),
    plot: Optional[Path] = typer.Option(None, help="Also draw the entanglement entropy per bond to this PNG."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the --plot file if it exists."),
) -> None:
    """Per-weight factors, bonds, parameters, errors and entanglement entropies of a saved model,
    read from its files alone, checked as load checks them (a damaged folder is refused)."""
    from ..io import CONFIG_FILE
    from .usermodels import STORED_WEIGHTS, describe_folder, describe_stored, inspect_folder

    if plot is not None:
        _check_output(plot, overwrite, f"--plot {plot}", folder=False)

    if model_path.suffix.lower() == ".onnx":
        return _onnx_command("inspect_onnx", model_path)
    try:
        if not (model_path / CONFIG_FILE).exists() and (model_path / STORED_WEIGHTS).is_file():
            console.print(describe_stored(model_path / STORED_WEIGHTS))  # a protocol row of torch's int8 model
            return
        rows = describe_folder(model_path)
    except ValueError as exc:
        _fail(str(exc))
    console.print(inspect_folder(model_path, rows))
    if plot is not None and rows:
        _plot_entropy({r["weight"]: r["entropy"] for r in rows}, plot)
        console.print(f"wrote {plot}")


def _onnx_command(name: str, *args, **kwargs) -> None:
    """Run ``harness.onnxfiles.<name>`` and print what it returns (a text or lines); a ValueError is one
    error line (a configuration error's fields named by the flags)."""
    from . import onnxfiles

    try:
        result = getattr(onnxfiles, name)(*args, **kwargs)
        for line in [result] if isinstance(result, str) else result:
            console.print(line)
    except ValueError as exc:
        _fail(_said(exc, _COMPRESS_FLAGS))


def _plot_entropy(curves: dict[str, list[float]], plot: Path) -> None:
    import matplotlib

    from ..atomic import atomic_open

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for label, values in curves.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", label=label)
    ax.set_xlabel("bond k")
    ax.set_ylabel("entanglement entropy S_k")
    ax.legend(fontsize=7)
    fig.tight_layout()
    plot.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(plot, "wb") as fh:
        fig.savefig(fh, dpi=120, format="png")
    plt.close(fig)


@app.command()
def enhance(
    noisy: Path = typer.Argument(..., help="Noisy WAV (converted to 16 kHz mono if needed)."),
    out: Path = typer.Argument(..., help="Enhanced WAV to write (16-bit PCM, 16 kHz)."),
    model_path: Path = typer.Option(..., "--model", help="A saved speech model (mpolstm reproduce --task speech)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
) -> None:
    """Enhance a WAV frame by frame (streaming) and report the real-time factor and per-frame latency."""
    from .tasks.speech import enhance_file

    if not noisy.is_file():
        _fail(f"input {noisy} does not exist")
    _check_output(out, overwrite, f"OUT {out}", folder=False)
    model, spec = _load_model(model_path)
    if spec.get("name") != "speech":
        _fail(f"model {model_path} is a {spec.get('name')!r} model; enhance needs a speech model")
    try:
        stats, notes = enhance_file(model, noisy, out)
    except ValueError as exc:
        _fail(str(exc))
    for note in notes:
        console.print(f"note: {note}")
    console.print(f"wrote {out}: {stats.frames} frames, real-time factor {stats.rtf:.3f}, per-frame "
                  f"{stats.frame_ms_mean:.2f} ms mean / {stats.frame_ms_p95:.2f} ms p95, algorithmic latency "
                  f"{stats.algorithmic_latency_ms:.0f} ms")


ExportFormat = Enum("ExportFormat", [(name, name) for name in EXPORT_FORMATS], type=str)
"""mpolstm.export.FORMATS: the traced formats of its WRITERS table, and dense."""
Runtime = Enum("Runtime", [(name, name) for name in RUNTIMES], type=str)


@app.command("export")
def export_cmd(
    model_path: Path = typer.Argument(..., metavar="MODEL", help="A saved model folder."),
    fmt: ExportFormat = typer.Option(..., "--format", help=f"{' or '.join(WRITERS)} (one file) or "
                                     "dense (a plain torch model folder)."),
    out: Path = typer.Option(..., help="Output file (torchscript, onnx) or folder (dense); new (missing parents are "
                             "created), or replaced with --overwrite."),
    runtime: Runtime = typer.Option(Runtime.factorized, help="torchscript/onnx: factorized (products through the "
                                    "factors, no dense weight at run time) or dense (the graph rebuilds the dense "
                                    "weights, torch's fused kernels)."),
    factory: Optional[str] = typer.Option(None, help="For a folder of your own model: package.module:function "
                                          "building its dense architecture (default: the one compress recorded)."),
    inputs: Optional[Path] = typer.Option(None, help="For your own model's torchscript/onnx: a safetensors file "
                                          "of example inputs (input0, input1, ...)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists (the whole file or folder)."),
    int8: Optional[bool] = typer.Option(None, "--int8/--float", help="onnx: store and multiply the MPO factors in "
                                        "int8 (default for a model compressed with --int8, which the other formats "
                                        "refuse unless --float), or write float32 factors."),
) -> None:
    """Export a saved model for serving: TorchScript, ONNX, or a dense model for MPO-unaware tools."""
    from .tasks import ARCHITECTURE_FILE, export_task_model

    if not model_path.exists():
        _fail(f"model {model_path} does not exist")
    _check_output(out, overwrite, f"--out {out}", folder=fmt.value == "dense")
    if (model_path / ARCHITECTURE_FILE).is_file() and factory is None:
        model, spec = _load_model(model_path)
        try:
            written = export_task_model(model, spec, fmt.value, out, runtime.value, overwrite=overwrite, int8=int8)
        except (ValueError, OSError) as exc:
            _fail(_export_error(exc))
    else:
        written = _export_user_model(model_path, fmt.value, out, factory, inputs, runtime.value, overwrite, int8)
    if fmt.value == "onnx":
        from ..export import int8_report, onnx_weight_bytes

        report = int8_report(written)
        int8_note = "" if report is None else (
            f"; MPO factors int8 ({report['method']} quantization by onnxruntime): {report['factor_bytes']:,} bytes "
            f"int8, {report['float_factor_bytes']:,} left float32; output within {report['relative_error']:.2%} "
            "of the model on random inputs")
        console.print(f"wrote {written} ({runtime.value} runtime, {onnx_weight_bytes(written):,} bytes of "
                      f"weights{int8_note})")
    elif fmt.value != "dense":
        from ..export import file_weight_bytes

        console.print(f"wrote {written} ({runtime.value} runtime, {file_weight_bytes(written):,} bytes of weights)")
    else:
        console.print(f"wrote {written}")


def _export_error(exc: Exception) -> str:
    """An export error in the CLI's terms (the Python call it suggests becomes the flag)."""
    return (str(exc).replace("the dense runtime (set_factorized(model, False))", "--runtime dense")
            .replace("pass int8=False", "add --float").replace("int8=True, but", "--int8, but"))


def _export_user_model(folder: Path, fmt: str, out: Path, factory: Optional[str], inputs: Optional[Path],
                       runtime: str, overwrite: bool, int8: Optional[bool]) -> Path:
    import json

    from ..export import export_model
    from ..io import load
    from .usermodels import FACTORY_FILE, build_model, read_inputs

    note = folder / FACTORY_FILE
    if factory is None and note.is_file():
        factory = json.loads(note.read_text()).get("factory")
    if factory is None:
        _fail(f"{folder} is not a task model: pass --factory package.module:function (its dense architecture)")
    if fmt != "dense" and inputs is None:
        _fail(f"--format {fmt} traces the model: pass --inputs FILE (safetensors with input0, input1, ...)")
    try:
        model = load(folder, build_model(factory, None)[0]).eval()
        return export_model(model, out, fmt, None if inputs is None else read_inputs(inputs), runtime=runtime,
                            overwrite=overwrite, int8=int8)
    except (ValueError, OSError) as exc:
        _fail(_export_error(exc))


data_app = typer.Typer(help="Build the offline data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("speech")
def data_speech(
    preset: str = typer.Option("quick", help="Corpus size: tiny, quick or standard."),
    seed: int = typer.Option(0, help="Random seed of sentences, voices and noises."),
) -> None:
    """Build (or find cached) the synthetic noisy-speech corpus and print where it is."""
    from .data.speech import PRESETS, EspeakMissingError, build_corpus

    if preset not in PRESETS:
        _fail(f"--preset must be one of {sorted(PRESETS)}, got {preset!r}")
    try:
        path = build_corpus(preset=preset, seed=seed)
    except EspeakMissingError as exc:
        _fail(str(exc))
    console.print(f"speech corpus ({preset}, seed {seed}): {path}")


@app.command()
def decompose(
    size: int = typer.Option(256, help="The built-in matrix is size x size."),
    num_cores: int = typer.Option(4, help="Number of MPO cores."),
) -> None:
    """Decompose a built-in trained-looking matrix at several bonds: parameters, error, entropy."""
    import math

    import torch
    from rich.table import Table

    from .. import mpo as mpo_math

    if size < 4 or num_cores < 2:
        _fail(f"--size must be >= 4 and --num-cores >= 2, got {size} and {num_cores}")
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(size, size, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(size, size, generator=gen, dtype=torch.float64))
    x = torch.linspace(0, 1, size, dtype=torch.float64)
    smooth = torch.cos(3 * math.pi * torch.outer(x, x))
    matrix = (smooth / smooth.norm() + 0.3 * (u * torch.arange(1, size + 1) ** -1.5) @ v.T).float()
    factors = mpo_math.factorize(size, num_cores)
    table = Table(title=f"MPO decomposition of a {size}x{size} matrix, factors {factors}")
    for col in ("max bond", "bonds", "parameters", "compression", "rel. error", "max entropy"):
        table.add_column(col, justify="right")
    for bond in (1, 2, 4, 8, 16, 32, 64):
        m = mpo_math.decompose(matrix, factors, factors, max_bond=bond)
        table.add_row(str(bond), str(m.bond_dims), f"{m.num_params:,}", f"{matrix.numel() / m.num_params:.1f}x",
                      f"{m.report.rel_error:.4f}", f"{float(m.entanglement_entropy().max()):.3f}")
    console.print(table)


def main() -> None:
    """Console entry point: click's usage errors (bad option values, unknown commands) become one
    ``error: ...`` line and exit code 2, like every other bad input."""
    try:  # typer >= 0.20 vendors click; older versions use click itself
        from typer._click.exceptions import UsageError
    except ImportError:  # pragma: no cover
        from click.exceptions import UsageError

    try:
        code = app(standalone_mode=False)
    except UsageError as exc:
        if exc.format_message():  # empty when no command was given: the help was printed
            err_console.print(f"error: {exc.format_message()}", markup=False, highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
    except typer.Abort:
        raise SystemExit(130) from None
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
