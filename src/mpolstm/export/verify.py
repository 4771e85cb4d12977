"""Every traced file equals its model at every shape it declares: the axes a model accepts at any
size (probed in eager mode), the written file run in its own runtime on random inputs that vary
them, and the guard on every other axis. One function, :func:`write_verified`, serves every format.

The rule for dynamic axes: an axis of an input is dynamic when eager mode runs at another size of
it (alone, or together with axes of the same size in the other inputs: a batch shared by several
inputs is one group). Channels and features (a Conv1d input's C, a frame's features) fail in eager
mode and stay fixed; batch and time pass. A format then declares dynamic what it can: the file is
run at sizes 1, the example's and a longer one of each group; a group where the file differs from
eager mode (an unrolled Python loop over time, a traced ``squeeze``) is declared fixed and the file
written again. A fixed axis that eager mode could vary must refuse another size in the runtime
(ONNX: the declared input shape; ExecuTorch: its program; TorchScript: a guard in the graph;
AOTInductor: its input checks, which run when ``AOTI_RUNTIME_CHECK_INPUTS=1``). A file that still
differs anywhere is not written (ValueError).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from ..atomic import atomic_write_bytes
from .trace import ExportJob, _fresh, flatten, quiet

__all__ = ["FLOAT_RTOL", "INT8_RTOL", "Axes", "Runner", "check_shapes", "declared", "probe_axes", "write_verified"]

Axis = tuple[int, int]  # (input index, axis)
Runner = Callable[[tuple[Tensor, ...]], list[Tensor]]  # the written file, loaded in its runtime
_MAX_COMBINATIONS = 32  # groupings of same-sized axes tried per axis
FLOAT_RTOL, INT8_RTOL = 1e-4, 0.1  # relative error of a file's outputs: float32 factors, int8 factors


@dataclass
class Axes:
    """The dynamic axes of a file's inputs: ``groups`` {leader: its axes} (axes of one group share a
    size, e.g. the batch of every input), ``free``: fixed axes eager mode could vary (the file must
    refuse other sizes there), ``outputs``: per output, the axes that vary with the groups."""

    groups: dict[Axis, list[Axis]] = field(default_factory=dict)
    free: list[Axis] = field(default_factory=list)
    outputs: list[set[int]] = field(default_factory=list)

    def of_input(self, i: int) -> dict[int, Axis]:
        """{axis of input ``i``: its group's leader}."""
        return {d: lead for lead, members in self.groups.items() for j, d in members if j == i}

    def fixing(self, leaders) -> Axes:
        """These axes with the groups ``leaders`` fixed (their axes then must refuse other sizes)."""
        leaders = set(leaders)
        kept = {k: v for k, v in self.groups.items() if k not in leaders}
        moved = [a for k in leaders for a in self.groups.get(k, [])]
        return Axes(kept, self.free + moved, self.outputs if kept else [set() for _ in self.outputs])


def _draw(x: Tensor, shape: list[int], gen: torch.Generator) -> Tensor:
    """A random tensor of ``shape`` like ``x``: normal floats; integers drawn from ``x``'s own values
    (valid token ids stay valid); booleans as they are drawn."""
    if x.is_floating_point():
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(x.dtype)
    flat = x.reshape(-1)
    if flat.numel() == 0:
        return x.new_zeros(shape)
    return flat[torch.randint(flat.numel(), shape, generator=gen)]


def _resized(inputs: tuple[Tensor, ...], sizes: dict[Axis, int], seed: int = 0) -> tuple[Tensor, ...]:
    """Random inputs shaped as ``inputs`` but ``sizes`` {(input, axis): size}."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(_draw(x, [sizes.get((i, d), n) for d, n in enumerate(x.shape)], gen) for i, x in enumerate(inputs))


def _eager(module: nn.Module, inputs: tuple[Tensor, ...]) -> list[Tensor] | None:
    """The module's flattened outputs from a fresh state, None when eager mode refuses the inputs."""
    try:
        with quiet(), torch.no_grad():
            return flatten(_fresh(module)(*inputs))
    except Exception:
        return None


def _groupings(inputs: tuple[Tensor, ...], lead: Axis, taken: set[Axis]) -> list[list[Axis]]:
    """The axis ``lead`` alone, then with same-sized axes of the other inputs (one per input at most)."""
    size = inputs[lead[0]].shape[lead[1]]
    options = [[None] + [(j, d) for d, n in enumerate(x.shape) if n == size and (j, d) not in taken]
               for j, x in enumerate(inputs) if j != lead[0]]
    out = [[lead]]
    for combo in itertools.islice(itertools.product(*options), 1, _MAX_COMBINATIONS):
        out.append([lead, *[a for a in combo if a is not None]])
    return out


def probe_axes(module: nn.Module, inputs: tuple[Tensor, ...]) -> Axes:
    """Which axes of ``inputs`` eager mode runs ``module`` at another size of (module docstring)."""
    axes, taken = Axes(), set[Axis]()
    for lead in [(i, d) for i, x in enumerate(inputs) for d in range(x.dim())]:
        if lead in taken:
            continue
        for group in _groupings(inputs, lead, taken):
            size = inputs[lead[0]].shape[lead[1]] + 2
            if _eager(module, _resized(inputs, {a: size for a in group})) is not None:
                axes.groups[lead] = group
                taken.update(group)
                break
    base = _eager(module, inputs) or []
    grown = _eager(module, _resized(inputs, {a: x.shape[a[1]] + 2 for a, x in
                                             ((a, inputs[a[0]]) for g in axes.groups.values() for a in g)})) or base
    axes.outputs = [{d for d in range(b.dim()) if g.shape[d] != b.shape[d]} if g.dim() == b.dim() else set()
                    for b, g in zip(base, grown)]
    return axes


def _differs(got: list[Tensor], want: list[Tensor], rtol: float) -> str | None:
    """What differs between a file's outputs and eager mode's (None: equal within ``rtol``)."""
    if len(got) != len(want):
        return f"{len(got)} outputs instead of {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        g = torch.as_tensor(g)
        if tuple(g.shape) != tuple(w.shape):
            return f"output {i} is {tuple(g.shape)} instead of {tuple(w.shape)}"
        error = float((g.double() - w.double()).norm())
        if error > rtol * float(w.double().norm()) + 1e-5:
            return f"output {i} differs by {error / max(float(w.double().norm()), 1e-12):.3g} (relative)"
    return None


def _describe(inputs: tuple[Tensor, ...]) -> str:
    return ", ".join(str(tuple(x.shape)) for x in inputs)


def _grid(inputs: tuple[Tensor, ...], axes: Axes) -> list[tuple[Axis | None, dict[Axis, int]]]:
    """(group or None for all, sizes): the example's shapes (random values), each group at 1, the
    example's and a longer size (3 at least) alone, then every group longer at once."""
    def size(lead: Axis) -> int:
        return inputs[lead[0]].shape[lead[1]]

    points: list[tuple[Axis | None, dict[Axis, int]]] = [(None, {})] + [(lead, {a: n for a in members}) for lead, members in axes.groups.items()
              for n in sorted({1, size(lead), max(3, size(lead) + 3)})]
    if len(axes.groups) > 1:
        points.append((None, {a: max(3, size(lead) + 3) for lead, members in axes.groups.items() for a in members}))
    return points


def check_shapes(run: Runner, module: nn.Module, inputs: tuple[Tensor, ...], axes: Axes,
                 rtol: float) -> tuple[set[Axis], list[str]]:
    """Run the file (``run``) and eager mode on the grid of ``axes`` and at another size of every free
    axis: (the groups where the file differs, every problem found, in words)."""
    bad, problems = set(), []
    for k, (lead, sizes) in enumerate(_grid(inputs, axes)):
        probe = _resized(inputs, sizes, seed=k + 1)
        want = _eager(module, probe)
        if want is None:
            continue
        try:
            got = run(probe)
        except Exception as exc:
            problem: str | None = f"it fails on inputs {_describe(probe)}: {str(exc).strip().splitlines()[-1][:200]}"
        else:
            problem = _differs(got, want, rtol)
        if problem:
            if lead is not None:
                bad.add(lead)
            elif not bad:  # every group longer at once: blamed on all when none fails alone
                bad.update(axes.groups)
            problems.append(f"on inputs {_describe(probe)} {problem}" if not problem.startswith("it") else problem)
    for i, d in axes.free:
        probe = _resized(inputs, {(i, d): inputs[i].shape[d] + 2})
        try:
            got = run(probe)
        except Exception:
            continue
        problems.append(f"axis {d} of input {i} is fixed at {inputs[i].shape[d]} in the file, but the file runs at "
                        f"{inputs[i].shape[d] + 2} without an error (inputs {_describe(probe)})")
    return bad, problems


Build = Callable[[ExportJob, Axes], tuple[bytes, Axes]]  # the file's bytes, and the axes it declares
Load = Callable[[bytes, ExportJob], Runner]


def write_verified(job: ExportJob, path: Path, build: Build, load: Load, what: str, rtol: float = FLOAT_RTOL) -> Path:
    """Build the file of ``job`` with the dynamic axes eager mode allows, check it in its runtime
    (``load``) at every shape it declares, fix the groups where it differs and build it again; write
    it atomically at ``path`` only when it equals eager mode everywhere (ValueError otherwise)."""
    axes = probe_axes(job.module, job.inputs)
    data, axes = build(job, axes)
    bad, problems = check_shapes(load(data, job), job.module, job.inputs, axes, rtol)
    if bad:
        data, axes = build(job, axes.fixing(bad))
        _, problems = check_shapes(load(data, job), job.module, job.inputs, axes, rtol)
    if problems:
        raise ValueError(f"the {what} file of {type(job.module).__name__} does not equal the model: {problems[0]}; "
                         "nothing was written")
    atomic_write_bytes(path, data)
    return path


def declared(axes: Axes, names: list[str], output_names: list[str]) -> dict[str, dict[int, str]]:
    """ONNX ``dynamic_axes``: each input axis of a group named after its leader, each varying output
    axis after its output."""
    out: dict[str, dict[int, str]] = {}
    for i, name in enumerate(names):
        for d, (j, e) in axes.of_input(i).items():
            out.setdefault(name, {})[d] = f"{names[j]}_dim{e}"
    for name, dims in zip(output_names, axes.outputs):
        if dims:
            out[name] = {d: f"{name}_dim{d}" for d in sorted(dims)}
    return out

