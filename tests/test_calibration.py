"""Layout search, calibration (data-aware decomposition) and the never-worse-than-SVD floor."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from mpolstm import CompressionConfig, compress
from mpolstm.calibration import collect_moments


def _lowrank_linear(rows=96, cols=64, rank=8, noise=0.01, seed=0):
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(cols, rows)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(rows, rank, generator=gen) @ torch.randn(rank, cols, generator=gen)
                           + noise * torch.randn(rows, cols, generator=gen))
    return nn.Sequential(layer)


@pytest.mark.parametrize("ratio", [3, 6, 12])
def test_budget_is_never_worse_than_truncated_svd(ratio):
    model = _lowrank_linear()
    w = model[0].weight.detach().double()
    _, report = compress(copy.deepcopy(model), CompressionConfig(target_ratio=ratio))
    rank = int(w.numel() / ratio) // sum(w.shape)
    s = torch.linalg.svdvals(w)
    svd_error = float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())
    got = report.modules[0].weights["weight"]
    assert got.mpo_params <= w.numel() / ratio
    assert got.rel_error <= svd_error * (1 + 1e-5)  # a float32 weight against a float64 bound: relative slack
    _, pinned = compress(copy.deepcopy(model), CompressionConfig(target_ratio=ratio, layout="interleaved"))
    assert pinned.modules[0].weights["weight"].layout == "interleaved"
    assert pinned.modules[0].weights["weight"].rel_error > got.rel_error  # the search matters here


def test_pinned_layout_that_cannot_apply_is_refused():
    with pytest.raises(ValueError, match="layout must be 'auto' or one of"):
        CompressionConfig(target_ratio=2, layout="tucker")
    with pytest.raises(ValueError, match="layout 'interleaved' does not apply .* calibration"):
        compress(_lowrank_linear(), CompressionConfig(target_ratio=4, layout="interleaved"),
                 calibration=[torch.randn(4, 64)])


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.lstm = nn.LSTM(16, 24, num_layers=2, bidirectional=True)
        self.head = nn.Linear(48, 5)

    def forward(self, tokens):
        return self.head(self.lstm(self.emb(tokens))[0])


def test_calibration_hooks_leave_the_model_unchanged():
    torch.manual_seed(0)
    model = Tagger().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.randint(0, 50, (7, 3))
    moments = collect_moments(model, {"emb": model.emb, "lstm": model.lstm, "head": model.head}, [tokens])
    assert model.training and all(m.training for m in model.modules())
    assert all(not m._forward_hooks for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert set(moments["lstm"]) == {f"weight_{k}_l{l}{d}" for k in ("ih", "hh") for l in (0, 1)
                                    for d in ("", "_reverse")}
    assert moments["emb"]["weight"].shape == (50,)
    assert float(moments["emb"]["weight"].sum()) == pytest.approx(1.0)  # row frequencies


def test_lstm_moments_are_the_inputs_each_weight_multiplies():
    torch.manual_seed(1)
    lstm = nn.LSTM(6, 5, num_layers=2, bidirectional=True, batch_first=True).double()
    x = torch.randn(3, 8, 6, dtype=torch.float64)
    m = collect_moments(lstm, {"lstm": lstm}, [x])["lstm"]
    flat = x.reshape(-1, 6)
    torch.testing.assert_close(m["weight_ih_l0"], flat.T @ flat / flat.shape[0])
    out, _ = lstm(x)  # top layer: forward h_{t-1} and reverse h_{t+1} come from the module output
    fwd = torch.cat([torch.zeros(3, 1, 5, dtype=x.dtype), out[:, :-1, :5]], 1).reshape(-1, 5)
    rev = torch.cat([out[:, 1:, 5:], torch.zeros(3, 1, 5, dtype=x.dtype)], 1).reshape(-1, 5)
    torch.testing.assert_close(m["weight_hh_l1"], fwd.T @ fwd / fwd.shape[0])
    torch.testing.assert_close(m["weight_hh_l1_reverse"], rev.T @ rev / rev.shape[0])
    layer0 = nn.LSTM(6, 5, bidirectional=True, batch_first=True).double()
    layer0.load_state_dict({k: v for k, v in lstm.state_dict().items() if "_l0" in k})
    mid = layer0(x)[0].reshape(-1, 10)
    torch.testing.assert_close(m["weight_ih_l1"], mid.T @ mid / mid.shape[0])
    # a packed batch: padded positions are not counted
    lengths = torch.tensor([8, 5, 2])
    packed = pack_padded_sequence(x, lengths, batch_first=True)
    m = collect_moments(lstm, {"lstm": lstm}, [packed])["lstm"]
    real = torch.cat([x[i, :n] for i, n in enumerate(lengths)])
    torch.testing.assert_close(m["weight_ih_l0"], real.T @ real / real.shape[0])


def test_calibration_lowers_the_output_error_on_the_data():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 32))
    mix = torch.randn(64, 64) * torch.logspace(0, -3, 64)  # inputs live near a few directions
    data = [torch.randn(64, 64) @ mix for _ in range(4)]
    test = torch.randn(256, 64) @ mix
    with torch.no_grad():
        ref = model(test)
        errors = {}
        for name, calib in (("plain", None), ("calibrated", data)):
            small, report = compress(copy.deepcopy(model), CompressionConfig(target_ratio=8), calibration=calib)
            errors[name] = float((small(test) - ref).norm() / ref.norm())
            assert report.ratio >= 8
    assert errors["calibrated"] < 0.8 * errors["plain"]
    assert all(w.output_error is not None for m in report.modules for w in m.weights.values())


def test_bad_calibration_input_is_a_clear_error():
    model = Tagger()
    cfg = CompressionConfig(target_ratio=4)
    with pytest.raises(ValueError, match="calibration must be an iterable of batches"):
        compress(copy.deepcopy(model), cfg, calibration="tokens.txt")
    with pytest.raises(ValueError, match="calibration ran no data"):
        compress(copy.deepcopy(model), cfg, calibration=[])
    with pytest.raises(ValueError, match="calibration batch 0 failed in the model"):
        compress(copy.deepcopy(model), cfg, calibration=[torch.randn(3, 4)])
    with pytest.raises(ValueError, match="each calibration batch must be a tensor"):
        compress(copy.deepcopy(model), cfg, calibration=[{"x": 1}])


def test_budget_floor_keeps_bonds_above_one_when_affordable():
    torch.manual_seed(3)
    model = Tagger()
    _, report = compress(model, CompressionConfig(target_ratio=6), calibration=[torch.randint(0, 50, (9, 4))])
    assert report.ratio >= 6
    assert all(min(w.bond_dims) >= 2 for m in report.modules for w in m.weights.values())


def test_whitened_factors_are_balanced_and_represent_the_same_weight():
    from mpolstm.calibration import whitening
    from mpolstm.compression.layouts import Target, decompose_target

    torch.manual_seed(4)
    m = torch.randn(48, 20, dtype=torch.float64)
    x = torch.randn(500, 48, dtype=torch.float64) * torch.logspace(0, -2, 48, dtype=torch.float64)
    pair = whitening(x.T @ x / 500)
    target = Target("m", "weight", m, ((4, 12), (4, 5)), m.numel(), pair)
    mpo = decompose_target(target, ((48, 1), (1, 20)), [6])
    left = mpo.cores[0].flatten(0, 2).norm(dim=0)
    right = mpo.cores[1].flatten(1).norm(dim=1)
    torch.testing.assert_close(left, right)
    s, s_inv = pair
    a = s @ m  # the rank-6 truncation of S M, mapped back, is what the cores hold
    u, sv, vh = torch.linalg.svd(a)
    expected = s_inv @ (u[:, :6] * sv[:6]) @ vh[:6]
    torch.testing.assert_close(mpo.to_matrix(), expected)


def test_one_damping_rule_for_whitening_and_refit_including_inputs_without_energy():
    """calibration.damping is the one rule: DAMPING * mean eigenvalue, or DAMPING itself when the
    second moment is 0; whitening and the refit's least squares both use it."""
    from mpolstm.calibration import DAMPING, damping, whitening
    from mpolstm.compression.fit import Fit
    from mpolstm.compression.layouts import Target, decompose_target, fit_like
    from mpolstm.compression.refit import _refit

    assert damping(torch.zeros(5, dtype=torch.float64)) == DAMPING
    assert damping(torch.tensor([2.0, 4.0, -1e-18], dtype=torch.float64)) == pytest.approx(DAMPING * 2.0)
    s, s_inv = whitening(torch.zeros(4, 4, dtype=torch.float64))
    torch.testing.assert_close(s, DAMPING ** 0.5 * torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(s @ s_inv, torch.eye(4, dtype=torch.float64))

    torch.manual_seed(6)
    m = torch.randn(12, 9, dtype=torch.float64)
    x = torch.randn(40, 12, dtype=torch.float64) * torch.logspace(0, -3, 12, dtype=torch.float64)
    c_cc, c_co = x.T @ x / 40, x.T @ (x + 0.1 * torch.randn_like(x)) / 40
    target = Target("m", "w", m, ((3, 4), (3, 3)), m.numel(), whitening(c_cc))
    fit = Fit("lowrank", decompose_target(target, ((12, 1), (1, 9)), [4]))
    eig = torch.linalg.eigvalsh(c_cc)
    best = torch.linalg.solve(c_cc + damping(eig) * torch.eye(12, dtype=torch.float64), c_co @ m)
    expected = fit_like(Target("m", "w", best, target.interleaved, m.numel(), whitening(c_cc)), fit)
    torch.testing.assert_close(_refit(target, (c_cc, c_co), fit).matrix(), expected.matrix())
    zero = _refit(target, (torch.zeros(12, 12, dtype=torch.float64), torch.zeros(12, 12, dtype=torch.float64)), fit)
    assert torch.isfinite(zero.matrix()).all() and float(zero.matrix().abs().max()) == 0.0


def test_a_one_bond_candidate_split_once_gives_the_cores_of_decompose_target_at_every_rank():
    from mpolstm.calibration import whitening
    from mpolstm.compression.layouts import Candidate, Target, decompose_target

    torch.manual_seed(7)
    m = torch.randn(40, 24, dtype=torch.float64)
    x = torch.randn(300, 40, dtype=torch.float64) * torch.logspace(0, -2, 40, dtype=torch.float64)
    target = Target("m", "weight", m, ((4, 10), (4, 6)), m.numel(), whitening(x.T @ x / 300))
    candidate = Candidate.of(target, "lowrank", ((40, 1), (1, 24)), None)
    for rank in (24, 7, 1, 12):
        got, want = candidate.decompose(target, [rank]), decompose_target(target, ((40, 1), (1, 24)), [rank])
        for a, b in zip(got.cores, want.cores):
            torch.testing.assert_close(a, b)
        assert got.report.rel_error == pytest.approx(want.report.rel_error, rel=1e-9, abs=1e-12)
