"""Issue 31: every exported file holds its model's weights once, factorized, and the bytes said are the
file's: each format x layout against the model's run-time bytes (merged halves, biases), no array
twice, no dense kernel; convolutions run factorized exactly; the tutorial-like decoder unrolled by the
trace holds its factors once."""

from __future__ import annotations

import copy
import hashlib
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

from mpolstm import CompressionConfig, compress, quantize
from mpolstm.export import (
    densify,
    export_model,
    export_step,
    file_weight_bytes,
    onnx_weight_bytes,
    runtime_weight_bytes,
)
from mpolstm.nn import MPOConv1d, MPOConv2d
from mpolstm.nn.base import set_factorized

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install 'mpolstm[export]')")
from onnx import numpy_helper  # noqa: E402


class Net(nn.Module):
    """Conv1d front -> LSTM -> Linear: (N, 16, T) -> (N, T, 10)."""

    def __init__(self):
        super().__init__()
        self.front = nn.Conv1d(16, 32, 3, padding=1)
        self.rnn = nn.LSTM(32, 64, batch_first=True)
        self.out = nn.Linear(64, 10)

    def forward(self, x):
        return self.out(self.rnn(self.front(x).transpose(1, 2))[0])


LAYOUTS = ["auto", "lowrank", "interleaved", "lowrank+sparse", "int8"]


def _compressed(layout: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(2, 16, 7)
    calibration = None if layout == "interleaved" else [x]
    config = CompressionConfig(target_ratio=4, layout="auto" if layout == "int8" else layout)
    small, _ = compress(Net(), config, calibration=calibration)
    if layout == "int8":
        quantize(small)
    return small.eval(), x


def _onnx_arrays(path) -> list:
    model = onnx.load(str(path))
    from mpolstm.onnxgraph import graphs

    arrays = []
    for graph in graphs(model.graph):
        arrays += [numpy_helper.to_array(t) for t in graph.initializer]
        arrays += [numpy_helper.to_array(a.t) for n in graph.node for a in n.attribute if a.type == a.TENSOR]
    return [a for a in arrays if a.size >= 16]


def _rebuilt_weights_in(arrays: list, model: nn.Module) -> list:
    """The arrays that are a dense weight of ``model`` rebuilt (as it is or transposed)."""
    dense = [w.detach().numpy() for n, w in densify(copy.deepcopy(model)).named_parameters() if w.dim() >= 2
             and "weight" in n]
    return [a.shape for a in arrays for w in dense if a.size == w.size and a.ndim >= 2 and
            (np.allclose(a.reshape(w.shape), w, atol=1e-6) or
             np.allclose(a.reshape(-1, w.shape[0]).T, w.reshape(w.shape[0], -1), atol=1e-6))]


def _grid() -> list:
    """Every layout x format; AOTInductor (a C++ compile each, seconds) for one layout in the default suite."""
    known = pytest.mark.xfail(raises=ValueError, strict=True, reason="the ExecuTorch program of an interleaved "
                              "LSTM differs from eager (0.04 relative), and the writer refuses it (not a bytes question)")
    return [pytest.param(layout, fmt, marks=([pytest.mark.slow] if fmt == "aoti" and layout != "lowrank" else []) +
                         ([known] if (layout, fmt) == ("interleaved", "executorch") else []))
            for layout in LAYOUTS for fmt in ("onnx", "torchscript", "executorch", "aoti")]


@pytest.mark.parametrize("layout,fmt", _grid())
def test_each_file_holds_the_models_runtime_weights_once(tmp_path, layout, fmt):
    if fmt == "executorch":
        pytest.importorskip("executorch", reason="executorch is not installed (pip install 'mpolstm[pt2]')")
    small, x = _compressed(layout)
    int8 = None if fmt in ("onnx", "executorch") else False
    if fmt == "aoti":  # torch.export fixes the scan's length: a package that would run other lengths wrong
        with pytest.raises(ValueError, match="would fix axis 2 of input 0 at 7.*AOTI_RUNTIME_CHECK_INPUTS"):
            export_model(small, tmp_path / f"m.{fmt}", fmt, x, int8=int8)
        assert not (tmp_path / f"m.{fmt}").exists()
        return
    path = export_model(small, tmp_path / f"m.{fmt}", fmt, x, int8=int8)
    held, model_bytes = file_weight_bytes(path), runtime_weight_bytes(small)
    if (layout, fmt) == ("lowrank+sparse", "executorch"):  # the program also keeps the sparse parts' int64
        model_bytes += sum(b.numel() * b.element_size() for n, b in small.named_buffers()
                           if n.endswith("_sparse.index"))
    assert held <= 1.05 * model_bytes, (held, model_bytes)
    if layout == "int8" and int8 is None:  # int8 factors: well under the float model
        assert held < 0.8 * model_bytes
    elif layout != "lowrank+sparse":  # the sparse part's positions: fewer bytes than its dense matrix
        assert held >= 0.95 * model_bytes
    if fmt == "onnx":
        assert held == onnx_weight_bytes(path)
        props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        assert int(props["mpolstm.weight_bytes"]) == held  # the metadata gives the file's bytes
        arrays = _onnx_arrays(path)
        digests = [hashlib.sha256(a.tobytes()).hexdigest() for a in arrays]
        assert len(set(digests)) == len(digests)  # no array twice
        assert not _rebuilt_weights_in(arrays, small)
    if fmt == "torchscript":
        with zipfile.ZipFile(path) as archive:
            records = [archive.read(n) for n in archive.namelist() if "/constants/" in n or "/data/" in n]
        digests = [hashlib.sha256(r).hexdigest() for r in records if len(r) >= 64]
        assert len(set(digests)) == len(digests)


def test_a_step_unrolled_by_the_trace_holds_its_factors_once(tmp_path):
    """A decoder cell run 6 times (the tutorial's Speller): ONE copy of its factors in the ONNX file."""

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = nn.LSTMCell(32, 64)
            self.out = nn.Linear(64, 32)

        def forward(self, x):
            h = x.new_zeros(x.shape[0], 64)
            c = torch.zeros_like(h)
            outs = []
            for _ in range(6):
                h, c = self.cell(x, (h, c))
                x = self.out(h)
                outs.append(x)
            return torch.stack(outs, 1)

    torch.manual_seed(0)
    x = torch.randn(3, 32)
    small, _ = compress(Decoder(), CompressionConfig(target_ratio=4), calibration=[x])
    small.eval()
    path = export_model(small, tmp_path / "d.onnx", "onnx", x)
    assert file_weight_bytes(path) <= 1.05 * runtime_weight_bytes(small)
    ort = pytest.importorskip("onnxruntime")
    got = ort.InferenceSession(str(tmp_path / "d.onnx")).run(None, {"input0": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), small(x), atol=1e-5, rtol=1e-4)


def test_torchscript_step_file_stores_each_factor_once(tmp_path):
    torch.manual_seed(0)
    small, _ = compress(nn.Sequential(nn.LSTM(16, 64, 2)), CompressionConfig(target_ratio=4))
    rnn = small[0]
    path = export_step(rnn, tmp_path / "s.pt", fmt="torchscript")
    assert file_weight_bytes(path) <= 1.05 * runtime_weight_bytes(rnn)
    frame, state = torch.randn(3, 16), (torch.randn(2, 3, 64), torch.randn(2, 3, 64))
    with torch.no_grad():
        want, (h, c) = rnn.eval().step(frame, state)
        got = torch.jit.load(str(path))(frame, *state)
    for g, w in zip(got, (want, h, c)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cls", [MPOConv1d, MPOConv2d])
@pytest.mark.parametrize("bond,cores", [(None, 2), (3, 2), (None, 4), (4, 4)],
                         ids=["full-lowrank", "lowrank", "full-interleaved", "interleaved"])
@pytest.mark.parametrize("kwargs", [dict(kernel_size=5, padding=2), dict(kernel_size=3, stride=2, dilation=2),
                                    dict(kernel_size=3, padding="same", padding_mode="reflect"),
                                    dict(kernel_size=1), dict(kernel_size=3, groups=4, bias=False)],
                         ids=["pad", "stride-dilation", "same-reflect", "1x1", "groups"])
def test_the_factorized_convolution_equals_the_rebuilt_kernel(cls, bond, cores, kwargs):
    torch.manual_seed(0)
    dense = (nn.Conv1d if cls is MPOConv1d else nn.Conv2d)(8, 12, **kwargs)
    conv = cls.from_torch(dense, max_bond=bond, num_cores=cores).eval()
    if bond is None:  # full bond: the torch layer itself
        for batch, length in ((1, 11), (3, 7)):
            x = torch.randn(batch, 8, length, *([9] if cls is MPOConv2d else []))
            torch.testing.assert_close(conv(x), dense(x), atol=1e-5, rtol=1e-4)
    for shape in ((1, 8, 11), (3, 8, 7), (8, 11)):
        x = torch.randn(*shape, *([9] if cls is MPOConv2d else []))
        with torch.no_grad():
            want = conv(x)
            set_factorized(conv, True)
            got = conv(x)
            set_factorized(conv, False)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_compressing_an_onnx_file_writes_its_1x1_convolutions_factorized(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from mpolstm.onnx import compress_file

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(64, 96, 1), nn.ReLU(), nn.Conv1d(96, 64, 1)).eval()
    x = torch.randn(2, 64, 10)
    torch.onnx.export(net, (x,), str(tmp_path / "in.onnx"), dynamo=False, input_names=["x"])
    config = CompressionConfig(target_ratio=30, target_modules=["n_0_Conv", "n_2_Conv"])  # no LSTM: named
    _, small = compress_file(tmp_path / "in.onnx", tmp_path / "out.onnx", config, calibration=[(x,)])
    arrays = _onnx_arrays(tmp_path / "out.onnx")
    assert not _rebuilt_weights_in(arrays, small)  # no dense kernel
    held = onnx_weight_bytes(tmp_path / "out.onnx")
    assert {p.key: p.value for p in onnx.load(str(tmp_path / "out.onnx")).metadata_props}["mpolstm.weight_bytes"] == \
        str(held)
    assert held <= 1.05 * runtime_weight_bytes(small) and held < 4 * (2 * 64 * 96) / 10
    got = ort.InferenceSession(str(tmp_path / "out.onnx")).run(None, {"x": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), small(x), atol=1e-4, rtol=1e-3)


def test_a_tied_output_layer_multiplies_by_its_owners_factors_once(tmp_path):
    """An output layer tied to the input embedding: no rebuilt table and no second copy of the factors."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(64, 48)
            self.rnn = nn.GRU(48, 48, batch_first=True)
            self.out = nn.Linear(48, 64)
            self.out.weight = self.embed.weight

        def forward(self, tokens):
            return self.out(self.rnn(self.embed(tokens))[0])

    torch.manual_seed(0)
    tokens = torch.randint(0, 64, (3, 7))
    small, _ = compress(Tied(), CompressionConfig(target_ratio=4, layout="lowrank"), calibration=[tokens])
    small.eval()
    assert small.out.owner is small.embed
    for fmt in ("onnx", "torchscript"):
        path = export_model(small, tmp_path / f"t.{fmt}", fmt, tokens)
        assert file_weight_bytes(path) <= (1.05 if fmt == "onnx" else 2.05) * runtime_weight_bytes(small), fmt
    assert not _rebuilt_weights_in(_onnx_arrays(tmp_path / "t.onnx"), small)
    with torch.no_grad():
        want = small(tokens)
        set_factorized(small, True)
        torch.testing.assert_close(small(tokens), want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.jit.load(str(tmp_path / "t.torchscript"))(tokens), want, atol=1e-5, rtol=1e-4)
