"""One answer on any machine: the allocation (layouts and bonds) of the same weights is the same for 1, 2 and
4 threads and with ATEN_CPU_CAPABILITY=avx2, uncalibrated and calibrated (one subprocess per setting)."""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, sys, torch
from torch import nn
from mpolstm import CompressionConfig, compress
torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
model = nn.Sequential(nn.Embedding(32, 24), nn.LSTM(24, 48, 2, batch_first=True))
with torch.no_grad():  # decaying spectra, as trained weights have
    for p in model.parameters():
        if p.dim() == 2:
            u, s, vh = torch.linalg.svd(p, full_matrices=False)
            p.copy_((u * (s * torch.logspace(0, -2, s.numel()))) @ vh)
gen = torch.Generator().manual_seed(1)
batches = [torch.randint(0, 32, (8, 12), generator=gen) for _ in range(4)]
answer = {}
for calibration in (None, batches):
    for ratio in (2, 5, 10, 30):
        config = CompressionConfig(target_ratio=ratio, allocation="per-matrix")
        small, report = compress(__import__("copy").deepcopy(model), config, calibration=calibration)
        answer[f"{calibration is not None} {ratio}"] = [[m.name, w, r.layout, list(r.bond_dims)]
                                                       for m in report.modules for w, r in m.weights.items()]
print(json.dumps(answer))
"""


def _answer(threads: int, capability: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    env["OMP_NUM_THREADS"] = str(threads)
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(threads)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_allocations_are_identical_for_every_thread_count_and_cpu_capability():
    first = _answer(1, None)
    assert len(first) == 8 and all(first.values())
    for threads, capability in ((2, None), (4, None), (1, "avx2"), (2, "avx2")):
        assert _answer(threads, capability) == first, (threads, capability)
