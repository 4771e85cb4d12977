"""MPOLSTMCell, MPOGRUCell, MPORNNCell: drop-in torch.nn.LSTMCell / GRUCell / RNNCell whose
``weight_ih`` (G*H, I) and ``weight_hh`` (G*H, H) are each one MPO (G = 4, 3, 1 gates, concatenated
along the output in torch's order). Cores are the parameters ``weight_ih_cores.<k>`` /
``weight_hh_cores.<k>``; the biases stay dense under torch's names (``bias_ih``, ``bias_hh``).

Execution: a cell is called once per time step, often at a few rows (streaming), so each product
``x W^T`` takes the planned path of the cost model (nn/base.py: contraction through the cores, the
cached merged halves in eval mode, or a dense matmul with the rebuilt, cached weight); the gates
are nn/gates.py's, as torch's CPU kernels compute them. The forward contract is torch's: batched
(N, I) and unbatched (I,) input, optional state, and torch's own errors for bad shapes and dtypes
(a bad call is detected here and handed to torch's kernel, which raises its exact message).
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Mapping, Sequence, cast

import torch
from torch import _VF, Tensor, nn

from ..mpo import MPO, default_factors
from .base import MPOWeights, check_positive_int
from .gates import cell_update
from .registry import LayerType, register

__all__ = ["MPOLSTMCell", "MPOGRUCell", "MPORNNCell", "cell_inputs"]

Factors = tuple[tuple[int, ...], tuple[int, ...]]


class _MPOCellBase(MPOWeights):
    """Shared part of the three cells (see the module docstring); ``_mode`` names the gate
    equations (:func:`~mpolstm.nn.gates.cell_update`)."""

    _torch_class: type[nn.RNNCellBase]
    _num_gates: int

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *,
                 bond_dim: int, factors: Mapping[str, tuple[Sequence[int], Sequence[int]]] | None = None,
                 num_cores: int = 4) -> None:
        super().__init__()
        check_positive_int("input_size", input_size)
        check_positive_int("hidden_size", hidden_size)
        if not isinstance(bias, bool):
            raise TypeError(f"bias should be of type bool, got: {type(bias).__name__}")
        self.input_size, self.hidden_size, self.bias = input_size, hidden_size, bias
        gates = self._num_gates * hidden_size
        std = 1.0 / math.sqrt(hidden_size)  # torch's U(-std, std): variance std^2 / 3
        self._init_weights({"weight_ih": (gates, input_size), "weight_hh": (gates, hidden_size)}, bond_dim,
                           factors, num_cores, std / math.sqrt(3.0), device, dtype)
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(gates, device=device, dtype=dtype))
            self.bias_hh = nn.Parameter(torch.empty(gates, device=device, dtype=dtype))
            nn.init.uniform_(self.bias_ih, -std, std)
            nn.init.uniform_(self.bias_hh, -std, std)
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)

    # -- conversion -----------------------------------------------------------------------
    _arg_names: tuple[str, ...] = ("input_size", "hidden_size", "bias")  # torch's constructor arguments (RNNCell: + nonlinearity)

    @classmethod
    def _args_of(cls, cell: nn.Module) -> dict[str, Any]:
        """The torch constructor arguments of ``cell`` (a torch cell or this MPO cell)."""
        return {name: getattr(cell, name) for name in cls._arg_names}

    @classmethod
    def from_torch(cls, cell: nn.RNNCellBase, max_bond: int | None = None, rel_tol: float | None = None, *,
                   factors: Mapping[str, tuple[Sequence[int], Sequence[int]]] | None = None, num_cores: int = 4,
                   mpos: Mapping[str, MPO] | None = None):
        """Decompose both weights of a trained torch cell of this class's type (``from_lstm_cell``,
        ``from_gru_cell``, ``from_rnn_cell``) by TT-SVD (``max_bond`` caps the bonds, ``rel_tol=eps``
        guarantees ||W - W_mpo||_F <= eps ||W||_F per weight; with neither it is exact).
        ``mpos={name: MPO of W^T}`` uses already decomposed MPOs. Errors in ``.reports``; the
        result has the source's mode, dtype and device."""
        if not isinstance(cell, cls._torch_class):
            name = cls._torch_class.__name__
            snake = {"LSTMCell": "lstm_cell", "GRUCell": "gru_cell", "RNNCell": "rnn_cell"}[name]
            raise ValueError(f"{cls.__name__}.from_{snake} expects a torch.nn.{name}, got {type(cell).__name__}")
        weight = cell.weight_ih
        layer = cls(**cls._args_of(cell), device=weight.device, dtype=weight.dtype, bond_dim=1,
                    factors=factors, num_cores=num_cores)
        layer._decompose_from({"weight_ih": cell.weight_ih, "weight_hh": cell.weight_hh}, max_bond, rel_tol, mpos)
        if cell.bias:
            with torch.no_grad():
                layer.bias_ih.copy_(cell.bias_ih)
                layer.bias_hh.copy_(cell.bias_hh)
        return layer.train(cell.training)

    def to_torch(self) -> nn.RNNCellBase:
        """The plain torch cell (``to_lstm_cell``, ...) with the rebuilt weights."""
        first = self._cores("weight_ih")[0]
        cell = self._torch_class(**self._args_of(self), device=first.device, dtype=first.dtype)
        with torch.no_grad():
            cell.weight_ih.copy_(self._rebuild("weight_ih"))
            cell.weight_hh.copy_(self._rebuild("weight_hh"))
            if self.bias:
                cell.bias_ih.copy_(self.bias_ih)
                cell.bias_hh.copy_(self.bias_hh)
        return cell.train(self.training)

    @classmethod
    def mpo_matrices(cls, cell: nn.RNNCellBase, num_cores: int = 4) -> dict[str, tuple[Tensor, Factors]]:
        """{name: (W^T, default factors)} for weight_ih and weight_hh (see ``LayerType.matrices``)."""
        return {name: (getattr(cell, name).detach().T,
                       default_factors(getattr(cell, name).shape[1], getattr(cell, name).shape[0], num_cores))
                for name in ("weight_ih", "weight_hh")}

    # -- MPO-module protocol ---------------------------------------------------------------
    def _config_args(self) -> dict[str, Any]:
        return self._args_of(self)

    @classmethod
    def _args_from_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        return {k: config[k] for k in cls._arg_names}

    def extra_repr(self) -> str:
        return f"{nn.RNNCellBase.extra_repr(cast(Any, self))}, {self._mpo_repr()}"  # torch's, of the same attributes

    # -- forward ------------------------------------------------------------------------------
    def _prepare(self, input: Tensor, hx) -> tuple[Tensor, list[Tensor] | None, bool]:
        """torch's Python-side checks; (2-D input, states as 2-D tensors or None, batched)."""
        name = self._torch_class.__name__
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        states = None
        if hx is not None:
            states = list(hx) if self._num_gates == 4 else [hx]
            for idx, value in enumerate(states):
                if value.dim() not in (1, 2):
                    what = f"hx[{idx}]" if self._num_gates == 4 else "hidden"
                    raise ValueError(f"{name}: Expected {what} to be 1D or 2D, got {value.dim()}D instead")
        batched = input.dim() == 2
        if not batched:
            input = input.unsqueeze(0)
            if states is not None:  # as torch: an LSTM state is taken as (hx[0], hx[1])
                states = [states[0].unsqueeze(0), states[1].unsqueeze(0)] if self._num_gates == 4 else \
                    [states[0].unsqueeze(0)]
        return input, states, batched

    def _is_bad_call(self, input: Tensor, states: list[Tensor]) -> bool:
        """Whether torch's kernel would reject this call (shapes, dtypes, devices, state count)."""
        first = self._cores("weight_ih")[0]
        dtype, device = first.dtype, first.device
        if len(states) != (2 if self._num_gates == 4 else 1):
            return True
        if input.shape[1] != self.input_size or input.dtype != dtype or input.device != device:
            return True
        want = (input.shape[0], self.hidden_size)
        return any(tuple(s.shape) != want or s.dtype != dtype or s.device != device for s in states)

    def _torch_kernel(self, input: Tensor, states: list[Tensor]):
        """torch's fused cell on the rebuilt weights: raises torch's own error for a bad call."""
        weights = (self._rebuild("weight_ih"), self._rebuild("weight_hh"), self.bias_ih, self.bias_hh)
        if self._num_gates == 4:
            return _VF.lstm_cell(input, tuple(states), *weights)
        if self._num_gates == 3:
            return _VF.gru_cell(input, states[0], *weights)
        kernel = _VF.rnn_tanh_cell if self.nonlinearity == "tanh" else _VF.rnn_relu_cell
        return kernel(input, states[0], *weights)

    def forward(self, input: Tensor, hx=None):
        input, states, batched = self._prepare(input, hx)
        if states is None:
            zeros = torch.zeros(input.shape[0], self.hidden_size, dtype=input.dtype, device=input.device)
            states = [zeros, zeros] if self._num_gates == 4 else [zeros]
        if self._is_bad_call(input, states):
            out = self._torch_kernel(input, states)  # raises torch's exact error
        else:
            cache = self._eval_cache()
            gi = self._project(input, "weight_ih", cache, self.bias_ih)
            gh = self._project(states[0], "weight_hh", cache, self.bias_hh)
            h, c = cell_update(self._mode, gi, gh, states[0], states[-1])
            out = (h, c) if self._num_gates == 4 else h
        if batched:
            return out
        return tuple(o.squeeze(0) for o in out) if isinstance(out, tuple) else out.squeeze(0)


class MPOLSTMCell(_MPOCellBase):
    """torch.nn.LSTMCell whose ``weight_ih`` (4H, I) and ``weight_hh`` (4H, H) (gates i, f, g, o)
    are MPOs.

    Args: torch.nn.LSTMCell's (``input_size, hidden_size, bias=True, device=None, dtype=None``), plus
        bond_dim: cap on every internal bond of both weights (clipped to the largest useful value).
        factors: optional ``{"weight_ih" | "weight_hh": (in_factors, out_factors)}``; the others get
            balanced factors with ``num_cores`` cores (fewer when a size has too few prime factors).
        num_cores: default number of cores per weight.

    ``forward(input, (h, c))`` is torch's: input (N, I) or (I,), state optional, returns (h', c').
    From scratch every entry of the rebuilt weights has the variance of torch's
    U(-1/sqrt(H), 1/sqrt(H)) init. To compress a trained cell use ``from_lstm_cell``.
    ``cell.weight_ih`` / ``cell.weight_hh`` read the rebuilt dense weights.
    """

    _torch_class, _num_gates, _mode = nn.LSTMCell, 4, "LSTM"

    from_lstm_cell, to_lstm_cell = _MPOCellBase.__dict__["from_torch"], _MPOCellBase.to_torch


class MPOGRUCell(_MPOCellBase):
    """torch.nn.GRUCell whose ``weight_ih`` (3H, I) and ``weight_hh`` (3H, H) (gates r, z, n) are MPOs.

    Args: torch.nn.GRUCell's (``input_size, hidden_size, bias=True, device=None, dtype=None``) plus
    ``bond_dim``, ``factors``, ``num_cores`` as for :class:`MPOLSTMCell`. ``forward(input, h)``
    returns h' as torch's does; ``from_gru_cell`` / ``to_gru_cell`` convert.
    """

    _torch_class, _num_gates, _mode = nn.GRUCell, 3, "GRU"

    from_gru_cell, to_gru_cell = _MPOCellBase.__dict__["from_torch"], _MPOCellBase.to_torch


class MPORNNCell(_MPOCellBase):
    """torch.nn.RNNCell (h' = act(W_ih x + b_ih + W_hh h + b_hh), act = tanh or ReLU) whose
    ``weight_ih`` (H, I) and ``weight_hh`` (H, H) are MPOs.

    Args: torch.nn.RNNCell's (``input_size, hidden_size, bias=True, nonlinearity="tanh",
    device=None, dtype=None``) plus ``bond_dim``, ``factors``, ``num_cores`` as for
    :class:`MPOLSTMCell`. ``from_rnn_cell`` / ``to_rnn_cell`` convert.
    """

    _torch_class, _num_gates = nn.RNNCell, 1

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh",
                 device=None, dtype=None, **mpo_kwargs) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity: {nonlinearity}")
        super().__init__(input_size, hidden_size, bias, device, dtype, **mpo_kwargs)
        self.nonlinearity = nonlinearity

    from_rnn_cell, to_rnn_cell = _MPOCellBase.__dict__["from_torch"], _MPOCellBase.to_torch

    _arg_names = _MPOCellBase._arg_names + ("nonlinearity",)

    @property
    def _mode(self) -> str:
        return "RNN_TANH" if self.nonlinearity == "tanh" else "RNN_RELU"


# ----------------------------------------------------------------------------- registry


def cell_inputs(cell: nn.Module, args: tuple) -> Iterator[tuple[str, Tensor]]:
    """The registry's ``inputs`` hook of the cells: weight_ih multiplies the input x, weight_hh
    the state h (zeros when the call gives no state), both as (samples, features)."""
    x = args[0]
    hx = args[1] if len(args) > 1 else None
    if isinstance(hx, (tuple, list)):  # LSTMCell: (h, c)
        hx = hx[0]
    x2 = x.unsqueeze(0) if x.dim() == 1 else x
    h = x2.new_zeros(x2.shape[0], cell.hidden_size) if hx is None else hx.reshape(-1, hx.shape[-1])
    yield "weight_ih", x2
    yield "weight_hh", h


def _cell_weights(cell: nn.Module) -> list[str]:
    return ["weight_ih", "weight_hh"]


_CELL_SIZES = ("input_size", "hidden_size", "bias")
register(LayerType(nn.LSTMCell, MPOLSTMCell, MPOLSTMCell.from_lstm_cell, MPOLSTMCell.to_lstm_cell,
                   MPOLSTMCell.mpo_matrices, cell_inputs, _CELL_SIZES, "rnn", _cell_weights))
register(LayerType(nn.GRUCell, MPOGRUCell, MPOGRUCell.from_gru_cell, MPOGRUCell.to_gru_cell,
                   MPOGRUCell.mpo_matrices, cell_inputs, _CELL_SIZES, "rnn", _cell_weights))
register(LayerType(nn.RNNCell, MPORNNCell, MPORNNCell.from_rnn_cell, MPORNNCell.to_rnn_cell,
                   MPORNNCell.mpo_matrices, cell_inputs, _CELL_SIZES + ("nonlinearity",), "rnn", _cell_weights))
