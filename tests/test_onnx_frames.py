"""Per-frame ONNX graphs (one frame a call, the recurrent states packed into a graph input and output):
states paired and confirmed, calibration and distillation over sequences of frames with the states
carried, ``step=True`` refused as already a step, and graphs without a recurrent node."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from tests.onnx_models import run_ort  # noqa: E402

import mpolstm  # noqa: E402
import mpolstm.onnx as mo  # noqa: E402
from mpolstm.onnx.frames import FrameSequence, state_pairs  # noqa: E402

F, H = 6, 8


class FrameLSTM(nn.Module):
    """DTLN's shape of graph: x [1, 1, F] and states [1, 2, H, 2] (h, c) in; out [1, 1, F] and states out."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(F, H, batch_first=True)
        self.out = nn.Linear(H, F)

    def forward(self, x, states):
        h, c = states[0, 0, :, 0], states[0, 0, :, 1]
        y, (h, c) = self.rnn(x, (h[None, None], c[None, None]))
        new = torch.stack([h[0, 0], c[0, 0]], -1)
        return torch.sigmoid(self.out(y)), torch.stack([new, new * 0], 0)[None]


class FrameCell(nn.Module):
    """The same step with the recurrence written out in Linear layers (an exporter's unrolled LSTM)."""

    def __init__(self) -> None:
        super().__init__()
        self.ih, self.hh, self.out = nn.Linear(F, 4 * H), nn.Linear(H, 4 * H), nn.Linear(H, F)

    def forward(self, x, states):
        h, c = states[0, 0, :, 0][None], states[0, 0, :, 1][None]
        i, f, g, o = (self.ih(x[0]) + self.hh(h)).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        new = torch.stack([h[0], c[0]], -1)
        return torch.sigmoid(self.out(h))[None], torch.stack([new, new * 0], 0)[None]


class NoState(nn.Module):
    """An input shaped like an output that the output does not depend on: not a state."""

    def forward(self, x, z):
        return x * 2, torch.relu(x) + 0 * z.sum()


def _export(module: nn.Module, path, second=(1, 2, H, 2)):
    torch.manual_seed(0)
    for p in module.parameters():
        nn.init.uniform_(p, -0.5, 0.5)
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(1, 1, F), torch.zeros(second)), str(path), dynamo=False,
                          opset_version=14, input_names=["x", "states"], output_names=["y", "states_out"])
    return module


def _reference(module: nn.Module, frames: torch.Tensor) -> torch.Tensor:
    """The torch module run frame by frame, the states carried from zero."""
    states, rows = torch.zeros(1, 2, H, 2), []
    with torch.no_grad():
        for x in frames:
            y, states = module(x, states)
            rows.append(y.reshape(-1))
    return torch.stack(rows)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("frames")
    lstm = _export(FrameLSTM(), folder / "lstm.onnx")
    cell = _export(FrameCell(), folder / "cell.onnx")
    _export(NoState(), folder / "nostate.onnx", second=(1, 1, F))
    return folder, lstm, cell


def test_states_are_paired_by_shape_and_confirmed_by_running(files):
    folder, _, _ = files
    assert state_pairs(mo.load(folder / "lstm.onnx")) == [(1, 1)]
    assert state_pairs(mo.load(folder / "cell.onnx")) == [(1, 1)]
    assert state_pairs(mo.load(folder / "nostate.onnx")) == []  # same shape, but the output ignores it


@pytest.mark.parametrize("name", ["lstm", "cell"])
def test_a_sequence_runs_with_the_states_carried(files, name):
    folder, lstm, cell = files
    module = {"lstm": lstm, "cell": cell}[name]
    model = mo.load(folder / f"{name}.onnx")
    frames = torch.randn(9, 1, 1, F)
    sequence = mo.as_batches(model, [(frames,)])[0]
    assert isinstance(sequence, FrameSequence) and len(sequence) == 9
    with torch.no_grad():
        got = sequence.run(model)
    torch.testing.assert_close(got, _reference(module, frames), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # crops start from zero states
        torch.testing.assert_close(sequence.crops(4)[1].run(model), _reference(module, frames[4:8]),
                                   atol=1e-5, rtol=1e-5)


def test_calibrated_and_distilled_over_sequences_then_written_and_step_refused(files, tmp_path):
    folder, lstm, _ = files
    frames = [(torch.randn(30, 1, 1, F),), (torch.randn(30, 1, 1, F),)]
    out = tmp_path / "small.onnx"
    _, model = mo.compress_file(folder / "lstm.onnx", out, mpolstm.CompressionConfig(target_ratio=3),
                                calibration=frames, distill_steps=3, batch_size=10)
    record = json.loads(next(p.value for p in onnx.load(str(out)).metadata_props if p.key == "mpolstm"))
    check = record["distill_check"]
    assert check["held_out"] == 1 and check["before"] > 0 and check["after"] > 0
    # the written file, run frame by frame in onnxruntime, equals the compressed torch model
    sequence = FrameSequence(frames[0], [(1, 1)])
    with torch.no_grad():
        want = sequence.run(model).numpy()
    states, rows = np.zeros((1, 2, H, 2), np.float32), []
    for x in frames[0][0].numpy():
        y, states = run_ort(out, {"x": x, "states": states})
        rows.append(y.reshape(-1))
    np.testing.assert_allclose(np.stack(rows), want, atol=1e-4, rtol=1e-3)
    with pytest.raises(ValueError, match=r"already is a one-frame step \(states carried: states -> states_out\)"):
        mo.to_bytes(model, step=True)


def test_a_sequence_of_the_wrong_shape_is_refused_naming_the_sequence_form(files):
    folder, _, _ = files
    model = mo.load(folder / "lstm.onnx")
    with pytest.raises(ValueError, match=r"input0 \('x'\) is \(1, 1, 5\).*sequence of frames \['T', 1, 1, 6\]"):
        mo.as_batches(model, [(torch.randn(1, 1, 5), torch.zeros(1, 2, H, 2))])
    with pytest.raises(ValueError, match="one length T"):
        mo.as_batches(model, [(torch.randn(3, 1, 1, F), torch.randn(3, 1, 1, F))])


def test_a_graph_without_a_recurrent_node_has_nothing_to_compress_unless_named(files, tmp_path):
    folder, _, _ = files
    config = mpolstm.CompressionConfig(target_ratio=2)
    with pytest.raises(ValueError, match="nothing to compress: no LSTM or GRU node.*--target.*ih"):
        mo.compress_file(folder / "cell.onnx", tmp_path / "a.onnx", config)
    assert not (tmp_path / "a.onnx").exists()
    model = mo.load(folder / "cell.onnx")
    named = [n for n, s in model.layers.items() if s.op in ("MatMul", "Gemm")][:2]
    report, _ = mo.compress_file(folder / "cell.onnx", tmp_path / "b.onnx",
                                 mpolstm.CompressionConfig(target_ratio=2, target_modules=named),
                                 calibration=[(torch.randn(20, 1, 1, F),)])
    assert sorted(m.name for m in report.modules) == sorted(named)


def test_cli_calibrates_and_distils_a_per_frame_graph_on_a_sequence_file(files, tmp_path):
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from mpolstm.harness.cli import app

    folder, _, _ = files
    save_file({"input0": torch.randn(40, 1, 1, F)}, tmp_path / "frames.safetensors")
    out = tmp_path / "small.onnx"
    result = CliRunner().invoke(app, ["compress", str(folder / "lstm.onnx"), str(out), "--ratio", "2", "--calibrate",
                                      str(tmp_path / "frames.safetensors"), "--distill-steps", "2",
                                      "--batch-size", "10"])
    assert result.exit_code == 0, result.output
    assert "on 1 of 4 pieces held out of distillation" in result.output and out.is_file()
    # the one sequence is cut into 8 crops of 5 frames: the model's output error measured on 4 held out
    assert "on 4 held-out calibration batches" in result.output, result.output
    save_file({"input0": torch.randn(40, 1, 1, F + 1)}, tmp_path / "wide.safetensors")
    result = CliRunner().invoke(app, ["compress", str(folder / "lstm.onnx"), str(tmp_path / "no.onnx"), "--ratio",
                                      "2", "--calibrate", str(tmp_path / "wide.safetensors")])
    assert result.exit_code == 2 and "a sequence of frames ['T', 1, 1, 6]" in result.output, result.output
    assert not (tmp_path / "no.onnx").exists()


def test_without_data_a_per_frame_graph_gets_a_synthetic_estimate_over_sequences(files):
    folder, lstm, _ = files
    model = mo.load(folder / "lstm.onnx")
    frames = [torch.randn(32, 1, 1, F) for _ in range(8)]
    with torch.no_grad():
        reference = [_reference(lstm, x) for x in frames]
    small, report = mpolstm.compress(model, mpolstm.CompressionConfig(target_ratio=4))
    check = report.output_check  # was None: the first layer's shape guess does not run a graph with states in
    assert check is not None and check.source == "synthetic-input estimate" and check.batches == 4
    sequences = [FrameSequence((x,), [(1, 1)]) for x in frames]
    with torch.no_grad():
        num = sum(float((s.run(small) - r).pow(2).sum()) for s, r in zip(sequences, reference))
        den = sum(float(r.pow(2).sum()) for r in reference)
    assert check.error > 0.01 and check.error == pytest.approx((num / den) ** 0.5, rel=0.3)


class Stepper(nn.Module):
    """A frame of N streams (N, 1, F) and two state pairs of different sizes, N a named axis everywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm, self.gru, self.out = nn.LSTM(F, H, batch_first=True), nn.GRU(H, 5, batch_first=True), nn.Linear(5, 2)

    def forward(self, x, h, c, g):
        y, (h, c) = self.lstm(x, (h, c))
        z, g = self.gru(y, g)
        return self.out(z), h, c, g


def test_a_graph_of_n_streams_starts_its_states_at_the_frames_batch_and_is_estimated_without_data(tmp_path):
    torch.manual_seed(0)
    module = Stepper().eval()
    names = ["x", "h", "c", "g"]
    axes = {"x": {0: "N"}, "h": {1: "N"}, "c": {1: "N"}, "g": {1: "N"}, "y": {0: "N"}, "h_out": {1: "N"},
            "c_out": {1: "N"}, "g_out": {1: "N"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(2, 1, F), torch.zeros(1, 2, H), torch.zeros(1, 2, H),
                                   torch.zeros(1, 2, 5)), str(tmp_path / "s.onnx"), dynamo=False, opset_version=14,
                          input_names=names, output_names=["y", "h_out", "c_out", "g_out"], dynamic_axes=axes)
    model = mo.load(tmp_path / "s.onnx")
    assert state_pairs(model) == [(1, 1), (2, 2), (3, 3)]
    frames = torch.randn(7, 3, 1, F)  # 7 frames of 3 streams
    with torch.no_grad():
        got = FrameSequence((frames,), state_pairs(model)).run(model)
        want, states = [], (torch.zeros(1, 3, H), torch.zeros(1, 3, H), torch.zeros(1, 3, 5))
        for x in frames:
            y, *states = module(x, *states)
            want.append(y.reshape(-1))
    torch.testing.assert_close(got, torch.stack(want), atol=1e-5, rtol=1e-5)
    report, _ = mo.compress_file(tmp_path / "s.onnx", tmp_path / "a.onnx", mpolstm.CompressionConfig(target_ratio=2))
    assert report.output_check is not None and report.output_check.source == "synthetic-input estimate"
    report, _ = mo.compress_file(tmp_path / "s.onnx", tmp_path / "b.onnx", mpolstm.CompressionConfig(target_ratio=2),
                                 calibration=[(torch.randn(64, 3, 1, F),)])
    assert report.output_check.batches == 4 and report.output_check.error > 0
