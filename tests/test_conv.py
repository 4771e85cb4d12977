"""MPOConv1d / MPOConv2d vs torch's convolutions at full bond over the constructor options, the
patches the calibration hook records, and compress, io, export, prune on a small CNN."""

import json

import pytest
import torch
from torch import nn

from mpolstm import mpo
from mpolstm.calibration import collect_moments
from mpolstm.nn import MPOConv1d, MPOConv2d
from mpolstm.nn.conv import conv_patches
from mpolstm.nn.registry import layer_type

F64 = torch.float64

# (in, out, kernel, kwargs): every constructor option, alone and combined
OPTIONS = [
    (4, 6, 3, {}),
    (4, 6, 3, {"bias": False}),
    (4, 6, 3, {"stride": 2}),
    (4, 6, 3, {"padding": 1}),
    (4, 6, 3, {"padding": "same"}),
    (4, 6, 4, {"padding": "same", "dilation": 2}),  # even kernel: torch's asymmetric 'same' padding
    (4, 6, 3, {"padding": "valid"}),
    (4, 6, 3, {"dilation": 2, "padding": 2}),
    (4, 6, 3, {"groups": 2}),
    (6, 6, 3, {"groups": 6, "padding": 1}),  # depthwise
    (4, 6, 3, {"padding": 2, "padding_mode": "reflect"}),
    (4, 6, 3, {"padding": 1, "padding_mode": "replicate"}),
    (4, 6, 3, {"padding": 1, "padding_mode": "circular"}),
    (4, 6, 3, {"padding": "same", "padding_mode": "reflect", "groups": 2}),
    (4, 8, 3, {"stride": 2, "padding": 1, "dilation": 2, "groups": 2, "bias": False, "padding_mode": "circular"}),
]
OPTIONS_2D = OPTIONS + [
    (4, 6, (3, 1), {"stride": (2, 1), "padding": (1, 0)}),
    (4, 6, (2, 3), {"dilation": (2, 1), "padding": "same"}),
]


def make_pair(dims, cin, cout, kernel, kwargs, seed=0):
    torch.manual_seed(seed)
    ref = (nn.Conv1d if dims == 1 else nn.Conv2d)(cin, cout, kernel, **kwargs).double()
    m = (MPOConv1d.from_conv1d if dims == 1 else MPOConv2d.from_conv2d)(ref, num_cores=3)
    return ref, m


def sample(dims, cin, batch=2, requires_grad=True):
    shape = ((batch,) if batch else ()) + (cin,) + ((11,) if dims == 1 else (5, 6))
    return torch.randn(*shape, dtype=F64, requires_grad=requires_grad)


def check_parity(ref, m, x):
    out_r, out_m = ref(x), m(x)
    assert out_m.shape == out_r.shape and torch.allclose(out_m, out_r, atol=1e-12)
    weights = torch.linspace(-1, 1, out_r.numel(), dtype=F64).view_as(out_r)
    loss_r, loss_m = (o.pow(2).sum() + (o * weights).sum() for o in (out_r, out_m))
    g_r, g_m = (torch.autograd.grad(loss, [x], retain_graph=True)[0] for loss in (loss_r, loss_m))
    assert torch.allclose(g_m, g_r, atol=1e-10)
    loss_r.backward()
    loss_m.backward()
    if ref.bias is not None:
        assert torch.allclose(m.bias.grad, ref.bias.grad, atol=1e-10)
    cores = list(m.weight_cores)
    expected = torch.autograd.grad(m.weight, cores, grad_outputs=ref.weight.grad)
    for core, want in zip(cores, expected, strict=True):
        assert torch.allclose(core.grad, want, atol=1e-10)


@pytest.mark.parametrize("dims,case", [(1, c) for c in OPTIONS] + [(2, c) for c in OPTIONS_2D],
                         ids=lambda v: str(v) if isinstance(v, int) else f"{v[2]}-{v[3]}")
def test_full_bond_matches_torch_with_gradients(dims, case):
    cin, cout, kernel, kwargs = case
    ref, m = make_pair(dims, cin, cout, kernel, kwargs)
    assert m.reports["weight"].rel_error < 1e-12
    assert m.weight.shape == ref.weight.shape and torch.allclose(m.weight, ref.weight, atol=1e-12)
    check_parity(ref, m, sample(dims, cin))
    for p in (*ref.parameters(), *m.parameters()):
        p.grad = None
    check_parity(ref, m, sample(dims, cin, batch=None))  # unbatched input
    x = sample(dims, cin, requires_grad=False)
    with torch.no_grad():  # eval: the cached kernel
        m.eval(), ref.eval()
        expected = ref(x)
        assert torch.allclose(m(x), expected, atol=1e-12)
    # the calibration hook's patches times M are the convolution (before the bias)
    patches = conv_patches(ref, x)
    M = ref.weight.detach().reshape(cout, -1).T
    groups, per_group = ref.groups, cout // ref.groups
    if ref.bias is not None:
        expected = expected - ref.bias.detach().reshape(-1, *[1] * dims)
    n, positions = x.shape[0], expected[0, 0].numel()
    got = patches.reshape(n, groups, positions, -1) @ M.reshape(-1, groups, per_group).transpose(0, 1)[None]
    got = got.permute(0, 1, 3, 2).reshape(expected.shape)  # (N, groups, per_group, positions)
    assert torch.allclose(got, expected, atol=1e-12)


def test_same_errors_as_torch():
    for dims in (1, 2):
        ref, m = make_pair(dims, 4, 6, 3, {"groups": 2})
        bad = [
            ("wrong channels", sample(dims, 5, requires_grad=False)),
            ("float32 input", sample(dims, 4, requires_grad=False).float()),
            ("too many dims", sample(dims, 4, requires_grad=False)[None]),
            ("too small", torch.randn(2, 4, *([1] * dims), dtype=F64)),
        ]
        for what, x in bad:
            with pytest.raises(Exception) as expected:
                ref(x)
            with pytest.raises(type(expected.value)) as got:
                m(x)
            assert str(got.value) == str(expected.value), what


@pytest.mark.parametrize("kwargs", [
    {"groups": 3}, {"groups": 0}, {"padding": "full"}, {"padding": "same", "stride": 2}, {"padding_mode": "mirror"},
])
def test_constructor_errors_are_torchs(kwargs):
    with pytest.raises(ValueError) as expected:
        nn.Conv2d(4, 6, 3, **kwargs)
    with pytest.raises(ValueError) as got:
        MPOConv2d(4, 6, 3, bond_dim=2, **kwargs)
    assert str(got.value) == str(expected.value)
    with pytest.raises(ValueError, match="bond_dim must be a positive integer"):
        MPOConv2d(4, 6, 3, bond_dim=0)
    with pytest.raises(ValueError, match="multiply to 35, expected 36"):
        MPOConv2d(4, 6, 3, bond_dim=2, in_factors=(5, 7))


# ----------------------------------------------------------------------------- conversion, config, cache


@pytest.mark.parametrize("dims", [1, 2])
def test_to_torch_and_config_round_trip(dims):
    ref, m = make_pair(dims, 4, 8, 3, {"stride": 2, "padding": "valid", "groups": 2, "padding_mode": "reflect"})
    back = layer_type(ref).to_torch(m)
    assert type(back) is type(ref) and repr(back) == repr(ref)
    assert torch.allclose(back.weight, ref.weight, atol=1e-12) and torch.equal(back.bias, ref.bias)
    config = json.loads(json.dumps(m.mpo_config()))
    rebuilt = type(m).from_config(config).double()
    rebuilt.load_state_dict(m.state_dict())
    x = sample(dims, 4, requires_grad=False)
    assert torch.equal(rebuilt(x), m(x)) and rebuilt.mpo_config() == m.mpo_config()
    assert sorted(m.state_dict()) == ["bias"] + [f"weight_cores.{k}" for k in range(3)]
    assert "padding_mode=reflect" in repr(m) and "compression=" in repr(m)
    with pytest.raises(ValueError, match="config is for"):
        (MPOConv2d if dims == 1 else MPOConv1d).from_config(config)


def test_truncation_mpos_factors_and_type_errors():
    torch.manual_seed(0)
    ref = nn.Conv2d(32, 64, 3)
    m = MPOConv2d.from_conv2d(ref, max_bond=6)
    err = float((m.weight - ref.weight).detach().norm() / ref.weight.detach().norm())
    assert m.reports["weight"].rel_error == pytest.approx(err, rel=1e-3) and 0 < err < 1
    assert m.compression_ratio > 5
    matrix = ref.weight.detach().reshape(64, -1).T  # (288, 64)
    given = mpo.decompose(matrix, (32, 9), (8, 8), max_bond=5)
    m = MPOConv2d.from_conv2d(ref, mpos={"weight": given})
    assert m.factors["weight"] == ((32, 9), (8, 8))
    assert torch.allclose(m.weight, given.to_matrix(transpose=True).reshape(ref.weight.shape))
    pinned = MPOConv2d.from_conv2d(ref, in_factors=(8, 4, 9), out_factors=(4, 4, 4), max_bond=4)
    assert pinned.factors["weight"] == ((8, 4, 9), (4, 4, 4))
    assert MPOConv1d.from_conv1d(nn.Conv1d(4, 6, 5), rel_tol=0.5).reports["weight"].rel_error <= 0.5
    with pytest.raises(ValueError, match="MPOConv2d.from_conv2d expects a torch.nn.Conv2d, got Conv1d"):
        MPOConv2d.from_conv2d(nn.Conv1d(4, 6, 3))
    with pytest.raises(ValueError, match="mpos\\['weight'\\] has shape"):
        MPOConv2d.from_conv2d(ref, mpos={"weight": mpo.decompose(matrix.T, (8, 8), (32, 9))})


def test_constructor_from_scratch_has_torch_init_variance():
    torch.manual_seed(0)
    m = MPOConv2d(64, 128, 3, padding=1, bond_dim=16)
    ref = nn.Conv2d(64, 128, 3)
    assert m.weight.shape == (128, 64, 3, 3)
    assert float(m.weight.detach().var()) == pytest.approx(float(ref.weight.detach().var()), rel=0.2)
    assert float(m.bias.detach().abs().max()) <= 1 / 24
    out = m(torch.randn(2, 64, 8, 8))
    out.pow(2).mean().backward()
    assert out.shape == (2, 128, 8, 8) and all(p.grad is not None for p in m.parameters())


def test_eval_cache_rebuilds_once_until_parameters_change(kernels):
    torch.manual_seed(0)
    m = MPOConv1d(4, 6, 3, bond_dim=2).eval()
    calls = kernels
    kernels.clear()
    x = torch.randn(2, 4, 10)
    with torch.no_grad():
        first = m(x)
        m(x)
    assert len(calls) == 1
    m(x).pow(2).sum().backward()  # eval with grad: rebuilt in the graph
    assert len(calls) == 2
    torch.optim.SGD(m.parameters(), lr=0.5).step()
    with torch.no_grad():
        assert not torch.allclose(m(x), first)
        assert torch.allclose(m(x), m.to_conv1d()(x), atol=1e-6)
    m.train()
    m(x)
    assert len(calls) == 5  # no cache in training (to_conv1d rebuilt once too)


class CNN(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, groups=2)
        self.seq = nn.Conv1d(2 * width, 2 * width, 5, padding="same", padding_mode="reflect")
        self.head = nn.Linear(2 * width, 4)

    def forward(self, x):
        y = torch.relu(self.conv2(torch.relu(self.conv1(x))))  # (N, 2w, H/2, W/2)
        y = torch.relu(self.seq(y.flatten(2)))  # the pixels as a sequence
        return self.head(y.mean(-1))


def test_calibration_moments_are_the_patches():
    torch.manual_seed(1)
    model = CNN().double()
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    moments = collect_moments(model, {"conv2": model.conv2}, [x])["conv2"]
    patches = conv_patches(model.conv2, torch.relu(model.conv1(x)))
    assert patches.shape == (2 * 2 * 16, 8 * 9)  # (N * groups * positions, in / groups * k)
    torch.testing.assert_close(moments["weight"], patches.T @ patches / patches.shape[0])
