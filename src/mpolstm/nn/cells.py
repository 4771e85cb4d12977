"""MPOLSTMCell, MPOGRUCell, MPORNNCell: drop-in torch.nn.LSTMCell / GRUCell / RNNCell whose
``weight_ih`` (G*H, I) and ``weight_hh`` (G*H, H) are each one MPO (G = 4, 3, 1 gates, concatenated
along the output in torch's order). Cores are the parameters ``weight_ih_cores.<k>`` /
``weight_hh_cores.<k>``; the biases stay dense under torch's names (``bias_ih``, ``bias_hh``).

Execution: a cell is called once per time step, often at a few rows (streaming), so each product
``x W^T`` goes through the cost model (``mpo.matmul_cost``): a contraction with the cores (the few
rows case), a contraction with the chain merged into two halves (eval mode only, cached: half the
op count, the fastest at one row) or a dense matmul with the rebuilt weight (many rows; the weight
is cached in eval mode). The gates are then computed as torch's CPU kernels do. The forward
contract is torch's: batched (N, I) and unbatched (I,) input, optional state, and torch's own
errors for bad shapes and dtypes (a bad call is detected here and handed to torch's kernel,
which raises its exact message).

The eval-mode cache is keyed on the identity, ``_version`` counter and storage of every core
(an optimizer step, ``load_state_dict``, an in-place edit, ``.to()``, ``functional_call``
invalidate it; ``train()`` drops it). :class:`MPOWeights`, the machinery shared with the
convolutions (nn/conv.py), lives here.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import _VF, Tensor, nn
from torch.nn import functional as F

from .. import mpo as mpo_math
from ..mpo import MPO, TruncationReport
from .cached import CachedCores
from .linear import init_cores_, resolve_factors
from .registry import LayerType, register
from .rnn import _default_factors, _merged_halves
from .sparse import add_sparse_product, load_sparse_config, sparse_config, sparse_params, with_sparse

__all__ = ["MPOWeights", "MPOLSTMCell", "MPOGRUCell", "MPORNNCell", "cell_inputs"]

Factors = tuple[tuple[int, ...], tuple[int, ...]]


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _prepare_halves(cores: Sequence[Tensor]) -> tuple:
    """The chain merged into two halves L (I_L, J_L, D) and R (D, I_R, J_R), stored as the two
    contiguous matrices :func:`_halves_matmul` multiplies by (eval cache: built once)."""
    left, right = _merged_halves(cores)
    _, il, jl, d = left.shape
    _, ir, jr, _ = right.shape
    return (left[0].reshape(il, jl * d).T.contiguous(), right[..., 0].reshape(d * ir, jr).contiguous(),
            il, ir, jl, jr, d)


def _halves_matmul(x: Tensor, prepared: tuple) -> Tensor:
    """x (N, I_L I_R) @ W with W[(a, b), (c, e)] = sum_d L[a, c, d] R[d, b, e]: two matmuls,
    (J_L D, I_L) x (N, I_L, I_R) then (N J_L, D I_R) x (D I_R, J_R); no Python planning per call
    (the one-row streaming path)."""
    lt, r, il, ir, jl, jr, d = prepared
    n = x.shape[0]
    mid = torch.matmul(lt, x.reshape(n, il, ir))  # (N, J_L * D, I_R)
    return (mid.reshape(n * jl, d * ir) @ r).reshape(n, jl * jr)


class MPOWeights(CachedCores):
    """Machinery of an MPO module whose torch weights (named in ``_weight_shapes``, each viewed
    as a matrix (out, in)) are MPOs of W^T: cores ``<name>_cores``, rebuild, the eval-mode
    cache, products through the cost model, and the protocol's ``mpo_weights`` / ``reports`` /
    config parts. Subclasses call :meth:`_init_weights` in their constructor."""

    _weight_shapes: dict[str, tuple[int, int]]

    def _init_weights(self, shapes: Mapping[str, tuple[int, int]], bond_dim: int,
                      factors: Mapping[str, tuple[Sequence[int], Sequence[int]]] | None, num_cores: int,
                      std: float, device=None, dtype=None) -> None:
        """Create the cores of every weight (shape (out, in) each), entries of the rebuilt
        weights with standard deviation ``std``; ``factors`` pins layouts by weight name."""
        _check_positive_int("bond_dim", bond_dim)
        _check_positive_int("num_cores", num_cores)
        self.num_cores = num_cores
        self._weight_shapes = dict(shapes)
        given = dict(factors or {})
        unknown = sorted(set(given) - set(shapes))
        if unknown:
            raise ValueError(f"factors given for unknown weights {unknown}; the weights are {list(shapes)}")
        for name, (out_dim, in_dim) in shapes.items():
            if name in given:
                in_f, out_f = given[name]
                n = len(tuple(in_f if in_f is not None else out_f if out_f is not None else ())) or num_cores
                in_f, out_f = resolve_factors(in_dim, out_dim, in_f, out_f, n)
            else:
                in_f, out_f = _default_factors(in_dim, out_dim, num_cores)
            bonds = (1, *mpo_math.capped_bond_dims(in_f, out_f, bond_dim), 1)
            cores = [torch.empty(bonds[k], i, j, bonds[k + 1], device=device, dtype=dtype)
                     for k, (i, j) in enumerate(zip(in_f, out_f))]
            init_cores_(cores, std)
            setattr(self, f"{name}_cores", nn.ParameterList(nn.Parameter(c) for c in cores))
        self.reports: dict[str, TruncationReport] = {}
        self._cache: tuple[tuple, list[Tensor], dict[str, Any]] | None = None
        self._plans: dict[tuple, tuple] = {}  # (weight, rows, cached) -> (core shapes, path)

    # -- MPO-module protocol ------------------------------------------------------------
    def _weights_config(self) -> dict[str, dict[str, list[int]]]:
        return {name: {"in_factors": list(in_f), "out_factors": list(out_f),
                       "bond_dims": list(mpo_math.bond_dims(self.mpo_weights()[name]))}
                for name, (in_f, out_f) in self.factors.items()}

    def _load_weights_config(self, weights: Mapping[str, Any], std: float) -> None:
        """Replace every weight's cores by fresh ones of exactly the configured shapes."""
        if not isinstance(weights, Mapping) or set(weights) != set(self._weight_shapes):
            got = sorted(weights) if isinstance(weights, Mapping) else weights
            raise ValueError(f"config has weights {got}, expected {sorted(self._weight_shapes)}")
        for name, spec in weights.items():
            in_f, out_f = tuple(spec["in_factors"]), tuple(spec["out_factors"])
            if len(in_f) != len(out_f) or not in_f:
                raise ValueError(f"{name}: in_factors {in_f} and out_factors {out_f} differ in length")
            bonds = (1, *[int(b) for b in spec["bond_dims"]], 1)
            if len(bonds) != len(in_f) + 1:
                raise ValueError(f"{name}: bond_dims {spec['bond_dims']} must have {len(in_f) - 1} "
                                 f"entries for {len(in_f)} cores")
            cores = [torch.empty(bonds[k], int(i), int(j), bonds[k + 1]) for k, (i, j) in enumerate(zip(in_f, out_f))]
            init_cores_(cores, std)
            self._set_mpo(name, MPO(cores))

    def _decompose_from(self, dense: Mapping[str, Tensor], max_bond, rel_tol,
                        mpos: Mapping[str, MPO] | None) -> None:
        """Set every weight from ``dense[name]`` (out, in) by TT-SVD in this module's layout, or
        from the ready MPO of W^T in ``mpos[name]``."""
        given = dict(mpos or {})
        unknown = sorted(set(given) - set(self._weight_shapes))
        if unknown:
            raise ValueError(f"mpos given for unknown weights {unknown}; the weights are {list(self._weight_shapes)}")
        layout = self.factors
        for name, (out_dim, in_dim) in self._weight_shapes.items():
            if name in given:
                decomposed = given[name]
                if decomposed.shape != (in_dim, out_dim):
                    raise ValueError(f"mpos[{name!r}] has shape {decomposed.shape}, expected "
                                     f"{(in_dim, out_dim)} (the transposed weight)")
            else:
                with torch.no_grad():
                    decomposed = mpo_math.decompose(dense[name].detach().reshape(out_dim, in_dim).T, *layout[name],
                                                    max_bond=max_bond, rel_tol=rel_tol)
            self._set_mpo(name, decomposed)

    def _set_mpo(self, name: str, decomposed: MPO) -> None:
        """Replace the cores of weight ``name`` by those of ``decomposed`` (an MPO of W^T)."""
        out_dim, in_dim = self._weight_shapes[name]
        if decomposed.shape != (in_dim, out_dim):
            raise ValueError(f"an MPO of shape {decomposed.shape} cannot be {name} (expects "
                             f"{(in_dim, out_dim)}, the transposed weight)")
        setattr(self, f"{name}_cores",
                nn.ParameterList(nn.Parameter(c.detach().contiguous()) for c in decomposed.cores))
        if decomposed.report is not None:
            self.reports[name] = decomposed.report
        else:
            self.reports.pop(name, None)
        self._cache = None

    # -- weights ------------------------------------------------------------------------
    def _cores(self, name: str) -> list[Tensor]:
        return list(self._modules[f"{name}_cores"]._parameters.values())

    def _core_params(self) -> list[Tensor]:
        return [p for name in self._weight_shapes for p in self._cores(name)]

    def _rebuild(self, name: str) -> Tensor:
        """The dense matrix of weight ``name`` (out, in) from its cores, differentiable; shape-checked."""
        weight = mpo_math.cores_to_matrix(self._cores(name), transpose=True)
        if tuple(weight.shape) != self._weight_shapes[name]:
            raise RuntimeError(f"{type(self).__name__}: cores of {name} rebuild to shape "
                               f"{tuple(weight.shape)}, expected {self._weight_shapes[name]}")
        return with_sparse(self, name, weight)

    def _eval_cache(self) -> dict[str, Any] | None:
        """The eval-mode cache ("dense": rebuilt weights, "halves": merged half-chains), None
        when caching is not allowed (training, or a graph to the cores is being recorded). It is
        emptied whenever a core changes identity, version or storage, or inference/autocast mode
        changes."""
        if self.training:
            return None
        params = self._core_params() + sparse_params(self)
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return None
        key = (torch.is_inference_mode_enabled(), torch._C._is_any_autocast_enabled(),
               *[(id(p), p._version, p.data_ptr()) for p in params])
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, params, {})  # params pin the ids in the key
        return self._cache[2]

    def _dense(self, name: str, cache: dict[str, Any] | None) -> Tensor:
        """Weight ``name`` rebuilt (from the eval cache when there is one)."""
        if cache is None:
            return self._rebuild(name)
        dense = cache.setdefault("dense", {})
        if name not in dense:
            with torch.no_grad():
                dense[name] = self._rebuild(name)
        return dense[name]

    def _plan(self, name: str, rows: int, cached: bool) -> str:
        """The cost model's path for ``rows`` rows times weight ``name``: "cores", "halves" (the
        eval cache's merged halves) or "dense"; memoised per weight, row count and core shapes."""
        cores = self._cores(name)
        key = (name, rows, cached)
        shapes = (cores[0].dtype, *[c.shape for c in cores])
        plan = self._plans.get(key)
        if plan is None or plan[0] != shapes:
            cost = mpo_math.matmul_cost(rows, cores, weight_cached=cached)
            options = {"cores": cost["cores"], "dense": cost["rebuild"]}
            if cached and len(cores) > 2:
                with torch.no_grad():
                    options["halves"] = mpo_math.matmul_cost(rows, _merged_halves(cores))["cores"]
            plan = self._plans[key] = (shapes, min(options, key=options.get))
        return plan[1]

    def _project(self, x: Tensor, name: str, cache: dict[str, Any] | None, bias: Tensor | None = None) -> Tensor:
        """x (N, in) @ W^T (+ bias) by the cheapest of the core contraction, the merged-halves
        contraction (eval cache only) and a dense matmul, per ``mpo.matmul_cost``. In eval mode the
        choice and the operands live in the cache (emptied when a core changes), so a streaming
        step does no planning."""
        rows = int(x.shape[0])  # a plain int also while tracing (the plan is a Python decision)
        if cache is None:
            path = self._plan(name, rows, False)
        else:
            plans = cache.setdefault("plans", {})
            path = plans.get((name, rows))
            if path is None:
                path = plans[(name, rows)] = self._plan(name, rows, True)
        if path == "dense":
            return F.linear(x, self._dense(name, cache), bias)
        if path == "halves":
            prepared = cache.setdefault("halves", {}).get(name)
            if prepared is None:
                with torch.no_grad():
                    prepared = cache["halves"][name] = _prepare_halves(self._cores(name))
            out = _halves_matmul(x, prepared)
        else:
            out = mpo_math.mpo_matmul(x, self._cores(name), strategy="cores")
        out = add_sparse_product(self, name, x, out)
        return out if bias is None else out + bias

    def clear_cache(self) -> None:
        """Drop the cached weights of eval mode."""
        self._cache = None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # torch's weight names read the rebuilt dense weight (read-only: edit the cores)
            if name in self.__dict__.get("_weight_shapes", {}):
                return self._torch_weight(name)
            raise

    def _torch_weight(self, name: str) -> Tensor:
        """Weight ``name`` in torch's shape (the rebuilt matrix here; conv reshapes it)."""
        return self._rebuild(name)

    def _mpo_repr(self) -> str:
        bonds = [c.shape[3] for cores in self.mpo_weights().values() for c in list(cores)[:-1]]
        return f"max_bond={max(bonds, default=1)}, params={self.num_params}, compression={self.compression_ratio:.1f}x"


# ----------------------------------------------------------------------------- cells


class _MPOCellBase(MPOWeights):
    """Shared part of the three cells (see the module docstring). Each cell class defines
    ``_gates(gi, gh, states)``: the gate pre-activations (N, G*H) of both products and the state
    list -> its output (h, or (h, c) for the LSTM cell)."""

    _torch_class: type[nn.RNNCellBase]
    _num_gates: int

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *,
                 bond_dim: int, factors: Mapping[str, tuple[Sequence[int], Sequence[int]]] | None = None,
                 num_cores: int = 4) -> None:
        super().__init__()
        _check_positive_int("input_size", input_size)
        _check_positive_int("hidden_size", hidden_size)
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
    def _torch_args(self) -> dict[str, Any]:
        return {"input_size": self.input_size, "hidden_size": self.hidden_size, "bias": self.bias}

    @classmethod
    def _args_of(cls, cell: nn.RNNCellBase) -> dict[str, Any]:
        return {"input_size": cell.input_size, "hidden_size": cell.hidden_size, "bias": cell.bias}

    @classmethod
    def _from_torch(cls, cell, max_bond, rel_tol, factors, num_cores, mpos):
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
        return layer

    def _to_torch(self) -> nn.RNNCellBase:
        first = self._cores("weight_ih")[0]
        cell = self._torch_class(**self._torch_args(), device=first.device, dtype=first.dtype)
        with torch.no_grad():
            cell.weight_ih.copy_(self._rebuild("weight_ih"))
            cell.weight_hh.copy_(self._rebuild("weight_hh"))
            if self.bias:
                cell.bias_ih.copy_(self.bias_ih)
                cell.bias_hh.copy_(self.bias_hh)
        return cell

    @classmethod
    def mpo_matrices(cls, cell: nn.RNNCellBase, num_cores: int = 4) -> dict[str, tuple[Tensor, Factors]]:
        """{name: (W^T, default factors)} for weight_ih and weight_hh (see ``LayerType.matrices``)."""
        return {name: (getattr(cell, name).detach().T,
                       _default_factors(getattr(cell, name).shape[1], getattr(cell, name).shape[0], num_cores))
                for name in ("weight_ih", "weight_hh")}

    # -- MPO-module protocol ---------------------------------------------------------------
    def mpo_config(self) -> dict[str, Any]:
        """JSON-serialisable description from which ``from_config`` rebuilds the module."""
        sparse = sparse_config(self)
        return {"class": type(self).__name__, **self._torch_args(), "num_cores": self.num_cores,
                "weights": self._weights_config(), **({"sparse": sparse} if sparse else {})}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]):
        """A module with cores of exactly the configured shapes (values from the default init)."""
        if config.get("class") != cls.__name__:
            raise ValueError(f"config is for {config.get('class')!r}, not {cls.__name__}")
        args = {k: config[k] for k in cls._config_keys()}
        layer = cls(**args, bond_dim=1, num_cores=int(config.get("num_cores", 4)))
        layer._load_weights_config(config["weights"], 1.0 / math.sqrt(3.0 * layer.hidden_size))
        load_sparse_config(layer, config)
        return layer

    @classmethod
    def _config_keys(cls) -> tuple[str, ...]:
        return ("input_size", "hidden_size", "bias")

    def extra_repr(self) -> str:
        return f"{nn.RNNCellBase.extra_repr(self)}, {self._mpo_repr()}"

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
            out = self._gates(gi, gh, states)
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

    _torch_class, _num_gates = nn.LSTMCell, 4

    @classmethod
    def from_lstm_cell(cls, cell: nn.LSTMCell, max_bond: int | None = None, rel_tol: float | None = None, *,
                       factors: Mapping[str, tuple[Sequence[int], Sequence[int]]] | None = None,
                       num_cores: int = 4, mpos: Mapping[str, MPO] | None = None) -> "MPOLSTMCell":
        """Decompose both weights of a trained nn.LSTMCell by TT-SVD (``max_bond`` caps the bonds,
        ``rel_tol=eps`` guarantees ||W - W_mpo||_F <= eps ||W||_F per weight; with neither it is
        exact). ``mpos={name: MPO of W^T}`` uses already decomposed MPOs. Errors in ``.reports``."""
        return cls._from_torch(cell, max_bond, rel_tol, factors, num_cores, mpos)

    def to_lstm_cell(self) -> nn.LSTMCell:
        """A plain torch.nn.LSTMCell with the rebuilt weights."""
        return self._to_torch()

    def _gates(self, gi: Tensor, gh: Tensor, states: list[Tensor]):
        gates = gi + gh
        h = self.hidden_size
        i, f, _, o = torch.sigmoid(gates).chunk(4, 1)  # one sigmoid over all gates: fewer ops
        g = torch.tanh(gates[:, 2 * h: 3 * h])
        c = torch.addcmul(f * states[1], i, g)
        return o * torch.tanh(c), c


class MPOGRUCell(_MPOCellBase):
    """torch.nn.GRUCell whose ``weight_ih`` (3H, I) and ``weight_hh`` (3H, H) (gates r, z, n) are MPOs.

    Args: torch.nn.GRUCell's (``input_size, hidden_size, bias=True, device=None, dtype=None``) plus
    ``bond_dim``, ``factors``, ``num_cores`` as for :class:`MPOLSTMCell`. ``forward(input, h)``
    returns h' as torch's does; ``from_gru_cell`` / ``to_gru_cell`` convert.
    """

    _torch_class, _num_gates = nn.GRUCell, 3

    @classmethod
    def from_gru_cell(cls, cell: nn.GRUCell, max_bond: int | None = None, rel_tol: float | None = None, *,
                      factors: Mapping[str, tuple[Sequence[int], Sequence[int]]] | None = None,
                      num_cores: int = 4, mpos: Mapping[str, MPO] | None = None) -> "MPOGRUCell":
        """As :meth:`MPOLSTMCell.from_lstm_cell`, for a trained nn.GRUCell."""
        return cls._from_torch(cell, max_bond, rel_tol, factors, num_cores, mpos)

    def to_gru_cell(self) -> nn.GRUCell:
        """A plain torch.nn.GRUCell with the rebuilt weights."""
        return self._to_torch()

    def _gates(self, gi: Tensor, gh: Tensor, states: list[Tensor]):
        i_r, i_z, i_n = gi.chunk(3, 1)
        h_r, h_z, h_n = gh.chunk(3, 1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        cand = torch.tanh(i_n + r * h_n)
        return cand + z * (states[0] - cand)


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

    @classmethod
    def from_rnn_cell(cls, cell: nn.RNNCell, max_bond: int | None = None, rel_tol: float | None = None, *,
                      factors: Mapping[str, tuple[Sequence[int], Sequence[int]]] | None = None,
                      num_cores: int = 4, mpos: Mapping[str, MPO] | None = None) -> "MPORNNCell":
        """As :meth:`MPOLSTMCell.from_lstm_cell`, for a trained nn.RNNCell (either nonlinearity)."""
        return cls._from_torch(cell, max_bond, rel_tol, factors, num_cores, mpos)

    def to_rnn_cell(self) -> nn.RNNCell:
        """A plain torch.nn.RNNCell with the rebuilt weights."""
        return self._to_torch()

    def _torch_args(self) -> dict[str, Any]:
        return {**super()._torch_args(), "nonlinearity": self.nonlinearity}

    @classmethod
    def _args_of(cls, cell: nn.RNNCellBase) -> dict[str, Any]:
        return {**super()._args_of(cell), "nonlinearity": cell.nonlinearity}

    @classmethod
    def _config_keys(cls) -> tuple[str, ...]:
        return super()._config_keys() + ("nonlinearity",)

    def _gates(self, gi: Tensor, gh: Tensor, states: list[Tensor]):
        return torch.tanh(gi + gh) if self.nonlinearity == "tanh" else torch.relu(gi + gh)


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


_CELL_SIZES = ("input_size", "hidden_size", "bias")
register(LayerType(nn.LSTMCell, MPOLSTMCell, MPOLSTMCell.from_lstm_cell, MPOLSTMCell.to_lstm_cell,
                   MPOLSTMCell.mpo_matrices, cell_inputs, _CELL_SIZES))
register(LayerType(nn.GRUCell, MPOGRUCell, MPOGRUCell.from_gru_cell, MPOGRUCell.to_gru_cell,
                   MPOGRUCell.mpo_matrices, cell_inputs, _CELL_SIZES))
register(LayerType(nn.RNNCell, MPORNNCell, MPORNNCell.from_rnn_cell, MPORNNCell.to_rnn_cell,
                   MPORNNCell.mpo_matrices, cell_inputs, _CELL_SIZES + ("nonlinearity",)))
