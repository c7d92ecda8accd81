"""The fused ε-DPO log-prob head (``impl="chunked"`` / ``"triton"``, one device or a vocabulary shard): the one
autograd function over the tile engine.

Forward drops ignored positions, asks the planner (:mod:`edpo_plugin.ops.dispatch`) for a
:class:`edpo_plugin.ops.plan.HeadPlan`, gathers the target rows (target logits, and the first reference of the
policy's ``P``), then runs :func:`edpo_plugin.ops.engine.sweep_statistics`: four row statistics, and per head kind

- frozen head (``weight``/``bias`` need no grad, the LoRA/QLoRA case): the policy's hidden-state direction
  ``J_y W[y] − Σ_v p_v J_v W_v`` as fp32 ``[M, d]``; backward only scales it (3 matmul-equivalents, nothing reads
  ``W`` in backward, as a ZeRO-3-sharded head needs);
- trainable head: backward recomputes the policy tiles from the saved statistics (5 matmul-equivalents) or, when
  the plan keeps the policy's ``P`` from the forward (``keep_probs``, a GPU plan that fits the workspace budget),
  turns the kept ``P`` into the logit gradient in place (4).

Each stream is ``(z_y − max) − log Σ``. On a vocabulary shard (``shard``: Megatron-style tensor parallelism) the same
function runs on this rank's rows, with the two collectives at named points: after the sweep
(:func:`edpo_plugin.ops.collectives.gather_statistics`, then every rank merges the global statistics) and at the end
of backward (:func:`edpo_plugin.ops.collectives.reduce_hidden_grad`).

Autocast is disabled inside forward and backward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from edpo_plugin.ops import engine
from edpo_plugin.ops.collectives import STAT_ROWS, VocabShard, gather_statistics, merge_statistics, reduce_hidden_grad
from edpo_plugin.ops.contract import HeadCall, HeadOperands, LinearLogprobs
from edpo_plugin.ops.engine import (
    mix_streams,
    no_autocast,
    probs_grads,
    recompute_grads,
    sweep_statistics,
)
from edpo_plugin.ops.plan import HeadPlan, HeadShape

# planner(shape, device, impl, token_chunk, vocab_chunk, workspace_mb) -> plan: edpo_plugin.ops.dispatch.choose_plan
Planner = Callable[[HeadShape, torch.device, str, int | None, int | None, int | None], HeadPlan]


class PlanRequest(NamedTuple):
    """What the caller asked of the planner: the implementation, tiles (None: the planner's), workspace budget, and
    the planner that turns them into a plan for the call's shape (the caller's: this module runs plans, it does not
    choose them); or a fixed ``plan`` (tests, the Triton self-check, scripts)."""

    impl: str = "auto"
    token_chunk: int | None = None
    vocab_chunk: int | None = None
    workspace_mb: int | None = None
    plan: HeadPlan | None = None
    planner: Planner | None = None


class HeadKernels(NamedTuple):
    """What a plan runs besides the GEMMs: the tile fold, the backward folds (from recomputed logits, from kept
    ``P``), the target logits before the sweep and the frozen head's direction after it."""

    fold: Callable
    grad_fold: Callable
    grad_fold_probs: Callable
    targets: Callable
    finish: Callable


def kernels_of(plan: HeadPlan) -> HeadKernels:
    """The plan's per-tile and per-call kernels: Triton's, or their PyTorch forms in the engine."""
    if plan.impl == "triton":
        from edpo_plugin.ops import triton_fold as t

        return HeadKernels(t.fold_triton, t.grad_fold_triton, t.grad_fold_probs_triton, t.targets_triton,
                           t.finish_triton)  # fmt: skip
    return HeadKernels(engine.fold_torch, engine.grad_fold_torch, engine.grad_fold_probs_torch,
                       engine.gather_targets, engine.direction_from)  # fmt: skip


class _Fixed(NamedTuple):
    """What the autograd function reads but never differentiates: the call (the reference's operands, labels, ε,
    ``ignore_index``, transform), the planner request and the vocabulary shard."""

    call: HeadCall
    request: PlanRequest
    shard: VocabShard | None


def fused_linear_logprobs(
    call: HeadCall, request: PlanRequest | None = None, shard: VocabShard | None = None
) -> LinearLogprobs:
    """The four streams, fp32 ``[N]`` each, of a flat ``call`` (hidden states ``[N, d]``, labels ``[N]``; with
    ``shard``, ``w`` / ``b`` hold this rank's rows of the vocabulary), planned as ``request`` asks."""
    request = PlanRequest() if request is None else request
    for name in ("token_chunk", "vocab_chunk", "workspace_mb"):
        value = getattr(request, name)
        if value is not None and int(value) < 1:
            raise ValueError(f"{name} must be >= 1 (or None: the planner's choice), got {value!r}.")
    hidden, weight, bias = call.policy
    return LinearLogprobs(*_FusedLinearLogprobs.apply(hidden, weight, bias, _Fixed(call, request, shard)))


class _FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, fixed: _Fixed):
        # autograd tracks only tensors passed as top-level arguments: the policy's three come here, the rest (no
        # gradient) inside ``fixed``; ``fixed.call.policy`` holds these same three tensors
        ctx.set_materialize_grads(False)
        call = fixed.call._replace(policy=HeadOperands(hidden, weight, bias))
        with no_autocast(hidden.device):
            return _forward(ctx, call, fixed.request, fixed.shard)

    @staticmethod
    def backward(ctx, grad_policy, *_unused):
        if grad_policy is None:
            return None, None, None, None
        with no_autocast(grad_policy.device):
            grads = _backward(ctx, grad_policy)
        return (*grads, None)


def _plan_for(request: PlanRequest, shape: HeadShape, device: torch.device) -> HeadPlan:
    if request.plan is not None:
        return request.plan
    if request.planner is None:
        raise ValueError(
            "fused_linear_logprobs needs a PlanRequest with a plan or a planner (linear_logprobs sets one)."
        )
    return request.planner(shape, device, request.impl, request.token_chunk, request.vocab_chunk, request.workspace_mb)


def _forward(ctx, call: HeadCall, request: PlanRequest, shard: VocabShard | None):
    (hidden, weight, bias), (ref_hidden, ref_weight, ref_bias) = call.policy, call.ref
    labels, epsilon, transform = call.labels, call.epsilon, call.transform
    n_tokens, d = hidden.shape
    valid_idx = (labels != call.ignore_index).nonzero().squeeze(1)
    y = labels.index_select(0, valid_idx).long()
    policy = HeadOperands(hidden.detach().index_select(0, valid_idx), weight.detach(), _detached(bias))
    ref = HeadOperands(ref_hidden.detach().index_select(0, valid_idx), ref_weight.detach(), _detached(ref_bias))
    if ref_weight is weight:  # one tensor: the engine reads its tiles once for both GEMMs
        ref = ref._replace(w=policy.w)

    want_hidden = ctx.needs_input_grad[0]
    head_trainable = ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2])
    head = "trainable" if head_trainable else ("frozen" if want_hidden else "none")
    same_dtype = hidden.dtype == ref_hidden.dtype == weight.dtype == ref_weight.dtype
    shape = HeadShape(tokens=n_tokens, valid=int(valid_idx.shape[0]), dim=d, vocab=weight.shape[0],
                      dtype=hidden.dtype if same_dtype else torch.float32, head=head, shared=ref.w is policy.w,
                      bias=bias is not None, ref_bias=ref_bias is not None, transform=transform,
                      label_bytes=labels.element_size(), want_hidden=want_hidden, want_weight=ctx.needs_input_grad[1],
                      want_bias=bias is not None and ctx.needs_input_grad[2])  # fmt: skip
    plan = _plan_for(request, shape, hidden.device)
    kernels = kernels_of(plan)

    owned = None
    if shard is None:
        y_local = y
        targets = kernels.targets(policy, ref, y, transform)
        r_init = targets.policy.clone() if plan.keeps_probs_or_direction else None
    else:  # only the rank that holds a row's target knows its target logit
        y_local = y - shard.start
        owned = ((y_local >= 0) & (y_local < policy.w.shape[0])).nonzero().squeeze(1)
        y_owned = y_local.index_select(0, owned)
        targets = kernels.targets(HeadOperands(policy.h.index_select(0, owned), policy.w, policy.b),
                                  HeadOperands(ref.h.index_select(0, owned), ref.w, ref.b), y_owned,
                                  transform)  # fmt: skip
        r_init = None
        if plan.keeps_probs_or_direction:
            r_init = torch.full((shape.valid,), float("-inf"), dtype=torch.float32, device=hidden.device)
            r_init.index_copy_(0, owned, targets.policy)

    sweep = sweep_statistics(plan, policy, ref, r_init, epsilon, transform, kernels.fold)
    row_max, row_logsum, target_p, target_r = sweep.row_max, sweep.row_logsum, targets.policy, targets.ref
    if shard is not None:  # collective 1: every rank gets the global statistics
        local = torch.zeros(STAT_ROWS, shape.valid, dtype=torch.float32, device=hidden.device)
        local[0:4], local[4:8] = row_max, row_logsum
        local[8].index_copy_(0, owned, targets.policy)
        local[9].index_copy_(0, owned, targets.ref)
        local[10].index_fill_(0, owned, 1.0)
        row_max, row_logsum, target_p, target_r = merge_statistics(gather_statistics(local, shard.group))

    streams = ((torch.stack(mix_streams(target_p, target_r, epsilon)) - row_max) - row_logsum).unbind(0)
    outputs = tuple(hidden.new_zeros(n_tokens, dtype=torch.float32).index_copy_(0, valid_idx, s) for s in streams)

    ctx.mark_non_differentiable(*outputs[1:])
    ctx.n_tokens, ctx.hidden_dtype, ctx.has_bias = n_tokens, hidden.dtype, bias is not None
    ctx.transform, ctx.plan, ctx.shard = transform, plan, shard
    if plan.keeps_direction:
        direction = kernels.finish(sweep, row_max[0], row_logsum[0], policy.w, y_local, target_p, targets, transform,
                                   owned)  # fmt: skip
        ctx.save_for_backward(valid_idx, direction)
    elif head == "trainable":
        ctx.save_for_backward(valid_idx, y_local, row_max[0].contiguous(), row_logsum[0].contiguous(), policy.h,
                              weight, bias, target_p, sweep.probs, sweep.probs_ref)  # fmt: skip
    else:
        ctx.save_for_backward(valid_idx)
    ctx.head = head
    return outputs


def _backward(ctx, grad_policy):
    want = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2])
    grad_weight = grad_bias = None
    if ctx.head == "none":
        return None, None, None
    valid_idx = ctx.saved_tensors[0]
    g = grad_policy.index_select(0, valid_idx).float()
    if ctx.head == "frozen":
        direction = ctx.saved_tensors[1]
        out = g.new_empty(direction.shape, dtype=ctx.hidden_dtype)
        grad_valid = torch.mul(direction, g.unsqueeze(1), out=out)
    else:
        _, y, row_max, row_logsum, h, weight, bias, target_p, probs, probs_ref = ctx.saved_tensors
        policy = HeadOperands(h, weight.detach(), None if bias is None else bias.detach())
        plan, transform = ctx.plan, ctx.transform
        kernels = kernels_of(plan)
        if plan.keep_probs:
            grad_valid, grad_weight, grad_bias = probs_grads(plan, policy, y, row_max, row_logsum, target_p, probs,
                                                             probs_ref, g, transform, want,
                                                             kernels.grad_fold_probs)  # fmt: skip
        else:
            grad_valid, grad_weight, grad_bias = recompute_grads(plan, policy, y, row_max, row_logsum, g, transform,
                                                                 want, kernels.grad_fold)  # fmt: skip
        if grad_valid is not None:
            grad_valid = grad_valid.to(ctx.hidden_dtype)
    if not want[0]:
        return None, grad_weight, grad_bias
    if ctx.shard is not None:  # collective 2: the hidden gradient's parts from every vocabulary shard
        grad_valid = reduce_hidden_grad(grad_valid, ctx.shard.group)
    grad_hidden = grad_policy.new_zeros(ctx.n_tokens, grad_valid.shape[1], dtype=ctx.hidden_dtype)
    grad_hidden.index_copy_(0, valid_idx, grad_valid)
    return grad_hidden, grad_weight, grad_bias


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


__all__ = ["PlanRequest", "fused_linear_logprobs"]
