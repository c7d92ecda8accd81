"""The ε-DPO log-prob head: one public entry point over several implementations.

``linear_logprobs`` turns last hidden states and ``lm_head`` weights of the policy and the reference into four
per-token log-prob streams. Implementations, chosen by ``impl``:

- ``"naive"``: materialises ``[tokens × vocab]`` logits (the authors' reference trainer's way).
- ``"chunked"``: the tile engine (:mod:`edpo_plugin.ops.engine`: token chunks × vocabulary tiles, GEMMs by the
  BLAS — on CUDA on the input dtype with fp32 output) with each tile folded in PyTorch; CPU and GPU.
- ``"triton"``: the same engine with each tile folded by one Triton kernel (:mod:`edpo_plugin.ops.triton_fold`;
  CUDA, or CPU under ``TRITON_INTERPRET=1``).
- ``"auto"``: ``"chunked"`` with its CPU tiles off CUDA; on CUDA the plan with the lowest modelled time whose
  workspace fits ``workspace_mb`` (:mod:`edpo_plugin.ops.dispatch`, modelled by
  :mod:`edpo_plugin.ops.cost_model`), a Triton plan only once its first-use self-check passed on that device and
  dtype.

Imports only torch (and triton, lazily).
"""

from __future__ import annotations

import torch

from edpo_plugin.ops.chunked import PlanRequest, fused_linear_logprobs
from edpo_plugin.ops.contract import HeadCall, HeadOperands, LinearLogprobs, as_transform, check_inputs
from edpo_plugin.ops.dispatch import IMPLS, choose_plan, resolve_impl, triton_available
from edpo_plugin.ops.naive import naive_linear_logprobs
from edpo_plugin.ops.transform import LogitTransform
from edpo_plugin.ops.vocab_parallel import dtensor_linear_logprobs, is_dtensor, vocab_parallel_linear_logprobs

__all__ = [
    "IMPLS",
    "HeadCall",
    "HeadOperands",
    "LinearLogprobs",
    "LogitTransform",
    "linear_logprobs",
    "resolve_impl",
    "triton_available",
    "vocab_parallel_linear_logprobs",
]


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    epsilon: float,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    transform: LogitTransform | None = None,
    impl: str = "auto",
    token_chunk: int | None = None,
    vocab_chunk: int | None = None,
    workspace_mb: int | None = None,
) -> LinearLogprobs:
    """Policy, reference and both ε-mix log-probs of ``labels`` from hidden states and ``lm_head`` weights.

    Args:
        hidden: policy last hidden states ``[..., d]`` (fp32, bf16 or fp16), position ``t`` predicting ``labels[t]``.
        weight: policy ``lm_head`` weight ``[V, d]``. A ``Shard(0)`` DTensor (a tensor-parallel head) routes to the
            vocab-parallel form in ``vocab_parallel.py``; ``ref_weight`` is then ``weight`` or sharded the same way.
        labels: target token ids ``[...]`` (int64), same leading shape as ``hidden``.
        ref_hidden: reference hidden states, same shape as ``hidden`` (treated as constant).
        ref_weight: reference ``lm_head`` weight ``[V, d]`` (may be ``weight`` itself, e.g. PEFT's frozen head).
        epsilon: the ε of the two mixes, ``0 < ε < 1``.
        bias, ref_bias: optional ``lm_head`` biases ``[V]``.
        ignore_index: label value whose positions get 0 in every stream and no gradient.
        transform: what the model does to ``W h + b`` before its softmax (scale, then soft cap); ``None`` for
            plain logits. Applied to policy and reference logits before the ε-mixes.
        impl: ``"auto"``, ``"naive"``, ``"chunked"`` or ``"triton"``.
        token_chunk, vocab_chunk: tile sizes of the fused paths (rows of tokens, columns of vocabulary); None: the
            planner's (on CPU 1024 × 4096; on CUDA the modelled-fastest that fits ``workspace_mb``).
        workspace_mb: on CUDA, the most memory (MiB) the fused head's plan may hold beyond its inputs and outputs
            (tile buffers, the frozen head's direction, a trainable head's kept ``P``); None: 4096.

    Returns:
        :class:`LinearLogprobs` of fp32 tensors shaped like ``labels``. Gradient flows from ``policy`` to
        ``hidden``, and to ``weight``/``bias`` when they require grad. Computed in fp32 with autocast disabled,
        whatever the input dtype and the caller's autocast state.
    """
    call = HeadCall(HeadOperands(hidden, weight, bias), HeadOperands(ref_hidden, ref_weight, ref_bias), labels,
                    float(epsilon), ignore_index, as_transform(transform))  # fmt: skip
    check_inputs(call)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}.")
    request = PlanRequest(impl, token_chunk, vocab_chunk, workspace_mb, planner=choose_plan)
    if is_dtensor(weight):  # a tensor-parallel lm_head sharded over the vocabulary: statistics cross ranks, not logits
        return dtensor_linear_logprobs(call, request)
    flat = call.flat()
    streams = naive_linear_logprobs(flat) if impl == "naive" else fused_linear_logprobs(flat, request)
    return streams.reshaped(labels.shape)
