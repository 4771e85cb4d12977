import math
import warnings

import pytest
import torch
from torch import nn

import mpolstm
from mpolstm.compression import CompressionConfig, compress
from mpolstm.harness.protocol import summarize, verdict
from mpolstm.harness.protocol.rows import quantize_dynamic_int8
from mpolstm.storage import (
    dequantize_int8,
    file_data_bytes,
    pack_matrix,
    pack_weights,
    packed_bytes,
    quantize_int8,
    round_to_int8_,
    save_packed,
    sparse_bytes,
    unpack_matrix,
)


def sparse(rows, cols, density, seed=0):
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(rows, cols, generator=gen)
    return m * (torch.rand(rows, cols, generator=gen) < density)


@pytest.mark.parametrize("density,expected", [(0.01, "csr"), (0.05, "csr"), (0.1, "bitmask"), (0.9, "bitmask"),
                                              (1.0, "float32")])
def test_pruned_matrices_take_the_smaller_of_csr_and_bitmask(density, expected):
    m = sparse(64, 300, density)
    nnz, n = int((m != 0).sum()), m.numel()
    sizes = sparse_bytes(m)
    assert sizes == {"float32": 4 * n, "csr": nnz * (4 + 2) + 4 * 65, "bitmask": 4 * nnz + math.ceil(n / 8)}
    fmt, parts = pack_matrix(m)
    assert fmt == expected and sum(t.numel() * t.element_size() for t in parts.values()) == min(sizes.values())
    assert torch.equal(unpack_matrix(fmt, parts, m.shape), m)


def test_csr_uses_int32_indices_beyond_int16_columns():
    m = torch.zeros(2, 40_000)
    m[0, 39_999], m[1, 3] = 1.5, -2.0
    fmt, parts = pack_matrix(m)
    assert fmt == "csr" and parts["col_index"].dtype == torch.int32
    assert sparse_bytes(m)["csr"] == 2 * (4 + 4) + 4 * 3
    assert torch.equal(unpack_matrix(fmt, parts, m.shape), m)


def test_int8_quantization_error_and_idempotence():
    t = torch.randn(3, 5, 7, 2)
    q, scale = quantize_int8(t)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127 and scale.shape == (1,)
    assert (dequantize_int8(q, scale) - t).abs().max() <= scale / 2 + 1e-7
    rounded = t.clone()
    round_to_int8_([rounded])
    assert torch.equal(quantize_int8(rounded)[0], q) and torch.equal(rounded, dequantize_int8(q, scale))
    zero_q, zero_scale = quantize_int8(torch.zeros(4))
    assert zero_scale.item() == 1.0 and not zero_q.any()
    q, scale = quantize_int8(t, dims=(0, 1, 2))  # one scale per slice of the last axis
    assert scale.shape == (1, 1, 1, 2) and torch.equal(scale.flatten(), t.abs().amax((0, 1, 2)) / 127)
    assert (q.abs().amax((0, 1, 2)) == 127).all()
    with pytest.raises(ValueError, match="non-finite"):
        quantize_int8(torch.tensor([1.0, float("nan")]))


def test_int8_mpo_cores_store_losslessly_at_one_byte_an_entry(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.lstm = nn.LSTM(16, 16)
    model, _ = compress(model, CompressionConfig(target_modules=["lstm"], max_bond=4))
    cores = [c for cs in model.lstm.mpo_weights().values() for c in cs]
    entries = sum(c.numel() for c in cores)
    scales = sum(max(c.shape[0], c.shape[3]) for c in cores)  # one per slice along the larger bond
    unquantized = packed_bytes(pack_weights(model, ["lstm"], int8_cores=True)[0])  # what quantize would store
    mpolstm.quantize(model)
    tensors, formats = pack_weights(model, ["lstm"], int8_cores=True)
    assert set(formats.values()) == {"int8"}
    assert packed_bytes(tensors) == unquantized == entries + 4 * scales
    for name, cs in model.lstm.mpo_weights().items():
        for k, core in enumerate(cs):
            key = f"lstm.{name}.core{k}"
            assert torch.equal(dequantize_int8(tensors[f"{key}.q"], tensors[f"{key}.scale"]), core.detach())
    floats, float_formats = pack_weights(model, ["lstm"])
    assert set(float_formats.values()) == {"float32"} and packed_bytes(floats) == 4 * entries
    path = save_packed(tensors, formats, tmp_path / "w.safetensors")
    assert file_data_bytes(path) == packed_bytes(tensors)
    with torch.no_grad():
        cores[1].mul_(1.001)  # trained after quantize: off its grid
    with pytest.raises(ValueError, match="no longer on its int8 grid"):
        pack_weights(model, ["lstm"], int8_cores=True)


@pytest.mark.parametrize("density,expected", [(0.02, "csr-int8"), (0.3, "bitmask-int8"), (1.0, "int8")])
def test_pruned_matrices_with_int8_values(density, expected):
    m = sparse(64, 300, density)
    round_to_int8_([m])
    nnz, n = int((m != 0).sum()), m.numel()
    sizes = sparse_bytes(m, int8=True)
    assert sizes == {"int8": n + 4, "csr-int8": nnz * (1 + 2) + 4 * 65 + 4, "bitmask-int8": nnz + math.ceil(n / 8) + 4}
    fmt, parts = pack_matrix(m, int8=True)
    assert fmt == expected and packed_bytes(parts) == min(sizes.values())
    assert parts["scale"].dtype == torch.float32 and (parts["values"] if "values" in parts else parts["q"]).dtype == torch.int8
    assert torch.equal(unpack_matrix(fmt, parts, m.shape), m)


def test_dynamically_quantized_lstm_is_one_byte_an_entry_plus_scale_and_zero_point():
    model = nn.Sequential()
    model.lstm = nn.LSTM(12, 20, 2)
    quantized = quantize_dynamic_int8(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tensors, formats = pack_weights(quantized, ["lstm"])
    assert set(formats) == {f"lstm.weight_{k}_l{layer}" for k in ("ih", "hh") for layer in (0, 1)}
    entries = sum(w.numel() for name, w in model.lstm.named_parameters() if name.startswith("weight"))
    assert packed_bytes(tensors) == entries + 8 * 4
    q, scale = tensors["lstm.weight_hh_l1.q"], tensors["lstm.weight_hh_l1.scale"]
    assert q.dtype == torch.int8 and (q.float() * scale - model.lstm.weight_hh_l1).abs().max() <= scale / 2 + 1e-6


def test_pack_rejects_what_it_cannot_store():
    with pytest.raises(ValueError, match="2-D matrix"):
        pack_matrix(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="unknown storage format"):
        unpack_matrix("zip", {}, (2, 2))
    model = nn.Sequential()
    model.act = nn.ReLU()
    with pytest.raises(ValueError, match="has weights to pack"):
        pack_weights(model, ["act"])


def _doc(seed, scores):
    rows = [{"row": row, "target_ratio": None if row == "dense" else 10.0, "accuracy": acc, "params": 100,
             "bytes": 400, "bytes_ratio": 10.0, "ratio": 10.0, "storage": "float32", "total_params": 1,
             "hidden": 4, "train_s": 1.0} for row, acc in scores.items()]
    return {"task": "t", "metric": "accuracy", "higher_is_better": True, "seed": seed, "meta": {},
            "dense_recurrent_params": 1000, "rows": rows}


def test_verdict_calls_a_difference_below_one_std_a_tie():
    docs = [_doc(0, {"dense": 0.9, "mpo-decomp": 0.80, "prune-agp": 0.70, "small-dense": 0.79}),
            _doc(1, {"dense": 0.9, "mpo-decomp": 0.82, "prune-agp": 0.72, "small-dense": 0.85})]
    summary = summarize(docs)
    (v,) = summary["verdict"]
    assert v["ranking"] == ["small-dense", "mpo-decomp", "prune-agp"]
    assert v["tied_with_best"] == ["mpo-decomp"]  # 0.81 vs 0.82, std of small-dense 0.042
    assert v["equal_params"]["mpo"] == "mpo-decomp" and v["equal_params"]["baseline"] == "small-dense"
    assert v["equal_params"]["outcome"] == "tie" and v["equal_bytes"] == v["equal_params"]  # same bytes here
    docs[1]["rows"][3]["accuracy"] = 0.80  # small-dense 0.795 ± 0.007: MPO (0.81 ± 0.014) now ahead by 1 std+
    assert verdict(summarize(docs))[0]["equal_params"]["outcome"] == "win"
    for doc in docs:  # small-dense now takes more bytes than the MPO: the equal-bytes view skips it
        doc["rows"][3]["bytes"] = 500
    (v,) = verdict(summarize(docs))
    assert v["equal_params"]["baseline"] == "small-dense" and v["equal_bytes"]["baseline"] == "prune-agp"
    docs[0]["rows"][1]["accuracy"] = 0.5
    docs[1]["rows"][1]["accuracy"] = 0.5
    assert verdict(summarize(docs))[0]["equal_params"]["outcome"] == "loss"
