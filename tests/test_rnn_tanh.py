"""MPORNN (nn.RNN, tanh and ReLU) vs torch at full bond, and through compress, calibration, io, export, prune."""

import copy
import itertools
import json

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from mpolstm import io, mpo
from mpolstm.calibration import collect_moments
from mpolstm.compression import CompressionConfig, compress
from mpolstm.export import densify, export_model
from mpolstm.nn import MPORNN
from mpolstm.nn.registry import layer_type
from mpolstm.prune import (
    count_nonzero,
    make_permanent,
    prunable_weights,
    prune_layerwise,
)

F64 = torch.float64
I, H, T, N = 6, 10, 5, 3


def make_pair(nonlinearity="tanh", num_layers=1, bidirectional=False, batch_first=False, bias=True, seed=0):
    torch.manual_seed(seed)
    ref = nn.RNN(I, H, num_layers, nonlinearity=nonlinearity, bias=bias, batch_first=batch_first,
                 bidirectional=bidirectional).double()
    return ref, MPORNN.from_rnn(ref, num_cores=3)


def run(module, x, h0, packed, lengths, batch_first):
    if packed:
        seq = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
        out, h = module(seq, h0)
        return pad_packed_sequence(out, batch_first=batch_first)[0], h
    return module(x, h0)


CASES = list(itertools.product(["tanh", "relu"], [1, 2], [False, True], [False, True], [False, True], [False, True]))


@pytest.mark.parametrize("nonlinearity,num_layers,bidirectional,batch_first,packed,with_state", CASES)
def test_full_bond_matches_torch(nonlinearity, num_layers, bidirectional, batch_first, packed, with_state):
    ref, m = make_pair(nonlinearity, num_layers, bidirectional, batch_first)
    assert len(m.reports) == 2 * num_layers * (2 if bidirectional else 1)
    assert all(r.rel_error < 1e-12 for r in m.reports.values())
    x = torch.randn(*((N, T) if batch_first else (T, N)), I, dtype=F64, requires_grad=True)
    lengths = torch.tensor([T, 2, T - 1])
    dirs = 2 if bidirectional else 1
    h0 = torch.randn(num_layers * dirs, N, H, dtype=F64, requires_grad=True) if with_state else None
    (out_r, h_r), (out_m, h_m) = [run(mod, x, h0, packed, lengths, batch_first) for mod in (ref, m)]
    assert out_m.shape == out_r.shape and h_m.shape == h_r.shape
    assert torch.allclose(out_m, out_r, atol=1e-12) and torch.allclose(h_m, h_r, atol=1e-12)
    leaves = [x] + ([h0] if with_state else [])
    weights = torch.arange(h_r.numel(), dtype=F64).view_as(h_r)
    grads = [torch.autograd.grad(out.pow(2).sum() + (h * weights).sum(), leaves) for out, h in
             ((out_r, h_r), (out_m, h_m))]
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_parameter_gradients_match_torch(nonlinearity):
    """Biases get torch's gradients; cores get torch's dL/dW pulled back through the rebuild."""
    ref, m = make_pair(nonlinearity, num_layers=2, bidirectional=True)
    x = torch.randn(T, N, I, dtype=F64)
    for module in (ref, m):
        out, h = module(x)
        (out.pow(2).sum() + h.sum()).backward()
    for name, param in ref.named_parameters():
        if name.startswith("bias"):
            assert torch.allclose(getattr(m, name).grad, param.grad, atol=1e-10), name
        else:
            cores = list(getattr(m, f"{name}_cores"))
            expected = torch.autograd.grad(m._rebuild(name), cores, grad_outputs=param.grad)
            for core, want in zip(cores, expected, strict=True):
                assert torch.allclose(core.grad, want, atol=1e-10), name


@pytest.mark.parametrize("nonlinearity,num_layers,bidirectional,with_state",
                         list(itertools.product(["tanh", "relu"], [1, 2], [False, True], [False, True])))
def test_unbatched_input_matches_torch(nonlinearity, num_layers, bidirectional, with_state):
    ref, m = make_pair(nonlinearity, num_layers, bidirectional)
    x = torch.randn(T, I, dtype=F64, requires_grad=True)
    h0 = torch.randn(num_layers * (2 if bidirectional else 1), H, dtype=F64) if with_state else None
    (out_r, h_r), (out_m, h_m) = ref(x, h0), m(x, h0)
    assert out_m.shape == out_r.shape == (T, (2 if bidirectional else 1) * H) and h_m.shape == h_r.shape
    assert torch.allclose(out_m, out_r, atol=1e-12) and torch.allclose(h_m, h_r, atol=1e-12)
    g_r, g_m = (torch.autograd.grad(out.sum(), x)[0] for out in (out_r, out_m))
    assert torch.allclose(g_m, g_r, atol=1e-10)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_no_bias_and_training_dropout_match_torch(nonlinearity):
    torch.manual_seed(0)
    ref = nn.RNN(I, H, 3, nonlinearity=nonlinearity, bias=False, dropout=0.5).double()
    m = MPORNN.from_rnn(ref)
    assert not any(name.startswith("bias") for name, _ in m.named_parameters())
    x = torch.randn(T, N, I, dtype=F64)
    torch.manual_seed(1)
    out_r = ref(x)[0]
    torch.manual_seed(1)
    out_m = m(x)[0]  # same kernel, same random stream: the same dropout masks
    assert torch.allclose(out_m, out_r, atol=1e-12)
    ref.eval(), m.eval()
    assert torch.allclose(m(x)[0], ref(x)[0], atol=1e-12)


def test_same_errors_as_torch_for_wrong_shapes():
    ref, m = make_pair()
    x3 = torch.randn(T, N, I, dtype=F64)
    bad = [
        ("4-D input", torch.randn(2, T, N, I, dtype=F64), None),
        ("wrong feature size", torch.randn(T, N, I + 1, dtype=F64), None),
        ("float32 input", torch.randn(T, N, I), None),
        ("wrong batch in h_0", x3, torch.zeros(1, N + 1, H, dtype=F64)),
        ("wrong layers in h_0", x3, torch.zeros(2, N, H, dtype=F64)),
        ("2-D state for batched input", x3, torch.zeros(1, H, dtype=F64)),
        ("3-D state for unbatched input", torch.randn(T, I, dtype=F64), torch.zeros(1, N, H, dtype=F64)),
        ("packed, wrong state", pack_padded_sequence(x3, torch.tensor([T, 3, 2])), torch.zeros(1, 2, H, dtype=F64)),
    ]
    for what, x, h0 in bad:
        with pytest.raises(Exception) as expected:
            ref(x, h0)
        with pytest.raises(type(expected.value)) as got:
            m(x, h0)
        assert str(got.value) == str(expected.value), what


def test_no_python_time_loop_in_forward(monkeypatch):
    calls = []
    for kernel in ("rnn_tanh", "rnn_relu"):
        original = getattr(torch._VF, kernel)
        monkeypatch.setattr(torch._VF, kernel, lambda *a, _k=kernel, _o=original: calls.append(_k) or _o(*a),
                            raising=False)
    for nonlinearity in ("tanh", "relu"):
        MPORNN(8, 12, num_layers=2, nonlinearity=nonlinearity, bond_dim=3)(torch.randn(40, 2, 8))
    assert calls == ["rnn_tanh", "rnn_relu"]


# ----------------------------------------------------------------------------- conversion, config, construction


def test_to_rnn_round_trip_and_torch_names():
    for nonlinearity in ("tanh", "relu"):
        ref, m = make_pair(nonlinearity, num_layers=2, bidirectional=True, batch_first=True)
        back = m.to_rnn()
        assert type(back) is nn.RNN and back.nonlinearity == nonlinearity and back.batch_first
        for (name_a, a), (name_b, b) in zip(ref.named_parameters(), back.named_parameters(), strict=True):
            assert name_a == name_b and torch.allclose(a, b, atol=1e-12)
            assert torch.allclose(getattr(m, name_a), a, atol=1e-12)
        assert f"nonlinearity='{nonlinearity}'" in repr(m)


def test_truncated_from_rnn_with_mpos_and_factors():
    torch.manual_seed(0)
    ref = nn.RNN(64, 32, num_layers=2, nonlinearity="relu")
    m = MPORNN.from_rnn(ref, max_bond=4)
    for name, report in m.reports.items():
        err = float((getattr(m, name) - getattr(ref, name)).detach().norm() / getattr(ref, name).detach().norm())
        assert report.rel_error == pytest.approx(err, rel=1e-3) and 0 < err < 1
    given = mpo.decompose(ref.weight_hh_l0.detach().T, (4, 8), (8, 4), max_bond=2)
    m = MPORNN.from_rnn(ref, mpos={"weight_hh_l0": given}, factors={"weight_ih_l0": ((8, 8), (4, 8))})
    assert torch.allclose(m.weight_hh_l0, given.to_matrix(transpose=True))
    assert m.factors["weight_ih_l0"] == ((8, 8), (4, 8)) and m.nonlinearity == "relu"
    with pytest.raises(ValueError, match="MPORNN.from_rnn expects a torch.nn.RNN, got GRU"):
        MPORNN.from_rnn(nn.GRU(4, 4))
    with pytest.raises(ValueError, match="unknown weights"):
        MPORNN.from_rnn(ref, mpos={"weight_hh_l5": given})


def test_config_round_trip_and_constructor_errors():
    m = MPORNN(12, 8, 2, "relu", bidirectional=True, batch_first=True, bond_dim=3).double()
    config = json.loads(json.dumps(m.mpo_config()))
    assert config["nonlinearity"] == "relu" and config["class"] == "MPORNN"
    rebuilt = MPORNN.from_config(config).double()
    rebuilt.load_state_dict(m.state_dict())
    x = torch.randn(2, 4, 12, dtype=F64)
    assert torch.equal(rebuilt(x)[0], m(x)[0]) and rebuilt.mode == "RNN_RELU"
    assert "weight_ih_l0_cores.0" in m.state_dict() and "bias_hh_l1_reverse" in m.state_dict()
    with pytest.raises(ValueError, match="Unknown nonlinearity 'gelu'"):
        MPORNN(4, 4, nonlinearity="gelu", bond_dim=2)
    with pytest.raises(ValueError, match="proj_size argument is only supported for LSTM"):
        MPORNN(4, 4, bond_dim=2, proj_size=2)
    with pytest.raises(ValueError, match="bond_dim must be a positive integer"):
        MPORNN(4, 4, bond_dim=0)


def test_constructor_from_scratch_has_torch_init_variance():
    torch.manual_seed(0)
    m = MPORNN(256, 512, bond_dim=8)
    assert m.weight_hh_l0.shape == (512, 512)
    assert float(m.weight_hh_l0.detach().var()) == pytest.approx(1.0 / (3 * 512), rel=0.2)
    assert m.compression_ratio > 40


# ----------------------------------------------------------------------------- streaming, eval cache


@pytest.mark.parametrize("nonlinearity,num_layers,batched,with_state,training",
                         list(itertools.product(["tanh", "relu"], [1, 2], [True, False], [False, True], [False, True])))
def test_step_equals_full_sequence_forward(nonlinearity, num_layers, batched, with_state, training):
    _, m = make_pair(nonlinearity, num_layers)
    m.train(training)
    x = torch.randn(T, *((N,) if batched else ()), I, dtype=F64)
    h0 = torch.randn(num_layers, *((N,) if batched else ()), H, dtype=F64) if with_state else None
    out, h = m(x, h0)
    stream = m.stream(h0)
    steps = torch.stack([stream(frame) for frame in x])
    assert torch.allclose(steps, out, atol=1e-12) and torch.allclose(stream.state, h, atol=1e-12)


def test_eval_cache_reuses_rebuilt_weights_until_a_step(monkeypatch):
    torch.manual_seed(0)
    m = MPORNN(8, 12, num_layers=2, bond_dim=3).eval()
    x = torch.randn(5, 2, 8)
    calls = []
    original = mpo.cores_to_matrix
    monkeypatch.setattr("mpolstm.nn.rnn.mpo_math.cores_to_matrix",
                        lambda cores, transpose=False: calls.append(1) or original(cores, transpose))
    with torch.no_grad():
        first = m(x)[0]
        m(x)
    assert len(calls) == 4
    m(x)[0].pow(2).sum().backward()
    torch.optim.SGD(m.parameters(), lr=0.5).step()
    with torch.no_grad():
        after = m(x)[0]
    assert not torch.allclose(after, first)
    assert torch.allclose(after, m.to_rnn()(x)[0], atol=1e-6)


# ----------------------------------------------------------------------------- library integration


class Tagger(nn.Module):
    def __init__(self, hidden=12):
        super().__init__()
        self.rnn = nn.RNN(8, hidden, num_layers=2, nonlinearity="relu", batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, 5)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


def test_registry_conversion_and_calibration_moments():
    torch.manual_seed(1)
    rnn = nn.RNN(6, 5, num_layers=2, bidirectional=True, batch_first=True).double()
    entry = layer_type(rnn)
    assert entry.mpo_type is MPORNN and layer_type(nn.RNN(2, 2, nonlinearity="relu")) is entry
    x = torch.randn(3, 8, 6, dtype=F64)
    m = collect_moments(rnn, {"rnn": rnn}, [x])["rnn"]
    assert set(m) == {f"weight_{k}_l{l}{d}" for k in ("ih", "hh") for l in (0, 1) for d in ("", "_reverse")}
    flat = x.reshape(-1, 6)
    torch.testing.assert_close(m["weight_ih_l0"], flat.T @ flat / flat.shape[0])
    out, _ = rnn(x)  # top layer: forward h_{t-1} and reverse h_{t+1} come from the module output
    fwd = torch.cat([torch.zeros(3, 1, 5, dtype=F64), out[:, :-1, :5]], 1).reshape(-1, 5)
    rev = torch.cat([out[:, 1:, 5:], torch.zeros(3, 1, 5, dtype=F64)], 1).reshape(-1, 5)
    torch.testing.assert_close(m["weight_hh_l1"], fwd.T @ fwd / fwd.shape[0])
    torch.testing.assert_close(m["weight_hh_l1_reverse"], rev.T @ rev / rev.shape[0])


def test_compress_with_budget_and_calibration():
    torch.manual_seed(2)
    model = Tagger()
    x = torch.randn(3, 6, 8)
    dense = sum(p.numel() for n, p in model.named_parameters() if "weight" in n)
    for calibration in (None, [x]):
        net, report = compress(copy.deepcopy(model), CompressionConfig(target_ratio=4), calibration=calibration)
        assert isinstance(net.rnn, MPORNN) and net.rnn.nonlinearity == "relu"
        cores = sum(c.numel() for mod in net.modules() if hasattr(mod, "mpo_weights")
                    for cs in mod.mpo_weights().values() for c in cs)
        assert cores == report.mpo_params <= report.budget == dense // 4
        assert net(x).shape == (3, 6, 5)


def test_io_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(3)
    net = Tagger().double()
    compress(net, CompressionConfig(max_bond=3, num_cores=2))
    io.save(net, tmp_path / "whole")
    loaded = io.load(tmp_path / "whole", base_model=Tagger().double())
    assert isinstance(loaded.rnn, MPORNN) and loaded.rnn.nonlinearity == "relu"
    for (ka, va), (kb, vb) in zip(net.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    x = torch.randn(2, 5, 8, dtype=F64)
    assert torch.equal(loaded(x), net(x))
    io.save(net.rnn, tmp_path / "rnn")
    alone = io.load(tmp_path / "rnn")
    assert torch.equal(alone(x)[0], net.rnn(x)[0])


def test_export_dense_torchscript_and_onnx(tmp_path):
    torch.manual_seed(4)
    net = Tagger()
    compress(net, CompressionConfig(max_bond=4, target_modules=["rnn"]))
    net.eval()
    x = torch.randn(2, 4, 8)
    with torch.no_grad():
        expected = net(x)
    dense = densify(net)
    assert type(dense.rnn) is nn.RNN and dense.rnn.nonlinearity == "relu"
    torch.testing.assert_close(dense(x), expected, atol=1e-5, rtol=1e-4)
    folder = export_model(net, "dense", tmp_path / "dense")
    assert (folder / io.CONFIG_FILE).is_file()
    traced = torch.jit.load(str(export_model(net, "torchscript", tmp_path / "m.pt", (x,))))
    other = torch.randn(3, 7, 8)
    with torch.no_grad():
        torch.testing.assert_close(traced(other), net(other), atol=1e-5, rtol=1e-4)
    pytest.importorskip("onnx", reason="onnx is not installed")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    path = export_model(net, "onnx", tmp_path / "m.onnx", (x,))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input0": other.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), net(other), atol=1e-4, rtol=1e-4)


def test_prune_rnn_weights():
    torch.manual_seed(5)
    net = Tagger()
    names = prunable_weights(net)
    assert names == [f"rnn.weight_{k}_l{l}{d}" for l in (0, 1) for d in ("", "_reverse") for k in ("ih", "hh")]
    kept = prune_layerwise(net, names, 500)
    assert sum(kept.values()) == 500 == count_nonzero(net, names)
    x = torch.randn(2, 4, 8)
    out = net(x)  # the forward uses the masked weights (RNNBase's flat weights refreshed)
    make_permanent(net)
    assert count_nonzero(net, names) == 500
    torch.testing.assert_close(net(x), out)
