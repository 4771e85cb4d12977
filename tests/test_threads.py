"""Shared cores (issue 27, item 8): the mpolstm command sets OMP_WAIT_POLICY=PASSIVE before torch starts
(unless the user set it) and takes --threads; torch's spinning OpenMP threads otherwise make every
command 20-100x slower while another process holds a core."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = r"""
import os, sys
import mpolstm.harness
assert "torch" not in sys.modules, "importing the entry point imported torch"
sys.argv = ["mpolstm", *sys.argv[1:]]
try:
    mpolstm.harness.main()
except SystemExit as exc:
    code = exc.code
import torch
print(os.environ.get("OMP_WAIT_POLICY"), torch.get_num_threads(), code)
"""


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    return subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=300,
                          env={**base, **env})


def test_the_command_sets_a_passive_wait_policy_before_torch_unless_the_user_chose():
    proc = _run("--threads", "1", "decompose", "--size", "8", "--num-cores", "2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "PASSIVE 1 0"
    proc = _run("decompose", "--size", "8", "--num-cores", "2", OMP_WAIT_POLICY="ACTIVE")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1].startswith("ACTIVE ")


def test_threads_below_one_is_one_error_line():
    proc = _run("--threads", "0", "decompose")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["error: --threads must be >= 1, got 0"] and proc.stdout.split()[-1] == "2"
