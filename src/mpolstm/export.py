"""Export a (compressed or dense) model for serving: TorchScript, ONNX, or a plain dense torch model.

One function per format (``mpolstm export MODEL --format ... --out PATH`` calls :func:`export_model`):

- ``export_torchscript(model, example_inputs, path, runtime="factorized") -> Path``: one TorchScript
  file (``torch.jit.load``), the model traced in eval mode. Outputs are checked against eager mode on
  the example inputs.
- ``export_onnx(model, example_inputs, path, opset=17, runtime="factorized") -> Path``: one ONNX file
  (TorchScript-based exporter). Every axis of an integer input and every axis but the last of
  a float input is dynamic (batch, time); likewise every axis but the last of each output. Inputs
  are named ``input0, input1, ...`` and the flattened outputs ``output0, output1, ...`` (for the
  speech MaskEstimator: mask, h_n, c_n). Needs the ``onnx`` package.
- ``export_dense(model, path) -> Path``: the :func:`densify`'d model written by :func:`mpolstm.io.save`
  (a folder with no MPO module inside). ``densify(model)`` alone gives the dense nn.Module.
- ``export_step(model, path, fmt="onnx", frame=None) -> Path``: the streaming step of a model with
  ``step(frame, state) -> (output, state)`` (MPOLSTM / MPOGRU / MPORNN, or a model built on them):
  inputs ``frame`` and ``state0, state1, ...``, outputs ``output`` and ``new_state0, ...``; what a
  real-time application calls per frame. Always the factorized runtime.
- ``export_model(model, fmt, path, example_inputs=None, runtime="factorized")``: the dispatcher;
  the traced formats need the example inputs from the caller (the task commands build them).

Runtimes of the traced formats (``RUNTIMES``):

- ``"factorized"`` (the default): every MPO product runs through the cores, or through the chain
  merged into two halves once at export (graph constants): no dense weight of an MPO layer is ever
  formed, so the run-time weight memory is that of the factors, and a recurrent layer computes the
  input products of all time steps in one batched product, then loops over time (an ONNX ``Loop``,
  dynamic length) with the factorized W_hh. Convolutions keep their (small) rebuilt kernel, and
  recurrent layers with ``proj_size`` or PackedSequence input need ``"dense"``.
- ``"dense"``: the graph holds the cores and rebuilds every dense weight from them on each call,
  then runs torch's fused kernels (ONNX's LSTM/GRU/RNN ops): the smallest file (the cores alone),
  dense weight memory and dense speed at run time. Better for long sequences at large batch with
  mild compression, where the fused dense kernel beats a loop of small products
  (docs/benchmarks.md).

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
from .nn.base import set_factorized
from .nn.registry import is_mpo_module, layer_type_of_mpo, replace_module

__all__ = ["FORMATS", "RUNTIMES", "densify", "export_dense", "export_model", "export_onnx", "export_step",
           "export_torchscript", "onnx_weight_bytes"]

FORMATS = ("torchscript", "onnx", "dense")
RUNTIMES = ("factorized", "dense")

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
    """Drop what a forward leaves behind: every module's ``clear_cache()`` runs (state a model
    carries across calls; the MPO modules' eval caches, except in the factorized runtime, where the
    cached merged halves are what the graph should hold as constants)."""
    for module in model.modules():
        clear = getattr(module, "clear_cache", None)
        if callable(clear) and not getattr(module, "factorized", False):
            clear()
    return model


def _warm(model: nn.Module, inputs: tuple[Tensor, ...]) -> nn.Module:
    """Fill the factorized runtime's caches outside the trace (built inside, their construction would
    be recorded and rerun on every call), then drop carried state."""
    if any(getattr(m, "factorized", False) for m in model.modules()):
        with _quiet(), torch.no_grad():
            model(*inputs)
    return _fresh(model)


def _export_copy(model: nn.Module, runtime: str) -> nn.Module:
    """An eval-mode copy prepared for tracing (carried state dropped, ``_fresh``). "dense": the eval
    cache (which would bake the dense weights in as constants) is off, because the cores require grad
    and the trace records grad, so the graph rebuilds the weights. "factorized": the MPO modules
    run factorized and the trace runs without grad, so each chain's merged halves are built once
    and become constants of the graph."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"export expects an nn.Module, got {type(model).__name__}")
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")
    out = _fresh(copy.deepcopy(model).eval())
    set_factorized(out, runtime == "factorized")
    for p in out.parameters():
        if p.is_floating_point():
            p.requires_grad_(runtime == "dense")
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
    """Trace the prepared copy (see _export_copy) and check it reproduces eager mode on ``inputs``."""
    record = torch.enable_grad() if any(p.requires_grad for p in model.parameters()) else torch.no_grad()
    try:
        with _quiet(), record:
            traced = torch.jit.trace(_warm(model, inputs), inputs, check_trace=False)
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


def _write_torchscript(work: nn.Module, inputs: tuple[Tensor, ...], path: Path) -> Path:
    buffer = io.BytesIO()
    torch.jit.save(_trace(work, inputs), buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def export_torchscript(model: nn.Module, example_inputs: Tensor | Sequence[Tensor],
                       path: str | os.PathLike, runtime: str = "factorized") -> Path:
    """Trace ``model`` (eval mode, ``runtime`` as in the module docstring) on ``example_inputs`` and
    write the TorchScript file ``path``; ``torch.jit.load(path)(*inputs)`` equals ``model.eval()(*inputs)``."""
    path = _check_file_target(path)
    return _write_torchscript(_export_copy(model, runtime), _as_tuple(example_inputs), path)


def _dynamic_axes(inputs: Sequence[Tensor], outputs: Sequence[Tensor], input_names: Sequence[str],
                  output_names: Sequence[str]) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    for kind, tensors, names in (("input", inputs, input_names), ("output", outputs, output_names)):
        for name, t in zip(names, tensors):
            fixed_last = t.is_floating_point() or kind == "output"
            dims = range(t.dim() - 1 if fixed_last else t.dim())
            if dims:
                axes[name] = {d: f"{name}_dim{d}" for d in dims}
    return axes


def _write_onnx(work: nn.Module, inputs: tuple[Tensor, ...], path: Path, opset: int,
                input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None) -> Path:
    _trace(work, inputs)  # a clear ValueError for untraceable models before the exporter runs
    with torch.no_grad():
        outputs = _flatten(_fresh(work)(*inputs))
    _warm(work, inputs)
    input_names = list(input_names or [f"input{i}" for i in range(len(inputs))])
    output_names = list(output_names or [f"output{i}" for i in range(len(outputs))])
    record = torch.enable_grad() if any(p.requires_grad for p in work.parameters()) else torch.no_grad()
    buffer = io.BytesIO()
    try:
        with _quiet(), record:
            torch.onnx.export(work, inputs, buffer, dynamo=False, opset_version=opset,
                              input_names=input_names, output_names=output_names,
                              dynamic_axes=_dynamic_axes(inputs, outputs, input_names, output_names))
    except Exception as exc:
        raise ValueError(f"cannot export {type(work).__name__} to ONNX (opset {opset}): "
                         f"{_first_line(exc)}") from exc
    atomic_write_bytes(path, _constants_as_initializers(buffer.getvalue()))
    return path


def _constants_as_initializers(model_bytes: bytes, min_size: int = 16) -> bytes:
    """The ONNX model with every top-level Constant tensor of at least ``min_size`` entries (the
    factorized runtime's merged halves) turned into an initializer: the same graph, but weights where
    tools look for them (``onnxruntime.quantization.quantize_dynamic`` quantizes initializers only)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(model_bytes)
    graph, kept = model.graph, []
    for node in graph.node:
        value = node.attribute[0] if node.op_type == "Constant" and len(node.attribute) == 1 else None
        if value is not None and value.type == onnx.AttributeProto.TENSOR and \
                numpy_helper.to_array(value.t).size >= min_size:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value.t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    return model.SerializeToString()


def export_onnx(model: nn.Module, example_inputs: Tensor | Sequence[Tensor], path: str | os.PathLike,
                opset: int = 17, runtime: str = "factorized") -> Path:
    """Export ``model`` (eval mode, ``runtime`` as in the module docstring) to the ONNX file ``path``
    with the TorchScript exporter at ``opset``; names and dynamic axes as in the module docstring."""
    path = _check_file_target(path)
    return _write_onnx(_export_copy(model, runtime), _as_tuple(example_inputs), path, opset)


def onnx_weight_bytes(path: str | os.PathLike) -> int:
    """Bytes of the initializers (the weights held at run time) of the ONNX file ``path``."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    return sum(numpy_helper.to_array(t).nbytes for t in graph.initializer) + _constant_bytes(graph)


def _constant_bytes(graph) -> int:
    """Bytes of the tensors held by Constant nodes, in ``graph`` and its subgraphs (a Loop's body)."""
    from onnx import numpy_helper

    total = 0
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == attr.TENSOR:
                total += numpy_helper.to_array(attr.t).nbytes
            elif attr.type == attr.GRAPH:
                total += sum(numpy_helper.to_array(t).nbytes for t in attr.g.initializer) + _constant_bytes(attr.g)
    return total


# ----------------------------------------------------------------------------- streaming step


class _Step(nn.Module):
    """``forward(frame, *state) -> (output, *new_state)``: a model's ``step`` with flat tensors."""

    def __init__(self, model: nn.Module, single_state: bool) -> None:
        super().__init__()
        self.model, self.single_state = model, single_state

    def forward(self, frame: Tensor, *state: Tensor):
        output, new = self.model.step(frame, state[0] if self.single_state else tuple(state))
        return (output, *_flatten(new, "new state"))


# frames the step export is checked on (random, never zeros: a zero frame hides wrong input products)
_CHECK_FRAMES = 4


def _random_step_inputs(work: nn.Module, frame: Tensor) -> tuple[Tensor, Any]:
    """A random frame shaped like ``frame`` (integer frames are kept) and the state after
    ``_CHECK_FRAMES`` random frames from zeros: the example the trace is made and checked on. A
    recurrent MPO layer's step over those frames must equal its ``forward`` on them as one sequence,
    else ValueError."""
    generator = torch.Generator().manual_seed(0)

    def draw() -> Tensor:
        if not frame.is_floating_point():
            return frame
        return torch.randn(frame.shape, generator=generator, dtype=torch.float64).to(frame)

    frames = [draw() for _ in range(_CHECK_FRAMES + 1)]
    state, outputs = None, []
    with torch.no_grad():
        for x in frames[:-1]:
            out, state = work.step(x, state)
            outputs.append(out)
        entry = layer_type_of_mpo(work)
        if entry is not None and entry.kind == "rnn":
            _check_step_equals_forward(work, frames[:-1], outputs)
    return frames[-1], state


def _check_step_equals_forward(rnn: nn.Module, frames: list[Tensor], outputs: list[Tensor]) -> None:
    """ValueError unless ``outputs`` (the step's, frame by frame) equal the dense runtime's forward
    (torch's fused kernel) on ``frames`` as one sequence."""
    axis = 1 if rnn.batch_first and frames[0].dim() == 2 else 0
    set_factorized(rnn, False)
    try:
        expected = rnn(torch.stack(frames, axis))[0]
    finally:
        set_factorized(rnn, True)
    got = torch.stack(outputs, axis)
    if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
        error = float((got - expected).abs().max())
        raise ValueError(f"{type(rnn).__name__}.step frame by frame differs from its forward on the same "
                         f"random frames by {error:.3g}; the step cannot be exported")


def export_step(model: nn.Module, path: str | os.PathLike, fmt: str = "onnx", frame: Tensor | None = None,
                opset: int = 17) -> Path:
    """Export the streaming step of ``model`` (it must have ``step(frame, state) -> (output, state)``,
    state a tensor or a tuple of tensors, None meaning zeros) in the factorized runtime to ``path``
    as "onnx" or "torchscript". ``frame`` is an example frame (N, features); default: zeros (1,
    input_size) for a recurrent MPO layer. The file's inputs are the frame and the state tensors, its
    outputs the output and the new state (names in the module docstring). The graph is traced and
    checked against eager on a random frame and the state after a few random frames (never zeros,
    which would hide a wrong input product); for a recurrent MPO layer the step over those frames
    must also equal its forward on them as one sequence."""
    if fmt not in ("onnx", "torchscript"):
        raise ValueError(f"unknown step export format {fmt!r}; expected onnx or torchscript")
    if not callable(getattr(model, "step", None)):
        raise ValueError(f"{type(model).__name__} has no step(frame, state) method to export")
    path = _check_file_target(path)
    work = _export_copy(model, "factorized")
    if frame is None:
        if not isinstance(getattr(work, "input_size", None), int):
            raise ValueError(f"give an example frame: {type(model).__name__} has no input_size to make one")
        frame = next(work.parameters()).new_zeros(1, work.input_size)
    frame, state = _random_step_inputs(work, frame)
    states = _flatten(state, "state")
    wrapper = _Step(work, isinstance(state, Tensor))
    inputs = (frame, *states)
    if fmt == "torchscript":
        return _write_torchscript(wrapper, inputs, path)
    names = [f"state{i}" for i in range(len(states))]
    return _write_onnx(wrapper, inputs, path, opset, ["frame", *names], ["output", *[f"new_{n}" for n in names]])


# ----------------------------------------------------------------------------- dispatch


def export_model(model: nn.Module, fmt: str, path: str | os.PathLike,
                 example_inputs: Tensor | Sequence[Tensor] | None = None, runtime: str = "factorized") -> Path:
    """Export ``model`` in format ``fmt`` (one of :data:`FORMATS`) to ``path`` (a file for
    torchscript/onnx, a folder for dense); the traced formats need ``example_inputs``
    (floating ones are cast to the model's dtype) and take ``runtime`` (:data:`RUNTIMES`). Returns ``path``."""
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
    return exporter(model, inputs, path, runtime=runtime)
