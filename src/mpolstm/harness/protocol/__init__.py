"""The paper's comparison: MPO-LSTM versus magnitude pruning at equal parameter counts.

For each compression ratio r of the recurrent weights (W_ih, W_hh of the task's ``lstm``):

- ``mpo-decomp``  (a) TT-SVD of the trained dense LSTM, bonds allocated across all weights and
  bonds from their singular spectra (``compress(target_ratio=r)``), then fine-tuning.
- ``mpo-scratch`` (b) the same MPO structure, re-initialised and trained from scratch (the paper's way).
- ``mpo-central`` (c) as (a), but with the central tensors frozen (MPOP lightweight fine-tuning).
- ``prune-agp``   (d) gradual magnitude pruning (AGP, cubic) of the dense LSTM to exactly the MPO's
  parameter count, during fine-tuning.
- ``prune-oneshot`` (e) one-shot global magnitude pruning to that count, then fine-tuning.
- ``mpo-gradual`` (f) TT-SVD at ratio 2, bonds shrunk on a cubic schedule to (a)'s bonds during
  fine-tuning (MPOP's dimension squeezing, the MPO counterpart of AGP).
- ``mpo-posttrain`` (g) layout search + calibration + distillation, no labels.

The baselines a practitioner compares against, at the same budget:

- ``small-dense`` a plain LSTM with the largest hidden size that fits, trained from scratch.
- ``lowrank-decomp`` / ``lowrank-scratch`` every LSTM weight as a rank-r product (truncated SVD),
  ranks allocated like the MPO bonds, from the dense model + fine-tuning or from scratch.
- ``int8`` dynamic int8 quantization of the dense model (no training; 4x fewer bytes, once per table).
- ``mpo-int8`` an MPO with int8 cores at the float rows' bytes (~4x their entries), fine-tuned, rounded
  (:func:`mpolstm.quantize`).
- ``prune-bytes`` / ``prune-int8`` AGP pruning at the float MPO's bytes, values float32 / int8 (one
  scale per matrix) plus the smaller index.

Every row also reports the bytes of its LSTM weights as stored (:mod:`mpolstm.storage`).

Epochs are equal in total: the dense model trains ``dense_epochs``; rows (a), (c)-(f) fine-tune it
for ``finetune_epochs``; row (b) trains ``dense_epochs + finetune_epochs`` from scratch. With
``distill=True`` every fine-tuning row adds a KL loss to the dense model's outputs.

Modules: :mod:`.rows` (the table: row name -> label and recipe), :mod:`.run` (:class:`ProtocolConfig`,
:func:`run_protocol`, :func:`run_staged`), :mod:`.schedule` (MPO bonds and :class:`BondSchedule`),
:mod:`.measure` (parameter counts, latency, the small-dense hidden size), :mod:`.report` (Markdown
table, plots), :mod:`.seeds` (several seeds: mean ± std and the verdict), :mod:`.paper` (the paper's
grid: its layout, Table 2 bonds, Tables 3-5).
"""

from .measure import compressed_params, dense_params, largest_hidden, latencies, recurrent_weight_names
from .report import markdown_table, plot_results
from .rows import ROWS, Row, RowContext, Trained
from .run import ProtocolConfig, StagingError, run_protocol, run_staged, staging_dir, write_results
from .schedule import BondSchedule, mpo_bonds, truncate_bonds
from .seeds import run_seeds, summarize, summary_markdown, verdict

__all__ = [
    "ROWS",
    "Row",
    "RowContext",
    "Trained",
    "ProtocolConfig",
    "StagingError",
    "run_protocol",
    "run_staged",
    "staging_dir",
    "write_results",
    "run_seeds",
    "summarize",
    "summary_markdown",
    "verdict",
    "BondSchedule",
    "mpo_bonds",
    "truncate_bonds",
    "markdown_table",
    "plot_results",
    "compressed_params",
    "dense_params",
    "latencies",
    "largest_hidden",
    "recurrent_weight_names",
]
