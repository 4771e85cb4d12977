"""The one base of every MPO layer: the cores of named weights, their rebuild and eval-mode cache,
products through the cost model with cached plans, and the layer's config.

A layer declares its weights as ``_weight_shapes`` ({torch weight name: (out, in)}); each is one MPO
of W^T (input side i, output side j) held as an ``nn.ParameterList`` of cores (D_{k-1}, i_k, j_k, D_k)
named ``<weight>_cores`` (``cores`` for the single-weight layers, :class:`SingleWeightMPO`).

Products ``x W^T`` (:meth:`MPOWeights._project`) take the cheapest path of the cost model
(``mpo.matmul_cost``): a contraction through the chain split into two halves ("cores"), the same with
the halves merged once and kept in the eval cache ("halves", ``mpo.prepare_halves``: the fastest at
one row), or a dense matmul with the rebuilt weight ("dense", cached in eval mode). The choice is a
plan memoised per (weight, rows, dtype, device, mode), so a repeated call plans nothing.

The eval-mode cache is keyed on the identity, ``_version`` counter and storage of every core: an
optimizer step, ``load_state_dict``, an in-place edit, ``.to()`` or ``functional_call`` invalidate it;
``train()`` drops it; it is never copied.

The config (``mpo_config`` / ``from_config``, what io saves and loads) is written once here: a layer
gives only its own constructor arguments (``_config_args`` and ``_args_from_config``); the cores'
factors and bonds, sparse residuals and int8 scales (``nn.int8``) are the base's.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import mpo as mpo_math
from ..mpo import MPO, Factors, Halves, TruncationReport, default_factors, random_cores, resolve_factors
from .int8 import Int8Cores
from .registry import MPOModule
from .sparse import add_sparse_product, load_sparse_config, sparse_config, sparse_params, with_sparse

__all__ = ["MPOWeights", "SingleWeightMPO", "check_positive_int", "pinned_factors", "set_factorized"]

FactorSpec = Mapping[str, tuple[Sequence[int] | None, Sequence[int] | None]]


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def pinned_factors(factors: FactorSpec | None, shapes: Mapping[str, Any]) -> dict[str, tuple]:
    """``factors`` ({weight name: (in_factors, out_factors)}) as a dict; ValueError naming any weight
    that is not among ``shapes``."""
    given = dict(factors or {})
    unknown = sorted(set(given) - set(shapes))
    if unknown:
        raise ValueError(f"factors given for unknown weights {unknown}; the weights are {list(shapes)}")
    return given


# ----------------------------------------------------------------------------- the base


class MPOWeights(Int8Cores, MPOModule):
    """Machinery of every MPO module (see the module docstring). A subclass declares its weights
    with :meth:`_init_weights` (or :meth:`_add_weight` one at a time) in its constructor, gives its
    constructor arguments to the config (:meth:`_config_args`, :meth:`_args_from_config`) and gets
    the MPO-module protocol (``mpo_weights`` / ``reports`` / ``mpo_config`` / ``from_config``),
    ``factors``, rebuild, products, conversions from dense weights or ready MPOs and int8 cores."""

    _weight_shapes: dict[str, tuple[int, int]]
    separate_bias = False  # a rank-D product adds its bias in its own op (set by the ONNX export)
    sparse_csr = True  # eval-mode sparse parts multiply in CSR; False: dense (set by traced exports)

    # -- construction --------------------------------------------------------------------
    def _start_weights(self, num_cores: int) -> None:
        check_positive_int("num_cores", num_cores)
        self.num_cores = num_cores
        self._weight_shapes = {}
        self._init_stds: dict[str, float] = {}  # the entry std of each rebuilt weight at init (from_config)
        self._reports: dict[str, TruncationReport] = {}
        self._cache: tuple[tuple, list[Tensor], dict[str, Any]] | None = None
        self._plans: dict[tuple, tuple] = {}  # training-mode plans (eval ones live in the cache)

    def _add_weight(self, name: str, shape: tuple[int, int], bond_dim: int, factors: tuple | None, std: float,
                    device=None, dtype=None) -> None:
        """Create the cores of weight ``name`` (torch shape (out, in)): ``factors`` = (in_factors,
        out_factors) (either may be None) or None for balanced ones; entries of the rebuilt
        weight get standard deviation ``std``."""
        check_positive_int("bond_dim", bond_dim)
        out_dim, in_dim = shape
        if factors is None:
            in_f, out_f = default_factors(in_dim, out_dim, self.num_cores)
        else:
            in_f, out_f = factors
            n = len(tuple(in_f if in_f is not None else out_f if out_f is not None else ())) or self.num_cores
            in_f, out_f = resolve_factors(in_dim, out_dim, in_f, out_f, n)
        self._weight_shapes[name] = (out_dim, in_dim)
        self._init_stds[name] = std
        cores = random_cores(in_f, out_f, mpo_math.capped_bond_dims(in_f, out_f, bond_dim), std, device, dtype)
        setattr(self, self._cores_attr(name), nn.ParameterList(nn.Parameter(c) for c in cores))

    def _init_weights(self, shapes: Mapping[str, tuple[int, int]], bond_dim: int, factors: FactorSpec | None,
                      num_cores: int, std: float, device=None, dtype=None) -> None:
        """Create the cores of every weight (shapes (out, in)); ``factors`` pins layouts by name."""
        check_positive_int("bond_dim", bond_dim)
        self._start_weights(num_cores)
        given = pinned_factors(factors, shapes)
        for name, shape in shapes.items():
            self._add_weight(name, shape, bond_dim, given.get(name), std, device, dtype)

    @staticmethod
    def _cores_attr(name: str) -> str:
        return f"{name}_cores"

    # -- MPO-module protocol -------------------------------------------------------------
    def mpo_weights(self) -> dict[str, nn.ParameterList]:
        """torch weight name -> its cores (the MPO of W^T: input side i, output side j)."""
        return {name: cast(nn.ParameterList, self._modules[self._cores_attr(name)]) for name in self._weight_shapes}

    @property
    def reports(self) -> dict[str, TruncationReport]:
        """weight name -> the TruncationReport of its decomposition (weights set from scratch have none)."""
        return self._reports

    @property
    def factors(self) -> dict[str, Factors]:
        """weight name -> (in_factors, out_factors) of its MPO (read from the cores)."""
        return {name: (tuple(c.shape[1] for c in cores), tuple(c.shape[2] for c in cores))
                for name, cores in self.mpo_weights().items()}

    def mpo(self, name: str) -> MPO:
        """The MPO of weight ``name`` (maps its input to its output), sharing the parameters."""
        if name not in self._weight_shapes:
            raise KeyError(f"{name!r} is not an MPO weight; they are {list(self._weight_shapes)}")
        return MPO(self._cores(name), self._reports.get(name))

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def compression_ratio(self) -> float:
        """Dense weight entries / stored entries: MPO cores and sparse residual values (biases excluded)."""
        dense = sum(o * i for o, i in self._weight_shapes.values())
        return dense / sum(p.numel() for p in [*self._core_params(), *sparse_params(self)])

    # -- the config (io) -------------------------------------------------------------------
    def _config_args(self) -> dict[str, Any]:
        """The layer's constructor arguments that fix its shapes, JSON-serialisable (each layer)."""
        raise NotImplementedError

    @classmethod
    def _args_from_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """The constructor arguments (all but ``bond_dim``) that ``config`` gives (each layer)."""
        raise NotImplementedError

    def mpo_config(self) -> dict[str, Any]:
        """JSON-serialisable description from which ``from_config`` rebuilds the module: its class,
        constructor arguments, the cores' factors and bonds (and sparse residuals), ``"int8"``."""
        return {"class": type(self).__name__, **self._config_args(), **self._cores_config(), **self._int8_config()}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "MPOWeights":
        """A module with cores of exactly the configured shapes (values from the default init)."""
        if config.get("class", cls.__name__) != cls.__name__:
            raise ValueError(f"config is for {config.get('class')!r}, not {cls.__name__}")
        layer = cls(**cls._args_from_config(config), bond_dim=1, num_cores=int(config.get("num_cores", 4)))
        layer._load_cores_config(config)
        layer._load_int8_config(config)
        return layer

    def _cores_config(self) -> dict[str, Any]:
        """The cores' part of the config: ``num_cores`` and, per weight, in_factors, out_factors,
        bond_dims, and "sparse" (its sparse residual's entry count, layout "lowrank+sparse"; with
        "sparse_index", its index format, and "sparse_int8" for int8 values) when it has one."""
        sparse = sparse_config(self)
        return {"num_cores": self.num_cores, "weights": {
            name: {"in_factors": list(in_f), "out_factors": list(out_f),
                   "bond_dims": list(mpo_math.bond_dims(self.mpo_weights()[name])),
                   **sparse.get(name, {})}
            for name, (in_f, out_f) in self.factors.items()}}

    def _load_cores_config(self, config: Mapping[str, Any]) -> None:
        """Replace every weight's cores by fresh ones of exactly the shapes ``config["weights"]`` gives."""
        weights = config["weights"]
        if not isinstance(weights, Mapping) or set(weights) != set(self._weight_shapes):
            got = sorted(weights) if isinstance(weights, Mapping) else weights
            raise ValueError(f"config has weights {got}, expected {sorted(self._weight_shapes)}")
        for name, spec in weights.items():
            self._set_mpo(name, MPO(_config_cores(name, spec, self._init_stds[name])))
        load_sparse_config(self, weights)

    # -- setting weights -----------------------------------------------------------------
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
        """Replace the cores of weight ``name`` by those of ``decomposed`` (an MPO of W^T), in the
        dtype and on the device of the cores they replace."""
        out_dim, in_dim = self._weight_shapes[name]
        if decomposed.shape != (in_dim, out_dim):
            raise ValueError(f"an MPO of shape {decomposed.shape} cannot be {name} (expects "
                             f"{(in_dim, out_dim)}, the transposed weight)")
        like = self._cores(name)[0]
        setattr(self, self._cores_attr(name), nn.ParameterList(
            nn.Parameter(c.detach().to(device=like.device, dtype=like.dtype).contiguous()) for c in decomposed.cores))
        if decomposed.report is not None:
            self._reports[name] = decomposed.report
        else:
            self._reports.pop(name, None)
        self._cache = None

    # -- weights -------------------------------------------------------------------------
    def _cores(self, name: str) -> list[Tensor]:
        cores = cast(nn.ParameterList, self._modules[self._cores_attr(name)])
        return list(cast("dict[str, Tensor]", cores._parameters).values())  # the ParameterList's, fast

    def _core_params(self) -> list[Tensor]:
        return [p for name in self._weight_shapes for p in self._cores(name)]

    def _rebuild(self, name: str) -> Tensor:
        """The dense matrix of weight ``name`` (out, in) from its cores, differentiable; shape-checked
        (torch's CPU RNN kernels do not check weight shapes)."""
        weight = mpo_math.cores_to_matrix(self._cores(name), transpose=True)
        if tuple(weight.shape) != self._weight_shapes[name]:
            raise RuntimeError(f"{type(self).__name__}: cores of {name} rebuild to shape "
                               f"{tuple(weight.shape)}, expected {self._weight_shapes[name]}")
        return with_sparse(self, name, weight)

    def _eval_cache(self) -> dict[str, Any] | None:
        """The eval-mode cache ("dense": rebuilt weights, "halves": merged half-chains, "plans"),
        None when caching is not allowed (training, or a graph to the cores is being recorded).
        Under torch.compile / torch.export it lives for one call: the graph rebuilds from the
        parameters once per call (constant folding, or inductor's freezing, removes that)."""
        if self.training:
            return None
        params = self._core_params() + sparse_params(self)
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return None
        if torch.compiler.is_compiling():  # a graph has no data pointers to key on: a cache for this call only
            return {}
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

    def _plan(self, name: str, rows: int, cached: bool) -> tuple:
        """The cost model's choice for ``rows`` rows times weight ``name``: ("cores", split),
        ("halves",) (eval cache only) or ("dense",)."""
        cores = self._cores(name)
        cost = mpo_math.matmul_cost(rows, cores, weight_cached=cached)
        options: dict[tuple, float] = {("cores", mpo_math.best_split(cores, rows)): cost["cores"]}
        if not self.factorized:
            options[("dense",)] = cost["rebuild"]
        if cached and len(cores) > 1:  # prepared once: no per-call merging (for two cores: contiguous copies)
            with torch.no_grad():
                options[("halves",)] = mpo_math.matmul_cost(rows, mpo_math.merged_halves(cores))["cores"]
        return min(options, key=lambda k: (options[k], k != ("halves",)))

    def _plan_for(self, x: Tensor, name: str, cache: dict[str, Any] | None) -> tuple:
        """The memoised plan for ``x``'s rows, dtype and device, in training or eval mode: in eval
        mode it lives in the cache (emptied when a core changes); in training mode it is checked
        against the core shapes (a TT-rounding may replace cores)."""
        rows = x.shape[0]
        if isinstance(rows, torch.SymInt):  # a dynamic size (torch.export): plan at its example value,
            rows = rows.node.hint or 1      # not specialize on it (every path is exact for any count)
        rows = int(rows)  # a plain int also while tracing (the plan is a Python decision)
        key = (name, rows, x.dtype, x.device)
        if cache is not None:
            plans = cache.setdefault("plans", {})
            if key not in plans:
                plans[key] = self._plan(name, rows, True)
            return plans[key]
        shapes = tuple(c.shape for c in self._cores(name))
        memo = self._plans.get(key)
        if memo is None or memo[0] != shapes:
            memo = self._plans[key] = (shapes, self._plan(name, rows, False))
        return memo[1]

    def _project(self, x: Tensor, name: str, cache: dict[str, Any] | None, bias: Tensor | None = None) -> Tensor:
        """x (N, in) @ W^T (+ bias) along the planned path (see the module docstring)."""
        plan = self._plan_for(x, name, cache)
        if plan[0] == "dense":
            return F.linear(x, self._dense(name, cache), bias)
        if plan[0] == "halves":
            prepared = self._halves(name, cache)
            if prepared[3] == 1 and prepared[4] == 1 and torch.compiler.is_exporting():  # rank-D as two linear
                # ops: what ExecuTorch's XNNPACK delegates and pt2e quantizes (mm with a computed weight is neither)
                out = F.linear(F.linear(x, prepared[0]), prepared[1].t(), bias)
                return add_sparse_product(self, name, x, out)
            if bias is not None and prepared[3] == 1 and prepared[4] == 1:  # rank-D: (x A) B + b in two ops
                if self.separate_bias:  # MatMul + Add (ONNX export): int8 tools quantize MatMul, not Gemm with a bias
                    out = torch.matmul(torch.matmul(x, prepared[0].t()), prepared[1]) + bias
                else:
                    out = torch.addmm(bias, torch.mm(x, prepared[0].t()), prepared[1])
                return add_sparse_product(self, name, x, out, cache)
            out = mpo_math.halves_matmul(x, prepared)
        else:
            out = mpo_math.split_matmul(x, self._cores(name), plan[1])
        out = add_sparse_product(self, name, x, out, cache)
        return out if bias is None else out + bias

    def _halves(self, name: str, cache: dict[str, Any] | None) -> Halves:
        """The merged halves of weight ``name`` (:func:`prepare_halves`): from the eval cache, or
        built from the cores (differentiable) without one."""
        if cache is None:
            return mpo_math.prepare_halves(self._cores(name))
        halves = cache.setdefault("halves", {})
        if name not in halves:
            with torch.no_grad():
                halves[name] = mpo_math.prepare_halves(self._cores(name))
        return halves[name]

    @property
    def factorized(self) -> bool:
        """Whether every product runs through the cores or their merged halves, never a rebuilt
        dense weight (the deployment runtime; set with :func:`set_factorized`)."""
        return self.__dict__.get("_factorized", False)

    @factorized.setter
    def factorized(self, value: bool) -> None:
        self.__dict__["_factorized"] = bool(value)
        self._cache, self._plans = None, {}

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

    # -- cache hygiene ---------------------------------------------------------------------
    def train(self, mode: bool = True):
        if mode != self.training:
            self._cache = None
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        self._cache = None
        self._plans = {}
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = super().__getstate__()
        state["_cache"] = None
        return state


def _config_cores(name: str, spec: Mapping[str, Any], std: float) -> list[Tensor]:
    """Initialised cores of exactly the shapes a saved config gives for weight ``name``."""
    in_f, out_f = tuple(spec["in_factors"]), tuple(spec["out_factors"])
    if len(in_f) != len(out_f) or not in_f:
        raise ValueError(f"{name}: in_factors {in_f} and out_factors {out_f} differ in length")
    bonds = [int(b) for b in spec["bond_dims"]]
    if len(bonds) != len(in_f) - 1:
        raise ValueError(f"{name}: bond_dims {spec['bond_dims']} must have {len(in_f) - 1} entries for "
                         f"{len(in_f)} cores")
    if any(b < 1 for b in bonds):
        raise ValueError(f"{name}: bond_dims {spec['bond_dims']} must be positive integers")
    return random_cores(in_f, out_f, bonds, std)


def set_factorized(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch every MPO module of ``model`` (or ``model`` itself) to the factorized runtime (every
    product through the cores or their merged halves; recurrent layers run their loop over time
    with those products instead of torch's fused kernel on rebuilt weights), or back. Returns
    ``model``."""
    for module in model.modules():
        if isinstance(module, MPOWeights):
            module.factorized = enabled
    return model


class SingleWeightMPO(MPOWeights):
    """An MPO module with one weight, "weight", whose cores are the parameters ``cores.<k>``
    (MPOLinear, MPOEmbedding); ``report`` is its TruncationReport (or None)."""

    @staticmethod
    def _cores_attr(name: str) -> str:
        return "cores"

    @property
    def report(self) -> TruncationReport | None:
        return self._reports.get("weight")

    def mpo(self, name: str = "weight") -> MPO:
        """The weight's MPO, sharing the parameters."""
        return super().mpo(name)

    @property
    def in_factors(self) -> tuple[int, ...]:
        return self.factors["weight"][0]

    @property
    def out_factors(self) -> tuple[int, ...]:
        return self.factors["weight"][1]

    _factor_keys = ("in_factors", "out_factors")  # the config's names of the weight's factors

    def _cores_config(self) -> dict[str, Any]:
        """The cores' part of the config, flat: the factors (``_factor_keys``), bond_dims, sparse."""
        spec = super()._cores_config()["weights"]["weight"]
        return {self._factor_keys[0]: spec.pop("in_factors"), self._factor_keys[1]: spec.pop("out_factors"), **spec}

    def _load_cores_config(self, config: Mapping[str, Any]) -> None:
        keys = dict(zip(("in_factors", "out_factors"), self._factor_keys), bond_dims="bond_dims", sparse="sparse",
                    sparse_index="sparse_index", sparse_int8="sparse_int8")
        super()._load_cores_config({"weights": {"weight": {k: config[c] for k, c in keys.items() if c in config}}})
