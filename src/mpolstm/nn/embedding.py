"""MPOEmbedding: a drop-in nn.Embedding whose table is a Matrix Product Operator.

The MPO represents the table itself (not transposed): rows (the vocabulary) are the
MPO's i side and the embedding dimension its j side, so ``cores_to_matrix(cores)`` gives
the (padded) table (num_rows, embedding_dim). A lookup splits each index into its digits
(i_1..i_n) and contracts the selected core slices, never forming the table.

Vocabulary padding: a vocabulary whose size factors badly (e.g. a prime) is padded with
unused rows up to the nearest size whose balanced factors are all at most twice the ideal
V^(1/n) (10007 -> 10010 = 13*11*7*10 with 4 cores). The extra rows are never looked up;
indices >= num_embeddings are rejected.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from .. import mpo as mpo_math
from ..mpo import MPO
from .base import SingleWeightMPO, check_positive_int
from .registry import LayerType, register

__all__ = ["MPOEmbedding", "embedding_factors"]


def _int_root_ceil(n: int, k: int) -> int:
    r = max(1, round(n ** (1.0 / k)))
    while r**k < n:
        r += 1
    while r > 1 and (r - 1) ** k >= n:
        r -= 1
    return r


def _padded_rows(num_embeddings: int, num_cores: int) -> int:
    """Smallest V' >= V whose balanced factorisation has no factor above 2 * ceil(V^(1/n))."""
    limit = 2 * _int_root_ceil(num_embeddings, num_cores)
    rows = num_embeddings
    while max(mpo_math.factorize(rows, num_cores)) > limit:
        rows += 1
    return rows


def embedding_factors(
    num_embeddings: int,
    embedding_dim: int,
    num_cores: int = 4,
    row_factors: Sequence[int] | None = None,
    dim_factors: Sequence[int] | None = None,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Default or validate the (row, dim) factors of an embedding table.

    ``prod(row_factors)`` may exceed ``num_embeddings`` (padding rows); ``prod(dim_factors)``
    must equal ``embedding_dim``. Raises ValueError when the factors are invalid or leave all
    but one core trivial."""
    for name, value in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim), ("num_cores", num_cores)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    rows = tuple(row_factors) if row_factors is not None else mpo_math.factorize(
        _padded_rows(num_embeddings, num_cores), num_cores)
    dims = tuple(dim_factors) if dim_factors is not None else mpo_math.factorize(embedding_dim, len(rows))
    for name, factors in (("row_factors", rows), ("dim_factors", dims)):
        if not factors or any(isinstance(f, bool) or not isinstance(f, int) or f < 1 for f in factors):
            raise ValueError(f"{name} must be a non-empty sequence of positive integers, got {factors!r}")
    if math.prod(rows) < num_embeddings:
        raise ValueError(f"row_factors={rows} multiply to {math.prod(rows)}, expected at least "
                         f"num_embeddings={num_embeddings}")
    if math.prod(dims) != embedding_dim:
        raise ValueError(f"dim_factors={dims} multiply to {math.prod(dims)}, expected embedding_dim={embedding_dim}")
    if len(rows) != len(dims):
        raise ValueError(f"row_factors {rows} and dim_factors {dims} must have the same length")
    if len(rows) > 1 and sum(i * j > 1 for i, j in zip(rows, dims)) < 2:
        raise ValueError(f"factors rows={rows} dims={dims} leave all but one core trivial, so the MPO "
                         "cannot compress; pass factors explicitly or use fewer cores")
    return rows, dims


def _distinct(values: Tensor) -> tuple[Tensor, Tensor | None]:
    """(distinct values, inverse) so that each row is contracted once; (values, None) under
    torch.compile / torch.export, whose graphs have no shapes that depend on values."""
    if torch.compiler.is_compiling():
        return values, None
    return torch.unique(values, return_inverse=True)


def _digits(rows: Tensor, factors: Sequence[int]) -> list[Tensor]:
    """Row-major digits (i_1..i_n) of ``rows`` (N,) for the given factors."""
    digits = []
    for i in reversed(factors):
        digits.append(rows % i)
        rows = rows // i
    return digits[::-1]


def _left_chain(cores: Sequence[Tensor], digits: Sequence[Tensor]) -> Tensor:
    """G_1[i_1] ... G_k[i_k] for each row: (N, j_1..j_k, D_k)."""
    out = cores[0][0].index_select(0, digits[0])  # (N, j_1, D_1)
    for core, digit in zip(cores[1:], digits[1:]):
        d, i, j, e = core.shape
        sliced = core.permute(1, 0, 2, 3).reshape(i, d, j * e).index_select(0, digit)  # (N, D, j E)
        out = torch.bmm(out, sliced).reshape(out.shape[0], -1, e)
    return out


def _right_chain(cores: Sequence[Tensor], digits: Sequence[Tensor]) -> Tensor:
    """G_k[i_k] ... G_n[i_n] for each row: (N, D_{k-1}, j_k..j_n)."""
    out = cores[-1][..., 0].permute(1, 0, 2).index_select(0, digits[-1])  # (N, D, j_n)
    for core, digit in zip(reversed(cores[:-1]), reversed(digits[:-1])):
        d, i, j, e = core.shape
        sliced = core.permute(1, 0, 2, 3).reshape(i, d * j, e).index_select(0, digit)  # (N, D j, E)
        out = torch.bmm(sliced, out).reshape(out.shape[0], d, -1)
    return out


class MPOEmbedding(SingleWeightMPO):
    """Lookup table (num_embeddings, embedding_dim) stored as an MPO.

    Args:
        num_embeddings, embedding_dim, padding_idx: as nn.Embedding (negative padding_idx
            counts from the end).
        bond_dim: cap on every internal bond (clipped to the largest useful value).
        row_factors, dim_factors: factorisations of the (padded) row count and of
            embedding_dim (default: balanced, ``num_cores`` each; see the module docstring
            for row padding).

    Shapes: input LongTensor/IntTensor of any shape (...) -> output (..., embedding_dim).
    Out-of-range indices raise ValueError. The padding row is a fixed buffer
    ``padding_row`` (zeros from the constructor, the source row in ``from_embedding``): the
    output at ``padding_idx`` is that vector and passes no gradient, as in nn.Embedding.
    From-scratch init: every table entry has variance 1 (nn.Embedding's N(0, 1)).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        bond_dim: int,
        *,
        padding_idx: int | None = None,
        row_factors: Sequence[int] | None = None,
        dim_factors: Sequence[int] | None = None,
        num_cores: int = 4,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_positive_int("bond_dim", bond_dim)
        rows, dims = embedding_factors(num_embeddings, embedding_dim, num_cores, row_factors, dim_factors)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        if padding_idx is not None:
            if isinstance(padding_idx, bool) or not isinstance(padding_idx, int) or not (
                    -num_embeddings <= padding_idx < num_embeddings):
                raise ValueError(f"padding_idx must be an integer in [-{num_embeddings}, {num_embeddings}), "
                                 f"got {padding_idx!r}")
            padding_idx %= num_embeddings
        self.padding_idx = padding_idx
        self._start_weights(num_cores)
        self._add_weight("weight", (embedding_dim, math.prod(rows)), bond_dim, (rows, dims), 1.0, device, dtype)
        if padding_idx is not None:
            self.register_buffer("padding_row", torch.zeros(embedding_dim, device=device, dtype=dtype))
        else:
            self.padding_row = None

    row_factors, dim_factors = SingleWeightMPO.in_factors, SingleWeightMPO.out_factors  # the table's rows, columns

    @property
    def num_rows(self) -> int:
        """Rows of the MPO table: num_embeddings plus padding rows."""
        return math.prod(self.row_factors)

    # -- conversion -----------------------------------------------------------------
    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, max_bond: int | None = None, rel_tol: float | None = None, *,
                       row_factors: Sequence[int] | None = None, dim_factors: Sequence[int] | None = None,
                       num_cores: int = 4, mpos: Mapping[str, MPO] | None = None) -> "MPOEmbedding":
        """Decompose an nn.Embedding's table by TT-SVD (exact with neither ``max_bond`` nor
        ``rel_tol``). The table is zero-padded to ``num_rows`` and its padding row is zeroed
        before the decomposition (the row is kept exactly in ``padding_row``), so
        ``report.rel_error`` is measured on the other rows. ``mpos={"weight": mpo}`` uses an
        already decomposed MPO of the padded table (num_rows, embedding_dim) instead."""
        if not isinstance(embedding, nn.Embedding):
            raise ValueError(f"from_embedding expects an nn.Embedding, got {type(embedding).__name__}")
        for flag in ("max_norm", "sparse", "scale_grad_by_freq"):
            if getattr(embedding, flag):
                raise ValueError(f"nn.Embedding with {flag}={getattr(embedding, flag)!r} is not supported by "
                                 "MPOEmbedding (its rows are not stored separately)")
        weight = embedding.weight
        v, d = weight.shape
        if mpos is not None:
            decomposed = mpos["weight"]
            rows, dims = embedding_factors(v, d, decomposed.num_cores, decomposed.in_factors, decomposed.out_factors)
        else:
            rows, dims = embedding_factors(v, d, num_cores, row_factors, dim_factors)
            with torch.no_grad():
                decomposed = mpo_math.decompose(
                    cls.table_for_decomposition(embedding, math.prod(rows)), rows, dims,
                    max_bond=max_bond, rel_tol=rel_tol)
        layer = cls(v, d, 1, padding_idx=embedding.padding_idx, row_factors=rows, dim_factors=dims,
                    device=weight.device, dtype=weight.dtype)
        layer._set_mpo("weight", decomposed)
        if layer.padding_row is not None:
            layer.padding_row.copy_(weight.detach()[layer.padding_idx])
        return layer.train(embedding.training)

    @staticmethod
    def table_for_decomposition(embedding: nn.Embedding, num_rows: int) -> Tensor:
        """The table the MPO approximates: (num_rows, dim), padding row and extra rows zero."""
        weight = embedding.weight.detach()
        table = torch.zeros(num_rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
        table[: weight.shape[0]] = weight
        if embedding.padding_idx is not None:
            table[embedding.padding_idx] = 0
        return table

    @classmethod
    def mpo_matrices(cls, embedding: nn.Embedding, num_cores: int = 4) -> dict[str, tuple[Tensor, tuple]]:
        """{"weight": (padded table (num_rows, dim), default factors)} (see ``LayerType.matrices``)."""
        rows, dims = embedding_factors(embedding.num_embeddings, embedding.embedding_dim, num_cores)
        return {"weight": (cls.table_for_decomposition(embedding, math.prod(rows)), (rows, dims))}

    def to_embedding(self) -> nn.Embedding:
        """A plain nn.Embedding with the rebuilt table."""
        first = self.cores[0]
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx,
                           device=first.device, dtype=first.dtype)
        with torch.no_grad():
            emb.weight.copy_(self.weight)
        return emb.train(self.training)

    # -- MPO-module protocol (used by compress and io); mpo_weights()["weight"] is the padded
    # table itself (rows on the i side, not transposed) -------------------------------------
    _factor_keys = ("row_factors", "dim_factors")

    def _config_args(self) -> dict[str, Any]:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "padding_idx": self.padding_idx}

    @classmethod
    def _args_from_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        return {"num_embeddings": int(config["num_embeddings"]), "embedding_dim": int(config["embedding_dim"]),
                "padding_idx": config["padding_idx"], "row_factors": tuple(config["row_factors"]),
                "dim_factors": tuple(config["dim_factors"])}

    # -- use ------------------------------------------------------------------------
    @property
    def weight(self) -> Tensor:
        """The rebuilt table (num_embeddings, embedding_dim) with the padding row, differentiable."""
        table = mpo_math.cores_to_matrix(list(self.cores))[: self.num_embeddings]
        if self.padding_row is None:
            return table
        keep = torch.ones(self.num_embeddings, 1, dtype=table.dtype, device=table.device)
        keep[self.padding_idx] = 0
        return table * keep + (1 - keep) * self.padding_row

    @property
    def num_params(self) -> int:
        return sum(c.numel() for c in self.cores)

    @property
    def compression_ratio(self) -> float:
        """Dense table entries / MPO core entries."""
        return self.num_embeddings * self.embedding_dim / self.num_params

    def _gather(self, flat: Tensor) -> Tensor:
        """Rows of the MPO table for indices ``flat`` (N,) -> (N, embedding_dim).

        Row x = p * I_R + s splits into a prefix p over the left half of the cores and a
        suffix s over the right half. Each half is contracted only for the distinct
        prefixes/suffixes present, giving (P, J_L, D) and (S, D, J_R); one batched matmul
        per row joins them into (J_L, J_R), already in the row's row-major layout."""
        cores = list(self.cores)
        if flat.numel() == 0:
            return cores[0].new_zeros(0, self.embedding_dim)
        if len(cores) == 1:
            return cores[0][0, :, :, 0].index_select(0, flat)
        half = (len(cores) + 1) // 2
        right_rows = math.prod(self.row_factors[half:])
        prefix, prefix_inv = _distinct(flat // right_rows)
        suffix, suffix_inv = _distinct(flat % right_rows)
        left = _left_chain(cores[:half], _digits(prefix, self.row_factors[:half]))  # (P, J_L, D)
        right = _right_chain(cores[half:], _digits(suffix, self.row_factors[half:]))  # (S, D, J_R)
        if prefix_inv is not None and suffix_inv is not None:  # both or neither (_distinct)
            left, right = left.index_select(0, prefix_inv), right.index_select(0, suffix_inv)
        return torch.bmm(left, right).reshape(flat.shape[0], self.embedding_dim)

    def forward(self, input: Tensor) -> Tensor:
        if not isinstance(input, Tensor) or input.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"MPOEmbedding expects an integer tensor (int64 or int32) of indices, got "
                             f"{getattr(input, 'dtype', type(input).__name__)}")
        flat = input.reshape(-1).long()
        self._check_indices(flat)
        unique, inverse = _distinct(flat)
        rows = self._gather(unique)
        if inverse is not None:
            rows = rows.index_select(0, inverse)
        if self.padding_row is not None:
            is_pad = (flat == self.padding_idx).unsqueeze(1)
            rows = torch.where(is_pad, self.padding_row.to(rows.dtype), rows)
        return rows.reshape(*input.shape, self.embedding_dim)

    def _check_indices(self, flat: Tensor) -> None:
        """ValueError naming the first bad index; under torch.compile / torch.export an assertion in
        the graph (a graph cannot branch on values)."""
        n = self.num_embeddings
        expected = f"MPOEmbedding with num_embeddings={n}; expected indices in [0, {n})"
        if torch.compiler.is_compiling():
            torch._assert_async(((flat >= 0) & (flat < n)).all(), f"index out of range for {expected}")
        elif flat.numel() > 0:
            low, high = int(flat.min()), int(flat.max())
            if low < 0 or high >= self.num_embeddings:
                raise ValueError(f"index {low if low < 0 else high} is out of range for {expected}")

    def extra_repr(self) -> str:
        bonds = mpo_math.bond_dims(self.cores)
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return (f"{self.num_embeddings}, {self.embedding_dim}{pad}, row_factors={self.row_factors}, "
                f"dim_factors={self.dim_factors}, bond_dims={bonds}, params={self.num_params}, "
                f"compression={self.compression_ratio:.1f}x")


register(LayerType(nn.Embedding, MPOEmbedding, MPOEmbedding.from_embedding, MPOEmbedding.to_embedding,
                   MPOEmbedding.mpo_matrices, lambda embedding, args: [("weight", args[0].reshape(-1))],
                   ("num_embeddings", "embedding_dim", "padding_idx"), "embedding", lambda embedding: ["weight"]))
