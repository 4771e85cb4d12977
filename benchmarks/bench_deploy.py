"""Deployment: the per-frame step of a 2-layer LSTM as shipped, in torch eager and in onnxruntime,
against dense float and dense int8 in the same runtime.

    python benchmarks/bench_deploy.py                      # 2x512 and 2x1024, 10x / 30x, N = 1, 8, 32
    python benchmarks/bench_deploy.py --quick              # 2x256, fewer rounds (smoke run)
    python benchmarks/bench_deploy.py --g2p                # the g2p-en decoder's GRU (256 -> 256, 1 layer)
    python benchmarks/bench_deploy.py --hybrid 10 --ratios 10   # with the lowrank+sparse hybrid rows
    python benchmarks/bench_deploy.py --out results/bench_deploy.json
    python benchmarks/bench_deploy.py --pt2 --out results/bench_deploy_pt2.json   # the PyTorch 2 rows

``--g2p`` times one decoding step of g2p-en's decoder instead: a one-layer GRU, input 256 (the
phoneme embedding), hidden 256, with the same rows (the torch float step is ``torch.gru_cell``).

One torch thread and one onnxruntime thread, input 256 (the speech front end). Rows:

- ``dense``: ``torch.lstm_cell`` per layer (the fastest dense step on CPU; nn.LSTM on a length-1
  sequence costs several times more), in eager and exported (MatMul chains) to onnxruntime.
- ``dense int8``: eager, ``torch.ao`` dynamic quantization (its LSTM on a length-1 sequence, the
  only path torch has); onnxruntime, ``onnxruntime.quantization.quantize_dynamic`` of the dense step.
- ``mpo Rx``: ``compress(lstm, CompressionConfig(target_ratio=R))``, the layout search by error alone
  (as it chooses on these random weights); ``latency Rx``: ``compress(..., target_ratio=R,
  max_macs=dense MACs / R)``. Both in the factorized runtime: eager ``MPOLSTM.step`` with
  ``set_factorized``, onnxruntime ``mpolstm.export.export_step``.
- ``... int8``: in torch eager, the same with ``mpolstm.quantize`` (int8 cores as stored; computed
  on the dequantized floats); in onnxruntime, the factorized step quantized as dense int8 is
  (``onnxruntime.quantization.quantize_dynamic``: int8 factors, int8 matmuls).
- ``latency Rx`` in ``torchscript``: the same step exported with ``export_step(..., fmt="torchscript")``
  and loaded with ``torch.jit.load`` (compared with torch eager's dense int8; its run-time bytes
  are not measured: "-").
- ``hybrid Rx`` (``--hybrid R``): ``layout="lowrank+sparse"``, half the budget sparse, in the
  factorized runtime (eager: the sparse parts in CSR; onnxruntime: held dense, stored as sparse
  initializers); ``hybrid-bytes latency``: the latency model at the hybrid's stored bytes.
- ``latency Rx rebuild`` (onnxruntime only): the same MPO exported with the dense runtime
  (``export_onnx(..., runtime="dense")`` of a length-1 sequence: the graph rebuilds the dense weights
  from the cores on every call, then runs ONNX's LSTM op).

``--pt2``: the PyTorch 2 runtimes instead of onnxruntime and TorchScript, at N = 1 (one step
file per batch size; the eager rows as above, in the same process):

- ``executorch``: ``export_step(..., fmt="executorch")`` (.pte, XNNPACK delegate, one XNNPACK
  thread) run by ExecuTorch's runtime: ``dense`` and ``dense int8`` are the dense step written as
  linear ops (``DenseLinearStep``; lstm_cell is one op pt2e cannot quantize), float and quantized by
  the same pt2e XNNPACK flow as ``latency Rx int8`` (``int8=True``); ratios to ExecuTorch's dense int8.
  ``outside`` lists the ops the delegate did not take. ``latency Rx unfolded`` is the step lowered as
  first tried (issue 24): the merged halves built from the cores inside the program, not folded.
- ``aoti``: ``export_step(..., fmt="aoti")`` loaded with ``torch._inductor.aoti_load_package``;
  ``compiled``: ``torch.compile`` of the eager step (Inductor, ``freezing=True`` so the merged halves
  are folded once); both against torch eager's dense int8. ``compile_s`` is the export or first call.

Columns: bytes of the LSTM weights as stored (``mpolstm.storage``; the file for onnxruntime),
weight bytes held at run time (eager: parameters + the factorized runtime's merged halves;
onnxruntime: initializers and constants), MACs per step at batch 1, the step time at N = 1 and
the throughput in frames/s at N = 8 and 32 streams stepped as one batch, and the ratio to dense int8
in the same runtime. Timings do not depend on the weights' values, so the LSTM is randomly
initialised. Rounds are interleaved (a load spike hits every row); each figure is the minimum over
rounds of a round's median.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import mpolstm
from mpolstm.compression import CompressionConfig, compress
from mpolstm.export import export_onnx, export_step, onnx_weight_bytes
from mpolstm.harness.tasks.base import lstm_cell_step
from mpolstm.nn.base import set_factorized
from mpolstm.storage import pack_weights, packed_bytes

INPUT = 256


def gru_cell_step(gru: nn.GRU, x: torch.Tensor, h: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of a unidirectional nn.GRU via ``torch.gru_cell`` per layer (its fast dense path)."""
    h = x.new_zeros(gru.num_layers, x.shape[0], gru.hidden_size) if h is None else h
    hs = []
    for k in range(gru.num_layers):
        x = torch.gru_cell(x, h[k], getattr(gru, f"weight_ih_l{k}"), getattr(gru, f"weight_hh_l{k}"),
                           getattr(gru, f"bias_ih_l{k}"), getattr(gru, f"bias_hh_l{k}"))
        hs.append(x)
    return x, torch.stack(hs)


class DenseStep(nn.Module):
    """A dense nn.LSTM / nn.GRU (or torch.ao's quantized one) with ``step(frame, state)``: the torch
    cell per layer in eager mode for the float layer; a length-1 sequence otherwise and for export."""

    def __init__(self, lstm: nn.Module, cell_path: bool) -> None:
        super().__init__()
        self.lstm, self.cell_path = lstm, cell_path
        self.input_size = INPUT

    def step(self, frame, state=None):
        if self.cell_path:
            return (lstm_cell_step if isinstance(self.lstm, nn.LSTM) else gru_cell_step)(self.lstm, frame, state)
        out, state = self.lstm(frame[None], state)
        return out[0], state


class SequenceOfOne(nn.Module):
    """forward(frame, *state) -> (output, *state): the layer on a length-1 sequence (for the rebuild
    export); the state is (h, c) for an LSTM, h for a GRU."""

    def __init__(self, lstm: nn.Module) -> None:
        super().__init__()
        self.lstm = lstm

    def forward(self, frame, *state):
        out, new = self.lstm(frame[None], state if len(state) > 1 else state[0])
        return (out[0], *new) if isinstance(new, tuple) else (out[0], new)


class Host(nn.Module):
    """The recurrent layer as the model compress and quantize act on."""

    def __init__(self, lstm: nn.Module) -> None:
        super().__init__()
        self.lstm = lstm


def stored_bytes(host: Host) -> int:
    quantized = any(getattr(m, "int8", False) for m in host.modules())
    return packed_bytes(pack_weights(host, ["lstm"], int8_cores=quantized)[0])


def eager_weight_bytes(module: nn.Module) -> int:
    """Parameters and buffers, plus the tensors of every MPO module's eval cache (merged halves, sparse
    parts in CSR)."""
    total = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    for m in module.modules():
        cache = getattr(m, "_cache", None)
        if cache:
            for halves in cache[2].get("halves", {}).values():
                total += sum(t.numel() * t.element_size() for t in halves if isinstance(t, torch.Tensor))
            for p in cache[2].get("sparse", {}).values():  # a sparse part in CSR (or dense)
                parts = (p.values(), p.col_indices(), p.crow_indices()) if p.layout == torch.sparse_csr else (p,)
                total += sum(t.numel() * t.element_size() for t in parts)
    if hasattr(module, "lstm") and hasattr(module.lstm, "_weight_bias"):  # torch.ao's packed int8 LSTM
        total = sum(w.numel() for w in dict(module.lstm._weight_bias()["weight"]).values())
    return total


def dynamic_int8(host: Host) -> Host:
    """torch.ao's dynamic int8 quantization of the host's LSTM / GRU (deprecated in torch 2.13 in
    favour of torchao, which has no CPU recurrent path: the warning is silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(copy.deepcopy(host).eval(), {nn.LSTM, nn.GRU}, dtype=torch.qint8)


def variants(hidden: int, ratios: list[float], cell: type[nn.RNNBase] = nn.LSTM, layers: int = 2,
             seed: int = 0, hybrid_ratio: float | None = None) -> dict[str, tuple[nn.Module, int, int]]:
    """name -> (a module with step(), stored bytes, MACs per step at batch 1); an "... int8" entry holds
    the eager int8 model (torch.ao's, or mpolstm.quantize's); onnxruntime quantizes the float one."""
    torch.manual_seed(seed)
    dense = cell(INPUT, hidden, num_layers=layers).eval()
    dense_macs = sum(p.numel() for n, p in dense.named_parameters() if n.startswith("weight"))
    out = {"dense": (DenseStep(dense, True), stored_bytes(Host(dense)), dense_macs)}
    int8 = dynamic_int8(Host(dense))
    out["dense int8"] = (DenseStep(int8.lstm, False), stored_bytes(int8), dense_macs)
    for ratio in ratios:
        for name, config in ((f"mpo {ratio:g}x", CompressionConfig(target_ratio=ratio)),
                             (f"latency {ratio:g}x", CompressionConfig(target_ratio=ratio,
                                                                       max_macs=int(dense_macs / ratio)))):
            host, report = compress(Host(copy.deepcopy(dense)), config)
            lstm = set_factorized(host.lstm).eval()
            out[name] = (lstm, stored_bytes(host), report.macs)
            if hasattr(mpolstm, "quantize"):
                qhost = mpolstm.quantize(copy.deepcopy(host))
                out[f"{name} int8"] = (set_factorized(qhost.lstm).eval(), stored_bytes(qhost), report.macs)
    if hybrid_ratio:
        out.update(hybrid_variants(dense, dense_macs, hybrid_ratio))
    return out


def hybrid_variants(dense: nn.Module, dense_macs: int, ratio: float) -> dict[str, tuple[nn.Module, int, int]]:
    """"hybrid Rx": lowrank+sparse at ``ratio`` (half the budget sparse), in the factorized runtime;
    "hybrid-bytes latency": the latency model (``max_macs``) at the hybrid's stored bytes."""
    config = CompressionConfig(target_ratio=ratio, layout="lowrank+sparse", sparse_share=0.5)
    host, report = compress(Host(copy.deepcopy(dense)), config)
    out = {f"hybrid {ratio:g}x": (set_factorized(host.lstm).eval(), stored_bytes(host), report.macs)}
    same = 4 * dense_macs / stored_bytes(host)  # float32 factors: the ratio that stores as many bytes
    host, report = compress(Host(copy.deepcopy(dense)), CompressionConfig(target_ratio=same,
                                                                          max_macs=int(dense_macs / same)))
    out["hybrid-bytes latency"] = (set_factorized(host.lstm).eval(), stored_bytes(host), report.macs)
    return out


def torch_fn(module: nn.Module, rows: int):
    frame = torch.randn(rows, INPUT)
    with torch.no_grad():
        state = module.step(frame, None)[1]

    def run():
        with torch.no_grad():
            module.step(frame, state)
    return run


def ort_fn(module: nn.Module, rows: int, folder: Path, name: str, quantize: bool = False, rebuild: bool = False):
    import onnxruntime as ort

    path = folder / f"{name.replace(' ', '_')}.onnx"
    if rebuild:
        zeros = torch.zeros(module.num_layers, 1, module.hidden_size)
        state = (zeros, zeros) if module.mode == "LSTM" else (zeros,)
        export_onnx(SequenceOfOne(module), (torch.zeros(1, INPUT), *state), path, runtime="dense")
    else:
        export_step(module, path, frame=torch.zeros(1, INPUT))
    if quantize:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantized = path.with_suffix(".int8.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.disable(logging.WARNING)  # onnxruntime logs a pre-processing hint per call
            quantize_dynamic(str(path), str(quantized), weight_type=QuantType.QInt8)
            logging.disable(logging.NOTSET)
        path = quantized
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    frame = torch.randn(rows, INPUT)
    with torch.no_grad():
        state = as_tuple(module.step(frame, None)[1])
    feeds = dict(zip([i.name for i in session.get_inputs()], [frame.numpy(), *(s.numpy() for s in state)]))

    def run():
        session.run(None, feeds)
    return run, path.stat().st_size, onnx_weight_bytes(path)


def as_tuple(state) -> tuple[torch.Tensor, ...]:
    """A step's state as a tuple of tensors ((h, c) for an LSTM, (h,) for a GRU)."""
    return state if isinstance(state, tuple) else (state,)


def torchscript_fn(module: nn.Module, rows: int, folder: Path, name: str):
    """The step exported by ``export_step(..., fmt="torchscript")``, loaded back with torch.jit."""
    path = folder / f"{name.replace(' ', '_')}.pt"
    export_step(module, path, fmt="torchscript", frame=torch.zeros(1, INPUT))
    scripted = torch.jit.load(str(path))
    frame = torch.randn(rows, INPUT)
    with torch.no_grad():
        state = as_tuple(module.step(frame, None)[1])

    def run():
        with torch.no_grad():
            scripted(frame, *state)
    return run, path.stat().st_size


class DenseLinearStep(nn.Module):
    """The dense LSTM step as linear ops and mpolstm's gates (what pt2e quantizes and XNNPACK runs)."""

    def __init__(self, lstm: nn.LSTM) -> None:
        super().__init__()
        self.lstm, self.input_size = lstm, lstm.input_size

    def step(self, frame, state=None):
        from mpolstm.nn.gates import cell_update

        n, layers = frame.shape[0], self.lstm.num_layers
        h, c = state if state is not None else (frame.new_zeros(layers, n, self.lstm.hidden_size),) * 2
        hs, cs, x = [], [], frame
        for k in range(layers):
            gi = nn.functional.linear(x, getattr(self.lstm, f"weight_ih_l{k}"), getattr(self.lstm, f"bias_ih_l{k}"))
            gh = nn.functional.linear(h[k], getattr(self.lstm, f"weight_hh_l{k}"), getattr(self.lstm, f"bias_hh_l{k}"))
            x, c_new = cell_update("LSTM", gi, gh, h[k], c[k])
            hs.append(x)
            cs.append(c_new)
        return x, (torch.stack(hs), torch.stack(cs))


def executorch_fn(module: nn.Module, rows: int, int8: bool):
    """The step lowered to ExecuTorch (XNNPACK): (run, .pte bytes, ops outside the delegate, seconds)."""
    from executorch.runtime import Runtime

    from mpolstm.export.pt2 import lower_executorch
    from mpolstm.export.step import _Step
    from mpolstm.export.trace import export_copy

    work = export_copy(module, "factorized")
    frame = torch.randn(rows, INPUT)
    with torch.no_grad():
        state = as_tuple(work.step(frame, None)[1])
    start = time.perf_counter()
    buffer, outside = lower_executorch(_Step(work, False), (frame, *state), int8)
    seconds = time.perf_counter() - start
    program = Runtime.get().load_program(buffer)  # the method needs its program (and the bytes) alive
    method, inputs = program.load_method("forward"), [frame, *state]
    return (lambda: (program, buffer) and method.execute(inputs)), len(buffer), outside, seconds


def executorch_unfolded_fn(module: nn.Module, rows: int):
    """The factorized step lowered to ExecuTorch as first tried (issue 24): the merged halves built
    from the cores inside the program, no constant folding. (run, ops outside the delegate)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    from mpolstm.export.pt2 import outside_delegate
    from mpolstm.export.step import _Step
    from mpolstm.export.trace import export_copy

    work = export_copy(module, "factorized")
    frame = torch.randn(rows, INPUT)
    with torch.no_grad():
        state = as_tuple(work.step(frame, None)[1])
        edge = to_edge_transform_and_lower(torch.export.export(_Step(work, False), (frame, *state)),
                                           partitioner=[XnnpackPartitioner()])
    buffer = edge.to_executorch().buffer
    program = Runtime.get().load_program(buffer)
    method, inputs = program.load_method("forward"), [frame, *state]
    return (lambda: (program, buffer) and method.execute(inputs)), len(buffer), outside_delegate(edge)


def aoti_fn(module: nn.Module, rows: int, folder: Path, name: str):
    """The step as an AOTInductor package: (run, package bytes, export + compile seconds)."""
    path = folder / f"{name.replace(' ', '_')}.pt2"
    start = time.perf_counter()
    export_step(module, path, fmt="aoti", frame=torch.zeros(rows, INPUT))
    seconds = time.perf_counter() - start
    runner = torch._inductor.aoti_load_package(str(path))
    frame = torch.randn(rows, INPUT)
    with torch.no_grad():
        state = as_tuple(module.step(frame, None)[1])
    return (lambda: runner(frame, *state)), path.stat().st_size, seconds


def compiled_fn(module: nn.Module, rows: int):
    """``torch.compile`` of the eager step with Inductor's freezing: (run, first-call seconds)."""
    import torch._inductor.config as inductor_config

    frame = torch.randn(rows, INPUT)
    with torch.no_grad():
        state = module.step(frame, None)[1]
    step = torch.compile(module.step)
    with torch.no_grad(), inductor_config.patch(freezing=True):
        start = time.perf_counter()
        step(frame, state)
        seconds = time.perf_counter() - start

    def run():
        with torch.no_grad():
            step(frame, state)
    return run, seconds


def median_seconds(fn, min_time: float) -> float:
    fn()
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < min_time or len(times) < 5:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(hidden: int, ratios: list[float], batches: list[int], rounds: int, min_time: float,
            cell: type[nn.RNNBase] = nn.LSTM, layers: int = 2, hybrid_ratio: float | None = None) -> list[dict]:
    models = variants(hidden, ratios, cell, layers, hybrid_ratio=hybrid_ratio)
    rows, fns = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (module, stored, macs) in models.items():
            for n in batches:
                fns[("torch", name, n)] = torch_fn(module, n)
                exported = models[name.removesuffix(" int8")][0]  # onnxruntime quantizes the float model
                run, file_bytes, ort_bytes = ort_fn(exported, n, Path(tmp), f"{name}-{n}", name.endswith("int8"))
                fns[("onnxruntime", name, n)] = run
                if n == batches[0]:
                    rows += [{"runtime": "torch", "model": name, "stored_bytes": stored, "macs": macs,
                              "runtime_bytes": eager_weight_bytes(module)},
                             {"runtime": "onnxruntime", "model": name, "stored_bytes": file_bytes, "macs": macs,
                              "runtime_bytes": ort_bytes}]
                if name.startswith("latency") and not name.endswith("int8"):
                    run, file_bytes = torchscript_fn(module, n, Path(tmp), f"{name}-{n}")
                    fns[("torchscript", name, n)] = run
                    if n == batches[0]:
                        rows.append({"runtime": "torchscript", "model": name, "stored_bytes": file_bytes,
                                     "macs": macs, "runtime_bytes": None})
                    run, file_bytes, ort_bytes = ort_fn(module, n, Path(tmp), f"{name}-{n}-rebuild", rebuild=True)
                    fns[("onnxruntime", f"{name} rebuild", n)] = run
                    if n == batches[0]:
                        rows.append({"runtime": "onnxruntime", "model": f"{name} rebuild", "stored_bytes": file_bytes,
                                     "macs": macs, "runtime_bytes": ort_bytes})
        best = {key: float("inf") for key in fns}
        for _ in range(rounds):
            for key, fn in fns.items():
                best[key] = min(best[key], median_seconds(fn, min_time))
    for row in rows:
        for n in batches:
            seconds = best[(row["runtime"], row["model"], n)]
            int8 = best[("torch" if row["runtime"] == "torchscript" else row["runtime"], "dense int8", n)]
            row[f"n{n}"] = {"step_us": 1e6 * seconds, "frames_per_s": n / seconds, "speedup_vs_int8": int8 / seconds}
        row["hidden"], row["cell"], row["layers"] = hidden, cell.__name__, layers
    return rows


def measure_pt2(hidden: int, ratios: list[float], rounds: int, min_time: float) -> list[dict]:
    """The PyTorch 2 rows at N = 1 (module docstring), with torch eager's in the same process."""
    models = variants(hidden, ratios)
    dense = models["dense"][0].lstm
    dense_macs = models["dense"][2]
    rows, fns = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ["dense", "dense int8"] + [f"latency {r:g}x{q}" for r in ratios for q in ("", " int8")]:
            module, stored, macs = models[name]
            fns[("torch", name)] = torch_fn(module, 1)
            rows.append({"runtime": "torch", "model": name, "stored_bytes": stored, "macs": macs,
                         "runtime_bytes": eager_weight_bytes(module)})
            source = DenseLinearStep(dense) if name.startswith("dense") else models[name.removesuffix(" int8")][0]
            run, size, outside, seconds = executorch_fn(source, 1, name.endswith("int8"))
            fns[("executorch", name)] = run
            rows.append({"runtime": "executorch", "model": name, "stored_bytes": size, "macs": macs or dense_macs,
                         "runtime_bytes": None, "outside": outside, "compile_s": seconds})
            if name == f"latency {ratios[0]:g}x":
                run, size, outside = executorch_unfolded_fn(module, 1)
                fns[("executorch", f"{name} unfolded")] = run
                rows.append({"runtime": "executorch", "model": f"{name} unfolded", "stored_bytes": size, "macs": macs,
                             "runtime_bytes": None, "outside": outside})
            if name.startswith("latency") and not name.endswith("int8"):
                run, size, seconds = aoti_fn(module, 1, Path(tmp), name)
                fns[("aoti", name)] = run
                rows.append({"runtime": "aoti", "model": name, "stored_bytes": size, "macs": macs,
                             "runtime_bytes": None, "compile_s": seconds})
                run, seconds = compiled_fn(module, 1)
                fns[("compiled", name)] = run
                rows.append({"runtime": "compiled", "model": name, "stored_bytes": stored, "macs": macs,
                             "runtime_bytes": None, "compile_s": seconds})
        best = {key: float("inf") for key in fns}
        for _ in range(rounds):
            for key, fn in fns.items():
                best[key] = min(best[key], median_seconds(fn, min_time))
    for row in rows:
        seconds = best[(row["runtime"], row["model"])]
        int8 = best[("executorch" if row["runtime"] == "executorch" else "torch", "dense int8")]
        row["n1"] = {"step_us": 1e6 * seconds, "frames_per_s": 1 / seconds, "speedup_vs_int8": int8 / seconds}
        row["hidden"], row["cell"], row["layers"] = hidden, "LSTM", 2
    return rows


def print_pt2_table(rows: list[dict]) -> None:
    print("| hidden | runtime | model | file bytes | N=1: us / x int8 | compile s | outside the delegate |")
    print("|" + "---|" * 7)
    for r in rows:
        outside = ", ".join(f"{k.split('.')[-2] if '.' in k else k} x{v}" for k, v in r.get("outside", {}).items())
        compile_s = f"{r['compile_s']:.1f}" if "compile_s" in r else "-"
        print(f"| {r['hidden']} | {r['runtime']} | {r['model']} | {r['stored_bytes']:,} | {r['n1']['step_us']:.0f} / "
              f"{r['n1']['speedup_vs_int8']:.2f}x | {compile_s} | {outside or '-'} |")


def print_table(rows: list[dict], batches: list[int]) -> None:
    cols = " | ".join(f"N={n}: us / x int8" if n == 1 else f"N={n}: frames/s / x int8" for n in batches)
    print(f"| hidden | runtime | model | stored bytes | run-time weight bytes | MACs/step | {cols} |")
    print("|" + "---|" * (6 + len(batches)))
    for r in rows:
        cells = []
        for n in batches:
            m = r[f"n{n}"]
            main = f"{m['step_us']:.0f}" if n == 1 else f"{m['frames_per_s']:,.0f}"
            cells.append(f"{main} / {m['speedup_vs_int8']:.2f}x")
        held = "-" if r["runtime_bytes"] is None else f"{r['runtime_bytes']:,}"
        print(f"| {r['hidden']} | {r['runtime']} | {r['model']} | {r['stored_bytes']:,} | {held} | "
              f"{r['macs']:,} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2x256, 2 rounds (smoke run)")
    parser.add_argument("--hidden", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--ratios", type=float, nargs="+", default=[10.0, 30.0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds per timed block")
    parser.add_argument("--g2p", action="store_true", help="the g2p-en decoder's GRU: 256 -> 256, one layer")
    parser.add_argument("--hybrid", type=float, default=None, metavar="RATIO",
                        help="add the lowrank+sparse hybrid at RATIO and the latency model at its bytes")
    parser.add_argument("--pt2", action="store_true", help="ExecuTorch, AOTInductor and torch.compile rows (N = 1)")
    parser.add_argument("--out", type=Path, default=Path("results/bench_deploy.json"))
    args = parser.parse_args()
    cell, layers = (nn.GRU, 1) if args.g2p else (nn.LSTM, 2)
    if args.g2p:
        args.hidden = [256]
    if args.quick:
        args.hidden, args.rounds, args.min_time = [256], 2, 0.1
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False  # oneDNN re-lays out LSTM weights on every one-step call
    if args.pt2:
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

        _unsafe_reset_threadpool(1)  # XNNPACK's threads: one, as torch's and onnxruntime's
        rows = [r for hidden in args.hidden for r in measure_pt2(hidden, args.ratios, args.rounds, args.min_time)]
        print_pt2_table(rows)
    else:
        rows = [r for hidden in args.hidden for r in measure(hidden, args.ratios, args.batches, args.rounds,
                                                              args.min_time, cell, layers, args.hybrid)]
        print_table(rows, args.batches)
    report = {"torch": torch.__version__, "machine": platform.processor() or platform.machine(), "threads": 1,
              "input": INPUT, "cell": cell.__name__, "layers": layers, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
