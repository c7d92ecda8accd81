"""Every Triton kernel of the head (the tile fold in each of its forms, both backward folds, the target logits and the
direction's finish), compiled ahead of time for sm_80 and sm_90 with the launch's block sizes and the specialisation
of a full tile of the 8B shape's plan (benchmarks/kernel_report.py; no GPU needed), is spill-free and fits the
architecture's shared memory and registers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from edpo_plugin.ops import triton_available

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # conftest sets it for CPU runs
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "kernel_report.py"), "--jobs", "2", "--json", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())["rows"]


KERNELS = {"_fold_kernel", "_grad_fold_kernel", "_grad_probs_kernel", "_target_kernel", "_finish_kernel"}


def test_every_kernel_compiles_for_both_architectures(rows):
    for arch in ("sm_80", "sm_90"):
        assert {r["kernel"] for r in rows if r["arch"] == arch} == KERNELS
    assert len(rows) == 54  # 9 variants × 3 dtypes × 2 architectures


def test_every_triton_kernel_of_the_head_is_reported():
    from edpo_plugin.ops import triton_fold

    jitted = {name for name in dir(triton_fold) if name.startswith("_") and name.endswith("_kernel")}
    assert jitted == KERNELS


def test_no_spills_and_resources_fit(rows):
    for r in rows:
        where = f"{r['arch']} {r['dtype']} {r['variant']}"
        assert r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0, f"{where}: spills {r}"
        assert r["stack_bytes"] == 0, f"{where}: stack frame {r['stack_bytes']} bytes"
        assert r["shared_fits"], f"{where}: {r['shared_bytes']} bytes of shared memory"
        assert r["registers"] <= 255 and r["blocks_per_sm"] >= 1
