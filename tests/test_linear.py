import pytest
import torch
from torch import nn

from mpolstm.nn import MPOLinear


def test_from_linear_full_bond_reproduces_linear():
    torch.manual_seed(0)
    lin = nn.Linear(24, 36).double()
    m = MPOLinear.from_linear(lin, num_cores=3)
    x = torch.randn(5, 7, 24, dtype=torch.float64)
    assert torch.allclose(m(x), lin(x), atol=1e-12)
    assert torch.allclose(m(x[0, 0]), lin(x[0, 0]), atol=1e-12)  # one row: core-by-core path
    assert torch.allclose(m.weight, lin.weight, atol=1e-12)
    assert m.report.rel_error < 1e-12


def test_to_linear_round_trip():
    m = MPOLinear(32, 48, bond_dim=3, num_cores=3).double()
    lin = m.to_linear()
    assert isinstance(lin, nn.Linear) and lin.weight.dtype == torch.float64
    x = torch.randn(4, 32, dtype=torch.float64)
    assert torch.allclose(lin(x), m(x), atol=1e-12)
    back = MPOLinear.from_linear(lin, num_cores=3)
    assert torch.allclose(back(x), m(x), atol=1e-10)


def test_truncated_from_linear_reports_error_and_compresses():
    lin = nn.Linear(256, 256)
    m = MPOLinear.from_linear(lin, max_bond=4)
    with torch.no_grad():
        measured = float((m.weight - lin.weight).norm() / lin.weight.norm())
    assert m.report.rel_error == pytest.approx(measured, rel=1e-3)
    assert m.compression_ratio > 50
    assert "compression=" in repr(m) and "bond_dims=(4, 4, 4)" in repr(m)


def test_init_variance_matches_linear():
    torch.manual_seed(0)
    m = MPOLinear(512, 512, bond_dim=8)
    expected = 1.0 / (3 * 512)
    assert float(m.weight.var()) == pytest.approx(expected, rel=0.15)


def test_gradients_flow_to_every_core():
    m = MPOLinear(64, 32, bond_dim=4, num_cores=3)
    m(torch.randn(10, 64)).pow(2).sum().backward()
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in m.cores)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"in_features": 64, "out_features": 32, "bond_dim": 0}, "bond_dim must be a positive integer"),
        ({"in_features": 64, "out_features": 32, "bond_dim": 4, "in_factors": (4, 4, 3)}, "multiply to 48, expected 64"),
        ({"in_features": 13, "out_features": 17, "bond_dim": 4}, "cannot compress"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MPOLinear(**kwargs)


def test_forward_rejects_wrong_feature_size():
    m = MPOLinear(64, 32, bond_dim=4)
    with pytest.raises(ValueError, match="last dimension 64"):
        m(torch.randn(3, 63))


def test_from_linear_with_given_mpo_and_config_round_trip():
    from mpolstm import mpo

    lin = nn.Linear(32, 48).double()
    given = mpo.decompose(lin.weight.detach().T, (2, 4, 4), (4, 4, 3), max_bond=3)
    m = MPOLinear.from_linear(lin, mpos={"weight": given})
    assert torch.allclose(m.weight, given.to_matrix(transpose=True))
    assert m.reports["weight"].rel_error == given.report.rel_error
    rebuilt = MPOLinear.from_config(m.mpo_config()).double()
    rebuilt.load_state_dict(m.state_dict())
    x = torch.randn(3, 32, dtype=torch.float64)
    assert torch.equal(rebuilt(x), m(x))
    with pytest.raises(ValueError, match="expected \\(32, 48\\)"):
        MPOLinear.from_linear(lin, mpos={"weight": mpo.decompose(lin.weight.detach(), (4, 4, 3), (2, 4, 4))})
