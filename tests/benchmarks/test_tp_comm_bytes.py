"""``benchmarks/tp_comm_bytes.py``'s byte counts against what gloo really writes to its sockets on 2 CPU ranks.

At a small shape (N = 256, V = 1000, d = 64, fp32) each rank's ``wchar`` (``/proc/self/io``) around each path's
collectives must equal the formula plus gloo's message headers (a few hundred bytes per collective; ≤ 1 kB here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "tp_comm_bytes.py"


def test_formula_matches_gloo_bytes(tmp_path):
    if not Path("/proc/self/io").exists():
        import pytest

        pytest.skip("needs /proc/self/io (Linux)")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = tmp_path / "measure.json"
    cmd = [*launcher, str(SCRIPT), "--measure", "--json", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    measured, formula = result["measured"], result["formula"]
    assert measured.keys() == formula.keys()
    for path, expected in formula.items():
        assert expected <= measured[path] <= expected + 1024, (path, measured[path], expected)
    # the point of the exercise, already at this small shape
    assert measured["vocab_parallel_forward"] * 50 < measured["gathered_logits_forward"]
