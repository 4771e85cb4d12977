import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mpolstm import mpo as M


def random_factors(draw, n):
    return tuple(draw(st.lists(st.integers(1, 4), min_size=n, max_size=n)))


@st.composite
def shapes(draw, min_cores=2, max_cores=6):
    n = draw(st.integers(min_cores, max_cores))
    in_f = random_factors(draw, n)
    out_f = random_factors(draw, n)
    return in_f, out_f


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- factorize


@pytest.mark.parametrize(
    "n,k,expected",
    [(1024, 4, (4, 8, 8, 4)), (4096, 4, (8, 8, 8, 8)), (13, 3, (1, 13, 1)), (1, 3, (1, 1, 1)), (12, 1, (12,))],
)
def test_factorize_known(n, k, expected):
    assert M.factorize(n, k) == expected


@given(st.integers(1, 5000), st.integers(1, 6))
def test_factorize_product_and_shape(n, k):
    f = M.factorize(n, k)
    assert len(f) == k and math.prod(f) == n
    peak = f.index(max(f))  # larger factors in the middle: non-decreasing then non-increasing
    assert list(f[: peak + 1]) == sorted(f[: peak + 1]) and list(f[peak:]) == sorted(f[peak:], reverse=True)


@pytest.mark.parametrize("n,k", [(0, 2), (-4, 2), (8, 0), (2.5, 2), (True, 2)])
def test_factorize_rejects_bad_input(n, k):
    with pytest.raises(ValueError, match="positive integer"):
        M.factorize(n, k)


# ----------------------------------------------------------------------------- decompose


@given(shapes())
def test_full_bond_is_exact(fs):
    in_f, out_f = fs
    w = torch.randn(math.prod(in_f), math.prod(out_f), dtype=torch.float64)
    m = M.decompose(w, in_f, out_f)
    assert rel_err(m.to_matrix(), w) < 1e-10
    assert rel_err(m.to_matrix(transpose=True), w.T) < 1e-10
    assert m.report.rel_error < 1e-10
    assert all(d <= cap for d, cap in zip(m.bond_dims, M.max_bond_dims(in_f, out_f)))
    assert m.num_params == sum(c.numel() for c in m.cores)


@given(shapes(max_cores=5), st.floats(0.01, 0.95), st.integers(0, 2**16))
def test_rel_tol_guarantee(fs, eps, seed):
    in_f, out_f = fs
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(math.prod(in_f), math.prod(out_f), dtype=torch.float64, generator=g)
    w = w * torch.logspace(0, -3, w.shape[1], dtype=torch.float64)  # a decaying column scale
    m = M.decompose(w, in_f, out_f, rel_tol=eps)
    achieved = rel_err(m.to_matrix(), w)
    assert achieved <= eps * (1 + 1e-9) + 1e-12
    assert achieved == pytest.approx(m.report.rel_error, rel=1e-6, abs=1e-12)


def test_two_cores_error_is_discarded_singular_energy():
    w = torch.randn(12, 20, dtype=torch.float64)
    in_f, out_f = (3, 4), (4, 5)
    unfolded = w.reshape(3, 4, 4, 5).permute(0, 2, 1, 3).reshape(12, 20)
    s = torch.linalg.svdvals(unfolded)
    for bond in (1, 3, 7):
        m = M.decompose(w, in_f, out_f, max_bond=bond)
        expected = float((s[bond:] ** 2).sum().sqrt() / w.norm())
        assert rel_err(m.to_matrix(), w) == pytest.approx(expected, rel=1e-10)
        assert m.report.rel_error == pytest.approx(expected, rel=1e-10)


def test_max_bond_clip_is_reported():
    w = torch.randn(16, 16, dtype=torch.float64)
    m = M.decompose(w, (4, 4), (4, 4), max_bond=100)
    assert m.bond_dims == (16,)
    assert m.report.clipped == ((0, 100, 16),)
    assert M.decompose(w, (4, 4), (4, 4), max_bond=3).report.clipped == ()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"in_factors": (3, 5), "out_factors": (4, 4)}, r"multiply to 15, expected 16"),
        ({"in_factors": (4, 4), "out_factors": (4, 4, 1)}, "same length"),
        ({"in_factors": (4, 4), "out_factors": (4, 4), "max_bond": 0}, "max_bond must be a positive integer"),
        ({"in_factors": (4, 4), "out_factors": (4, 4), "rel_tol": 1.0}, r"rel_tol must be a number in \(0, 1\)"),
        ({"in_factors": (4, 4), "out_factors": (4, 4), "rel_tol": 0.0}, r"rel_tol must be a number in \(0, 1\)"),
        ({"in_factors": (4, 0), "out_factors": (4, 4)}, "positive integers"),
    ],
)
def test_decompose_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        M.decompose(torch.randn(16, 16), **kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_decompose_rejects_non_finite(bad):
    w = torch.randn(16, 16)
    w[3, 4] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        M.decompose(w, (4, 4), (4, 4))


def test_decompose_rejects_non_matrix():
    with pytest.raises(ValueError, match="2-D tensor"):
        M.decompose(torch.randn(4, 4, 4), (4, 4), (4, 4))


def test_mpo_rejects_inconsistent_cores():
    with pytest.raises(ValueError, match="bond mismatch"):
        M.MPO([torch.randn(1, 2, 2, 3), torch.randn(4, 2, 2, 1)])
    with pytest.raises(ValueError, match="boundary bonds"):
        M.MPO([torch.randn(2, 2, 2, 1)])


# ----------------------------------------------------------------------------- canonical forms, truncation, entropy


@pytest.mark.parametrize("center", [0, 1, 2, 3])
def test_canonical_forms_are_isometries(center):
    w = torch.randn(64, 81, dtype=torch.float64)
    m = M.decompose(w, (2, 4, 4, 2), (3, 3, 3, 3)).canonicalize(center)
    assert rel_err(m.to_matrix(), w) < 1e-12
    for k, core in enumerate(m.cores):
        d, i, j, e = core.shape
        if k < center:
            q = core.reshape(d * i * j, e)
            assert torch.allclose(q.T @ q, torch.eye(e, dtype=q.dtype), atol=1e-12)
        elif k > center:
            q = core.reshape(d, i * j * e)
            assert torch.allclose(q @ q.T, torch.eye(d, dtype=q.dtype), atol=1e-12)


@given(st.floats(0.05, 0.9), st.integers(0, 2**16))
def test_truncate_guarantee(eps, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 60, dtype=torch.float64, generator=g)
    full = M.decompose(w, (2, 4, 6), (3, 4, 5)).canonicalize(1)  # a non-canonical starting point
    cut = full.truncate(rel_tol=eps)
    achieved = rel_err(cut.to_matrix(), w)
    assert achieved <= eps * (1 + 1e-9)
    assert achieved == pytest.approx(cut.report.rel_error, rel=1e-6, abs=1e-12)


def test_truncate_max_bond_matches_tt_svd():
    w = torch.randn(48, 60, dtype=torch.float64)
    direct = M.decompose(w, (2, 4, 6), (3, 4, 5), max_bond=5)
    rounded = M.decompose(w, (2, 4, 6), (3, 4, 5)).truncate(max_bond=5)
    assert rounded.bond_dims == direct.bond_dims == (5, 5)
    assert rounded.report.rel_error == pytest.approx(direct.report.rel_error, rel=1e-8)


def test_entropy_zero_for_product_operator():
    # A Kronecker product A1 (x) A2 (x) A3 is an MPO of bond 1: no entanglement at any cut.
    a = [torch.randn(i, j, dtype=torch.float64) for i, j in ((2, 3), (4, 2), (3, 3))]
    w = torch.kron(torch.kron(a[0], a[1]), a[2])
    m = M.decompose(w, (2, 4, 3), (3, 2, 3))
    assert torch.allclose(m.entanglement_entropy(), torch.zeros(2, dtype=torch.float64), atol=1e-10)


def test_entropy_bounded_by_log_bond_and_matches_spectrum():
    w = torch.randn(64, 64, dtype=torch.float64)
    m = M.decompose(w, (4, 4, 4), (4, 4, 4), max_bond=6)
    ent = m.entanglement_entropy()
    assert bool((ent <= torch.log(torch.tensor(m.bond_dims, dtype=torch.float64)) + 1e-10).all())
    assert bool((ent > 0).all())
    s = m.singular_values(0)
    unfolded = m.to_matrix().reshape(4, 4, 4, 4, 4, 4).permute(0, 3, 1, 4, 2, 5).reshape(16, 256)
    assert torch.allclose(s, torch.linalg.svdvals(unfolded)[: s.numel()], atol=1e-10)
    with pytest.raises(ValueError, match="bond must be an integer"):
        m.singular_values(2)


# ----------------------------------------------------------------------------- matmul


@pytest.mark.parametrize("strategy", ["cores", "rebuild", "auto"])
@pytest.mark.parametrize("rows", [1, 5])
def test_mpo_matmul_matches_dense(strategy, rows):
    w = torch.randn(60, 48, dtype=torch.float64)
    m = M.decompose(w, (3, 4, 5), (4, 3, 4), max_bond=4)
    x = torch.randn(2, rows, 60, dtype=torch.float64)
    out = M.mpo_matmul(x, m, strategy=strategy)
    assert out.shape == (2, rows, 48)
    assert torch.allclose(out, x @ m.to_matrix(), atol=1e-12)


@pytest.mark.parametrize("strategy", ["cores", "rebuild"])
def test_mpo_matmul_gradcheck(strategy):
    m = M.decompose(torch.randn(12, 18, dtype=torch.float64), (2, 2, 3), (3, 2, 3), max_bond=3)
    cores = [c.clone().requires_grad_() for c in m.cores]
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *cs: M.mpo_matmul(x, cs, strategy=strategy), (x, *cores))


def test_mpo_matmul_rejects_wrong_input():
    m = M.decompose(torch.randn(12, 18), (2, 2, 3), (3, 2, 3))
    with pytest.raises(ValueError, match="last dimension 12"):
        M.mpo_matmul(torch.randn(3, 13), m)
    with pytest.raises(ValueError, match="strategy must be"):
        M.mpo_matmul(torch.randn(3, 12), m, strategy="fast")


def test_cost_model_prefers_cores_for_one_row_and_rebuild_for_many():
    cores = M.decompose(torch.randn(1024, 1024), (4, 8, 8, 4), (4, 8, 8, 4), max_bond=8).cores
    assert M.matmul_cost(1, cores)["cores"] < M.matmul_cost(1, cores)["rebuild"]
    assert M.matmul_cost(4096, cores)["rebuild"] < M.matmul_cost(4096, cores)["cores"]


def test_truncate_per_bond_caps():
    w = torch.randn(48, 60, dtype=torch.float64)
    full = M.decompose(w, (2, 4, 6), (3, 4, 5))
    cut = full.truncate(max_bond=[2, 7])
    assert cut.bond_dims == (2, 7)
    assert rel_err(cut.to_matrix(), w) == pytest.approx(cut.report.rel_error, rel=1e-8)
    with pytest.raises(ValueError, match="expected one per internal bond"):
        full.truncate(max_bond=[2, 3, 4])
    with pytest.raises(ValueError, match="max_bond must be a positive integer"):
        full.truncate(max_bond=[2, 0])


def test_exact_spectra_equal_the_sweeps_spectra():
    from mpolstm.mpo.sweep import exact_spectra

    torch.manual_seed(11)
    w = torch.randn(24, 30, dtype=torch.float64)
    for in_f, out_f in (((2, 3, 4), (5, 3, 2)), ((24, 1), (1, 30)), ((4, 6), (6, 5))):
        mpo = M.decompose(w, in_f, out_f)
        for got, want in zip(exact_spectra(w, in_f, out_f), mpo.spectra()):
            torch.testing.assert_close(got[: want.numel()], want, atol=1e-9, rtol=1e-9)
