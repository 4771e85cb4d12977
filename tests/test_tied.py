"""Tied weights (a word LM whose decoder reuses the encoder table) stay tied through compress,
training, save/load and dense export, and are counted once."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mpolstm import CompressionConfig, compress, io
from mpolstm.export import densify, export_model
from mpolstm.nn.shared import SharedLinear


class TiedLM(nn.Module):
    """pytorch/examples' word-language model, small, with tie_weights=True."""

    def __init__(self, vocab: int = 200, dim: int = 32):
        super().__init__()
        self.encoder = nn.Embedding(vocab, dim)
        self.rnn = nn.LSTM(dim, dim)
        self.decoder = nn.Linear(dim, vocab)
        self.decoder.weight = self.encoder.weight

    def forward(self, tokens):
        return self.decoder(self.rnn(self.encoder(tokens))[0])


def _model():
    torch.manual_seed(0)
    return TiedLM()


def test_compress_keeps_the_tie_and_counts_it_once():
    model = _model()
    _, report = compress(model, CompressionConfig(target_modules=["encoder", "decoder"], target_ratio=4))
    assert isinstance(model.decoder, SharedLinear) and model.decoder.owner is model.encoder
    assert report.dense_params == 200 * 32  # the one table, not twice
    assert report.ratio == pytest.approx(report.dense_params / report.mpo_params) and report.ratio >= 4
    torch.testing.assert_close(model.decoder.weight, model.encoder.weight)
    # the tied output layer multiplies by the owner's rebuilt (200, 32) table: counted in both figures
    lookup = report.modules[0].weights["weight"]
    assert (lookup.dense_macs, report.modules[-1].name) == (0, "decoder")
    assert (report.dense_macs, report.macs) == (200 * 32, lookup.macs + 200 * 32)
    assert "multiply-adds per step at batch 1: 6,400 ->" in str(report)
    # training updates both uses through the one MPO
    tokens = torch.randint(0, 200, (6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(tokens).logsumexp(-1).mean().backward()
    opt.step()
    torch.testing.assert_close(model.decoder.weight, model.encoder.weight)
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith("decoder.") and n != "decoder.bias" for n in names)


def test_tie_survives_save_load_and_dense_export(tmp_path):
    model = _model()
    compress(model, CompressionConfig(target_modules=["encoder", "decoder"], target_ratio=4))
    tokens = torch.randint(0, 200, (5, 2))
    expected = model(tokens)
    io.save(model, tmp_path / "m")
    loaded = io.load(tmp_path / "m", TiedLM())
    assert loaded.decoder.owner is loaded.encoder
    torch.testing.assert_close(loaded(tokens), expected)
    dense = densify(model)
    assert type(dense.decoder) is nn.Linear and dense.decoder.weight is dense.encoder.weight
    torch.testing.assert_close(dense(tokens), expected, atol=1e-5, rtol=1e-4)
    scripted = torch.jit.load(str(export_model(model, tmp_path / "m.pt", "torchscript", tokens)))
    torch.testing.assert_close(scripted(tokens), expected, atol=1e-5, rtol=1e-4)
    copied = copy.deepcopy(model)
    assert copied.decoder.owner is copied.encoder
    onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    onnx_file = export_model(model.eval(), tmp_path / "m.onnx", "onnx", tokens)
    served = onnxruntime.InferenceSession(str(onnx_file)).run(None, {"input0": tokens.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(served), expected, atol=1e-5, rtol=1e-4)


def test_selecting_one_sharer_names_both():
    with pytest.raises(ValueError, match="'decoder' shares its weight with module 'encoder'"):
        compress(_model(), CompressionConfig(target_modules=["decoder"], target_ratio=4))
