"""The recurrent equations, written once: the gates of one step for the cells and every layer's
``step``, and the loop over time of the factorized runtime (TorchScript-compatible, so an exported
graph keeps a dynamic time axis: an ONNX ``Loop``).

``gi`` = W_ih x + b_ih and ``gh`` = W_hh h + b_hh (N, G*H), the gates concatenated in torch's order.
"""

from __future__ import annotations

from typing import List, Tuple  # TorchScript reads these annotations

import torch
from torch import Tensor

from .base import Halves, halves_matmul

__all__ = ["NUM_GATES", "cell_update", "recurrence"]

NUM_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def cell_update(mode: str, gi: Tensor, gh: Tensor, h: Tensor, c: Tensor) -> Tuple[Tensor, Tensor]:
    """One step of torch's cell of ``mode`` ("LSTM", "GRU", "RNN_TANH", "RNN_RELU") from the two
    products: returns (h', c'). ``c`` is the LSTM's cell state; the other cells have none: pass h,
    and the c' returned is h' (ignore it)."""
    if mode == "LSTM":
        gates = gi + gh
        hidden = c.shape[-1]
        act = torch.sigmoid(gates).chunk(4, 1)  # one sigmoid over all gates (i, f, g, o): fewer ops
        g = torch.tanh(gates[:, 2 * hidden: 3 * hidden])
        c_new = torch.addcmul(act[1] * c, act[0], g)
        return act[3] * torch.tanh(c_new), c_new
    if mode == "GRU":
        i_r, i_z, i_n = gi.chunk(3, 1)
        h_r, h_z, h_n = gh.chunk(3, 1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        cand = torch.tanh(i_n + r * h_n)
        h_new = cand + z * (h - cand)
    else:
        h_new = torch.tanh(gi + gh) if mode == "RNN_TANH" else torch.relu(gi + gh)
    return h_new, h_new


def recurrence(mode: str, xproj: Tensor, h: Tensor, c: Tensor, hh: Halves, b_hh: Tensor
               ) -> Tuple[Tensor, Tensor, Tensor]:
    """Run one layer and direction over time: ``xproj`` (T, N, G*H) the input products (bias
    included), h (N, H) and c (N, H) the initial state (c is only read by the LSTM: pass h for the
    others), ``hh`` the merged halves of W_hh^T, ``b_hh`` (G*H) its bias (zeros for none). Returns
    (outputs (T, N, H), h_T, c_T). No Optional types: they do not survive the ONNX export."""
    outs: List[Tensor] = []
    for t in range(xproj.shape[0]):
        gh = halves_matmul(h, hh) + b_hh
        h, c = cell_update(mode, xproj[t], gh, h, c)
        outs.append(h)
    return torch.stack(outs), h, c
