"""Matmul-equivalents per head path, counted by running each path under a dispatch mode that sees every mm variant
(scripts/count_matmuls.py), and the modelled cost (scripts/roofline.py, the code's own loops on the meta device)
counting the same work with CUDA's GEMM policy: no fp32 GEMM on bf16 inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = (64, 32, 2048)


def _run(script: str, tmp_path, *args: str) -> object:
    out = tmp_path / f"{script}.json"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, os.path.join(REPO, "scripts", f"{script}.py"), "--json", str(out), *args],
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    return _run("count_matmuls", tmp_path_factory.mktemp("count"))


@pytest.fixture(scope="module")
def modelled(tmp_path_factory):
    return _run("roofline", tmp_path_factory.mktemp("roofline"), "--shape", ",".join(map(str, SMALL)))["rows"]


def test_fused_paths_do_3_and_5_matmul_equivalents(counted):
    for r in counted:
        if r["impl"] in ("chunked", "triton"):
            want = 3 if r["head"] == "frozen" else 5
            assert r["total"] == pytest.approx(want, abs=0.01), r  # + the [N, d] target dot products


def test_the_cost_model_counts_what_the_code_runs(counted, modelled):
    """The roofline's flops (meta device, CUDA policy, bf16) = the matmul-equivalents the real code dispatches."""
    n, d, vocab = SMALL
    unit = 2 * n * d * vocab / 1e12
    for impl in ("naive", "chunked", "triton"):
        for head in ("frozen", "trainable"):
            real = next(r for r in counted if (r["impl"], r["head"], r["dtype"]) == (impl, head, "bfloat16"))
            row = next(r for r in modelled if (r["path"], r["head"], r["gpu"]) == (impl, head, "H100"))
            assert (row["tc_tflop"] + row["simt_tflop"]) == pytest.approx(real["total"] * unit, rel=0.02, abs=0.01)


def test_no_fp32_gemm_on_bf16_inputs_on_cuda(tmp_path):
    """At the 8B shape, the engine's paths put all their GEMM work on tensor cores (bf16 operands, fp32 out)."""
    rows = json.loads(open(os.path.join(REPO, "docs", "roofline.json")).read())["rows"]
    for r in rows:
        if r["path"] in ("auto", "chunked", "triton"):
            assert r["simt_tflop"] == 0 and r["tc_tflop"] > 0, r
