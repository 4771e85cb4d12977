"""Per-frame graphs: one frame a call, the recurrent states packed into graph inputs and outputs
(how on-device models ship, e.g. DTLN: ``mask, states = f(magnitudes [1, 1, 257], states [1, 2, 128, 2])``).

``state_pairs(model)`` finds them: a graph input other than the first is a state when an output
can have its shape and has its element type (outputs after the first tried first), confirmed by running the
graph: the output fed back as the input is accepted, and changing the input changes the output.
``FrameSequence`` is a sequence of frames for such a graph (its other inputs with a leading time
axis T; the states start at zero and are carried from call to call): calling it runs the model
through the sequence, so a list of them is calibration for ``compress`` (each batch a callable),
and ``FrameSequence.run`` is the ``forward`` of ``distill`` through time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

# the models here are mpolstm.onnx.model.OnnxModel, typed Any: model.py imports this module (synthetic_batch)
OnnxModel = Any

__all__ = ["FrameSequence", "state_pairs"]


def _fits(a: tuple, b: tuple) -> bool:
    """Declared shapes that can be equal: the same rank, equal where both sizes are fixed."""
    return len(a) == len(b) and all(x == y or not isinstance(x, int) or not isinstance(y, int) for x, y in zip(a, b))


def _candidates(model: OnnxModel) -> list[tuple[int, int]]:
    """(input, output) index pairs of compatible declared shape and equal type (outputs after the first first)."""
    proto = _outputs_declared(model)
    pairs, used = [], set()
    for i, spec in enumerate(model.inputs[1:], start=1):
        order = list(range(1, len(proto))) + [0]
        match = next((j for j in order if j not in used and proto[j][0] == spec.elem_type
                      and _fits(proto[j][1], spec.dims)), None)
        if match is not None:
            pairs.append((i, match))
            used.add(match)
    return pairs


def _outputs_declared(model: OnnxModel) -> list[tuple[int, tuple]]:
    import onnx

    graph = onnx.load_from_string(model.source).graph
    declared = {o.name: o.type.tensor_type for o in graph.output}
    return [(declared[n].elem_type, tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                          for d in declared[n].shape.dim)) for n in model.output_names]


@torch.no_grad()
def state_pairs(model: OnnxModel) -> list[tuple[int, int]]:
    """[(state input index, state output index)] of a per-frame graph (empty for other graphs);
    see the module docstring."""
    pairs = _candidates(model)
    if not pairs:
        return []
    inputs = list(model.example_inputs({}, seed=1))
    try:
        first = model(*inputs)
        first = first if isinstance(first, tuple) else (first,)
        fed = list(inputs)
        for i, j in pairs:
            fed[i] = first[j]
        second = model(*fed)
        second = second if isinstance(second, tuple) else (second,)
    except ValueError:
        return []
    return [(i, j) for i, j in pairs if first[j].shape == inputs[i].shape and not torch.equal(first[j], second[j])]


@dataclass
class FrameSequence:
    """Frames for a per-frame graph: ``inputs`` its non-state inputs in graph order, each (T, *the
    input's shape); ``pairs`` from :func:`state_pairs`. Calling it runs the model over the frames."""

    inputs: tuple[Tensor, ...]
    pairs: list[tuple[int, int]]

    def __len__(self) -> int:
        return self.inputs[0].shape[0]

    def crops(self, length: int) -> list["FrameSequence"]:
        """Consecutive pieces of ``length`` frames (the last one shorter), each starting from zero states."""
        return [FrameSequence(tuple(x[t:t + length] for x in self.inputs), self.pairs)
                for t in range(0, len(self), length)]

    def run(self, model: OnnxModel) -> Tensor:
        """The non-state outputs of every frame, each flattened and concatenated: (T, features). The
        states start at zero, their named axes (a batch N) as large as the frames' axes of that name."""
        data = [k for k in range(len(model.inputs)) if k not in {i for i, _ in self.pairs}]
        sizes = {d: n for k, x in zip(data, self.inputs) for d, n in zip(model.inputs[k].dims, x.shape[1:])
                 if isinstance(d, str)}
        states = {i: torch.zeros(tuple(sizes.get(d, 1) if not isinstance(d, int) else d for d in model.inputs[i].dims),
                                 dtype=model.float_dtype()) for i, _ in self.pairs}
        kept = [k for k in range(len(model.output_names)) if k not in {j for _, j in self.pairs}]
        rows = []
        for t in range(len(self)):
            feed = dict(states)
            feed.update((k, x[t]) for k, x in zip(data, self.inputs))
            out = model(*(feed[k] for k in range(len(model.inputs))))
            out = out if isinstance(out, tuple) else (out,)
            states = {i: out[j] for i, j in self.pairs}
            rows.append(torch.cat([out[k].reshape(-1) for k in kept]))
        return torch.stack(rows)

    def __call__(self, model: OnnxModel) -> Tensor:
        return self.run(model)
