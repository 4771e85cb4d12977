import hashlib
import json

import pytest
import torch
from torch import nn

from mpolstm import io
from mpolstm.compression import CompressionConfig, compress
from mpolstm.nn import MPOEmbedding, MPOLinear


class Net(nn.Module):
    def __init__(self, vocab=50, hidden=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, 16, padding_idx=0)
        self.fc = nn.Linear(16, hidden)
        self.head = nn.Linear(hidden, 4)

    def forward(self, idx):
        return self.head(torch.tanh(self.fc(self.emb(idx))))


def compressed_net(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    net = Net().to(dtype)
    compress(net, CompressionConfig(target_modules=["emb", "fc"], max_bond=3, num_cores=2))
    return net


def assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def rewrite_config(path, edit):
    """Change config.json (keeping the weights hash valid) to test config validation."""
    cfg = json.loads((path / io.CONFIG_FILE).read_text())
    edit(cfg)
    (path / io.CONFIG_FILE).write_text(json.dumps(cfg))


@pytest.mark.parametrize("module", [
    MPOLinear(24, 36, bond_dim=3, num_cores=3).double(),
    MPOEmbedding(101, 8, bond_dim=2, padding_idx=5, num_cores=2),
])
def test_standalone_round_trip_is_bit_exact(tmp_path, module):
    io.save(module, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [io.CONFIG_FILE, io.WEIGHTS_FILE]
    loaded = io.load(tmp_path / "m")
    assert type(loaded) is type(module) and loaded.mpo_config() == module.mpo_config()
    assert_same_state(loaded, module)
    cfg = json.loads((tmp_path / "m" / io.CONFIG_FILE).read_text())
    assert cfg["standalone"] is True and cfg["library_version"] == __import__("mpolstm").__version__


def test_compressed_model_round_trip_onto_base_model(tmp_path):
    net = compressed_net()
    with torch.no_grad():
        net.fc.cores[0].mul_(1.5)  # a "fine-tuned" value the fresh model does not have
    io.save(net, tmp_path / "ckpt")
    loaded = io.load(tmp_path / "ckpt", base_model=Net().double())
    assert isinstance(loaded.emb, MPOEmbedding) and isinstance(loaded.fc, MPOLinear)
    assert isinstance(loaded.head, nn.Linear)
    assert_same_state(loaded, net)
    idx = torch.tensor([[0, 3, 49]])
    assert torch.equal(loaded(idx), net(idx))
    # saving again over the same folder is refused; overwrite=True replaces it whole (issue 27: an old
    # compression.json used to survive), leaving no temporary folder beside it
    (tmp_path / "ckpt" / "compression.json").write_text("{}")
    before = (tmp_path / "ckpt" / io.WEIGHTS_FILE).read_bytes()
    with pytest.raises(ValueError, match="already exists; choose a new path, or pass overwrite=True"):
        io.save(loaded, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / io.WEIGHTS_FILE).read_bytes() == before
    io.save(loaded, tmp_path / "ckpt", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [io.CONFIG_FILE, io.WEIGHTS_FILE]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    (tmp_path / "empty").mkdir()  # an empty folder counts as absent; missing parents are created
    io.save(loaded, tmp_path / "empty")
    io.save(loaded, tmp_path / "new" / "parents" / "ckpt")
    assert (tmp_path / "new" / "parents" / "ckpt" / io.WEIGHTS_FILE).is_file()


def test_tied_weights_are_saved(tmp_path):
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    net[1].weight = net[0].weight
    compress(net, CompressionConfig(target_modules=["0", "1"], num_cores=2, max_bond=2))
    io.save(net, tmp_path / "t")
    fresh = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    loaded = io.load(tmp_path / "t", base_model=fresh)
    assert_same_state(loaded, net)
    assert loaded[1].owner is loaded[0]  # one MPO serves both, as before saving


def test_corrupt_truncated_and_foreign_files(tmp_path):
    module = MPOLinear(24, 36, bond_dim=3, num_cores=3)
    path = io.save(module, tmp_path / "m")
    weights = (path / io.WEIGHTS_FILE).read_bytes()

    (path / io.WEIGHTS_FILE).write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors: content does not match the SHA-256"):
        io.load(path)

    flipped = bytearray(weights)
    flipped[-3] ^= 0xFF
    (path / io.WEIGHTS_FILE).write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="corrupt, truncated or from another save"):
        io.load(path)

    # a truncated file whose hash was recorded anyway: the safetensors layout check catches it
    for cut in (5, len(weights) - 4):
        (path / io.WEIGHTS_FILE).write_bytes(weights[:cut])
        rewrite_config(path, lambda c, cut=cut: c.update(weights_sha256=hashlib.sha256(weights[:cut]).hexdigest()))
        with pytest.raises(ValueError, match=r"model\.safetensors: .*truncated"):
            io.load(path)

    (path / io.CONFIG_FILE).write_bytes(b"\x80\x04\x95 pickle bytes")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        io.load(path)
    (path / io.CONFIG_FILE).write_text(json.dumps({"architectures": ["BertModel"], "hidden_size": 768}))
    with pytest.raises(ValueError, match=r"config\.json: not an mpolstm config"):
        io.load(path)
    with pytest.raises(ValueError, match="not a directory"):
        io.load(path / io.WEIGHTS_FILE)


def test_config_that_does_not_match_the_weights(tmp_path):
    path = io.save(MPOLinear(24, 36, bond_dim=3, num_cores=3), tmp_path / "m")
    original = (path / io.CONFIG_FILE).read_text()

    rewrite_config(path, lambda c: c["modules"][""]["config"].update(bond_dims=[4, 3]))
    with pytest.raises(ValueError, match=r"model\.safetensors: weights do not match.*shape mismatch.*cores\.0"):
        io.load(path)

    # bonds needing terabytes are refused from the shapes alone, before any allocation
    (path / io.CONFIG_FILE).write_text(original)
    rewrite_config(path, lambda c: c["modules"][""]["config"].update(bond_dims=[10**6, 10**6]))
    with pytest.raises(ValueError, match="shape mismatch"):
        io.load(path)
    rewrite_config(path, lambda c: c["modules"][""]["config"].update(in_features=10**15))
    with pytest.raises(ValueError, match="larger than"):
        io.load(path)

    (path / io.CONFIG_FILE).write_text(original)
    rewrite_config(path, lambda c: c["modules"][""]["config"].update({"class": "Pickler"}))
    with pytest.raises(ValueError, match="class 'Pickler'; expected one of"):
        io.load(path)

    (path / io.CONFIG_FILE).write_text(original)
    rewrite_config(path, lambda c: c["modules"][""]["config"].update(in_factors=[2, 3, 5]))
    with pytest.raises(ValueError, match="invalid MPOLinear config"):
        io.load(path)


def test_mismatched_base_model(tmp_path):
    path = io.save(compressed_net(), tmp_path / "ckpt")
    with pytest.raises(ValueError, match="pass base_model"):
        io.load(path)
    with pytest.raises(ValueError, match="'fc' has out_features=32 in the save, but base_model has out_features=64"):
        io.load(path, base_model=Net(hidden=64).double())
    with pytest.raises(ValueError, match="saved from a Net, but base_model is a Sequential"):
        io.load(path, base_model=nn.Sequential(nn.Linear(2, 2)))
    base = Net().double()
    base.fc = nn.GRU(16, 32)
    with pytest.raises(ValueError, match="'fc' was saved as MPOLinear, but base_model has a GRU"):
        io.load(path, base_model=base)
    base = Net().double()
    base.head = nn.Linear(32, 5)  # a dense module that differs: caught by the state_dict check
    with pytest.raises(ValueError, match=r"shape mismatch.*head\.weight"):
        io.load(path, base_model=base)
    assert isinstance(base.fc, nn.Linear)  # a failed load leaves the base model untouched
    standalone = io.save(MPOLinear(8, 8, bond_dim=2, num_cores=2), tmp_path / "single")
    with pytest.raises(ValueError, match="standalone MPOLinear; call load without base_model"):
        io.load(standalone, base_model=Net())


def test_save_refuses_a_file_path(tmp_path):
    target = tmp_path / "f"
    target.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        io.save(MPOLinear(8, 8, bond_dim=2, num_cores=2), target)


class RNNNet(nn.Module):
    def __init__(self, hidden=12):
        super().__init__()
        self.lstm = nn.LSTM(8, hidden, num_layers=2, bidirectional=True, proj_size=4)
        self.gru = nn.GRU(8, 6, batch_first=True)

    def forward(self, x):
        return self.lstm(x)[0].sum() + self.gru(x)[0].sum()


def test_recurrent_round_trips(tmp_path):
    torch.manual_seed(7)
    net = RNNNet().double()
    compress(net, CompressionConfig(max_bond=3, num_cores=2))
    io.save(net, tmp_path / "whole")
    loaded = io.load(tmp_path / "whole", base_model=RNNNet().double())
    assert type(loaded.lstm).__name__ == "MPOLSTM" and type(loaded.gru).__name__ == "MPOGRU"
    assert_same_state(loaded, net)
    x = torch.randn(5, 2, 8, dtype=torch.float64)
    assert torch.equal(loaded(x), net(x))
    io.save(net.lstm, tmp_path / "lstm")
    standalone = io.load(tmp_path / "lstm")
    assert_same_state(standalone, net.lstm)
    assert torch.equal(standalone(x)[0], net.lstm(x)[0])
    with pytest.raises(ValueError, match="'lstm' has hidden_size=12 in the save, but base_model has hidden_size=10"):
        io.load(tmp_path / "whole", base_model=RNNNet(hidden=10).double())
