"""Files written by torch's own ONNX exporters enter: a user model (embedding -> 2-layer LSTM -> linear)
and a GRU model, exported by torch.onnx.export's default (dynamo) exporter, by it without its optimizer
(the LSTM / GRU weights then computed by Slice / Concat / Shape nodes: folded by onnxscript at load)
and by the TorchScript exporter (dynamo=False). Each file loads equal to onnxruntime within 1e-5,
compresses, and is written back with its input, output and node names."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402

import mpolstm  # noqa: E402
import mpolstm.onnx as mo  # noqa: E402
from onnx_models import run_ort  # noqa: E402


class Tagger(nn.Module):
    """Token ids [batch, time] -> Embedding(20, 8) -> ``cell`` (2 layers of 16 for the LSTM) -> Linear(16, 5)."""

    def __init__(self, cell: str) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.rnn = nn.LSTM(8, 16, num_layers=2, batch_first=True) if cell == "lstm" else nn.GRU(8, 16, batch_first=True)
        self.out = nn.Linear(16, 5)

    def forward(self, tokens):
        y, _ = self.rnn(self.emb(tokens))
        return self.out(y)


# (model, exporter): the dynamo exporter makes the time axis of a GRU static (its trace fixes it)
EXPORTS = [("lstm", "dynamo"), ("gru", "dynamo"), ("gru", "dynamo-unoptimized"), ("lstm", "torchscript"),
           ("gru", "torchscript")]


def _export(cell: str, exporter: str, path) -> Tagger:
    torch.manual_seed(0)
    model = Tagger(cell).eval()
    tokens = torch.randint(0, 20, (2, 7))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(model, (tokens,), str(path), dynamo=False, input_names=["tokens"],
                              output_names=["logits"], dynamic_axes={"tokens": {0: "batch", 1: "time"}})
        else:
            axes = {0: "batch", 1: "time"} if cell == "lstm" else {0: "batch"}
            torch.onnx.export(model, (tokens,), str(path), input_names=["tokens"], output_names=["logits"],
                              dynamic_shapes={"tokens": axes}, optimize=exporter == "dynamo", verbose=False)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("exports")
    return {key: (_export(*key, folder / f"{key[0]}-{key[1]}.onnx"), folder / f"{key[0]}-{key[1]}.onnx")
            for key in EXPORTS}


@pytest.mark.parametrize("key", EXPORTS, ids=["-".join(k) for k in EXPORTS])
def test_exported_file_loads_equal_to_onnxruntime_and_compresses_with_names_kept(exported, tmp_path, key):
    torch_model, path = exported[key]
    original = onnx.load(path)
    if key[1] == "dynamo-unoptimized":  # the weights are computed in the graph: nothing but folding reads them
        layer_node = next(n for n in original.graph.node if n.op_type == "GRU")
        assert layer_node.input[1] not in {t.name for t in original.graph.initializer}
    model = mo.load(path)
    assert len(mo.recurrent_layers(model)) == (2 if key[0] == "lstm" else 1)
    feeds = {"tokens": np.random.default_rng(1).integers(0, 20, (3, 7)).astype(np.int64)}
    with torch.no_grad():
        ours = model(torch.from_numpy(feeds["tokens"])).numpy()
        theirs = torch_model(torch.from_numpy(feeds["tokens"])).numpy()
    assert np.abs(ours - run_ort(path, feeds)[0]).max() < 1e-5 and np.abs(ours - theirs).max() < 1e-5

    mpolstm.compress(model, mpolstm.CompressionConfig(target_modules=mo.recurrent_layers(model), max_bond=4))
    mo.save(model, tmp_path / "small.onnx")
    written = onnx.load(tmp_path / "small.onnx")
    assert [i.name for i in written.graph.input] == ["tokens"] and [o.name for o in written.graph.output] == ["logits"]
    with torch.no_grad():
        compressed = model(torch.from_numpy(feeds["tokens"])).numpy()
    assert np.abs(run_ort(written, feeds)[0] - compressed).max() < 1e-5
    layer_nodes = {s.name for s in model.layers.values()}
    names = {n.name for n in written.graph.node}
    assert not {n.op_type for n in written.graph.node} & {"LSTM", "GRU"}
    if key[1] != "dynamo-unoptimized":  # (folding removed the weight-slicing nodes there)
        kept = {n.name for n in original.graph.node if n.op_type not in ("LSTM", "GRU", "Constant")} - layer_nodes
        assert kept <= names
