"""The paper's grid (Gao et al., arXiv 2012.11943): its MPO-LSTM layout, Table 2 bonds, Tables 3-5.

The paper's LSTM has one layer, input 256 and hidden 256. Each of its two weight matrices (W: the
four gates' input-to-hidden blocks, U: hidden-to-hidden) is ONE MPO with factors (8, 2, 2, 8) x
(8, 2, 2, 8) whose first core also carries the gate index (its Eq. 10-12): core 1 is
(1, 8, 4 * 8, d), cores 2-3 (d, 2, 2, d), core 4 (d, 8, 8, 1), all bonds d. In mpolstm's
convention (an MPO of W^T, output index gate * H + h) that is simply out factors (4 * 8, 2, 2, 8):
the gate is the most significant output digit, so it sits in the first core. Entries per matrix:
sum_k i_k j_k d_{k-1} d_k + 3 i_1 j_1 d_0 d_1 = 320 d + 8 d^2 (the paper's rho times 4 * 256^2).

Inputs other than 256 (sequential MNIST: 28) keep the hidden side and split the input into four
ascending factors (28 -> (1, 2, 2, 7)); the bonds are then capped by the matrix's ranks and the
achieved rate is reported next to the paper's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...mpo import decompose, factorize
from ...nn import MPOLSTM

__all__ = ["PAPER_BONDS", "PAPER_TABLES", "PAPER_HIDDEN", "PAPER_ROWS", "paper_factors", "paper_formula_entries",
           "paper_lstm", "grid_markdown"]

PAPER_HIDDEN = 256
PAPER_HIDDEN_FACTORS = (8, 2, 2, 8)

PAPER_BONDS: dict[int, tuple[int, int]] = {5: (64, 64), 10: (41, 40), 15: (32, 29), 20: (26, 24), 25: (22, 20),
                                           50: (13, 13), 75: (9, 9), 100: (7, 7)}
"""Table 2: compression rate -> (d_W, d_U)."""

PAPER_TABLES: dict[str, dict[Any, tuple[float, float]]] = {
    "IMDB acc. %": {"dense": (88.30, 88.30), 5: (87.02, 88.33), 10: (86.57, 88.52), 15: (87.42, 88.14),
                    20: (86.59, 88.35), 25: (86.76, 88.51), 50: (87.68, 88.44), 75: (87.21, 88.57),
                    100: (87.11, 88.64)},
    "SST-5 acc. %": {"dense": (44.10, 44.10), 5: (41.16, 43.09), 10: (41.59, 41.60), 15: (41.67, 42.14),
                     20: (41.38, 41.59), 25: (41.45, 42.05), 50: (41.29, 41.77), 75: (41.15, 41.95),
                     100: (41.09, 43.05)},
    "VBD PESQ": {"dense": (2.50, 2.50), 5: (2.44, 2.45), 10: (2.42, 2.46), 15: (2.37, 2.39), 20: (2.35, 2.38),
                 25: (2.31, 2.41), 50: (2.25, 2.38), 75: (2.28, 2.35), 100: (2.33, 2.33)},
}
"""Tables 3-5: rate (or "dense") -> (pruning, MPO), single runs."""

PAPER_ROWS = ("dense", "mpo-decomp", "mpo-scratch", "mpo-central", "prune-agp", "prune-oneshot", "prune-bytes", "prune-int8",
              "small-dense", "lowrank-decomp", "lowrank-scratch", "int8")
"""Rows that can run on the paper's grid (the others build their own MPO layout)."""


def paper_factors(input_size: int, gates: int = 4) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """(in, out) factors of the paper's W^T and U^T for a one-layer LSTM of hidden 256."""
    hidden_out = (gates * PAPER_HIDDEN_FACTORS[0], *PAPER_HIDDEN_FACTORS[1:])
    inputs = PAPER_HIDDEN_FACTORS if input_size == PAPER_HIDDEN else tuple(sorted(factorize(input_size, 4)))
    return {"weight_ih_l0": (inputs, hidden_out), "weight_hh_l0": (PAPER_HIDDEN_FACTORS, hidden_out)}


def paper_formula_entries(in_factors: tuple[int, ...], gate_factors: tuple[int, ...], bond: int) -> int:
    """The paper's count for one gate-sharing MPO (numerator of its rho): sum_k i_k j_k d_{k-1} d_k
    + 3 i_1 j_1 d_0 d_1, with ``gate_factors`` the factors of ONE gate block and every internal
    bond ``bond`` (d_0 = d_n = 1)."""
    bonds = (1, *[bond] * (len(in_factors) - 1), 1)
    terms = [i * j * bonds[k] * bonds[k + 1] for k, (i, j) in enumerate(zip(in_factors, gate_factors))]
    return sum(terms) + 3 * terms[0]


@torch.no_grad()
def paper_lstm(lstm: nn.LSTM, rate: int) -> MPOLSTM:
    """The paper's MPO-LSTM for ``lstm`` (one layer, hidden 256) at a Table 2 ``rate``: each weight
    TT-SVD-truncated to the layout of :func:`paper_factors` with bonds (d_W, d_U) (capped by the
    matrix's ranks where the input is not 256)."""
    if rate not in PAPER_BONDS:
        raise ValueError(f"rate {rate!r} is not in the paper's Table 2; expected one of {sorted(PAPER_BONDS)}")
    if not isinstance(lstm, nn.LSTM) or lstm.num_layers != 1 or lstm.hidden_size != PAPER_HIDDEN \
            or lstm.bidirectional or lstm.proj_size:
        raise ValueError(f"the paper's layout needs a one-layer unidirectional nn.LSTM of hidden size {PAPER_HIDDEN}, "
                         f"got {lstm}")
    factors = paper_factors(lstm.input_size)
    mpos = {name: decompose(getattr(lstm, name).T, *factors[name], max_bond=bond)
            for name, bond in zip(("weight_ih_l0", "weight_hh_l0"), PAPER_BONDS[rate])}
    return MPOLSTM.from_lstm(lstm, factors=factors, mpos=mpos)


def _pesq_or_metric(entry: dict[str, Any], metric: str) -> float:
    return entry.get("pesq", entry[metric] * (100 if metric == "accuracy" else 1))


def grid_markdown(document: dict[str, Any], mpo_row: str = "mpo-scratch", pruning_row: str = "prune-agp") -> str:
    """Our grid beside the paper's Tables 3-5 as differences MPO - pruning per rate (absolute
    numbers differ by data set): accuracy in % for classification, PESQ for speech."""
    metric = document["metric"]
    pesq = any("pesq" in r for r in document["rows"])
    sign = 1.0 if pesq or document["higher_is_better"] else -1.0
    score = "PESQ" if pesq else f"{metric} {'%' if metric == 'accuracy' else ''}"
    by = {(r["row"], r["target_ratio"]): r for r in document["rows"]}
    dense = by.get(("dense", None))
    digits = 3 if pesq or metric != "accuracy" else 1
    lines = [f"Task `{document['task']}`, the paper's layout and Table 2 bonds; {score.strip()} of {mpo_row} and "
             f"{pruning_row}; paper columns: MPO - pruning from its Tables 3-5.", "",
             f"| rate | d_W | d_U | params | achieved | {mpo_row} | {pruning_row} | ours MPO - pruning | "
             + " | ".join(f"paper {name}" for name in PAPER_TABLES) + " |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(PAPER_TABLES)]
    if dense is not None:
        lines.append(f"| dense | - | - | {dense['params']:,} | 1.0x | {_pesq_or_metric(dense, metric):.{digits}f} | "
                     f"{_pesq_or_metric(dense, metric):.{digits}f} | - |" + " - |" * len(PAPER_TABLES))
    for rate in sorted(PAPER_BONDS):
        mpo, pruned = by.get((mpo_row, float(rate))), by.get((pruning_row, float(rate)))
        if mpo is None or pruned is None:
            continue
        ours = sign * (_pesq_or_metric(mpo, metric) - _pesq_or_metric(pruned, metric))
        paper = [table[rate][1] - table[rate][0] for table in PAPER_TABLES.values()]
        d_w, d_u = PAPER_BONDS[rate]
        lines.append(f"| {rate} | {d_w} | {d_u} | {mpo['params']:,} | {mpo['ratio']:.1f}x | "
                     f"{_pesq_or_metric(mpo, metric):.{digits}f} | {_pesq_or_metric(pruned, metric):.{digits}f} | "
                     f"{ours:+.{digits}f} | "
                     + " | ".join(f"{p:+.2f}" for p in paper) + " |")
    lines += ["", "Positive differences favour MPO (ours: signed so that better is positive)."]
    return "\n".join(lines) + "\n"

