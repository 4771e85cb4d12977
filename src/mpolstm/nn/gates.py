"""The recurrent equations, written once: the gates of one step for the cells and every layer's
``step``, and the loop over time of the factorized runtime (TorchScript-compatible, so an exported
graph keeps a dynamic time axis: an ONNX ``Loop``).

``gi`` = W_ih x + b_ih and ``gh`` = W_hh h + b_hh (N, G*H), the gates concatenated in torch's order.
"""

from __future__ import annotations

import functools
from typing import List, Tuple  # TorchScript reads these annotations

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.nn.utils.rnn import PackedSequence

from ..mpo import Halves, halves_matmul
from .sparse import sparse_parts

__all__ = ["NUM_GATES", "cell_update", "factorized_forward", "recurrence"]

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


@functools.cache
def _scripted_recurrence():
    """``gates.recurrence`` compiled by TorchScript (once): traced graphs and ONNX keep its loop."""
    return torch.jit.script(recurrence)


def factorized_forward(rnn, input: Tensor, hx=None):
    """``forward`` of an MPOLSTM / MPOGRU / MPORNN ``rnn`` in the factorized runtime
    (nn.base.set_factorized). Per layer and direction: the input products of all time steps as
    one batched product through the cores, then the loop over time (``recurrence``, TorchScript:
    a dynamic time axis survives tracing and ONNX export) with W_hh^T's merged halves. No dense
    weight is formed. Padded sequences only, no proj_size (both need the dense runtime)."""
    if sparse_parts(rnn):
        raise ValueError(f"{type(rnn).__name__}: the factorized runtime does not run sparse residuals (layout "
                         "'lowrank+sparse'); use the dense runtime (set_factorized(model, False))")
    if isinstance(input, PackedSequence) or rnn.proj_size > 0:
        raise ValueError(f"{type(rnn).__name__}: the factorized runtime runs padded sequences without "
                         "proj_size; a PackedSequence or proj_size > 0 needs the dense runtime")
    if input.dim() not in (2, 3):
        raise ValueError(f"{rnn.mode}: Expected input to be 2D or 3D, got {input.dim()}D tensor instead")
    batched = input.dim() == 3
    x = input if batched else input.unsqueeze(0 if rnn.batch_first else 1)
    rnn._torch_check_input(x, None)
    x = x.transpose(0, 1) if rnn.batch_first else x  # (T, N, F)
    h0, c0 = rnn._initial_state(hx, x.shape[1], batched)
    cache, dirs, run = rnn._eval_cache(), 2 if rnn.bidirectional else 1, _scripted_recurrence()
    hs, cs = [], []
    for layer in range(rnn.num_layers):
        if layer > 0 and rnn.dropout > 0 and rnn.training:
            x = F.dropout(x, rnn.dropout, training=True)
        outs = []
        for d in range(dirs):
            sfx, k = f"_l{layer}" + ("_reverse" if d else ""), layer * dirs + d
            xproj = rnn._project(x.reshape(-1, x.shape[-1]), f"weight_ih{sfx}", cache,
                                  rnn._parameters.get(f"bias_ih{sfx}")).reshape(x.shape[0], x.shape[1], -1)
            b_hh = rnn._parameters.get(f"bias_hh{sfx}")
            out, h, c = run(rnn.mode, xproj.flip(0) if d else xproj, h0[k], h0[k] if c0 is None else c0[k],
                            rnn._halves(f"weight_hh{sfx}", cache), xproj.new_zeros(()) if b_hh is None else b_hh)
            outs.append(out.flip(0) if d else out)
            hs.append(h)
            cs.append(c)
        x = torch.cat(outs, -1) if dirs > 1 else outs[0]
    out = x.transpose(0, 1) if rnn.batch_first else x
    if not batched:
        out = out.squeeze(0 if rnn.batch_first else 1)
    h_n = torch.stack(hs) if batched else torch.stack(hs).squeeze(1)
    if c0 is None:
        return out, h_n
    return out, (h_n, torch.stack(cs) if batched else torch.stack(cs).squeeze(1))
