"""Every Triton kernel of the head, compiled ahead of time for sm_80 and sm_90 at its default block sizes and the
launch's specialisation (scripts/kernel_report.py; no GPU needed), is spill-free, fits the architecture's shared
memory and uses that architecture's tensor-core MMA with cp.async pipelining."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from edpo_plugin.ops import triton_available

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # conftest sets it for CPU runs
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, os.path.join(REPO, "scripts", "kernel_report.py"), "--only", "defaults", "--jobs", "2",
           "--json", str(out)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())["rows"]


def test_every_default_kernel_compiles_for_both_architectures(rows):
    kernels = {"_head_forward_kernel", "_direction_kernel", "_direction_epilogue_kernel", "_logit_grad_kernel"}
    for arch in ("sm_80", "sm_90"):
        assert {r["kernel"] for r in rows if r["arch"] == arch} == kernels
    assert len(rows) == 12  # 6 bf16 variants × 2 architectures


def test_no_spills_and_shared_memory_fits(rows):
    for r in rows:
        where = f"{r['arch']} {r['variant']}"
        assert r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0, f"{where}: spills {r}"
        assert r["stack_bytes"] == 0, f"{where}: stack frame {r['stack_bytes']} bytes"
        assert r["shared_fits"], f"{where}: {r['shared_bytes']} bytes of shared memory"
        assert r["registers"] <= 255 and r["blocks_per_sm"] >= 1


def test_matmul_kernels_use_the_architectures_tensor_cores_with_cp_async(rows):
    for r in rows:
        if r["kernel"] == "_direction_epilogue_kernel":  # elementwise merge, no dot
            continue
        assert r["mma"] == {"sm_90": "wgmma", "sm_80": "mma.sync"}[r["arch"]], r
        assert r["cp_async"], r
