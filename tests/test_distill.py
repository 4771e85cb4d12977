"""mpolstm.distill: the loss goes down, interrupted runs resume to the same weights, bad input."""

from __future__ import annotations

import copy

import pytest
import torch

from mpolstm import CompressionConfig, compress
from mpolstm.distill import distill, distillation_loss


def _setup(model_class):
    torch.manual_seed(0)
    teacher = model_class(8, 32, 6, last=True)
    student, _ = compress(copy.deepcopy(teacher), CompressionConfig(target_modules=["lstm"], target_ratio=8))
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(16, 10, 8, generator=gen) for _ in range(4)]
    return teacher, student, batches


def test_distill_lowers_the_loss(lstm_tagger):
    teacher, student, batches = _setup(lstm_tagger)
    result = distill(student, teacher, batches, steps=60, lr=3e-3)
    assert result.steps == 60 and len(result.losses) == 60
    assert sum(result.losses[-8:]) / 8 < 0.5 * sum(result.losses[:4]) / 4
    assert teacher.training and student.training  # modes restored


def test_interrupted_distillation_resumes_to_the_same_weights(tmp_path, lstm_tagger):
    teacher, student, batches = _setup(lstm_tagger)
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


def test_mse_loss_and_bad_input(lstm_tagger):
    teacher, student, batches = _setup(lstm_tagger)
    assert distill(student, teacher, batches, steps=3, loss="mse").losses[0] > 0
    x, y = torch.randn(4, 6), torch.randn(4, 6)
    assert float(distillation_loss(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(x, y)) > 0
    for kwargs, message in (({"steps": 0}, "steps must be a positive integer"),
                            ({"steps": 2, "loss": "hinge"}, "loss must be one of"),
                            ({"steps": 2, "schedule": "linear"}, "schedule must be one of"),
                            ({"steps": 2, "hidden_weight": -1.0}, "hidden_weight must be a number"),
                            ({"steps": 2, "lr": -1.0}, "lr must be a positive number")):
        with pytest.raises(ValueError, match=message):
            distill(student, teacher, batches, **kwargs)
    with pytest.raises(ValueError, match="re-iterable"):
        distill(student, teacher, iter(batches), steps=2)
    with pytest.raises(ValueError, match="yielded nothing"):
        distill(student, teacher, [], steps=2)
    with pytest.raises(ValueError, match="differ"):
        distillation_loss(torch.randn(2, 3), torch.randn(2, 4))


def test_hidden_state_matching_lowers_its_loss():
    from mpolstm import CompressionConfig, compress
    from mpolstm.distill import _Hidden, hidden_state_loss

    torch.manual_seed(0)

    class Seq(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = torch.nn.GRU(8, 32, batch_first=True)
            self.out = torch.nn.Linear(32, 10)

        def forward(self, x):
            return self.out(self.gru(x)[0])

    teacher = Seq()
    x = torch.randn(16, 12, 8)
    student, _ = compress(copy.deepcopy(teacher), CompressionConfig(target_modules=["gru"], target_ratio=8))

    def hidden_gap() -> float:
        hooks = (_Hidden(student, ["gru"], "student"), _Hidden(teacher, ["gru"], "teacher"))
        with torch.no_grad():
            student(x), teacher(x)
        gap = float(hidden_state_loss(hooks[0].take(), hooks[1].take()))
        for h in hooks:
            h.remove()
        return gap

    before = hidden_gap()
    result = distill(student, teacher, [x], steps=40, lr=3e-3, hidden=["gru"], schedule="cosine", clip_grad_norm=1.0)
    assert len(result.hidden_losses) == 40 and result.hidden_losses[0] == pytest.approx(before, rel=1e-4)
    assert hidden_gap() < 0.7 * before
    assert not student.gru._forward_hooks and not teacher.gru._forward_hooks  # hooks removed
    with pytest.raises(ValueError, match="has no submodule"):
        distill(student, teacher, [x], steps=1, hidden=["decoder"])
    with pytest.raises(ValueError, match="clip_grad_norm must be"):
        distill(student, teacher, [x], steps=1, clip_grad_norm=0)


def test_ce_loss_is_the_cross_entropy_against_the_teacher_argmax():
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    expected = torch.nn.functional.cross_entropy(s, t.argmax(-1))
    assert float(distillation_loss(s, t, "ce")) == pytest.approx(float(expected))
