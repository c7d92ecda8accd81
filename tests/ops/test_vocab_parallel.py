"""The vocab-parallel head on 2 CPU ranks (torchrun, gloo) against two yardsticks: the unsharded op on the same full
tensors, and megatron-core's ``vocab_parallel_cross_entropy`` on the same shards.

Tolerances (``tests/numerics.py``, with their arithmetic): streams to ``STREAM_TOL`` per entry; gradients to
``SHARDED_GRAD_TOL[dtype] · max|reference|`` per entry (fp32: the same sums in another order; bf16: two bf16-rounded
halves summed in bf16 where the unsharded gradient is rounded once).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.numerics import SHARDED_GRAD_TOL, STREAM_TOL

WORKERS = Path(__file__).resolve().parents[1] / "workers"


def _torchrun(world: int, script: Path, *args: str) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRITON_INTERPRET="1")
    done = subprocess.run([*launcher, str(script), *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]


def _ranks(script: str, out: Path, world: int = 2) -> list[dict]:
    _torchrun(world, WORKERS / script, str(out))
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


def _close_grad(actual: torch.Tensor | None, expected: torch.Tensor | None, what: str) -> None:
    assert (actual is None) == (expected is None), what
    if expected is not None:
        rtol = SHARDED_GRAD_TOL[expected.dtype]
        atol = rtol * max(expected.abs().max().item(), 1e-6)
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=what)


@pytest.fixture(scope="module")
def op_ranks(tmp_path_factory) -> list[dict]:
    return _ranks("vocab_parallel_worker.py", tmp_path_factory.mktemp("vocab_parallel"))


OP_CASES = [
    "dtensor_trainable",
    "dtensor_trainable_bias_softcap",
    "dtensor_frozen_shared",
    "dtensor_frozen_bias_scale",
    "dtensor_frozen_softcap",
    "dtensor_frozen_triton_softcap",
    "dtensor_uneven_37",
    "targets_in_shard0_trainable",
    "targets_in_shard1_frozen",
    "mostly_ignored",
    "all_ignored",
    "explicit_uneven_trainable",
    "explicit_uneven_frozen_shared",
    "dtensor_trainable_bf16",
    "dtensor_frozen_shared_bf16",
    "kept_p_uneven_bias",
    "kept_p_triton_scale",
]


@pytest.mark.parametrize("case", OP_CASES)
def test_vocab_parallel_matches_unsharded_op(op_ranks, case):
    """Streams and gradients (hidden; weight and bias when trainable) of the 2-shard head equal the unsharded op's,
    on both ranks; the two ranks hold bit-identical streams and hidden gradients."""
    for rank, results in enumerate(op_ranks):
        res = results[case]
        sharded, unsharded = res["sharded"], res["unsharded"]
        torch.testing.assert_close(sharded["streams"], unsharded["streams"], rtol=0, atol=STREAM_TOL)
        ignored = res["labels"] == -100
        assert torch.all(sharded["streams"][:, ignored] == 0)
        for key in ("grad_hidden", "grad_weight", "grad_bias"):
            _close_grad(sharded[key], unsharded[key], f"{case} rank {rank} {key}")
        if not ignored.all():
            assert unsharded["grad_hidden"].abs().max() > 0
        assert torch.all(sharded["grad_hidden"][ignored] == 0)
    r0, r1 = (r[case]["sharded"] for r in op_ranks)
    assert torch.equal(r0["streams"], r1["streams"])
    assert torch.equal(r0["grad_hidden"], r1["grad_hidden"])


def test_targets_are_where_the_case_says(op_ranks):
    """The one-shard cases really put every target in one shard (rows [0, 20) or [20, 40))."""
    for case, lo, hi in (("targets_in_shard0_trainable", 0, 20), ("targets_in_shard1_frozen", 20, 40)):
        labels = op_ranks[0][case]["labels"]
        assert torch.all((labels >= lo) & (labels < hi)), case


def test_overlapping_shards_are_refused(op_ranks):
    """Both ranks claiming rows [0, 20): every rank raises, naming the ownership problem."""
    for results in op_ranks:
        assert "must cover every target exactly once" in results["bad_offsets_message"]


def test_plain_reference_with_sharded_policy_is_refused(op_ranks):
    for results in op_ranks:
        message = results["plain_reference_message"]
        assert "ref_weight must be a DTensor sharded like the policy lm_head weight" in message


def test_policy_stream_matches_megatron_core(tmp_path):
    """Our policy stream equals minus megatron-core's vocab_parallel_cross_entropy on the same shards (with and
    without a scale + soft cap), and so do the gradients of h (Megatron: through copy_to_tensor_model_parallel_region),
    of this rank's weight rows and of its bias slice."""
    pytest.importorskip("megatron.core")
    for rank, results in enumerate(_ranks("megatron_peer_worker.py", tmp_path)):
        for case, res in results.items():
            ours, megatron = res["ours"], res["megatron"]
            torch.testing.assert_close(ours["logp"], megatron["logp"], rtol=0, atol=STREAM_TOL)
            for key in ("grad_h", "grad_w", "grad_b"):
                assert megatron[key].abs().max() > 0
                _close_grad(ours[key], megatron[key], f"{case} rank {rank} {key}")


def test_tp_plan_auto_llama_head_matches_whole_model(tiny_default, tmp_path):
    """A tiny Llama loaded with ``tp_plan="auto"`` on 2 ranks: ``lm_head.weight`` is a ``Shard(0)`` DTensor, the
    decoder hands the head plain (replicated) hidden states, and ``linear_logprobs`` on the TP weights gives the
    whole model's four streams, its own ``log_softmax(logits)`` at the labels (policy and reference), and the
    gradients of lm_head, the final norm, the embeddings, a colwise and two rowwise projections."""
    _torchrun(2, WORKERS / "tp_model_worker.py", str(tiny_default["model"]), str(tmp_path))
    for rank in range(2):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        layout = res["layout"]
        assert layout["lm_head_type"] == "DTensor" and layout["lm_head_placements"] == ["S(0)"]
        assert layout["lm_head_local_rows"] * 2 == layout["vocab"]
        tp, whole = res["tp"], res["whole"]
        assert tp["hidden_is_plain"]
        torch.testing.assert_close(tp["streams"], whole["streams"], rtol=0, atol=STREAM_TOL)
        torch.testing.assert_close(tp["streams"][0], whole["own_policy"], rtol=0, atol=STREAM_TOL)
        torch.testing.assert_close(tp["streams"][1], whole["own_ref"], rtol=0, atol=STREAM_TOL)
        assert not torch.equal(whole["streams"][0], whole["streams"][1]), "the reference should differ"
        for name, grad in whole["grads"].items():
            assert grad.abs().max() > 0, name
            _close_grad(tp["grads"][name], grad, f"rank {rank} {name}")
