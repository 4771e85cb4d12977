"""Serving a saved model: ``export`` (ONNX, ExecuTorch, AOTInductor, TorchScript, dense) and ``enhance``
(a speech model on a WAV, streaming)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from ...export import FORMATS as EXPORT_FORMATS
from ...export import RUNTIMES, WRITERS
from .common import _check_output, _fail, _load_model, app, console


@app.command()
def enhance(
    noisy: Path = typer.Argument(..., help="Noisy WAV (converted to 16 kHz mono if needed)."),
    out: Path = typer.Argument(..., help="Enhanced WAV to write (16-bit PCM, 16 kHz)."),
    model_path: Path = typer.Option(..., "--model", help="A saved speech model (mpolstm reproduce --task speech)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
) -> None:
    """Enhance a WAV frame by frame (streaming) and report the real-time factor and per-frame latency."""
    from ..tasks.speech import enhance_file

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
_TRACED = ", ".join(WRITERS)  # the one-file formats, as the help names them


@app.command("export")
def export_cmd(
    model_path: Path = typer.Argument(..., metavar="MODEL", help="A saved model folder."),
    fmt: ExportFormat = typer.Option(..., "--format", help=f"{_TRACED} (one file) or dense (a plain "
                                     "torch model folder)."),
    out: Path = typer.Option(..., help=f"Output file ({_TRACED}) or folder (dense); new (missing parents are "
                             "created), or replaced with --overwrite."),
    runtime: Runtime = typer.Option(Runtime.factorized, help=f"{_TRACED}: factorized (products through the "
                                    "factors, no dense weight at run time) or dense (the graph rebuilds the dense "
                                    "weights, torch's fused kernels)."),
    factory: Optional[str] = typer.Option(None, help="For a folder of your own model: package.module:function "
                                          "building its dense architecture (default: the one compress recorded)."),
    inputs: Optional[Path] = typer.Option(None, help=f"For your own model's {_TRACED}: a safetensors file "
                                          "of example inputs (input0, input1, ...)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists (the whole file or folder)."),
    int8: Optional[bool] = typer.Option(None, "--int8/--float", help="onnx, executorch: store and multiply the MPO "
                                        "factors in int8 (default for a model compressed with --int8, which the other formats "
                                        "refuse unless --float), or write float32 factors."),
) -> None:
    """Export a saved model folder for serving: ONNX, ExecuTorch, AOTInductor, TorchScript, or a dense model for
    MPO-unaware tools (an ONNX file goes through `mpolstm compress`)."""
    from ..tasks import ARCHITECTURE_FILE, export_task_model

    if not model_path.exists():
        _fail(f"model {model_path} does not exist")
    if not model_path.is_dir():
        hint = ("an ONNX file is compressed and written as ONNX by `mpolstm compress FILE.onnx OUT.onnx`"
                if model_path.suffix == ".onnx" else "save one with mpolstm compress or mpolstm.save")
        _fail(f"model {model_path} is a file; export takes a saved model folder ({hint})")
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
        from ...export import int8_report, onnx_weight_bytes

        report = int8_report(written)
        int8_note = "" if report is None else (
            f"; MPO factors int8 ({report['method']} quantization by onnxruntime): {report['factor_bytes']:,} bytes "
            f"int8, {report['float_factor_bytes']:,} left float32; output within {report['relative_error']:.2%} "
            "of the model on random inputs")
        console.print(f"wrote {written} ({runtime.value} runtime, {onnx_weight_bytes(written):,} bytes of "
                      f"weights{int8_note})")
    elif fmt.value != "dense":
        from ...export import file_weight_bytes

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

    from ...export import export_model
    from ...io import load
    from ..usermodels import FACTORY_FILE, build_model, read_inputs

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
