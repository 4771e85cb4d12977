"""The gate equations of the recurrent cells, written once for the cells and the layers' ``step``.

``gi`` = W_ih x + b_ih and ``gh`` = W_hh h + b_hh (N, G*H), the gates concatenated in torch's order.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["NUM_GATES", "cell_update"]

NUM_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def cell_update(mode: str, gi: Tensor, gh: Tensor, h: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """One step of torch's cell of ``mode`` ("LSTM", "GRU", "RNN_TANH", "RNN_RELU") from the two
    products: returns (h', c') for the LSTM, (h', None) for the others."""
    if mode == "LSTM":
        gates = gi + gh
        hidden = c.shape[-1]
        i, f, _, o = torch.sigmoid(gates).chunk(4, 1)  # one sigmoid over all gates: fewer ops
        g = torch.tanh(gates[:, 2 * hidden: 3 * hidden])
        c_new = torch.addcmul(f * c, i, g)
        return o * torch.tanh(c_new), c_new
    if mode == "GRU":
        i_r, i_z, i_n = gi.chunk(3, 1)
        h_r, h_z, h_n = gh.chunk(3, 1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        cand = torch.tanh(i_n + r * h_n)
        return cand + z * (h - cand), None
    pre = gi + gh
    return (torch.tanh(pre) if mode == "RNN_TANH" else torch.relu(pre)), None
