"""Control flow in the interpreter: ``If``, ``Loop`` and ``Scan`` with their subgraphs.

``load`` compiles each subgraph into a :class:`Subgraph` (its steps, layers included, as the
main graph's) and gives the node, after its own inputs, every outer name the subgraph reads
(``outer`` in its attributes): the subgraph runs on those values, its inputs and its own nodes'
outputs. Layers (an LSTM inside an ``If`` branch) are submodules of the model like any other,
so compress, prune and distill see them; ``ctx.run`` computes a step (the model's own), and
``ctx.record``, when set, keeps every value a subgraph made (its last run), by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .ops import Ctx, register_ops

__all__ = ["Subgraph", "outer_names", "run_graph"]


@dataclass(frozen=True)
class Subgraph:
    """A compiled graph attribute: its input and output names and its steps (model.Step)."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    steps: list[Any] = field(default_factory=list)


def outer_names(sub: Subgraph) -> list[str]:
    """The names the compiled ``sub`` reads and does not make: outer values and constants (the
    model's, folded ones and the subgraph's initializers included)."""
    made, read = set(sub.inputs), []
    for step in sub.steps:
        read += [n for n in step.inputs if n and n not in made and n not in read]
        made.update(step.outputs)
    return read + [n for n in sub.outputs if n not in made and n not in read]


def run_graph(sub: Subgraph, ctx: Ctx, outer: dict[str, Tensor], args: list[Tensor | None]) -> list[Tensor]:
    """The subgraph's outputs on ``args`` (its inputs, in order) with ``outer`` values visible."""
    env = dict(outer)
    env.update((n, a) for n, a in zip(sub.inputs, args) if a is not None)
    assert ctx.run is not None, "control flow runs inside a model (ctx.run)"
    for step in sub.steps:
        try:
            results = ctx.run(step, [env[n] if n else None for n in step.inputs], ctx)
        except (RuntimeError, ValueError, IndexError, TypeError) as exc:
            raise ValueError(f"node {step.name!r} ({step.op}): {str(exc).strip().splitlines()[0]}") from exc
        env.update((n, r) for n, r in zip(step.outputs, results) if n and r is not None)
    if ctx.record is not None:
        ctx.record.update((n, v) for n, v in env.items() if n not in outer)
    return [env[n] for n in sub.outputs]


def _split(xs: list, a: dict) -> tuple[list, dict[str, Tensor]]:
    """(the node's own inputs, {outer name: value})."""
    own = len(xs) - len(a["outer"])
    return xs[:own], dict(zip(a["outer"], xs[own:]))


def _if(ctx, xs, a):
    (cond,), outer = _split(xs, a)
    taken = bool(cond.reshape(-1)[0])
    if ctx.explore:
        try:
            run_graph(a["else_branch"] if taken else a["then_branch"], ctx, outer, [])
        except ValueError:  # a branch need not run on values that choose the other one
            pass
    return run_graph(a["then_branch"] if taken else a["else_branch"], ctx, outer, [])


def _stack(slices: list[list[Tensor]], count: int) -> list[Tensor]:
    if not slices:
        return [torch.empty(0) for _ in range(count)]
    return [torch.stack([s[k] for s in slices]) for k in range(count)]


def _loop(ctx, xs, a):
    """ONNX Loop: (M, cond, v...) -> (v_final..., scan outputs stacked on a new first axis)."""
    own, outer = _split(xs, a)
    trip, cond, state = own[0], own[1], list(own[2:])
    body, k, slices = a["body"], 0, []
    while (trip is None or k < int(trip)) and (cond is None or bool(cond.reshape(-1)[0])):
        flag = cond if cond is not None else torch.tensor(True)
        out = run_graph(body, ctx, outer, [torch.tensor(k, dtype=torch.int64), flag, *state])
        cond, state = out[0], out[1:1 + len(state)]
        slices.append(out[1 + len(state):])
        k += 1
    return [*state, *_stack(slices, len(body.outputs) - 1 - len(state))]


def _scan(ctx, xs, a):
    """ONNX Scan (opset 9+): (states..., sequences...) -> (final states..., stacked outputs...)."""
    if ctx.opset < 9:
        raise ValueError("Scan before operator set 9 (a batch axis and sequence_lens) is not supported")
    own, outer = _split(xs, a)
    body, count = a["body"], a["num_scan_inputs"]
    states, seqs = list(own[:len(own) - count]), own[len(own) - count:]
    axes, backward = a.get("scan_input_axes", [0] * count), a.get("scan_input_directions", [0] * count)
    seqs = [s.movedim(ax % s.dim(), 0) for s, ax in zip(seqs, axes)]
    seqs = [s.flip(0) if back else s for s, back in zip(seqs, backward)]
    slices = []
    for t in range(seqs[0].shape[0]):
        out = run_graph(body, ctx, outer, [*states, *(s[t] for s in seqs)])
        states = out[:len(states)]
        slices.append(out[len(states):])
    n_out = len(body.outputs) - len(states)
    stacked = _stack(slices, n_out)
    axes, backward = a.get("scan_output_axes", [0] * n_out), a.get("scan_output_directions", [0] * n_out)
    stacked = [s.flip(0) if back else s for s, back in zip(stacked, backward)]
    return [*states, *(s.movedim(0, ax % s.dim()) for s, ax in zip(stacked, axes))]


register_ops({"If": _if, "Loop": _loop, "Scan": _scan})
