"""What every traced format shares: the export copy of a model, the one checked trace, the job a
format writer receives.

:func:`export_copy` prepares an eval-mode deep copy in a runtime (``RUNTIMES``); :func:`trace`
records it once with ``torch.jit.trace`` on the example inputs and checks the trace against eager
mode, so untraceable models (value-dependent control flow) fail with a clear ValueError before any
writer runs. A writer gets an :class:`ExportJob` and turns its trace into a file.
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..atomic import check_target
from ..nn.base import MPOWeights, set_factorized
from ..quantization import quantize

__all__ = ["RUNTIMES", "ExportJob", "Traced", "Writer", "as_tuple", "check_file_target", "export_copy",
           "export_with", "first_line", "flatten", "has_int8_cores", "int8_factors", "int8_model", "quiet", "trace"]

RUNTIMES = ("factorized", "dense")

# expected noise from tracing and the TorchScript ONNX exporter, silenced while exporting
_QUIET = ("`torch.jit.trace", "You are using the legacy TorchScript-based ONNX export",
          "Exporting a model to ONNX with a batch_size other than 1", "no signature found for <torch.ScriptMethod")


@dataclass
class ExportJob:
    """What a format writer receives: ``module`` (an :func:`export_copy`), the example ``inputs``, the
    graph's input and output names (None: ``input0, ...`` / ``output0, ...``), the ONNX ``opset`` and
    ``int8`` (:func:`int8_factors`: only writers with ``supports_int8`` accept it: ONNX, ExecuTorch)."""

    module: nn.Module
    inputs: tuple[Tensor, ...]
    input_names: Sequence[str] | None = None
    output_names: Sequence[str] | None = None
    opset: int = 17
    int8: bool = False  # store and multiply the MPO factors in int8 (int8_factors; onnx: export.int8, executorch: pt2e)

    def names(self, outputs: Sequence[Tensor]) -> tuple[list[str], list[str]]:
        """The input and output names, defaulted for ``outputs`` (the flattened outputs)."""
        return (list(self.input_names or [f"input{i}" for i in range(len(self.inputs))]),
                list(self.output_names or [f"output{i}" for i in range(len(outputs))]))


@dataclass
class Traced:
    """The checked trace of a job's module: the TorchScript module, its flattened eager outputs on the
    example inputs, and whether it was recorded with grad (the "dense" runtime rebuilds in the graph)."""

    module: torch.jit.ScriptModule
    outputs: list[Tensor]
    with_grad: bool


Writer = Callable[[ExportJob, Path], Path]  # a traced format: writes the job's file at the path, returns it


def check_file_target(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """``path`` as a Path, after the output rule (``mpolstm.atomic.check_target``): an existing file is
    refused unless ``overwrite``, a folder always; missing parents are created when it is written."""
    path = Path(path)
    check_target(path, overwrite, folder=False)
    return path


def as_tuple(example_inputs: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    if not inputs or not all(isinstance(x, Tensor) for x in inputs):
        raise ValueError("example_inputs must be a tensor or a non-empty sequence of tensors, got "
                         f"{[type(x).__name__ for x in inputs]}")
    return inputs


def flatten(value: Any, where: str = "output") -> list[Tensor]:
    """The tensors of a (nested tuple/list of) model output, in order."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for i, v in enumerate(value) for t in flatten(v, f"{where}[{i}]")]
    raise ValueError(f"{where} is a {type(value).__name__}; exported models must return tensors "
                     "or (nested) tuples of tensors")


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the expected warnings of tracing and of the TorchScript ONNX exporter."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        for message in _QUIET:
            warnings.filterwarnings("ignore", message=f".*{message}")
        yield


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
        with quiet(), torch.no_grad():
            model(*inputs)
    return _fresh(model)


def export_copy(model: nn.Module, runtime: str) -> nn.Module:
    """An eval-mode copy prepared for tracing (carried state dropped). "dense": the eval cache (which
    would bake the dense weights in as constants) is off, because the cores require grad and the
    trace records grad, so the graph rebuilds the weights. "factorized": the MPO modules run
    factorized and the trace runs without grad, so each chain's merged halves (and a sparse part,
    dense) are built once and become constants of the graph."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"export expects an nn.Module, got {type(model).__name__}")
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")
    out = _fresh(copy.deepcopy(model).eval())
    set_factorized(out, runtime == "factorized")
    for module in out.modules():
        if isinstance(module, MPOWeights):  # the graph holds sparse parts dense (nn/sparse.py says why)
            module.sparse_csr = False
    for p in out.parameters():
        if p.is_floating_point():
            p.requires_grad_(runtime == "dense")
    return out


def _describe(inputs: Sequence[Tensor]) -> str:
    return ", ".join(f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}" for x in inputs)


def trace(job: ExportJob) -> Traced:
    """Trace ``job.module`` once on ``job.inputs`` and check the trace reproduces eager mode there."""
    model, inputs = job.module, job.inputs
    with_grad = any(p.requires_grad for p in model.parameters())
    try:
        with quiet(), (torch.enable_grad() if with_grad else torch.no_grad()):
            traced = torch.jit.trace(_warm(model, inputs), inputs, check_trace=False)
        with quiet(), torch.no_grad():
            expected = flatten(_fresh(model)(*inputs))
            got = flatten(traced(*inputs))
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(f"cannot trace {type(model).__name__} on example inputs {_describe(inputs)}: "
                         f"{first_line(exc)}") from exc
    for i, (e, g) in enumerate(zip(expected, got, strict=True)):
        if e.shape != g.shape or not torch.allclose(e, g, rtol=1e-4, atol=1e-5):
            raise ValueError(f"the traced {type(model).__name__} does not reproduce eager output {i} on "
                             "the example inputs (value-dependent control flow cannot be traced)")
    for p in traced.parameters():
        p.requires_grad_(False)
    return Traced(traced, expected, with_grad)


def has_int8_cores(model: nn.Module) -> bool:
    """Whether any MPO module of ``model`` holds int8 cores (:func:`mpolstm.quantize`)."""
    return any(isinstance(m, MPOWeights) and m.int8 for m in model.modules())


def int8_model(model: nn.Module, int8: bool | None) -> nn.Module:
    """What ``int8`` means for ``model``: itself, or with ``int8=True`` and no int8 cores yet a quantized
    copy (:func:`mpolstm.quantize`: its MPO cores, and a hybrid's sparse values, on their int8 grid).
    ValueError, naming what works, for a model without an MPO module."""
    if int8 is not True or has_int8_cores(model):
        return model
    if not any(isinstance(m, MPOWeights) for m in model.modules()):
        raise ValueError(f"int8=True stores the MPO factors in int8, but {type(model).__name__} has no MPO module: "
                         "compress it first (mpolstm.compress), or pass int8=False for float32 weights")
    return quantize(copy.deepcopy(model))


def int8_factors(model: nn.Module, int8: bool | None, runtime: str, write: Callable) -> bool:
    """Whether the file stores the MPO factors in int8: ``int8`` when given, else whether ``model`` has
    int8 cores (an int8 model exports as int8). ValueError when the format cannot (a writer without
    ``supports_int8``: TorchScript holds float32) or the runtime is "dense" (the graph rebuilds float
    weights): the message says how to export instead."""
    if not (has_int8_cores(model) if int8 is None else int8):
        return False
    name = getattr(write, "__name__", "this").removeprefix("write_")
    what = f"{type(model).__name__} has int8 cores (mpolstm.quantize), but" if int8 is None else "int8=True, but"
    if not getattr(write, "supports_int8", False):
        raise ValueError(f"{what} the {name} format holds float32 factors (4x the bytes): export to onnx or "
                         "executorch, which store and multiply the factors in int8, or pass int8=False for float32 "
                         "factors")
    if runtime != "factorized":
        raise ValueError(f"{what} the {runtime!r} runtime rebuilds float32 weights: use the factorized runtime "
                         "(the default) for int8 factors, or pass int8=False")
    return True


def export_with(write: Writer, model: nn.Module, example_inputs: Tensor | Sequence[Tensor], path: str | os.PathLike,
                runtime: str = "factorized", opset: int = 17, overwrite: bool = False,
                int8: bool | None = None) -> Path:
    """Export ``model`` on ``example_inputs`` in ``runtime`` to the file ``path`` with the format writer
    ``write`` (default input and output names); an existing ``path`` is refused unless ``overwrite``;
    ``int8`` as :func:`int8_factors`."""
    path = check_file_target(path, overwrite)
    quantized = int8_factors(model, int8, runtime, write)
    job = ExportJob(export_copy(int8_model(model, int8), runtime), as_tuple(example_inputs), opset=opset,
                    int8=quantized)
    return write(job, path)
