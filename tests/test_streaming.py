"""The streaming contract, over the registry and every layout: for each registered type with a
one-frame ``step`` and each layout (auto, lowrank, interleaved, the hybrid lowrank+sparse, int8
cores), ``step()`` frame by frame (default and factorized runtime), ``stream()`` and the
``export_step`` file (ONNX in onnxruntime, TorchScript) fed random frames (not zeros) equal the
full-sequence forward within 1e-5; ``export_step`` refuses a step that does not."""

import copy

import pytest
import torch
from torch import nn

from mpolstm import quantize
from mpolstm.compression import CompressionConfig, compress
from mpolstm.export import export_step
from mpolstm.nn import MPOLSTM
from mpolstm.nn.base import set_factorized
from mpolstm.nn.registry import layer_type, mpo_class, registered_mpo_names
from mpolstm.nn.sparse import sparse_parts

TOL = {"atol": 1e-5, "rtol": 1e-5}
INPUT, HIDDEN, LAYERS, STEPS, BATCH = 12, 24, 2, 7, 3

# torch type -> a unidirectional two-layer sample (batch first, so frames are x[:, t])
STEP_SAMPLES = {
    nn.LSTM: lambda: nn.LSTM(INPUT, HIDDEN, num_layers=LAYERS, batch_first=True),
    nn.GRU: lambda: nn.GRU(INPUT, HIDDEN, num_layers=LAYERS, batch_first=True),
    nn.RNN: lambda: nn.RNN(INPUT, HIDDEN, num_layers=LAYERS, nonlinearity="relu", batch_first=True),
}
LAYOUTS = {
    "auto": CompressionConfig(target_ratio=3),
    "lowrank": CompressionConfig(target_ratio=3, layout="lowrank"),
    "interleaved": CompressionConfig(target_ratio=3, layout="interleaved", num_cores=2),
    "hybrid": CompressionConfig(target_ratio=3, layout="lowrank+sparse", sparse_share=0.5),
    "int8": CompressionConfig(target_ratio=3),
}


def test_every_registered_type_with_a_step_has_a_sample():
    stepping = {name for name in registered_mpo_names() if callable(getattr(mpo_class(name), "step", None))}
    assert stepping == {layer_type(make()).mpo_type.__name__ for make in STEP_SAMPLES.values()}


def _compressed(torch_type, layout):
    torch.manual_seed(0)
    host = nn.Sequential(STEP_SAMPLES[torch_type]())
    x = torch.randn(BATCH, STEPS, INPUT)
    compress(host, copy.deepcopy(LAYOUTS[layout]), calibration=[x] if layout in ("lowrank", "hybrid") else None)
    if layout == "int8":
        quantize(host)
    layer = host[0].eval()
    assert (layout == "hybrid") == bool(sparse_parts(layer))
    return layer, torch.randn(BATCH, STEPS, INPUT) * 2  # fresh random frames


def _frame_by_frame(run, x):
    return torch.stack([run(x[:, t]) for t in range(x.shape[1])], 1)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("torch_type", list(STEP_SAMPLES), ids=lambda t: t.__name__)
def test_step_stream_and_exported_step_equal_the_full_forward(torch_type, layout, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    layer, x = _compressed(torch_type, layout)
    with torch.no_grad():
        expected = layer(x)[0]
        for factorized in (False, True):
            set_factorized(layer, factorized)
            state = [None]

            def step(frame, state=state):
                out, state[0] = layer.step(frame, state[0])
                return out

            torch.testing.assert_close(_frame_by_frame(step, x), expected, **TOL)
            torch.testing.assert_close(_frame_by_frame(layer.stream(), x), expected, **TOL)
        set_factorized(layer, False)
    lstm = torch_type is nn.LSTM
    zeros = [torch.zeros(LAYERS, BATCH, HIDDEN)] * (2 if lstm else 1)
    onnx_path = export_step(layer, tmp_path / "step.onnx", int8=False)  # int8 cores as float factors: exact
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    state = [zeros]

    def onnx_step(frame):
        out, *state[0] = [torch.from_numpy(a) for a in session.run(
            None, dict(zip(names, [frame.numpy(), *[s.numpy() for s in state[0]]])))]
        return out

    torch.testing.assert_close(_frame_by_frame(onnx_step, x), expected, **TOL)
    loaded = torch.jit.load(str(export_step(layer, tmp_path / "step.pt", fmt="torchscript", int8=False)))
    state = [zeros]

    def script_step(frame):
        out, *state[0] = loaded(frame, *state[0])
        return out

    with torch.no_grad():
        torch.testing.assert_close(_frame_by_frame(script_step, x), expected, **TOL)


class _DriftingLSTM(MPOLSTM):
    """A step that drifts from the forward only where the frame is non-zero (as the hybrid's did)."""

    def step(self, input, hx=None):
        out, state = super().step(input, hx)
        return out + 1e-2 * input[..., :1], state


def test_export_step_checks_itself_on_random_frames(tmp_path):
    layer, _ = _compressed(nn.LSTM, "lowrank")
    layer.__class__ = _DriftingLSTM
    with pytest.raises(ValueError, match=r"step frame by frame differs from its forward .* random frames"):
        export_step(layer, tmp_path / "step.onnx")
    assert not (tmp_path / "step.onnx").exists()
