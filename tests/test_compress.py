import copy
import json
import math

import pytest
import torch
from torch import nn

from mpolstm import mpo as M
from mpolstm.compression import (
    CompressionConfig,
    compress,
    freeze_central,
    print_trainable_parameters,
)
from mpolstm.nn import MPOEmbedding, MPOLinear


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(120, 16)
        self.body = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64))
        self.head = nn.Linear(64, 12)

    def forward(self, idx):
        return self.head(self.body(self.emb(idx)))


def weight_error(module, dense):
    with torch.no_grad():
        return float((module.weight - dense).norm() / dense.norm())


def exact_convert(model, names, num_cores):
    """Replace the named modules by their exact (full-bond) MPO modules through the registry."""
    from mpolstm.nn.registry import layer_type, replace_module

    for name in names:
        module = model.get_submodule(name)
        replace_module(model, name, layer_type(module).from_torch(module, num_cores=num_cores))
    return model


def test_registry_conversion_is_exact_and_compress_needs_a_size():
    torch.manual_seed(0)
    net = Net().double()
    idx = torch.randint(0, 120, (3, 5))
    expected = net(idx)
    exact_convert(net, ["emb", "body.0", "body.2", "head"], num_cores=2)
    assert isinstance(net.emb, MPOEmbedding) and isinstance(net.head, MPOLinear)
    assert isinstance(net.body[0], MPOLinear) and isinstance(net.body[2], MPOLinear)
    assert torch.allclose(net(idx), expected, atol=1e-10)
    with pytest.raises(ValueError, match="compress needs a size for module 'emb'"):
        compress(Net())


def test_never_grows_a_layer():
    """A bound that would make an MPO at least as large as the dense layer leaves it dense."""
    net = Net()
    out, report = compress(net, CompressionConfig(max_bond=1000, num_cores=2, layout="interleaved"))
    assert out is net and report.modules == []
    assert isinstance(net.emb, nn.Embedding) and isinstance(net.head, nn.Linear)
    assert {n for n, _ in report.skipped} == {"emb", "body.0", "body.2", "head"}
    assert all("kept dense" in why for _, why in report.skipped)
    gru = nn.Sequential(nn.GRU(16, 32))
    _, report = compress(gru, CompressionConfig(rel_tol=0.3, layout="interleaved"))
    assert isinstance(gru[0], nn.GRU) or report.mpo_params < report.dense_params


def test_selection_by_names_regex_exclude_and_overrides():
    net = Net()
    _, report = compress(net, CompressionConfig(target_modules=["0", "head"], max_bond=2, num_cores=2))
    assert [m.name for m in report.modules] == ["body.0", "head"]
    assert isinstance(net.emb, nn.Embedding) and isinstance(net.body[2], nn.Linear)

    net = Net()
    cfg = CompressionConfig(target_modules=r"body\..*|head", exclude_modules=["head"], max_bond=3,
                            num_cores=3, overrides={r"body\.2": {"max_bond": 1}})
    _, report = compress(net, cfg)
    assert [m.name for m in report.modules] == ["body.0", "body.2"]
    assert max(report.modules[0].weights["weight"].bond_dims) == 3
    assert report.modules[1].weights["weight"].bond_dims == (1, 1)
    assert isinstance(net.head, nn.Linear)


def test_selection_errors():
    with pytest.raises(ValueError, match="'nope' matches no module"):
        compress(Net(), CompressionConfig(target_modules=["nope"]))
    with pytest.raises(ValueError, match="selects no"):
        compress(Net(), CompressionConfig(target_modules=r"zzz"))
    with pytest.raises(ValueError, match="'body.1' is of type Tanh"):
        compress(Net(), CompressionConfig(target_modules=["body.1"]))
    with pytest.raises(ValueError, match="the model itself is of type Linear"):
        compress(nn.Linear(8, 8))


@pytest.mark.parametrize("kwargs,match", [
    ({"max_bond": 0}, "max_bond must be a positive integer"),
    ({"rel_tol": 1.5}, r"rel_tol must be a number in \(0, 1\)"),
    ({"num_cores": 0}, "num_cores must be an integer >= 2"),
    ({"target_ratio": 10, "max_params": 100}, "at most one budget"),
    ({"target_ratio": 0.5}, "target_ratio must be a finite number above 1"),
    ({"max_params": -3}, "max_params must be a positive integer"),
    ({"target_ratio": 5, "rel_tol": 0.1}, "rel_tol cannot be combined"),
    ({"target_modules": "("}, "regex"),
    ({"target_modules": []}, "non-empty list"),
    ({"overrides": {"x": {"bond": 3}}}, "unknown keys"),
    ({"overrides": {"x": {"max_bond": 2.5}}}, r"overrides\['x'\]: max_bond"),
    ({"overrides": {"x": 3}}, "overrides must map regex strings to dicts"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CompressionConfig(**kwargs)


def test_unfactorisable_module_is_skipped_by_default_but_raises_when_named():
    net = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 7), nn.Linear(7, 1))
    _, report = compress(net, CompressionConfig(max_bond=4, num_cores=3))
    assert [m.name for m in report.modules] == ["0"]  # "1": its 3-core MPO (480 entries) > dense 448
    assert [name for name, _ in report.skipped] == ["2", "1"] and "trivial" in report.skipped[0][1]
    assert "kept dense" in report.skipped[1][1] and isinstance(net[1], nn.Linear)
    assert "skipped: 2 (" in str(report)
    assert isinstance(net[2], nn.Linear)
    with pytest.raises(ValueError, match="module '2'.*trivial"):
        compress(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 7), nn.Linear(7, 1)),
                 CompressionConfig(target_modules=["2"], num_cores=3, max_bond=4))


def test_rel_tol_mode_bounds_every_error():
    torch.manual_seed(1)
    net = Net()
    dense = {n: m.weight.detach().clone() for n, m in net.named_modules() if hasattr(m, "weight")}
    _, report = compress(net, CompressionConfig(rel_tol=0.3, num_cores=2))
    for m in report.modules:
        measured = weight_error(net.get_submodule(m.name), dense[m.name])
        assert measured <= 0.3 * (1 + 1e-5)
        assert m.weights["weight"].rel_error == pytest.approx(measured, rel=1e-3, abs=1e-6)


def test_budget_respects_max_params_and_target_ratio():
    torch.manual_seed(2)
    net = Net()
    _, report = compress(net, CompressionConfig(max_params=3000))
    cores = sum(c.numel() for m in net.modules() if hasattr(m, "mpo_weights")
                for cs in m.mpo_weights().values() for c in cs)
    assert cores == report.mpo_params <= 3000
    assert report.budget == 3000 and report.mpo_params > 2500  # the budget is used, not wasted
    net = Net()
    dense = {n: m.weight.detach().clone() for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    _, report = compress(net, CompressionConfig(target_ratio=8))
    assert report.ratio >= 8
    for m in report.modules:  # the reported error is the real one
        w = m.weights["weight"]
        assert w.rel_error == pytest.approx(weight_error(net.get_submodule(m.name), dense[m.name]), rel=1e-4)
        assert len(w.entropy) == len(w.bond_dims)
        assert all(s <= torch.log(torch.tensor(float(d))) + 1e-6 for s, d in zip(w.entropy, w.bond_dims))
    with pytest.raises(ValueError, match="below the smallest possible"):
        compress(Net(), CompressionConfig(max_params=10))


def _kron_sum(factors, terms, gen):
    out = 0
    for _ in range(terms):
        t = torch.ones(1, 1, dtype=torch.float64)
        for a in factors:
            t = torch.kron(t, torch.randn(a, a, generator=gen, dtype=torch.float64))
        out = out + t
    return out


def test_budget_allocation_beats_uniform_bonds_at_equal_parameters():
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(256, 256, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(256, 256, generator=gen, dtype=torch.float64))
    weights = [
        _kron_sum((4, 4, 4, 4), 2, gen) + 0.01 * torch.randn(256, 256, generator=gen, dtype=torch.float64),
        torch.randn(256, 256, generator=gen, dtype=torch.float64),  # flat spectrum: incompressible
        (u * 0.7 ** torch.arange(256, dtype=torch.float64)) @ v.T,  # low rank, not low TT rank
    ]

    def build():
        net = nn.Sequential(*[nn.Linear(256, 256, bias=False).double() for _ in weights])
        with torch.no_grad():
            for layer, w in zip(net, weights):
                layer.weight.copy_(w)
        return net

    for bond in (8, 16):
        uniform, uni_report = compress(build(), CompressionConfig(max_bond=bond))
        budget, bud_report = compress(build(), CompressionConfig(max_params=uni_report.mpo_params))
        assert bud_report.mpo_params <= uni_report.mpo_params
        uni_err = sum(weight_error(m, w) for m, w in zip(uniform, weights))
        bud_err = sum(weight_error(m, w) for m, w in zip(budget, weights))
        assert bud_err < uni_err - 0.04, (bond, bud_err, uni_err)
        for m, w, rep in zip(budget, weights, bud_report.modules):
            assert rep.weights["weight"].rel_error == pytest.approx(weight_error(m, w), rel=1e-6, abs=1e-9)


def test_report_prints_table_and_serialises():
    _, report = compress(Net(), CompressionConfig(max_bond=2, num_cores=2))
    text = str(report)
    for token in ("module", "weight error", "emb (MPOEmbedding)", "body.2 (MPOLinear)", "120x16"):
        assert token in text
    assert text.splitlines()[1] == "layouts chosen: interleaved for 4 of 4 weights (bonds set by max_bond / rel_tol)"
    _, budgeted = compress(Net(), CompressionConfig(target_ratio=8, layout="lowrank"))
    assert str(budgeted).splitlines()[1] == ("layouts chosen: lowrank for 4 of 4 weights (per weight, the least weight "
                                             "error within the parameter budget)")
    data = json.loads(report.to_json())
    assert data["mpo_params"] == report.mpo_params and len(data["modules"]) == 4
    assert data["modules"][0]["weights"]["weight"]["shape"] == [120, 16]
    assert data["modules"][0]["params_before"] == 120 * 16


def test_freeze_central_keeps_weights_and_freezes_central_cores(capsys):
    torch.manual_seed(3)
    net = Net().double()
    compress(net, CompressionConfig(max_bond=4, num_cores=3))
    idx = torch.randint(0, 120, (2, 4))
    before = net(idx).detach()
    counts = freeze_central(net)
    assert counts["mpos"] == 4
    assert torch.allclose(net(idx), before, atol=1e-10)
    for layer in (net.emb, net.body[0], net.head):
        cores = list(layer.cores)
        frozen = [k for k, c in enumerate(cores) if not c.requires_grad]
        assert frozen == [max(range(3), key=lambda k: cores[k].numel())]
        left = cores[0].reshape(-1, cores[0].shape[3])  # auxiliary left core is an isometry
        assert torch.allclose(left.T @ left, torch.eye(left.shape[1], dtype=left.dtype), atol=1e-10)
        right = cores[2].reshape(cores[2].shape[0], -1)
        assert torch.allclose(right @ right.T, torch.eye(right.shape[0], dtype=right.dtype), atol=1e-10)
    trainable, total = print_trainable_parameters(net)
    assert trainable == total - counts["central_params"]
    assert f"trainable params: {trainable:,} || all params: {total:,}" in capsys.readouterr().out
    net(idx).sum().backward()
    assert net.body[0].cores[1].grad is None and net.body[0].cores[0].grad is not None


def test_freeze_central_keeps_shapes_when_a_bond_exceeds_its_rank():
    layer = MPOLinear.from_config({"in_features": 4, "out_features": 4, "bias": False,
                                   "in_factors": [2, 2], "out_factors": [2, 2], "bond_dims": [6]}).double()
    layer.cores = nn.ParameterList([nn.Parameter(torch.randn(1, 2, 2, 6, dtype=torch.float64)),
                                    nn.Parameter(torch.randn(6, 2, 2, 1, dtype=torch.float64))])
    weight = layer.weight.detach().clone()
    shapes = [c.shape for c in layer.cores]
    freeze_central(layer)
    assert [c.shape for c in layer.cores] == shapes
    assert torch.allclose(layer.weight, weight, atol=1e-12)


def test_registry_drives_selection_and_names_unsupported_types():
    from mpolstm.nn import registry

    class MyLSTM(nn.LSTM):  # a subclass is handled as its registered base type
        pass

    model, report = compress(nn.Sequential(MyLSTM(8, 16)), CompressionConfig(max_bond=2))
    assert type(model[0]).__name__ == "MPOLSTM" and report.modules[0].old_class == "MyLSTM"
    with pytest.raises(ValueError, match=r"'0' is of type Bilinear; compress handles nn.Linear, nn.Embedding"):
        compress(nn.Sequential(nn.Bilinear(8, 8, 4)), CompressionConfig(target_modules=["0"], max_bond=2))
    entry = registry.layer_type(nn.LSTM(2, 2))
    with pytest.raises(ValueError, match="already registered"):
        registry.register(entry)
    assert registry.mpo_class("MPOLSTM") is entry.mpo_type and registry.mpo_class("Nope") is None


def test_truncated_mpo_report_is_exact():
    torch.manual_seed(4)
    w = torch.randn(64, 48, dtype=torch.float64)
    net = nn.Sequential(nn.Linear(64, 48).double(), nn.Linear(48, 64).double())
    with torch.no_grad():
        net[1].weight.copy_(w)
    _, report = compress(net, CompressionConfig(max_params=1500, num_cores=3))
    exact = M.decompose(w.T, net[1].in_factors, net[1].out_factors)
    assert exact.report.rel_error < 1e-12
    assert report.modules[1].weights["weight"].rel_error == pytest.approx(weight_error(net[1], w), rel=1e-6)


class Tagger(nn.Module):
    """Embedding + LSTM + GRU + Linear, the shape of the paper's models."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(200, 16)
        self.lstm = nn.LSTM(16, 32, num_layers=2, batch_first=True, bidirectional=True)
        self.gru = nn.GRU(64, 16, batch_first=True)
        self.head = nn.Linear(16, 10)

    def forward(self, idx):
        out, _ = self.lstm(self.emb(idx))
        out, _ = self.gru(out)
        return self.head(out)


def test_recurrent_layers_exact_at_full_bond_and_frozen_in_place():
    torch.manual_seed(5)
    net = Tagger().double()
    idx = torch.randint(0, 200, (3, 7))
    expected = net(idx).detach()
    exact_convert(net, ["emb", "lstm", "gru", "head"], num_cores=3)
    assert type(net.lstm).__name__ == "MPOLSTM" and type(net.gru).__name__ == "MPOGRU"
    assert set(net.lstm.mpo_weights()) == {f"weight_{k}_l{l}{d}" for k in ("ih", "hh") for l in (0, 1)
                                           for d in ("", "_reverse")}
    assert torch.allclose(net(idx), expected, atol=1e-10)
    counts = freeze_central(net)
    assert counts["mpos"] == 1 + 8 + 2 + 1
    assert torch.allclose(net(idx), expected, atol=1e-10)
    assert any(not c.requires_grad for c in net.lstm.mpo_weights()["weight_hh_l1"])


def test_budget_on_embedding_lstm_linear_model():
    torch.manual_seed(6)
    net = Tagger()
    dense = {n: p.detach().clone() for n, p in net.named_parameters()}
    _, report = compress(net, CompressionConfig(target_ratio=10))
    assert report.ratio >= 10
    cores = sum(c.numel() for m in net.modules() if hasattr(m, "mpo_weights")
                for cs in m.mpo_weights().values() for c in cs)
    assert cores == report.mpo_params <= report.budget
    names = {m.name for m in report.modules}
    assert names == {"emb", "lstm", "gru", "head"}
    lstm_report = next(m for m in report.modules if m.name == "lstm")
    for wname, w in lstm_report.weights.items():
        with torch.no_grad():
            rebuilt = M.cores_to_matrix(list(net.lstm.mpo_weights()[wname]), transpose=True)
        original = dense[f"lstm.{wname}"]
        assert rebuilt.shape == original.shape
        assert w.rel_error == pytest.approx(float((rebuilt - original).norm() / original.norm()), rel=1e-4)
    assert net(torch.randint(0, 200, (2, 5))).shape == (2, 5, 10)


def test_budget_weights_each_matrix_by_its_size():
    """An LSTM with a small input weight (1024x28) and a large recurrent one (1024x256): the budget
    must not go to the small matrix at the cost of the large one (the objective counts every
    entry's relative error alike), and it must beat uniform bonds at equal parameters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LSTM(28, 256).double())

    def weighted_error(report):
        return sum(math.prod(w.shape) * w.rel_error ** 2 for w in report.modules[0].weights.values())

    _, uniform = compress(copy.deepcopy(model), CompressionConfig(max_bond=16))
    _, budget = compress(copy.deepcopy(model), CompressionConfig(max_params=uniform.mpo_params))
    hh = budget.modules[0].weights["weight_hh_l0"]
    assert min(hh.bond_dims) > 1 and hh.mpo_params > budget.mpo_params / 2, hh
    assert budget.mpo_params <= uniform.mpo_params
    assert weighted_error(budget) < weighted_error(uniform)


# ----------------------------------------------------------------------------- latency budget (max_macs)


def _lstm_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.LSTM(64, 128, num_layers=2))


def test_step_macs_count_the_deployed_products():
    """step_macs equals the multiply-adds of the two matmuls of halves_matmul for one row."""
    from mpolstm.mpo import prepare_halves

    torch.manual_seed(0)
    for in_f, out_f, bond in [((4, 8, 8, 4), (8, 8, 8, 8), 5), ((1024, 1), (1, 256), 7), ((64, 1, 1), (1, 16, 16), 3),
                              ((2, 3, 4), (5, 2, 3), 4)]:
        m = M.decompose(torch.randn(math.prod(in_f), math.prod(out_f)), in_f, out_f, max_bond=bond)
        lt, r, il, ir, jl, jr, d = prepare_halves(m.cores)
        assert M.step_macs(in_f, out_f, m.bond_dims) == lt.shape[0] * lt.shape[1] * ir + jl * r.numel()
    assert M.step_macs((1024, 1), (1, 256), (7,)) == 7 * (1024 + 256)  # a rank-7 factor: its parameters


def test_max_macs_alone_is_met_and_reported():
    model, report = compress(_lstm_model(), CompressionConfig(max_macs=20_000))
    assert report.dense_macs == sum(p.numel() for n, p in _lstm_model().named_parameters() if "weight" in n)
    assert report.macs <= 20_000 == report.max_macs and report.budget is None
    assert report.macs == sum(M.step_macs(*model[0].factors[w], model[0].mpo(w).bond_dims)
                              for w in model[0].mpo_weights())
    assert "multiply-adds per step at batch 1" in str(report) and "multiply-add budget" in str(report)
    assert torch.isfinite(model(torch.randn(5, 2, 64))[0]).all()


def test_max_macs_with_a_parameter_budget_meets_both_and_prefers_cheap_layouts():
    free, by_params = compress(_lstm_model(), CompressionConfig(target_ratio=10))
    dense = by_params.dense_macs
    _, both = compress(_lstm_model(), CompressionConfig(target_ratio=10, max_macs=dense // 12))
    assert both.mpo_params <= both.budget == by_params.budget and both.macs <= dense // 12
    assert both.macs <= by_params.macs
    # the error grows as the latency budget tightens, never the reverse
    _, tight = compress(_lstm_model(), CompressionConfig(target_ratio=10, max_macs=dense // 40))
    err = lambda r: sum(w.rel_error ** 2 * w.dense_params for m in r.modules for w in m.weights.values())  # noqa: E731
    assert tight.macs <= dense // 40 and err(tight) >= err(both) * (1 - 1e-5)


@pytest.mark.parametrize("value", [0, -5, 2.5, True, "1e6"])
def test_max_macs_bad_values_and_unmeetable_budgets(value):
    with pytest.raises(ValueError, match="max_macs must be a positive integer"):
        CompressionConfig(max_macs=value)


def test_max_macs_below_the_minimum_names_it():
    with pytest.raises(ValueError, match=r"max_macs=10 is below the smallest possible \(([\d,]+) multiply-adds"):
        compress(_lstm_model(), CompressionConfig(max_macs=10))
    with pytest.raises(ValueError, match="rel_tol cannot be combined with a budget"):
        CompressionConfig(max_macs=1000, rel_tol=0.1)
