import math

import pytest
import torch
from torch import nn

from mpolstm.nn import MPOEmbedding
from mpolstm.nn.embedding import embedding_factors


def test_full_bond_matches_embedding_any_index_shape():
    torch.manual_seed(0)
    emb = nn.Embedding(360, 24).double()
    m = MPOEmbedding.from_embedding(emb, num_cores=3)
    for shape in [(), (7,), (4, 9), (2, 3, 5)]:
        idx = torch.randint(0, 360, shape)
        out = m(idx)
        assert out.shape == (*shape, 24)
        assert torch.allclose(out, emb(idx), atol=1e-12)
    assert torch.allclose(m(torch.arange(360).int()), emb.weight, atol=1e-12)
    assert torch.allclose(m.weight, emb.weight, atol=1e-12)
    assert m.report.rel_error < 1e-12


def test_padding_idx_row_is_kept_and_gets_no_gradient():
    torch.manual_seed(1)
    emb = nn.Embedding(100, 16, padding_idx=-1).double()
    with torch.no_grad():
        emb.weight[99] = torch.arange(16.0)  # a non-zero padding row, as from_pretrained allows
    m = MPOEmbedding.from_embedding(emb, num_cores=2)
    assert m.padding_idx == 99
    idx = torch.tensor([[99, 3, 99], [5, 6, 99]])
    assert torch.allclose(m(idx), emb(idx), atol=1e-12)
    assert torch.allclose(m.to_embedding().weight, emb.weight, atol=1e-12)
    m(torch.tensor([99, 99])).sum().backward()
    assert all(c.grad is None or c.grad.abs().max() == 0 for c in m.cores)


def test_gradients_match_dense_table_gradient():
    torch.manual_seed(2)
    m = MPOEmbedding(64, 12, bond_dim=3, num_cores=3).double()
    idx = torch.tensor([[1, 5, 5], [63, 0, 1]])
    target = torch.randn(2, 3, 12, dtype=torch.float64)
    (m(idx) * target).sum().backward()
    grads = [c.grad.clone() for c in m.cores]
    for c in m.cores:
        c.grad = None
    (m.weight[idx] * target).sum().backward()  # same loss through the rebuilt table
    for g, c in zip(grads, m.cores):
        assert g.abs().sum() > 0
        assert torch.allclose(g, c.grad, atol=1e-12)


def test_prime_vocabulary_is_padded_and_extra_rows_unreachable():
    rows, dims = embedding_factors(10007, 64)
    assert math.prod(rows) == 10010 and max(rows) <= 20 and dims == (2, 4, 4, 2)
    assert embedding_factors(10000, 64)[0] == (10, 10, 10, 10)
    torch.manual_seed(3)
    emb = nn.Embedding(101, 8).double()  # prime
    m = MPOEmbedding.from_embedding(emb, num_cores=2)
    assert m.num_rows > 101
    idx = torch.tensor([0, 50, 100])
    assert torch.allclose(m(idx), emb(idx), atol=1e-12)
    with pytest.raises(ValueError, match=r"index 101 is out of range.*\[0, 101\)"):
        m(torch.tensor([101]))
    back = m.to_embedding()
    assert back.weight.shape == (101, 8) and torch.allclose(back.weight, emb.weight, atol=1e-12)


def test_bad_indices_and_inputs():
    m = MPOEmbedding(30, 6, bond_dim=2, num_cores=2)
    with pytest.raises(ValueError, match="index -1 is out of range"):
        m(torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="index 30 is out of range"):
        m(torch.tensor([[0, 30]]))
    with pytest.raises(ValueError, match="integer tensor"):
        m(torch.tensor([0.0, 1.0]))
    assert m(torch.zeros(0, 3, dtype=torch.long)).shape == (0, 3, 6)
    with pytest.raises(ValueError, match="padding_idx"):
        MPOEmbedding(30, 6, bond_dim=2, padding_idx=30)
    with pytest.raises(ValueError, match="row_factors=.*expected at least"):
        MPOEmbedding(30, 6, bond_dim=2, row_factors=(5, 5), dim_factors=(2, 3))
    with pytest.raises(ValueError, match="max_norm"):
        MPOEmbedding.from_embedding(nn.Embedding(30, 6, max_norm=1.0))


def test_truncation_compresses_and_reports_error():
    torch.manual_seed(4)
    emb = nn.Embedding(1000, 64)
    m = MPOEmbedding.from_embedding(emb, max_bond=8)
    with torch.no_grad():
        measured = float((m.weight - emb.weight).norm() / emb.weight.norm())
    assert m.report.rel_error == pytest.approx(measured, rel=1e-3)
    assert m.compression_ratio > 15


def test_config_round_trip_and_protocol():
    m = MPOEmbedding(101, 8, bond_dim=3, padding_idx=0, num_cores=2)
    cfg = m.mpo_config()
    clone = MPOEmbedding.from_config(cfg)
    assert clone.mpo_config() == cfg
    assert [c.shape for c in clone.cores] == [c.shape for c in m.cores]
    assert set(clone.state_dict()) == set(m.state_dict())
    assert list(m.mpo_weights()) == ["weight"] and m.mpo_weights()["weight"] is m.cores
    clone.load_state_dict(m.state_dict())
    idx = torch.tensor([0, 7, 100])
    assert torch.equal(clone(idx), m(idx))


@pytest.mark.parametrize("num_cores", [1, 2, 4, 5])
def test_gathered_rows_equal_the_rebuilt_table(num_cores):
    torch.manual_seed(5)
    m = MPOEmbedding(3000, 48, bond_dim=5, num_cores=num_cores).double()
    idx = torch.randint(0, 3000, (6, 40))
    table = m.weight
    assert torch.allclose(m(idx), table[idx], atol=1e-12)
