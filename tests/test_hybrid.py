"""The hybrid layout "lowrank+sparse": parity of every supported layer type, budget, bytes as stored,
the fixed mask under distillation, io, and bad input."""

import copy

import pytest
import torch
from torch import nn

from mpolstm import CompressionConfig, compress, distill
from mpolstm.calibration import whitening
from mpolstm.compression.hybrid import SHARES, fit_hybrid, fit_target, hybrid_sizes
from mpolstm.compression.layouts import Target
from mpolstm.io import load, save
from mpolstm.nn.registry import layer_type_of_mpo
from mpolstm.nn.sparse import INDEX_FORMATS, index_bytes, sparse_of
from mpolstm.storage import file_data_bytes, pack_weights, packed_bytes, save_packed


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(6, 12, 3, padding=1)
        self.lstm = nn.LSTM(12, 16, batch_first=True)
        self.gru = nn.GRU(16, 16, batch_first=True)
        self.cell = nn.LSTMCell(16, 8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        h = self.conv(x.transpose(1, 2)).transpose(1, 2)
        h, _ = self.gru(self.lstm(h)[0])
        return self.fc(self.cell(h[:, -1])[0])


def _compressed(share=0.5, ratio=3.0, dtype=torch.float64):
    torch.manual_seed(0)
    model = Net().to(dtype)
    x = torch.randn(4, 7, 6, dtype=dtype)
    config = CompressionConfig(target_ratio=ratio, layout="lowrank+sparse", sparse_share=share)
    small, report = compress(copy.deepcopy(model), config, calibration=[x])
    return model, small, report, x


def test_parity_with_the_rebuilt_torch_layers():
    _, small, report, x = _compressed()
    with_sparse = [f"{m.name}.{n}" for m in report.modules for n, w in m.weights.items() if w.sparse_params > 0]
    assert len(with_sparse) == 7  # all but fc, whose 13-entry budget is all rank 1 (5 + 8)
    dense = copy.deepcopy(small)
    for name in ("conv", "lstm", "gru", "cell", "fc"):
        module = small.get_submodule(name)
        torch_module = layer_type_of_mpo(module).to_torch(module)
        setattr(dense, name, torch_module)
        for wname, cores in module.mpo_weights().items():  # W = lowrank(cores) + sparse, exactly
            from mpolstm.mpo import cores_to_matrix
            base = cores_to_matrix(list(cores), transpose=True)
            rebuilt = getattr(torch_module, wname).detach().reshape(base.shape)
            part = sparse_of(module, wname)
            assert torch.allclose(rebuilt, base + (0 if part is None else part.dense()), atol=1e-12)
    assert torch.allclose(small(x), dense(x), atol=1e-10)
    small.eval()
    with torch.no_grad():  # eval cache, and the one-step paths (cores / halves / dense by the cost model)
        assert torch.allclose(small(x), dense(x), atol=1e-10)
        h = torch.randn(1, 16, dtype=x.dtype)
        out, _ = small.gru.step(h)
        ref, _ = dense.gru(h.unsqueeze(1))
        assert torch.allclose(out, ref[:, 0], atol=1e-10)
        assert torch.allclose(small.cell(h)[0], dense.cell(h)[0], atol=1e-10)
        assert torch.allclose(small.fc(h[:, :8]), dense.fc(h[:, :8]), atol=1e-10)
    from mpolstm.nn.base import set_factorized
    set_factorized(small)  # the recurrence adds W_hh's sparse part to its merged halves (CSR in eager)
    with torch.no_grad():
        assert torch.allclose(small(x), dense(x), atol=1e-10)


def test_budget_and_share():
    model, small, report, _ = _compressed(share=0.5, ratio=3.0)
    assert report.mpo_params <= report.dense_params / 3.0
    stored = sum(p.numel() for n, p in small.named_parameters() if "cores." in n or "_sparse." in n)
    assert stored == report.mpo_params  # sparse values count one each, like pruning's kept entries
    lstm = report.modules[[m.name for m in report.modules].index("lstm")].weights["weight_hh_l0"]
    rank, k = hybrid_sizes((16, 64), lstm.dense_params // 3, 0.5)
    assert lstm.bond_dims == (rank,) and lstm.sparse_params == k
    assert hybrid_sizes((100, 50), 3000, 0.0) == (20, 0)
    assert hybrid_sizes((100, 50), 3000, 1.0) == (1, 2850)


def test_bytes_as_stored_match_the_file_and_the_smallest_index(tmp_path):
    _, small, _, _ = _compressed(dtype=torch.float32)
    names = ["conv", "lstm", "gru", "cell", "fc"]
    tensors, formats = pack_weights(small, names)
    path = save_packed(tensors, formats, tmp_path / "w.safetensors")
    assert file_data_bytes(path) == packed_bytes(tensors)
    parts = [sparse_of(small.get_submodule(n), w) for n in names for w in small.get_submodule(n).mpo_weights()]
    sparse = sum(4 * p.nnz + min(index_bytes(f, p.nnz, p.shape) for f in INDEX_FORMATS) for p in parts if p is not None)
    cores = sum(4 * c.numel() for n in names for cs in small.get_submodule(n).mpo_weights().values() for c in cs)
    assert packed_bytes(tensors) == cores + sparse
    assert any(k.endswith(".sparse") and f in INDEX_FORMATS for k, f in formats.items())


def test_io_round_trip(tmp_path):
    torch.manual_seed(1)
    model, small, _, x = _compressed(dtype=torch.float32)
    save(small, tmp_path / "m")
    loaded = load(tmp_path / "m", base_model=Net())
    assert torch.equal(loaded(x.float()), small(x.float()))


def test_distillation_trains_values_with_a_fixed_mask():
    teacher, small, _, x = _compressed(dtype=torch.float32)
    teacher = teacher.float()
    x = x.float()
    part = sparse_of(small.gru, "weight_hh_l0")
    index, values = part.index.clone(), part.values.detach().clone()
    with torch.no_grad():
        before = float((small(x) - teacher(x)).pow(2).mean())
    distill(small, teacher, [x], steps=60, loss="mse", lr=3e-3)
    assert torch.equal(part.index, index) and not torch.equal(part.values.detach(), values)
    with torch.no_grad():
        assert float((small(x) - teacher(x)).pow(2).mean()) < before


def test_searched_share_is_never_worse_than_plain_low_rank():
    torch.manual_seed(0)
    w = torch.randn(40, 64, dtype=torch.float64) @ torch.diag(torch.logspace(0, -2, 64, dtype=torch.float64))
    c = torch.randn(200, 40, dtype=torch.float64)
    target = Target("m", "w", w, ((40, 1), (1, 64)), w.numel(), whitening((c.T @ c) / 200))
    best = fit_target(target, 800, None)
    assert 0.0 in SHARES and best.error <= fit_hybrid(w, target.whitening, 800, 0.0).error + 1e-12
    assert best.params <= 800


def test_bad_input_is_refused_clearly():
    with pytest.raises(ValueError, match="layout must be 'auto' or one of"):
        CompressionConfig(target_ratio=4, layout="lowrank+dense")
    for share in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match=r"sparse_share must be a number in \[0, 1\]"):
            CompressionConfig(target_ratio=4, layout="lowrank+sparse", sparse_share=share)
    with pytest.raises(ValueError, match="sparse_share must be"):
        CompressionConfig(target_ratio=4, overrides={"fc": {"sparse_share": 2}})
    with pytest.raises(ValueError, match=r"sparse share must be in \[0, 1\]"):
        fit_hybrid(torch.randn(5, 6), None, 20, 1.2)
    model = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 4))
    with pytest.raises(ValueError, match="not to the embedding"):
        compress(model, CompressionConfig(target_ratio=2, layout="lowrank+sparse"))
    with pytest.raises(ValueError, match="rel_tol does not apply"):
        compress(nn.Sequential(nn.Linear(8, 8)), CompressionConfig(rel_tol=0.5, layout="lowrank+sparse"))


def test_hybrid_fit_is_a_fit_whose_factors_are_balanced_and_whose_matrix_is_low_rank_plus_sparse():
    torch.manual_seed(8)
    w = torch.randn(30, 20, dtype=torch.float64)
    c = torch.randn(100, 30, dtype=torch.float64) * torch.logspace(0, -2, 30, dtype=torch.float64)
    fit = fit_hybrid(w, whitening(c.T @ c / 100), 400, 0.5)
    left, right = fit.mpo.cores[0].flatten(0, 2).norm(dim=0), fit.mpo.cores[1].flatten(1).norm(dim=1)
    torch.testing.assert_close(left, right)  # the one balancing rule (compression/fit.py)
    sparse = torch.zeros(20 * 30, dtype=torch.float64).index_add(0, fit.index, fit.values).reshape(20, 30)
    torch.testing.assert_close(fit.matrix(), fit.mpo.to_matrix() + sparse.T)
    assert fit.params == fit.mpo.num_params + fit.nnz <= 400 and fit.nnz > 0
    target = Target("m", "w", w, ((30, 1), (1, 20)), w.numel(), whitening(c.T @ c / 100))
    assert target.output_error(fit.matrix()) == pytest.approx(fit.error, rel=1e-9)


def test_a_hybrid_model_exports_with_the_default_factorized_runtime(tmp_path):
    """Every layer type with a sparse part, exported to ONNX in the default runtime: the sparse parts are
    sparse initializers (also W_hh's, inside the recurrence's Loop), and onnxruntime reproduces the model."""
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    import onnx

    from mpolstm.export import export_onnx, onnx_weight_bytes

    _, small, report, x = _compressed(dtype=torch.float32)
    small.eval()
    path = export_onnx(small, (x,), tmp_path / "hybrid.onnx")
    graph = onnx.load(str(path)).graph
    nnz = sum(w.sparse_params for m in report.modules for w in m.weights.values())
    stored = sum(len(t.values.float_data) or len(t.values.raw_data) // 4 for t in graph.sparse_initializer)
    assert len(graph.sparse_initializer) >= 4 and stored <= nnz
    assert onnx_weight_bytes(path) >= 4 * sum(t.dims[0] * t.dims[1] for t in graph.sparse_initializer)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    other = torch.randn(2, 11, 6)  # another batch and length than the example's
    got = torch.from_numpy(session.run(None, {"input0": other.numpy()})[0])
    with torch.no_grad():
        torch.testing.assert_close(got, small(other), rtol=1e-4, atol=1e-5)
