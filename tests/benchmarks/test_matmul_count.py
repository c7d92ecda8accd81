"""Matmul-equivalents per head path, counted by running each path under a dispatch mode that sees every mm variant
(benchmarks/count_matmuls.py): 3 for a frozen head, 5 for a trainable head that recomputes its tiles, 4 for one whose
plan keeps P; the modelled GPU plans (benchmarks/results/roofline.json: the planner's own launch lists, which
test_plan.py checks against what the engine dispatches) do the same work with CUDA's GEMM policy: no fp32 GEMM on bf16
inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    out = tmp_path_factory.mktemp("count") / "count.json"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "count_matmuls.py"), "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_fused_paths_do_3_and_5_matmul_equivalents(counted):
    seen = set()
    for r in counted:
        if r["impl"] in ("chunked", "triton"):
            want = 3 if r["head"] == "frozen" else 5
        elif r["impl"].endswith("(kept P)"):
            want = 4
        else:
            continue
        seen.add(r["impl"])
        assert r["total"] == pytest.approx(want, abs=0.01), r  # + the [N, d] target dot products
    assert seen == {"chunked", "triton", "chunked (kept P)", "triton (kept P)"}


def test_modelled_plans_do_the_same_matmul_equivalents_on_tensor_cores():
    """At the 8B shape every ε-DPO plan's GEMM work is 3 (frozen), 5 (recomputing) or 4 (keeping P)
    matmul-equivalents, all of it on tensor cores (bf16 operands, fp32 output)."""
    doc = json.loads(open(os.path.join(REPO, "benchmarks", "results", "roofline.json")).read())
    unit = 2 * doc["shape"]["n"] * doc["shape"]["d"] * doc["shape"]["vocab"] / 1e12
    for r in doc["rows"]:
        if r["path"] in ("auto", "chunked", "triton", "triton-1024x4096", "triton-recompute"):
            want = 3 if r["head"] == "frozen" else (4 if "keeps P" in r["plan"] else 5)
            assert r["tc_tflop"] == pytest.approx(want * unit, abs=0.01), r
            assert r["simt_tflop"] == 0, r
