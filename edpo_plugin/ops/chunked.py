"""Fused ε-DPO log-prob head (``impl="chunked"`` and ``impl="triton"``): an autograd function over the tile engine.

Forward drops ignored positions, then runs :func:`edpo_plugin.ops.engine.sweep_statistics` over token chunks ×
vocabulary tiles: four row statistics, and for a frozen head (``weight``/``bias`` need no grad, the LoRA/QLoRA case)
the policy's hidden-state direction ``J_y W[y] − Σ_v p_v J_v W_v`` as fp32 ``[M, d]``. Target logits come from one
indexed dot product per token. Each stream is ``(z_y − max) − log Σ``.

Backward (gradient of the policy stream only; the rest are constants):

- frozen head: scales the saved direction by the upstream gradient. 3 matmul-equivalents in all, and nothing reads
  ``W`` in backward (what a ZeRO-3-sharded head needs).
- trainable head: :func:`edpo_plugin.ops.engine.recompute_grads` recomputes the policy tiles from the saved
  statistics and produces the hidden, weight and bias gradients. 5 matmul-equivalents in all.

``impl="chunked"`` folds each tile in PyTorch, ``impl="triton"`` in one Triton kernel
(:mod:`edpo_plugin.ops.triton_fold`); both share the engine's GEMMs, so their statistics agree to the fold's
rounding. Autocast is disabled inside forward and backward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from edpo_plugin.ops.engine import (
    HeadOperands,
    Tiles,
    fold_torch,
    grad_fold_torch,
    mix_streams,
    recompute_grads,
    sweep_statistics,
    target_logits,
)
from edpo_plugin.ops.transform import IDENTITY, LogitTransform

DEFAULT_TOKEN_CHUNK = 1024
DEFAULT_VOCAB_CHUNK = 4096


def chunked_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    epsilon: float,
    bias: torch.Tensor | None,
    ref_bias: torch.Tensor | None,
    ignore_index: int,
    *,
    transform: LogitTransform = IDENTITY,
    token_chunk: int = DEFAULT_TOKEN_CHUNK,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    use_triton: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(policy, ref, plus, minus)``, fp32 ``[N]`` each, from ``hidden [N, d]``, ``weight [V, d]``, ``labels [N]``."""
    if token_chunk < 1 or vocab_chunk < 1:
        raise ValueError(f"token_chunk and vocab_chunk must be >= 1, got {token_chunk} and {vocab_chunk}.")
    settings = _Settings(float(epsilon), ignore_index, transform, Tiles(token_chunk, vocab_chunk), use_triton)
    return _ChunkedLinearLogprobs.apply(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, settings)


class _Settings(NamedTuple):
    """The non-tensor arguments, as one group."""

    epsilon: float
    ignore_index: int
    transform: LogitTransform
    tiles: Tiles
    use_triton: bool


def folds(use_triton: bool):
    """``(fold, grad_fold)`` of the engine: the Triton kernels or their PyTorch forms."""
    if use_triton:
        from edpo_plugin.ops.triton_fold import fold_triton, grad_fold_triton

        return fold_triton, grad_fold_triton
    return fold_torch, grad_fold_torch


class _ChunkedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, settings):
        with torch.autocast(hidden.device.type, enabled=False):
            return _forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, *settings)

    @staticmethod
    def backward(ctx, grad_policy, *_unused):
        with torch.autocast(grad_policy.device.type, enabled=False):
            grads = _backward(ctx, grad_policy)
        return (*grads, None, None, None, None, None)


def _forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, epsilon, ignore_index, transform,
             tiles, use_triton):  # fmt: skip
    n_tokens = hidden.shape[0]
    valid_idx = (labels != ignore_index).nonzero().squeeze(1)
    y = labels.index_select(0, valid_idx).long()
    policy = HeadOperands(hidden.detach().index_select(0, valid_idx), weight.detach(), _detached(bias))
    ref = HeadOperands(ref_hidden.detach().index_select(0, valid_idx), ref_weight.detach(), _detached(ref_bias))
    if ref_weight is weight:  # one tensor: the engine reads its tiles once for both GEMMs
        ref = ref._replace(w=policy.w)

    want_hidden = ctx.needs_input_grad[0]
    head_trainable = ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2])
    keep_direction = want_hidden and not head_trainable
    fold, grad_fold = folds(use_triton)
    row_max, row_logsum, direction = sweep_statistics(policy, ref, y, epsilon, transform, tiles, keep_direction, fold)
    targets = torch.stack(mix_streams(target_logits(policy, y, transform), target_logits(ref, y, transform), epsilon))
    streams = ((targets - row_max) - row_logsum).unbind(0)
    outputs = tuple(hidden.new_zeros(n_tokens, dtype=torch.float32).index_copy_(0, valid_idx, s) for s in streams)

    ctx.mark_non_differentiable(*outputs[1:])
    ctx.n_tokens = n_tokens
    ctx.hidden_dtype = hidden.dtype
    ctx.has_bias = bias is not None
    ctx.transform, ctx.tiles, ctx.grad_fold = transform, tiles, grad_fold
    if direction is not None or not want_hidden and not head_trainable:
        ctx.save_for_backward(valid_idx, direction)
        ctx.mode = "direction"
    else:
        ctx.save_for_backward(valid_idx, y, row_max[0].contiguous(), row_logsum[0].contiguous(), policy.h, weight,
                              bias)  # fmt: skip
        ctx.mode = "recompute"
    return outputs


def _backward(ctx, grad_policy):
    want = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2])
    grad_weight = grad_bias = None
    if ctx.mode == "direction":
        valid_idx, direction = ctx.saved_tensors
        if direction is None:  # no input needed a gradient
            return None, None, None
        grad_valid = direction * grad_policy.index_select(0, valid_idx).float()[:, None]
    else:
        valid_idx, y, row_max, row_logsum, h, weight, bias = ctx.saved_tensors
        g = grad_policy.index_select(0, valid_idx).float()
        grad_valid, grad_weight, grad_bias = recompute_grads(
            HeadOperands(h, weight, bias), y, row_max, row_logsum, g, ctx.transform, ctx.tiles, want, ctx.grad_fold
        )
    grad_hidden = None
    if want[0]:
        grad_hidden = grad_policy.new_zeros(ctx.n_tokens, grad_valid.shape[1], dtype=ctx.hidden_dtype)
        grad_hidden.index_copy_(0, valid_idx, grad_valid.to(ctx.hidden_dtype))
    return grad_hidden, grad_weight, grad_bias


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()
