"""Worker for test_vocab_parallel.py (torchrun, gloo, CPU): the vocab-parallel head against the unsharded op.

Every rank builds the same full tensors (same seed), runs the unsharded ``linear_logprobs(impl="chunked")`` as the
yardstick, and the sharded head on its vocabulary rows — through ``linear_logprobs`` with ``Shard(0)`` DTensor
weights, or through ``vocab_parallel_linear_logprobs`` with a local shard, its offset and the world group. The loss
is ``Σ c_t · policy_t`` with random ``c`` so that every token's gradient is weighted differently. Each rank writes
``{case: {...}}`` to ``out/rank{r}.pt``: both sets of streams and gradients (the sharded weight and bias gradients
assembled into full ``[V, d]`` / ``[V]`` by a sum all-reduce of zero-padded shards).
"""

from __future__ import annotations

import os
import sys

if "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"  # CPU: the Triton sweep runs under the interpreter

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from edpo_plugin.ops import LogitTransform, linear_logprobs, vocab_parallel_linear_logprobs
from edpo_plugin.ops.chunked import PlanRequest
from edpo_plugin.ops.collectives import VocabShard
from edpo_plugin.ops.contract import HeadCall, HeadOperands
from edpo_plugin.ops.plan import HeadPlan
from edpo_plugin.ops.vocab_parallel import shard_linear_logprobs

EPS = 0.2
CASES = {
    # name: vocabulary, entry point, head trainable, reference = policy head, bias, transform, labels, sweep, shards
    "dtensor_trainable": dict(vocab=40, entry="dtensor", trainable=True, shared=False, bias=False),
    "dtensor_trainable_bias_softcap": dict(
        vocab=40, entry="dtensor", trainable=True, shared=False, bias=True, transform=(0.7, 5.0)
    ),
    "dtensor_frozen_shared": dict(vocab=40, entry="dtensor", trainable=False, shared=True, bias=False),
    "dtensor_frozen_bias_scale": dict(
        vocab=40, entry="dtensor", trainable=False, shared=False, bias=True, transform=(1.3, None)
    ),
    "dtensor_frozen_softcap": dict(vocab=40, entry="dtensor", trainable=False, shared=False, transform=(1.0, 3.0)),
    "dtensor_frozen_triton_softcap": dict(
        vocab=40, entry="dtensor", trainable=False, shared=True, bias=True, transform=(0.7, 5.0), impl="triton"
    ),
    "dtensor_uneven_37": dict(vocab=37, entry="dtensor", trainable=True, shared=False, bias=True),
    "targets_in_shard0_trainable": dict(vocab=40, entry="dtensor", trainable=True, shared=False, labels="shard0"),
    "targets_in_shard1_frozen": dict(vocab=40, entry="dtensor", trainable=False, shared=False, labels="shard1"),
    "mostly_ignored": dict(vocab=40, entry="dtensor", trainable=True, shared=False, bias=True, labels="mostly_ignored"),
    "all_ignored": dict(vocab=40, entry="dtensor", trainable=True, shared=False, labels="all_ignored"),
    "explicit_uneven_trainable": dict(
        vocab=41, entry="explicit", trainable=True, shared=False, bias=True, split=(29, 12), transform=(0.7, 5.0)
    ),
    "explicit_uneven_frozen_shared": dict(vocab=41, entry="explicit", trainable=False, shared=True, split=(10, 31)),
    "dtensor_trainable_bf16": dict(vocab=40, entry="dtensor", trainable=True, shared=False, bias=True, dtype="bf16"),
    "dtensor_frozen_shared_bf16": dict(vocab=40, entry="dtensor", trainable=False, shared=True, dtype="bf16"),
    # a trainable head under a plan that keeps each shard's P for the backward (the planner picks it on CUDA only)
    "kept_p_uneven_bias": dict(
        vocab=41, entry="explicit", trainable=True, shared=False, bias=True, split=(29, 12), keep_probs="chunked"
    ),
    "kept_p_triton_scale": dict(
        vocab=40,
        entry="explicit",
        trainable=True,
        shared=False,
        split=(20, 20),
        transform=(1.3, None),
        keep_probs="triton",
    ),
}
D, LEAD = 16, (2, 7)


def _full_tensors(cfg: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    vocab = cfg["vocab"]
    t = {
        "h": torch.randn(*LEAD, D, generator=g),
        "hr": torch.randn(*LEAD, D, generator=g),
        "w": torch.randn(vocab, D, generator=g) * 0.7,
        "coef": torch.randn(*LEAD, generator=g),
    }
    t["wr"] = t["w"] if cfg["shared"] else t["w"] + 0.3 * torch.randn(vocab, D, generator=g)
    if cfg.get("bias"):
        t["b"] = torch.randn(vocab, generator=g)
        t["br"] = t["b"] if cfg["shared"] else torch.randn(vocab, generator=g)
    if cfg.get("dtype") == "bf16":
        t = {k: v.to(torch.bfloat16) if k != "coef" else v for k, v in t.items()}
    labels = torch.randint(0, vocab, LEAD, generator=g)
    half = (vocab + 1) // 2  # torch.chunk's first shard
    mode = cfg.get("labels", "random")
    if mode == "shard0":
        labels = torch.randint(0, half, LEAD, generator=g)
    elif mode == "shard1":
        labels = torch.randint(half, vocab, LEAD, generator=g)
    elif mode == "mostly_ignored":
        labels[torch.rand(LEAD, generator=g) < 0.75] = -100
        labels[0, 0] = -100
    elif mode == "all_ignored":
        labels[:] = -100
    else:
        labels[0, 1] = labels[1, 3] = -100
    t["labels"] = labels
    return t


def _run_unsharded(cfg: dict, t: dict) -> dict:
    h = t["h"].clone().requires_grad_()
    w = t["w"].clone().requires_grad_(cfg["trainable"])
    b = t["b"].clone().requires_grad_(cfg["trainable"]) if "b" in t else None
    wr = w if cfg["shared"] else t["wr"]
    br = b if cfg["shared"] else t.get("br")
    out = linear_logprobs(
        h, w, t["labels"], ref_hidden=t["hr"], ref_weight=wr, epsilon=EPS, bias=b, ref_bias=br,
        transform=LogitTransform(*cfg.get("transform", (1.0, None))), impl="chunked", vocab_chunk=8, token_chunk=5,
    )  # fmt: skip
    (out.policy * t["coef"]).sum().backward()
    return _result(out, h.grad, w.grad, None if b is None else b.grad)


def _run_sharded(cfg: dict, t: dict, rank: int, world: int) -> dict:
    vocab = cfg["vocab"]
    h = t["h"].clone().requires_grad_()
    transform = LogitTransform(*cfg.get("transform", (1.0, None)))
    kw = dict(epsilon=EPS, transform=transform, impl=cfg.get("impl", "chunked"), vocab_chunk=8, token_chunk=5)
    if cfg["entry"] == "dtensor":
        mesh = init_device_mesh("cpu", (world,))

        def shard(x: torch.Tensor) -> torch.nn.Parameter:
            return torch.nn.Parameter(distribute_tensor(x, mesh, [Shard(0)]), requires_grad=cfg["trainable"])

        w = shard(t["w"])
        b = shard(t["b"]) if "b" in t else None
        wr = w if cfg["shared"] else shard(t["wr"]).detach()
        br = b if cfg["shared"] else (shard(t["br"]).detach() if "br" in t else None)
        out = linear_logprobs(h, w, t["labels"], ref_hidden=t["hr"], ref_weight=wr, bias=b, ref_bias=br, **kw)
        (out.policy * t["coef"]).sum().backward()
        gw = None if w.grad is None else w.grad.full_tensor()
        gb = None if b is None or b.grad is None else b.grad.full_tensor()
        return _result(out, h.grad, gw, gb)
    bounds = [0]
    for size in cfg["split"]:
        bounds.append(bounds[-1] + size)
    assert bounds[-1] == vocab
    lo, hi = bounds[rank], bounds[rank + 1]
    w = t["w"][lo:hi].clone().requires_grad_(cfg["trainable"])
    b = t["b"][lo:hi].clone().requires_grad_(cfg["trainable"]) if "b" in t else None
    wr = w if cfg["shared"] else t["wr"][lo:hi]
    br = b if cfg["shared"] else (t["br"][lo:hi] if "br" in t else None)
    if cfg.get("keep_probs"):
        impl = cfg["keep_probs"]
        plan = HeadPlan(impl, "trainable", kw["token_chunk"], kw["vocab_chunk"], tensor_cores=False,
                        p_dtype=torch.float32, keep_probs=True, interpreted=impl == "triton")  # fmt: skip
        call = HeadCall(HeadOperands(h, w, b), HeadOperands(t["hr"], wr, br), t["labels"], EPS, transform=transform)
        out = shard_linear_logprobs(call, PlanRequest(plan=plan), VocabShard(lo, None))
    else:
        out = vocab_parallel_linear_logprobs(
            h, w, t["labels"], ref_hidden=t["hr"], ref_weight=wr, bias=b, ref_bias=br, vocab_start=lo, group=None, **kw
        )
    (out.policy * t["coef"]).sum().backward()

    def assembled(local: torch.Tensor | None, full_shape: tuple[int, ...]) -> torch.Tensor | None:
        if local is None:
            return None
        full = torch.zeros(full_shape)
        full[lo:hi] = local
        dist.all_reduce(full)
        return full

    gw = assembled(w.grad, (vocab, D))
    gb = assembled(None if b is None else b.grad, (vocab,))
    return _result(out, h.grad, gw, gb)


def _result(out, grad_h, grad_w, grad_b) -> dict:
    return {
        "streams": torch.stack([s.detach() for s in out]),
        "grad_hidden": grad_h,
        "grad_weight": grad_w,
        "grad_bias": grad_b,
    }


def _bad_offsets_message(rank: int) -> str:
    """Both ranks claim rows [0, 20): every target in them has two owners, every other none."""
    t = _full_tensors(dict(vocab=40, shared=True), seed=99)
    try:
        vocab_parallel_linear_logprobs(
            t["h"], t["w"][:20], t["labels"], ref_hidden=t["hr"], ref_weight=t["w"][:20], epsilon=EPS, vocab_start=0
        )
    except ValueError as err:
        return str(err)
    return ""


def _plain_reference_message(world: int) -> str:
    """A DTensor policy head with a whole (plain) reference head: refused, naming ref_weight."""
    t = _full_tensors(dict(vocab=40, shared=False), seed=98)
    w = distribute_tensor(t["w"], init_device_mesh("cpu", (world,)), [Shard(0)])
    try:
        linear_logprobs(t["h"], w, t["labels"], ref_hidden=t["hr"], ref_weight=t["wr"], epsilon=EPS)
    except ValueError as err:
        return str(err)
    return ""


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for i, (name, cfg) in enumerate(CASES.items()):
        t = _full_tensors(cfg, seed=i)
        results[name] = {"unsharded": _run_unsharded(cfg, t), "sharded": _run_sharded(cfg, t, rank, world)}
        results[name]["labels"] = t["labels"]
        results[name]["vocab"] = cfg["vocab"]
    results["bad_offsets_message"] = _bad_offsets_message(rank)
    results["plain_reference_message"] = _plain_reference_message(world)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
