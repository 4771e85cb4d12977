import copy
import itertools
import json
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from mpolstm import mpo
from mpolstm.calibration import collect_moments
from mpolstm.nn import MPOGRU, MPOLSTM, MPORNN
from mpolstm.nn.base import set_factorized
from mpolstm.nn.registry import layer_type

F64 = torch.float64
I, H, P, T, N = 6, 10, 4, 5, 3


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


KINDS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]
HIDDEN_ONLY = ["gru", "rnn_tanh", "rnn_relu"]  # the kinds whose state is h alone


def torch_rnn(kind, *args, **kwargs):
    """The torch module of ``kind`` (nn.LSTM, nn.GRU, or nn.RNN with its nonlinearity)."""
    if kind.startswith("rnn_"):
        return nn.RNN(*args, nonlinearity=kind[4:], **kwargs)
    return {"lstm": nn.LSTM, "gru": nn.GRU}[kind](*args, **kwargs)


def make_pair(kind, num_layers=1, bidirectional=False, batch_first=False, proj_size=0, seed=0):
    torch.manual_seed(seed)
    extra = {"proj_size": proj_size} if kind == "lstm" else {}
    ref = torch_rnn(kind, I, H, num_layers, batch_first=batch_first, bidirectional=bidirectional, **extra).double()
    return ref, layer_type(ref).from_torch(ref, num_cores=3)


def initial_state(kind, ref, batch):
    dirs = 2 if ref.bidirectional else 1
    shape = (ref.num_layers * dirs, *((batch,) if batch else ()))
    h = torch.randn(*shape, (ref.proj_size or H) if kind == "lstm" else H, dtype=F64, requires_grad=True)
    if kind != "lstm":
        return h
    return h, torch.randn(*shape, H, dtype=F64, requires_grad=True)


def run(module, x, state, packed, lengths, batch_first):
    if packed:
        seq = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
        out, hidden = module(seq, state)
        out = pad_packed_sequence(out, batch_first=batch_first)[0]
    else:
        out, hidden = module(x, state)
    return out, hidden if isinstance(hidden, tuple) else (hidden,)


def state_leaves(state):
    return [] if state is None else list(state) if isinstance(state, tuple) else [state]


# ----------------------------------------------------------------------------- torch parity at full bond

LSTM_CASES = list(itertools.product([1, 2], [False, True], [False, True], [0, P], [False, True], [False, True]))
GRU_CASES = list(itertools.product([1, 2], [False, True], [False, True], [0], [False, True], [False, True]))


@pytest.mark.parametrize(
    "kind,num_layers,bidirectional,batch_first,proj_size,packed,with_state",
    [("lstm", *c) for c in LSTM_CASES] + [(k, *c) for k in HIDDEN_ONLY for c in GRU_CASES],
)
def test_full_bond_matches_torch(kind, num_layers, bidirectional, batch_first, proj_size, packed, with_state):
    ref, m = make_pair(kind, num_layers, bidirectional, batch_first, proj_size)
    assert all(r.rel_error < 1e-12 for r in m.reports.values()) and len(m.reports) > 0
    x = torch.randn(*((N, T) if batch_first else (T, N)), I, dtype=F64, requires_grad=True)
    lengths = torch.tensor([T, 2, T - 1])
    state = initial_state(kind, ref, N) if with_state else None
    outputs = [run(mod, x, state, packed, lengths, batch_first) for mod in (ref, m)]
    (out_r, hid_r), (out_m, hid_m) = outputs
    assert torch.allclose(out_m, out_r, atol=1e-12)
    for a, b in zip(hid_m, hid_r, strict=True):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-12)
    # gradients w.r.t. the input and the initial state
    leaves = [x, *state_leaves(state)]
    grads = []
    for out, hid in outputs:
        loss = out.pow(2).sum() + sum((h * torch.arange(h.numel(), dtype=F64).view_as(h)).sum() for h in hid)
        grads.append(torch.autograd.grad(loss, leaves))
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_parameter_gradients_match_torch(kind, param_grads_match):
    """Biases get torch's gradients; cores get torch's dL/dW pulled back through the rebuild."""
    ref, m = make_pair(kind, num_layers=2, bidirectional=True, proj_size=P if kind == "lstm" else 0)
    x = torch.randn(T, N, I, dtype=F64)
    for module in (ref, m):
        out, _ = module(x)
        out.pow(2).sum().backward()
    param_grads_match(ref, m)


@pytest.mark.parametrize(
    "kind,num_layers,bidirectional,proj_size,with_state",
    [("lstm", *c) for c in itertools.product([1, 2], [False, True], [0, P], [False, True])]
    + [(k, *c) for k in HIDDEN_ONLY for c in itertools.product([1, 2], [False, True], [0], [False, True])],
)
def test_unbatched_input_matches_torch(kind, num_layers, bidirectional, proj_size, with_state):
    ref, m = make_pair(kind, num_layers, bidirectional, proj_size=proj_size)
    x = torch.randn(T, I, dtype=F64, requires_grad=True)
    state = initial_state(kind, ref, None) if with_state else None
    (out_r, hid_r), (out_m, hid_m) = [run(mod, x, state, False, None, False) for mod in (ref, m)]
    assert out_m.shape == out_r.shape == (T, (2 if bidirectional else 1) * (proj_size or H))
    assert torch.allclose(out_m, out_r, atol=1e-12)
    for a, b in zip(hid_m, hid_r, strict=True):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-12)
    g_r, g_m = (torch.autograd.grad(out.sum(), x)[0] for out in (out_r, out_m))
    assert torch.allclose(g_m, g_r, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_no_bias_and_training_dropout_match_torch(kind):
    torch.manual_seed(0)
    ref = torch_rnn(kind, I, H, 3, bias=False, dropout=0.5).double()
    m = layer_type(ref).from_torch(ref)
    assert not any(name.startswith("bias") for name, _ in m.named_parameters())
    x = torch.randn(T, N, I, dtype=F64)
    torch.manual_seed(1)
    out_r = ref(x)[0]
    torch.manual_seed(1)
    out_m = m(x)[0]  # same kernel, same random stream: the same dropout masks
    assert torch.allclose(out_m, out_r, atol=1e-12)
    ref.eval(), m.eval()
    assert torch.allclose(m(x)[0], ref(x)[0], atol=1e-12)


def bad_calls(kind):
    """(description, input, state) triples that torch rejects."""
    x3 = torch.randn(T, N, I, dtype=F64)
    h_dim = H
    good3 = torch.zeros(1, N, h_dim, dtype=F64)

    def st(*hs):
        return hs[0] if kind != "lstm" else tuple(hs) if len(hs) == 2 else (hs[0], hs[0].clone())

    packed = ([("packed, wrong state", pack_padded_sequence(x3, torch.tensor([T, 3, 2])),
                st(torch.zeros(1, 2, h_dim, dtype=F64)))] if kind != "lstm" else [])
    return packed + [
        ("4-D input", torch.randn(2, T, N, I, dtype=F64), None),
        ("wrong feature size", torch.randn(T, N, I + 1, dtype=F64), None),
        ("float32 input", torch.randn(T, N, I), None),
        ("wrong batch in h_0", x3, st(torch.zeros(1, N + 1, h_dim, dtype=F64))),
        ("wrong layers in h_0", x3, st(torch.zeros(2, N, h_dim, dtype=F64))),
        ("2-D state for batched input", x3, st(torch.zeros(1, h_dim, dtype=F64))),
        ("3-D state for unbatched input", torch.randn(T, I, dtype=F64), st(good3)),
    ] + ([("wrong cell size", x3, (good3, torch.zeros(1, N, H + 1, dtype=F64)))] if kind == "lstm" else [])


@pytest.mark.parametrize("kind", KINDS)
def test_same_errors_as_torch_for_wrong_shapes(kind):
    ref, m = make_pair(kind)
    for what, x, state in bad_calls(kind):
        with pytest.raises(Exception) as expected:
            ref(x, state)
        with pytest.raises(type(expected.value)) as got:
            m(x, state)
        assert str(got.value) == str(expected.value), what


def test_packed_input_with_wrong_state_is_rejected_clearly():
    _, m = make_pair("lstm")
    seq = pack_padded_sequence(torch.randn(T, N, I, dtype=F64), torch.tensor([T, 3, 2]))
    with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(1, 3, 10\), got \[1, 2, 10\]"):
        m(seq, (torch.zeros(1, 2, H, dtype=F64), torch.zeros(1, 2, H, dtype=F64)))
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size"):
        m(pack_padded_sequence(torch.randn(T, N, I + 1, dtype=F64), torch.tensor([T, 3, 2])))


# ----------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("kind", KINDS)
def test_to_torch_round_trip(kind):
    ref, m = make_pair(kind, num_layers=2, bidirectional=True, batch_first=True, proj_size=P if kind == "lstm" else 0)
    back = {"lstm": MPOLSTM.to_lstm, "gru": MPOGRU.to_gru}.get(kind, MPORNN.to_rnn)(m)
    assert type(back) is type(ref) and back.batch_first
    if kind.startswith("rnn_"):
        assert back.nonlinearity == kind[4:] and f"nonlinearity='{kind[4:]}'" in repr(m)
    for (name_a, a), (name_b, b) in zip(ref.named_parameters(), back.named_parameters(), strict=True):
        assert name_a == name_b and torch.allclose(a, b, atol=1e-12)
        assert torch.allclose(getattr(m, name_a), a, atol=1e-12)  # torch's names read rebuilt weights


def test_truncated_from_lstm_reports_error_per_weight():
    torch.manual_seed(0)
    ref = nn.LSTM(64, 32, num_layers=2, proj_size=16)
    m = MPOLSTM.from_lstm(ref, max_bond=4)
    assert set(m.reports) == {f"weight_{w}_l{k}" for w in ("ih", "hh", "hr") for k in (0, 1)}
    for name, report in m.reports.items():
        measured = rel_err(getattr(m, name).detach(), getattr(ref, name).detach())
        assert report.rel_error == pytest.approx(measured, rel=1e-3)
        assert 0 < report.rel_error < 1
    assert m.compression_ratio > 3
    tol = MPOLSTM.from_lstm(ref, rel_tol=0.3)
    for name in tol.reports:
        assert rel_err(getattr(tol, name).detach(), getattr(ref, name).detach()) <= 0.3 * (1 + 1e-5)


def test_from_lstm_with_given_mpos_and_factors():
    ref = nn.LSTM(12, 8).double()
    given = mpo.decompose(ref.weight_hh_l0.detach().T, (2, 4), (8, 4), max_bond=2)
    m = MPOLSTM.from_lstm(ref, mpos={"weight_hh_l0": given}, factors={"weight_ih_l0": ((3, 4), (4, 8))})
    assert torch.allclose(m.weight_hh_l0, given.to_matrix(transpose=True))
    assert m.reports["weight_hh_l0"].rel_error == given.report.rel_error
    assert m.factors["weight_ih_l0"] == ((3, 4), (4, 8))
    assert [c.shape[1] for c in m.weight_ih_l0_cores] == [3, 4]
    with pytest.raises(ValueError, match="unknown weights \\['weight_hh_l1'\\]"):
        MPOLSTM.from_lstm(ref, mpos={"weight_hh_l1": given})
    with pytest.raises(ValueError, match="expected \\(8, 32\\)"):
        MPOLSTM.from_lstm(ref, mpos={"weight_hh_l0": mpo.decompose(ref.weight_hh_l0.detach(), (4, 8), (2, 4))})
    with pytest.raises(ValueError, match="expects a torch.nn.LSTM, got GRU"):
        MPOLSTM.from_lstm(nn.GRU(12, 8))


@pytest.mark.parametrize("cls", [MPOLSTM, MPOGRU])
def test_config_round_trip(cls):
    extra = {"proj_size": 3} if cls is MPOLSTM else {}
    m = cls(12, 8, num_layers=2, bidirectional=True, bond_dim=3, **extra).double()
    config = json.loads(json.dumps(m.mpo_config()))
    rebuilt = cls.from_config(config).double()
    rebuilt.load_state_dict(m.state_dict())
    x = torch.randn(4, 2, 12, dtype=F64)
    assert torch.equal(rebuilt(x)[0], m(x)[0])
    assert set(m.mpo_weights()) == set(config["weights"])
    assert "weight_ih_l0_cores.0" in m.state_dict() and "bias_hh_l1_reverse" in m.state_dict()
    with pytest.raises(ValueError, match="config is for"):
        (MPOGRU if cls is MPOLSTM else MPOLSTM).from_config(config)


def test_config_round_trip_keeps_any_factorisation():
    ref = nn.LSTM(12, 8)
    single = mpo.decompose(ref.weight_hh_l0.detach().T, (8,), (32,))  # one core: not a compressing split
    m = MPOLSTM.from_lstm(ref, max_bond=2, mpos={"weight_hh_l0": single})
    rebuilt = MPOLSTM.from_config(json.loads(json.dumps(m.mpo_config())))
    rebuilt.load_state_dict(m.state_dict())
    assert rebuilt.factors == m.factors and rebuilt.factors["weight_hh_l0"] == ((8,), (32,))
    x = torch.randn(3, 2, 12)
    assert torch.equal(rebuilt(x)[0], m(x)[0])
    bad = m.mpo_config()
    bad["weights"]["weight_ih_l0"]["bond_dims"] = [2]
    with pytest.raises(ValueError, match="weight_ih_l0: bond_dims \\[2\\] must have 3 entries"):
        MPOLSTM.from_config(bad)
    bad["weights"]["weight_ih_l0"] = {"in_factors": [3, 3], "out_factors": [4, 8], "bond_dims": [2]}
    with pytest.raises(ValueError, match="shape \\(9, 32\\) cannot be weight_ih_l0"):
        MPOLSTM.from_config(bad)


# ----------------------------------------------------------------------------- construction


def test_constructor_from_scratch():
    torch.manual_seed(0)
    m = MPOLSTM(256, 512, num_layers=2, bond_dim=8)
    assert m.weight_ih_l0.shape == (2048, 256) and m.weight_hh_l1.shape == (2048, 512)
    assert m.weight_ih_l1.shape == (2048, 512)
    expected_var = 1.0 / (3 * 512)  # torch's U(-1/sqrt(H), 1/sqrt(H))
    assert float(m.weight_hh_l0.detach().var()) == pytest.approx(expected_var, rel=0.2)
    assert m.compression_ratio > 100
    assert "max_bond=8" in repr(m) and "compression=" in repr(m)
    out, (h, c) = m(torch.randn(7, 3, 256))
    assert out.shape == (7, 3, 512) and h.shape == c.shape == (2, 3, 512)
    out.pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
def test_default_factors_fall_back_to_fewer_cores():
    m = MPOLSTM(5, 13, proj_size=7, bond_dim=4)  # weight_hr is 7 x 13: no split can compress it
    assert m.factors["weight_hr_l0"] == ((13,), (7,))
    assert len(m.factors["weight_hh_l0"][0]) == 4  # 52 x 7 still splits into 4 cores
    assert m.weight_hr_l0.shape == (7, 13)
    assert m(torch.randn(3, 5))[0].shape == (3, 7)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"bond_dim": 0}, ValueError, "bond_dim must be a positive integer"),
        ({"bond_dim": 4, "proj_size": 10}, ValueError, "proj_size has to be smaller than hidden_size"),
        ({"bond_dim": 4, "dropout": 1.5}, ValueError, "dropout should be a number in range"),
        ({"bond_dim": 4, "num_layers": 0}, ValueError, "num_layers must be greater than zero"),
        ({"bond_dim": 4, "bias": 1}, TypeError, "bias should be of type bool"),
        ({"bond_dim": 4, "factors": {"weight_ih_l0": ((2, 3), (5, 4))}}, ValueError, "multiply to 20, expected 40"),
        ({"bond_dim": 4, "factors": {"weight_xx": ((6,), (40,))}}, ValueError, "unknown weights"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        MPOLSTM(6, 10, **kwargs)


def test_gru_rejects_proj_size_and_dropout_warns_like_torch():
    with pytest.raises(ValueError, match="proj_size argument is only supported for LSTM"):
        MPOGRU(6, 10, bond_dim=2, proj_size=2)
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        MPOLSTM(6, 10, dropout=0.2, bond_dim=2)


def test_wrongly_shaped_cores_are_caught_before_the_kernel():
    m = MPOLSTM(8, 12, bond_dim=2)
    wrong = mpo.decompose(torch.randn(24, 48), (4, 6), (6, 8))  # a (48, 24) weight, not (48, 12)
    m.weight_hh_l0_cores = nn.ParameterList(nn.Parameter(c) for c in wrong.cores)
    with pytest.raises(RuntimeError, match=r"cores of weight_hh_l0 rebuild to shape \(48, 24\), expected \(48, 12\)"):
        m(torch.randn(3, 2, 8))


# ----------------------------------------------------------------------------- eval cache


@pytest.mark.parametrize("cls", [MPOLSTM, MPORNN])
def test_eval_cache_reuses_and_invalidates_after_optimizer_step(cls, kernels):
    torch.manual_seed(0)
    m = cls(8, 12, num_layers=2, bond_dim=3)
    x = torch.randn(5, 2, 8)
    m.eval()
    kernels.clear()
    with torch.no_grad():
        first = m(x)[0]
        m(x)
    assert kernels == ["rebuild"] * 4  # 4 weights, rebuilt once for both calls
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    m(x)[0].pow(2).sum().backward()  # eval mode with grad: cores get gradients, no cache used
    assert all(p.grad is not None for p in m.parameters())
    opt.step()
    with torch.no_grad():
        after = m(x)[0]
        fresh = (m.to_lstm() if cls is MPOLSTM else m.to_rnn()).eval()(x)[0]
    assert not torch.allclose(after, first)
    assert torch.allclose(after, fresh, atol=1e-6)


def test_eval_cache_invalidated_by_load_state_dict_train_and_dtype(kernels):
    m = MPOGRU(8, 12, bond_dim=3).eval()
    other = MPOGRU(8, 12, bond_dim=3)
    x = torch.randn(5, 2, 8)
    with torch.no_grad():
        m(x)
        m.load_state_dict(other.state_dict())
        assert torch.allclose(m(x)[0], other.to_gru()(x)[0], atol=1e-6)
        kernels.clear()
        m.train()
        m.eval()
        m(x)
        assert kernels == ["rebuild"] * 2
        m.double()
        assert m(x.double())[0].dtype == F64
        assert kernels == ["rebuild"] * 4
    with torch.inference_mode():
        m(x.double())
    m(x.double().requires_grad_())[0].sum().backward()  # inference-mode cache is not reused here


def test_copies_and_pickles_do_not_share_the_cache():
    m = MPOLSTM(8, 12, bond_dim=3).eval()
    x = torch.randn(5, 2, 8)
    with torch.no_grad():
        m(x)
    clone = copy.deepcopy(m)
    with torch.no_grad():
        next(iter(clone.weight_ih_l0_cores)).mul_(2)
        assert not torch.allclose(clone(x)[0], m(x)[0])
    restored = pickle.loads(pickle.dumps(m))
    with torch.no_grad():
        assert torch.equal(restored(x)[0], m(x)[0])
        next(iter(restored.weight_hh_l0_cores)).mul_(2)  # the copy's own weights, not a stale cache
        assert not torch.allclose(restored(x)[0], m(x)[0])


# ----------------------------------------------------------------------------- streaming


def step_through(module, x, state, use_stream):
    outs = []
    if use_stream:
        stream = module.stream(state)
        outs = [stream(frame) for frame in x]
        return torch.stack(outs), stream.state
    for frame in x:
        out, state = module.step(frame, state)
        outs.append(out)
    return torch.stack(outs), state


@pytest.mark.parametrize(
    "kind,num_layers,proj_size,batched,with_state,training",
    [("lstm", *c) for c in itertools.product([1, 2], [0, P], [True, False], [False, True], [False, True])]
    + [(k, *c) for k in HIDDEN_ONLY for c in itertools.product([1, 2], [0], [True, False], [False, True], [False, True])],
)
def test_step_equals_full_sequence_forward(kind, num_layers, proj_size, batched, with_state, training):
    ref, m = make_pair(kind, num_layers, proj_size=proj_size)
    m.train(training)
    x = torch.randn(T, *((N,) if batched else ()), I, dtype=F64)
    state = initial_state(kind, ref, N if batched else None) if with_state else None
    if state is not None:
        state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
    out, hidden = m(x, state)
    step_out, step_hidden = step_through(m, x, state, use_stream=not training)
    assert torch.allclose(step_out, out, atol=1e-12)
    for a, b in zip(state_leaves(step_hidden), state_leaves(hidden), strict=True):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("path,training", [("cores", False), ("halves", False), ("dense", False),
                                           ("cores", True), ("dense", True)])
def test_step_contraction_paths_agree(path, training, force_path, kernels):
    """Force each path of step() through the cost model; all must equal the dense LSTM."""
    torch.manual_seed(0)
    m = MPOLSTM(24, 16, bond_dim=3, num_cores=4).double().train(training)
    x, h, c = torch.randn(5, 24, dtype=F64), torch.randn(1, 5, 16, dtype=F64), torch.randn(1, 5, 16, dtype=F64)
    force_path(path)
    with torch.no_grad():
        kernels.clear()
        out, (h1, c1) = m.step(x, (h, c))
        used = list(kernels)
        ref_out, (ref_h, ref_c) = m.to_lstm()(x[None], (h, c))
    assert used == {"cores": ["cores"] * 2, "halves": ["halves"] * 2, "dense": ["rebuild"] * 2}[path]
    assert torch.allclose(out, ref_out[0], atol=1e-12) and torch.allclose(c1, ref_c, atol=1e-12)


def test_step_cost_model_prefers_contraction_for_one_row_and_plans_once(kernels, monkeypatch):
    m = MPOLSTM(256, 256, num_layers=2, bond_dim=4)
    planned = []
    cost = mpo.matmul_cost
    monkeypatch.setattr(mpo, "matmul_cost", lambda *a, **k: planned.append(1) or cost(*a, **k))
    with torch.no_grad():
        m.step(torch.randn(1, 256))  # training mode: rebuilding W per step would be wasteful
        assert kernels == ["cores"] * 4
        m.eval()
        kernels.clear()
        m.step(torch.randn(1, 256))
        first = len(planned)
        for _ in range(3):
            m.step(torch.randn(1, 256))
        assert kernels == ["halves"] * 16  # eval: the cached merged halves of each chain
        assert len(planned) == first  # a repeated call plans nothing
        kernels.clear()
        m.step(torch.randn(4096, 256))  # many rows: a dense matmul with the rebuilt weights
        assert kernels == ["rebuild"] * 4


def test_step_errors():
    m = MPOLSTM(6, 10, bond_dim=2, bidirectional=True)
    with pytest.raises(ValueError, match="cannot run a bidirectional layer"):
        m.step(torch.randn(2, 6))
    m = MPOLSTM(6, 10, bond_dim=2)
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size"):
        m.step(torch.randn(2, 7))
    with pytest.raises(ValueError, match="expects one frame"):
        m.step(torch.randn(3, 2, 6))
    with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(1, 2, 10\), got \[1, 3, 10\]"):
        m.step(torch.randn(2, 6), (torch.zeros(1, 3, 10), torch.zeros(1, 2, 10)))
    s = m.stream()
    s(torch.randn(6))
    assert s.state[0].shape == (1, 10)
    s.reset()
    assert s.state is None


def test_no_python_time_loop_in_forward(monkeypatch):
    """forward must hand the whole sequence to torch's fused kernel in one call."""
    calls = []
    original = torch._VF.lstm

    def spy(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(torch._VF, "lstm", spy, raising=False)
    m = MPOLSTM(8, 12, num_layers=2, bond_dim=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(torch.randn(50, 2, 8))
    assert calls == [torch.Size([50, 2, 8])]


# ----------------------------------------------------------------------------- nn.RNN specifics


def test_no_python_time_loop_in_rnn_forward(monkeypatch):
    calls = []
    for kernel in ("rnn_tanh", "rnn_relu"):
        original = getattr(torch._VF, kernel)
        monkeypatch.setattr(torch._VF, kernel, lambda *a, _k=kernel, _o=original: calls.append(_k) or _o(*a),
                            raising=False)
    for nonlinearity in ("tanh", "relu"):
        MPORNN(8, 12, num_layers=2, nonlinearity=nonlinearity, bond_dim=3)(torch.randn(40, 2, 8))
    assert calls == ["rnn_tanh", "rnn_relu"]


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


def test_rnn_config_round_trip_and_constructor_errors():
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


def test_rnn_constructor_from_scratch_has_torch_init_variance():
    torch.manual_seed(0)
    m = MPORNN(256, 512, bond_dim=8)
    assert m.weight_hh_l0.shape == (512, 512)
    assert float(m.weight_hh_l0.detach().var()) == pytest.approx(1.0 / (3 * 512), rel=0.2)
    assert m.compression_ratio > 40


def test_rnn_registry_conversion_and_calibration_moments():
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


# ----------------------------------------------------------------------------- factorized runtime


@pytest.mark.parametrize("kind,bidirectional,batch_first,batched,with_state",
                         [(k, *c) for k in KINDS for c in itertools.product([False, True], [False, True],
                                                                            [True, False], [False, True])])
def test_factorized_runtime_equals_torch_with_gradients(kind, bidirectional, batch_first, batched, with_state,
                                                         kernels, param_grads_match):
    ref, m = make_pair(kind, num_layers=2, bidirectional=bidirectional, batch_first=batch_first)
    set_factorized(m)
    x = torch.randn(*((N, T) if batch_first else (T, N)) if batched else (T,), I, dtype=F64, requires_grad=True)
    state = initial_state(kind, ref, N if batched else None) if with_state else None
    kernels.clear()
    (out_r, hid_r), (out_m, hid_m) = [run(mod, x, state, False, None, batch_first) for mod in (ref, m)]
    assert "rebuild" not in kernels  # no dense weight is formed
    torch.testing.assert_close(out_m, out_r, atol=1e-12, rtol=0)
    for a, b in zip(hid_m, hid_r, strict=True):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-12)
    leaves = [x, *state_leaves(state)]
    losses = [out.pow(2).sum() + sum((h * torch.arange(h.numel(), dtype=F64).view_as(h)).sum() for h in hid)
              for out, hid in ((out_r, hid_r), (out_m, hid_m))]
    grads_r, grads_m = (torch.autograd.grad(loss, leaves, retain_graph=True) for loss in losses)
    for a, b in zip(grads_m, grads_r, strict=True):
        assert torch.allclose(a, b, atol=1e-10)
    for loss in losses:
        loss.backward()
    param_grads_match(ref, m)


def test_factorized_runtime_refuses_packed_input_and_projections():
    ref, m = make_pair("lstm", proj_size=P)
    set_factorized(m)
    with pytest.raises(ValueError, match="factorized runtime runs padded sequences without proj_size"):
        m(torch.randn(T, N, I, dtype=F64))
    _, m = make_pair("gru")
    set_factorized(m)
    with pytest.raises(ValueError, match="a PackedSequence or proj_size > 0 needs the dense runtime"):
        m(pack_padded_sequence(torch.randn(T, N, I, dtype=F64), torch.tensor([T, 3, 2])))
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size"):
        m(torch.randn(T, N, I + 1, dtype=F64))
    with pytest.raises(RuntimeError, match=r"Expected hidden size \(1, 3, 10\), got \[1, 2, 10\]"):
        m(torch.randn(T, N, I, dtype=F64), torch.zeros(1, 2, H, dtype=F64))
