"""README.md's Python block runs as it is, and prints what it claims."""

from __future__ import annotations

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_block_runs_and_shows_what_compression_buys(capsys, tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1
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
