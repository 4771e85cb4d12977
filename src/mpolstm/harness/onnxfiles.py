"""The command line on ONNX files: ``mpolstm compress MODEL.onnx OUT.onnx`` and ``mpolstm inspect FILE.onnx``.

The CLI hands a model path ending in ``.onnx`` to these functions; they raise ValueError with one
line for every bad input (the CLI prints it and exits 2) and write nothing then.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterator, Optional, Sequence

__all__ = ["compress_onnx", "inspect_onnx"]


def compress_onnx(paths: list[Path], *, factory: Optional[str], weights: Optional[Path], target: str,
                  max_bond: Optional[int], rel_tol: Optional[float], ratio: Optional[float], max_macs: Optional[int],
                  num_cores: int, layout: str, calibrate: Optional[Path], distill_steps: int, batch_size: int,
                  int8: bool, overwrite: bool, int8_dense: bool = False, validate: Optional[Path] = None,
                  max_error: Optional[float] = None, plot: Optional[Path] = None) -> Iterator[str]:
    """Run ``mpolstm.onnx.compress_file`` for the compress command's flags; yields the lines to print.
    ``--target`` names layers (``mpolstm.onnx.pipeline.layer_names``: a node name or the layer's name); its default ("lstm")
    means the graph's recurrent layers. Distillation uses the MSE of the outputs."""
    from ..compression import CompressionConfig
    from ..errors import ConfigError
    from ..export import onnx_weight_bytes
    from ..onnx import compress_file
    from .usermodels import read_inputs

    if len(paths) != 2 or factory is not None or weights is not None:
        raise ValueError("usage: mpolstm compress MODEL.onnx OUT.onnx [--ratio R | --max-macs N ...] "
                         "(--factory and --weights do not apply to an ONNX model)")
    source, out = paths
    if not source.is_file():
        raise ValueError(f"model {source} does not exist")
    if out.suffix.lower() != ".onnx":
        raise ValueError(f"output {out}: an ONNX model is written as an ONNX file (OUT.onnx)")
    if out.is_dir():
        raise ValueError(f"OUT {out} is a folder; an ONNX model is written as one file (OUT.onnx)")
    if out.exists() and not overwrite:
        raise ValueError(f"OUT {out} already exists; choose a new path, or add --overwrite to replace it")
    if plot is not None and plot.exists() and not overwrite:
        raise ValueError(f"--plot {plot} already exists; choose a new path, or add --overwrite to replace it")
    if distill_steps < 0 or batch_size < 1:
        raise ValueError(f"--distill-steps must be >= 0 and --batch-size >= 1, got {distill_steps} and {batch_size}")
    if distill_steps and calibrate is None:
        raise ValueError("--distill-steps needs --calibrate (the inputs to distil on)")
    targets = [t.strip() for t in target.split(",") if t.strip()]
    config = CompressionConfig(target_modules=None if targets == ["lstm"] else targets, max_bond=max_bond,
                               rel_tol=rel_tol, target_ratio=ratio, num_cores=num_cores, layout=layout,
                               max_macs=max_macs, max_output_error=max_error)
    inputs = read_inputs(calibrate, "--calibrate") if calibrate is not None else None
    held_out = read_inputs(validate, "--validate") if validate is not None else None
    try:
        report, _ = compress_file(source, out, config, calibration=None if inputs is None else [inputs],
                                  validation=None if held_out is None else [held_out],
                                  distill_steps=distill_steps, batch_size=batch_size, int8=int8,
                                  int8_dense=int8_dense, progress=distill_steps > 0, overwrite=overwrite)
    except ValueError as exc:  # a node that fails when the graph first runs: the line names the file too
        if str(source) in str(exc):
            raise
        if isinstance(exc, ConfigError):  # its fields still named by the flags
            raise exc.prefixed(f"{source}: ") from exc
        raise ValueError(f"{source}: {exc}") from exc
    yield str(report).rstrip()
    if distill_steps:
        yield f"distilled {distill_steps} steps on the --calibrate inputs (MSE of the outputs; the errors above " \
              "were measured before distillation)"
    if plot is not None:
        from .cli import plot_curve

        plot_curve(report.curve, plot)
        yield f"wrote {plot}"
    yield (f"wrote {out}: {onnx_weight_bytes(out):,} bytes of weights ({onnx_weight_bytes(source):,} in {source})"
           + _int8_words(int8, int8_dense, ", ") + "; inputs and outputs as in the original")


def _int8_words(int8: bool, int8_dense: bool, lead: str = "") -> str:
    """What a file holds as int8, in words ("" for a float file)."""
    if int8_dense:
        return lead + "every MatMul weight as int8 (the MPO factors and the dense layers)"
    return lead + "the MPO factors as int8 (dense layers float32)" if int8 else ""


def _dims(value) -> str:
    return "[" + ", ".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?")
                           for d in value.type.tensor_type.shape.dim) + "]"


def _errors(record: dict) -> dict[tuple[str, str], tuple]:
    """{(layer, weight): (weight error, output error, layout)} from a stored compression report."""
    report = record.get("report") or {"modules": []}
    return {(m["name"], w): (r.get("rel_error"), r.get("output_error"), r.get("layout", "-"))
            for m in report["modules"] for w, r in m["weights"].items()}


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _uncompressed(path: Path, head: str) -> str:
    """What ``inspect`` says of an ONNX file mpolstm did not write: the layers it could compress."""
    from ..onnx import load

    model = load(path)
    rows = [("layer", "node", "torch layer", "weights")]
    for name, step in model.layers.items():
        layer = getattr(model, name)
        rows.append((name, step.name, type(layer).__name__,
                     f"{sum(p.numel() for n, p in layer.named_parameters() if 'weight' in n):,}"))
    lines = [head, "not written by mpolstm compress; the layers it can compress:" if len(rows) > 1 else
             "not written by mpolstm compress, and it has no layer to compress"]
    return "\n".join(lines + (_table(rows) if len(rows) > 1 else []))


def inspect_onnx(path: Path) -> str:
    """The text ``mpolstm inspect FILE.onnx`` prints: the file's inputs, outputs and weight bytes and,
    for a file ``mpolstm compress`` wrote, its MPO layers (factors, bonds, sizes, errors, entropy)."""
    from ..compression.report import measured_lines
    from ..export import onnx_weight_bytes
    from ..onnx.reader import opset_of, read_model
    from ..onnx.writer import METADATA_KEY

    model = read_model(path)
    graph = model.graph
    head = (f"{path}: ONNX, operator set {opset_of(model)}, {onnx_weight_bytes(path):,} bytes of weights; inputs "
            + ", ".join(f"{i.name} {_dims(i)}" for i in graph.input) + "; outputs "
            + ", ".join(f"{o.name} {_dims(o)}" for o in graph.output))
    meta = next((p.value for p in model.metadata_props if p.key == METADATA_KEY), None)
    if meta is None:
        return _uncompressed(path, head)
    try:
        record = json.loads(meta)
        layers, errors = record["layers"], _errors(record)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: its mpolstm metadata is damaged ({exc})") from None
    rows = [("node", "weight", "shape", "layout", "in factors", "out factors", "bonds", "params", "ratio",
             "weight error", "output error", "entropy per bond")]
    for r in layers:
        shape = (math.prod(r["out_factors"]), math.prod(r["in_factors"]))
        weight_err, output_err, layout = errors.get((r["layer"], r["weight"]), (None, None, "-"))
        rows.append((r["node"], r["weight"], f"{shape[0]}x{shape[1]}", layout, str(tuple(r["in_factors"])),
                     str(tuple(r["out_factors"])), str(tuple(r["bonds"])),
                     f"{r['params']:,}" + (f" +{r['sparse']:,} sparse" if r["sparse"] else ""),
                     f"{shape[0] * shape[1] / (r['params'] + r['sparse']):.1f}x", _fmt(weight_err), _fmt(output_err),
                     " ".join(f"{e:.2f}" for e in r["entropy"])))
    maker = "mpolstm compress" if "report" in record else "mpolstm.onnx.save"
    facts = [f"written by {maker}" + (f" from {record['source']}" if record.get("source") else ""),
             "streaming step (one frame, states in and out)" if record.get("step") else "whole sequences",
             _int8_words(record.get("int8"), record.get("int8_dense")) or "float32 weights"]
    if record.get("distill_steps"):
        facts.append(f"distilled {record['distill_steps']} steps after the errors below were measured")

    lines = [head, "; ".join(facts)] + (_table(rows) if layers else ["no MPO layer (every layer dense)"])
    lines += measured_lines(record.get("report") or {})
    return "\n".join(lines)
