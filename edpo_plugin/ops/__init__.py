"""The ε-DPO log-prob head: one public entry point over several implementations.

``linear_logprobs`` turns last hidden states and ``lm_head`` weights of the policy and the reference into four
per-token log-prob streams. Implementations, chosen by ``impl``:

- ``"naive"``: materialises ``[tokens × vocab]`` logits (the authors' reference trainer's way).
- ``"chunked"``: the tile engine (:mod:`edpo_plugin.ops.engine`: token chunks × wide vocabulary tiles, GEMMs by the
  BLAS — on CUDA on the input dtype with fp32 output) with each tile folded in PyTorch; CPU and GPU.
- ``"triton"``: the same engine with each tile folded by one Triton kernel (:mod:`edpo_plugin.ops.triton_fold`;
  CUDA, or CPU under ``TRITON_INTERPRET=1``).
- ``"auto"``: on CUDA, :data:`AUTO_ON_CUDA` — the path with the lowest modelled time at the 8B shape
  (``scripts/roofline.py``; a GPU measurement replaces the model once one is committed) — if Triton imports and
  its first-use self-check passes on that device and dtype (:mod:`edpo_plugin.ops.triton_selfcheck`; on failure it
  warns once and falls back to ``"chunked"``); ``"chunked"`` elsewhere.

Imports only torch (and triton, lazily).
"""

from __future__ import annotations

import torch

from edpo_plugin.ops.chunked import DEFAULT_TOKEN_CHUNK, DEFAULT_VOCAB_CHUNK, chunked_linear_logprobs
from edpo_plugin.ops.contract import LinearLogprobs, check_inputs
from edpo_plugin.ops.dispatch import AUTO_ON_CUDA, IMPLS, auto_cuda_impl, resolve_impl, triton_available
from edpo_plugin.ops.naive import naive_linear_logprobs
from edpo_plugin.ops.transform import IDENTITY, LogitTransform
from edpo_plugin.ops.vocab_parallel import dtensor_linear_logprobs, is_dtensor, vocab_parallel_linear_logprobs

__all__ = [
    "AUTO_ON_CUDA",
    "IMPLS",
    "auto_cuda_impl",
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
    token_chunk: int = DEFAULT_TOKEN_CHUNK,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
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
        token_chunk, vocab_chunk: tile sizes of the fused paths (rows of tokens, columns of vocabulary).

    Returns:
        :class:`LinearLogprobs` of fp32 tensors shaped like ``labels``. Gradient flows from ``policy`` to
        ``hidden``, and to ``weight``/``bias`` when they require grad. Computed in fp32 with autocast disabled,
        whatever the input dtype and the caller's autocast state.
    """
    check_inputs(hidden, weight, labels, ref_hidden, ref_weight, epsilon, bias, ref_bias, ignore_index)
    if is_dtensor(weight):  # a tensor-parallel lm_head sharded over the vocabulary: statistics cross ranks, not logits
        return dtensor_linear_logprobs(
            hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight, epsilon=epsilon, bias=bias,
            ref_bias=ref_bias, ignore_index=ignore_index, transform=transform, impl=impl, token_chunk=token_chunk,
            vocab_chunk=vocab_chunk,
        )  # fmt: skip
    transform = IDENTITY if transform is None else LogitTransform(*transform)
    transform.check()
    lead_shape = labels.shape
    d = hidden.shape[-1]
    flat = (hidden.reshape(-1, d), weight, labels.reshape(-1), ref_hidden.reshape(-1, d), ref_weight, float(epsilon))
    kind = resolve_impl(impl, hidden.device, hidden.dtype)
    if kind == "naive":
        streams = naive_linear_logprobs(*flat, bias, ref_bias, ignore_index, transform)
    else:
        streams = chunked_linear_logprobs(
            *flat,
            bias,
            ref_bias,
            ignore_index,
            transform=transform,
            token_chunk=token_chunk,
            vocab_chunk=vocab_chunk,
            use_triton=kind == "triton",
        )
    return LinearLogprobs(*(s.reshape(lead_shape) for s in streams))
