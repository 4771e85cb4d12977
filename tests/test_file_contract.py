"""Every file mpolstm writes equals its model at every shape it declares (issue 31): the dynamic axes
come from the model (eager mode at other sizes), the file is run in its own runtime at batch 1 and 3+
and at lengths 1, the example's and a longer one, a fixed axis refuses other sizes in its runtime,
and a file that differs is not written."""

import copy
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from mpolstm import CompressionConfig, compress
from mpolstm.export import export_model, export_step, file_weight_bytes, runtime_weight_bytes
from mpolstm.export.trace import ExportJob, export_copy, flatten
from mpolstm.export.verify import check_shapes, probe_axes, write_verified
from mpolstm.nn import MPOLSTM
from onnx_models import export_tagger
from test_contract import SAMPLES, TYPES, Host, _sequence, host

TUTORIAL = Path(__file__).resolve().parent.parent / "docs" / "tutorial.md"


def tutorial_model():
    """The tutorial's Speller (its first code block), compressed 4x, and one batch (feats, tokens)."""
    scope = {}
    exec(TUTORIAL.read_text().split("```python")[1].split("```")[0], scope)
    model, _ = compress(scope["model"], CompressionConfig(target_ratio=4))
    return model.eval(), scope["batches"][0]


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_tutorial_onnx_declares_the_token_axis_fixed_and_refuses_other_lengths(tmp_path):
    """Before: the token axis was declared dynamic and length 10 silently returned 6 steps; the
    Conv1d input's channels were dynamic and its time fixed."""
    model, (feats, tokens) = tutorial_model()
    session = _session(export_model(model, tmp_path / "sp.onnx", "onnx", (feats, tokens)))
    dims = {i.name: i.shape for i in session.get_inputs()}
    assert dims["input0"][1] == 40 and isinstance(dims["input0"][0], str) and isinstance(dims["input0"][2], str)
    assert dims["input1"] == [dims["input0"][0], 6]  # one batch for both inputs; the unrolled loop: fixed
    with pytest.raises(Exception, match="invalid dimensions"):
        session.run(None, {"input0": feats.numpy(), "input1": torch.randint(0, 64, (8, 10)).numpy()})
    for batch, length in ((1, 1), (3, 50)):
        x, t = torch.randn(batch, 40, length), torch.randint(0, 64, (batch, 6))
        got = session.run(None, {"input0": x.numpy(), "input1": t.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(got), model(x, t), rtol=1e-4, atol=1e-5)


def test_tutorial_torchscript_guards_the_fixed_token_axis(tmp_path):
    model, (feats, tokens) = tutorial_model()
    loaded = torch.jit.load(str(export_model(model, tmp_path / "sp.ts", "torchscript", (feats, tokens))))
    with pytest.raises(Exception, match="axis 1 is fixed at 6 in this file, got 10"):
        loaded(feats, torch.randint(0, 64, (8, 10)))
    x, t = torch.randn(3, 40, 50), torch.randint(0, 64, (3, 6))
    torch.testing.assert_close(loaded(x, t), model(x, t), rtol=1e-4, atol=1e-5)


def test_channels_first_input_has_fixed_channels_and_dynamic_length(tmp_path):
    """Before: "every axis but the last" made a Conv1d input's channels dynamic and its length fixed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(12, 16, 3, padding=1), nn.ReLU(), nn.Conv1d(16, 8, 1))
    model, _ = compress(model, CompressionConfig(target_ratio=2))
    session = _session(export_model(model, tmp_path / "c.onnx", "onnx", torch.randn(2, 12, 9)))
    shape = session.get_inputs()[0].shape
    assert isinstance(shape[0], str) and shape[1] == 12 and isinstance(shape[2], str)
    x = torch.randn(5, 12, 31)
    torch.testing.assert_close(torch.from_numpy(session.run(None, {"input0": x.numpy()})[0]), model.eval()(x),
                               rtol=1e-4, atol=1e-5)


def test_probe_groups_a_batch_shared_by_inputs_even_beside_an_equal_size():
    """A step's frame (N, F) and states (layers, N, H) with N == layers: one batch group, found by eager mode."""
    lstm = MPOLSTM(8, 16, num_layers=2, bond_dim=4)
    job_inputs = (torch.randn(2, 8), torch.randn(2, 2, 16), torch.randn(2, 2, 16))

    class Step(nn.Module):
        def forward(self, frame, h, c):
            out, (h, c) = lstm.step(frame, (h, c))
            return out, h, c

    axes = probe_axes(Step(), job_inputs)
    assert axes.groups == {(0, 0): [(0, 0), (1, 1), (2, 1)]}
    assert axes.outputs == [{0}, {1}, {1}]


def test_aoti_step_runs_at_any_batch(tmp_path):
    """Before: exported at frame (2, 64) and called with (5, 64) and (2, 5, 256) states, the package
    returned (2, 256) and states off by 0.76, without an error."""
    torch.manual_seed(0)
    lstm = MPOLSTM(64, 256, num_layers=2, bond_dim=8).eval()
    path = export_step(lstm, tmp_path / "s.pt2", "aoti", frame=torch.zeros(2, 64))
    assert file_weight_bytes(path) <= 1.05 * runtime_weight_bytes(lstm)  # each weight once (issue 31, bytes)
    package = torch._inductor.aoti_load_package(str(path))
    for batch in (5, 1):
        frame, h, c = torch.randn(batch, 64), torch.randn(2, batch, 256), torch.randn(2, batch, 256)
        out, (h2, c2) = lstm.step(frame, (h, c))
        got = package(frame, h, c)
        for g, w in zip(got, (out, h2, c2)):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_a_file_that_differs_is_not_written(tmp_path):
    """The verification itself: a runtime that returns other values (or runs at a fixed size) is caught."""
    model = nn.Linear(4, 3)
    job = ExportJob(export_copy(model, "factorized"), (torch.randn(2, 4),))

    def build(job, axes):
        return b"file", axes

    def wrong(data, job):
        return lambda inputs: [job.module(*inputs) + 1e-2]

    target = tmp_path / "f.bin"
    with pytest.raises(ValueError, match="the test file of Linear does not equal the model: .*nothing was written"):
        write_verified(job, target, build, wrong, "test")
    assert not target.exists()
    axes = probe_axes(job.module, job.inputs)
    bad, problems = check_shapes(wrong(b"", job), job.module, job.inputs, axes, 1e-4)
    assert bad == {(0, 0)} and re.search(r"on inputs \(2, 4\) output 0 differs by", problems[0])
    axes = axes.fixing([(0, 0)])
    _, problems = check_shapes(lambda inputs: [job.module(*inputs)], job.module, job.inputs, axes, 1e-4)
    assert re.search(r"axis 0 of input 0 is fixed at 2 in the file, but the file runs at 4", problems[0])


# --- int8 has one meaning: the MPO factors (mpolstm.quantize), dense layers only when asked by name ---


def test_int8_on_a_float_model_quantizes_the_factors_in_export_step_and_export_model(tmp_path):
    """Before: "found no product of an int8 MPO module in the exported graph to quantize"."""
    from mpolstm import quantize
    from mpolstm.export import int8_report

    torch.manual_seed(0)
    lstm = MPOLSTM(16, 32, num_layers=2, bond_dim=4).eval()
    step = export_step(lstm, tmp_path / "step.onnx", int8=True, frame=torch.zeros(2, 16))
    report = int8_report(step)
    assert report["factor_bytes"] > 0 and report["relative_error"] < 0.1
    assert not lstm.int8  # the caller's model is left float
    reference = quantize(copy.deepcopy(lstm))
    frame, h, c = torch.randn(3, 16), torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    got = _session(step).run(None, {"frame": frame.numpy(), "state0": h.numpy(), "state1": c.numpy()})[0]
    want = reference.step(frame, (h, c))[0].detach()
    assert float(np.linalg.norm(got - want.numpy())) < 0.1 * float(want.norm())
    whole = export_model(lstm, tmp_path / "whole.onnx", "onnx", torch.randn(2, 5, 16), int8=True)
    assert int8_report(whole)["factor_bytes"] > 0


def test_int8_refusals_name_a_path_that_works(tmp_path):
    torch.manual_seed(0)
    lstm = MPOLSTM(16, 32, bond_dim=4).eval()
    with pytest.raises(ValueError, match="int8=True, but the dense format writes float32 weights: export to onnx or "
                                         "executorch") as info:
        export_model(lstm, tmp_path / "dense", "dense", int8=True)
    assert "has int8 cores" not in str(info.value)
    with pytest.raises(ValueError, match="int8=True, but the torchscript format holds float32 factors.*export to "
                                         "onnx or executorch"):
        export_model(lstm, tmp_path / "m.ts", "torchscript", torch.randn(2, 3, 16), int8=True)
    with pytest.raises(ValueError, match="has no MPO module: compress it first"):
        export_model(nn.Linear(4, 2), tmp_path / "l.onnx", "onnx", torch.randn(2, 4), int8=True)
    assert not any(tmp_path.iterdir())


def test_onnx_save_int8_means_the_factors_and_int8_dense_every_matmul(tmp_path):
    """Before: mpolstm.onnx.save(int8=True) quantized every MatMul, the dense head included, and said
    only "MatMul weights int8"."""
    import json

    import onnx

    import mpolstm.onnx as mo
    export_tagger(tmp_path / "t.onnx", nn.LSTM, False)
    model, _ = compress(mo.load(tmp_path / "t.onnx"), CompressionConfig(max_bond=4))
    heads = {"inp", "out"}

    def quantized(path):
        model = onnx.load(str(path))
        facts = json.loads({p.key: p.value for p in model.metadata_props}["mpolstm"])
        return {n.name for n in model.graph.node if n.op_type == "MatMulInteger"}, model.graph, facts

    names_f, graph_f, facts_f = quantized(mo.save(model, tmp_path / "f.onnx", int8=True))
    names_d, _, facts_d = quantized(mo.save(model, tmp_path / "d.onnx", int8_dense=True))
    assert names_f and len(names_d) > len(names_f)
    assert [n for n in graph_f.node if n.op_type in ("MatMul", "Gemm") and any(h in n.name for h in heads)]
    assert (facts_f["int8"], facts_f["int8_dense"], facts_d["int8_dense"]) == (True, False, True)
    with pytest.raises(ValueError, match="no layer of the model is compressed: compress it first, or pass "
                                         "int8_dense=True"):
        mo.save(mo.load(tmp_path / "t.onnx"), tmp_path / "none.onnx", int8=True)


def test_cli_export_int8_on_a_float_model(tmp_path):
    """Before: ``--format onnx --int8`` stopped with "found no product of an int8 MPO module", and
    ``--format dense --int8`` said the float model "has int8 cores"."""
    from typer.testing import CliRunner

    from mpolstm.harness.cli import app
    from mpolstm.harness.tasks import save_model
    from mpolstm.harness.tasks.seqcls import SeqClassifier

    spec = {"name": "seqcls", "kwargs": {"num_classes": 3, "hidden_size": 16, "input_size": 8, "vocab_size": None}}
    model, _ = compress(SeqClassifier(3, 16, input_size=8), CompressionConfig(target_modules=["lstm"], max_bond=4))
    save_model(model, spec, tmp_path / "m")
    runner = CliRunner()
    done = runner.invoke(app, ["export", str(tmp_path / "m"), "--format", "onnx", "--int8", "--out",
                               str(tmp_path / "q.onnx")])
    assert done.exit_code == 0 and "MPO factors int8" in done.output, done.output
    refused = runner.invoke(app, ["export", str(tmp_path / "m"), "--format", "dense", "--int8", "--out",
                                  str(tmp_path / "dense")])
    assert refused.exit_code == 2 and "has int8 cores" not in refused.output
    assert "--int8, but the dense format writes float32 weights: export to onnx or executorch" in \
        refused.output.replace("\n", " ")
    assert not (tmp_path / "dense").exists()


# --- the contract over the registry: layer x layout x format x (batch, length), forward and step ---

FORMATS = ("onnx", "executorch", "aoti", "torchscript", "dense")
LAYOUTS = ("auto", "lowrank", "interleaved", "lowrank+sparse", "int8")
SUFFIX = {"onnx": ".onnx", "executorch": ".pte", "aoti": ".pt2", "torchscript": ".ts", "dense": ""}
# (batch axis, length axis) of each sample's input
AXES = {nn.Linear: (0, 1), nn.Embedding: (0, 1), nn.LSTM: (0, 1), nn.GRU: (1, 0), nn.RNN: (0, 1),
        nn.LSTMCell: (1, 0), nn.GRUCell: (1, 0), nn.RNNCell: (1, 0), nn.Conv1d: (0, 2), nn.Conv2d: (0, 2)}
CASES = [(t, layout, fmt) for t in TYPES for layout in LAYOUTS for fmt in FORMATS
         if not (t is nn.Embedding and layout == "lowrank+sparse")]
# the default suite: one case per layer type, the layouts and the quick formats in turn (ExecuTorch
# lowerings and AOTInductor compiles take tens of seconds: test_aoti_step_runs_at_any_batch and
# tests/test_pt2.py cover them there); the whole grid is slow
DIAGONAL = [(t, LAYOUTS[k % 4 if t is nn.Embedding else k % 5], ("onnx", "torchscript", "dense")[k % 3])
            for k, t in enumerate(TYPES)]


def _compressed(model, layout):
    from mpolstm import quantize

    model, _ = compress(model, CompressionConfig(target_ratio=2, layout="auto" if layout == "int8" else layout))
    return quantize(model).eval() if layout == "int8" else model.eval()


def _runner(fmt, path, torch_type=None):
    """The written file in its own runtime, as a function of tensors -> list of tensors."""
    if fmt == "onnx":
        session = _session(path)
        names = [i.name for i in session.get_inputs()]
        return lambda *xs: [torch.from_numpy(y) for y in session.run(None, {n: x.numpy() for n, x in zip(names, xs)})]
    if fmt == "executorch":
        from executorch.runtime import Runtime

        program = Runtime.get().load_program(Path(path).read_bytes())
        method = program.load_method("forward")
        return lambda *xs: list(method.execute(list(xs))) if program else None
    if fmt == "aoti":
        package = torch._inductor.aoti_load_package(str(path))
        return lambda *xs: list(package(*xs))
    if fmt == "torchscript":
        module = torch.jit.load(str(path))
        return lambda *xs: flatten(module(*xs))
    from mpolstm import io

    dense = io.load(path, host(torch_type)).eval()
    return lambda *xs: [dense(*xs)]


def _sample(torch_type, batch, length, seed):
    torch.manual_seed(seed)
    x = SAMPLES[torch_type][1](batch)
    axis = AXES[torch_type][1]
    if length is not None and length != x.shape[axis]:
        shape = list(x.shape)
        shape[axis] = length
        x = torch.randint(0, 30, shape) if not x.is_floating_point() else torch.randn(shape)
    return x


def _equal_or_refused(run, want_of, inputs, rtol, must_run):
    """The file's outputs equal eager mode's, or its runtime refuses the inputs (never a silent difference);
    ``must_run``: refusing is a failure too."""
    try:
        got = run(*inputs)
    except Exception:
        assert not must_run, f"refused inputs {[tuple(x.shape) for x in inputs]}"
        return
    want = want_of(*inputs)
    for g, w in zip(got, want, strict=True):
        assert tuple(g.shape) == tuple(w.shape), (tuple(g.shape), tuple(w.shape))
        assert float((g.double() - w.double()).norm()) <= rtol * float(w.double().norm()) + 1e-5


def _check_forward(torch_type, layout, fmt, tmp_path):
    model = _compressed(host(torch_type), layout)
    x = _sample(torch_type, 2, None, 1)
    int8 = layout == "int8" and fmt in ("onnx", "executorch")
    kwargs = {} if int8 or layout != "int8" else {"int8": False}
    if int8 and fmt == "onnx" and torch_type is nn.Conv1d:  # factors as Conv nodes: no MatMul to quantize
        with pytest.raises(ValueError, match=r"\(MPOConv1d\).*pass int8=False for float32 factors, or export to "
                                             "executorch"):
            export_model(model, tmp_path / "m.onnx", fmt, x)
        return
    path = export_model(model, tmp_path / f"m{SUFFIX[fmt]}", fmt, None if fmt == "dense" else x, **kwargs)
    run, rtol = _runner(fmt, path, torch_type), 0.1 if int8 else 1e-4
    length = x.shape[AXES[torch_type][1]]
    for k, (batch, size) in enumerate([(b, n) for b in (1, 3) for n in (1, length, length + 4)]):
        must_run = fmt != "executorch" and size == length
        with torch.no_grad():
            _equal_or_refused(run, lambda *xs: [model(*xs)], (_sample(torch_type, batch, size, k),), rtol, must_run)


def _check_step(kind, layout, fmt, tmp_path):
    cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind]
    torch.manual_seed(0)
    layer = _compressed(Host(cls(12, 16, num_layers=2, batch_first=True), 16, _sequence), layout).layer
    int8 = layout == "int8" and fmt in ("onnx", "executorch")
    kwargs = {} if int8 or layout != "int8" else {"int8": False}
    run = _runner(fmt, export_step(layer, tmp_path / f"s{SUFFIX[fmt]}", fmt, frame=torch.zeros(2, 12), **kwargs))

    def eager(frame, *state):
        out, new = layer.step(frame, tuple(state) if len(state) > 1 else state[0])
        return [out, *(new if isinstance(new, tuple) else (new,))]

    for batch in (1, 2, 3):
        states = [torch.randn(2, batch, 16) for _ in range(2 if kind == "lstm" else 1)]
        with torch.no_grad():
            _equal_or_refused(run, eager, (torch.randn(batch, 12), *states), 0.1 if int8 else 1e-4,
                              fmt != "executorch" or batch == 2)


@pytest.mark.parametrize("torch_type,layout,fmt", DIAGONAL, ids=lambda v: getattr(v, "__name__", v))
def test_file_equals_its_model_on_the_grid(torch_type, layout, fmt, tmp_path):
    _check_forward(torch_type, layout, fmt, tmp_path)


@pytest.mark.parametrize("kind,layout,fmt", [("lstm", "int8", "onnx"), ("gru", "lowrank+sparse", "onnx"),
                                             ("rnn", "interleaved", "torchscript")])
def test_step_file_equals_the_step_at_every_batch(kind, layout, fmt, tmp_path):
    _check_step(kind, layout, fmt, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("torch_type,layout,fmt", CASES, ids=lambda v: getattr(v, "__name__", v))
def test_file_equals_its_model_on_the_whole_grid(torch_type, layout, fmt, tmp_path):
    _check_forward(torch_type, layout, fmt, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "dense"])
def test_step_file_equals_the_step_on_the_whole_grid(kind, layout, fmt, tmp_path):
    _check_step(kind, layout, fmt, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["executorch", "aoti"])
def test_tutorial_model_exported_whole(fmt, tmp_path):
    model, (feats, tokens) = tutorial_model()
    run = _runner(fmt, export_model(model, tmp_path / f"sp{SUFFIX[fmt]}", fmt, (feats, tokens)))
    for batch, length in ((8, 30), (3, 50), (1, 1)):
        x, t = torch.randn(batch, 40, length), torch.randint(0, 64, (batch, 6))
        with torch.no_grad():
            _equal_or_refused(run, lambda *xs: [model(*xs)], (x, t), 1e-4, fmt == "aoti" or (batch, length) == (8, 30))
