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
  error messages are torch's own.
- In eval mode, when no gradient w.r.t. the cores is being recorded, the rebuilt weights are cached.
  The cache is keyed on the identity, ``_version`` counter and storage of every core, so an
  optimizer step, ``load_state_dict``, an in-place edit, ``.to()`` or ``functional_call``
  invalidates it; ``train()`` drops it.
- ``step`` (and the stateful ``stream``) runs one frame at a time. Per weight, ``mpo.matmul_cost``
  picks the cheapest of a core-by-core contraction, a dense matmul and (eval cache only) a
  contraction with the chain merged into two cores, which halves the op count and is the fastest
  at one row (measured at 1024 x 4096, bond 8: ~3x faster than the 4-core sweep and ~4x faster
  than the dense matmul).
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from .. import mpo as mpo_math
from .registry import LayerType, register
from ..mpo import MPO, TruncationReport
from .cached import CachedCores
from .linear import init_cores_, resolve_factors
from .sparse import add_sparse_product, load_sparse_config, sparse_config, sparse_params, with_sparse

__all__ = ["MPOLSTM", "MPOGRU", "MPORNN", "RNNStream", "recurrent_inputs"]

Factors = tuple[tuple[int, ...], tuple[int, ...]]


def _default_factors(in_features: int, out_features: int, num_cores: int) -> Factors:
    """Balanced factors with ``num_cores`` cores, or fewer when the sizes have too few prime
    factors for that many non-trivial cores (a single core is a dense matrix)."""
    for n in range(num_cores, 0, -1):
        try:
            return resolve_factors(in_features, out_features, None, None, n)
        except ValueError:
            continue
    raise AssertionError("unreachable: one core always resolves")  # pragma: no cover


def _merged_halves(cores: Sequence[Tensor]) -> list[Tensor]:
    """The chain as two cores, (1, I_left, J_left, D) and (D, I_right, J_right, 1), split at the middle bond."""

    def merge(chain: Sequence[Tensor]) -> Tensor:
        out = chain[0]
        for core in chain[1:]:
            d, i, j, _ = out.shape
            _, k, l, e = core.shape
            out = torch.einsum("aijb,bklc->aikjlc", out, core).reshape(d, i * k, j * l, e)
        return out

    half = len(cores) // 2
    return [merge(cores[:half]), merge(cores[half:])]


class _MPORNNBase(CachedCores):
    """Shared machinery of MPOLSTM, MPOGRU and MPORNN (see the module docstring)."""

    _mode: str
    _num_gates: int
    _torch_class: type[nn.RNNBase]

    # torch's own input/state validation, so shapes are checked with torch's exact messages
    check_input = nn.RNNBase.check_input
    get_expected_hidden_size = nn.RNNBase.get_expected_hidden_size
    check_hidden_size = nn.RNNBase.check_hidden_size

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
        *,
        bond_dim: int,
        factors: Mapping[str, tuple[Sequence[int], Sequence[int]]] | None = None,
        num_cores: int = 4,
    ) -> None:
        super().__init__()
        _check_rnn_args(input_size, hidden_size, num_layers, bias, batch_first, dropout, proj_size)
        if isinstance(bond_dim, bool) or not isinstance(bond_dim, int) or bond_dim < 1:
            raise ValueError(f"bond_dim must be a positive integer, got {bond_dim!r}")
        if isinstance(num_cores, bool) or not isinstance(num_cores, int) or num_cores < 1:
            raise ValueError(f"num_cores must be a positive integer, got {num_cores!r}")
        self.mode = self._mode
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.proj_size = bool(bidirectional), proj_size
        self.num_cores = num_cores

        # torch's parameter names, shapes and order (flat order: w_ih, w_hh, b_ih, b_hh, w_hr)
        gate_size = self._num_gates * hidden_size
        real_hidden = proj_size if proj_size > 0 else hidden_size
        directions = 2 if bidirectional else 1
        self._flat_weights_names: list[str] = []
        self._all_weights: list[list[str]] = []
        self._weight_shapes: dict[str, tuple[int, int]] = {}  # MPO weight -> torch shape (out, in)
        for layer in range(num_layers):
            layer_in = input_size if layer == 0 else real_hidden * directions
            for direction in range(directions):
                sfx = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                names = [f"weight_ih{sfx}", f"weight_hh{sfx}"]
                self._weight_shapes[names[0]] = (gate_size, layer_in)
                self._weight_shapes[names[1]] = (gate_size, real_hidden)
                if bias:
                    names += [f"bias_ih{sfx}", f"bias_hh{sfx}"]
                if proj_size > 0:
                    names.append(f"weight_hr{sfx}")
                    self._weight_shapes[names[-1]] = (proj_size, hidden_size)
                self._flat_weights_names += names
                self._all_weights.append(names)

        given = dict(factors or {})
        unknown = sorted(set(given) - set(self._weight_shapes))
        if unknown:
            raise ValueError(f"factors given for unknown weights {unknown}; the weights are "
                             f"{list(self._weight_shapes)}")
        factors_used: dict[str, Factors] = {}
        for name, (out_dim, in_dim) in self._weight_shapes.items():
            if name in given:
                in_f, out_f = given[name]
                factors_used[name] = resolve_factors(in_dim, out_dim, in_f, out_f, len(tuple(in_f)))
            else:
                factors_used[name] = _default_factors(in_dim, out_dim, num_cores)

        kw = {"device": device, "dtype": dtype}
        std = 1.0 / math.sqrt(hidden_size)  # torch's U(-std, std) init, variance std^2 / 3
        for name in self._flat_weights_names:
            if name in self._weight_shapes:
                in_f, out_f = factors_used[name]
                bonds = (1, *mpo_math.capped_bond_dims(in_f, out_f, bond_dim), 1)
                cores = [torch.empty(bonds[k], i, j, bonds[k + 1], **kw)
                         for k, (i, j) in enumerate(zip(in_f, out_f))]
                init_cores_(cores, std / math.sqrt(3.0))
                setattr(self, f"{name}_cores", nn.ParameterList(nn.Parameter(c) for c in cores))
            else:
                bias_param = nn.Parameter(torch.empty(gate_size, **kw))
                nn.init.uniform_(bias_param, -std, std)
                setattr(self, name, bias_param)
        self.reports: dict[str, TruncationReport] = {}
        self._cache: tuple[tuple, list[Tensor], dict[str, dict]] | None = None  # see _eval_cache
        self._flat_weights: list[Tensor] | None = None  # set only while torch's forward runs
        self._plans: dict[tuple, tuple] = {}  # step(): (weight, rows, cached) -> (core shapes, path)

    # -- conversion -----------------------------------------------------------------
    @classmethod
    def _from_torch(cls, rnn: nn.RNNBase, max_bond, rel_tol, factors, num_cores, mpos):
        if not isinstance(rnn, cls._torch_class):
            torch_name = cls._torch_class.__name__
            raise ValueError(f"{cls.__name__}.from_{torch_name.lower()} expects a torch.nn.{torch_name}, "
                             f"got {type(rnn).__name__}")
        weight = rnn.weight_ih_l0
        layer = cls(**_torch_args(rnn), device=weight.device, dtype=weight.dtype, bond_dim=1,
                    factors=factors, num_cores=num_cores)
        given = dict(mpos or {})
        unknown = sorted(set(given) - set(layer._weight_shapes))
        if unknown:
            raise ValueError(f"mpos given for unknown weights {unknown}; the weights are "
                             f"{list(layer._weight_shapes)}")
        built_factors = layer.factors
        for name, (out_dim, in_dim) in layer._weight_shapes.items():
            if name in given:
                decomposed = given[name]
                if decomposed.shape != (in_dim, out_dim):
                    raise ValueError(f"mpos[{name!r}] has shape {decomposed.shape}, expected "
                                     f"{(in_dim, out_dim)} (the transposed weight)")
            else:
                in_f, out_f = built_factors[name]
                with torch.no_grad():
                    decomposed = mpo_math.decompose(getattr(rnn, name).T, in_f, out_f,
                                                    max_bond=max_bond, rel_tol=rel_tol)
            layer._set_mpo(name, decomposed)
        with torch.no_grad():
            for name in layer._flat_weights_names:
                if name not in layer._weight_shapes:
                    getattr(layer, name).copy_(getattr(rnn, name))
        return layer

    @classmethod
    def mpo_matrices(cls, rnn: nn.RNNBase, num_cores: int = 4) -> dict[str, tuple[Tensor, tuple]]:
        """{weight name: (W^T, default factors)} for every MPO weight (see ``LayerType.matrices``)."""
        with torch.device("meta"):
            layout = cls(**_torch_args(rnn), bond_dim=1, num_cores=num_cores)
        return {name: (getattr(rnn, name).detach().T, layout.factors[name]) for name in layout._weight_shapes}

    def _to_torch(self) -> nn.RNNBase:
        first = next(self.parameters())
        rnn = self._torch_class(**_torch_args(self), device=first.device, dtype=first.dtype)
        with torch.no_grad():
            for name in self._flat_weights_names:
                source = self._rebuild(name) if name in self._weight_shapes else getattr(self, name)
                getattr(rnn, name).copy_(source)
        return rnn

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

    # -- MPO-module protocol (used by compress and io) ---------------------------------
    def mpo_config(self) -> dict[str, Any]:
        """JSON-serialisable description from which ``from_config`` rebuilds the module."""
        weights = {
            name: {"in_factors": list(in_f), "out_factors": list(out_f),
                   "bond_dims": list(mpo_math.bond_dims(self.mpo_weights()[name]))}
            for name, (in_f, out_f) in self.factors.items()
        }
        sparse = sparse_config(self)
        return {"class": type(self).__name__, **_torch_args(self), "num_cores": self.num_cores,
                "weights": weights, **({"sparse": sparse} if sparse else {})}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]):
        """A module with cores of exactly the configured shapes (values from the default init)."""
        if config.get("class") != cls.__name__:
            raise ValueError(f"config is for {config.get('class')!r}, not {cls.__name__}")
        args = {k: config[k] for k in _torch_args_names(cls)}
        weights = config["weights"]
        layer = cls(**args, bond_dim=1, num_cores=int(config.get("num_cores", 4)))
        if set(weights) != set(layer._weight_shapes):
            raise ValueError(f"config has weights {sorted(weights)}, expected {sorted(layer._weight_shapes)}")
        std = 1.0 / math.sqrt(3.0 * layer.hidden_size)
        for name, spec in weights.items():
            in_f, out_f = tuple(spec["in_factors"]), tuple(spec["out_factors"])
            if len(in_f) != len(out_f):
                raise ValueError(f"{name}: in_factors {in_f} and out_factors {out_f} differ in length")
            bonds = (1, *[int(b) for b in spec["bond_dims"]], 1)
            if len(bonds) != len(in_f) + 1:
                raise ValueError(f"{name}: bond_dims {spec['bond_dims']} must have {len(in_f) - 1} "
                                 f"entries for {len(in_f)} cores")
            cores = [torch.empty(bonds[k], i, j, bonds[k + 1]) for k, (i, j) in enumerate(zip(in_f, out_f))]
            init_cores_(cores, std)
            layer._set_mpo(name, MPO(cores))
        load_sparse_config(layer, config)
        return layer

    # -- weights --------------------------------------------------------------------
    def _rebuild(self, name: str) -> Tensor:
        """The dense weight ``name`` (out, in) from its cores, differentiable; shape-checked."""
        weight = mpo_math.cores_to_matrix(self._cores(name), transpose=True)
        if tuple(weight.shape) != self._weight_shapes[name]:
            raise RuntimeError(f"{type(self).__name__}: cores of {name} rebuild to shape "
                               f"{tuple(weight.shape)}, expected {self._weight_shapes[name]}")
        return with_sparse(self, name, weight)

    def _cores(self, name: str) -> list[Tensor]:
        return list(self._modules[f"{name}_cores"]._parameters.values())  # the ParameterList, fast

    def _core_params(self) -> list[Tensor]:
        return [p for name in self._weight_shapes for p in self._cores(name)]

    def _eval_cache(self) -> dict[str, dict] | None:
        """The eval-mode cache, a dict filled on demand ("dense": rebuilt weights, "halves":
        merged half-chains for streaming); None when caching is not allowed. It is emptied
        whenever a core changes identity (a replaced parameter, functional_call), version (an
        in-place edit, an optimizer step, load_state_dict) or storage (``.data =``, ``.to()``),
        or inference/autocast mode changes."""
        if self.training:
            return None
        params = self._core_params() + sparse_params(self)
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return None  # a graph to the cores is being recorded: rebuild on every call
        # a new dtype, device or shape means new storage, so (id, version, data_ptr) sees it
        key = (torch.is_inference_mode_enabled(), torch._C._is_any_autocast_enabled(),
               *[(id(p), p._version, p.data_ptr()) for p in params])
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, params, {})  # params pin the ids in the key
        return self._cache[2]

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

    def clear_cache(self) -> None:
        """Drop the cached dense weights of eval mode."""
        self._cache = None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # torch's weight names read the rebuilt dense weight (read-only: edit the cores)
            if name in self.__dict__.get("_weight_shapes", {}):
                return self._rebuild(name)
            raise

    def extra_repr(self) -> str:
        bonds = [c.shape[3] for cores in self.mpo_weights().values() for c in list(cores)[:-1]]
        nonlinearity = f", nonlinearity={self.nonlinearity!r}" if self.mode.startswith("RNN_") else ""
        return (nn.RNNBase.extra_repr(self) + nonlinearity + f", max_bond={max(bonds, default=1)}, "
                f"params={self.num_params}, compression={self.compression_ratio:.1f}x")

    def _hidden_step(self, input: Tensor, hx: Tensor | None, layer_step) -> tuple[Tensor, Tensor]:
        """One time step of a model whose state is h alone (GRU, RNN): checks, zero state,
        inter-layer dropout, unbatched input; ``layer_step(layer, x, h_layer, cache)`` -> new h."""
        x, batched = self._step_checks(input)
        n = x.shape[0]
        if hx is None:
            h = x.new_zeros(self.num_layers, n, self.hidden_size)
        else:
            self._check_step_state(hx, (self.num_layers, n, self.hidden_size), batched, "hidden")
            h = hx if batched else hx.unsqueeze(1)
        cache = self._eval_cache()
        hs = []
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0 and self.training:
                x = F.dropout(x, self.dropout, training=True)
            x = layer_step(layer, x, h[layer], cache)
            hs.append(x)
        h_out = torch.stack(hs)
        if not batched:
            return x.squeeze(0), h_out.squeeze(1)
        return x, h_out

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
        self._set_flat_weights(self.flat_weights())
        try:
            if isinstance(input, PackedSequence):
                # torch's LSTM checks nothing for packed input; check it like torch's GRU does
                self.check_input(input.data, input.batch_sizes)
                if hx is not None:
                    self._check_packed_hidden(input, hx)
            return self._torch_class.forward(self, input, hx)
        finally:
            self._set_flat_weights(None)

    # -- streaming -----------------------------------------------------------------------
    def stream(self, hx=None) -> "RNNStream":
        """A stateful one-frame-at-a-time runner: ``s = m.stream(); y_t = s(x_t)``."""
        return RNNStream(self, hx)

    def _project(self, x: Tensor, name: str, cache: dict | None) -> Tensor:
        """x (N, in) @ W^T by the cheapest of: core-by-core contraction, contraction with the two
        merged halves of the chain (eval cache only: half the op count, the win at one row), and a
        dense matmul (with the cached weight in eval mode, else rebuilt), per mpo.matmul_cost."""
        cores = self._cores(name)
        rows = x.shape[0]
        halves = None
        if cache is not None and len(cores) > 2:
            halves = cache.setdefault("halves", {}).get(name)
            if halves is None:
                with torch.no_grad():
                    halves = cache["halves"][name] = _merged_halves(cores)
        key = (name, rows, cache is not None)
        shapes = (cores[0].dtype, *(c.shape for c in cores))
        plan = self._plans.get(key)
        if plan is None or plan[0] != shapes:  # the cost model's choice, memoised per shape
            cost = mpo_math.matmul_cost(rows, cores, weight_cached=cache is not None)
            options = {"cores": cost["cores"], "dense": cost["rebuild"]}
            if halves is not None:
                options["halves"] = mpo_math.matmul_cost(rows, halves)["cores"]
            plan = self._plans[key] = (shapes, min(options, key=options.get))
        if plan[1] == "cores":
            return add_sparse_product(self, name, x, mpo_math.mpo_matmul(x, cores, strategy="cores"))
        if plan[1] == "halves":
            return add_sparse_product(self, name, x, mpo_math.mpo_matmul(x, halves, strategy="cores"))
        weight = self._dense_weights(cache)[name] if cache is not None else self._rebuild(name)
        return F.linear(x, weight)

    def _step_checks(self, input: Tensor) -> tuple[Tensor, bool]:
        if self.bidirectional:
            raise ValueError(f"{type(self).__name__}.step runs one frame at a time and so cannot run "
                             "a bidirectional layer (its reverse direction needs the future)")
        if not isinstance(input, Tensor) or input.dim() not in (1, 2):
            raise ValueError(f"{type(self).__name__}.step expects one frame, (N, {self.input_size}) or "
                             f"({self.input_size},), got {tuple(getattr(input, 'shape', ()))}")
        self._torch_check_input(input.unsqueeze(0) if input.dim() == 2 else input[None, None], None)
        batched = input.dim() == 2
        return (input if batched else input.unsqueeze(0)), batched

    def _check_step_state(self, state: Tensor, expected: tuple[int, int, int], batched: bool, what: str):
        want = expected if batched else (expected[0], expected[2])
        if tuple(state.shape) != want:
            raise RuntimeError(f"Expected {what} size {want}, got {list(state.shape)}")


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


def _torch_args_names(cls) -> tuple[str, ...]:
    names = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional")
    if cls._mode == "LSTM":
        return names + ("proj_size",)
    return names + (("nonlinearity",) if cls._mode.startswith("RNN_") else ())


def _mpo_class_of(module) -> type["_MPORNNBase"]:
    """The MPO class of an nn.LSTM/GRU/RNN or MPOLSTM/MPOGRU/MPORNN, by its ``mode``."""
    return {"LSTM": MPOLSTM, "GRU": MPOGRU, "RNN_TANH": MPORNN, "RNN_RELU": MPORNN}[module.mode]


def _torch_args(module) -> dict[str, Any]:
    """The torch constructor arguments of an nn.LSTM/GRU/RNN or an MPOLSTM/MPOGRU/MPORNN."""
    return {name: getattr(module, name) for name in _torch_args_names(_mpo_class_of(module))}


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

    _mode, _num_gates, _torch_class = "LSTM", 4, nn.LSTM
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    @classmethod
    def from_lstm(
        cls,
        lstm: nn.LSTM,
        max_bond: int | None = None,
        rel_tol: float | None = None,
        *,
        factors: Mapping[str, tuple[Sequence[int], Sequence[int]]] | None = None,
        num_cores: int = 4,
        mpos: Mapping[str, MPO] | None = None,
    ) -> "MPOLSTM":
        """Decompose every weight of a trained nn.LSTM by TT-SVD (``max_bond`` caps the bonds,
        ``rel_tol=eps`` guarantees ||W - W_mpo||_F <= eps ||W||_F per weight; with neither it is
        exact). ``mpos={name: MPO of W^T}`` uses already decomposed MPOs for those weights. The
        achieved error per weight is in ``.reports[name].rel_error``."""
        return cls._from_torch(lstm, max_bond, rel_tol, factors, num_cores, mpos)

    def to_lstm(self) -> nn.LSTM:
        """A plain torch.nn.LSTM with the rebuilt weights."""
        return self._to_torch()

    def _check_packed_hidden(self, input: PackedSequence, hx) -> None:
        self.check_forward_args(input.data, hx, input.batch_sizes)

    def step(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None):
        """One time step: ``input`` (N, input_size) or unbatched (input_size,); ``hx`` = (h, c) as
        for ``forward`` ((num_layers, N, H_out), (num_layers, N, H); unbatched without N).
        Returns (output (N, H_out), (h, c)), equal to ``forward`` on a length-1 sequence."""
        x, batched = self._step_checks(input)
        n, out_size = x.shape[0], self.proj_size or self.hidden_size
        if hx is None:
            h = x.new_zeros(self.num_layers, n, out_size)
            c = x.new_zeros(self.num_layers, n, self.hidden_size)
        else:
            h, c = hx
            self._check_step_state(h, (self.num_layers, n, out_size), batched, "hidden[0]")
            self._check_step_state(c, (self.num_layers, n, self.hidden_size), batched, "hidden[1]")
            if not batched:
                h, c = h.unsqueeze(1), c.unsqueeze(1)
        cache = self._eval_cache()
        hs, cs = [], []
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0 and self.training:
                x = F.dropout(x, self.dropout, training=True)
            gates = self._project(x, f"weight_ih_l{layer}", cache) + \
                self._project(h[layer], f"weight_hh_l{layer}", cache)
            if self.bias:
                gates = gates + (getattr(self, f"bias_ih_l{layer}") + getattr(self, f"bias_hh_l{layer}"))
            i, f, _, o = torch.sigmoid(gates).chunk(4, 1)  # one sigmoid over all gates: fewer ops
            g = torch.tanh(gates[:, 2 * self.hidden_size: 3 * self.hidden_size])
            c_new = torch.addcmul(f * c[layer], i, g)
            h_new = o * torch.tanh(c_new)
            if self.proj_size > 0:
                h_new = self._project(h_new, f"weight_hr_l{layer}", cache)
            hs.append(h_new)
            cs.append(c_new)
            x = h_new
        h_n, c_n = torch.stack(hs), torch.stack(cs)
        if not batched:
            return x.squeeze(0), (h_n.squeeze(1), c_n.squeeze(1))
        return x, (h_n, c_n)


class MPOGRU(_MPORNNBase):
    """torch.nn.GRU whose W_ih and W_hh (gates r, z, n concatenated) are MPOs.

    Args: torch.nn.GRU's (``input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
    dropout=0.0, bidirectional=False, device=None, dtype=None``) plus ``bond_dim``, ``factors``,
    ``num_cores`` as for :class:`MPOLSTM`. ``forward``, ``step``, ``stream``, ``from_gru``,
    ``to_gru`` mirror MPOLSTM's.
    """

    _mode, _num_gates, _torch_class = "GRU", 3, nn.GRU
    check_forward_args = nn.RNNBase.check_forward_args
    permute_hidden = nn.RNNBase.permute_hidden

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None, **mpo_kwargs) -> None:
        if "proj_size" in mpo_kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, device, dtype, **mpo_kwargs)

    @classmethod
    def from_gru(
        cls,
        gru: nn.GRU,
        max_bond: int | None = None,
        rel_tol: float | None = None,
        *,
        factors: Mapping[str, tuple[Sequence[int], Sequence[int]]] | None = None,
        num_cores: int = 4,
        mpos: Mapping[str, MPO] | None = None,
    ) -> "MPOGRU":
        """As :meth:`MPOLSTM.from_lstm`, for a trained nn.GRU."""
        return cls._from_torch(gru, max_bond, rel_tol, factors, num_cores, mpos)

    def to_gru(self) -> nn.GRU:
        """A plain torch.nn.GRU with the rebuilt weights."""
        return self._to_torch()

    def _check_packed_hidden(self, input: PackedSequence, hx) -> None:
        pass  # torch's GRU forward checks packed input itself

    def step(self, input: Tensor, hx: Tensor | None = None):
        """One time step: ``input`` (N, input_size) or (input_size,); ``hx`` (num_layers, N, H)
        (unbatched (num_layers, H)). Returns (output (N, H), h), equal to ``forward`` on a
        length-1 sequence."""
        return self._hidden_step(input, hx, self._gru_layer)

    def _gru_layer(self, layer: int, x: Tensor, h: Tensor, cache) -> Tensor:
        gi = self._project(x, f"weight_ih_l{layer}", cache)
        gh = self._project(h, f"weight_hh_l{layer}", cache)
        if self.bias:
            gi = gi + getattr(self, f"bias_ih_l{layer}")
            gh = gh + getattr(self, f"bias_hh_l{layer}")
        i_r, i_z, i_n = gi.chunk(3, 1)
        h_r, h_z, h_n = gh.chunk(3, 1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        cand = torch.tanh(i_n + r * h_n)
        return cand + z * (h - cand)


class MPORNN(_MPORNNBase):
    """torch.nn.RNN (Elman: h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh), act = tanh or ReLU)
    whose W_ih and W_hh are MPOs.

    Args: torch.nn.RNN's (``input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
    batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None``) plus
    ``bond_dim``, ``factors``, ``num_cores`` as for :class:`MPOLSTM`. ``forward`` runs torch's own
    ``nn.RNN.forward`` (fused ``_VF.rnn_tanh`` / ``_VF.rnn_relu``) with the rebuilt weights;
    ``step``, ``stream``, ``from_rnn``, ``to_rnn`` mirror MPOLSTM's.
    """

    _mode, _num_gates, _torch_class = "RNN_TANH", 1, nn.RNN
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

    @classmethod
    def from_rnn(
        cls,
        rnn: nn.RNN,
        max_bond: int | None = None,
        rel_tol: float | None = None,
        *,
        factors: Mapping[str, tuple[Sequence[int], Sequence[int]]] | None = None,
        num_cores: int = 4,
        mpos: Mapping[str, MPO] | None = None,
    ) -> "MPORNN":
        """As :meth:`MPOLSTM.from_lstm`, for a trained nn.RNN (either nonlinearity)."""
        return cls._from_torch(rnn, max_bond, rel_tol, factors, num_cores, mpos)

    def to_rnn(self) -> nn.RNN:
        """A plain torch.nn.RNN with the rebuilt weights."""
        return self._to_torch()

    def _check_packed_hidden(self, input: PackedSequence, hx) -> None:
        pass  # torch's RNN forward checks packed input itself

    def step(self, input: Tensor, hx: Tensor | None = None):
        """One time step: ``input`` (N, input_size) or (input_size,); ``hx`` (num_layers, N, H)
        (unbatched (num_layers, H)). Returns (output (N, H), h), equal to ``forward`` on a
        length-1 sequence."""
        return self._hidden_step(input, hx, self._elman_layer)

    def _elman_layer(self, layer: int, x: Tensor, h: Tensor, cache) -> Tensor:
        pre = self._project(x, f"weight_ih_l{layer}", cache) + self._project(h, f"weight_hh_l{layer}", cache)
        if self.bias:
            pre = pre + (getattr(self, f"bias_ih_l{layer}") + getattr(self, f"bias_hh_l{layer}"))
        return torch.tanh(pre) if self.nonlinearity == "tanh" else torch.relu(pre)


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


def recurrent_inputs(rnn: nn.RNNBase, args: tuple) -> Iterator[tuple[str, Tensor]]:
    """(weight name, the vectors it multiplies (samples, features)) for every layer and
    direction of an nn.LSTM / nn.GRU / nn.RNN called with ``args`` (the registry's ``inputs`` hook).

    W_ih of layer l multiplies x_t of layer l (the module input for l = 0, the previous
    layer's output otherwise) and W_hh multiplies h_{t-1} (the initial state at t = 0). The
    input is re-run one layer and direction at a time with the module's own weights to read
    those sequences (padded positions of a PackedSequence are left out). W_hr (proj_size > 0)
    is not recorded."""
    x, hx = args[0], args[1] if len(args) > 1 else None
    mask = None
    if isinstance(x, PackedSequence):
        x, lengths = pad_packed_sequence(x, batch_first=True)
        mask = torch.arange(x.shape[1])[None, :] < lengths[:, None]  # (N, T)
    elif x.dim() == 2:  # unbatched (T, F)
        x = x.unsqueeze(0)
    elif not rnn.batch_first:
        x = x.transpose(0, 1)
    lstm = rnn.mode == "LSTM"
    h0_all, c0_all = hx if lstm and hx is not None else (hx, None)
    if h0_all is not None and h0_all.dim() == 2:
        h0_all, c0_all = h0_all.unsqueeze(1), None if c0_all is None else c0_all.unsqueeze(1)
    directions = 2 if rnn.bidirectional else 1
    real_hidden = rnn.proj_size or rnn.hidden_size
    layer_input = x  # (N, T, F), batch first from here on
    for layer in range(rnn.num_layers):
        outputs = []
        for d in range(directions):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            single = _single_layer(rnn, layer_input.shape[-1])
            single.to(device=layer_input.device, dtype=layer_input.dtype)
            with torch.no_grad():
                for name in single._flat_weights_names:
                    getattr(single, name).copy_(getattr(rnn, name.replace("_l0", sfx)))
            seq = layer_input.flip(1) if d else layer_input
            k = layer * directions + d
            h0 = None if h0_all is None else h0_all[k : k + 1]
            state = h0 if h0 is None or not lstm else (h0, c0_all[k : k + 1])
            if d and mask is not None:  # reverse each sequence within its own length
                seq = torch.stack([torch.cat([s[:n].flip(0), s[n:]]) for s, n in
                                   zip(layer_input, mask.sum(1))])
            with torch.no_grad():
                out, _ = single(seq, state)
            start = torch.zeros_like(out[:, :1]) if h0 is None else h0.transpose(0, 1)
            previous = torch.cat([start, out[:, :-1]], 1)  # h_{t-1}
            keep = mask if mask is not None else torch.ones(out.shape[:2], dtype=torch.bool)
            yield f"weight_ih{sfx}", seq[keep]
            yield f"weight_hh{sfx}", previous[keep]
            if d and mask is not None:
                out = torch.stack([torch.cat([o[:n].flip(0), o[n:]]) for o, n in zip(out, mask.sum(1))])
            elif d:
                out = out.flip(1)
            outputs.append(out[..., :real_hidden])
        layer_input = torch.cat(outputs, -1)


def _single_layer(rnn: nn.RNNBase, input_size: int) -> nn.RNNBase:
    """A one-layer, one-direction, batch-first torch RNN of ``rnn``'s kind (LSTM, GRU, RNN)."""
    kwargs: dict[str, Any] = {"bias": rnn.bias, "batch_first": True}
    if rnn.mode == "LSTM":
        kwargs["proj_size"] = rnn.proj_size
    elif rnn.mode.startswith("RNN_"):
        kwargs["nonlinearity"] = "tanh" if rnn.mode == "RNN_TANH" else "relu"
    return _mpo_class_of(rnn)._torch_class(input_size, rnn.hidden_size, 1, **kwargs)


_RNN_SIZES = ("input_size", "hidden_size", "num_layers", "bidirectional", "proj_size", "batch_first")
register(LayerType(nn.LSTM, MPOLSTM, MPOLSTM.from_lstm, MPOLSTM.to_lstm, MPOLSTM.mpo_matrices, recurrent_inputs, _RNN_SIZES))
register(LayerType(nn.GRU, MPOGRU, MPOGRU.from_gru, MPOGRU.to_gru, MPOGRU.mpo_matrices, recurrent_inputs, _RNN_SIZES))
register(LayerType(nn.RNN, MPORNN, MPORNN.from_rnn, MPORNN.to_rnn, MPORNN.mpo_matrices, recurrent_inputs,
                   _RNN_SIZES + ("nonlinearity",)))
