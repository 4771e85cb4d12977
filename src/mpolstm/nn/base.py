"""The one base of every MPO layer: the cores of named weights, their rebuild and eval-mode cache,
products through the cost model with cached plans, factor resolution and initialisation.

A layer declares its weights as ``_weight_shapes`` ({torch weight name: (out, in)}); each is one MPO
of W^T (input side i, output side j) held as an ``nn.ParameterList`` of cores (D_{k-1}, i_k, j_k, D_k)
named ``<weight>_cores`` (``cores`` for the single-weight layers, :class:`SingleWeightMPO`).

Products ``x W^T`` (:meth:`MPOWeights._project`) take the cheapest path of the cost model
(``mpo.matmul_cost``): a contraction through the chain split into two halves ("cores"), the same with
the halves merged once and kept in the eval cache ("halves": the fastest at one row), or a dense
matmul with the rebuilt weight ("dense", cached in eval mode). The choice is a plan memoised per
(weight, rows, dtype, device, mode), so a repeated call plans nothing.

The eval-mode cache is keyed on the identity, ``_version`` counter and storage of every core: an
optimizer step, ``load_state_dict``, an in-place edit, ``.to()`` or ``functional_call`` invalidate it;
``train()`` drops it; it is never copied.

int8 cores (:func:`mpolstm.quantize`): every core is rounded in place onto an int8 grid with one
float32 scale per slice along its larger bond (the right one on a tie; :func:`core_scale_shape`),
core = (q.float() * scale).to(dtype) with q in [-127, 127]. The scales are buffers of a small module
per weight, ``<weight>_scales.<k>`` (``scales.<k>``) beside ``<weight>_cores.<k>``, so they follow
``state_dict`` and deepcopy, and stay float32 under ``.to(dtype)``. Every layer's ``mpo_config`` then
carries ``"int8": true`` and its ``from_config`` creates the scale buffers: both are wrapped once
here (:meth:`MPOWeights.__init_subclass__`), so the layers know nothing of int8. Compute stays
float32 on the dequantized cores.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import mpo as mpo_math
from ..mpo import MPO, TruncationReport
from .sparse import SUFFIX as SPARSE
from .sparse import add_sparse_product, load_sparse_config, sparse_config, sparse_params, sparse_parts, with_sparse

__all__ = ["MPOWeights", "SingleWeightMPO", "check_positive_int", "core_scale_shape", "default_factors",
           "dequantize_int8", "halves_matmul", "init_cores_", "merged_halves", "quantize_core", "quantize_int8",
           "resolve_factors", "set_factorized"]

Factors = tuple[tuple[int, ...], tuple[int, ...]]
Halves = Tuple[Tensor, Tensor, int, int, int, int, int]  # see halves_matmul
FactorSpec = Mapping[str, tuple[Sequence[int] | None, Sequence[int] | None]]


# ----------------------------------------------------------------------------- factors and init


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def resolve_factors(in_features: int, out_features: int, in_factors: Sequence[int] | None,
                    out_factors: Sequence[int] | None, num_cores: int) -> Factors:
    """Default or validate the (in, out) factorisations of a layer's weight.

    Raises ValueError when they do not multiply to the feature sizes, differ in length, or
    cannot split the matrix usefully (every core but one would have i_k = j_k = 1)."""
    in_f = tuple(in_factors) if in_factors is not None else mpo_math.factorize(in_features, num_cores)
    out_f = tuple(out_factors) if out_factors is not None else mpo_math.factorize(out_features, len(in_f))
    for name, factors, total in (("in_factors", in_f, in_features), ("out_factors", out_f, out_features)):
        if any(isinstance(f, bool) or not isinstance(f, int) or f < 1 for f in factors):
            raise ValueError(f"{name} must be positive integers, got {factors!r}")
        if math.prod(factors) != total:
            raise ValueError(f"{name}={factors} multiply to {math.prod(factors)}, expected {total}")
    if len(in_f) != len(out_f):
        raise ValueError(f"in_factors {in_f} and out_factors {out_f} must have the same length")
    if len(in_f) > 1 and sum(i * j > 1 for i, j in zip(in_f, out_f)) < 2:
        raise ValueError(
            f"factors in={in_f} out={out_f} leave all but one core trivial, so the MPO cannot "
            f"compress ({in_features}x{out_features} has too few prime factors); pass factors "
            "explicitly or use fewer cores")
    return in_f, out_f


def default_factors(in_features: int, out_features: int, num_cores: int) -> Factors:
    """Balanced factors with ``num_cores`` cores, or fewer when the sizes have too few prime
    factors for that many non-trivial cores (a single core is a dense matrix)."""
    for n in range(num_cores, 1, -1):
        try:
            return resolve_factors(in_features, out_features, None, None, n)
        except ValueError:
            continue
    return (in_features,), (out_features,)


def init_cores_(cores: Sequence[Tensor], target_std: float) -> None:
    """Fill cores with N(0, s^2) so that every entry of the rebuilt matrix has variance
    ``target_std**2``: Var(W) = prod_k s^2 * prod_k D_k, so s^2 = (target^2 / prod D)^(1/n)."""
    n = len(cores)
    bond_product = math.prod(mpo_math.bond_dims(cores))
    core_std = (target_std**2 / bond_product) ** (1.0 / (2 * n))
    with torch.no_grad():
        for c in cores:
            c.normal_(0.0, core_std)


def _empty_cores(in_f: Sequence[int], out_f: Sequence[int], bonds: Sequence[int], **kw) -> list[Tensor]:
    d = (1, *bonds, 1)
    return [torch.empty(d[k], int(i), int(j), d[k + 1], **kw) for k, (i, j) in enumerate(zip(in_f, out_f))]


# ----------------------------------------------------------------------------- half-chain kernels


def merged_halves(cores: Sequence[Tensor]) -> list[Tensor]:
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


def prepare_halves(cores: Sequence[Tensor]) -> Halves:
    """The chain merged into two halves L (I_L, J_L, D) and R (D, I_R, J_R), as the operands of
    :func:`halves_matmul` (a one-core chain is L with R the 1 x 1 identity)."""
    if len(cores) == 1:
        _, i, j, _ = cores[0].shape
        return cores[0][0, :, :, 0].T.contiguous(), cores[0].new_ones(1, 1), i, 1, j, 1, 1
    left, right = merged_halves(cores)
    _, il, jl, d = left.shape
    _, ir, jr, _ = right.shape
    return (left[0].reshape(il, jl * d).T.contiguous(), right[..., 0].reshape(d * ir, jr).contiguous(),
            il, ir, jl, jr, d)


def halves_matmul(x: Tensor, prepared: Halves) -> Tensor:
    """x (N, I_L I_R) @ W with W[(a, b), (c, e)] = sum_d L[a, c, d] R[d, b, e], the chain merged into
    two halves given as ``prepared`` = (L^T (J_L D, I_L), R (D I_R, J_R), I_L, I_R, J_L, J_R, D): two
    matmuls, (J_L D, I_L) x (N, I_L, I_R), then (N J_L, D I_R) x (D I_R, J_R). TorchScript-compatible."""
    lt, r, il, ir, jl, jr, d = prepared
    if ir == 1 and jl == 1:  # a rank-D factorization (I, D) x (D, J): two plain matmuls
        return torch.mm(torch.mm(x, lt.t()), r)
    n = x.shape[0]
    mid = torch.matmul(lt, x.reshape(n, il, ir))  # (N, J_L * D, I_R)
    return (mid.reshape(n * jl, d * ir) @ r).reshape(n, jl * jr)


# ----------------------------------------------------------------------------- int8 grids


def quantize_int8(t: Tensor, dims: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
    """Symmetric int8 of ``t`` (any shape): (q int8 of t's shape, scale float32), t ~ q * scale with
    q in [-127, 127]. One scale per slice: max |t| over ``dims`` / 127, those dims kept with size 1
    (the scale broadcasts against q); ``dims=None``: one scale, shape (1,). A slice whose scale would
    be 0 (all zeros) gets 1. Raises ValueError for non-finite values."""
    x = t.detach().float()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("cannot quantize non-finite values to int8")
    if x.numel() == 0:
        peak = torch.zeros(1 if dims is None else [1 if d in dims else n for d, n in enumerate(x.shape)])
    else:
        peak = x.abs().amax().reshape(1) if dims is None else x.abs().amax(dim=tuple(dims), keepdim=True)
    scale = peak / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(x / scale).clamp_(-127, 127).to(torch.int8), scale


def dequantize_int8(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(q.float() * scale).to(dtype)``: the one expression that turns int8 values back into floats
    (quantize, save and load all use it, so a round trip is bit-exact)."""
    return (q.float() * scale.float()).to(dtype)


def core_scale_shape(shape: Sequence[int]) -> tuple[int, int, int, int]:
    """Shape of the scales of a core (D_l, i, j, D_r): one per slice along its larger bond, (D_l, 1, 1, 1)
    when D_l > D_r, else (1, 1, 1, D_r); the edge cores (a bond of 1) thus get one scale per slice of
    their inner bond."""
    left, _, _, right = shape
    return (left, 1, 1, 1) if left > right else (1, 1, 1, right)


def quantize_core(core: Tensor) -> tuple[Tensor, Tensor]:
    """A core's int8 values and its scales of :func:`core_scale_shape` (float32)."""
    return quantize_int8(core, [d for d, n in enumerate(core_scale_shape(core.shape)) if n == 1])


class _Scales(nn.Module):
    """The float32 scales of one weight's int8 cores as buffers "0", "1", ... (kept float32 by ``.to``)."""

    def __init__(self, scales: Sequence[Tensor]) -> None:
        super().__init__()
        for k, scale in enumerate(scales):
            self.register_buffer(str(k), scale.detach().to(torch.float32).contiguous())

    def _apply(self, fn, recurse=True):
        for key, buf in self._buffers.items():
            moved = fn(buf)
            self._buffers[key] = moved if moved.dtype == torch.float32 else buf.to(moved.device)
        return self


def _int8_config(mpo_config: Callable) -> Callable:
    """A layer's ``mpo_config`` with ``"int8": true`` added for an int8 module."""

    @functools.wraps(mpo_config)
    def wrapped(self) -> dict[str, Any]:
        config = mpo_config(self)
        if self.int8:
            config["int8"] = True
        return config

    return wrapped


def _int8_from_config(from_config: Callable) -> classmethod:
    """A layer's ``from_config`` (the function under its classmethod) that also creates placeholder
    scale buffers when the config has ``"int8": true``."""

    @functools.wraps(from_config)
    def wrapped(cls, config: Mapping[str, Any]):
        layer = from_config(cls, config)
        flag = config.get("int8", False)
        if not isinstance(flag, bool):
            raise ValueError(f"config field 'int8' must be true or false, got {flag!r}")
        if flag:
            layer._set_scales({name: [torch.ones(core_scale_shape(c.shape), device=c.device)
                                      for c in layer._cores(name)] for name in layer._weight_shapes})
        return layer

    return classmethod(wrapped)


# ----------------------------------------------------------------------------- the base


class MPOWeights(nn.Module):
    """Machinery of every MPO module (see the module docstring). A subclass declares its weights
    with :meth:`_init_weights` (or :meth:`_add_weight` one at a time) in its constructor and gets
    the MPO-module protocol's ``mpo_weights`` / ``reports`` / ``factors``, rebuild, products,
    conversions from dense weights or ready MPOs, and the config of the cores."""

    _weight_shapes: dict[str, tuple[int, int]]

    def __init_subclass__(cls, **kwargs) -> None:
        """Wrap a layer's own ``mpo_config`` / ``from_config`` once, so that they record and restore
        int8 cores (see the module docstring)."""
        super().__init_subclass__(**kwargs)
        if "mpo_config" in cls.__dict__:
            cls.mpo_config = _int8_config(cls.__dict__["mpo_config"])
        if isinstance(cls.__dict__.get("from_config"), classmethod):
            cls.from_config = _int8_from_config(cls.__dict__["from_config"].__func__)

    # -- construction --------------------------------------------------------------------
    def _start_weights(self, num_cores: int) -> None:
        check_positive_int("num_cores", num_cores)
        self.num_cores = num_cores
        self._weight_shapes = {}
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
        cores = _empty_cores(in_f, out_f, mpo_math.capped_bond_dims(in_f, out_f, bond_dim), device=device,
                             dtype=dtype)
        init_cores_(cores, std)
        setattr(self, self._cores_attr(name), nn.ParameterList(nn.Parameter(c) for c in cores))

    def _init_weights(self, shapes: Mapping[str, tuple[int, int]], bond_dim: int, factors: FactorSpec | None,
                      num_cores: int, std: float, device=None, dtype=None) -> None:
        """Create the cores of every weight (shapes (out, in)); ``factors`` pins layouts by name."""
        check_positive_int("bond_dim", bond_dim)
        self._start_weights(num_cores)
        given = dict(factors or {})
        unknown = sorted(set(given) - set(shapes))
        if unknown:
            raise ValueError(f"factors given for unknown weights {unknown}; the weights are {list(shapes)}")
        for name, shape in shapes.items():
            self._add_weight(name, shape, bond_dim, given.get(name), std, device, dtype)

    @staticmethod
    def _cores_attr(name: str) -> str:
        return f"{name}_cores"

    # -- MPO-module protocol -------------------------------------------------------------
    def mpo_weights(self) -> dict[str, nn.ParameterList]:
        """torch weight name -> its cores (the MPO of W^T: input side i, output side j)."""
        return {name: self._modules[self._cores_attr(name)] for name in self._weight_shapes}

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

    def _weights_config(self) -> dict[str, dict[str, list[int]]]:
        """Per weight: in_factors, out_factors, bond_dims, and "sparse" (its sparse residual's entry
        count, layout "lowrank+sparse"; "sparse_int8" when its values are int8) when it has one."""
        sparse = sparse_config(self)
        return {name: {"in_factors": list(in_f), "out_factors": list(out_f),
                       "bond_dims": list(mpo_math.bond_dims(self.mpo_weights()[name])), **sparse.get(name, {})}
                for name, (in_f, out_f) in self.factors.items()}

    def _load_weights_config(self, weights: Mapping[str, Any], std: float) -> None:
        """Replace every weight's cores by fresh ones of exactly the configured shapes."""
        if not isinstance(weights, Mapping) or set(weights) != set(self._weight_shapes):
            got = sorted(weights) if isinstance(weights, Mapping) else weights
            raise ValueError(f"config has weights {got}, expected {sorted(self._weight_shapes)}")
        for name, spec in weights.items():
            self._set_mpo(name, MPO(_config_cores(name, spec, std)))
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

    # -- int8 cores ----------------------------------------------------------------------
    @property
    def int8(self) -> bool:
        """True once :func:`mpolstm.quantize` put the cores on int8 grids (their scales are buffers)."""
        return all(self._scales_attr(name) in self._modules for name in self._weight_shapes)

    def _scales_attr(self, name: str) -> str:
        return self._cores_attr(name).removesuffix("cores") + "scales"

    def _set_scales(self, scales: Mapping[str, Sequence[Tensor]]) -> None:
        for name, values in scales.items():
            setattr(self, self._scales_attr(name), _Scales(values))

    @torch.no_grad()
    def _quantize_int8_(self) -> None:
        """Round every core in place onto its int8 grid (:func:`quantize_core`) and keep the scales."""
        scales = {}
        for name in self._weight_shapes:
            scales[name] = []
            for core in self._cores(name):
                q, scale = quantize_core(core)
                core.copy_(dequantize_int8(q, scale, core.dtype))
                scales[name].append(scale)
        self._set_scales(scales)
        for part in sparse_parts(self).values():  # the hybrid's sparse values: one scale each
            part.quantize_()

    def _int8_keys(self) -> dict[str, str]:
        """{state_dict key of each core (and of int8 sparse values): that of its scales} of an int8 module
        (io reads and writes these)."""
        keys = {f"{self._cores_attr(n)}.{k}": f"{self._scales_attr(n)}.{k}"
                for n in self._weight_shapes for k in range(len(self._cores(n)))}
        return keys | {f"{n}{SPARSE}.values": f"{n}{SPARSE}.scale" for n, p in sparse_parts(self).items() if p.int8}

    @torch.no_grad()
    def _int8_values(self) -> dict[str, tuple[Tensor, Tensor]]:
        """{core key: (q int8, scales)} of an int8 module, the q from its stored scales; ValueError when
        a core is no longer on its grid (trained or replaced after quantize)."""
        out = {}
        for name in self._weight_shapes:
            scales = list(self._modules[self._scales_attr(name)]._buffers.values())
            cores = self._cores(name)
            for k, core in enumerate(cores):
                scale = scales[k] if len(scales) == len(cores) else None
                q = None
                if scale is not None and tuple(scale.shape) == core_scale_shape(core.shape):
                    q = torch.round(core.float() / scale).clamp_(-127, 127).to(torch.int8)
                if q is None or not torch.equal(dequantize_int8(q, scale, core.dtype), core):
                    raise ValueError(f"{type(self).__name__}: {self._cores_attr(name)}.{k} is no longer on its "
                                     "int8 grid (trained or edited after quantize); call mpolstm.quantize(model) "
                                     "again")
                out[f"{self._cores_attr(name)}.{k}"] = (q.cpu(), scale.cpu())
        for name, part in sparse_parts(self).items():
            if part.int8:
                try:
                    out[f"{name}{SPARSE}.values"] = part.int8_values()
                except ValueError as exc:
                    raise ValueError(f"{type(self).__name__}: {name}{SPARSE}: {exc}") from None
        return out

    # -- weights -------------------------------------------------------------------------
    def _cores(self, name: str) -> list[Tensor]:
        return list(self._modules[self._cores_attr(name)]._parameters.values())  # the ParameterList, fast

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
        None when caching is not allowed (training, or a graph to the cores is being recorded)."""
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

    def _plan(self, name: str, rows: int, cached: bool) -> tuple:
        """The cost model's choice for ``rows`` rows times weight ``name``: ("cores", split),
        ("halves",) (eval cache only) or ("dense",)."""
        cores = self._cores(name)
        cost = mpo_math.matmul_cost(rows, cores, weight_cached=cached)
        options = {("cores", mpo_math.best_split(cores, rows)): cost["cores"]}
        if not self.factorized:
            options[("dense",)] = cost["rebuild"]
        if cached and len(cores) > 1:  # prepared once: no per-call merging (for two cores: contiguous copies)
            with torch.no_grad():
                options[("halves",)] = mpo_math.matmul_cost(rows, merged_halves(cores))["cores"]
        return min(options, key=lambda k: (options[k], k != ("halves",)))

    def _plan_for(self, x: Tensor, name: str, cache: dict[str, Any] | None) -> tuple:
        """The memoised plan for ``x``'s rows, dtype and device, in training or eval mode: in eval
        mode it lives in the cache (emptied when a core changes); in training mode it is checked
        against the core shapes (a TT-rounding may replace cores)."""
        rows = int(x.shape[0])  # a plain int also while tracing (the plan is a Python decision)
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
            if bias is not None and prepared[3] == 1 and prepared[4] == 1:  # rank-D: (x A) B + b in two ops
                if torch.onnx.is_in_onnx_export():  # MatMul + Add: int8 tools quantize MatMul, not Gemm with a bias
                    return torch.matmul(torch.matmul(x, prepared[0].t()), prepared[1]) + bias
                return torch.addmm(bias, torch.mm(x, prepared[0].t()), prepared[1])
            out = halves_matmul(x, prepared)
        else:
            out = mpo_math.split_matmul(x, self._cores(name), plan[1])
        out = add_sparse_product(self, name, x, out)
        return out if bias is None else out + bias

    def _halves(self, name: str, cache: dict[str, Any] | None) -> Halves:
        """The merged halves of weight ``name`` (:func:`prepare_halves`): from the eval cache, or
        built from the cores (differentiable) without one."""
        if cache is None:
            return prepare_halves(self._cores(name))
        halves = cache.setdefault("halves", {})
        if name not in halves:
            with torch.no_grad():
                halves[name] = prepare_halves(self._cores(name))
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
    cores = _empty_cores(in_f, out_f, bonds)
    init_cores_(cores, std)
    return cores


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

    def _config_of_cores(self) -> dict[str, Any]:
        """The cores' part of the config: in_factors, out_factors, bond_dims."""
        return self._weights_config()["weight"]

    def _load_config_of_cores(self, config: Mapping[str, Any], std: float) -> None:
        keys = ("in_factors", "out_factors", "bond_dims", "sparse", "sparse_index", "sparse_int8")
        self._load_weights_config({"weight": {k: config[k] for k in keys if k in config}}, std)
