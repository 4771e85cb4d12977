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
activations quantized per call). Every file is checked in its runtime at every shape it accepts
(:mod:`~.verify`) before it is written (atomically). ExecuTorch fixes every axis at the example's
size (its runtime refuses others); AOTInductor makes batch and time dynamic where ``torch.export``
can, and checks the fixed axes only when ``AOTI_RUNTIME_CHECK_INPUTS=1`` is set at run time.

ExecuTorch needs the ``executorch`` package (``pip install 'mpolstm[pt2]'``); AOTInductor needs only
torch and a C++ compiler at export time (it compiles the program: seconds to minutes).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from torch.export import Dim
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from .trace import ExportJob, first_line, flatten, quiet
from .verify import FLOAT_RTOL, INT8_RTOL, Axes, Runner, _resized, write_verified

__all__ = ["lower_executorch", "outside_delegate", "write_aoti", "write_executorch"]

_AOTI_CHECKS = "AOTI_RUNTIME_CHECK_INPUTS"


def _program(module: nn.Module, inputs: tuple, dims: list | None = None) -> torch.export.ExportedProgram:
    """``torch.export`` of ``module`` on ``inputs`` without grad (``dims``: its ``dynamic_shapes``)."""
    try:
        with quiet(), torch.no_grad():
            program = torch.export.export(module, inputs, dynamic_shapes=dims)
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
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
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


def _build_executorch(job: ExportJob, axes: Axes) -> tuple[bytes, Axes]:
    """The ExecuTorch program of ``job``: every axis fixed (its runtime refuses other sizes)."""
    return lower_executorch(job.module, job.inputs, job.int8)[0], axes.fixing(list(axes.groups))


def _executorch_runner(data: bytes, job: ExportJob) -> Runner:
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(data)  # kept alive while its method runs
    method = program.load_method("forward")
    return lambda inputs: list(method.execute(list(inputs))) if program else []


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
    checked in ExecuTorch's runtime against eager mode (it refuses other input sizes); silently (:func:`_silenced`)."""
    with _silenced():
        return write_verified(job, path, _build_executorch, _executorch_runner, "ExecuTorch",
                              INT8_RTOL if job.int8 else FLOAT_RTOL)


write_executorch.supports_int8 = True  # type: ignore[attr-defined]  # (mypy#2087) int8 factors: pt2e dynamic quantization (job.int8)


def _distinct_sizes(inputs: tuple, axes: Axes) -> dict:
    """A size for each group's axes, unlike any other axis of ``inputs`` and above 1: torch.export
    fixes size-1 axes and takes axes of equal sizes for one (a batch of 2 beside 2 layers)."""
    used = {n for x in inputs for n in x.shape}
    free = (n for n in range(2, 1 << 16) if n not in used)
    return {a: size for size, members in zip(free, axes.groups.values()) for a in members}


def _as_signature(module: nn.Module, dims: list) -> list:
    """``dims`` (one per input) shaped as ``module.forward``'s parameters: a ``*inputs`` takes a tuple."""
    params = list(inspect.signature(module.forward).parameters.values())
    star = next((k for k, p in enumerate(params) if p.kind == p.VAR_POSITIONAL), None)
    return dims if star is None else [*dims[:star], tuple(dims[star:])]


def _compile_aoti(program) -> bytes:
    """The AOTInductor package of the exported ``program``, as bytes."""
    with tempfile.TemporaryDirectory() as tmp, quiet():
        # no lower bound: a dynamic axis exported at 2 also runs at 1 (and checked there)
        configs = {"freezing": True, "aot_inductor.check_lowerbound": False}
        package = torch._inductor.aoti_compile_and_package(program, package_path=str(Path(tmp) / "package.pt2"),
                                                           inductor_configs=configs)
        return Path(package).read_bytes()


def _build_aoti(job: ExportJob, axes: Axes) -> tuple[bytes, Axes]:
    """The AOTInductor package of ``job``: the groups of ``axes`` that ``torch.export`` keeps
    symbolic are dynamic (exported at :func:`_distinct_sizes`). Where Inductor cannot compile the
    symbolic program (torch 2.13 fails on a recurrent scan with a symbolic batch: ``KeyError: s77``),
    every axis is fixed at the example's size instead."""
    dims = _as_signature(job.module, [{d: Dim.AUTO for d in axes.of_input(i)} or None
                                      for i in range(len(job.inputs))])
    inputs = _resized(job.inputs, _distinct_sizes(job.inputs, axes))
    program = _program(job.module, inputs, dims)
    shapes = [n.meta["val"].shape for n in program.graph.nodes if n.op == "placeholder"][-len(job.inputs):]
    fixed = [lead for lead, members in axes.groups.items()
             if any(is_concrete_int(shapes[i][d]) for i, d in members)]
    try:
        _refuse_fixed(job, axes.fixing(fixed))
        return _compile_aoti(program), axes.fixing(fixed)
    except torch._inductor.exc.InductorError:
        if len(fixed) == len(axes.groups):
            raise
    _refuse_fixed(job, axes.fixing(list(axes.groups)))
    static = _program(job.module, job.inputs, _as_signature(job.module, [None] * len(job.inputs)))
    return _compile_aoti(static), axes.fixing(list(axes.groups))


def _refuse_fixed(job: ExportJob, axes: Axes) -> None:
    """ValueError when the package would fix an axis eager mode varies: AOTInductor checks input sizes
    only where ``AOTI_RUNTIME_CHECK_INPUTS=1`` is set, so a call at another size would run silently wrong."""
    if axes.free:
        i, d = axes.free[0]
        raise ValueError(f"the AOTInductor package of {type(job.module).__name__} would fix axis {d} of input {i} "
                         f"at {job.inputs[i].shape[d]} (eager mode runs other sizes), and AOTInductor checks input "
                         "sizes only where AOTI_RUNTIME_CHECK_INPUTS=1 is set: export to onnx or executorch, which "
                         "refuse other sizes, or export a step (export_step), whose batch stays dynamic")


def _aoti_runner(data: bytes, job: ExportJob) -> Runner:
    """The package ``data`` loaded, its input checks on (AOTInductor runs them only when
    ``AOTI_RUNTIME_CHECK_INPUTS=1`` is set when the package first runs)."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "package.pt2").write_bytes(data)
        model = torch._inductor.aoti_load_package(str(Path(tmp) / "package.pt2"))

    def run(inputs: tuple) -> list:
        before = os.environ.get(_AOTI_CHECKS)
        os.environ[_AOTI_CHECKS] = "1"
        try:
            with torch.no_grad():
                return flatten(model(*inputs))
        finally:
            if before is None:
                os.environ.pop(_AOTI_CHECKS, None)
            else:
                os.environ[_AOTI_CHECKS] = before
    return run


def write_aoti(job: ExportJob, path: Path) -> Path:
    """Write ``job`` as the AOTInductor package ``path`` (compiled C++ for this machine's CPU; batch and
    time dynamic where the model allows), checked against eager mode after loading it back."""
    return write_verified(job, path, _build_aoti, _aoti_runner, "AOTInductor")
