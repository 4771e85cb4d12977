"""Entries and bytes agree everywhere: compress's report, `mpolstm.storage`, `inspect` (read from the folder)
and the file itself, for every layout and with int8 cores (issue 27: inspect under-reported hybrids)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open

from mpolstm import CompressionConfig, compress, quantize
from mpolstm.harness.usermodels import describe_folder, inspect_folder
from mpolstm.io import WEIGHTS_FILE, load, save
from mpolstm.nn.sparse import INDEX_FORMATS, SparseResidual, index_bytes, sparse_parts
from mpolstm.storage import file_data_bytes, pack_weights, packed_bytes

LAYOUTS = ["auto", "lowrank", "interleaved", "lowrank+sparse"]


def _weight_keys(key: str) -> bool:
    """A file entry that belongs to an MPO weight: cores, their scales, a sparse residual."""
    return any(part in key for part in ("_cores.", "_scales.", "_sparse."))


@pytest.mark.parametrize("int8", [False, True], ids=["float32", "int8"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_report_storage_inspect_and_file_agree(tmp_path, layout, int8, lstm_tagger):
    torch.manual_seed(0)
    model = lstm_tagger(32, 64, 10)
    x = torch.randn(8, 6, 32)
    calibration = None if layout == "interleaved" else [x]  # the paper's layout cannot be whitened
    small, report = compress(copy.deepcopy(model), CompressionConfig(target_modules=["lstm"], target_ratio=10,
                                                                    layout=layout), calibration=calibration)
    stored = packed_bytes(pack_weights(small, ["lstm"])[0])
    assert report.stored_bytes == stored
    if int8:
        quantize(small)
        stored = packed_bytes(pack_weights(small, ["lstm"], int8_cores=True)[0])
    folder = save(small, tmp_path / "m")
    rows = describe_folder(folder)
    assert sum(r["params"] for r in rows) == report.mpo_params
    assert sum(r["bytes"] for r in rows) == stored
    with safe_open(str(folder / WEIGHTS_FILE), "pt") as fh:  # the file holds exactly those bytes for the weights
        in_file = {k: fh.get_tensor(k) for k in fh.keys()}
    weights = sum(t.numel() * t.element_size() for k, t in in_file.items() if _weight_keys(k))
    rest = sum(t.numel() * t.element_size() for k, t in small.state_dict().items() if not _weight_keys(k))
    assert weights == stored and weights + rest == file_data_bytes(folder / WEIGHTS_FILE)
    assert f"{stored:,} of these weights" in inspect_folder(folder, rows)
    if layout == "lowrank+sparse":
        assert all(r["sparse"] > 0 for r in rows)
        assert all(t.dtype == (torch.int8 if int8 else torch.float32)
                   for k, t in in_file.items() if k.endswith("_sparse.values"))
    loaded = load(folder, lstm_tagger(32, 64, 10))
    torch.testing.assert_close(loaded(x), small(x), rtol=0, atol=0)


@pytest.mark.parametrize("shape,count", [((16, 64), 40), ((256, 32), 531), ((1024, 256), 500), ((1024, 256), 30000),
                                         ((40000, 2), 10)])
def test_the_sparse_index_is_the_smallest_format_and_type(shape, count):
    """coo positions in int16 up to 32,768 entries (int32 beyond), CSR, or a bitmask: whichever is smallest."""
    gen = torch.Generator().manual_seed(0)
    flat = torch.randperm(shape[0] * shape[1], generator=gen)[:count]
    part = SparseResidual(shape, flat, torch.randn(count, generator=gen))
    sizes = {fmt: index_bytes(fmt, count, shape) for fmt in INDEX_FORMATS}
    assert sizes[part.index_format] == min(sizes.values())
    held = sum(b.numel() * b.element_size() for name, b in part.state_dict().items() if name != "values")
    assert held == sizes[part.index_format]
    assert torch.equal(part.index, flat.sort().values)  # positions kept, in row-major order
    dense = torch.zeros(shape).reshape(-1)
    dense[flat] = part.values.detach()[flat.argsort().argsort()]
    torch.testing.assert_close(part.dense().reshape(-1), dense)
    if part.index_format == "coo":
        assert part.positions.dtype == (torch.int16 if shape[0] * shape[1] <= 2**15 else torch.int32)


def test_int8_hybrid_rounds_the_sparse_values_and_refuses_them_off_grid(tmp_path, lstm_tagger):
    torch.manual_seed(0)
    small, _ = compress(lstm_tagger(32, 64, 10), CompressionConfig(target_modules=["lstm"], target_ratio=10, layout="lowrank+sparse"))
    quantize(small)
    parts = sparse_parts(small.lstm)
    assert parts and all(p.int8 and p.scale.dtype == torch.float32 for p in parts.values())
    for part in parts.values():
        q, scale = part.int8_values()
        assert torch.equal(q.float() * scale, part.values.detach())
    small.double()  # scales stay float32 under a dtype change, as the cores' do
    assert all(p.scale.dtype == torch.float32 for p in parts.values())
    small.float()
    with torch.no_grad():
        next(iter(parts.values())).values.add_(1e-3)
    with pytest.raises(ValueError, match="no longer on their int8 grid"):
        save(small, tmp_path / "m")
    quantize(small)
    save(small, tmp_path / "m")
