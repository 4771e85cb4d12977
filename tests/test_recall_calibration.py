"""The recall model of issue 32: Embedding(32, 64) -> 2-layer nn.LSTM 256 -> Linear, trained to output the
token seen 3 steps earlier. Its first W_ih sees 32 distinct inputs (little energy, all the information): the
per-matrix calibrated allocation cuts it and is worse on unseen data than the uncalibrated one. The default
calibrated compress must not be worse than uncalibrated beyond noise, and must report its output error."""

import copy

import pytest
import torch
from torch import nn

from mpolstm import CompressionConfig, compress


class Recall(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 64)
        self.lstm = nn.LSTM(64, 256, 2, batch_first=True)
        self.head = nn.Linear(256, 32)

    def forward(self, x):
        return self.head(self.lstm(self.embed(x))[0])


def _data(gen: torch.Generator, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, 32, (rows, 24), generator=gen)
    return x, torch.roll(x, 3, 1)


@pytest.fixture(scope="module")
def recall() -> nn.Module:
    torch.manual_seed(0)
    gen, model = torch.Generator().manual_seed(0), Recall()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(600):
        x, y = _data(gen, 32)
        loss = nn.functional.cross_entropy(model(x)[:, 3:].reshape(-1, 32), y[:, 3:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("ratio", [5, 10])
def test_default_calibrated_compress_is_not_worse_than_uncalibrated_on_unseen_data(recall, ratio):
    gen = torch.Generator().manual_seed(1)
    calibration = [_data(gen, 32)[0] for _ in range(8)]
    unseen, labels = _data(torch.Generator().manual_seed(99), 256)
    with torch.no_grad():
        reference = recall(unseen)
        assert float((reference.argmax(-1)[:, 3:] == labels[:, 3:]).float().mean()) > 0.99

    def unseen_error(calibration, allocation):
        small, report = compress(copy.deepcopy(recall), CompressionConfig(target_ratio=ratio, allocation=allocation),
                                 calibration=calibration)
        with torch.no_grad():
            return float((small(unseen) - reference).norm() / reference.norm()), report

    plain, plain_report = unseen_error(None, "error")
    old, _ = unseen_error(calibration, "per-matrix")
    new, report = unseen_error(calibration, "error")
    assert old > plain * 1.02  # the failure: per-matrix calibrated allocation is worse than none
    assert new <= plain * 1.02  # the default is not worse than uncalibrated beyond noise
    assert report.allocation.chosen != "per-matrix error"
    check = report.output_check
    assert check.source == "held-out calibration batches" and check.batches == 4  # weight error: nothing redone
    assert abs(check.error - new) <= 0.25 * new  # the reported model error holds on unseen data
    assert plain_report.output_check.source == "synthetic-input estimate"
    assert "warning: compressed" in str(plain_report) and "not measured on your inputs" in str(plain_report)
