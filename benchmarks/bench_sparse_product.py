"""The sparse part's product x @ P^T (layout "lowrank+sparse") in each form it can take, in torch
eager and in onnxruntime: the measurement behind the factorized runtime's choice (nn/sparse.py).

    python benchmarks/bench_sparse_product.py [--hidden 1024] [--ratio 10] [--share 0.5]
        [--out benchmarks/results/sparse_product.json]

The sparse parts are those ``compress(nn.LSTM(256, H, 2), layout="lowrank+sparse")`` fits (random
weights: timings do not depend on the values, the positions are the fit's). Forms, per weight P
(out, in) with k entries at (row r, column c):

- ``dense``: P held as a dense (out, in) matrix, one matmul (MatMul in ONNX): dense memory.
- ``scatter``: x[:, c] * v (N, k), summed into the rows by scatter_add (ONNX ScatterElements with
  reduction "add", opset 16).
- ``ell``: the entries padded per row to the longest row's count m: gather x[:, C] (N, out, m) times
  V (out, m), summed over m (ONNX Gather, Mul, ReduceSum).
- ``csr`` (eager only: no ONNX export of sparse tensors): torch.sparse.mm with P in CSR.

One thread in both runtimes; each figure the minimum over rounds of a round's median, in
microseconds per product summed over the LSTM's four weights, at N = 1, 8, 32 rows.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import torch
from bench_deploy import median_seconds  # this folder is on sys.path when the script runs
from torch import nn

from mpolstm.compression import CompressionConfig, compress
from mpolstm.nn.sparse import sparse_parts


class Dense(nn.Module):
    def __init__(self, part) -> None:
        super().__init__()
        self.register_buffer("p", part.dense().detach().clone())

    def forward(self, x):
        return x @ self.p.T


class Scatter(nn.Module):
    def __init__(self, part) -> None:
        super().__init__()
        rows, cols = part.shape
        self.out = rows
        self.register_buffer("r", part.index // cols)
        self.register_buffer("c", part.index % cols)
        self.register_buffer("v", part.values.detach().clone())

    def forward(self, x):
        contrib = x[:, self.c] * self.v
        return x.new_zeros(x.shape[0], self.out).scatter_add(1, self.r.expand(x.shape[0], -1), contrib)


class Rows(nn.Module):
    """The rows of x^T gathered (k, N), scaled, and summed into the output rows by scatter_add."""

    def __init__(self, part) -> None:
        super().__init__()
        rows, cols = part.shape
        self.out = rows
        self.register_buffer("r", (part.index // cols)[:, None])
        self.register_buffer("c", part.index % cols)
        self.register_buffer("v", part.values.detach().clone()[:, None])

    def forward(self, x):
        contrib = x.T.index_select(0, self.c) * self.v  # (k, N)
        out = x.new_zeros(self.out, x.shape[0]).scatter_add(0, self.r.expand(-1, x.shape[0]), contrib)
        return out.T


class Segment(nn.Module):
    """The rows of x^T gathered (k, N) and scaled, entries in row order: a running sum (float64)
    read at each row's end, minus the previous row's end."""

    def __init__(self, part, dtype=torch.float64) -> None:
        super().__init__()
        rows, cols = part.shape
        counts = torch.bincount(part.index // cols, minlength=rows)
        self.dtype = dtype
        self.register_buffer("ends", torch.cumsum(counts, 0))  # row r's entries end before ends[r] (+1 in csum)
        self.register_buffer("c", part.index % cols)
        self.register_buffer("v", part.values.detach().clone()[:, None].to(dtype))

    def forward(self, x):
        contrib = x.T.index_select(0, self.c).to(self.dtype) * self.v  # (k, N)
        csum = torch.cat([contrib.new_zeros(1, x.shape[0]), contrib.cumsum(0)])
        at = csum.index_select(0, self.ends)  # (out, N): the sum of all entries up to row r
        return torch.cat([at[:1], at[1:] - at[:-1]]).to(x.dtype).T


class Ell(nn.Module):
    def __init__(self, part) -> None:
        super().__init__()
        rows, cols = part.shape
        r, c, v = part.index // cols, part.index % cols, part.values.detach()
        counts = torch.bincount(r, minlength=rows)
        width = int(counts.max())
        slot = torch.arange(r.numel()) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        self.register_buffer("c", torch.zeros(rows, width, dtype=torch.long).index_put_((r, slot), c))
        self.register_buffer("v", torch.zeros(rows, width).index_put_((r, slot), v))

    def forward(self, x):
        return (x[:, self.c] * self.v).sum(-1)


class Csr(nn.Module):
    def __init__(self, part) -> None:
        super().__init__()
        self.p = part.dense().detach().to_sparse_csr()

    def forward(self, x):
        return torch.sparse.mm(self.p, x.T).T


FORMS = {"dense": Dense, "scatter": Scatter, "rows": Rows, "segment64": Segment,
         "segment32": lambda part: Segment(part, torch.float32), "ell": Ell, "csr": Csr}


def median_us(fn) -> float:
    return 1e6 * median_seconds(fn, 0.2)


def onnx_session(module: nn.Module, x: torch.Tensor):
    import onnxruntime as ort

    buffer = io.BytesIO()
    torch.onnx.export(module, (x,), buffer, dynamo=False, opset_version=17, input_names=["x"],
                      dynamic_axes={"x": {0: "n"}})
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ratio", type=float, default=10.0)
    parser.add_argument("--share", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sparse_product.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    host = nn.Sequential(nn.LSTM(256, args.hidden, num_layers=2))
    compress(host, CompressionConfig(target_ratio=args.ratio, layout="lowrank+sparse", sparse_share=args.share))
    parts = list(sparse_parts(host[0]).values())
    nnz, numel = sum(p.nnz for p in parts), sum(p.shape[0] * p.shape[1] for p in parts)
    rows = {}
    for form, cls in FORMS.items():
        modules = [cls(p).eval() for p in parts]
        for n in (1, 8, 32):
            xs = [torch.randn(n, p.shape[1]) for p in parts]
            with torch.no_grad():
                expected = [p.dense() @ x.T for p, x in zip(parts, xs)]
                got = [m(x).T for m, x in zip(modules, xs)]
            assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(expected, got)), form
            sessions = [] if form == "csr" else [onnx_session(m, x) for m, x in zip(modules, xs)]
            best_torch = best_ort = float("inf")
            for _ in range(args.rounds):
                with torch.no_grad():
                    best_torch = min(best_torch, sum(median_us(lambda m=m, x=x: m(x)) for m, x in zip(modules, xs)))
                if sessions:
                    best_ort = min(best_ort, sum(median_us(lambda s=s, x=x: s.run(None, {"x": x.numpy()}))
                                                 for s, x in zip(sessions, xs)))
            rows[f"{form} N={n}"] = {"torch_us": round(best_torch, 1),
                                     "onnxruntime_us": None if not sessions else round(best_ort, 1)}
            print(f"{form:8} N={n:<3} torch {best_torch:9.1f} us   onnxruntime "
                  f"{'-' if not sessions else f'{best_ort:9.1f} us'}", flush=True)
    print(f"LSTM(256, {args.hidden}, 2) at {args.ratio:g}x, share {args.share}: {nnz:,} sparse entries of "
          f"{numel:,} ({nnz / numel:.1%})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"argv": vars(args) | {"out": str(args.out)}, "nnz": nnz, "numel": numel,
                                    "torch": torch.__version__, "threads": 1, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
