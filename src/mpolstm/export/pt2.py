"""The PyTorch 2 formats, from ``torch.export``: ExecuTorch (a ``.pte`` program with the XNNPACK
delegate, optionally with every factor quantized to int8) and AOTInductor (a ``.pt2`` package,
``torch._inductor.aoti_load_package``).

The job's module (an export copy: eval mode, the factorized runtime) is exported without grad: the
MPO layers build their merged halves from the cores inside the graph, and the parameter-only part
of the graph is then folded into constants, so the file holds the merged halves (never a dense
weight) and the program only multiplies by them. Left unfolded, ExecuTorch ran every product outside
the XNNPACK delegate on its portable kernels (XNNPACK takes a linear layer's weight only as a
constant), about 100x slower than eager (docs/benchmarks.md). A rank-D factor runs as two linear
ops, which XNNPACK delegates and pt2e quantizes. ``int8=True``: torchao's pt2e flow with
ExecuTorch's ``XNNPACKQuantizer`` (dynamic, symmetric, per-channel int8 weights; int8 matmuls on
activations quantized per call). The program's outputs are checked against eager mode on the example
inputs (relative 1e-4; 0.05 with int8 weights) before the file is written (atomically).

ExecuTorch needs the ``executorch`` package (``pip install 'mpolstm[pt2]'``); AOTInductor needs only
torch and a C++ compiler at export time (it compiles the program: seconds to minutes).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..atomic import atomic_write_bytes, make_temp_dir
from .trace import ExportJob, first_line, flatten, quiet

__all__ = ["lower_executorch", "outside_delegate", "write_aoti", "write_executorch"]


def _program(module: nn.Module, inputs: tuple) -> torch.export.ExportedProgram:
    """``torch.export`` of ``module`` on ``inputs`` without grad, the parameter-only subgraph folded."""
    try:
        with quiet(), torch.no_grad():
            program = torch.export.export(module, inputs)
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(f"cannot export {type(module).__name__} with torch.export: {first_line(exc)}") from exc
    return program


def _fold_constants(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """The program with every op on constants only replaced by its result, but the (de)quantize ops:
    an int8 weight must reach XNNPACK as int8."""
    from executorch.exir.passes.constant_prop_pass import constant_prop_pass

    quant_ops = {n.target for n in program.graph.nodes if "quantized_decomposed" in str(n.target)}
    return constant_prop_pass(program, custom_skip_targets=quant_ops)


def _quantized(module: nn.Module, inputs: tuple) -> nn.Module:
    """The pt2e-quantized module: every linear's weight int8 per channel, activations dynamic."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                          get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True))
    with quiet(), torch.no_grad():
        prepared = prepare_pt2e(_program(module, inputs).module(), quantizer)
        prepared(*inputs)
        return convert_pt2e(prepared)


def outside_delegate(edge: Any) -> dict[str, int]:
    """{op name: count} of the operators of a lowered ExecuTorch program that the delegate did not
    take (they run on ExecuTorch's portable kernels)."""
    ops: dict[str, int] = {}
    for node in edge.exported_program().graph.nodes:
        name = getattr(node.target, "__name__", str(node.target))
        if node.op == "call_function" and "delegate" not in name and name not in ("getitem", "alloc"):
            ops[name] = ops.get(name, 0) + 1
    return ops


def lower_executorch(module: nn.Module, inputs: tuple, int8: bool = False) -> tuple[bytes, dict[str, int]]:
    """The ExecuTorch program (.pte bytes) of ``module`` on ``inputs`` with the XNNPACK delegate, and
    the ops left outside it (:func:`outside_delegate`)."""
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
    except ImportError as exc:
        raise ValueError("the executorch format needs the executorch package: pip install 'mpolstm[pt2]'") from exc
    source = _quantized(module, inputs) if int8 else module
    with quiet():
        edge = to_edge_transform_and_lower(_fold_constants(_program(source, inputs)),
                                           partitioner=[XnnpackPartitioner()])
        return edge.to_executorch().buffer, outside_delegate(edge)


def _check(outputs: list, expected: list, rtol: float, what: str) -> None:
    for i, (g, e) in enumerate(zip(outputs, expected, strict=True)):
        if tuple(g.shape) != tuple(e.shape) or float((g - e).norm()) > rtol * float(e.norm()) + 1e-6:
            raise ValueError(f"the {what} program does not reproduce eager output {i} on the example inputs")


@contextlib.contextmanager
def _silenced() -> Iterator[None]:
    """Nothing printed: ExecuTorch, torchao and ExecuTorch's C++ runtime write notes while they import,
    lower and load a program (torchao's kernels not built for this machine, deprecations, CPU probing:
    27 lines around one export), to Python's streams and to file descriptors 1 and 2. Errors still
    arrive as exceptions."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            yield
    finally:
        for fd, copy in ((1, saved[0]), (2, saved[1])):
            os.dup2(copy, fd)
            os.close(copy)


def write_executorch(job: ExportJob, path: Path) -> Path:
    """Write ``job`` as the ExecuTorch program ``path`` (XNNPACK; int8 factors with ``job.int8``),
    checked in ExecuTorch's runtime against eager mode; silently (:func:`_silenced`)."""
    with _silenced():
        from executorch.runtime import Runtime

        buffer, _ = lower_executorch(job.module, job.inputs, job.int8)
        with torch.no_grad():
            expected = flatten(job.module(*job.inputs))
        program = Runtime.get().load_program(buffer)  # kept alive while its method runs
        outputs = list(program.load_method("forward").execute(list(job.inputs)))
    _check(outputs, expected, 0.05 if job.int8 else 1e-4, "ExecuTorch")
    atomic_write_bytes(path, buffer)
    return path


write_executorch.supports_int8 = True  # int8 factors: pt2e dynamic quantization (job.int8)


def write_aoti(job: ExportJob, path: Path) -> Path:
    """Write ``job`` as the AOTInductor package ``path`` (compiled C++ for this machine's CPU),
    checked against eager mode after loading it back."""
    if job.int8:
        raise ValueError("int8=True is for the executorch format (AOTInductor compiles the float program)")
    program = _program(job.module, job.inputs)
    tmp = make_temp_dir(path)
    try:
        package = tmp / "package.pt2"
        with quiet():
            torch._inductor.aoti_compile_and_package(program, package_path=str(package),
                                                     inductor_configs={"freezing": True})
        with torch.no_grad():
            expected = flatten(job.module(*job.inputs))
            _check(flatten(torch._inductor.aoti_load_package(str(package))(*job.inputs)), expected, 1e-4,
                   "AOTInductor")
        atomic_write_bytes(path, package.read_bytes())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
