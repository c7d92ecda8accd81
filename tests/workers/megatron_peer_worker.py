"""Worker for test_vocab_parallel.py (torchrun, gloo, CPU): our policy stream against megatron-core's
``vocab_parallel_cross_entropy`` on the same vocabulary shards.

megatron-core's tensor-parallel group comes from ``parallel_state.initialize_model_parallel(tensor_model_parallel_size
=world)`` on the gloo world; its shard of rank ``r`` is rows ``[r·V/R, (r+1)·V/R)`` (equal shards). Megatron receives
this rank's logits ``T(h W_rᵀ + b_r)`` (the logit transform is elementwise, so it is applied per shard) as
``[s, b, V/R]`` and returns ``lse − z[y]``; ours must give ``−`` that, and the same gradients of ``h``, ``W_r`` and
``b_r`` for the loss ``Σ c · log p`` (Megatron's hidden gradient is summed over the group by
``copy_to_tensor_model_parallel_region`` in front of its column-parallel head, as in ``ColumnParallelLinear``).
Each rank writes ``out/rank{r}.pt``.
"""

from __future__ import annotations

import sys
import warnings

import torch
import torch.distributed as dist

from edpo_plugin.ops import LogitTransform, vocab_parallel_linear_logprobs

SEQ, BATCH, D, VOCAB, EPS = 6, 3, 16, 48, 0.2


def _case(transform: LogitTransform, rank: int, world: int, group) -> dict:
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, vocab_parallel_cross_entropy

    g = torch.Generator().manual_seed(7)
    h0 = torch.randn(SEQ, BATCH, D, generator=g)
    w0 = torch.randn(VOCAB, D, generator=g) * 0.7
    b0 = torch.randn(VOCAB, generator=g)
    labels = torch.randint(0, VOCAB, (SEQ, BATCH), generator=g)
    coef = torch.randn(SEQ, BATCH, generator=g)
    part = VOCAB // world
    lo, hi = rank * part, (rank + 1) * part

    def leaves():
        return (
            h0.clone().requires_grad_(),
            w0[lo:hi].clone().requires_grad_(),
            b0[lo:hi].clone().requires_grad_(),
        )

    h, w, b = leaves()
    # Megatron's column-parallel lm_head: its input enters the tensor-parallel region through copy_to (identity
    # forward, all-reduce of the hidden gradient in backward); its output is this rank's logits [s, b, V/R] only.
    logits = transform.apply(torch.nn.functional.linear(copy_to_tensor_model_parallel_region(h), w, b))
    megatron_loss = vocab_parallel_cross_entropy(logits, labels)
    (-megatron_loss * coef).sum().backward()
    megatron = {"logp": -megatron_loss.detach(), "grad_h": h.grad, "grad_w": w.grad, "grad_b": b.grad}

    h, w, b = leaves()
    out = vocab_parallel_linear_logprobs(
        h, w, labels, ref_hidden=h.detach(), ref_weight=w.detach(), bias=b, ref_bias=b.detach(), epsilon=EPS,
        vocab_start=lo, group=group, transform=transform, impl="chunked", vocab_chunk=8, token_chunk=5,
    )  # fmt: skip
    (out.policy * coef).sum().backward()
    ours = {"logp": out.policy.detach(), "grad_h": h.grad, "grad_w": w.grad, "grad_b": b.grad}
    return {"megatron": megatron, "ours": ours}


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    with warnings.catch_warnings():  # no Transformer Engine / Apex on CPU
        warnings.simplefilter("ignore")
        from megatron.core import parallel_state

    rank, world = dist.get_rank(), dist.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    group = parallel_state.get_tensor_model_parallel_group()
    assert parallel_state.get_tensor_model_parallel_rank() == rank
    results = {
        "plain": _case(LogitTransform(), rank, world, group),
        "scale_softcap": _case(LogitTransform(0.7, 5.0), rank, world, group),
    }
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
