"""PyTorch 2 on compressed models: torch.compile and torch.export of a model in each layout (auto,
lowrank, interleaved, hybrid lowrank+sparse, int8 cores), and what cannot be exported says why.
Every registered type on its own: tests/test_contract.py."""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from mpolstm import quantize
from mpolstm.compression import CompressionConfig, compress
from test_contract import assert_close_relative, assert_compiles_like_eager

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
@pytest.mark.parametrize("layout", [pytest.param(layout, marks=pytest.mark.slow)
                                    if layout in ("auto", "lowrank", "interleaved") else layout for layout in LAYOUTS])
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


# ----------------------------------------------------------------------------- step files for PyTorch 2 runtimes

PRODUCTS = ("mm", "addmm", "bmm", "linear", "matmul", "convolution")


def streaming_lstm():
    torch.manual_seed(0)

    class Host(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(16, 32, 2)

    host, _ = compress(Host(), CompressionConfig(target_ratio=4, layout="lowrank"))
    return host.lstm.eval()


def run_steps(step, lstm, frames):
    """(outputs, final state) of ``step(frame, h, c) -> (out, h, c)`` and of eager ``lstm.step`` over ``frames``."""
    state, eager_state, outs, eager_outs = None, None, [], []
    zeros = torch.zeros(lstm.num_layers, 1, lstm.hidden_size)
    state = (zeros, zeros)
    for frame in frames:
        out, *state = step(frame, *state)
        with torch.no_grad():
            eager_out, eager_state = lstm.step(frame, eager_state)
        outs.append(out)
        eager_outs.append(eager_out)
    return (torch.cat(outs), *state), (torch.cat(eager_outs), *eager_state)


@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
def test_executorch_step_file_runs_every_product_in_xnnpack_and_equals_eager(int8, tmp_path, capfd):
    pytest.importorskip("executorch", reason="executorch is not installed (pip install 'mpolstm[pt2]')")
    from mpolstm.export import export_step

    lstm = streaming_lstm()
    capfd.readouterr()
    path = export_step(lstm, tmp_path / "step.pte", fmt="executorch", int8=int8)
    assert capfd.readouterr() == ("", "")  # executorch's, torchao's and the C++ runtime's notes silenced

    from executorch.runtime import Runtime

    from mpolstm.export.pt2 import lower_executorch
    from mpolstm.export.step import _Step
    from mpolstm.export.trace import export_copy

    program = Runtime.get().load_program(path.read_bytes())
    method = program.load_method("forward")
    frames = torch.randn(5, 1, 16, generator=torch.Generator().manual_seed(2))
    got, expected = run_steps(lambda *args: method.execute(list(args)), lstm, frames)
    assert_close_relative(got, expected, rtol=0.05 if int8 else 1e-4)
    error = float((got[0] - expected[0]).norm() / expected[0].norm())
    assert (error > 1e-4) == int8  # int8 matmuls move the output, a little
    work = export_copy(lstm, "factorized")
    with torch.no_grad():
        state = work.step(frames[0], None)[1]
    _, outside = lower_executorch(_Step(work, False), (frames[0], *state), int8)
    assert not [op for op in outside if op.split(".")[-2 if "." in op else 0] in PRODUCTS], outside


@pytest.mark.slow
def test_aoti_step_package_equals_eager(tmp_path):
    """AOTInductor compiles C++ at export (15-40 s here): slow."""
    from mpolstm.export import export_step

    lstm = streaming_lstm()
    runner = torch._inductor.aoti_load_package(str(export_step(lstm, tmp_path / "step.pt2", fmt="aoti")))
    frames = torch.randn(5, 1, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, expected = run_steps(runner, lstm, frames)
    assert_close_relative(got, expected, rtol=1e-4)


def test_int8_step_files_are_onnx_or_executorch_only(tmp_path):
    """int8 factors: ONNX (onnxruntime's dynamic quantization) and ExecuTorch (pt2e); the float formats refuse."""
    from mpolstm.export import export_step

    for fmt in ("torchscript", "aoti"):
        with pytest.raises(ValueError, match=f"int8=True, but the {fmt} format holds float32 factors"):
            export_step(streaming_lstm(), tmp_path / "step", fmt=fmt, int8=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["executorch", "aoti"])
def test_whole_model_in_the_pt2_formats_equals_eager(fmt, tmp_path):
    """export_model (and so `mpolstm export --format executorch|aoti`) of a whole compressed model,
    its recurrent layers as torch's scan; the file is loaded back and run."""
    from mpolstm.export import export_model

    model = compressed_tagger("lowrank").eval()
    if fmt == "aoti":  # torch.export fixes the scan's length; the package would not check it: refused
        with pytest.raises(ValueError, match="AOTI_RUNTIME_CHECK_INPUTS=1"):
            export_model(model, fmt, tmp_path / f"tagger.{fmt}", (tokens(),))
        return
    path = export_model(model, fmt, tmp_path / f"tagger.{fmt}", (tokens(),))
    with torch.no_grad():
        expected = model(tokens())
    if fmt == "aoti":
        got = torch._inductor.aoti_load_package(str(path))(tokens())
    else:
        from executorch.runtime import Runtime

        program = Runtime.get().load_program(path.read_bytes())
        got = program.load_method("forward").execute([tokens()])[0]
    assert_close_relative([got], [expected], rtol=1e-4)
