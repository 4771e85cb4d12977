"""What mpolstm writes is readable as what `open()` creates: 0o666 / 0o777 less the umask, not private."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from mpolstm import io
from mpolstm.atomic import atomic_write_bytes
from mpolstm.checkpoint import save_checkpoint
from mpolstm.compression import CompressionConfig, compress
from mpolstm.export import export_model


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_saves_exports_checkpoints_and_atomic_writes_honour_the_umask(tmp_path, mask, lstm_tagger):
    torch.manual_seed(0)
    model, _ = compress(lstm_tagger(8, 16, 3, last=True), CompressionConfig(target_modules=["lstm"], max_bond=4))
    x = torch.randn(2, 5, 8)
    out = tmp_path / "out"
    out.mkdir()
    old = os.umask(mask)
    try:
        io.save(model, out / "saved")
        export_model(model, out / "model.pt", "torchscript", x)
        export_model(model, out / "model.onnx", "onnx", x)
        export_model(model, out / "dense", "dense")
        save_checkpoint(out / "checkpoint.safetensors", model, torch.optim.Adam(model.parameters()), {"epoch": 1})
        atomic_write_bytes(out / "results.json", b"{}")
    finally:
        os.umask(old)
    modes = _modes(out)
    assert set(modes) == {"saved", "saved/model.safetensors", "saved/config.json", "model.pt", "model.onnx", "dense",
                          "dense/model.safetensors", "dense/config.json", "checkpoint.safetensors", "results.json"}
    for name, mode in modes.items():
        expected = 0o777 & ~mask if (out / name).is_dir() else 0o666 & ~mask
        assert mode == expected, f"{name}: {oct(mode)}, expected {oct(expected)}"
