"""Tolerance mode (compression/tolerance.py) and the model output error without data (compression/checks.py)."""

import copy

import pytest
import torch
from torch import nn

from mpolstm import CompressionConfig, compress


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(12, 32, batch_first=True)
        self.head = nn.Linear(32, 6)

    def forward(self, x):
        return self.head(self.lstm(x)[0])


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = Tagger()
    with torch.no_grad():  # decaying spectra, as trained weights have
        for p in model.parameters():
            if p.dim() == 2:
                u, s, vh = torch.linalg.svd(p, full_matrices=False)
                p.copy_((u * (s * torch.logspace(0, -1.5, s.numel()))) @ vh * 3)
    return model


def test_max_output_error_keeps_the_largest_ratio_tried_within_it():
    model, batches = _model(), [torch.randn(8, 10, 12) for _ in range(8)]
    before = [p.clone() for p in model.parameters()]
    small, report = compress(model, CompressionConfig(max_output_error=0.1), calibration=batches)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # a copy is returned
    check = report.output_check
    assert check.error <= check.upper_bound() <= 0.1  # the 90% upper bound over the held-out batches holds
    errors = dict(report.curve)
    assert len(errors) >= 3 and any(e > 0.1 for e in errors.values())  # the search went past the tolerance
    kept = next(r for r, e in errors.items() if e == pytest.approx(check.error, rel=1e-9))
    assert report.ratio >= kept * 0.98
    for ratio in (r for r in errors if r > kept):  # every larger ratio tried misses the bound
        _, larger = compress(copy.deepcopy(model), CompressionConfig(target_ratio=ratio), calibration=batches)
        assert larger.output_check.upper_bound() > 0.1
    assert "tolerance: kept" in str(report) and "90% upper bound" in report.tolerance and report.to_dict()["curve"]


def test_evaluate_with_max_drop_uses_the_users_metric():
    model, batches = _model(), [torch.randn(8, 10, 12) for _ in range(4)]
    data = torch.randn(16, 10, 12)
    with torch.no_grad():
        reference = model(data)

    def metric(m):  # higher is better: minus the relative output error on the user's data
        with torch.no_grad():
            return -float((m(data) - reference).norm() / reference.norm())

    small, report = compress(model, CompressionConfig(), calibration=batches, evaluate=metric, max_drop=0.05)
    assert metric(small) >= -0.05
    assert any(v < -0.05 for _, v in report.curve)


def test_tolerance_mode_refuses_what_it_cannot_measure():
    model = _model()
    with pytest.raises(ValueError, match="give calibration= batches"):
        compress(model, CompressionConfig(max_output_error=0.1))
    with pytest.raises(ValueError, match="max_output_error finds the budget itself"):
        CompressionConfig(max_output_error=0.1, target_ratio=4)
    with pytest.raises(ValueError, match="max_output_error must be a positive number"):
        CompressionConfig(max_output_error=-1)
    with pytest.raises(ValueError, match="go together"):
        compress(model, CompressionConfig(), calibration=[torch.randn(2, 5, 12)], evaluate=lambda m: 1.0)


def test_a_tolerance_no_ratio_misses_keeps_the_smallest_model_rather_than_refusing():
    """max_output_error above the error of every bond 1: the ratios past the smallest model are not tried
    as failures of the user's size (before: "raise max_params or lower target_ratio", neither given)."""
    model, batches = _model(), [torch.randn(8, 10, 12) for _ in range(8)]
    small, report = compress(model, CompressionConfig(max_output_error=5.0), calibration=batches)
    assert "larger ratios ask for less than the smallest model" in report.tolerance
    assert report.ratio > 16 and report.output_check.upper_bound() <= 5.0


def test_validation_without_calibration_is_measured_on_the_users_data_and_not_warned_about():
    model = _model()
    _, report = compress(copy.deepcopy(model), CompressionConfig(target_ratio=8),
                         validation=[torch.randn(4, 10, 12) for _ in range(4)])
    assert report.output_check.source == "validation batches" and "warning" not in str(report)


def test_without_data_the_report_gives_a_synthetic_estimate_and_warns_from_3x():
    model = _model()
    data = [torch.randn(4, 32, 12) for _ in range(4)]
    with torch.no_grad():
        reference = [model(x) for x in data]
    small, report = compress(copy.deepcopy(model), CompressionConfig(target_ratio=4))
    check = report.output_check
    assert check.source == "synthetic-input estimate" and check.batches == 4
    with torch.no_grad():
        num = sum(float((small(x) - r).pow(2).sum()) for x, r in zip(data, reference))
        den = sum(float(r.pow(2).sum()) for r in reference)
    assert check.error == pytest.approx((num / den) ** 0.5, rel=0.3)  # random normal inputs like the seeded ones
    text = str(report)
    assert "synthetic-input estimate" in text and "warning: compressed" in text
    _, mild = compress(copy.deepcopy(model), CompressionConfig(target_ratio=2))
    assert "warning" not in str(mild) and mild.output_check is not None


def test_the_upper_bound_grows_with_the_spread_of_the_batches():
    from mpolstm.compression.checks import OutputCheck

    steady = OutputCheck(0.1, 4, "held-out calibration batches", (0.1, 0.1, 0.1, 0.1))
    spread = OutputCheck(0.1, 4, "held-out calibration batches", (0.05, 0.15, 0.08, 0.12))
    assert steady.upper_bound() == pytest.approx(0.1)
    assert spread.upper_bound() > 0.1 * 1.1  # t(3) = 1.638 times the log errors' standard error
    assert OutputCheck(0.1, 1, "calibration batch", (0.1,)).upper_bound() == 0.1  # nothing to spread
