"""The rows of the protocol table: name -> :class:`Row` (label and recipe).

A recipe builds and trains one row's model at one compression ratio from a :class:`RowContext`
and returns a :class:`Trained` (the model, its training seconds, how its weights are stored);
:func:`~.run.run_protocol` measures and records it.
The rows run in the order of :data:`ROWS`. To add a row, write a recipe here and add one entry
to :data:`ROWS` (its name is then valid in ``ProtocolConfig.rows`` and ``mpolstm reproduce --rows``).
"""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

from ...compression import CompressionConfig, compress, freeze_central
from ...distill import distill
from ...nn import init_cores_, is_mpo_module
from ...prune import AGPPruner, make_permanent, prune_global
from ...quantization import quantize
from ...storage import pack_weights, packed_bytes, round_to_int8_
from ..training import Callback, Distillation, default_forward, evaluate, seed_everything
from .measure import largest_hidden
from .schedule import Bonds, BondSchedule

if TYPE_CHECKING:
    from ..tasks.base import Task
    from .run import ProtocolConfig

__all__ = ["Row", "RowContext", "Recipe", "Trained", "Infeasible", "ROWS", "GRADUAL_START_RATIO", "LAYOUT", "quantize_dynamic_int8"]

GRADUAL_START_RATIO = 2.0
"""Row (f) starts from a TT-SVD at this ratio (or the row's ratio if lower)."""

LAYOUT = "interleaved"
"""The MPO layout of every MPO row (the paper's). Pinned: with the library's per-weight layout search
("auto") the TT-SVD at :data:`GRADUAL_START_RATIO` may choose other core counts than the one at the
row's ratio, and row (f) could then never truncate to (a)'s bonds."""

TrainFn = Callable[..., float]
"""``train(model, epochs, run, callbacks=(), distill=None) -> training seconds``: fit on the task,
checkpointing (and resuming) under ``runs/<run>``."""


@dataclass(frozen=True)
class RowContext:
    """What a recipe gets for one (row, ratio); shared models are the caller's, so copy before training.

    config: the protocol configuration, its epochs resolved (never None).
    names: the recurrent modules compressed or pruned (``task.recurrent``).
    weights: their weight parameter names in ``dense`` (the pruning targets).
    dense: the trained dense model.
    decomposed: ``dense`` TT-SVD-compressed at ``ratio`` (bonds allocated globally), not fine-tuned.
    target: the internal bonds of ``decomposed``; budget: its recurrent parameter count, which every
        row matches (pruning exactly, gradual truncation at most).
    teacher: the distillation teacher when ``config.distill``, else None.
    schedule_end: the fine-tuning epoch at which gradual rows (AGP, bond shrinking) reach the budget.
    train_fn: trains on the task (see :data:`TrainFn`); recipes call :meth:`train` / :meth:`finetune`.
    run: this row's run name (``<row>-<ratio>x``), where :meth:`train` checkpoints.
    """

    task: Task
    config: ProtocolConfig
    ratio: float
    names: list[str]
    weights: list[str]
    dense: nn.Module
    decomposed: nn.Module
    target: Bonds
    budget: int
    teacher: Distillation | None
    schedule_end: int
    train_fn: TrainFn
    run: str = ""

    def train(self, model: nn.Module, epochs: int, callbacks: Sequence[Callback] = (),
              distill: Distillation | None = None) -> float:
        """Train ``model`` in place for ``epochs`` on the task; returns the training seconds."""
        return self.train_fn(model, epochs, self.run, callbacks=callbacks, distill=distill)

    def finetune(self, model: nn.Module, callbacks: Sequence[Callback] = ()) -> float:
        """Fine-tune ``model`` for ``config.finetune_epochs`` (distilled from ``teacher`` if any)."""
        return self.train(model, self.config.finetune_epochs, callbacks, distill=self.teacher)


@dataclass
class Trained:
    """What a recipe returns.

    model, seconds: the final model and its training seconds.
    int8_cores: its MPO cores lie on their int8 grids (:func:`mpolstm.quantize`) and are stored as int8
        + their scales.
    int8_values: its (pruned) weight matrices lie on int8 grids, one scale each, and are stored with
        int8 values.
    architecture: the model's spec when it differs from the task's (``small-dense``).
    total_params: every parameter of the model, when ``model.parameters()`` does not show them
        (torch's quantized modules hold packed weights).
    extra: further values for the results row (e.g. the metric before int8 rounding).
    """

    model: nn.Module
    seconds: float
    int8_cores: bool = False
    int8_values: bool = False
    architecture: dict[str, Any] | None = None
    total_params: int | None = None
    extra: dict[str, float] = field(default_factory=dict)


Recipe = Callable[[RowContext], Trained]
"""A row's recipe: context -> :class:`Trained`; raises :class:`Infeasible` when the row cannot be
built at the budget."""


class Infeasible(Exception):
    """The row's structure cannot fit the budget (e.g. rank 1 everywhere is already too large); the
    run records it as skipped, with this message as the reason."""


@dataclass(frozen=True)
class Row:
    """A row of the table: its label (the plot legend) and recipe; ``recipe=None`` marks the dense
    row, which :func:`~.run.run_protocol` trains once before the ratios. A row with ``once`` does
    not depend on the ratio (int8 quantization) and runs once, with the first ratio's context."""

    label: str
    recipe: Recipe | None
    once: bool = False


def _reinit(model: nn.Module, names: Sequence[str]) -> None:
    """Fresh initialisation: torch's defaults for dense layers; MPO cores scaled so each rebuilt
    LSTM weight entry has the variance of torch's U(-1/sqrt(H), 1/sqrt(H)) (= 1 / (3H))."""
    for module in model.modules():
        if hasattr(module, "reset_parameters") and not is_mpo_module(module):
            module.reset_parameters()
    for n in names:
        module = model.get_submodule(n)
        std = 1.0 / math.sqrt(3 * module.hidden_size)
        for cores in module.mpo_weights().values():
            init_cores_(list(cores), std)
        with torch.no_grad():
            for k, p in module.named_parameters():
                if k.startswith("bias"):
                    p.uniform_(-math.sqrt(3) * std, math.sqrt(3) * std)


def mpo_decomp(ctx: RowContext) -> Trained:
    """(a) TT-SVD of the trained dense model, then fine-tuning."""
    model = copy.deepcopy(ctx.decomposed)
    return Trained(model, ctx.finetune(model))


def mpo_scratch(ctx: RowContext) -> Trained:
    """(b) The same MPO structure re-initialised and trained from scratch for dense + fine-tuning epochs."""
    seed_everything(ctx.config.seed)
    model = copy.deepcopy(ctx.decomposed)
    _reinit(model, ctx.names)
    return Trained(model, ctx.train(model, ctx.config.dense_epochs + ctx.config.finetune_epochs))


def mpo_central(ctx: RowContext) -> Trained:
    """(c) As (a), with the central tensors frozen (MPOP lightweight fine-tuning)."""
    model = copy.deepcopy(ctx.decomposed)
    freeze_central(model)
    return Trained(model, ctx.finetune(model))


def prune_agp(ctx: RowContext) -> Trained:
    """(d) Gradual (AGP, cubic) global magnitude pruning to the budget during fine-tuning."""
    model = copy.deepcopy(ctx.dense)
    agp = AGPPruner(ctx.weights, ctx.budget, start=0, end=ctx.schedule_end, method="global")
    seconds = ctx.finetune(model, callbacks=[agp])
    make_permanent(model)
    return Trained(model, seconds)


def equal_bytes_nonzeros(ctx: RowContext, value_bytes: int = 4) -> int:
    """The most non-zeros whose pruned storage fits the float32 MPO's bytes (4 per budget entry), with
    ``value_bytes`` per value (4: float32; 1: int8, plus a 4-byte scale per matrix): the larger count
    that CSR or a bitmask allows (each matrix then takes its smaller format, so the stored bytes can
    only be lower)."""
    shapes = [tuple(ctx.dense.get_parameter(w).shape) for w in ctx.weights]
    scales = 4 * len(shapes) if value_bytes == 1 else 0
    limit = 4 * ctx.budget - scales
    index = max(2 if cols <= 2**15 else 4 for _, cols in shapes)
    csr_index = sum(4 * (rows + 1) for rows, _ in shapes)
    bitmask_index = sum(math.ceil(rows * cols / 8) for rows, cols in shapes)
    nonzeros = max((limit - csr_index) // (value_bytes + index), (limit - bitmask_index) // value_bytes)
    if nonzeros < 1:
        raise Infeasible(f"the sparse index alone takes {min(csr_index, bitmask_index) + scales:,} bytes, at or "
                         f"above the MPO's {4 * ctx.budget:,}")
    return nonzeros


def prune_bytes(ctx: RowContext) -> Trained:
    """(d) at equal bytes: AGP pruning to as many non-zeros as fit the float MPO's bytes with their index."""
    model = copy.deepcopy(ctx.dense)
    agp = AGPPruner(ctx.weights, equal_bytes_nonzeros(ctx), start=0, end=ctx.schedule_end, method="global")
    seconds = ctx.finetune(model, callbacks=[agp])
    make_permanent(model)
    return Trained(model, seconds)


def prune_int8(ctx: RowContext) -> Trained:
    """(d) at equal bytes with int8 values: AGP pruning to as many non-zeros as fit the float MPO's bytes
    as int8 values (+ a float32 scale per matrix) with their index, fine-tuned as (d), then every kept
    value rounded to int8 (post-training, as mpo-int8; ``before_int8`` is the float metric)."""
    model = copy.deepcopy(ctx.dense)
    agp = AGPPruner(ctx.weights, equal_bytes_nonzeros(ctx, value_bytes=1), start=0, end=ctx.schedule_end,
                    method="global")
    seconds = ctx.finetune(model, callbacks=[agp])
    make_permanent(model)
    before = evaluate(model, ctx.task.test_loader, ctx.task.metric, forward_fn=ctx.task.forward_fn)
    round_to_int8_(model.get_parameter(w) for w in ctx.weights)
    return Trained(model, seconds, int8_values=True, extra={"before_int8": before})


def prune_oneshot(ctx: RowContext) -> Trained:
    """(e) One-shot global magnitude pruning to the budget, then fine-tuning."""
    model = copy.deepcopy(ctx.dense)
    prune_global(model, ctx.weights, ctx.budget)
    seconds = ctx.finetune(model)
    make_permanent(model)
    return Trained(model, seconds)


def mpo_gradual(ctx: RowContext) -> Trained:
    """(f) TT-SVD at a low ratio, bonds shrunk on a cubic schedule to (a)'s bonds during fine-tuning."""
    start = CompressionConfig(target_modules=ctx.names, target_ratio=min(GRADUAL_START_RATIO, ctx.ratio),
                              layout=LAYOUT)
    model, _ = compress(copy.deepcopy(ctx.dense), start)
    return Trained(model, ctx.finetune(model, callbacks=[BondSchedule(ctx.target, end=ctx.schedule_end)]))


CALIBRATION_BATCHES = 8
"""Training batches whose inputs calibrate row (g)'s compression."""


def mpo_posttrain(ctx: RowContext) -> Trained:
    """(g) What a user with only the trained model does: layout search + calibration on a few
    training inputs (no labels), then distillation from the dense model (mpolstm.distill, no
    labels) for as many steps as the fine-tuning epochs have batches."""
    forward = ctx.task.forward_fn or default_forward
    batches = list(ctx.task.train_loader)
    seed_everything(ctx.config.seed)
    model, _ = compress(copy.deepcopy(ctx.dense), CompressionConfig(target_modules=ctx.names, max_params=ctx.budget),
                        calibration=lambda m: [forward(m, b) for b in itertools.islice(batches, CALIBRATION_BATCHES)])
    result = distill(model, ctx.dense, batches, steps=max(ctx.config.finetune_epochs * len(batches), 1),
                     lr=ctx.task.lr, loss=ctx.task.distill_loss, forward=lambda m, b: forward(m, b)[0],
                     seed=ctx.config.seed)
    return Trained(model, result.seconds)


def small_dense(ctx: RowContext) -> Trained:
    """A plain dense model whose LSTM has the largest hidden size fitting the budget (the layers
    around it follow from that size), trained from scratch for dense + fine-tuning epochs."""
    if ctx.task.resize is None:
        raise ValueError(f"task {ctx.task.name!r} has no Task.resize, which the small-dense row needs")
    hidden = largest_hidden(lambda h: ctx.task.resize(h)[0], ctx.names, ctx.budget)
    seed_everything(ctx.config.seed)
    model, architecture = ctx.task.resize(hidden)
    seconds = ctx.train(model, ctx.config.dense_epochs + ctx.config.finetune_epochs)
    return Trained(model, seconds, architecture=architecture)


def _lowrank(ctx: RowContext) -> nn.Module:
    """Every LSTM weight as a rank-r product (the 2-core "lowrank" MPO = truncated SVD), ranks
    allocated over the weights' spectra to the budget, as the MPO rows' bonds are."""
    rank_one = sum(sum(ctx.dense.get_parameter(w).shape) for w in ctx.weights)
    if rank_one > ctx.budget:
        raise Infeasible(f"rank 1 for every weight takes {rank_one:,} entries, above the budget of {ctx.budget:,}")
    config = CompressionConfig(target_modules=ctx.names, max_params=ctx.budget, layout="lowrank")
    return compress(copy.deepcopy(ctx.dense), config)[0]


def lowrank_decomp(ctx: RowContext) -> Trained:
    """Truncated SVD of the trained dense LSTM at the budget, then fine-tuning."""
    model = _lowrank(ctx)
    return Trained(model, ctx.finetune(model))


def lowrank_scratch(ctx: RowContext) -> Trained:
    """The same rank-r structure re-initialised and trained from scratch for dense + fine-tuning epochs."""
    seed_everything(ctx.config.seed)
    model = _lowrank(ctx)
    _reinit(model, ctx.names)
    return Trained(model, ctx.train(model, ctx.config.dense_epochs + ctx.config.finetune_epochs))


def mpo_latency(ctx: RowContext) -> Trained:
    """Latency-aware compression of the trained dense model (layouts and bonds chosen under the
    parameter budget and as many multiply-adds per step as the budget has entries: MACs / dense MACs
    = 1 / ratio), then fine-tuning as (a)."""
    config = CompressionConfig(target_modules=ctx.names, max_params=ctx.budget, max_macs=ctx.budget)
    try:
        model, report = compress(copy.deepcopy(ctx.dense), config)
    except ValueError as exc:
        raise Infeasible(str(exc)) from None
    return Trained(model, ctx.finetune(model), extra={"macs": report.macs})


def quantize_dynamic_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its nn.LSTM and nn.Linear layers dynamically quantized to int8
    (``torch.ao.quantization.quantize_dynamic``: int8 weights, activations quantized per batch).
    torch marks torch.ao.quantization deprecated in favour of torchao, which has no CPU LSTM
    path; the warning is silenced here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor", category=UserWarning)
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(copy.deepcopy(model).eval(), {nn.LSTM, nn.Linear}, dtype=torch.qint8)


def int8_dynamic(ctx: RowContext) -> Trained:
    """Dynamic int8 quantization of the trained dense model, no training (4x fewer weight bytes at
    any ratio, so the row runs once)."""
    total = sum(p.numel() for p in ctx.dense.parameters())
    return Trained(quantize_dynamic_int8(ctx.dense), 0.0, total_params=total)


def mpo_int8(ctx: RowContext) -> Trained:
    """An MPO with the float rows' byte budget: int8 cores (1 byte an entry + 4 bytes a scale, one per
    slice along each core's larger bond) allow ~4x the entries of (a). TT-SVD of the dense model at the
    most entries whose int8 bytes fit, fine-tuning as (a), then every core rounded to int8
    (:func:`mpolstm.quantize`, post-training); ``before_int8`` in the results is the test metric of
    the float cores, the rounding's cost."""
    limit = entries = 4 * ctx.budget
    for _ in range(4):  # the scales depend on the bonds the allocation picks: leave room for the last ones
        config = CompressionConfig(target_modules=ctx.names, max_params=entries, layout=LAYOUT)
        model = compress(copy.deepcopy(ctx.dense), config)[0]
        stored = pack_weights(model, ctx.names, int8_cores=True)[0]
        if packed_bytes(stored) <= limit:
            break
        entries = limit - sum(4 * t.numel() for key, t in stored.items() if key.endswith(".scale"))
    else:
        raise Infeasible(f"no int8 MPO within {limit:,} bytes found")
    seconds = ctx.finetune(model)
    before = evaluate(model, ctx.task.test_loader, ctx.task.metric, forward_fn=ctx.task.forward_fn)
    quantize(model)
    return Trained(model, seconds, int8_cores=True, extra={"before_int8": before})


ROWS: dict[str, Row] = {
    "dense": Row("dense LSTM", None),
    "mpo-decomp": Row("(a) MPO from TT-SVD of the dense model + fine-tuning", mpo_decomp),
    "mpo-scratch": Row("(b) MPO trained from scratch", mpo_scratch),
    "mpo-central": Row("(c) MPO, central tensors frozen (MPOP)", mpo_central),
    "prune-agp": Row("(d) AGP magnitude pruning + fine-tuning", prune_agp),
    "prune-oneshot": Row("(e) one-shot magnitude pruning + fine-tuning", prune_oneshot),
    "prune-bytes": Row("(d) AGP pruning at the MPO's bytes (values + index)", prune_bytes),
    "prune-int8": Row("(d) AGP pruning at the MPO's bytes, int8 values (+ index)", prune_int8),
    "mpo-gradual": Row("(f) gradual bond truncation during fine-tuning", mpo_gradual),
    "mpo-posttrain": Row("(g) MPO post-training: layout search + calibration + distillation", mpo_posttrain),
    "small-dense": Row("small dense LSTM at the budget, from scratch", small_dense),
    "lowrank-decomp": Row("low rank (truncated SVD) of the dense model + fine-tuning", lowrank_decomp),
    "lowrank-scratch": Row("low rank trained from scratch", lowrank_scratch),
    "int8": Row("dense, dynamic int8 quantization (no training)", int8_dynamic, once=True),
    "mpo-int8": Row("MPO with int8 cores at the same bytes + fine-tuning", mpo_int8),
    "mpo-latency": Row("MPO at the budget in parameters and in multiply-adds per step + fine-tuning", mpo_latency),
}
"""Every row, in the order they run and are reported."""
