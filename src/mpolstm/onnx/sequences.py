"""The interpreter's sequence operators: a sequence value is a Python list of tensors.

Sequences live inside a graph only (torch's exporter splits an LSTM's gates with SplitToSequence
and SequenceAt in a Loop body); a graph input or output of sequence type is refused when it is
read (model.py). An operator that makes a sequence returns it wrapped in a one-element tuple, as
an operator with several outputs returns a tuple of them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .ops import dtype_of, register_ops

__all__: list[str] = []


def _position(seq: list[Tensor], position: Tensor | None, default: int, inserting: bool = False) -> int:
    """An ONNX sequence position (negative counts from the end) as an index, checked."""
    count = len(seq) + (1 if inserting else 0)
    if position is None:
        return default
    k = int(position.reshape(-1)[0])
    if not -count <= k < count:
        raise ValueError(f"sequence position {k} is out of range for a sequence of {len(seq)} tensors")
    return k + count if k < 0 else k


def _sequence_at(ctx, xs, a):
    seq = xs[0]
    return seq[_position(seq, xs[1], 0)]


def _sequence_insert(ctx, xs, a):
    seq, value = xs[0], xs[1]
    at = _position(seq, xs[2] if len(xs) > 2 else None, len(seq), inserting=True)
    return (seq[:at] + [value] + seq[at:],)


def _sequence_erase(ctx, xs, a):
    seq = xs[0]
    at = _position(seq, xs[1] if len(xs) > 1 else None, len(seq) - 1)
    return (seq[:at] + seq[at + 1:],)


def _sequence_empty(ctx, xs, a):
    dtype_of(ctx, a.get("dtype", 1))  # an element type torch has, or a one-line refusal
    return ([],)


def _split_to_sequence(ctx, xs, a):
    """SplitToSequence: pieces of the given sizes (a scalar: equal pieces of that size, the last
    smaller) or, without ``split``, pieces of 1 (squeezed unless keepdims=1)."""
    x, axis = xs[0], a.get("axis", 0)
    split = xs[1] if len(xs) > 1 else None
    if split is None:
        parts = list(torch.split(x, 1, dim=axis))
        return ([p.squeeze(axis) for p in parts] if not a.get("keepdims", 1) else parts,)
    sizes = int(split) if split.dim() == 0 else [int(s) for s in split.tolist()]
    return (list(torch.split(x, sizes, dim=axis)),)


def _concat_from_sequence(ctx, xs, a):
    seq, axis = xs[0], a["axis"]
    if not seq:
        raise ValueError("ConcatFromSequence of an empty sequence")
    return torch.stack(seq, dim=axis) if a.get("new_axis", 0) else torch.cat(seq, dim=axis)


register_ops({
    "SequenceEmpty": _sequence_empty,
    "SequenceConstruct": lambda ctx, xs, a: (list(xs),),
    "SequenceAt": _sequence_at,
    "SequenceInsert": _sequence_insert,
    "SequenceErase": _sequence_erase,
    "SequenceLength": lambda ctx, xs, a: torch.tensor(len(xs[0]), dtype=torch.int64),
    "SplitToSequence": _split_to_sequence,
    "ConcatFromSequence": _concat_from_sequence,
})
