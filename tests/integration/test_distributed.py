"""Two CPU processes (torchrun, gloo) hold the same β after every step and match the one-process run, under the
Trainer's DDP and under DeepSpeed ZeRO-3 (every parameter partitioned, lm_head included); one step with the models
sharded by FSDP2 or FSDP1 equals the unsharded step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).resolve().parents[1] / "workers" / "dist_worker.py"


def _torchrun(world: int, script: Path, *script_args: str) -> None:
    # --standalone: the launcher binds its rendezvous store to a free port itself (no find-then-bind race)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    done = subprocess.run([*launcher, str(script), *script_args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]


def _launch(tiny: dict, out: Path, world: int, engine: str = "ddp", train_file: Path | None = None) -> list[dict]:
    out.mkdir()
    _torchrun(world, WORKER, str(tiny["model"]), str(train_file or tiny["train"]), str(out), str(world), engine)
    return [json.loads((out / f"result-rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def single_process(tiny_default, tmp_path_factory) -> dict:
    (single,) = _launch(tiny_default, tmp_path_factory.mktemp("dist") / "w1", 1)
    return single


def _initial_param_norms(model_dir: Path) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return {name: p.detach().double().norm().item() for name, p in model.named_parameters()}


@pytest.mark.parametrize("engine", ["ddp", "zero3"])
def test_two_ranks_share_beta_and_match_one_process(tiny_default, tmp_path, single_process, engine):
    single = single_process
    ranks = _launch(tiny_default, tmp_path / "w2", 2, engine)
    assert any(a != 0 for a in single["avg_steps"]), "the run should move β"
    # every rank holds the same β after every optimizer step (the logged β is the one before each update)
    assert ranks[0]["betas"] == ranks[1]["betas"]
    assert ranks[0]["final_beta"] == ranks[1]["final_beta"]
    # and the trajectory is the one-process run's, for the same global batch and data order
    assert ranks[0]["betas"] == pytest.approx(single["betas"], rel=1e-6)
    assert ranks[0]["avg_steps"] == pytest.approx(single["avg_steps"], abs=1e-6)
    assert ranks[0]["final_beta"] == pytest.approx(single["final_beta"], rel=1e-6)
    assert ranks[0]["losses"] == pytest.approx(single["losses"], rel=1e-4)
    # the weights trained the same way: every parameter's norm (lm_head's too) after 4 steps, and they moved
    before = _initial_param_norms(tiny_default["model"])
    assert ranks[0]["param_norms"].keys() == single["param_norms"].keys() == before.keys()
    for name, norm in single["param_norms"].items():
        assert ranks[0]["param_norms"][name] == pytest.approx(norm, rel=1e-5), name
    assert single["param_norms"]["lm_head.weight"] != pytest.approx(before["lm_head.weight"], rel=1e-4)


def test_two_ranks_padding_free_match_one_padded_process(tiny_default, tmp_path):
    """DDP on 2 ranks, each packing its own micro-batch (rows of varied lengths), against one padded process: the
    same β after every step, the same decisions, losses and trained weights."""
    from tests.varied_rows import write_varied_rows

    data = write_varied_rows(tiny_default["train"], 16, tmp_path / "varied.jsonl")
    (padded,) = _launch(tiny_default, tmp_path / "w1", 1, "ddp", train_file=data)
    ranks = _launch(tiny_default, tmp_path / "w2", 2, "ddp+padding_free", train_file=data)
    assert any(a != 0 for a in padded["avg_steps"]), "the run should move β"
    assert ranks[0]["betas"] == ranks[1]["betas"] == pytest.approx(padded["betas"], rel=1e-6)
    assert ranks[0]["avg_steps"] == pytest.approx(padded["avg_steps"], abs=1e-12)
    assert ranks[0]["final_beta"] == pytest.approx(padded["final_beta"], rel=1e-6)
    assert ranks[0]["losses"] == pytest.approx(padded["losses"], rel=1e-4)
    for name, norm in padded["param_norms"].items():
        assert ranks[0]["param_norms"][name] == pytest.approx(norm, rel=1e-5), name


def _launch_fsdp(tiny: dict, out: Path, world: int, layout: str) -> dict:
    out.mkdir()
    _torchrun(world, WORKER.with_name("fsdp_worker.py"), str(tiny["model"]), str(tiny["train"]), str(out), layout)
    return torch.load(out / "result.pt")


@pytest.fixture(scope="module")
def fsdp_unsharded(tiny_default, tmp_path_factory) -> dict:
    return _launch_fsdp(tiny_default, tmp_path_factory.mktemp("fsdp") / "w1", 1, "none")


@pytest.mark.parametrize("layout", ["fsdp2", "fsdp2_head_unit", "fsdp1", "fsdp1_head_unit"])
def test_fsdp_sharded_step_matches_unsharded(tiny_default, tmp_path, fsdp_unsharded, layout):
    """Policy (per layer, lm_head alone for ``*_head_unit``, root) and reference (root) sharded by FSDP2 — or both
    wrapped per layer and at the root by FSDP1 — over 2 ranks: lm_head, embeddings and norm are shards outside their
    unit's forward. One loss + backward + β update equals the unsharded 1-process step."""
    single = fsdp_unsharded
    sharded = _launch_fsdp(tiny_default, tmp_path / "w2", 2, layout)
    assert single["avg_steps"] != 0, "the step should move β"
    assert float(sharded["loss"]) == pytest.approx(float(single["loss"]), rel=1e-6)
    assert sharded["avg_steps"] == pytest.approx(single["avg_steps"], abs=1e-12)
    assert sharded["beta"] == pytest.approx(single["beta"], rel=1e-12)
    assert sharded["grads"].keys() == single["grads"].keys()
    for name, grad in single["grads"].items():
        assert grad.norm() > 0, name
        torch.testing.assert_close(sharded["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)
