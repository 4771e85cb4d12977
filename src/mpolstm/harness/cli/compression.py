"""``compress`` (a saved model, your own, or an ONNX file, into MPOs) and ``inspect``, with their plots."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import typer

from ...calibration import batch_axis
from ...compression.layouts import describe_layouts
from .common import _check_output, _fail, _load_model, _said, app, console


def _source_model(model_in: Optional[Path], factory: Optional[str], weights: Optional[Path], random_init: bool):
    """(model, task spec or None): a saved task-model folder, or a user's factory + weights (or, with
    ``random_init``, the factory's own initialisation)."""
    from ..usermodels import build_model

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


def _batches(inputs: tuple, size: int, axis: int = 0) -> list[tuple]:
    """Split one batch of inputs along its batch ``axis`` into batches of ``size`` samples."""
    rows = inputs[0].shape[axis]
    return [tuple(x.narrow(axis, i, min(size, rows - i)) for x in inputs) for i in range(0, rows, size)]


def _slices(inputs: tuple, axis: int, count: int = 8) -> list[tuple]:
    """The --calibrate inputs as ``count`` batches along the batch ``axis`` (fewer when it has fewer samples):
    compress holds every second one out to measure the model's output error and decide the allocation on."""
    return _batches(inputs, -(-inputs[0].shape[axis] // count), axis)


_COMPRESS_FLAGS = {"target_ratio": "--ratio", "max_bond": "--max-bond", "rel_tol": "--rel-tol", "num_cores": "--num-cores",
                   "layout": "--layout", "target_modules": "--target", "max_macs": "--max-macs",
                   "calibration": "--calibrate", "validation": "--validate", "max_output_error": "--max-error"}


def _compression_config(target: str, max_bond: Optional[int], rel_tol: Optional[float], ratio: Optional[float],
                        num_cores: int, layout: str, max_macs: Optional[int] = None, max_error: Optional[float] = None):
    """The CompressionConfig of compress's flags; a bad value or combination is one error line naming
    the flags (the config's own rules, said with the flags' names)."""
    from ...compression import CompressionConfig

    targets = [t.strip() for t in target.split(",") if t.strip()]
    if not targets:
        _fail(f"--target must name at least one module, got {target!r}")
    try:
        return CompressionConfig(target_modules=targets if len(targets) > 1 else targets[0], max_bond=max_bond,
                                 rel_tol=rel_tol, target_ratio=ratio, num_cores=num_cores, layout=layout,
                                 max_macs=max_macs, max_output_error=max_error)
    except ValueError as exc:
        _fail(_said(exc, _COMPRESS_FLAGS))


def _check_targets(model, config, default: bool) -> None:
    """``--target`` (``default``: not given, so "lstm") must select modules compress can replace; if not,
    the error lists the model's modules."""
    from ...compression.config import select_modules

    try:
        select_modules(model, config)
    except ValueError as exc:
        modules = [f"{name} ({type(module).__name__})" for name, module in model.named_modules() if name]
        shown = ", ".join(modules[:30]) + (f", ... ({len(modules) - 30} more)" if len(modules) > 30 else "")
        said = (f"without --target, the module named {config.target_modules!r} is compressed, and this model has "
                "none of a supported type: name the modules with --target" if default and "selects no module" in str(exc)
                else _said(exc, _COMPRESS_FLAGS))
        _fail(f"{said}; the model's modules: {shown}")


def _stored_bytes(model, names: list[str]) -> int:
    """Bytes of the named MPO modules' weights as stored (int8 ones as int8), as inspect reads them from the file."""
    from ...storage import pack_weights, packed_bytes

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
    target: Optional[str] = typer.Option(None, help="Comma-separated module names (or one regex) to compress "
                                         "[default: lstm; an ONNX model: its LSTM / GRU layers]."),
    num_cores: int = typer.Option(4, help="Cores of the paper's interleaved layout."),
    layout: str = typer.Option("auto", help="auto (search per weight) or one of: " + describe_layouts() + "."),
    factory: Optional[str] = typer.Option(None, help="package.module:function building your dense model (looked "
                                          "up in the current directory first, as python -m does)."),
    weights: Optional[Path] = typer.Option(None, help="Its weights: safetensors or a state dict (.pt), also inside a "
                                           "checkpoint under \"model\" or \"state_dict\"."),
    random_init: bool = typer.Option(False, "--random-init", help="With --factory and no --weights: compress the "
                                     "factory's random initialisation (for trying the command; refused otherwise)."),
    calibrate: Optional[Path] = typer.Option(None, help="Safetensors file of model inputs (input0, input1, ...): "
                                             "minimise the output error on them, not the weight error. For a per-frame ONNX graph "
                                             "(states in and out) its non-state inputs with a leading time axis: a "
                                             "sequence of frames, the states carried from zero."),
    max_error: Optional[float] = typer.Option(None, "--max-error", help="Tolerance mode (instead of --ratio): the "
                                              "largest ratio whose model output error on held-out --calibrate "
                                              "inputs is at most this (e.g. 0.05) with 90% confidence, each "
                                              "candidate measured."),
    plot: Optional[Path] = typer.Option(None, help="With --max-error: draw the curve ratio -> output error to this "
                                        "PNG."),
    validate: Optional[Path] = typer.Option(None, help="Safetensors file of held-out model inputs (as --calibrate): "
                                            "the model's output error is measured, and the allocation decided, on them "
                                            "(default: every second of 8 slices of the --calibrate inputs)."),
    distill_steps: int = typer.Option(0, help="Then distil from the original on the --calibrate inputs for N steps."),
    batch_size: int = typer.Option(32, help="Rows per distillation batch (frames per crop of a "
                                  "sequence for a per-frame ONNX graph)."),
    int8: bool = typer.Option(False, "--int8", help="Then store the MPO cores (and a hybrid's sparse values) as int8 "
                              "with float32 scales (mpolstm.quantize: ~4x fewer bytes; the model computes in float32)."),
    int8_dense: bool = typer.Option(False, "--int8-dense", help="ONNX in and out: also store the weights of the "
                                    "dense MatMuls (layers left uncompressed) as int8."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists (the whole folder: nothing "
                                   "of the old one is kept)."),
) -> None:
    """Compress the selected layers of a saved model (or of your own, with --factory) into MPOs and save it,
    with its report (compression.json, shown by inspect)."""
    if plot is not None and max_error is None:
        _fail("--plot draws the curve of the --max-error search: give --max-error")
    if paths[0].suffix.lower() == ".onnx":  # an ONNX model in, an ONNX model out (harness/onnxfiles.py)
        return _onnx_command("compress_onnx", paths, factory=factory, weights=weights, target=target or "lstm",
                             max_bond=max_bond, rel_tol=rel_tol, ratio=ratio, max_macs=max_macs, num_cores=num_cores,
                             layout=layout, calibrate=calibrate, distill_steps=distill_steps, batch_size=batch_size,
                             int8=int8, int8_dense=int8_dense, overwrite=overwrite, validate=validate,
                             max_error=max_error, plot=plot)
    model_in, model_out = _compress_paths(paths, factory, int8_dense, distill_steps, batch_size, calibrate)
    _check_output(model_out, overwrite, f"OUT {model_out}")
    config = _compression_config(target or "lstm", max_bond, rel_tol, ratio, num_cores, layout, max_macs, max_error)
    if plot is not None:
        _check_output(plot, overwrite, f"--plot {plot}", folder=False)
    inputs, held_out = _read_inputs(calibrate, validate)
    model, spec = _source_model(model_in, factory, weights, random_init)
    _check_targets(model, config, default=target is None)
    original = copy.deepcopy(model) if int8 else None
    model, report = _compress_model(model, config, inputs, held_out, distill_steps, batch_size)
    if original is not None:
        _quantize(model, report, original, _measured_on(original, inputs, held_out))
    _write_model(model, spec, model_out, overwrite, report, distill_steps, factory)
    if plot is not None:
        plot_curve(report.curve, plot)
        console.print(f"wrote {plot}")


def _compress_paths(paths: list[Path], factory: Optional[str], int8_dense: bool, distill_steps: int,
                    batch_size: int, calibrate: Optional[Path]) -> tuple[Optional[Path], Path]:
    """(IN or None, OUT) of compress's paths, the flags checked against them (not an ONNX model)."""
    if int8_dense:
        _fail("--int8-dense is for an ONNX model (mpolstm compress MODEL.onnx OUT.onnx --int8-dense)")
    if len(paths) not in (1, 2) or (len(paths) == 1) != (factory is not None):
        _fail("usage: mpolstm compress IN OUT, or mpolstm compress --factory MOD:FN [--weights FILE] OUT")
    if distill_steps < 0 or batch_size < 1:
        _fail(f"--distill-steps must be >= 0 and --batch-size >= 1, got {distill_steps} and {batch_size}")
    if distill_steps and calibrate is None:
        _fail("--distill-steps needs --calibrate (the inputs to distil on)")
    return (paths[0], paths[1]) if len(paths) == 2 else (None, paths[0])


def _read_inputs(calibrate: Optional[Path], validate: Optional[Path]) -> tuple[Optional[tuple], Optional[tuple]]:
    """The --calibrate and --validate inputs (each None when not given); an unreadable file is one error line."""
    from ..usermodels import read_inputs

    try:
        inputs = read_inputs(calibrate, "--calibrate") if calibrate is not None else None
        held_out = read_inputs(validate, "--validate") if validate is not None else None
    except ValueError as exc:
        _fail(str(exc))
    return inputs, held_out


def _compress_model(model, config, inputs: Optional[tuple], held_out: Optional[tuple], distill_steps: int,
                    batch_size: int):
    """(compressed model, report), printing the report; then ``distill_steps`` of distillation from the
    original on the --calibrate inputs."""
    from ...compression import compress
    from ...distill import distill

    teacher = copy.deepcopy(model) if distill_steps else None
    try:
        axis = 0 if inputs is None else batch_axis(model, inputs)
        model, report = compress(model, config, calibration=None if inputs is None else _slices(inputs, axis),
                                 validation=None if held_out is None else _slices(held_out,
                                                                                  batch_axis(model, held_out), 4))
        console.print(str(report))
        if teacher is not None:
            result = distill(model, teacher, _batches(inputs, batch_size, axis), steps=distill_steps, progress=True)
            console.print(f"distilled {distill_steps} steps on the --calibrate inputs: loss {result.losses[0]:.4f} -> "
                          f"{result.losses[-1]:.4f} (the errors above were measured before distillation)")
    except ValueError as exc:
        _fail(_said(exc, _COMPRESS_FLAGS))
    return model, report


def _measured_on(original, inputs: Optional[tuple], held_out: Optional[tuple]) -> list:
    """The batches the report's output error was measured on: --validate, the held-out --calibrate slices,
    or without calibration the synthetic inputs."""
    from ...compression.checks import synthetic_batches

    if held_out is not None:
        return _slices(held_out, batch_axis(original, held_out), 4)
    if inputs is None:
        return synthetic_batches(original)
    slices = _slices(inputs, batch_axis(original, inputs))
    return slices[1::2] if len(slices) > 1 else slices


def _quantize(model, report, original, batches: list) -> None:
    """--int8: the MPO cores (and sparse values) stored as int8; prints the bytes before and after and the
    int8 model's output error on ``batches`` beside the float model's (``report.int8_check``)."""
    import torch

    from ...compression.checks import batch_errors, batch_outputs, total_error
    from ...compression.report import measured_lines
    from ...quantization import quantize

    with torch.no_grad():
        reference = batch_outputs(original, batches) if batches else []
        floats = total_error(batch_errors(model.eval(), batches, reference)) if batches else None
    try:
        quantize(model)
    except ValueError as exc:
        _fail(f"--int8: {exc}")
    stored = _stored_bytes(model, [m.name for m in report.modules])
    console.print(f"int8: {report.stored_bytes:,} -> {stored:,} bytes as stored (the cores and sparse values as "
                  "int8 with float32 scales)")
    if batches:
        with torch.no_grad():
            report.int8_check = {"error": total_error(batch_errors(model.eval(), batches, reference)),
                                 "float_error": floats, "batches": len(batches)}
        console.print(measured_lines({"int8_check": report.int8_check})[0])


def _write_model(model, spec: Optional[dict], model_out: Path, overwrite: bool, report, distill_steps: int,
                 factory: Optional[str]) -> None:
    """Save the compressed model to OUT with its report: a task model with its spec, your own with its factory."""
    from ...io import save
    from ..tasks import save_model
    from ..usermodels import compression_files

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
    from ...io import CONFIG_FILE
    from ..usermodels import STORED_WEIGHTS, describe_folder, describe_stored, inspect_folder

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
    from .. import onnxfiles

    try:
        result = getattr(onnxfiles, name)(*args, **kwargs)
        for line in [result] if isinstance(result, str) else result:
            console.print(line)
    except ValueError as exc:
        _fail(_said(exc, _COMPRESS_FLAGS))


def plot_curve(curve: list, plot: Path) -> None:
    """The tolerance search's curve (ratio -> model output error) as a PNG."""
    import matplotlib

    from ...atomic import atomic_open

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot([r for r, _ in curve], [e for _, e in curve], marker="o")
    ax.set_xscale("log")
    ax.set_xlabel("compression ratio")
    ax.set_ylabel("model output error (held out)")
    fig.tight_layout()
    plot.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(plot, "wb") as fh:
        fig.savefig(fh, dpi=120, format="png")
    plt.close(fig)


def _plot_entropy(curves: dict[str, list[float]], plot: Path) -> None:
    import matplotlib

    from ...atomic import atomic_open

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
