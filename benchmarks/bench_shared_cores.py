"""The README's Python block on shared cores: quiet against a competing CPU load, per thread setting.

    python benchmarks/bench_shared_cores.py                      # every setting, 1 quiet + 1 loaded run each
    python benchmarks/bench_shared_cores.py --settings passive,passive-1 --out results/bench_shared_cores.json

The block (README.md, the one ```python fence, as tests/test_readme.py runs it) runs in a fresh Python
process in a temporary folder, once on the quiet machine and once while ``--hogs`` other processes
(default: one per core) each spin a pure-Python busy loop (``while True: pass``), started a second before.
Settings (the environment of the block's process):

- ``spin``: torch's default, OMP_WAIT_POLICY unset (its OpenMP threads spin while they wait);
- ``passive``: OMP_WAIT_POLICY=PASSIVE (what the ``mpolstm`` command sets), one thread per core;
- ``passive-1``: OMP_WAIT_POLICY=PASSIVE and OMP_NUM_THREADS=1 (``mpolstm --threads 1``).

Prints wall seconds quiet and loaded and their ratio per setting, and writes them as JSON. Run it under
the CPU lock on an otherwise idle machine (the quiet runs must be quiet).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"spin": {}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
            "passive-1": {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}}


def readme_block() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    if len(blocks) != 1:
        raise SystemExit(f"README.md has {len(blocks)} python blocks, expected 1")
    return blocks[0]


def run_block(script: Path, env: dict[str, str], timeout: float) -> float:
    """Wall seconds of one run of the block in a fresh process (in its own temporary folder)."""
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(script)], cwd=folder, env={**base, **env}, capture_output=True,
                              text=True, timeout=timeout)
        seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"the README block failed:\n{proc.stderr[-2000:]}")
    return seconds


def with_load(hogs: int, fn):
    """``fn()`` while ``hogs`` processes spin a busy loop."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(hogs)]
    try:
        time.sleep(1.0)
        return fn()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {list(SETTINGS)}")
    parser.add_argument("--hogs", type=int, default=os.cpu_count() or 2, help="busy-loop processes (default: cores)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before a loaded run is given up")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_shared_cores.json")
    args = parser.parse_args()
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise SystemExit(f"unknown --settings {unknown}; choose from {list(SETTINGS)}")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "readme_block.py"
        script.write_text(readme_block())
        for name in settings:
            quiet = run_block(script, SETTINGS[name], args.timeout)
            try:
                loaded = with_load(args.hogs, lambda: run_block(script, SETTINGS[name], args.timeout))
            except subprocess.TimeoutExpired:
                loaded = float("inf")
            rows.append({"setting": name, "env": SETTINGS[name], "quiet_s": quiet, "loaded_s": loaded,
                         "ratio": loaded / quiet})
            print(f"{name:10s} quiet {quiet:7.1f} s   loaded {loaded:7.1f} s   {loaded / quiet:6.1f}x", flush=True)
    doc = {"hogs": args.hogs, "cores": os.cpu_count(), "load": "pure-Python busy loops, one process each",
           "rows": rows, "command": " ".join(sys.argv)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
