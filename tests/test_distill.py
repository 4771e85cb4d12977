"""mpolstm.distill: the loss goes down, interrupted runs resume to the same weights, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mpolstm import CompressionConfig, compress
from mpolstm.distill import distill, distillation_loss


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(8, 32, batch_first=True)
        self.head = nn.Linear(32, 6)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def _setup():
    torch.manual_seed(0)
    teacher = Classifier()
    student, _ = compress(copy.deepcopy(teacher), CompressionConfig(target_modules=["lstm"], target_ratio=8))
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(16, 10, 8, generator=gen) for _ in range(4)]
    return teacher, student, batches


def test_distill_lowers_the_loss():
    teacher, student, batches = _setup()
    result = distill(student, teacher, batches, steps=60, lr=3e-3)
    assert result.steps == 60 and len(result.losses) == 60
    assert sum(result.losses[-8:]) / 8 < 0.5 * sum(result.losses[:4]) / 4
    assert teacher.training and student.training  # modes restored


def test_interrupted_distillation_resumes_to_the_same_weights(tmp_path):
    teacher, student, batches = _setup()
    straight = copy.deepcopy(student)
    full = distill(straight, teacher, batches, steps=12, checkpoint=tmp_path / "a.safetensors", checkpoint_every=5)
    first = distill(student, teacher, batches, steps=7, checkpoint=tmp_path / "b.safetensors", checkpoint_every=5)
    assert len(first.losses) == 7
    resumed = copy.deepcopy(student)
    with torch.no_grad():  # the resumed run must read the weights from the checkpoint, not keep these
        for p in resumed.parameters():
            p.add_(1.0)
    second = distill(resumed, teacher, batches, steps=12, checkpoint=tmp_path / "b.safetensors", checkpoint_every=5)
    assert second.losses == full.losses
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_mse_loss_and_bad_input():
    teacher, student, batches = _setup()
    assert distill(student, teacher, batches, steps=3, loss="mse").losses[0] > 0
    x, y = torch.randn(4, 6), torch.randn(4, 6)
    assert float(distillation_loss(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(x, y)) > 0
    for kwargs, message in (({"steps": 0}, "steps must be a positive integer"),
                            ({"steps": 2, "loss": "ce"}, "loss must be one of"),
                            ({"steps": 2, "lr": -1.0}, "lr must be a positive number")):
        with pytest.raises(ValueError, match=message):
            distill(student, teacher, batches, **kwargs)
    with pytest.raises(ValueError, match="re-iterable"):
        distill(student, teacher, iter(batches), steps=2)
    with pytest.raises(ValueError, match="yielded nothing"):
        distill(student, teacher, [], steps=2)
    with pytest.raises(ValueError, match="differ"):
        distillation_loss(torch.randn(2, 3), torch.randn(2, 4))
