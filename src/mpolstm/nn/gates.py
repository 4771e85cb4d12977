"""The recurrent equations, written once: the gates of one step for the cells and every layer's
``step``, and the loop over time of the factorized runtime and of torch.export: TorchScript-compatible
(an exported graph keeps a dynamic time axis: an ONNX ``Loop``), or torch's ``scan`` under
torch.export (one program for every sequence length).

``gi`` = W_ih x + b_ih and ``gh`` = W_hh h + b_hh (N, G*H), the gates concatenated in torch's order.
"""

from __future__ import annotations

import functools
from typing import Callable, List, Tuple  # TorchScript reads these annotations

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.nn.utils.rnn import PackedSequence

from ..mpo import Halves, halves_matmul
from .sparse import sparse_operand

__all__ = ["NUM_GATES", "cell_update", "loop_forward", "recurrence", "scan_recurrence"]

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


def recurrence(mode: str, xproj: Tensor, h: Tensor, c: Tensor, hh: Halves, b_hh: Tensor, p_hh: List[Tensor]
               ) -> Tuple[Tensor, Tensor, Tensor]:
    """Run one layer and direction over time: ``xproj`` (T, N, G*H) the input products (bias
    included), h (N, H) and c (N, H) the initial state (c is only read by the LSTM: pass h for the
    others), ``hh`` the merged halves of W_hh^T, ``b_hh`` (G*H) its bias (zeros for none), ``p_hh``
    W_hh's sparse part P (G*H, H) (``sparse.sparse_operand``) or nothing. Returns (outputs
    (T, N, H), h_T, c_T). No Optional types: they do not survive the ONNX export."""
    outs: List[Tensor] = []
    for t in range(xproj.shape[0]):
        gh = halves_matmul(h, hh) + b_hh
        for p in p_hh:
            gh = gh + torch.mm(p, h.t()).t()
        h, c = cell_update(mode, xproj[t], gh, h, c)
        outs.append(h)
    return torch.stack(outs), h, c


@functools.cache
def _scripted_recurrence():
    """``gates.recurrence`` compiled by TorchScript (once): traced graphs and ONNX keep its loop."""
    return torch.jit.script(recurrence)


Product = Tuple[Callable[..., Tensor], Tuple[Tensor, ...]]  # (f, tensors): h -> f(h, *tensors)


def scan_recurrence(mode: str, xproj: Tensor, h: Tensor, c: Tensor, recurrent: Product,
                    projection: Product | None = None) -> Tuple[Tensor, Tensor, Tensor]:
    """``recurrence`` as torch's higher-order ``scan`` op: one exported graph for every sequence
    length. ``recurrent`` gives W_hh h + b_hh, ``projection`` W_hr h (an LSTM's proj_size) or None,
    each as (f, tensors) with the tensors passed to the loop body as its inputs (``scan_op`` directly:
    ``scan()`` would re-trace closed-over tensors with Dynamo, whose fresh symbolic sizes can
    coincide with the dynamic length and specialize it). Returns (outputs (T, N, H_out), h_T, c_T);
    c_T is h_T but for the LSTM."""
    from torch._higher_order_ops.scan import scan_op

    lstm = mode == "LSTM"
    (hh, hh_args), (hr, hr_args) = recurrent, projection or (None, ())
    carried = 2 if lstm else 1

    def body(*args: Tensor) -> List[Tensor]:
        h_prev, gi, weights = args[0], args[carried], args[carried + 1:]
        h_new, c_new = cell_update(mode, gi, hh(h_prev, *weights[:len(hh_args)]), h_prev, args[carried - 1])
        if hr is not None:
            h_new = hr(h_new, *weights[len(hh_args):])
        return [h_new, c_new, h_new.clone()] if lstm else [h_new, h_new.clone()]  # outputs may not alias

    out = scan_op(body, [h, c][:carried], [xproj], (*hh_args, *hr_args))
    return out[carried], out[0], out[carried - 1]


def _loop_product(rnn, name: str, cache: dict | None, bias: Tensor | None) -> Product:
    """h W^T (+ bias) inside the loop over time as (f, tensors), W prepared once before it: the
    merged halves and a sparse part (factorized runtime) or the rebuilt weight."""
    extra = () if bias is None else (bias,)
    if rnn.factorized:
        left, right, *dims = rnn._halves(name, cache)
        p = sparse_operand(rnn, name, cache)
        sparse = () if p is None else (p,)

        def through_halves(h: Tensor, left: Tensor, right: Tensor, *rest: Tensor) -> Tensor:
            out = halves_matmul(h, (left, right, *dims))
            if sparse:
                out = out + torch.mm(rest[0], h.t()).t()
            return out + rest[-1] if len(rest) > len(sparse) else out

        return through_halves, (left, right, *sparse, *extra)
    return (lambda h, weight, *b: F.linear(h, weight, *b)), (rnn._dense(name, cache), *extra)


def _check_loop_input(rnn, input) -> None:
    name = type(rnn).__name__
    if rnn.factorized and (isinstance(input, PackedSequence) or rnn.proj_size > 0):
        raise ValueError(f"{name}: the factorized runtime runs padded sequences without "
                         "proj_size; a PackedSequence or proj_size > 0 needs the dense runtime")
    if isinstance(input, PackedSequence):
        raise ValueError(f"{name}: torch.export runs padded sequences (a PackedSequence's batch sizes are "
                         "data, not shapes); export it with a padded (T, N, F) batch")
    if input.dim() not in (2, 3):
        raise ValueError(f"{rnn.mode}: Expected input to be 2D or 3D, got {input.dim()}D tensor instead")


def loop_forward(rnn, input: Tensor, hx=None):
    """``forward`` of an MPOLSTM / MPOGRU / MPORNN ``rnn`` as an explicit loop over time: that of the
    factorized runtime (nn.base.set_factorized: every product through the cores or their merged
    halves, no dense weight formed) and of torch.export (one program for every sequence length).
    Per layer and direction: the input products of all time steps as one batched product, then the
    loop over time with W_hh: ``recurrence`` compiled by TorchScript (a dynamic time axis survives
    tracing and ONNX export as a ``Loop``; torch.compile runs it outside its graph) or, under
    torch.export, ``scan_recurrence``. A sparse part (layout "lowrank+sparse") multiplies as
    ``sparse.sparse_operand`` says. Padded sequences only; the factorized runtime does not run proj_size."""
    _check_loop_input(rnn, input)
    batched = input.dim() == 3
    x = input if batched else input.unsqueeze(0 if rnn.batch_first else 1)
    rnn._torch_check_input(x, None)
    x = x.transpose(0, 1) if rnn.batch_first else x  # (T, N, F)
    h0, c0 = _initial_state(rnn, hx, x.shape[1], batched)
    cache, dirs = rnn._eval_cache(), 2 if rnn.bidirectional else 1
    hs, cs = [], []
    for layer in range(rnn.num_layers):
        if layer > 0 and rnn.dropout > 0 and rnn.training:
            x = F.dropout(x, rnn.dropout, training=True)
        outs = []
        for d in range(dirs):
            sfx, k = f"_l{layer}" + ("_reverse" if d else ""), layer * dirs + d
            xproj = rnn._project(x.reshape(-1, x.shape[-1]), f"weight_ih{sfx}", cache,
                                  rnn._parameters.get(f"bias_ih{sfx}")).reshape(x.shape[0], x.shape[1], -1)
            out, h, c = _run_direction(rnn, sfx, cache, xproj.flip(0) if d else xproj, h0[k],
                                       h0[k] if c0 is None else c0[k])
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


def _initial_state(rnn, hx, n: int, batched: bool) -> Tuple[Tensor, Tensor | None]:
    """(h_0 (num_layers * directions, N, H_out), c_0 (..., H) or None): zeros, or ``hx`` checked as torch does."""
    shape = (rnn.num_layers * (2 if rnn.bidirectional else 1), n, rnn.hidden_size)
    h_shape = (*shape[:2], rnn.proj_size or rnn.hidden_size)
    first = rnn._cores("weight_ih_l0")[0]
    if hx is None:  # torch.zeros, not first.new_zeros: a trace would keep the core as a constant for it
        like = {"dtype": first.dtype, "device": first.device}
        return torch.zeros(h_shape, **like), torch.zeros(shape, **like) if rnn.mode == "LSTM" else None
    h, c = hx if rnn.mode == "LSTM" else (hx, None)
    if not batched:
        h, c = h.unsqueeze(1), None if c is None else c.unsqueeze(1)
    rnn.check_hidden_size(h, h_shape, "Expected hidden[0] size {}, got {}" if c is not None else
                          "Expected hidden size {}, got {}")
    if c is not None:
        rnn.check_hidden_size(c, shape, "Expected hidden[1] size {}, got {}")
    return h, c


def _run_direction(rnn, sfx: str, cache: dict | None, xproj: Tensor, h: Tensor, c: Tensor
                   ) -> Tuple[Tensor, Tensor, Tensor]:
    """One layer and direction over time from its input products (see ``loop_forward``)."""
    b_hh = rnn._parameters.get(f"bias_hh{sfx}")
    if torch.compiler.is_exporting():
        projection = _loop_product(rnn, f"weight_hr{sfx}", cache, None) if rnn.proj_size > 0 else None
        return scan_recurrence(rnn.mode, xproj, h, c, _loop_product(rnn, f"weight_hh{sfx}", cache, b_hh), projection)
    p_hh = sparse_operand(rnn, f"weight_hh{sfx}", cache)
    args = (rnn.mode, xproj, h, c, rnn._halves(f"weight_hh{sfx}", cache), xproj.new_zeros(()) if b_hh is None else b_hh,
            [] if p_hh is None else [p_hh.to(xproj.dtype)])
    if torch.compiler.is_compiling():  # outside the graph, as torch's fused RNN kernels (Inductor fails on scan here)
        return torch.compiler.disable(_run_scripted, reason="the factorized runtime's TorchScript loop")(*args)
    return _run_scripted(*args)


def _run_scripted(*args) -> Tuple[Tensor, Tensor, Tensor]:
    return _scripted_recurrence()(*args)
