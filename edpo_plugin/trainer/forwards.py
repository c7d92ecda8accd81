"""The two forwards of a micro-batch and the fused head on them: the policy and the reference run to the input of
their output layer (full logits are never built), then ``edpo_plugin.ops.linear_logprobs`` gives the four token
log-prob streams. Used by the loss and by the first-step check alike, so that the check runs what training runs.

The reference is ``ref_model`` when the trainer has one, else (PEFT) the policy with its adapters disabled, or TRL's
``"ref"`` adapter. Wrapped and sharded models are met as :mod:`distributed` describes.
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import torch
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import maybe_gather_lm_head_ctx, use_adapter

from edpo_plugin.ops import LinearLogprobs, linear_logprobs, resolve_impl
from edpo_plugin.trainer.batch import MicroBatch
from edpo_plugin.trainer.distributed import fsdp_unit_gathered, run_as_forward_of
from edpo_plugin.trainer.model_head import ForwardToHead, HeadView, describe_head, forward_to_head


class HeadSettings(NamedTuple):
    """The fused head's options (``EpsilonDPOConfig``'s)."""

    epsilon: float
    impl: str
    token_chunk: int | None
    vocab_chunk: int | None
    workspace_mb: int

    @classmethod
    def from_args(cls, args: Any) -> HeadSettings:
        return cls(args.epsilon, args.edpo_head, args.edpo_head_token_chunk, args.edpo_head_vocab_chunk,
                   args.edpo_head_workspace_mb)  # fmt: skip

    def describe(self, model: torch.nn.Module, device: torch.device) -> str:
        """Which head runs, as a phrase: ``'chunked' (edpo_head='auto', float32 on cpu)``. The head reads hidden
        states in the model's dtype; ``auto`` on CUDA runs the Triton self-check here, cached for the first step."""
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        picked = resolve_impl(self.impl, device, dtype)
        return f"{picked!r} (edpo_head={self.impl!r}, {str(dtype).removeprefix('torch.')} on {device.type})"


class Forwards(NamedTuple):
    """What the policy's and the reference's forwards gave for one micro-batch."""

    policy: ForwardToHead  # hidden [.., T, d] (with grad) and the forward's own outputs (aux_loss, …)
    view: HeadView
    ref_hidden: torch.Tensor  # [.., T, d], no grad
    ref_view: HeadView
    ref_adapters: bool  # whether the reference's head weights are read with adapters on
    ref_gathered: contextlib.ExitStack  # a sharded reference's units, held gathered until its head has read them


class Backbones:
    """Runs one micro-batch through the policy and the reference, and the fused head on their head inputs.

    ``trainer``: the ``DPOTrainer`` whose ``accelerator`` (autocast, unwrapping), ``ref_model`` (a separate reference
    or None, read at each call: a wrapper may replace it after set-up), ``model`` (gradient checkpointing is switched
    off for the reference's forward) and ``args.gradient_checkpointing_kwargs`` are used.
    """

    def __init__(self, trainer: Any, settings: HeadSettings) -> None:
        self.trainer = trainer
        self.settings = settings

    @property
    def accelerator(self):
        return self.trainer.accelerator

    @property
    def ref_model(self) -> torch.nn.Module | None:
        return self.trainer.ref_model

    def head_input(self, model: torch.nn.Module, view: HeadView, kwargs: dict, inside_forward: bool) -> ForwardToHead:
        """The model's own forward up to its output layer (:func:`forward_to_head`), under the accelerator's autocast
        as the model's own (accelerate-patched) forward runs in TRL's DPO. ``inside_forward``: the wrapper's / root's
        forward hooks already ran (forward redirection), so the model's ``forward`` is called directly."""
        run = model.forward if inside_forward else model
        with self.accelerator.autocast():
            return forward_to_head(view, lambda: run(**kwargs), kwargs["input_ids"].shape)

    def reference(self, model: torch.nn.Module, view: HeadView, kwargs: dict, inside_forward: bool,
                  gathered: contextlib.ExitStack) -> tuple[torch.Tensor, HeadView, bool]:  # fmt: skip
        """``(h_ref, reference HeadView, whether its weights are read with adapters)``, without grad. A reference
        sharded by FSDP keeps its root unit (and an lm_head unit) gathered in ``gathered`` until its head is read."""
        policy_model, checkpointing = self.trainer.model, self.trainer.args.gradient_checkpointing_kwargs
        with torch.no_grad(), disable_gradient_checkpointing(policy_model, checkpointing):
            if self.ref_model is None:  # PEFT: the policy with its adapters disabled (or TRL's "ref" adapter)
                with use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None):
                    return self.head_input(model, view, kwargs, inside_forward).hidden, view, False
            gathered.enter_context(fsdp_unit_gathered(self.ref_model))
            ref_unwrapped = self.accelerator.unwrap_model(self.ref_model)
            ref_view = describe_head(ref_unwrapped)
            # called directly: a DeepSpeed engine's / FSDP2 root's hooks are not to fire outside the engine's own
            # forward (the root unit is gathered above; nested units gather in their own forward)
            hidden = self.head_input(ref_unwrapped, ref_view, kwargs, True).hidden
            gathered.enter_context(fsdp_unit_gathered(ref_view.module))  # lm_head as its own FSDP unit
            return hidden, ref_view, True

    def run(self, model: torch.nn.Module, batch: MicroBatch, inside_forward: bool, router_logits: bool) -> Forwards:
        """Both forwards of ``batch``; ``router_logits``: the policy's forward returns its MoE router auxiliary loss
        (as in TRL's DPO; the reference's is unused)."""
        view = describe_head(model)
        kwargs = {**batch.model_kwargs(), "use_cache": False}
        policy_kwargs = {**kwargs, "output_router_logits": True} if router_logits else kwargs
        policy = self.head_input(model, view, policy_kwargs, inside_forward)
        batch.forward_done(view.causal_lm, type(view.causal_lm).__name__)
        gathered = contextlib.ExitStack()
        ref_hidden, ref_view, ref_adapters = self.reference(model, view, kwargs, inside_forward, gathered)
        batch.forward_done(ref_view.causal_lm, f"{type(ref_view.causal_lm).__name__} (reference)")
        return Forwards(policy, view, ref_hidden, ref_view, ref_adapters, gathered)

    def streams(self, forwards: Forwards, batch: MicroBatch) -> LinearLogprobs:
        """The four token log-prob streams of ``batch``'s labels. The policy head runs as lm_head's own forward, so
        that ZeRO-3 / FSDP gather its weight for the forward and, through their backward hooks, again for a backward
        that reads it (trainable head); a separate reference head is only read, inside TRL's gather context."""
        fw = forwards

        def head() -> LinearLogprobs:  # lm_head's parameters are read inside its forward (FSDP2 swaps them in there)
            weight, bias = fw.view.weight_and_bias(adapters=True)
            ref_weight, ref_bias = fw.ref_view.weight_and_bias(adapters=fw.ref_adapters)
            return self.fused(batch.head_input(fw.policy.hidden), weight, bias, batch.labels, fw.view,
                              ref=(batch.head_input(fw.ref_hidden), ref_weight, ref_bias))  # fmt: skip

        ref_head_params = () if fw.ref_view.module is fw.view.module else tuple(fw.ref_view.module.parameters())
        with fw.ref_gathered, maybe_gather_lm_head_ctx(*ref_head_params):
            return run_as_forward_of(fw.view.module, head)

    def fused(self, hidden, weight, bias, labels, view: HeadView, ref=None) -> LinearLogprobs:
        """``linear_logprobs`` with the trainer's head settings; ``ref``: ``(hidden, weight, bias)`` of the reference
        (default: the policy's own, for the first-step check's one-sided streams)."""
        ref_hidden, ref_weight, ref_bias = ref if ref is not None else (hidden, weight, bias)
        s = self.settings
        return linear_logprobs(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight,
                               epsilon=s.epsilon, bias=bias, ref_bias=ref_bias, transform=view.transform,
                               impl=s.impl, token_chunk=s.token_chunk, vocab_chunk=s.vocab_chunk,
                               workspace_mb=s.workspace_mb)  # fmt: skip
