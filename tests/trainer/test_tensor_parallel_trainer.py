"""A 3-step ε-DPO run of the tiny Llama under transformers' ``tp_plan="auto"`` on 2 CPU ranks (gloo) matches the
1-process run of the whole model: loss, β, s̄ and grad norm of every step, and every parameter after training.

accelerate 1.13 configures tensor parallelism only on GPU ranks; the worker checks the trainer's explanation of that
refusal, then counts CPU ranks as devices (a test-only shim, see ``tp_trainer_worker.py``) so that the rest of the
GPU path runs: no DDP wrapper, TP-aware data loading, mixed DTensor / plain gradient clipping, and the optimizer.

Tolerances (tests/numerics.py): the TP run sums the hidden gradient over two vocabulary shards and the attention/MLP
gradients over two head/feature shards, so its gradients differ from the whole model's by fp32 rounding (~1e-7
relative); Adam's normalised update passes that on to the weights, hence ``TRAINED_RTOL`` on losses, grad norms and
parameter norms. β moves only through the decisions, which must be identical: ``FLOAT64_TOL``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.numerics import FLOAT64_TOL, TRAINED_RTOL

WORKER = Path(__file__).resolve().parents[1] / "workers" / "tp_trainer_worker.py"


def _run(tiny: dict, out: Path, world: int) -> list[dict]:
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    launcher = [sys.executable]
    if world > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
    cmd = [*launcher, str(WORKER), str(tiny["model"]), str(tiny["train"]), str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    return [json.loads((out / f"result-rank{r}.json").read_text()) for r in range(world)]


def test_tp_plan_auto_run_matches_one_process(tiny_default, tmp_path):
    (single,) = _run(tiny_default, tmp_path / "w1", 1)
    ranks = _run(tiny_default, tmp_path / "w2", 2)
    assert any(a != 0 for a in single["avg_steps"]), "the run should move β"
    assert single["grad_norms"][0] > 0.5, "max_grad_norm=0.5 should clip at least the first step"
    for tp in ranks:
        assert tp["lm_head_type"] == "DTensor"
        assert tp["model_class"] == "LlamaForCausalLM", "no DDP (or other) wrapper around a tensor-parallel model"
        assert "accelerate 1.13 configures tensor parallelism" in tp["accelerate_refusal"]
        assert "Set optim='adamw_torch'" in tp["fused_refusal"]
        assert tp["betas"] == pytest.approx(single["betas"], rel=FLOAT64_TOL)
        assert tp["avg_steps"] == pytest.approx(single["avg_steps"], abs=FLOAT64_TOL)
        assert tp["final_beta"] == pytest.approx(single["final_beta"], rel=FLOAT64_TOL)
        assert tp["losses"] == pytest.approx(single["losses"], rel=TRAINED_RTOL)
        assert tp["grad_norms"] == pytest.approx(single["grad_norms"], rel=TRAINED_RTOL)
        assert tp["param_norms"].keys() == single["param_norms"].keys()
        for name, norm in single["param_norms"].items():
            assert tp["param_norms"][name] == pytest.approx(norm, rel=TRAINED_RTOL), name
