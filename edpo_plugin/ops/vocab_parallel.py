"""Vocab-parallel ε-DPO head (Megatron style): each rank holds rows ``[start, start + V_r)`` of ``lm_head``, and only
per-token statistics cross the process group, never logits.

Every rank holds the same hidden states and labels (replicated, as in a tensor-parallel model after its final norm)
and sweeps its own vocabulary shard with the tile engine (:mod:`edpo_plugin.ops.engine`, PyTorch or Triton fold), after
the model's logit transform (scale, soft cap: elementwise, so per shard). The communication, one named step each:

- forward, :func:`_gather_statistics`: one all-gather of ``[11, M]`` fp32 per rank (``M`` = non-ignored tokens):
  ``(max, log Σ exp(z − max))`` of the four streams (8 rows), the policy and reference target logits (2 rows, 0 on
  every rank but the one that owns the target) and an ownership flag (1 row; every target must have exactly one
  owner, else ``ValueError`` on every rank). Every rank merges the ``R`` partial statistics the same way:
  ``max = maxᵣ mᵣ``, ``log Σ = log Σᵣ exp((mᵣ − max) + lᵣ)``.
- backward, :func:`_reduce_hidden_grad`: one all-reduce (sum) of the ``[M, d]`` hidden-state gradient, in the hidden
  states' dtype (as Megatron and DTensor's ``Partial → Replicate`` do). The weight-shard and bias-shard gradients
  need no communication.

Gradient of the policy stream, as in ``chunked.py``, with the global statistics:

- frozen head: the sweep accumulates this shard's ``−Σ_{v∈shard} softmax_r(z)_v J_v W_v`` under the shard's own
  normaliser; it is rescaled to the global log-sum-exp by ``exp((m_r − max) + (l_r − log Σ))``, and the owning rank
  adds ``J_y W[y]``. Saved as ``[M, d]`` fp32; backward scales it and all-reduces. Three matmul-equivalents per shard.
- trainable head: backward recomputes the shard's policy logits tile by tile, normalised with the global
  statistics, giving the local hidden-gradient part, the weight shard's and the bias shard's gradients (five).

Entry points: :func:`vocab_parallel_linear_logprobs` (a local shard, its vocabulary offset and a process group,
for Megatron-core-style callers) and :func:`dtensor_linear_logprobs` (``lm_head`` weights as ``Shard(0)`` DTensors
on a 1-D mesh, e.g. transformers' ``tp_plan="auto"``; ``linear_logprobs`` routes there).

Imports only torch (and triton, lazily).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from edpo_plugin.ops.chunked import DEFAULT_TOKEN_CHUNK, DEFAULT_VOCAB_CHUNK, folds
from edpo_plugin.ops.contract import LinearLogprobs, check_inputs
from edpo_plugin.ops.dispatch import resolve_impl
from edpo_plugin.ops.engine import (
    HeadOperands,
    Tiles,
    mix_streams,
    recompute_grads,
    sweep_statistics,
    target_logits,
    target_term,
)
from edpo_plugin.ops.transform import IDENTITY, LogitTransform

# torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

STAT_ROWS = 11  # max ×4, log Σ ×4, policy target, reference target, owner flag

__all__ = ["STAT_ROWS", "dtensor_linear_logprobs", "is_dtensor", "vocab_parallel_linear_logprobs"]


def is_dtensor(t: torch.Tensor | None) -> bool:
    if t is None:
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def vocab_parallel_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    epsilon: float,
    vocab_start: int,
    group: dist.ProcessGroup | None = None,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    transform: LogitTransform | None = None,
    impl: str = "auto",
    token_chunk: int = DEFAULT_TOKEN_CHUNK,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
):
    """The four log-prob streams from this rank's vocabulary shard; every rank of ``group`` gets the same streams.

    Args:
        hidden: policy last hidden states ``[..., d]``, the same on every rank of ``group``.
        weight: this rank's rows of the policy ``lm_head`` weight, ``[V_r, d]`` (global rows
            ``[vocab_start, vocab_start + V_r)``; shards may differ in size).
        labels: global target ids ``[...]`` (int64/int32), the same on every rank.
        ref_hidden: reference hidden states, shaped like ``hidden`` (constant).
        ref_weight: this rank's rows of the reference weight ``[V_r, d]`` (may be ``weight`` itself).
        epsilon: ε of the two mixes, ``0 < ε < 1``.
        vocab_start: global index of this shard's first row.
        group: the tensor-parallel process group (default: the world).
        bias, ref_bias: this rank's slices ``[V_r]`` of the ``lm_head`` biases, or None.
        ignore_index, transform, token_chunk, vocab_chunk: as in :func:`edpo_plugin.ops.linear_logprobs`.
        impl: ``"auto"``, ``"chunked"`` or ``"triton"`` for the local sweep (``"naive"`` is refused).

    Returns:
        ``LinearLogprobs`` of fp32 tensors shaped like ``labels`` (global log-probs). Gradient flows from ``policy``
        to ``hidden`` (the full gradient on every rank, after one all-reduce) and to this rank's ``weight``/``bias``
        shard when they require grad.
    """
    check_inputs(
        hidden, weight, labels, ref_hidden, ref_weight, epsilon, bias, ref_bias, ignore_index, check_labels=False
    )
    if vocab_start < 0:
        raise ValueError(f"vocab_start must be >= 0, got {vocab_start}.")
    if token_chunk < 1 or vocab_chunk < 1:
        raise ValueError(f"token_chunk and vocab_chunk must be >= 1, got {token_chunk} and {vocab_chunk}.")
    transform = IDENTITY if transform is None else LogitTransform(*transform)
    transform.check()
    kind = resolve_impl(impl, hidden.device)
    if kind == "naive":
        raise ValueError("impl='naive' has no vocab-parallel form (it materialises full logits); use 'chunked'.")
    lead_shape = labels.shape
    d = hidden.shape[-1]
    streams = _VocabParallelLinearLogprobs.apply(
        hidden.reshape(-1, d), weight, bias, ref_hidden.reshape(-1, d), ref_weight, ref_bias, labels.reshape(-1),
        float(epsilon), ignore_index, transform, token_chunk, vocab_chunk, kind == "triton", int(vocab_start), group,
    )  # fmt: skip
    return LinearLogprobs(*(s.reshape(lead_shape) for s in streams))


def dtensor_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    epsilon: float,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    **kwargs,
):
    """:func:`vocab_parallel_linear_logprobs` for ``lm_head`` weights held as DTensors ``[V, d]`` placed
    ``(Shard(0),)`` on a 1-D device mesh (biases ``[V]`` likewise). ``ref_weight`` is ``weight`` itself or sharded
    the same way. ``hidden``/``ref_hidden`` are plain tensors replicated over the mesh, or ``Replicate()`` DTensors
    (then their local tensors are used). The weight's gradient arrives as a ``Shard(0)`` DTensor; no collective
    beyond those of the vocab-parallel op."""
    mesh, start = _shard0_layout(weight, "weight")
    for name, other in (("ref_weight", ref_weight), ("bias", bias), ("ref_bias", ref_bias)):
        if other is None or other is weight:
            continue
        other_mesh, other_start = _shard0_layout(other, name)
        if other_mesh != mesh or other_start != start or other.to_local().shape[0] != weight.to_local().shape[0]:
            raise ValueError(f"{name} must be sharded like weight: Shard(0) over the same mesh and the same rows.")
    # one local view per distinct tensor, so that a shared head (PEFT) stays shared: ``ref_weight is weight``
    local_w = weight.to_local()
    local_b = None if bias is None else bias.to_local()
    return vocab_parallel_linear_logprobs(
        _replicated_local(hidden, "hidden"),
        local_w,
        labels,
        ref_hidden=_replicated_local(ref_hidden, "ref_hidden"),
        ref_weight=local_w if ref_weight is weight else ref_weight.to_local(),
        bias=local_b,
        ref_bias=local_b if ref_bias is bias else (None if ref_bias is None else ref_bias.to_local()),
        epsilon=epsilon,
        vocab_start=start,
        group=mesh.get_group(),
        **kwargs,
    )


def _shard0_layout(t: torch.Tensor, name: str):
    """``(mesh, vocab_start)`` of a DTensor placed ``(Shard(0),)`` on a 1-D mesh; ``ValueError`` otherwise."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not is_dtensor(t):
        raise ValueError(f"{name} must be a DTensor sharded like the policy lm_head weight, got a plain tensor.")
    if t.device_mesh.ndim != 1 or tuple(t.placements) != (Shard(0),):
        raise ValueError(
            f"{name}: the vocab-parallel head needs placements (Shard(0),) on a 1-D mesh (lm_head's tensor-parallel "
            f"plan 'colwise' / 'colwise_gather_output'), got {tuple(t.placements)} on a {t.device_mesh.ndim}-D mesh."
        )
    local_shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    if tuple(local_shape) != tuple(t.to_local().shape):
        raise ValueError(f"{name}: local shard {tuple(t.to_local().shape)} is not the expected {tuple(local_shape)}.")
    return t.device_mesh, int(offset[0])


def _replicated_local(t: torch.Tensor, name: str) -> torch.Tensor:
    if not is_dtensor(t):
        return t
    from torch.distributed.tensor import Replicate

    if any(p != Replicate() for p in t.placements):
        raise ValueError(f"{name} must be replicated over the tensor-parallel mesh, got placements {t.placements}.")
    return t.to_local()


class _VocabParallelLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, epsilon, ignore_index, transform,
        token_chunk, vocab_chunk, use_triton, vocab_start, group,
    ):  # fmt: skip
        with torch.autocast(hidden.device.type, enabled=False):
            return _forward(
                ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, epsilon, ignore_index,
                transform, token_chunk, vocab_chunk, use_triton, vocab_start, group,
            )  # fmt: skip

    @staticmethod
    def backward(ctx, grad_policy, *_unused):
        with torch.autocast(grad_policy.device.type, enabled=False):
            grads = _backward(ctx, grad_policy)
        return (*grads, *(None,) * 12)


def _forward(
    ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, epsilon, ignore_index, transform,
    token_chunk, vocab_chunk, use_triton, vocab_start, group,
):  # fmt: skip
    n_tokens = hidden.shape[0]
    valid_idx = (labels != ignore_index).nonzero().squeeze(1)
    y_local = labels.index_select(0, valid_idx).long() - vocab_start  # outside [0, V_r): another rank's target
    policy = HeadOperands(hidden.detach().index_select(0, valid_idx), weight.detach(), _detached(bias))
    ref = HeadOperands(ref_hidden.detach().index_select(0, valid_idx), ref_weight.detach(), _detached(ref_bias))
    if ref_weight is weight:
        ref = ref._replace(w=policy.w)
    tiles = Tiles(token_chunk, vocab_chunk)
    fold, grad_fold = folds(use_triton)

    want_hidden = ctx.needs_input_grad[0]
    head_trainable = ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2])
    keep_direction = want_hidden and not head_trainable

    # 1. local sweep over this rank's vocabulary shard (the engine, as on one device)
    row_max, row_logsum, local_dir = sweep_statistics(
        policy, ref, None, epsilon, transform, tiles, keep_direction, fold
    )
    owned_rows = ((y_local >= 0) & (y_local < policy.w.shape[0])).nonzero().squeeze(1)
    y_owned = y_local.index_select(0, owned_rows)
    owned_policy = HeadOperands(policy.h[owned_rows], policy.w, policy.b)
    local = torch.zeros(STAT_ROWS, policy.h.shape[0], dtype=torch.float32, device=hidden.device)
    local[0:4], local[4:8] = row_max, row_logsum
    local[8].index_copy_(0, owned_rows, target_logits(owned_policy, y_owned, transform))
    local[9].index_copy_(0, owned_rows, target_logits(HeadOperands(ref.h[owned_rows], ref.w, ref.b), y_owned,
                                                      transform))  # fmt: skip
    local[10].index_fill_(0, owned_rows, 1.0)

    # 2. one collective: all-gather the [11, M] statistics; every rank merges them the same way
    g_max, g_logsum, target_p, target_r = _merge_statistics(_gather_statistics(local, group))
    streams = ((torch.stack(mix_streams(target_p, target_r, epsilon)) - g_max) - g_logsum).unbind(0)
    outputs = tuple(hidden.new_zeros(n_tokens, dtype=torch.float32).index_copy_(0, valid_idx, s) for s in streams)

    # 3. what backward needs: the policy direction (frozen head) or the global statistics (trainable head)
    direction = None
    if local_dir is not None:
        rescale = torch.exp((row_max[0] - g_max[0]) + (row_logsum[0] - g_logsum[0]))
        direction = local_dir.mul_(rescale.unsqueeze(1))
        target_rows = target_term(owned_policy, y_owned, transform)
        if transform.softcap is None:
            target_rows.mul_(transform.scale)
        direction.index_add_(0, owned_rows, target_rows)

    ctx.mark_non_differentiable(*outputs[1:])
    ctx.n_tokens, ctx.hidden_dtype, ctx.group = n_tokens, hidden.dtype, group
    ctx.has_bias, ctx.transform, ctx.tiles, ctx.grad_fold = bias is not None, transform, tiles, grad_fold
    if direction is not None or not want_hidden and not head_trainable:
        ctx.save_for_backward(valid_idx, direction)
        ctx.recompute = False
    else:
        ctx.save_for_backward(valid_idx, y_local, g_max[0].contiguous(), g_logsum[0].contiguous(), policy.h, weight,
                              bias)  # fmt: skip
        ctx.recompute = True
    return outputs


def _backward(ctx, grad_policy):
    want = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2])
    grad_weight = grad_bias = None
    if not ctx.recompute:
        valid_idx, direction = ctx.saved_tensors
        if direction is None:
            return None, None, None
        grad_valid = direction * grad_policy.index_select(0, valid_idx).float()[:, None]
    else:
        valid_idx, y_local, g_max, g_logsum, h, weight, bias = ctx.saved_tensors
        g = grad_policy.index_select(0, valid_idx).float()
        grad_valid, grad_weight, grad_bias = recompute_grads(
            HeadOperands(h, weight, bias), y_local, g_max, g_logsum, g, ctx.transform, ctx.tiles, want, ctx.grad_fold
        )
    if not want[0]:
        return None, grad_weight, grad_bias
    grad_valid = _reduce_hidden_grad(grad_valid.to(ctx.hidden_dtype), ctx.group)
    grad_hidden = grad_policy.new_zeros(ctx.n_tokens, grad_valid.shape[1], dtype=ctx.hidden_dtype)
    grad_hidden.index_copy_(0, valid_idx, grad_valid)
    return grad_hidden, grad_weight, grad_bias


def _gather_statistics(local: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Forward collective: all-gather this rank's fp32 ``[11, M]`` statistics into ``[R, 11, M]``."""
    world = dist.get_world_size(group)
    out = local.new_empty(world * local.shape[0], local.shape[1])
    if local.numel():  # M is the same on every rank (labels are replicated): all skip together
        _all_gather_single(out, local.contiguous(), group=group)
    return out.view(world, *local.shape)


def _reduce_hidden_grad(grad: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Backward collective: sum the ``[M, d]`` hidden-state gradient parts of all vocabulary shards, in place."""
    if grad.numel():
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=group)
    return grad


def _merge_statistics(gathered: torch.Tensor):
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


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()
