"""Tolerance mode: the smallest model whose measured output error (or metric drop) is within a tolerance.

``CompressionConfig(max_output_error=e)`` (or ``compress(..., evaluate=fn, max_drop=d)``) searches the
parameter budget: ratios 2, 4, 8, ... are compressed and measured (``fn(model)`` against ``fn`` of the
original, or the report's held-out output error: a ratio holds when the error's 90% upper confidence
bound over the held-out batches, ``OutputCheck.upper_bound``, is within ``e``, so that unseen data of the
same kind stays within it) until one fails, then ``BISECTIONS`` geometric bisections between the last
ratio that held (1x at first) and the first that failed. Every candidate is a full compress of a copy
(with its own held-out decision); the largest ratio that held is returned, with the curve
ratio -> error (or metric) of every candidate tried in its report.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from typing import Any, Callable

from torch import nn

from ..errors import ConfigError

__all__ = ["BISECTIONS", "MAX_RATIO", "smallest_within"]

BISECTIONS = 4
MAX_RATIO = 256.0


def smallest_within(compress_once: Callable, model: nn.Module, config: Any, calibration: Any, validation: Any,
                    evaluate: Callable[[nn.Module], float] | None, max_drop: float | None) -> tuple[nn.Module, Any]:
    """(model compressed at the largest ratio within the tolerance, its report with ``curve``); the
    model passed is left unchanged. ValueError when even the smallest ratio tried misses it."""
    if evaluate is None and calibration is None and validation is None:
        raise ConfigError("calibration", lambda n: (
            "max_output_error is measured on your data: give calibration= batches (every second is held out) or "
            "validation= batches" if n.api else f"{n('max_output_error')} is measured on your data: give "
            f"{n('calibration')} inputs (every second slice is held out) or {n('validation')} inputs"))
    base = None if evaluate is None else float(evaluate(model))
    trial_config = replace(config, max_output_error=None)
    curve: list[tuple[float, float]] = []

    def trial(ratio: float) -> tuple[bool, nn.Module, Any] | None:
        """(held, model, report); None when the ratio asks for less than the smallest model (every bond 1)."""
        try:
            small, report = compress_once(copy.deepcopy(model), replace(trial_config, target_ratio=ratio),
                                          calibration=calibration, validation=validation)
        except ConfigError as exc:
            if exc.field != "max_params":
                raise
            return None
        value = report.output_check.error if evaluate is None else float(evaluate(small))
        curve.append((ratio, value))
        if evaluate is None:
            held = report.output_check.upper_bound() <= config.max_output_error
        else:
            assert base is not None and max_drop is not None
            held = base - value <= max_drop
        return held, small, report

    best, low, high, ratio, beyond = None, 1.0, None, 2.0, False
    while ratio <= MAX_RATIO:
        result = trial(ratio)
        if result is None or not result[0]:
            high, beyond = ratio, result is None
            break
        best, low, ratio = result[1:], ratio, ratio * 2
    for _ in range(BISECTIONS if high is not None else 0):
        assert high is not None
        mid = math.sqrt(low * high)
        result = trial(mid)
        if result is not None and result[0]:
            best, low = result[1:], mid
        else:
            high, beyond = mid, result is None
    tried = ", ".join(f"{r:.3g}x {v:.4g}" for r, v in sorted(curve))
    if best is None:
        what = f"output error {config.max_output_error}" if evaluate is None else f"metric drop {max_drop}"
        raise ConfigError("max_output_error", lambda n: (
            f"no ratio tried keeps the {what} (tried: {tried}): even barely compressed, every factorized weight "
            f"loses rank; allow more, or leave more modules dense ({'exclude_modules' if n.api else 'fewer --target'})"))
    small, report = best
    report.curve = sorted(curve)
    report.tolerance = (f"kept {low:.3g}x ({report.ratio:.3g}x as compressed), the largest ratio tried within "
                        + (f"output error {config.max_output_error} (its 90% upper bound over the held-out "
                           f"batches: {report.output_check.upper_bound():.4g})" if evaluate is None else
                           f"a metric drop of {max_drop} (original {base:.4g})") + f"; tried: {tried}"
                        + ("; larger ratios ask for less than the smallest model (every bond 1)" if beyond else ""))
    return small, report
