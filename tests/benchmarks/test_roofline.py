"""benchmarks/roofline.py prints the planner's plans under the per-kernel model: the committed
benchmarks/results/roofline.json is what the code models today, ``auto`` is the planner's choice and meets issue 23's
bar against TRL's chunked DPO head (same model), no GEMM is modelled faster than the GPU's published best-shape rate,
and the model's constants reproduce the anchors they were taken from."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from edpo_plugin.ops import cost_model as C
from edpo_plugin.ops import dispatch
from edpo_plugin.ops import dispatch as D
from edpo_plugin.ops import launches as L
from edpo_plugin.ops import plan as P

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMITTED = json.loads(open(os.path.join(REPO, "benchmarks", "results", "roofline.json")).read())
OURS = ("auto", "triton", "chunked", "triton-1024x4096", "triton-recompute")


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    out = tmp_path_factory.mktemp("roofline") / "r.json"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "roofline.py"), "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def _row(rows, gpu, path, head):
    return next(r for r in rows if (r["gpu"], r["path"], r["head"]) == (gpu, path, head))


def test_committed_rows_are_what_the_code_models(fresh):
    assert fresh["model"] == COMMITTED["model"] == "per-kernel" and fresh["constants"] == COMMITTED["constants"]
    for r in fresh["rows"]:
        if r["path"] in OURS + ("trl-chunked-dpo", "naive"):
            assert _row(COMMITTED["rows"], r["gpu"], r["path"], r["head"]) == r


def test_auto_is_the_planners_choice_and_no_slower_than_any_plan_shown():
    for gpu_key, gpu in C.GPUS.items():
        for head in ("frozen", "trainable"):
            shape = P.HeadShape(tokens=8192, valid=8192, dim=4096, vocab=128256, head=head, shared=head == "frozen")
            best = D.best_plan(shape, ("triton", "chunked"), gpu, P.DEFAULT_WORKSPACE_MB * 2**20)
            auto = _row(COMMITTED["rows"], gpu_key, "auto", head)
            assert auto["plan"] == best.describe()
            assert auto["workspace_gib"] * 2**30 <= P.DEFAULT_WORKSPACE_MB * 2**20
            for r in COMMITTED["rows"]:
                if r["gpu"] == gpu_key and r["head"] == head and r["path"] in OURS:
                    assert auto["ms"] <= r["ms"], r


@pytest.mark.parametrize("gpu", ["H100", "A100"])
def test_auto_beats_trl_chunked_head_under_the_same_model(gpu):
    """Issue 23: frozen ≤ 0.8×, trainable ≤ 1.0× TRL 1.16's chunked DPO head, each in ≤ 150 launches (8B shape)."""
    for head, bar in (("frozen", 0.8), ("trainable", 1.0)):
        auto = _row(COMMITTED["rows"], gpu, "auto", head)
        trl = _row(COMMITTED["rows"], gpu, "trl-chunked-dpo", head)
        assert auto["model"] == trl["model"] == "per-kernel"
        assert auto["ms"] <= bar * trl["ms"], (head, auto["ms"], trl["ms"])
        assert auto["launches"] <= 150, (head, auto["launches"])


def test_no_gemm_faster_than_the_published_best_shape_rate():
    for r in COMMITTED["rows"]:
        if r["max_gemm_efficiency"] is not None:
            assert r["max_gemm_efficiency"] <= C.GPUS[r["gpu"]].best_gemm, r
    for gpu in C.GPUS.values():
        for flops in (1e6, 1e9, 3.4e10, 1e11, 4e11, 1e12, 1e14):
            for c_read in (0, 2**24, 2**30):
                assert 0 < C.gemm_efficiency(flops, c_read, gpu) <= gpu.best_gemm


def test_model_reproduces_its_anchors():
    """Issue 23 / the brief: a one-wave [1024 × 4096]·[4096 × 4096] GEMM with fp32 output at 0.70 of an H100's peak,
    0.63 when it also accumulates into C (its 16 MiB of fp32 C read, exposed), 0.78 from 0.4 TFLOP; a streaming kernel
    at 0.85 of HBM bandwidth plus 4 µs; a host sync 20 µs."""
    h100 = C.GPUS["H100"]
    flops = 2 * 1024 * 4096 * 4096
    assert C.gemm_efficiency(flops, 0, h100) == pytest.approx(0.70)
    assert C.gemm_efficiency(flops, 1024 * 4096 * 4, h100) == pytest.approx(0.63, abs=0.005)
    assert C.gemm_efficiency(0.5e12, 0, h100) == pytest.approx(0.78)
    copy = C.Kernel("t", "copy", "torch", bytes=10**9)
    assert C.kernel_seconds(copy, h100) == pytest.approx(1e9 / (0.85 * 3.35e12) + 4e-6)
    assert C.kernel_seconds(C.Kernel("t", "item", "sync"), h100) == pytest.approx(20e-6)


def test_cpu_keeps_its_measured_tiles():
    shape = P.HeadShape(tokens=2048, valid=2048, dim=256, vocab=128256, dtype=torch.float32, head="trainable")
    plan = dispatch.choose_plan(shape, torch.device("cpu"), "auto")
    assert (plan.impl, plan.token_chunk, plan.vocab_chunk, plan.keep_probs) == ("chunked", *P.CPU_TILES, False)
    assert not plan.tensor_cores


def test_cuda_auto_fits_the_workspace_budget(monkeypatch):
    """On CUDA the planner's choice fits ``workspace_mb``; a budget too small for any plan gets the smallest one."""
    monkeypatch.setattr(dispatch, "_triton_usable", lambda device, dtype: True)
    cuda = torch.device("cuda", 0)  # planning only inspects the device
    shape = P.HeadShape(tokens=8192, valid=8192, dim=4096, vocab=128256, head="trainable", shared=False)
    for budget_mb in (8192, 4096, 1024, 512):
        plan = dispatch.choose_plan(shape, cuda, "auto", workspace_mb=budget_mb)
        assert L.workspace_bytes(plan, shape) <= budget_mb * 2**20, (budget_mb, plan)
    tiny = dispatch.choose_plan(shape, cuda, "auto", workspace_mb=1)
    assert L.workspace_bytes(tiny, shape) == min(
        L.workspace_bytes(p, shape) for p in D.candidates(shape, ("triton", "chunked"), True)
    )
    big = dispatch.choose_plan(shape, cuda, "auto", workspace_mb=8192)
    assert big.keep_probs and not dispatch.choose_plan(shape, cuda, "auto", workspace_mb=1024).keep_probs
    # explicit tiles and fold are kept; the planner picks the rest
    fixed = dispatch.choose_plan(shape, cuda, "chunked", token_chunk=1024, vocab_chunk=4096)
    assert (fixed.impl, fixed.token_chunk, fixed.vocab_chunk) == ("chunked", 1024, 4096)


def test_a_committed_measurement_calibrates_the_model(tmp_path):
    """The calibration hook: a bench_head_gpu.json's measured GEMM efficiencies replace the table for that GPU only
    (here a made-up measurement at 5/7 of the table), in the model and in ``roofline.py --calibration``."""
    h100, a100 = C.GPUS["H100"], C.GPUS["A100"]
    measurement = {"calibration": {"gpu": h100.name, "gemm_efficiency": [[2 * 1024 * 4096 * 4096, 0.5], [0.4e12, 0.6]]}}
    cal = C.calibrated(measurement)
    assert C.gemm_efficiency(2 * 1024 * 4096 * 4096, 0, h100, cal) == pytest.approx(0.5)
    gemm = C.Kernel("t", "gemm", "gemm", flops=10**12, bytes=10**9, tensor_cores=True)
    assert C.kernel_seconds(gemm, h100, cal) == pytest.approx(1e12 / (0.6 * 989e12) + 4e-6)
    assert C.kernel_seconds(gemm, a100, cal) == C.kernel_seconds(gemm, a100)  # another GPU's measurement: unused
    path = tmp_path / "bench_head_gpu.json"
    path.write_text(json.dumps({"meta": measurement, "rows": []}))
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "benchmarks", "roofline.py"),
            "--calibration",
            str(path),
            "--json",
            str(tmp_path / "r.json"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    auto = _row(rows, "H100", "auto", "frozen")
    assert auto["calibrated_ms"] > auto["ms"] and "calibrated_ms" not in _row(rows, "A100", "auto", "frozen")
