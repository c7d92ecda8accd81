"""Vocab-parallel ε-DPO head (Megatron style): each rank holds rows ``[start, start + V_r)`` of ``lm_head``, and only
per-token statistics cross the process group, never logits.

Every rank holds the same hidden states and labels (replicated, as in a tensor-parallel model after its final norm)
and runs the one fused head (:func:`edpo_plugin.ops.chunked.fused_linear_logprobs`, the tile engine with the
PyTorch or Triton fold) on its own vocabulary shard, after the model's logit transform (scale, soft cap:
elementwise, so per shard). That function's two collectives (:mod:`edpo_plugin.ops.collectives`) are the only
communication: one all-gather of ``[11, M]`` fp32 statistics per rank in forward, one all-reduce of the ``[M, d]``
hidden-state gradient in backward. The weight-shard and bias-shard gradients need no communication.

Gradient of the policy stream, with the global statistics: a frozen head's direction is this shard's part
``−Σ_{v∈shard} softmax(z)_v J_v W_v`` normalised by the *global* log-sum-exp, plus ``J_y W[y]`` on the rank that owns
the target (three matmul-equivalents per shard); a trainable head's backward runs on the shard's tiles with the global
statistics (five, or four when the plan keeps ``P``).

Entry points: :func:`vocab_parallel_linear_logprobs` (a local shard, its vocabulary offset and a process group,
for Megatron-core-style callers) and :func:`dtensor_linear_logprobs` (a :class:`~edpo_plugin.ops.contract.HeadCall`
whose ``lm_head`` weights are ``Shard(0)`` DTensors on a 1-D mesh, e.g. transformers' ``tp_plan="auto"``;
``linear_logprobs`` routes there). Both run :func:`shard_linear_logprobs` on this rank's rows.

Imports only torch (and triton, lazily).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from edpo_plugin.ops.chunked import PlanRequest, fused_linear_logprobs
from edpo_plugin.ops.collectives import STAT_ROWS, VocabShard
from edpo_plugin.ops.contract import HeadCall, HeadOperands, LinearLogprobs, as_transform, check_inputs
from edpo_plugin.ops.dispatch import IMPLS, choose_plan
from edpo_plugin.ops.transform import LogitTransform

__all__ = [
    "STAT_ROWS",
    "dtensor_linear_logprobs",
    "is_dtensor",
    "shard_linear_logprobs",
    "vocab_parallel_linear_logprobs",
]


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
    token_chunk: int | None = None,
    vocab_chunk: int | None = None,
    workspace_mb: int | None = None,
) -> LinearLogprobs:
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
        ignore_index, transform, token_chunk, vocab_chunk, workspace_mb: as in
            :func:`edpo_plugin.ops.linear_logprobs`.
        impl: ``"auto"``, ``"chunked"`` or ``"triton"`` for the local sweep (``"naive"`` is refused).

    Returns:
        ``LinearLogprobs`` of fp32 tensors shaped like ``labels`` (global log-probs). Gradient flows from ``policy``
        to ``hidden`` (the full gradient on every rank, after one all-reduce) and to this rank's ``weight``/``bias``
        shard when they require grad.
    """
    call = HeadCall(HeadOperands(hidden, weight, bias), HeadOperands(ref_hidden, ref_weight, ref_bias), labels,
                    float(epsilon), ignore_index, as_transform(transform))  # fmt: skip
    request = PlanRequest(impl, token_chunk, vocab_chunk, workspace_mb, planner=choose_plan)
    return shard_linear_logprobs(call, request, VocabShard(int(vocab_start), group))


def shard_linear_logprobs(call: HeadCall, request: PlanRequest, shard: VocabShard) -> LinearLogprobs:
    """The four global streams, shaped like ``call.labels``, from ``call`` on this rank's shard ``shard`` (``w`` /
    ``b``: this rank's rows of the vocabulary; hidden states and labels replicated)."""
    check_inputs(call, check_labels=False)
    if shard.start < 0:
        raise ValueError(f"vocab_start must be >= 0, got {shard.start}.")
    if request.impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {request.impl!r}.")
    if request.impl == "naive":
        raise ValueError("impl='naive' has no vocab-parallel form (it materialises full logits); use 'chunked'.")
    return fused_linear_logprobs(call.flat(), request, shard).reshaped(call.labels.shape)


def dtensor_linear_logprobs(call: HeadCall, request: PlanRequest) -> LinearLogprobs:
    """:func:`shard_linear_logprobs` for a ``call`` whose ``lm_head`` weights are DTensors ``[V, d]`` placed
    ``(Shard(0),)`` on a 1-D device mesh (biases ``[V]`` likewise). ``ref.w`` is ``policy.w`` itself or sharded
    the same way. The hidden states are plain tensors replicated over the mesh, or ``Replicate()`` DTensors (then
    their local tensors are used). The weight's gradient arrives as a ``Shard(0)`` DTensor; no collective beyond
    those of the vocab-parallel op."""
    (hidden, weight, bias), (ref_hidden, ref_weight, ref_bias) = call.policy, call.ref
    mesh, start = _shard0_layout(weight, "weight")
    for name, other in (("ref_weight", ref_weight), ("bias", bias), ("ref_bias", ref_bias)):
        if other is None or other is weight:
            continue
        other_mesh, other_start = _shard0_layout(other, name)
        if other_mesh != mesh or other_start != start or other.to_local().shape[0] != weight.to_local().shape[0]:
            raise ValueError(f"{name} must be sharded like weight: Shard(0) over the same mesh and the same rows.")
    # one local view per distinct tensor, so that a shared head (PEFT) stays shared: ``ref.w is policy.w``
    local_w = weight.to_local()
    local_b = None if bias is None else bias.to_local()
    local = call._replace(
        policy=HeadOperands(_replicated_local(hidden, "hidden"), local_w, local_b),
        ref=HeadOperands(
            _replicated_local(ref_hidden, "ref_hidden"),
            local_w if ref_weight is weight else ref_weight.to_local(),
            local_b if ref_bias is bias else (None if ref_bias is None else ref_bias.to_local()),
        ),
    )
    return shard_linear_logprobs(local, request, VocabShard(start, mesh.get_group()))


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
