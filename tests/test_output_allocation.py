"""Output-aware allocation (compression/output_aware.py) and the sequential refit (compression/refit.py)."""

import copy

import pytest
import torch
from torch import nn

from mpolstm import CompressionConfig, compress
from mpolstm.compression.output_aware import calibration_outputs, relative_output_error


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(12, 24, batch_first=True)
        self.head = nn.Linear(24, 6)

    def forward(self, x):
        return self.head(self.lstm(x)[0])


def _trained_like(model: nn.Module) -> nn.Module:
    """Give the weights decaying spectra, as trained weights have (random ones are flat)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                u, s, vh = torch.linalg.svd(p, full_matrices=False)
                p.copy_((u * (s * torch.logspace(0, -1.5, s.numel()))) @ vh * 3)
    return model


def test_output_allocation_is_never_worse_than_uniform_or_per_matrix_on_calibration_data():
    torch.manual_seed(0)
    model = _trained_like(Tagger())
    batches = [torch.randn(8, 10, 12) for _ in range(3)]
    reference = calibration_outputs(model, batches)
    small, report = compress(copy.deepcopy(model), CompressionConfig(target_ratio=4, allocation="output"),
                             calibration=batches)
    choice = report.allocation
    assert set(choice.errors) == {"per-matrix error", "uniform", "output sensitivity"}
    assert choice.errors[choice.chosen] == min(choice.errors.values())
    assert choice.errors[choice.chosen] <= choice.errors["uniform"]
    assert report.mpo_params <= report.dense_params / 4
    measured = relative_output_error(small, batches, reference)  # the compressed model, as returned
    assert measured == pytest.approx(choice.errors[choice.chosen], rel=1e-3, abs=1e-6)
    assert "allocation: " + choice.chosen in str(report) and report.to_dict()["allocation"]["chosen"] == choice.chosen


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


def test_bad_allocation_input_is_refused():
    with pytest.raises(ValueError, match="allocation must be one of"):
        CompressionConfig(target_ratio=4, allocation="sensitivity")
    with pytest.raises(ValueError, match="give target_ratio or max_params"):
        CompressionConfig(max_bond=4, allocation="output")
    with pytest.raises(ValueError, match="refit must be True or False"):
        CompressionConfig(max_bond=4, refit="yes")
    model = Tagger()
    with pytest.raises(ValueError, match="give calibration="):
        compress(model, CompressionConfig(target_ratio=4, allocation="output"))
    with pytest.raises(ValueError, match="does not apply to layout 'lowrank\\+sparse'"):
        compress(model, CompressionConfig(target_ratio=4, refit=True, layout="lowrank+sparse"),
                 calibration=[torch.randn(2, 5, 12)])
