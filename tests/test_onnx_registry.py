"""The one table of layer-mapped ONNX operators: every entry is what load, run and write use, and a
name registered twice is refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("onnx")

from tests.onnx_models import recurrent_graph  # noqa: E402

import mpolstm.onnx as mo  # noqa: E402
from mpolstm.onnx.registry import LAYER_OPS, register  # noqa: E402


def test_registering_a_name_twice_is_an_error():
    entry = LAYER_OPS["LSTM"]
    with pytest.raises(ValueError, match="layer operator 'LSTM' is already registered"):
        register(entry)
    with pytest.raises(ValueError, match="'Conv' is already registered"):
        register(dataclasses.replace(LAYER_OPS["Conv"], recurrent=True))
    assert LAYER_OPS["LSTM"] is entry and not LAYER_OPS["Conv"].recurrent
    assert sorted(LAYER_OPS) == ["Conv", "Einsum", "GRU", "Gemm", "LSTM", "MatMul"]
    assert [k for k, e in LAYER_OPS.items() if e.recurrent] == ["LSTM", "GRU"]


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_each_layer_is_the_entry_torch_type_and_runs_through_the_entry(tmp_path, op):
    import onnx

    onnx.save(recurrent_graph(op), tmp_path / "m.onnx")
    model = mo.load(tmp_path / "m.onnx")
    for name, step in model.layers.items():
        entry = LAYER_OPS[step.op]
        assert isinstance(getattr(model, name), entry.torch_types)
        x = torch.randn(4, 2, 6)
        zeros = [torch.zeros(1, 2, 5) for _ in model.inputs[1:]]
        with torch.no_grad():
            outs = entry.run(getattr(model, name), step.spec, [x, None, None])  # absent states: zeros
            whole = model(x, *zeros)
        assert outs[0].shape == (4, 1, 2, 5)
        for got, want in zip(outs, whole):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("equation,weight_shape", [("btgi,gih->btgh", (3, 4, 5)), ("bgi,hgi->bgh", (5, 3, 4))])
def test_grouped_linear_einsum_is_a_compressible_layer_written_back(tmp_path, equation, weight_shape):
    """The Einsum around a grouped RNN: a grouped 1x1 Conv1d equal to onnxruntime, written back dense
    (pruned) in the Einsum's layout and factorized (compressed), both run in onnxruntime."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from tests.onnx_models import run_ort

    import mpolstm

    lead = ["batch", "time"][:len(equation.split(",")[0]) - 2]
    weight = np.random.default_rng(0).standard_normal(weight_shape).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Einsum", ["x", "W"], ["y"], name="group_mix", equation=equation)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*lead, 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*lead, 3, 5])], [numpy_helper.from_array(weight, "W")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]), tmp_path / "m.onnx")
    model = mo.load(tmp_path / "m.onnx")
    assert type(model.group_mix).__name__ == "Conv1d" and model.group_mix.groups == 3
    x = np.random.default_rng(1).standard_normal([2, 7][:len(lead)] + [3, 4]).astype(np.float32)
    want = run_ort(tmp_path / "m.onnx", {"x": x})[0]
    with torch.no_grad():
        np.testing.assert_allclose(model(torch.from_numpy(x)).numpy(), want, atol=1e-5)
    np.testing.assert_allclose(run_ort(onnx.load_from_string(mo.to_bytes(model)), {"x": x})[0], want, atol=1e-5)
    pruned = mo.load(tmp_path / "m.onnx")
    mpolstm.prune.prune_global(pruned, ["group_mix.weight"], 30)
    with torch.no_grad():
        np.testing.assert_allclose(run_ort(onnx.load_from_string(mo.to_bytes(pruned)), {"x": x})[0],
                                   pruned(torch.from_numpy(x)).numpy(), atol=1e-5)
    small, _ = mpolstm.compress(mo.load(tmp_path / "m.onnx"),
                                mpolstm.CompressionConfig(target_modules=["group_mix"], target_ratio=2))
    with torch.no_grad():
        np.testing.assert_allclose(run_ort(onnx.load_from_string(mo.to_bytes(small)), {"x": x})[0],
                                   small(torch.from_numpy(x)).numpy(), atol=1e-4)
