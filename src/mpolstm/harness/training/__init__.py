"""The trainer: the loop (:mod:`.loop`), metrics (:mod:`.metrics`), callbacks (:mod:`.callbacks`) and
what fit keeps in ``out_dir`` (:mod:`.rundir`; checkpoint format: :mod:`mpolstm.checkpoint`)."""

from ...checkpoint import BEST_FORMAT, CHECKPOINT_FORMAT
from .callbacks import Callback, Distillation, ProgressBar, TrainState, track_best
from .loop import (
                   OPTIMIZERS,
                   FitResult,
                   ForwardFn,
                   count_parameters,
                   default_forward,
                   evaluate,
                   fit,
                   make_optimizer,
                   seed_everything,
)
from .metrics import ACCURACY, PERPLEXITY, Metric
from .rundir import load_checkpoint

__all__ = [
    "ACCURACY",
    "BEST_FORMAT",
    "CHECKPOINT_FORMAT",
    "OPTIMIZERS",
    "PERPLEXITY",
    "Callback",
    "Distillation",
    "FitResult",
    "ForwardFn",
    "Metric",
    "ProgressBar",
    "TrainState",
    "count_parameters",
    "default_forward",
    "evaluate",
    "fit",
    "load_checkpoint",
    "make_optimizer",
    "seed_everything",
    "track_best",
]
