"""What the protocol measures of a model: recurrent parameter counts, stored bytes, inference
latency, and the hidden size of a dense model that fits a budget."""

from __future__ import annotations

from typing import Any, Callable, Sequence, cast

import torch
from torch import nn
from torch.utils import benchmark

from ...nn import is_mpo_module
from ...prune import count_nonzero
from ...storage import quantized_rnn_weights
from ..tasks.base import Task, lstm_cell_step
from .schedule import mpo_entries

__all__ = ["recurrent_weight_names", "dense_params", "compressed_params", "latencies", "largest_hidden"]


def recurrent_weight_names(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Parameter names of the weights (not biases) of the named modules, e.g. ``lstm.weight_ih_l0``."""
    return [f"{n}.{p}" for n in names for p, _ in model.get_submodule(n).named_parameters() if p.startswith("weight")]


def dense_params(model: nn.Module, names: Sequence[str]) -> int:
    """Entries of the weights (not biases) of the named dense modules."""
    return sum(p.numel() for n in names for k, p in model.get_submodule(n).named_parameters() if k.startswith("weight"))


def compressed_params(model: nn.Module, names: Sequence[str]) -> int:
    """Entries of the recurrent weights as stored: MPO cores, or non-zeros of (pruned) dense weights."""
    total = 0
    for n in names:
        module = model.get_submodule(n)
        quantized = quantized_rnn_weights(module)
        if is_mpo_module(module):
            total += mpo_entries(model, [n])
        elif quantized is not None:
            total += sum(q.numel() for q in quantized.values())
        else:
            total += count_nonzero(model, [f"{n}.{w}" for w in cast(nn.RNNBase, module)._flat_weights_names
                                          if w.startswith("weight")])
    return total


def _median_seconds(fn: Callable[[], Any]) -> float:
    return benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=0.2).median


@torch.no_grad()
def latencies(model: nn.Module, task: Task) -> dict[str, float]:
    """Batched forward of ``task.example_batch`` and one streaming LSTM step at batch 1 (ms)."""
    model.eval()
    batch = task.example_batch
    batched = _median_seconds(lambda: model(batch))
    lstm: Any = model.get_submodule(task.recurrent[0])  # an LSTM of any kind (torch, MPO, quantized): duck-typed
    frame = torch.zeros(1, lstm.input_size)  # one frame of whatever the model feeds its LSTM
    step_fn: Callable[..., Any]
    if hasattr(lstm, "step"):
        step_fn = lstm.step
    elif type(lstm) is nn.LSTM:
        step_fn = lambda x, s=None: lstm_cell_step(lstm, x, s)  # noqa: E731
    else:  # e.g. torch's dynamically quantized LSTM: a length-1 sequence
        def sequence_step(x, s=None):
            out, s = lstm(x.unsqueeze(1 if lstm.batch_first else 0), s)
            return out.squeeze(1 if lstm.batch_first else 0), s
        step_fn = sequence_step
    state = step_fn(frame)[1]
    step = _median_seconds(lambda: step_fn(frame, state))
    return {"batched_ms": 1e3 * batched, "step_ms": 1e3 * step}


def largest_hidden(build: Callable[[int], nn.Module], names: Sequence[str], budget: int) -> int:
    """The largest hidden size h whose model ``build(h)`` has at most ``budget`` entries in the
    weights of the named modules (they grow with h; models are built on the meta device).
    ValueError when even h = 1 does not fit."""

    def weights(h: int) -> int:
        with torch.device("meta"):
            return dense_params(build(h), names)

    if weights(1) > budget:
        raise ValueError(f"no hidden size fits {budget} recurrent weights (hidden size 1 has {weights(1)})")
    fits, too_big = 1, 2
    while weights(too_big) <= budget:
        fits, too_big = too_big, 2 * too_big
    while too_big - fits > 1:
        middle = (fits + too_big) // 2
        fits, too_big = (middle, too_big) if weights(middle) <= budget else (fits, middle)
    return fits
