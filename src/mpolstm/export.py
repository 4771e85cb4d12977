"""Export a (compressed or dense) model for serving: TorchScript, ONNX, or a plain dense torch model.

One function per format (``mpolstm export MODEL --format ... --out PATH`` calls :func:`export_model`):

- ``export_torchscript(model, example_inputs, path) -> Path``: one TorchScript file (``torch.jit.load``).
  The MPO model itself is traced in eval mode, so the file holds the MPO cores and the graph rebuilds
  each dense weight from them on every call before torch's fused LSTM/GRU kernel runs: the file is
  as small as the compressed model. Outputs are checked against eager mode on the example inputs.
- ``export_onnx(model, example_inputs, path, opset=17) -> Path``: one ONNX file (TorchScript-based
  exporter), also holding the cores. Every axis of an integer input and every axis but the last of
  a float input is dynamic (batch, time); likewise every axis but the last of each output. Inputs
  are named ``input0, input1, ...`` and the flattened outputs ``output0, output1, ...`` (for the
  speech MaskEstimator: mask, h_n, c_n). Needs the ``onnx`` package.
- ``export_dense(model, path) -> Path``: the :func:`densify`'d model written by :func:`mpolstm.io.save`
  (a folder with no MPO module inside). ``densify(model)`` alone gives the dense nn.Module.
- ``export_model(model, fmt, path, example_inputs=None)``: the dispatcher; the traced formats
  need the example inputs from the caller (the task commands build them from the architecture).

Traced exports (TorchScript, ONNX) record one run on the example inputs: what they serve is the
eval-mode forward from a zero initial state (every module's ``clear_cache()`` runs first: MPO
RNNs drop their cached weights, a model that carries state across calls drops it), and input
checks that read tensor values (MPOEmbedding's index range) are not in the graph.
Every file or folder is written to a temporary name beside ``path`` and renamed into place, so a
failure leaves no partial output. Bad arguments (unknown format, missing parent directory, a model
that cannot be traced or exported) raise ValueError.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .atomic import atomic_write_bytes, make_temp_dir
from .io import save
from .nn.registry import is_mpo_module, layer_type_of_mpo, replace_module

__all__ = ["FORMATS", "densify", "export_dense", "export_model", "export_onnx", "export_torchscript"]

FORMATS = ("torchscript", "onnx", "dense")

# expected noise from tracing and the TorchScript ONNX exporter, silenced while exporting
_QUIET = ("`torch.jit.trace", "You are using the legacy TorchScript-based ONNX export",
          "Exporting a model to ONNX with a batch_size other than 1")


# ----------------------------------------------------------------------------- dense


def _dense_module(module: nn.Module) -> nn.Module | None:
    """The plain torch counterpart of an MPO module, None for any other module."""
    entry = layer_type_of_mpo(module)
    if entry is not None:
        dense = entry.to_torch(module)
        dense.train(module.training)
        return dense
    if is_mpo_module(module):
        raise ValueError(f"{type(module).__name__} is an MPO module that is not registered in "
                         "mpolstm.nn.registry, so it has no known dense counterpart")
    return None


def densify(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every MPO module replaced by its rebuilt torch module
    (the registered torch type: nn.Linear, nn.Embedding, nn.LSTM, nn.GRU, nn.RNN, the cells, nn.Conv1d /
    nn.Conv2d); ``model`` itself is left unchanged."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"densify expects an nn.Module, got {type(model).__name__}")
    root = _dense_module(model)
    if root is not None:
        return root
    out = copy.deepcopy(model)
    shared = []
    for name, module in list(out.named_modules()):
        if callable(getattr(module, "bind", None)):  # uses another layer's MPO: tied again below
            shared.append((name, module))
            continue
        dense = _dense_module(module) if name else None
        if dense is not None:
            replace_module(out, name, dense)
    for name, module in shared:
        replace_module(out, name, module.dense(out.get_submodule(module.owner_name).weight))
    return out


def _check_folder_target(path: Path) -> None:
    if not path.parent.is_dir():
        raise ValueError(f"{path}: the parent directory {path.parent} does not exist")
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory; the dense export writes a model folder")


def export_dense(model: nn.Module, path: str | os.PathLike, write: Callable[[nn.Module, Path], Any] = save) -> Path:
    """Write ``densify(model)`` to the folder ``path`` (created, or its files replaced) with
    ``write(dense_model, folder)`` (default :func:`mpolstm.io.save`). The folder is filled under
    a temporary name beside ``path`` and its files are then renamed into place."""
    path = Path(path)
    _check_folder_target(path)
    dense = densify(model)
    tmp = make_temp_dir(path)
    try:
        write(dense, tmp)
        if path.is_dir():
            for name in sorted(p.name for p in tmp.iterdir()):
                os.replace(tmp / name, path / name)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


# ----------------------------------------------------------------------------- traced formats


def _check_file_target(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"{path}: the parent directory {path.parent} does not exist")
    if path.is_dir():
        raise ValueError(f"{path} is a directory; this format writes a single file")
    return path


def _as_tuple(example_inputs: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    if not inputs or not all(isinstance(x, Tensor) for x in inputs):
        raise ValueError("example_inputs must be a tensor or a non-empty sequence of tensors, got "
                         f"{[type(x).__name__ for x in inputs]}")
    return inputs


def _flatten(value: Any, where: str = "output") -> list[Tensor]:
    """The tensors of a (nested tuple/list of) model output, in order."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for i, v in enumerate(value) for t in _flatten(v, f"{where}[{i}]")]
    raise ValueError(f"{where} is a {type(value).__name__}; exported models must return tensors "
                     "or (nested) tuples of tensors")


def _fresh(model: nn.Module) -> nn.Module:
    """Drop what a forward leaves behind: every module's ``clear_cache()`` runs (MPO RNN eval
    caches, state a model carries across calls)."""
    for module in model.modules():
        clear = getattr(module, "clear_cache", None)
        if callable(clear):
            clear()
    return model


def _export_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy whose MPO layers rebuild their weights inside the traced graph: the eval
    cache (which would bake the dense weights in as constants) is off while the cores require
    grad and grad mode is on; carried state is dropped (``_fresh``)."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"export expects an nn.Module, got {type(model).__name__}")
    out = _fresh(copy.deepcopy(model).eval())
    for p in out.parameters():
        if p.is_floating_point():
            p.requires_grad_(True)
    return out


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _describe(inputs: Sequence[Tensor]) -> str:
    return ", ".join(f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}" for x in inputs)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        for message in _QUIET:
            warnings.filterwarnings("ignore", message=f".*{message}")
        yield


def _trace(model: nn.Module, inputs: tuple[Tensor, ...]) -> torch.jit.ScriptModule:
    """Trace the MPO model (see _export_copy) and check it reproduces eager mode on ``inputs``."""
    try:
        with _quiet(), torch.enable_grad():
            traced = torch.jit.trace(_fresh(model), inputs, check_trace=False)
        with _quiet(), torch.no_grad():
            expected = _flatten(_fresh(model)(*inputs))
            got = _flatten(traced(*inputs))
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(f"cannot trace {type(model).__name__} on example inputs {_describe(inputs)}: "
                         f"{_first_line(exc)}") from exc
    for i, (e, g) in enumerate(zip(expected, got, strict=True)):
        if e.shape != g.shape or not torch.allclose(e, g, rtol=1e-4, atol=1e-5):
            raise ValueError(f"the traced {type(model).__name__} does not reproduce eager output {i} on "
                             "the example inputs (value-dependent control flow cannot be traced)")
    for p in traced.parameters():
        p.requires_grad_(False)
    return traced


def export_torchscript(model: nn.Module, example_inputs: Tensor | Sequence[Tensor],
                       path: str | os.PathLike) -> Path:
    """Trace ``model`` (eval mode, MPO cores kept) on ``example_inputs`` and write the TorchScript
    file ``path``; ``torch.jit.load(path)(*inputs)`` equals ``model.eval()(*inputs)``."""
    path = _check_file_target(path)
    inputs = _as_tuple(example_inputs)
    traced = _trace(_export_copy(model), inputs)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _dynamic_axes(inputs: Sequence[Tensor], outputs: Sequence[Tensor]) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    for kind, tensors in (("input", inputs), ("output", outputs)):
        for i, t in enumerate(tensors):
            fixed_last = t.is_floating_point() or kind == "output"
            dims = range(t.dim() - 1 if fixed_last else t.dim())
            if dims:
                axes[f"{kind}{i}"] = {d: f"{kind}{i}_dim{d}" for d in dims}
    return axes


def export_onnx(model: nn.Module, example_inputs: Tensor | Sequence[Tensor], path: str | os.PathLike,
                opset: int = 17) -> Path:
    """Export ``model`` (eval mode, MPO cores kept) to the ONNX file ``path`` with the TorchScript
    exporter at ``opset``; names and dynamic axes as in the module docstring."""
    path = _check_file_target(path)
    inputs = _as_tuple(example_inputs)
    work = _export_copy(model)
    _trace(work, inputs)  # a clear ValueError for untraceable models before the exporter runs
    with torch.no_grad():
        outputs = _flatten(_fresh(work)(*inputs))
    _fresh(work)
    input_names = [f"input{i}" for i in range(len(inputs))]
    output_names = [f"output{i}" for i in range(len(outputs))]
    buffer = io.BytesIO()
    try:
        with _quiet(), torch.enable_grad():
            torch.onnx.export(work, inputs, buffer, dynamo=False, opset_version=opset,
                              input_names=input_names, output_names=output_names,
                              dynamic_axes=_dynamic_axes(inputs, outputs))
    except Exception as exc:
        raise ValueError(f"cannot export {type(model).__name__} to ONNX (opset {opset}): "
                         f"{_first_line(exc)}") from exc
    atomic_write_bytes(path, buffer.getvalue())
    return path


# ----------------------------------------------------------------------------- dispatch


def export_model(model: nn.Module, fmt: str, path: str | os.PathLike,
                 example_inputs: Tensor | Sequence[Tensor] | None = None) -> Path:
    """Export ``model`` in format ``fmt`` (one of :data:`FORMATS`) to ``path`` (a file for
    torchscript/onnx, a folder for dense); the traced formats need ``example_inputs``
    (floating ones are cast to the model's dtype). Returns ``path``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt == "dense":
        return export_dense(model, path)
    if example_inputs is None:
        raise ValueError(f"the {fmt} export traces the model: pass example_inputs (a tensor or a tuple of tensors)")
    exporter = export_torchscript if fmt == "torchscript" else export_onnx
    first = next(model.parameters(), None)
    dtype = torch.float32 if first is None else first.dtype
    inputs = tuple(x.to(dtype) if x.is_floating_point() else x for x in _as_tuple(example_inputs))
    return exporter(model, inputs, path)
