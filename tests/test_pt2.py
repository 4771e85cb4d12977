"""PyTorch 2 on compressed models: torch.compile and torch.export of a model in each layout (auto,
lowrank, interleaved, hybrid lowrank+sparse, int8 cores), and what cannot be exported says why.
Every registered type on its own: tests/test_contract.py."""

import pytest
import torch
from test_contract import assert_close_relative, assert_compiles_like_eager
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from mpolstm import quantize
from mpolstm.compression import CompressionConfig, compress

LAYOUTS = ["auto", "lowrank", "interleaved", "lowrank+sparse", "int8"]


class Tagger(nn.Module):
    """Embedding, a batch-first LSTM, a time-first GRU and a linear head: every recurrent layout path."""

    def __init__(self):
        super().__init__()
        self.emb, self.lstm = nn.Embedding(30, 12), nn.LSTM(12, 32, 2, batch_first=True)
        self.gru, self.head = nn.GRU(32, 32), nn.Linear(32, 5)

    def forward(self, tokens):
        y = self.lstm(self.emb(tokens))[0]
        return self.head(self.gru(y.transpose(0, 1))[0].transpose(0, 1))


def tokens(batch=3, length=7, seed=1):
    return torch.randint(0, 30, (batch, length), generator=torch.Generator().manual_seed(seed))


def compressed_tagger(layout):
    torch.manual_seed(0)
    hybrid = layout == "lowrank+sparse"
    config = CompressionConfig(target_ratio=4, layout="auto" if layout == "int8" else layout,
                               overrides={"emb": {"layout": "lowrank"}} if hybrid else {})
    model, _ = compress(Tagger(), config, calibration=[tokens()] if hybrid else None)
    assert all(type(m).__name__.startswith("MPO") for m in model.children())
    return quantize(model) if layout == "int8" else model


# auto and interleaved trace the same code as the contract's samples, lowrank as the hybrid's low-rank part
@pytest.mark.parametrize("layout", [pytest.param(layout, marks=pytest.mark.slow) if layout in ("auto", "lowrank", "interleaved")
                                    else layout for layout in LAYOUTS])
def test_torch_compile_traces_each_layout(layout):
    model = compressed_tagger(layout)
    for training in (True, False):
        assert_compiles_like_eager(model.train(training), [tokens()], training, backend="aot_eager_decomp_partition")


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_torch_compile_with_inductor_of_each_layout(layout):
    model = compressed_tagger(layout)
    for training, backward in ((True, True), (False, True), (False, False)):
        assert_compiles_like_eager(model.train(training), [tokens()], backward)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_torch_export_of_each_layout_runs_every_length(layout):
    model = compressed_tagger(layout).eval()
    program = torch.export.export(model, (tokens(),), dynamic_shapes=({1: torch.export.Dim("T", min=1, max=64)},))
    for length in range(1, 10):
        with torch.no_grad():
            assert_close_relative([program.module()(tokens(length=length, seed=length))],
                                  [model(tokens(length=length, seed=length))])


def test_what_cannot_be_exported_says_why_in_one_line():
    class Packed(nn.Module):
        def __init__(self, lstm):
            super().__init__()
            self.lstm = lstm

        def forward(self, x, lengths):
            return self.lstm(pack_padded_sequence(x, lengths, batch_first=True))[1][0]

    model = compressed_tagger("auto")
    with pytest.raises(ValueError, match=r"^MPOLSTM: torch.export runs padded sequences[^\n]*$"):
        torch.export.export(Packed(model.lstm).eval(), (torch.randn(2, 4, 12), torch.tensor([4, 2])))
