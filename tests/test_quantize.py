"""mpolstm.quantize: int8 cores with per-slice float32 scales, kept through copies, dtype changes and
save/load; the bad inputs (bits, no MPO module, non-finite cores, cores off their grids, bad files)."""

import copy
import hashlib
import json

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

import mpolstm
from mpolstm import io
from mpolstm.mpo import core_scale_shape, dequantize_int8
from mpolstm.nn import MPOLinear


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 24)
        self.lstm = nn.LSTM(24, 16, num_layers=2)

    def forward(self, x):
        return self.lstm(torch.tanh(self.fc(x)))[0]


def quantized_net(seed=0):
    torch.manual_seed(seed)
    net, _ = mpolstm.compress(Net(), mpolstm.CompressionConfig(target_modules=["fc", "lstm"], max_bond=4))
    return mpolstm.quantize(net).eval()


def test_every_core_is_on_a_grid_of_one_scale_per_slice_of_its_larger_bond():
    net = quantized_net()
    for module in (net.fc, net.lstm):
        for key, scale_key in module._int8_keys().items():
            core, scale = module.get_parameter(key), module.get_buffer(scale_key)
            d_left, _, _, d_right = core.shape
            assert scale.dtype == torch.float32 and scale.shape == core_scale_shape(core.shape)
            assert scale.numel() == max(d_left, d_right) and (scale > 0).all()
            q = torch.round(core.detach() / scale)
            assert torch.equal(dequantize_int8(q.to(torch.int8), scale), core.detach())
            per_slice = q.abs().amax(dim=(1, 2, 3) if d_left > d_right else (0, 1, 2))
            assert (per_slice == 127).all()
    assert sorted(k for k in net.fc.state_dict() if "scales" in k) == ["scales.0", "scales.1", "scales.2", "scales.3"]


def test_scales_survive_copies_and_stay_float32_under_dtype_changes(tmp_path):
    net = quantized_net()
    twin = copy.deepcopy(net)
    assert twin.lstm.int8
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), twin.state_dict().values()))
    for dtype in (torch.float64, torch.bfloat16):
        moved = copy.deepcopy(net).to(dtype)
        assert {b.dtype for k, b in moved.lstm.state_dict().items() if "scales" in k} == {torch.float32}
        io.save(moved, tmp_path / str(dtype))  # still on its grids in the new dtype
        back = io.load(tmp_path / str(dtype), Net().to(dtype))
        assert all(torch.equal(a, b) for a, b in zip(moved.state_dict().values(), back.state_dict().values()))


def test_bad_arguments_change_nothing():
    net = quantized_net()
    for bits in (4, 16, True):
        with pytest.raises(ValueError, match="bits must be 8"):
            mpolstm.quantize(net, bits=bits)
    with pytest.raises(ValueError, match="Sequential has no MPO module to quantize"):
        mpolstm.quantize(nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 4)))
    layer = MPOLinear(24, 36, bond_dim=3, num_cores=3)
    with torch.no_grad():
        layer.cores[2][0, 0, 0, 0] = float("inf")
    before = [c.clone() for c in layer.cores]
    with pytest.raises(ValueError, match="core 2 of weight has non-finite values"):
        mpolstm.quantize(layer)
    assert not layer.int8 and all(torch.equal(a, b) for a, b in zip(before, layer.cores))


def test_training_after_quantize_is_refused_at_save_until_quantized_again(tmp_path):
    net = quantized_net().train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    net(torch.randn(3, 2, 12)).pow(2).sum().backward()
    optimizer.step()
    with pytest.raises(ValueError, match="cannot save module 'fc'.*no longer on its int8 grid.*mpolstm.quantize"):
        io.save(net, tmp_path / "m")
    assert not (tmp_path / "m").exists()
    io.save(mpolstm.quantize(net), tmp_path / "m")
    assert io.load(tmp_path / "m", Net()).lstm.int8


def rewrite(path, edit_tensors=None, edit_config=None):
    """Edit a saved folder's tensors and/or config, keeping the recorded SHA-256 valid."""
    config = json.loads((path / io.CONFIG_FILE).read_text())
    if edit_tensors is not None:
        tensors = st_load((path / io.WEIGHTS_FILE).read_bytes())
        edit_tensors(tensors)
        data = st_save(tensors, metadata={"format": "pt"})
        (path / io.WEIGHTS_FILE).write_bytes(data)
        config["weights_sha256"] = hashlib.sha256(data).hexdigest()
    if edit_config is not None:
        edit_config(config)
    (path / io.CONFIG_FILE).write_text(json.dumps(config))


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_a_scale_that_is_not_finite_and_positive_is_refused(tmp_path, value):
    path = io.save(quantized_net(), tmp_path / "m")
    rewrite(path, edit_tensors=lambda t: t["lstm.weight_hh_l1_scales.2"].view(-1).__setitem__(1, value))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'lstm\.weight_hh_l1_scales\.2' holds a "
                                         "non-finite, zero or negative scale"):
        io.load(path, Net())


def test_int8_and_float_tensors_in_the_wrong_place_are_refused(tmp_path):
    path = io.save(quantized_net(), tmp_path / "m")
    original = (path / io.CONFIG_FILE).read_text(), (path / io.WEIGHTS_FILE).read_bytes()
    rewrite(path, edit_tensors=lambda t: t.update({"fc.cores.1": t["fc.cores.1"].float()}))
    with pytest.raises(ValueError, match=r"tensor 'fc\.cores\.1' is F32, but its module is saved with int8 cores"):
        io.load(path, Net())
    (path / io.CONFIG_FILE).write_text(original[0])
    (path / io.WEIGHTS_FILE).write_bytes(original[1])
    rewrite(path, edit_tensors=lambda t: t.update({"fc.scales.0": t["fc.scales.0"].double()}))
    with pytest.raises(ValueError, match=r"tensor 'fc\.scales\.0' is F64; the scales of int8 cores are F32"):
        io.load(path, Net())
    (path / io.CONFIG_FILE).write_text(original[0])
    (path / io.WEIGHTS_FILE).write_bytes(original[1])
    # int8 cores under a config without "int8": the scales are extra, then the int8 tensors are refused
    rewrite(path, edit_config=lambda c: c["modules"]["lstm"]["config"].pop("int8"))
    with pytest.raises(ValueError, match=r"not in the model: \['lstm\.weight_hh_l0_scales\.0'"):
        io.load(path, Net())
    rewrite(path, edit_tensors=lambda t: [t.pop(k) for k in list(t) if k.startswith("lstm.") and "_scales." in k])
    with pytest.raises(ValueError, match=r"tensor 'lstm\.weight_hh_l0_cores\.0' is I8 where a float tensor is "
                                         "expected"):
        io.load(path, Net())
    rewrite(path, edit_config=lambda c: c["modules"]["lstm"]["config"].update({"int8": "yes"}))
    with pytest.raises(ValueError, match="invalid MPOLSTM config: config field 'int8' must be true or false"):
        io.load(path, Net())


def test_tied_weights_quantize_save_load_and_inspect(tmp_path):
    """A decoder tied to the embedding (a SharedLinear) uses the owner's int8 cores, in memory and after load."""
    from mpolstm.harness.usermodels import describe_folder
    from test_tied import TiedLM

    torch.manual_seed(0)
    model, _ = mpolstm.compress(TiedLM(), mpolstm.CompressionConfig(target_modules=["encoder", "decoder", "rnn"],
                                                                    target_ratio=4))
    mpolstm.quantize(model).eval()
    assert model.encoder.int8 and model.rnn.int8 and not hasattr(model.decoder, "int8")
    tokens = torch.randint(0, 200, (7, 2))
    loaded = io.load(io.save(model, tmp_path / "m"), TiedLM()).eval()
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))
    assert loaded.decoder.owner is loaded.encoder
    rows = {r["weight"]: r for r in describe_folder(tmp_path / "m")}
    assert set(rows) == {"encoder.weight", *(f"rnn.{w}" for w in model.rnn.mpo_weights())}
    assert {r["stored"] for r in rows.values()} == {"int8"}
    assert rows["encoder.weight"]["bytes"] == sum(c.numel() + 4 * max(c.shape[0], c.shape[3]) for c in model.encoder.cores)


def test_load_quantize_save_keeps_the_errors_recorded_when_the_mpos_were_made(tmp_path):
    """README's block: compress -> save -> load -> quantize -> save; inspect's "error when made" survives."""
    torch.manual_seed(0)
    net, _ = mpolstm.compress(Net(), mpolstm.CompressionConfig(target_modules=["fc", "lstm"], max_bond=4))
    made = {name: {w: r.rel_error for w, r in m.reports.items()} for name, m in (("fc", net.fc), ("lstm", net.lstm))}
    assert all(0 < e < 1 for errors in made.values() for e in errors.values()) and len(made["lstm"]) == 4
    io.save(net, tmp_path / "a")
    loaded = mpolstm.quantize(io.load(tmp_path / "a", base_model=Net()))
    io.save(loaded, tmp_path / "b")
    recorded = json.loads((tmp_path / "b" / io.CONFIG_FILE).read_text())["modules"]
    assert {name: recorded[name]["errors"] for name in made} == made
    standalone = MPOLinear.from_linear(nn.Linear(12, 24), max_bond=2)
    io.save(standalone, tmp_path / "c")
    assert io.load(tmp_path / "c").reports["weight"].rel_error == standalone.reports["weight"].rel_error > 0
