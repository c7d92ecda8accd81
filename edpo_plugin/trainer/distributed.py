"""Wrapped and sharded models (DDP, DeepSpeed ZeRO-3, FSDP1, FSDP2) as the fused head meets them: where a loss must
run inside a wrapper's forward, how an FSDP unit's parameters are gathered for a read outside its forward, and how a
function runs as a module's own forward so that the wrapping hooks fire. Tensor parallelism has its own module
(:mod:`tensor_parallel`).

Imports torch only (DeepSpeed's and PEFT's helpers lazily).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from edpo_plugin.trainer.model_head import HeadView, is_peft_head_wrapper


def is_wrapped(model: torch.nn.Module, unwrapped: torch.nn.Module) -> bool:
    """Whether the loss must run inside ``model``'s forward (a DDP / DeepSpeed / FSDP1 wrapper, or an FSDP2 root)."""
    return unwrapped is not model or is_fsdp2(unwrapped)


def is_fsdp2(module: torch.nn.Module) -> bool:
    """Whether ``module`` was sharded in place by FSDP2 (``torch.distributed.fsdp.fully_shard``)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def fsdp_unit_gathered(module: torch.nn.Module) -> Iterator[None]:
    """Gather an FSDP unit's own parameters (for a model's root: embeddings, final norm, and lm_head when it is not a
    unit of its own) for a no-grad read outside its forward; nested units gather in their own forward.
    ``module`` is an FSDP1 wrapper or an FSDP2 module; anything else is left as it is."""
    if is_fsdp2(module):
        module.unshard()
        try:
            yield
        finally:
            module.reshard()
        return
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FullyShardedDataParallel

        if isinstance(module, FullyShardedDataParallel):
            with FullyShardedDataParallel.summon_full_params(module, recurse=False, writeback=False):
                yield
            return
    yield


def run_as_forward_of(module: torch.nn.Module, fn: Callable[[], Any]) -> Any:
    """Call ``fn()`` as ``module``'s forward, so that the hooks of ZeRO-3 / FSDP wrapping ``module`` fire. An FSDP1
    wrapper keeps its own forward (it gathers the parameters) and the module it wraps runs ``fn``."""
    inner = getattr(module, "_fsdp_wrapped_module", module)
    patched_before = inner.__dict__.get("forward")  # an instance-level forward some integrations install
    inner.forward = lambda *_args, **_kwargs: fn()
    try:
        return module()
    finally:
        if patched_before is None:
            del inner.forward
        else:
            inner.forward = patched_before


def refuse_zero3_head_wrapper(view: HeadView, deepspeed_enabled: bool) -> None:
    """PEFT ``modules_to_save`` / trainable tokens on ``lm_head`` cannot run under ZeRO-3: refused by name."""
    if not (deepspeed_enabled and is_peft_head_wrapper(view)):
        return
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        raise ValueError(
            "PEFT modules_to_save / trainable tokens on lm_head under DeepSpeed ZeRO-3 are not supported by ε-DPO's "
            "fused head (ZeRO-3 gathers the wrapped head only inside its own forward, which the fused head does not "
            "call). Use ZeRO-2 or FSDP, or leave lm_head out of modules_to_save."
        )
