"""The model's output error: the compressed model measured against the original on batches.

compress reports each weight's error; what a user needs is the model's. ``OutputCheck`` is
||y' - y|| / ||y|| over the first output tensor of every model call, y the original model's
outputs and y' the compressed model's, measured on (in this order of preference) the
``validation=`` batches, the held-out (odd-numbered) calibration batches, the calibration itself
when nothing can be held out, or, without calibration, random inputs shaped like the model's
first layer's ("synthetic-input estimate": not the user's data).

The held-out decision (``paired_advantage``) compares two candidates batch by batch: the log of
their per-batch error ratio, a one-sided paired t-test at 95%.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..calibration import run_hooked

__all__ = ["MIN_DECIDE", "OutputCheck", "OutputRecorder", "batch_errors", "batch_outputs", "paired_advantage", "synthetic_batches",
           "total_error"]

# Fewest held-out batches a paired test decides on (t at 2 degrees of freedom: 2.92).
MIN_DECIDE = 3
# One-sided 95% quantiles of Student's t for 1..20 degrees of freedom; above, 1.645 + 1.6 / df (within 0.002).
_T95 = (6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812, 1.796, 1.782, 1.771, 1.761, 1.753,
        1.746, 1.740, 1.734, 1.729, 1.725)
# One-sided 90% quantiles of Student's t for 1..10 degrees of freedom; above, 1.282 + 1.3 / df (within 0.01).
_T90 = (3.078, 1.886, 1.638, 1.533, 1.476, 1.440, 1.415, 1.397, 1.383, 1.372)
SYNTHETIC = "synthetic-input estimate"


@dataclass
class OutputCheck:
    """The compressed model's relative output error ||y' - y|| / ||y|| on ``batches`` batches of
    ``source`` (e.g. "held-out calibration batches", or SYNTHETIC), and per batch."""

    error: float
    batches: int
    source: str
    per_batch: tuple[float, ...] = ()

    def __str__(self) -> str:
        if self.source == SYNTHETIC:
            return (f"model output error: {self.error:.4f} relative ({SYNTHETIC} on {self.batches} batches of random "
                    "inputs shaped like the model's, not your data)")
        return f"model output error: {self.error:.4f} relative (||y' - y|| / ||y||, on {self.batches} {self.source})"

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.error, "batches": self.batches, "source": self.source, "per_batch": list(self.per_batch)}

    def upper_bound(self) -> float:
        """A one-sided 90% upper confidence bound on the error, from the spread of the per-batch log
        errors (Student's t); the error itself with fewer than 2 batches (nothing to spread)."""
        logs = [math.log(max(e, 1e-300)) for e in self.per_batch]
        n = len(logs)
        if n < 2:
            return self.error
        mean = sum(logs) / n
        sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / (n - 1))
        t = _T90[n - 2] if n - 1 <= len(_T90) else 1.282 + 1.3 / (n - 1)
        return self.error * math.exp(t * sd / math.sqrt(n))


def _first(output: Any) -> Tensor | None:
    first = output[0] if isinstance(output, (tuple, list)) else output
    return first.detach().double() if isinstance(first, Tensor) else None


class OutputRecorder:
    """Keeps, per batch, the first output tensor of every call of the model: ``hook`` on the model
    (a forward hook with kwargs) while ``batches(...)`` feeds it; ``outputs()`` afterwards."""

    def __init__(self) -> None:
        self._seen: list[list[Tensor]] = []

    def batches(self, batches: Iterable[Any]) -> Iterator[Any]:
        for batch in batches:
            self._seen.append([])
            yield batch

    def hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        first = _first(output)
        if first is not None:
            self._seen[-1].append(first)

    def outputs(self) -> list[list[Tensor]]:
        if not all(self._seen):
            raise ValueError("the model returned no tensor on a calibration batch: its output error cannot be measured")
        return self._seen


@torch.no_grad()
def batch_outputs(model: nn.Module, batches: Sequence[Any]) -> list[list[Tensor]]:
    """Per batch, the first output tensor of every call of ``model`` while it runs (eval mode)."""
    recorder = OutputRecorder()
    run_hooked(model, recorder.batches(batches), [(model, recorder.hook)], with_kwargs=True)
    return recorder.outputs()


def batch_errors(model: nn.Module, batches: Sequence[Any], reference: list[list[Tensor]]) -> list[tuple[float, float]]:
    """Per batch (||y' - y||^2, ||y||^2) of ``model`` against the reference outputs."""
    result = []
    for outputs, ref in zip(batch_outputs(model, batches), reference):
        if len(outputs) != len(ref) or any(o.shape != r.shape for o, r in zip(outputs, ref)):
            raise ValueError("the calibration must run the model the same way every time to measure its output error")
        result.append((sum(float((o - r).pow(2).sum()) for o, r in zip(outputs, ref)),
                       sum(float(r.pow(2).sum()) for r in ref)))
    return result


def total_error(errors: Sequence[tuple[float, float]]) -> float:
    """||y' - y|| / ||y|| over all batches."""
    num, den = sum(e[0] for e in errors), sum(e[1] for e in errors)
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def _relative(errors: Sequence[tuple[float, float]]) -> list[float]:
    return [math.sqrt(n / d) if d > 0 else math.sqrt(n) for n, d in errors]


def paired_advantage(simple: Sequence[tuple[float, float]], other: Sequence[tuple[float, float]]
                     ) -> tuple[bool, int | None]:
    """Whether ``other`` has a lower output error than ``simple`` beyond the batches' noise (one-sided
    paired t-test at 95% on the per-batch log error ratios), and, when it does not but is lower on
    average, about how many batches would decide (None otherwise)."""
    diffs = [math.log(max(a, 1e-300) / max(b, 1e-300)) for a, b in zip(_relative(simple), _relative(other))]
    n = len(diffs)
    mean = sum(diffs) / n if n else 0.0
    if n < MIN_DECIDE:
        return False, (MIN_DECIDE if mean > 0 else None)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    t = _T95[n - 2] if n - 1 <= len(_T95) else 1.645 + 1.6 / (n - 1)
    if mean > 0 and mean > t * sd / math.sqrt(n):
        return True, None
    if mean <= 1e-12 * max(1.0, sd):
        return False, None
    return False, max(n + 1, math.ceil((1.7 * sd / mean) ** 2) + 1)


def _guesses(model: nn.Module, gen: torch.Generator) -> list[Callable[[], Tensor]]:
    """Makers of random inputs shaped like those of the model's first layer with weights (a few shapes to
    try), then the model's own ``synthetic_batch(gen)`` where it has one (an imported ONNX graph's
    declared inputs, e.g. a per-frame graph with states in and out)."""
    first = next((m for m in model.modules() if not list(m.children()) and any(True for _ in m.parameters())), None)
    own = getattr(model, "synthetic_batch", None)
    fallback = [functools.partial(own, gen)] if callable(own) else []
    if isinstance(first, nn.Embedding):
        return [lambda: torch.randint(0, first.num_embeddings, (4, 32), generator=gen), *fallback]
    shapes: list[tuple[int, ...]] = []
    if isinstance(first, nn.RNNBase):
        shapes = [(4, 32, first.input_size) if first.batch_first else (32, 4, first.input_size)]
    elif isinstance(first, nn.Linear):
        shapes = [(4, 32, first.in_features), (32, first.in_features)]
    elif isinstance(first, nn.Conv1d):
        shapes = [(4, first.in_channels, 64)]
    elif isinstance(first, nn.Conv2d):
        shapes = [(4, first.in_channels, 32, 32)]
    return [*(functools.partial(_randn, shape, gen) for shape in shapes), *fallback]


def _randn(shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    return torch.randn(*shape, generator=gen)


@torch.no_grad()
def synthetic_batches(model: nn.Module, count: int = 4) -> list[Tensor]:
    """``count`` batches of random inputs the model runs on (seeded), shaped like its first layer's
    inputs; [] when no guess runs (the report then has no estimate)."""
    gen = torch.Generator().manual_seed(0)
    for make in _guesses(model, gen):
        batches = [make() for _ in range(count)]
        try:
            batch_outputs(model, batches[:1])
        except Exception:  # noqa: BLE001 - a guessed shape the model does not take: try the next
            continue
        return batches
    return []
