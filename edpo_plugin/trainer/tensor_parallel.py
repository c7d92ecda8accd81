"""The trainer under transformers tensor parallelism (``tp_plan="auto"``): what upstream leaves to the caller.

A model loaded with ``tp_plan`` holds a mix of parameters: the planned ones (``lm_head`` ``Shard(0)``, attention and
MLP projections) are DTensors over the tensor-parallel mesh, the rest (embeddings, norms) plain tensors replicated
on every rank. The head itself needs nothing here: ``linear_logprobs`` routes a ``Shard(0)`` head to its
vocab-parallel form. What transformers 5.16 / accelerate 1.13 leave open, and what this module does about it:

- transformers' loader never sets ``model._tp_size`` / ``_device_mesh``, so the Trainer does not give accelerate a
  ``ParallelismConfig(tp_size=…)`` and accelerate wraps the model in DDP, which fails on DTensor parameters.
  :func:`mark_tensor_parallel` sets both from the parameters' mesh (Axolotl's model loader does the same).
- accelerate 1.13 accepts a ``ParallelismConfig`` only with GPUs (or FSDP2 / DeepSpeed): on CPU ranks (``MULTI_CPU``)
  it refuses; :func:`explain_accelerate_refusal` turns that into a message that says what to change.
- ``torch.nn.utils.clip_grad_norm_`` (accelerate's path without FSDP2) runs one foreach kernel over a list that mixes
  DTensor and plain gradients and fails; :func:`clip_grad_norm_mixed_` computes the same norm per kind (DTensor
  norms reduced over their mesh, replicated plain gradients counted once) and scales both kinds.
- torch's optimizers fall back from the foreach kernels to per-tensor updates when a parameter is not a plain
  tensor, so ``optim="adamw_torch"`` works; but the Trainer's default with torch >= 2.8, ``adamw_torch_fused``,
  forces ``fused=True``, whose one kernel over the mixed list fails. :func:`refuse_fused_optimizer` says so, naming
  the option.

Under FSDP2 + TP accelerate turns every plain parameter into a replicated DTensor, so none of this applies there.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from edpo_plugin.ops.vocab_parallel import is_dtensor


def dtensor_mesh(model: torch.nn.Module):
    """The device mesh of ``model``'s DTensor parameters, or None when it has none."""
    for p in model.parameters():
        if is_dtensor(p):
            return p.device_mesh
    return None


def mark_tensor_parallel(model: torch.nn.Module) -> bool:
    """Set ``model._tp_size`` and ``model._device_mesh`` from its DTensor parameters when the loader left them unset.

    Returns whether ``model`` is tensor-parallel. The Trainer reads ``model.tp_size`` to configure accelerate's
    ``ParallelismConfig(tp_size=…)``; without it accelerate wraps the TP model in DDP, which cannot hold DTensors.
    """
    mesh = dtensor_mesh(model)
    if mesh is None:
        return False
    if getattr(model, "_tp_size", None) is None:
        tp_mesh = mesh["tp"] if mesh.ndim > 1 and "tp" in (mesh.mesh_dim_names or ()) else mesh
        model._tp_size = tp_mesh.size()
        model._device_mesh = tp_mesh
    return True


def explain_accelerate_refusal(err: ValueError) -> ValueError | None:
    """A clearer error for accelerate's refusal of tensor parallelism on CPU ranks, or None if ``err`` is another."""
    if "ParallelismConfig is only compatible" not in str(err) or "MULTI_CPU" not in str(err):
        return None
    return ValueError(
        "The model is tensor-parallel (loaded with tp_plan / Axolotl's tensor_parallel_size), but these ranks run on "
        "CPU, and accelerate 1.13 configures tensor parallelism (ParallelismConfig) only for multi-GPU runs. Train "
        "on GPUs, or load the model without tp_plan (tensor_parallel_size: 1) for a CPU run."
    )


@torch.no_grad()
def clip_grad_norm_mixed_(parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a tensor-parallel model whose parameters mix DTensors and plain tensors.

    The total norm counts each DTensor gradient over its whole mesh (one reduction per DTensor group) and each
    plain gradient once (it is replicated over the tensor-parallel ranks, identical on each). Every gradient is then
    scaled by ``min(1, max_norm / (total + 1e-6))``. Returns the total norm before clipping, a plain fp32 0-d tensor,
    the same on every rank.
    """
    params = [p for p in parameters if p.grad is not None]
    sharded = [p for p in params if is_dtensor(p.grad)]
    plain = [p for p in params if not is_dtensor(p.grad)]
    norms = []
    if sharded:
        norm = torch.nn.utils.get_total_norm([p.grad for p in sharded], norm_type)
        norms.append(norm.full_tensor() if is_dtensor(norm) else norm)
    if plain:
        norms.append(torch.nn.utils.get_total_norm([p.grad for p in plain], norm_type))
    if not norms:
        return torch.tensor(0.0)
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]), norm_type)
    for group in (sharded, plain):
        if group:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def refuse_fused_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """``ValueError`` naming ``optim`` if ``optimizer`` runs one fused / foreach kernel over a parameter group that
    mixes DTensor and plain parameters (it would fail at its first step)."""
    for group in optimizer.param_groups:
        kinds = {is_dtensor(p) for p in group["params"]}
        forced = [flag for flag in ("fused", "foreach") if group.get(flag)]
        if len(kinds) == 2 and forced:
            raise ValueError(
                f"{type(optimizer).__name__} with {forced[0]}=True cannot update a tensor-parallel model whose "
                "parameters mix DTensors (lm_head and the sharded projections) and plain tensors (embeddings, norms). "
                "Set optim='adamw_torch' (Axolotl: optimizer: adamw_torch), which updates parameter by parameter, or "
                "shard with FSDP2 as well (Axolotl: dp_shard_size), which makes every parameter a DTensor."
            )
