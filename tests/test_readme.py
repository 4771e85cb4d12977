"""README.md's Python blocks run as they are, and do and print what they claim."""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_block_runs_and_shows_what_compression_buys(capsys, tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)  # it saves "model_dir"
    namespace: dict = {"__name__": "readme"}
    exec(compile(blocks[0], "README.md[python]", "exec"), namespace)
    out = capsys.readouterr().out
    counts = {name: (int(dense.replace(",", "")), int(mpo.replace(",", "")), float(error)) for name, dense, mpo, error in
              re.findall(r"^(smooth kernel|random matrix): dense ([\d,]+) -> MPO ([\d,]+) parameters .* error ([\d.]+)",
                         out, flags=re.M)}
    dense, smooth, error = counts["smooth kernel"]
    assert dense == 1024 * 4096 and smooth * 100 < dense and error <= 0.01  # structure: > 100x at 1% error
    assert counts["random matrix"][1] > dense  # noise: the MPO would be larger than the matrix
    errors = [float(e) for e in re.findall(r"^weight_[ih]h_l\d: relative error ([\d.]+)$", out, flags=re.M)]
    assert len(errors) == 4 and all(0.9 < e < 1 for e in errors)  # an untrained LSTM compresses badly, and says so
    assert re.search(r"^layouts chosen: .+ \(per weight, the least output error on the calibration inputs", out, re.M)
    assert (tmp_path / "model_dir" / "model.safetensors").is_file()
    assert type(namespace["model"].lstm).__name__ == "MPOLSTM"


def test_readme_onnx_block_runs_on_the_nsnet2_file_it_names(tmp_path, monkeypatch):
    """The block of "A model you only have as ONNX": every name defined, the file found where it says."""
    pytest.importorskip("onnxruntime")
    import numpy as np
    import onnxruntime as ort

    block = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)[1]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme_onnx"}
    exec(compile(block, "README.md[onnx]", "exec"), namespace)
    names = {"small.onnx", "small.step.onnx", "small10x.onnx", "small10x.step.onnx"}
    assert {p.name for p in tmp_path.iterdir()} == names
    x = namespace["features"][:1].numpy()
    original = ort.InferenceSession(str(namespace["nsnet2"])).run(None, {"input": x})[0]
    for name in ("small.onnx", "small10x.onnx"):
        got = ort.InferenceSession(str(tmp_path / name)).run(None, {"input": x})[0]
        assert got.shape == original.shape and 0 < np.abs(got - original).max()  # a compressed drop-in
        assert np.abs(got - original).mean() < np.abs(original).mean()
