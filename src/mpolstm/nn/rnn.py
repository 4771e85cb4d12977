"""MPOLSTM, MPOGRU and MPORNN: drop-in torch.nn.LSTM / GRU / RNN whose weight matrices are MPOs.

Per layer and direction, ``weight_ih`` (G*H, I) and ``weight_hh`` (G*H, H) (G = 4 gates for the
LSTM, 3 for the GRU, 1 for the Elman RNN; the gates concatenated along the output in torch's
order) and, for an LSTM with ``proj_size``, ``weight_hr`` (P, H) are each one MPO. Cores are the parameters
``<torch weight name>_cores.<k>``; biases stay dense under torch's names (``bias_ih_l0``...).

Execution:
- ``forward`` rebuilds every weight once per call (``mpo.cores_to_matrix``, which writes (out, in)
  directly), checks its shape (torch's CPU kernel does not) and runs torch's fused kernel
  (``_VF.lstm`` / ``_VF.gru`` / ``_VF.rnn_tanh`` / ``_VF.rnn_relu``) through torch's own ``forward``,
  so the input contract (batch_first, unbatched input, PackedSequence, optional state) and its
  error messages are torch's own. In eval mode, when no gradient w.r.t. the cores is being
  recorded, the rebuilt weights are cached (nn/base.py).
- Under torch.compile the rebuild is compiled and the fused kernel runs outside the graph (``_fused``).
- In the factorized runtime (``nn.base.set_factorized``; no dense weight is formed) and under
  torch.export (torch's ``scan``: one program for every length) ``forward`` is nn/gates.py's ``loop_forward``.
- ``step`` (and the stateful ``stream``) runs one frame at a time: every product takes the planned
  path of the cost model (nn/base.py) and the gates are nn/gates.py's, the same code as the cells.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.rnn import PackedSequence

from ..mpo import MPO
from .base import MPOWeights, check_positive_int, pinned_factors
from .gates import NUM_GATES, cell_update, loop_forward
from .registry import LayerType, register
from .rnn_inputs import recurrent_inputs

__all__ = ["MPOLSTM", "MPOGRU", "MPORNN", "RNNStream"]

FactorSpec = Mapping[str, tuple[Sequence[int], Sequence[int]]]


class _MPORNNBase(MPOWeights):
    """Shared machinery of MPOLSTM, MPOGRU and MPORNN (see the module docstring)."""

    _mode: str
    _torch_class: type[nn.RNNBase]

    # torch's own input/state validation, so shapes are checked with torch's exact messages
    check_input = nn.RNNBase.check_input
    get_expected_hidden_size = nn.RNNBase.get_expected_hidden_size
    check_hidden_size = nn.RNNBase.check_hidden_size

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 device=None, dtype=None, *, bond_dim: int, factors: FactorSpec | None = None,
                 num_cores: int = 4) -> None:
        super().__init__()
        _check_rnn_args(input_size, hidden_size, num_layers, bias, batch_first, dropout, proj_size)
        check_positive_int("bond_dim", bond_dim)
        self.mode = self._mode
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.proj_size = bool(bidirectional), proj_size
        self._start_weights(num_cores)
        shapes = self._layout_names()
        given = pinned_factors(factors, shapes)
        std = 1.0 / math.sqrt(hidden_size)  # torch's U(-std, std) init, variance std^2 / 3
        gate_size = NUM_GATES[self._mode] * hidden_size
        for name in self._flat_weights_names:  # torch's order (w_ih, w_hh, b_ih, b_hh, w_hr per layer)
            if name in shapes:
                self._add_weight(name, shapes[name], bond_dim, given.get(name), std / math.sqrt(3.0), device, dtype)
            else:
                setattr(self, name, nn.Parameter(torch.empty(gate_size, device=device, dtype=dtype)))
                nn.init.uniform_(getattr(self, name), -std, std)
        self._flat_weights: list[Tensor] | None = None  # set only while torch's forward runs

    def _layout_names(self) -> dict[str, tuple[int, int]]:
        """Set torch's parameter names (``_flat_weights_names``, ``_all_weights``); returns the
        MPO weights' torch shapes (out, in)."""
        gate_size = NUM_GATES[self._mode] * self.hidden_size
        real_hidden = self.proj_size if self.proj_size > 0 else self.hidden_size
        directions = 2 if self.bidirectional else 1
        self._flat_weights_names: list[str] = []
        self._all_weights: list[list[str]] = []
        shapes: dict[str, tuple[int, int]] = {}
        for layer in range(self.num_layers):
            layer_in = self.input_size if layer == 0 else real_hidden * directions
            for direction in range(directions):
                sfx = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                shapes[f"weight_ih{sfx}"] = (gate_size, layer_in)
                shapes[f"weight_hh{sfx}"] = (gate_size, real_hidden)
                names = [f"weight_ih{sfx}", f"weight_hh{sfx}"]
                if self.bias:
                    names += [f"bias_ih{sfx}", f"bias_hh{sfx}"]
                if self.proj_size > 0:
                    names.append(f"weight_hr{sfx}")
                    shapes[names[-1]] = (self.proj_size, self.hidden_size)
                self._flat_weights_names += names
                self._all_weights.append(names)
        # step(): per layer of the forward direction, (w_ih, w_hh, b_ih, b_hh, w_hr), None where absent
        self._step_names = [(f"weight_ih_l{k}", f"weight_hh_l{k}", *((f"bias_ih_l{k}", f"bias_hh_l{k}") if self.bias
                             else (None, None)), f"weight_hr_l{k}" if self.proj_size > 0 else None)
                            for k in range(self.num_layers)]
        return shapes

    # -- conversion -----------------------------------------------------------------
    @classmethod
    def from_torch(cls, rnn: nn.RNNBase, max_bond: int | None = None, rel_tol: float | None = None, *,
                   factors: FactorSpec | None = None, num_cores: int = 4, mpos: Mapping[str, MPO] | None = None):
        """Decompose every weight of a trained torch layer of this class's type (``from_lstm``,
        ``from_gru``, ``from_rnn``) by TT-SVD: ``max_bond`` caps the bonds, ``rel_tol=eps``
        guarantees ||W - W_mpo||_F <= eps ||W||_F per weight; with neither it is exact.
        ``mpos={name: MPO of W^T}`` uses already decomposed MPOs for those weights; ``factors``
        pins layouts by weight name. The achieved error per weight is in ``.reports[name].rel_error``;
        the result has the source's mode, dtype and device."""
        if not isinstance(rnn, cls._torch_class):
            torch_name = cls._torch_class.__name__
            raise ValueError(f"{cls.__name__}.from_{torch_name.lower()} expects a torch.nn.{torch_name}, "
                             f"got {type(rnn).__name__}")
        weight = rnn.weight_ih_l0
        layer = cls(**_torch_args(rnn), device=weight.device, dtype=weight.dtype, bond_dim=1,
                    factors=factors, num_cores=num_cores)
        layer._decompose_from({name: getattr(rnn, name) for name in layer._weight_shapes}, max_bond, rel_tol, mpos)
        with torch.no_grad():
            for name in layer._flat_weights_names:
                if name not in layer._weight_shapes:
                    getattr(layer, name).copy_(getattr(rnn, name))
        return layer.train(rnn.training)

    @classmethod
    def mpo_matrices(cls, rnn: nn.RNNBase, num_cores: int = 4) -> dict[str, tuple[Tensor, tuple]]:
        """{weight name: (W^T, default factors)} for every MPO weight (see ``LayerType.matrices``)."""
        with torch.device("meta"):
            layout = cls(**_torch_args(rnn), bond_dim=1, num_cores=num_cores)
        return {name: (getattr(rnn, name).detach().T, layout.factors[name]) for name in layout._weight_shapes}

    def to_torch(self) -> nn.RNNBase:
        """The plain torch layer (``to_lstm``, ``to_gru``, ``to_rnn``) with the rebuilt weights."""
        first = next(self.parameters())
        rnn = self._torch_class(**_torch_args(self), device=first.device, dtype=first.dtype)
        with torch.no_grad():
            for name in self._flat_weights_names:
                source = self._rebuild(name) if name in self._weight_shapes else getattr(self, name)
                getattr(rnn, name).copy_(source)
        return rnn.train(self.training)

    # -- MPO-module protocol (used by compress and io) ---------------------------------
    def _config_args(self) -> dict[str, Any]:
        return _torch_args(self)

    @classmethod
    def _args_from_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        return {k: config[k] for k in _torch_args_names(cls._mode)}

    # -- weights --------------------------------------------------------------------
    def _dense_weights(self, cache: dict | None = None) -> dict[str, Tensor]:
        """Every MPO weight rebuilt once (from the eval cache when it is valid)."""
        cache = self._eval_cache() if cache is None else cache
        if cache is None:
            return {name: self._rebuild(name) for name in self._weight_shapes}
        if "dense" not in cache:
            with torch.no_grad():
                cache["dense"] = {name: self._rebuild(name) for name in self._weight_shapes}
        return cache["dense"]

    def flat_weights(self) -> list[Tensor]:
        """The dense weights and biases in torch's flat order (``_flat_weights_names``)."""
        dense = self._dense_weights()
        return [dense[n] if n in dense else getattr(self, n) for n in self._flat_weights_names]

    @property
    def all_weights(self) -> list[list[Tensor]]:
        """As torch's: per layer and direction, [w_ih, w_hh, (b_ih, b_hh), (w_hr)] (rebuilt)."""
        flat = dict(zip(self._flat_weights_names, self.flat_weights()))
        return [[flat[n] for n in names] for names in self._all_weights]

    def extra_repr(self) -> str:
        bonds = [c.shape[3] for cores in self.mpo_weights().values() for c in list(cores)[:-1]]
        nonlinearity = f", nonlinearity={self.nonlinearity!r}" if self.mode.startswith("RNN_") else ""
        return (nn.RNNBase.extra_repr(self) + nonlinearity + f", max_bond={max(bonds, default=1)}, "
                f"params={self.num_params}, compression={self.compression_ratio:.1f}x")

    # -- full-sequence forward: torch's own, with the rebuilt weights -------------------
    def _update_flat_weights(self) -> None:  # called by torch's forward; ours are set per call
        pass

    def _set_flat_weights(self, weights: list[Tensor] | None) -> None:
        self.__dict__["_flat_weights"] = weights  # plain attribute; skips nn.Module.__setattr__

    def _torch_check_input(self, input: Tensor, batch_sizes: Tensor | None) -> None:
        """torch's check_input (it reads the weight dtype from ``_flat_weights[0]``)."""
        self._set_flat_weights(self._cores("weight_ih_l0")[:1])
        try:
            self.check_input(input, batch_sizes)
        finally:
            self._set_flat_weights(None)

    def forward(self, input, hx=None):
        if self.factorized or torch.compiler.is_exporting():
            return loop_forward(self, input, hx)  # torch.export: one program for every sequence length
        weights = self.flat_weights()  # rebuilt; inside the graph under torch.compile
        if torch.compiler.is_compiling():  # the fused kernel outside the graph (see _fused), as for nn.LSTM
            return torch.compiler.disable(_fused, reason="torch's fused RNN kernel")(self, weights, input, hx)
        return _fused(self, weights, input, hx)

    # -- streaming -----------------------------------------------------------------------
    def stream(self, hx=None) -> "RNNStream":
        """A stateful one-frame-at-a-time runner: ``s = m.stream(); y_t = s(x_t)``."""
        return RNNStream(self, hx)

    def step(self, input: Tensor, hx=None):
        """One time step: ``input`` (N, input_size) or unbatched (input_size,); ``hx`` as for
        ``forward`` (the LSTM's (h, c): (num_layers, N, H_out), (num_layers, N, H); the others' h
        (num_layers, N, H); unbatched without N). Returns (output (N, H_out), new state), equal to
        ``forward`` on a length-1 sequence. Unidirectional layers only."""
        x, batched = self._step_checks(input)
        h, c = self._step_state(hx, x.shape[0], batched)
        cache = self._eval_cache()
        hs, cs = [], []
        for layer, (w_ih, w_hh, b_ih, b_hh, w_hr) in enumerate(self._step_names):
            if layer > 0 and self.dropout > 0 and self.training:
                x = F.dropout(x, self.dropout, training=True)
            gi = self._project(x, w_ih, cache, None if b_ih is None else self._parameters[b_ih])
            gh = self._project(h[layer], w_hh, cache, None if b_hh is None else self._parameters[b_hh])
            x, c_new = cell_update(self.mode, gi, gh, h[layer], h[layer] if c is None else c[layer])
            if w_hr is not None:
                x = self._project(x, w_hr, cache)
            hs.append(x)
            cs.append(c_new)
        join = torch.stack if len(hs) > 1 else (lambda one: one[0].unsqueeze(0))  # a view, not a copy
        state = join(hs) if c is None else (join(hs), join(cs))
        if not batched:
            x = x.squeeze(0)
            state = state.squeeze(1) if c is None else (state[0].squeeze(1), state[1].squeeze(1))
        return x, state

    def _step_state(self, hx, n: int, batched: bool) -> tuple[Tensor, Tensor | None]:
        """The state of ``step`` as batched (h (L, N, H_out), c (L, N, H) or None), zeros without ``hx``."""
        lstm = self.mode == "LSTM"
        out_size = self.proj_size or self.hidden_size
        first = self._cores("weight_ih_l0")[0]
        if hx is None:  # torch.zeros, not first.new_zeros: a trace would keep the core as a constant for it
            like = {"dtype": first.dtype, "device": first.device}
            h = torch.zeros(self.num_layers, n, out_size, **like)
            return h, torch.zeros(self.num_layers, n, self.hidden_size, **like) if lstm else None
        h, c = hx if lstm else (hx, None)
        self._check_step_state(h, (self.num_layers, n, out_size), batched, "hidden[0]" if lstm else "hidden")
        if lstm:
            self._check_step_state(c, (self.num_layers, n, self.hidden_size), batched, "hidden[1]")
        if not batched:
            h, c = h.unsqueeze(1), None if c is None else c.unsqueeze(1)
        return h, c

    def _step_checks(self, input: Tensor) -> tuple[Tensor, bool]:
        if self.bidirectional:
            raise ValueError(f"{type(self).__name__}.step runs one frame at a time and so cannot run "
                             "a bidirectional layer (its reverse direction needs the future)")
        if not isinstance(input, Tensor) or input.dim() not in (1, 2):
            raise ValueError(f"{type(self).__name__}.step expects one frame, (N, {self.input_size}) or "
                             f"({self.input_size},), got {tuple(getattr(input, 'shape', ()))}")
        first = self._modules["weight_ih_l0_cores"]._parameters["0"]
        if input.shape[-1] != self.input_size or input.dtype != first.dtype:  # torch's check, for its message
            self._torch_check_input(input.unsqueeze(0) if input.dim() == 2 else input[None, None], None)
        batched = input.dim() == 2
        return (input if batched else input.unsqueeze(0)), batched

    def _check_step_state(self, state: Tensor, expected: tuple[int, int, int], batched: bool, what: str):
        want = expected if batched else (expected[0], expected[2])
        if tuple(state.shape) != want:
            raise RuntimeError(f"Expected {what} size {want}, got {list(state.shape)}")


def _fused(rnn: _MPORNNBase, weights: list[Tensor], input, hx):
    """torch's own forward of ``rnn``'s class (its fused kernel) with the rebuilt ``weights``; outside
    a torch.compile graph, as for nn.LSTM (traced, it fails in Inductor: docs/architecture.md)."""
    rnn._set_flat_weights(weights)
    try:
        if isinstance(input, PackedSequence):
            # torch's LSTM checks nothing for packed input; check it like torch's GRU does
            rnn.check_input(input.data, input.batch_sizes)
            if hx is not None:
                rnn._check_packed_hidden(input, hx)
        return rnn._torch_class.forward(rnn, input, hx)
    finally:
        rnn._set_flat_weights(None)


def _check_rnn_args(input_size, hidden_size, num_layers, bias, batch_first, dropout, proj_size) -> None:
    """torch.nn.RNNBase's argument checks, with its messages."""
    if not isinstance(dropout, numbers.Number) or not 0 <= dropout <= 1 or isinstance(dropout, bool):
        raise ValueError("dropout should be a number in range [0, 1] representing the probability of "
                         "an element being zeroed")
    if dropout > 0 and num_layers == 1:
        warnings.warn("dropout option adds dropout after all but last recurrent layer, so non-zero "
                      f"dropout expects num_layers greater than 1, but got dropout={dropout} and "
                      f"num_layers={num_layers}", stacklevel=3)
    for arg, value in (("bias", bias), ("batch_first", batch_first)):
        if not isinstance(value, bool):
            raise TypeError(f"{arg} should be of type bool, got: {type(value).__name__}")
    for arg, value in (("input_size", input_size), ("hidden_size", hidden_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{arg} should be of type int, got: {type(value).__name__}")
        if value <= 0:
            raise ValueError(f"{arg} must be greater than zero")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers <= 0:
        raise ValueError("num_layers must be greater than zero")
    if isinstance(proj_size, bool) or not isinstance(proj_size, int) or proj_size < 0:
        raise ValueError("proj_size should be a positive integer or zero to disable projections")
    if proj_size >= hidden_size:
        raise ValueError("proj_size has to be smaller than hidden_size")


def _torch_args_names(mode: str) -> tuple[str, ...]:
    """torch's constructor arguments of the layer of ``mode`` ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")."""
    names = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional")
    return names + (("proj_size",) if mode == "LSTM" else ("nonlinearity",) if mode.startswith("RNN_") else ())


def _torch_args(module) -> dict[str, Any]:
    """The torch constructor arguments of an nn.LSTM/GRU/RNN or an MPOLSTM/MPOGRU/MPORNN."""
    return {name: getattr(module, name) for name in _torch_args_names(module.mode)}


class MPOLSTM(_MPORNNBase):
    """torch.nn.LSTM whose W_ih, W_hh (and W_hr) are Matrix Product Operators.

    Args: torch.nn.LSTM's (``input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
    dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None``), plus
        bond_dim: cap on every internal bond of every weight (clipped to the largest useful value).
        factors: optional ``{weight name: (in_factors, out_factors)}``; other weights get balanced
            factors with ``num_cores`` cores (fewer when a size has too few prime factors).
        num_cores: default number of cores per weight.

    From scratch, every entry of every rebuilt weight has the variance of torch's
    U(-1/sqrt(H), 1/sqrt(H)) init and biases are drawn from it. To compress a trained layer use
    ``MPOLSTM.from_lstm(lstm, max_bond=..., rel_tol=...)``.

    ``forward(input, (h_0, c_0))`` is torch's (same shapes, PackedSequence, unbatched input, errors).
    ``step(x_t, (h, c))`` / ``stream()`` run one frame at a time (unidirectional only).
    ``lstm.weight_ih_l0`` etc. read the rebuilt dense weights.
    """

    _mode, _torch_class = "LSTM", nn.LSTM
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    from_lstm, to_lstm = _MPORNNBase.__dict__["from_torch"], _MPORNNBase.to_torch

    def _check_packed_hidden(self, input: PackedSequence, hx) -> None:
        self.check_forward_args(input.data, hx, input.batch_sizes)

class MPOGRU(_MPORNNBase):
    """torch.nn.GRU whose W_ih and W_hh (gates r, z, n concatenated) are MPOs.

    Args: torch.nn.GRU's (``input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
    dropout=0.0, bidirectional=False, device=None, dtype=None``) plus ``bond_dim``, ``factors``,
    ``num_cores`` as for :class:`MPOLSTM`. ``forward``, ``step``, ``stream``, ``from_gru``,
    ``to_gru`` mirror MPOLSTM's.
    """

    _mode, _torch_class = "GRU", nn.GRU
    check_forward_args = nn.RNNBase.check_forward_args
    permute_hidden = nn.RNNBase.permute_hidden

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None, **mpo_kwargs) -> None:
        if "proj_size" in mpo_kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, device, dtype, **mpo_kwargs)

    from_gru, to_gru = _MPORNNBase.__dict__["from_torch"], _MPORNNBase.to_torch

    def _check_packed_hidden(self, input: PackedSequence, hx) -> None:
        pass  # torch's GRU forward checks packed input itself

class MPORNN(_MPORNNBase):
    """torch.nn.RNN (Elman: h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh), act = tanh or ReLU)
    whose W_ih and W_hh are MPOs.

    Args: torch.nn.RNN's (``input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
    batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None``) plus
    ``bond_dim``, ``factors``, ``num_cores`` as for :class:`MPOLSTM`. ``forward`` runs torch's own
    ``nn.RNN.forward`` (fused ``_VF.rnn_tanh`` / ``_VF.rnn_relu``) with the rebuilt weights;
    ``step``, ``stream``, ``from_rnn``, ``to_rnn`` mirror MPOLSTM's.
    """

    _mode, _torch_class = "RNN_TANH", nn.RNN
    check_forward_args = nn.RNNBase.check_forward_args
    permute_hidden = nn.RNNBase.permute_hidden

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh",
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None, **mpo_kwargs) -> None:
        if "proj_size" in mpo_kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, device, dtype, **mpo_kwargs)
        self.nonlinearity = nonlinearity
        self.mode = "RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU"  # what nn.RNN.forward dispatches on

    from_rnn, to_rnn = _MPORNNBase.__dict__["from_torch"], _MPORNNBase.to_torch

    def _check_packed_hidden(self, input: PackedSequence, hx) -> None:
        pass  # torch's RNN forward checks packed input itself

class RNNStream:
    """Runs an MPOLSTM/MPOGRU/MPORNN one frame at a time, keeping the recurrent state.

    ``s = lstm.stream(); for x_t in frames: y_t = s(x_t)``; ``s.state`` is the current (h, c)
    (or h); ``s.reset()`` starts a new sequence. Wrap in ``torch.no_grad()`` for inference."""

    def __init__(self, module: _MPORNNBase, hx=None) -> None:
        self.module, self.state = module, hx

    def __call__(self, frame: Tensor) -> Tensor:
        output, self.state = self.module.step(frame, self.state)
        return output

    def reset(self, hx=None) -> None:
        self.state = hx


def _recurrent_weights(rnn: nn.RNNBase) -> list[str]:
    return [name for name in rnn._flat_weights_names if name.startswith("weight_")]


_RNN_SIZES = ("input_size", "hidden_size", "num_layers", "bidirectional", "proj_size", "batch_first")
register(LayerType(nn.LSTM, MPOLSTM, MPOLSTM.from_lstm, MPOLSTM.to_lstm, MPOLSTM.mpo_matrices, recurrent_inputs,
                   _RNN_SIZES, "rnn", _recurrent_weights))
register(LayerType(nn.GRU, MPOGRU, MPOGRU.from_gru, MPOGRU.to_gru, MPOGRU.mpo_matrices, recurrent_inputs,
                   _RNN_SIZES, "rnn", _recurrent_weights))
register(LayerType(nn.RNN, MPORNN, MPORNN.from_rnn, MPORNN.to_rnn, MPORNN.mpo_matrices, recurrent_inputs,
                   _RNN_SIZES + ("nonlinearity",), "rnn", _recurrent_weights))
