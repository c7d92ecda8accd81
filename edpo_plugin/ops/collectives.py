"""The vocab-parallel head's two collectives and the merge of per-shard statistics (one named step each).

- forward, :func:`gather_statistics`: one all-gather of ``[STAT_ROWS, M]`` fp32 per rank (``M`` = non-ignored
  tokens): ``(max, log Σ exp(z − max))`` of the four streams (8 rows), the policy and reference target logits (2
  rows, 0 on every rank but the one that owns the target) and an ownership flag (1 row; every target must have
  exactly one owner, else ``ValueError`` on every rank). :func:`merge_statistics` then gives every rank the same
  global statistics: ``max = maxᵣ mᵣ``, ``log Σ = log Σᵣ exp((mᵣ − max) + lᵣ)``.
- backward, :func:`reduce_hidden_grad`: one all-reduce (sum) of the ``[M, d]`` hidden-state gradient, in the hidden
  states' dtype (as Megatron and DTensor's ``Partial → Replicate`` do).

Imports only torch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

# torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

STAT_ROWS = 11  # max ×4, log Σ ×4, policy target, reference target, owner flag


class VocabShard(NamedTuple):
    """This rank's rows of the vocabulary: global id of its first row, and the tensor-parallel process group."""

    start: int
    group: dist.ProcessGroup | None


def gather_statistics(local: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Forward collective: all-gather this rank's fp32 ``[STAT_ROWS, M]`` statistics into ``[R, STAT_ROWS, M]``."""
    world = dist.get_world_size(group)
    out = local.new_empty(world * local.shape[0], local.shape[1])
    if local.numel():  # M is the same on every rank (labels are replicated): all skip together
        _all_gather_single(out, local.contiguous(), group=group)
    return out.view(world, *local.shape)


def reduce_hidden_grad(grad: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Backward collective: sum the ``[M, d]`` hidden-state gradient parts of all vocabulary shards, in place."""
    if grad.numel():
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=group)
    return grad


def merge_statistics(gathered: torch.Tensor):
    """``[R, 11, M]`` → global ``max [4, M]``, ``log Σ [4, M]`` and the policy / reference target logits ``[M]``."""
    part_max, part_logsum = gathered[:, 0:4], gathered[:, 4:8]
    owners = gathered[:, 10].sum(0)
    if not torch.all(owners == 1.0):
        bad = (owners != 1.0).nonzero().squeeze(1)[:5].tolist()
        raise ValueError(
            f"Vocabulary shards must cover every target exactly once; targets at valid rows {bad} have "
            f"{owners[bad].tolist()} owners (check each rank's vocab_start, and that no label lies outside the "
            "vocabulary)."
        )
    g_max = part_max.amax(0)
    finite_max = torch.where(torch.isfinite(g_max), g_max, torch.zeros_like(g_max))
    g_logsum = torch.exp((part_max - finite_max) + part_logsum).sum(0).log_()
    # exactly one rank holds a non-zero target, so the sum is exact
    return g_max, g_logsum, gathered[:, 8].sum(0), gathered[:, 9].sum(0)
