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
- ``export_dense(model, spec, path) -> Path``: the :func:`densify`'d model saved with
  :func:`mpolstm.tasks.save_model` (a folder that ``tasks.load_model`` reads back with no MPO
  module inside). ``densify(model)`` alone gives the dense nn.Module.
- ``export_model(model, spec, fmt, path)``: the dispatcher, with :func:`example_inputs` built
  from the architecture spec for the traced formats.

Traced exports (TorchScript, ONNX) record one run on the example inputs: what they serve is the
eval-mode forward from a zero initial state (``WordLM`` does not carry its state across calls), and
input checks that read tensor values (MPOEmbedding's index range) are not in the graph.
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
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from . import nn as mpo_nn
from .audio import N_BINS
from .compress import is_mpo_module
from .data.cache import atomic_write_bytes
from .tasks import ARCHITECTURE_FILE, build_architecture, save_model
from .tasks.ptb import WordLM

__all__ = ["FORMATS", "densify", "example_inputs", "export_dense", "export_model", "export_onnx",
           "export_torchscript"]

FORMATS = ("torchscript", "onnx", "dense")

_TO_DENSE = (
    (mpo_nn.MPOLinear, "to_linear"),
    (mpo_nn.MPOEmbedding, "to_embedding"),
    (mpo_nn.MPOLSTM, "to_lstm"),
    (mpo_nn.MPOGRU, "to_gru"),
)
# expected noise from tracing and the TorchScript ONNX exporter, silenced while exporting
_QUIET = ("`torch.jit.trace", "You are using the legacy TorchScript-based ONNX export",
          "Exporting a model to ONNX with a batch_size other than 1")


# ----------------------------------------------------------------------------- dense


def _dense_module(module: nn.Module) -> nn.Module | None:
    """The plain torch counterpart of an MPO module, None for any other module."""
    for cls, method in _TO_DENSE:
        if isinstance(module, cls):
            dense = getattr(module, method)()
            dense.train(module.training)
            return dense
    if is_mpo_module(module):
        raise ValueError(f"{type(module).__name__} is an MPO module with no known dense counterpart "
                         f"(densify handles {', '.join(cls.__name__ for cls, _ in _TO_DENSE)})")
    return None


def densify(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every MPO module replaced by its rebuilt torch module
    (nn.Linear / nn.Embedding / nn.LSTM / nn.GRU); ``model`` itself is left unchanged."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"densify expects an nn.Module, got {type(model).__name__}")
    root = _dense_module(model)
    if root is not None:
        return root
    out = copy.deepcopy(model)
    for name, module in list(out.named_modules()):
        dense = _dense_module(module) if name else None
        if dense is not None:
            parent, _, attr = name.rpartition(".")
            setattr(out.get_submodule(parent), attr, dense)
    return out


def _check_folder_target(path: Path) -> None:
    if not path.parent.is_dir():
        raise ValueError(f"{path}: the parent directory {path.parent} does not exist")
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory; the dense export writes a model folder")


def export_dense(model: nn.Module, spec: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``densify(model)`` with its architecture ``spec`` ({"name", "kwargs"}) to the folder
    ``path`` (created, or its files replaced); ``tasks.load_model(path)`` loads it back."""
    path = Path(path)
    _check_folder_target(path)
    dense = densify(model)
    with torch.device("meta"):
        reference = build_architecture(spec)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in dense.state_dict().items()}
    if expected != got:
        diff = sorted(set(expected.items()) ^ set(got.items()))
        raise ValueError(f"the dense model does not match its architecture {dict(spec)}: "
                         f"parameters differ in {diff[:6]}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        save_model(dense, spec, tmp)
        if path.is_dir():
            for name in (ARCHITECTURE_FILE, *sorted(p.name for p in tmp.iterdir() if p.name != ARCHITECTURE_FILE)):
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
    """Drop what a forward leaves behind: MPO RNN eval caches, a WordLM's carried state."""
    for module in model.modules():
        if isinstance(module, (mpo_nn.MPOLSTM, mpo_nn.MPOGRU)):
            module.clear_cache()
        if isinstance(module, WordLM):
            module._state = None
    return model


def _export_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy whose MPO layers rebuild their weights inside the traced graph: the eval
    cache (which would bake the dense weights in as constants) is off while the cores require
    grad and grad mode is on; a WordLM's carried state is dropped."""
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


def example_inputs(spec: Mapping[str, Any], batch: int = 2, steps: int = 5) -> tuple[Tensor, ...]:
    """Example inputs for a task architecture spec: seqcls (N, T, F) features or (N, T) token ids,
    ptb (T, N) token ids, speech (N, T, 257) log-magnitudes."""
    name = spec.get("name") if isinstance(spec, Mapping) else None
    kwargs = spec.get("kwargs", {}) if isinstance(spec, Mapping) else {}
    gen = torch.Generator().manual_seed(0)
    if name == "seqcls":
        vocab = kwargs.get("vocab_size")
        if vocab:
            return (torch.randint(1, int(vocab), (batch, steps), generator=gen),)
        return (torch.randn(batch, steps, int(kwargs["input_size"]), generator=gen),)
    if name == "ptb":
        return (torch.randint(0, int(kwargs["vocab_size"]), (steps, batch), generator=gen),)
    if name == "speech":
        return (torch.randn(batch, steps, N_BINS, generator=gen),)
    raise ValueError(f"no example inputs for architecture {name!r}; expected seqcls, ptb or speech")


def export_model(model: nn.Module, spec: Mapping[str, Any], fmt: str, path: str | os.PathLike) -> Path:
    """Export a task model with architecture ``spec`` in format ``fmt`` (one of :data:`FORMATS`)
    to ``path`` (a file for torchscript/onnx, a folder for dense); returns ``path``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt == "dense":
        return export_dense(model, spec, path)
    exporter = export_torchscript if fmt == "torchscript" else export_onnx
    first = next(model.parameters(), None)
    dtype = torch.float32 if first is None else first.dtype
    inputs = tuple(x.to(dtype) if x.is_floating_point() else x for x in example_inputs(spec))
    return exporter(model, inputs, path)
