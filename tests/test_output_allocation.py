"""Output-aware allocation (compression/output_aware.py) and the sequential refit (compression/refit.py)."""

import copy

import pytest
import torch
from torch import nn

from mpolstm import CompressionConfig, compress
from mpolstm.compression.checks import batch_errors, batch_outputs, paired_advantage
from mpolstm.compression.engine import _output_errors
from mpolstm.compression.output_aware import _decide, calibration_outputs, relative_output_error


def _trained_like(model: nn.Module) -> nn.Module:
    """Give the weights decaying spectra, as trained weights have (random ones are flat)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                u, s, vh = torch.linalg.svd(p, full_matrices=False)
                p.copy_((u * (s * torch.logspace(0, -1.5, s.numel()))) @ vh * 3)
    return model


def test_output_allocation_is_never_beaten_beyond_noise_on_held_out_calibration_data(lstm_tagger):
    torch.manual_seed(0)
    model = _trained_like(lstm_tagger(12, 24, 6))
    batches = [torch.randn(8, 10, 12) for _ in range(8)]
    held_out = batches[1::2]  # the odd-numbered batches decide; the even ones measure the sensitivities
    reference = calibration_outputs(model, held_out)
    small, report = compress(copy.deepcopy(model), CompressionConfig(target_ratio=4, allocation="output"),
                             calibration=batches)
    choice = report.allocation
    assert list(choice.errors) == ["uniform", "weight error", "per-matrix error", "output sensitivity"]
    assert (choice.fit_batches, choice.held_out_batches) == (4, 4)
    best = min(choice.errors, key=choice.errors.get)
    assert choice.chosen == best or choice.errors[best] < choice.errors[choice.chosen]
    assert report.mpo_params <= report.dense_params / 4
    # the report gives the held-out error of the fit on the even batches (the one decided on) ...
    check = report.output_check
    assert check.error == pytest.approx(choice.errors[choice.chosen], rel=1e-9)
    assert check.source.startswith("held-out calibration batches (by the fit on the other 4") and check.batches == 4
    assert "redone on all 8, same sizes" in str(report) and f"model output error: {check.error:.4f}" in str(report)
    # ... and the model written is that fit redone on all 8 batches: no worse on the 4 it now also saw
    measured = relative_output_error(small, held_out, reference) ** 0.5
    assert measured <= check.error * 1.02
    assert "allocation: " + choice.chosen in str(report) and report.to_dict()["allocation"]["chosen"] == choice.chosen


def test_the_paired_test_decides_on_consistent_gains_and_not_on_noise():
    """Per-batch (squared error, squared norm) pairs: a 10% gain on every batch decides with 3 batches; a
    larger mean gain that flips sign between batches does not, and says how many batches would."""
    base = [(1.0, 1.0), (2.0, 1.0), (0.5, 1.0)]
    steady = [(n * 0.81, d) for n, d in base]  # 10% lower relative error on every batch
    assert paired_advantage(base, steady) == (True, None)
    noisy = [(n * f, d) for (n, d), f in zip(base, (0.2, 1.5, 0.6))]
    better, need = paired_advantage(base, noisy)
    assert not better and need > 3
    assert paired_advantage(base[:2], steady[:2]) == (False, 3)  # two batches never decide
    assert paired_advantage(steady, base) == (False, None)  # worse: nothing would decide for it
    # the per-matrix allocation is the incumbent: another replaces it only when better beyond noise
    assert _decide({"uniform": base, "per-matrix error": steady}, 3) == ("per-matrix error", "")
    assert _decide({"uniform": steady, "per-matrix error": base}, 3) == ("uniform", "")
    assert _decide({"uniform": base, "weight error": steady, "per-matrix error": base}, 3) == ("weight error", "")
    lower = [(n * 0.5, d) if k == 0 else (n, d) for k, (n, d) in enumerate(base)]  # lower in total, on one batch
    chosen, note = _decide({"uniform": lower, "per-matrix error": base}, 3)
    assert chosen == "per-matrix error" and "uniform was" in note and "within the noise of 3" in note
    chosen, note = _decide({"uniform": steady[:2], "per-matrix error": base[:2]}, 2)
    assert chosen == "per-matrix error" and "too little held-out data to decide (2 batches" in note


class TwoBranches(nn.Module):
    """y = A x + B x with A's outputs 30 times larger: the output error is A's, although the two
    weights are the same size (the per-matrix objective weighs their relative errors alike)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x):
        return self.a(x) + self.b(x)


def _two_branches() -> nn.Module:
    torch.manual_seed(2)
    model = _trained_like(TwoBranches())
    with torch.no_grad():
        model.a.weight.mul_(30)
    return model


def test_output_allocation_moves_the_budget_to_the_weight_the_output_depends_on_and_holds_on_new_data():
    model = _two_branches()
    batches = [torch.randn(64, 32) for _ in range(6)]
    fresh = [torch.randn(64, 32) for _ in range(4)]  # never seen by compress
    reference = calibration_outputs(model, fresh)
    config = CompressionConfig(target_ratio=4, layout="lowrank", allocation="per-matrix")
    default, _ = compress(copy.deepcopy(model), config, calibration=batches)
    config.allocation = "output"
    small, report = compress(copy.deepcopy(model), config, calibration=batches)
    assert report.allocation.chosen == "output sensitivity"
    ranks = {m.name: m.weights["weight"].bond_dims[0] for m in report.modules}
    assert ranks["a"] > ranks["b"] and report.mpo_params <= report.dense_params / 4
    assert relative_output_error(small, fresh, reference) < 0.7 * relative_output_error(default, fresh, reference)


def test_with_too_few_held_out_batches_the_per_matrix_allocation_is_kept_and_the_report_says_so():
    model = _two_branches()
    batches = [torch.randn(64, 32) for _ in range(4)]  # two held out: too few to decide
    default, _ = compress(copy.deepcopy(model), CompressionConfig(target_ratio=4, layout="lowrank",
                                                                  allocation="per-matrix"), calibration=batches)
    small, report = compress(copy.deepcopy(model), CompressionConfig(target_ratio=4, layout="lowrank",
                                                                     allocation="output"), calibration=batches)
    assert report.allocation.chosen == "per-matrix error" and report.allocation.errors == {}
    assert "not decided: too little held-out data (at least 3 held-out batches" in str(report)
    assert report.allocation.held_out_batches == 2 and report.output_check.batches == 2
    for name in ("a", "b"):
        for p, q in zip(small.get_submodule(name).parameters(), default.get_submodule(name).parameters()):
            assert torch.equal(p, q)


def test_output_allocation_and_refit_treat_the_hybrid_like_any_layout():
    model = _two_branches()
    batches = [torch.randn(64, 32) for _ in range(4)]
    reference = calibration_outputs(model, batches)
    errors = {}
    for refit in (False, True):
        config = CompressionConfig(target_ratio=4, layout="lowrank+sparse", sparse_share=0.5, allocation="output",
                                   refit=refit)
        small, report = compress(copy.deepcopy(model), config, calibration=batches)
        assert report.mpo_params <= report.dense_params / 4 and report.allocation is not None
        assert all(w.layout == "lowrank+sparse" and w.sparse_params > 0 for m in report.modules
                   for w in m.weights.values())
        errors[refit] = relative_output_error(small, batches, reference)
    assert errors[True] <= errors[False] * 1.01


def test_refit_lowers_the_output_error_of_the_last_layer():
    torch.manual_seed(1)
    model = _trained_like(nn.Sequential(nn.Linear(16, 48), nn.Tanh(), nn.Linear(48, 10)))
    batches = [torch.randn(64, 16) for _ in range(4)]
    reference = calibration_outputs(model, batches)
    errors = {}
    for refit in (False, True):
        config = CompressionConfig(layout="lowrank", max_bond=3, refit=refit)
        small, _ = compress(copy.deepcopy(model), config, calibration=batches)
        errors[refit] = relative_output_error(small, batches, reference)
    assert errors[True] < errors[False]


def test_bad_allocation_input_is_refused(lstm_tagger):
    with pytest.raises(ValueError, match="allocation must be one of"):
        CompressionConfig(target_ratio=4, allocation="sensitivity")
    with pytest.raises(ValueError, match="give target_ratio or max_params"):
        CompressionConfig(max_bond=4, allocation="output")
    with pytest.raises(ValueError, match="refit must be True or False"):
        CompressionConfig(max_bond=4, refit="yes")
    model = lstm_tagger(12, 24, 6)
    with pytest.raises(ValueError, match="give calibration="):
        compress(model, CompressionConfig(target_ratio=4, allocation="output"))
    with pytest.raises(ValueError, match="give at least 2 batches"):
        compress(model, CompressionConfig(target_ratio=4, allocation="output"), calibration=[torch.randn(2, 5, 12)])
    with pytest.raises(ValueError, match="not one callable"):
        compress(model, CompressionConfig(target_ratio=4, allocation="output"), calibration=lambda m: m(
            torch.randn(2, 5, 12)))


def test_the_output_check_reuses_the_decisions_measurements_only_when_the_first_batch_agrees(lstm_tagger):
    torch.manual_seed(1)
    model = lstm_tagger(12, 24, 6)
    batches = [torch.randn(4, 7, 12) for _ in range(4)]
    reference = batch_outputs(model, batches)
    with torch.no_grad():
        model.head.weight.mul_(0.9)  # the "compressed" model
    true = batch_errors(model, batches, reference)
    marked = {0: true[0], 2: (123.0, 1.0)}  # batch 2 as the decision measured it (a marker value)
    assert _output_errors(model, batches, reference, marked) == [true[0], true[1], (123.0, 1.0), true[3]]
    wrong = {0: (true[0][0] * 1.1, true[0][1]), 2: (123.0, 1.0)}  # the first batch disagrees: all run again
    assert _output_errors(model, batches, reference, wrong) == true
    assert _output_errors(model, batches, reference, {}) == true
