"""MPOLSTMCell / MPOGRUCell / MPORNNCell vs torch's cells at full bond, every product path of the cost
model, and through compress, calibration, io, export, prune."""

import copy
import itertools
import json

import pytest
import torch
from torch import nn

from mpolstm import mpo
from mpolstm.calibration import collect_moments
from mpolstm.nn import MPOGRUCell, MPOLSTMCell, MPORNNCell
from mpolstm.nn.registry import layer_type

F64 = torch.float64
I, H, N = 6, 10, 3
KINDS = {
    "lstm": (nn.LSTMCell, MPOLSTMCell.from_lstm_cell, {}),
    "gru": (nn.GRUCell, MPOGRUCell.from_gru_cell, {}),
    "rnn_tanh": (nn.RNNCell, MPORNNCell.from_rnn_cell, {"nonlinearity": "tanh"}),
    "rnn_relu": (nn.RNNCell, MPORNNCell.from_rnn_cell, {"nonlinearity": "relu"}),
}


def make_pair(kind, bias=True, seed=0, input_size=I, hidden=H):
    torch_cls, convert, kwargs = KINDS[kind]
    torch.manual_seed(seed)
    ref = torch_cls(input_size, hidden, bias=bias, **kwargs).double()
    return ref, convert(ref, num_cores=3)


def make_state(kind, batch, requires_grad=False):
    shape = (batch, H) if batch else (H,)
    h = torch.randn(*shape, dtype=F64, requires_grad=requires_grad)
    if kind != "lstm":
        return h
    return h, torch.randn(*shape, dtype=F64, requires_grad=requires_grad)


def as_list(value):
    return list(value) if isinstance(value, tuple) else [value]


# ----------------------------------------------------------------------------- torch parity at full bond


@pytest.mark.parametrize("kind,bias,batched,with_state,path",
                         [(*c, "cores") for c in itertools.product(KINDS, [True, False], [True, False], [True, False])]
                         + [(k, b, True, True, "dense") for k, b in itertools.product(KINDS, [True, False])])
def test_full_bond_matches_torch_with_gradients(kind, bias, batched, with_state, path, force_path, kernels,
                                                 param_grads_match):
    force_path(path)
    ref, m = make_pair(kind, bias)
    assert all(r.rel_error < 1e-12 for r in m.reports.values()) and set(m.reports) == {"weight_ih", "weight_hh"}
    x = torch.randn(*((N,) if batched else ()), I, dtype=F64, requires_grad=True)
    state = make_state(kind, N if batched else None, requires_grad=True) if with_state else None
    kernels.clear()
    out_r, out_m = as_list(ref(x, state)), as_list(m(x, state))
    assert kernels == [{"cores": "cores", "dense": "rebuild"}[path]] * 2  # training: nothing cached
    for a, b in zip(out_m, out_r, strict=True):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-12)
    leaves = [x, *([] if state is None else as_list(state))]
    loss_r, loss_m = (sum((o * torch.linspace(-1, 2, o.numel(), dtype=F64).view_as(o)).sum() + o.pow(2).sum()
                          for o in outs) for outs in (out_r, out_m))
    for a, b in zip(torch.autograd.grad(loss_m, leaves, retain_graph=True),
                    torch.autograd.grad(loss_r, leaves, retain_graph=True), strict=True):
        assert torch.allclose(a, b, atol=1e-10)
    # parameter gradients: biases directly, cores as torch's dL/dW pulled back through the rebuild
    loss_r.backward()
    loss_m.backward()
    param_grads_match(ref, m)


@pytest.mark.parametrize("kind,path", list(itertools.product(KINDS, ["cores", "halves", "dense"])))
def test_eval_paths_match_torch(kind, path, force_path, kernels):
    """In eval mode without grad the cached paths (merged halves, cached dense weight) are used."""
    force_path(path)
    torch.manual_seed(1)
    ref, m = make_pair(kind, input_size=24, hidden=16)  # 3 cores: the merged halves differ from the chain
    m.eval()
    kernels.clear()
    x = torch.randn(N, 24, dtype=F64)
    state = (torch.randn(N, 16, dtype=F64), torch.randn(N, 16, dtype=F64)) if kind == "lstm" else \
        torch.randn(N, 16, dtype=F64)
    with torch.no_grad():
        for _ in range(2):  # the second call reads the cache
            for a, b in zip(as_list(m(x, state)), as_list(ref(x, state)), strict=True):
                assert torch.allclose(a, b, atol=1e-12)
    # the dense weights are rebuilt once (two weights), then read from the cache
    assert kernels == {"cores": ["cores"] * 4, "halves": ["halves"] * 4, "dense": ["rebuild"] * 2}[path]


def test_cost_model_picks_contraction_at_one_row_and_dense_at_many(kernels):
    m = MPOLSTMCell(256, 256, bond_dim=4)
    with torch.no_grad():
        m(torch.randn(1, 256))
        assert kernels == ["cores"] * 2  # training: no rebuild per step
        m.eval()
        kernels.clear()
        m(torch.randn(1, 256))
        m(torch.randn(1, 256))
        assert kernels == ["halves"] * 4  # eval: the cached merged halves of each chain
        kernels.clear()
        m(torch.randn(4096, 256))
        assert kernels == ["rebuild"] * 2  # many rows: a dense matmul with the rebuilt weights


def bad_calls(kind):
    x = torch.randn(N, I, dtype=F64)

    def st(h, c=None):
        return h if kind != "lstm" else (h, h.clone() if c is None else c)

    calls = [
        ("3-D input", torch.randn(2, N, I, dtype=F64), None),
        ("0-D input", torch.tensor(1.0, dtype=F64), None),
        ("wrong feature size", torch.randn(N, I + 1, dtype=F64), None),
        ("wrong feature size, unbatched", torch.randn(I + 1, dtype=F64), None),
        ("float32 input", torch.randn(N, I), None),
        ("float32 state", x, st(torch.zeros(N, H))),
        ("wrong batch in state", x, st(torch.zeros(N + 1, H, dtype=F64))),
        ("wrong hidden size", x, st(torch.zeros(N, H + 1, dtype=F64))),
        ("3-D state", x, st(torch.zeros(1, N, H, dtype=F64))),
        ("2-D state, unbatched input", torch.randn(I, dtype=F64), st(torch.zeros(1, H, dtype=F64))),
        ("1-D state, batched input", x, st(torch.zeros(H, dtype=F64))),
        ("1-D state, batch = hidden", torch.randn(H, I, dtype=F64), st(torch.zeros(H, dtype=F64))),
    ]
    if kind == "lstm":
        calls += [("wrong cell size", x, (torch.zeros(N, H, dtype=F64), torch.zeros(N, H - 1, dtype=F64))),
                  ("three states", x, (torch.zeros(N, H, dtype=F64),) * 3)]
    return calls


@pytest.mark.parametrize("kind,bias", list(itertools.product(KINDS, [True, False])))
def test_same_errors_as_torch(kind, bias):
    ref, m = make_pair(kind, bias)
    for training in (True, False):
        m.train(training)
        for what, x, state in bad_calls(kind):
            with pytest.raises(Exception) as expected:
                ref(x, state)
            with pytest.raises(type(expected.value)) as got:
                m(x, state)
            assert str(got.value) == str(expected.value), what


# ----------------------------------------------------------------------------- conversion, config, cache


@pytest.mark.parametrize("kind", KINDS)
def test_to_torch_config_round_trip_and_torch_names(kind):
    ref, m = make_pair(kind)
    back = layer_type(ref).to_torch(m)
    assert type(back) is type(ref) and getattr(back, "nonlinearity", None) == getattr(ref, "nonlinearity", None)
    for (name_a, a), (name_b, b) in zip(ref.named_parameters(), back.named_parameters(), strict=True):
        assert name_a == name_b and torch.allclose(a, b, atol=1e-12)
        assert torch.allclose(getattr(m, name_a), a, atol=1e-12)  # torch's names read the rebuilt weights
    config = json.loads(json.dumps(m.mpo_config()))
    rebuilt = type(m).from_config(config).double()
    rebuilt.load_state_dict(m.state_dict())
    x = torch.randn(N, I, dtype=F64)
    assert all(torch.equal(a, b) for a, b in zip(as_list(rebuilt(x)), as_list(m(x))))
    assert sorted(m.state_dict()) == sorted(["bias_ih", "bias_hh"] + [f"weight_{w}_cores.{k}" for w in ("ih", "hh")
                                                                       for k in range(3)])
    other = MPOGRUCell if type(m) is not MPOGRUCell else MPOLSTMCell
    with pytest.raises(ValueError, match="config is for"):
        other.from_config(config)
    bad = copy.deepcopy(config)
    bad["weights"]["weight_ih"]["bond_dims"] = [2]
    with pytest.raises(ValueError, match="weight_ih: bond_dims \\[2\\] must have 2 entries"):
        type(m).from_config(bad)


def test_truncation_mpos_factors_and_type_errors():
    torch.manual_seed(0)
    ref = nn.LSTMCell(64, 32)
    m = MPOLSTMCell.from_lstm_cell(ref, max_bond=4)
    for name, report in m.reports.items():
        err = float((getattr(m, name) - getattr(ref, name)).detach().norm() / getattr(ref, name).detach().norm())
        assert report.rel_error == pytest.approx(err, rel=1e-3) and 0 < err < 1
    assert m.compression_ratio > 3
    tol = MPOGRUCell.from_gru_cell(nn.GRUCell(64, 32), rel_tol=0.3)
    assert all(r.rel_error <= 0.3 * (1 + 1e-5) for r in tol.reports.values())
    given = mpo.decompose(ref.weight_hh.detach().T, (4, 8), (8, 16), max_bond=2)
    m = MPOLSTMCell.from_lstm_cell(ref, mpos={"weight_hh": given}, factors={"weight_ih": ((8, 8), (8, 16))})
    assert torch.allclose(m.weight_hh, given.to_matrix(transpose=True))
    assert m.factors["weight_ih"] == ((8, 8), (8, 16)) and m.reports["weight_hh"] is given.report
    with pytest.raises(ValueError, match="MPOLSTMCell.from_lstm_cell expects a torch.nn.LSTMCell, got GRUCell"):
        MPOLSTMCell.from_lstm_cell(nn.GRUCell(4, 4))
    with pytest.raises(ValueError, match="MPORNNCell.from_rnn_cell expects a torch.nn.RNNCell"):
        MPORNNCell.from_rnn_cell(ref)
    with pytest.raises(ValueError, match="expected \\(32, 128\\)"):
        MPOLSTMCell.from_lstm_cell(ref, mpos={"weight_hh": mpo.decompose(ref.weight_hh.detach(), (8, 16), (4, 8))})
    with pytest.raises(ValueError, match="unknown weights"):
        MPOLSTMCell.from_lstm_cell(ref, mpos={"weight_xx": given})


@pytest.mark.parametrize("kwargs,error,match", [
    ({"bond_dim": 0}, ValueError, "bond_dim must be a positive integer"),
    ({"bond_dim": 2, "num_cores": 0}, ValueError, "num_cores must be a positive integer"),
    ({"bond_dim": 2, "bias": 1}, TypeError, "bias should be of type bool"),
    ({"bond_dim": 2, "factors": {"weight_ih": ((2, 3), (5, 4))}}, ValueError, "multiply to 20, expected 40"),
    ({"bond_dim": 2, "factors": {"weight_hr": ((6,), (40,))}}, ValueError, "unknown weights"),
])
def test_constructor_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        MPOLSTMCell(6, 10, **kwargs)


def test_constructor_from_scratch_and_nonlinearity():
    torch.manual_seed(0)
    m = MPOGRUCell(256, 512, bond_dim=8)
    assert m.weight_ih.shape == (1536, 256) and m.weight_hh.shape == (1536, 512)
    assert float(m.weight_hh.detach().var()) == pytest.approx(1.0 / (3 * 512), rel=0.2)
    assert m.compression_ratio > 100 and "compression=" in repr(m)
    h = m(torch.randn(4, 256), torch.randn(4, 512))  # with a state: weight_hh gets a gradient
    h.pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    cell = MPORNNCell(4, 6, True, "relu", bond_dim=2)
    assert cell.nonlinearity == "relu" and "nonlinearity=relu" in repr(cell)
    with pytest.raises(ValueError, match="Unknown nonlinearity: gelu"):
        MPORNNCell(4, 6, nonlinearity="gelu", bond_dim=2)
    assert MPOLSTMCell(4, 6, bias=False, bond_dim=2).bias_ih is None


def test_eval_cache_reused_and_invalidated(force_path, kernels):
    torch.manual_seed(0)
    m = MPOLSTMCell(8, 12, bond_dim=3)
    force_path("dense")
    x = torch.randn(5, 8)
    m.eval()
    kernels.clear()
    with torch.no_grad():
        first = m(x)[0]
        m(x, m(x))
    assert kernels == ["rebuild"] * 2  # two weights, rebuilt once for three calls
    m(x)[0].pow(2).sum().backward()  # eval with grad: no cache, the cores get gradients
    torch.optim.SGD(m.parameters(), lr=0.5).step()
    with torch.no_grad():
        after = m(x)[0]
        assert not torch.allclose(after, first)
        assert torch.allclose(after, m.to_lstm_cell()(x)[0], atol=1e-6)
        m.load_state_dict(MPOLSTMCell(8, 12, bond_dim=3).state_dict())
        assert torch.allclose(m(x)[0], m.to_lstm_cell()(x)[0], atol=1e-6)
        m(x)
        kernels.clear()
        m.clear_cache()
        m(x)
    assert kernels == ["rebuild"] * 2  # cleared: rebuilt again


class Loop(nn.Module):
    """A tagger that runs its cells one step at a time (GRUCell -> LSTMCell -> RNNCell)."""

    def __init__(self, inp=8, hidden=16):
        super().__init__()
        self.gru = nn.GRUCell(inp, hidden)
        self.lstm = nn.LSTMCell(hidden, hidden)
        self.rnn = nn.RNNCell(hidden, hidden, nonlinearity="relu")
        self.head = nn.Linear(hidden, 4)

    def forward(self, x):  # x (T, N, inp)
        g = s = r = None
        outs = []
        for frame in x:
            g = self.gru(frame, g)
            s = self.lstm(g, s)
            r = self.rnn(s[0], r)
            outs.append(self.head(r))
        return torch.stack(outs)


def test_calibration_moments_of_cells():
    torch.manual_seed(1)
    model = Loop().double()
    x = torch.randn(4, 3, 8, dtype=F64)
    moments = collect_moments(model, {"gru": model.gru, "lstm": model.lstm}, [x])
    flat = x.reshape(-1, 8)
    torch.testing.assert_close(moments["gru"]["weight_ih"], flat.T @ flat / flat.shape[0])
    hs, h = [], None
    for frame in x:
        hs.append(torch.zeros(3, 16, dtype=F64) if h is None else h)
        h = model.gru(frame, h)
    prev = torch.cat(hs)
    torch.testing.assert_close(moments["gru"]["weight_hh"], prev.T @ prev / prev.shape[0])
    assert set(moments["lstm"]) == {"weight_ih", "weight_hh"}
    cell = nn.GRUCell(8, 16).double()  # unbatched calls count one sample each
    one = collect_moments(cell, {"": cell}, [x[0, 0]])
    torch.testing.assert_close(one[""]["weight_ih"], torch.outer(x[0, 0], x[0, 0]))
    h = torch.randn(3, 16, dtype=F64)  # a state passed by keyword is what weight_hh multiplies, not zeros
    keyword = collect_moments(cell, {"": cell}, lambda c: c(x[0], hx=h))
    torch.testing.assert_close(keyword[""]["weight_hh"], h.T @ h / 3)
