import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from mpolstm.harness.training import ACCURACY, fit
from mpolstm.prune import (
    AGPPruner,
    agp_nonzeros,
    agp_sparsity,
    count_nonzero,
    make_permanent,
    num_weights,
    prunable_weights,
    prune_global,
    prune_layerwise,
    sparsity_report,
)


class Net(nn.Module):
    def __init__(self, rnn=nn.LSTM):
        super().__init__()
        self.emb = nn.Embedding(30, 6)
        self.rnn = rnn(6, 8, num_layers=2, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.rnn(self.emb(x))[0][:, -1])


def make(seed=0, rnn=nn.LSTM):
    torch.manual_seed(seed)
    return Net(rnn)


def test_prunable_weights_by_kind():
    m = make()
    assert prunable_weights(m) == [f"rnn.weight_{k}_l{l}{r}" for l in (0, 1) for r in ("", "_reverse") for k in ("ih", "hh")]
    assert prunable_weights(m, ("linear", "embedding")) == ["emb.weight", "fc.weight"]
    with pytest.raises(ValueError, match="kinds"):
        prunable_weights(m, ("attention",))


@pytest.mark.parametrize("rnn", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("method", [prune_layerwise, prune_global])
@pytest.mark.parametrize("nonzeros", [0, 1, 157, 1000])
def test_exact_nonzero_count(rnn, method, nonzeros):
    m = make(rnn=rnn)
    names = prunable_weights(m, ("rnn", "linear", "embedding"))
    kept = method(m, names, nonzeros)
    assert sum(kept.values()) == nonzeros
    assert count_nonzero(m, names) == nonzeros
    assert {n: nnz for n, (nnz, _) in sparsity_report(m, names).items()} == kept


def test_layerwise_keeps_the_same_fraction_and_largest_magnitudes():
    m = make()
    names = prunable_weights(m)
    total = num_weights(m, names)
    dense = {n: p.detach().clone() for n, p in m.named_parameters()}
    kept = prune_layerwise(m, names, total // 4)
    for name, (nnz, numel) in sparsity_report(m, names).items():
        assert abs(nnz / numel - 0.25) <= 1 / numel
        w = dense[name].abs()
        eff = dict(m.named_buffers())[name + "_mask"].bool()
        assert w[eff].min() >= w[~eff].max()  # kept entries are the largest ones
        assert kept[name] == nnz


def test_global_uses_one_threshold():
    m = make()
    names = prunable_weights(m)
    dense = torch.cat([dict(m.named_parameters())[n].detach().abs().flatten() for n in names])
    prune_global(m, names, 500)
    masks = torch.cat([dict(m.named_buffers())[n + "_mask"].flatten() for n in names]).bool()
    assert dense[masks].min() >= dense[~masks].max()


def test_ties_broken_by_position():
    lin = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    model = nn.Sequential(lin)
    prune_global(model, ["0.weight"], 5)
    assert lin.weight.flatten().tolist() == [1.0] * 5 + [0.0] * 7


def test_pruned_lstm_forward_uses_masked_weights():
    m = make()
    prune_layerwise(m, prunable_weights(m), 300)
    x = torch.randint(0, 30, (4, 7))
    ref = nn.LSTM(6, 8, num_layers=2, batch_first=True, bidirectional=True)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            masked = hasattr(m.rnn, name + "_orig")
            p.copy_(getattr(m.rnn, name + "_orig") * getattr(m.rnn, name + "_mask") if masked else getattr(m.rnn, name))
    e = m.emb(x)
    assert torch.equal(m.rnn(e)[0], ref(e)[0])
    dense = make()
    assert not torch.equal(dense.rnn(e)[0], ref(e)[0])  # the mask really changed the output


def test_masks_survive_optimizer_steps_and_repruning():
    m = make()
    names = prunable_weights(m)
    prune_layerwise(m, names, 200)
    masks = {n: b.clone() for n, b in m.named_buffers() if n.endswith("_mask")}
    opt = torch.optim.Adam(m.parameters(), lr=0.1)
    x = torch.randint(0, 30, (4, 7))
    for _ in range(3):
        opt.zero_grad()
        m(x).square().sum().backward()
        opt.step()
    assert count_nonzero(m, names) == 200
    for n, mask in masks.items():
        orig = dict(m.named_parameters())[n.replace("_mask", "_orig")]
        assert torch.all((orig * mask)[mask == 0] == 0)
    prune_layerwise(m, names, 80)  # pruning again shrinks the kept set in place
    for n, mask in masks.items():
        new = dict(m.named_buffers())[n]
        assert torch.all(new <= mask)
    assert count_nonzero(m, names) == 80
    assert len([h for h in m.rnn._forward_pre_hooks.values()]) == len(names)


def test_make_permanent_leaves_plain_parameters_with_zeros():
    m = make()
    names = prunable_weights(m, ("rnn", "linear"))
    prune_global(m, names, 120)
    x = torch.randint(0, 30, (3, 5))
    before = m(x)
    done = make_permanent(m)
    assert sorted(done) == sorted(names)
    assert not any(k.endswith(("_orig", "_mask")) for k in m.state_dict())
    assert count_nonzero(m, names) == 120
    assert torch.equal(m(x), before)
    fresh = make()
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh(x), before)


def test_bad_arguments():
    m = make()
    with pytest.raises(ValueError, match="nonzeros"):
        prune_layerwise(m, prunable_weights(m), 10**6)
    with pytest.raises(ValueError, match="not prunable"):
        prune_global(m, ["rnn.bias_ih_l0"], 3)
    with pytest.raises(ValueError, match="no module"):
        prune_global(m, ["nope.weight"], 3)
    with pytest.raises(ValueError, match="empty"):
        prune_global(m, [], 3)


def test_agp_schedule_endpoints_and_monotone():
    assert agp_sparsity(0, final=0.9, start=0, end=10) == 0.0
    assert agp_sparsity(10, final=0.9, start=0, end=10) == 0.9
    assert agp_sparsity(5, final=0.9, start=0, end=10) == pytest.approx(0.9 + (0 - 0.9) * 0.5**3)
    counts = [agp_nonzeros(t, 1000, 37, start=2, end=9) for t in range(12)]
    assert counts[:3] == [1000, 1000, 1000] and counts[9:] == [37, 37, 37]
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    assert agp_nonzeros(0, 1000, 37, start=0, end=5, initial_sparsity=0.5) == 500


@pytest.mark.parametrize("unit,end", [("epoch", 2), ("step", 7)])
def test_agp_callback_reaches_exact_target(tmp_path, unit, end):
    m = make()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 30, (48, 5), generator=g), torch.randint(0, 3, (48,), generator=g)
    train = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    val = DataLoader(TensorDataset(x, y), batch_size=48)
    names = prunable_weights(m)
    agp = AGPPruner(names, 61, start=0, end=end, unit=unit, frequency=2, method="global")
    result = fit(m, train, val, F.cross_entropy, ACCURACY, epochs=4, lr=1e-2, callbacks=[agp], progress=False)
    counts = [r["nonzeros"] for r in result.history]
    assert counts[-1] == 61 and count_nonzero(m, names) == 61
    assert all(a >= b for a, b in zip(counts, counts[1:])) and counts[0] > 61
    assert result.best_epoch is not None and result.history[result.best_epoch - 1]["nonzeros"] == 61
