import os
import shutil
import tempfile

import pytest
import torch
from hypothesis import settings
from torch import nn

# The data cache of this test session: a fresh folder, never the user's ~/.cache/mpolstm (subprocesses
# inherit it); removed when the session ends.
_CACHE = tempfile.mkdtemp(prefix="mpolstm-test-cache-")
os.environ["MPOLSTM_CACHE"] = _CACHE


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE, ignore_errors=True)


# Derandomized by default, so every machine runs the same examples; HYPOTHESIS_PROFILE=explore draws new ones.
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
settings.register_profile("explore", max_examples=40, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def kernels(monkeypatch):
    """The product kernels the MPO layers run, in order: "cores" (contraction through the chain),
    "halves" (the eval cache's merged halves) and "rebuild" (a dense weight formed from the cores)."""
    from mpolstm import mpo

    calls = []
    split, halves, rebuild = mpo.split_matmul, mpo.halves_matmul, mpo.cores_to_matrix
    monkeypatch.setattr(mpo, "split_matmul", lambda x, cores, at: calls.append("cores") or split(x, cores, at))
    monkeypatch.setattr(mpo, "halves_matmul", lambda x, prepared: calls.append("halves") or halves(x, prepared))
    monkeypatch.setattr(mpo, "cores_to_matrix",
                        lambda cores, transpose=False: calls.append("rebuild") or rebuild(cores, transpose))
    return calls


@pytest.fixture
def force_path(monkeypatch):
    """force_path(path) makes the cost model pick ``path`` ("cores", "halves" or "dense") for every
    product of the MPO layers (a 2-core chain stands for the merged halves)."""
    from mpolstm import mpo

    def force(path: str) -> None:
        def fake_cost(rows, cores, weight_cached=False):
            is_half = len(cores) == 2
            return {"cores": 0.0 if path == ("halves" if is_half else "cores") else 1.0,
                    "rebuild": 0.5 if path == "dense" else 2.0}

        monkeypatch.setattr(mpo, "matmul_cost", fake_cost)

    return force


@pytest.fixture
def param_grads_match():
    """check(ref, m) after backward through torch's module ``ref`` and its full-bond MPO twin ``m``:
    every bias gets torch's gradient, and every core gets torch's dL/dW pulled back through the rebuild."""
    def check(ref, m) -> None:
        for name, param in ref.named_parameters():
            if name.startswith("bias"):
                assert torch.allclose(getattr(m, name).grad, param.grad, atol=1e-10), name
            else:
                cores = list(getattr(m, f"{name}_cores"))
                expected = torch.autograd.grad(m._rebuild(name), cores, grad_outputs=param.grad)
                for core, want in zip(cores, expected, strict=True):
                    assert torch.allclose(core.grad, want, atol=1e-10), name
    return check


class LSTMTagger(nn.Module):
    """The small model most tests compress: a batch-first LSTM ``lstm`` and a Linear ``head`` on its
    outputs at every step, or at the last one only (``last``)."""

    def __init__(self, inputs: int = 8, hidden: int = 16, outputs: int = 4, last: bool = False) -> None:
        super().__init__()
        self.lstm = nn.LSTM(inputs, hidden, batch_first=True)
        self.head = nn.Linear(hidden, outputs)
        self.last = last

    def forward(self, x):
        out = self.lstm(x)[0]
        return self.head(out[:, -1] if self.last else out)


@pytest.fixture
def lstm_tagger():
    """:class:`LSTMTagger`, the class: ``lstm_tagger(inputs, hidden, outputs, last=...)`` builds one."""
    return LSTMTagger
