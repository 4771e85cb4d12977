"""The one table of layer-mapped ONNX operators: every entry is what load, run and write use, and a
name registered twice is refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("onnx")

import mpolstm.onnx as mo  # noqa: E402
from mpolstm.onnx.registry import LAYER_OPS, register  # noqa: E402
from tests.onnx_models import recurrent_graph  # noqa: E402


def test_registering_a_name_twice_is_an_error():
    entry = LAYER_OPS["LSTM"]
    with pytest.raises(ValueError, match="layer operator 'LSTM' is already registered"):
        register(entry)
    with pytest.raises(ValueError, match="'Conv' is already registered"):
        register(dataclasses.replace(LAYER_OPS["Conv"], recurrent=True))
    assert LAYER_OPS["LSTM"] is entry and not LAYER_OPS["Conv"].recurrent
    assert sorted(LAYER_OPS) == ["Conv", "GRU", "Gemm", "LSTM", "MatMul"]
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
