"""``EpsilonDPOTrainer``: TRL's ``DPOTrainer`` with ε-DPO's per-pair β, fused log-prob head and β controller.

Per micro-batch: the policy and reference backbones run to last hidden states (full logits are never built),
``edpo_plugin.ops.linear_logprobs`` returns the policy, reference and both ε-mix token log-probs, and
``edpo_plugin.loss.edpo_loss`` applies the sigmoid loss with β_i. Decisions are accumulated; after every optimizer
step a callback applies ``β ← β / (1 + ε·s̄)`` and logs ``kl/*``. β is written to ``edpo_state.json`` beside every
saved model and restored by ``train(resume_from_checkpoint=...)``. With ``padding_free=True`` the micro-batch's
sequences run packed into one row, without padding (``packing.py``); an ``sdpa`` model then runs its attention once
per packed sequence (``packed_attention.py``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from accelerate.utils import is_peft_model
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint
from trl import DPOTrainer
from trl.models.utils import _ForwardRedirection, disable_gradient_checkpointing
from trl.trainer.utils import maybe_gather_lm_head_ctx, use_adapter

from edpo_plugin.loss import BetaController, edpo_loss
from edpo_plugin.ops import linear_logprobs, resolve_impl
from edpo_plugin.trainer.config import validate_edpo_args
from edpo_plugin.trainer.head_check import (
    check_row,
    compare_with_model,
    dropout_off,
    merge_own,
    own_forward_logprobs,
)
from edpo_plugin.trainer.model_head import HeadView, describe_head, forward_to_head, is_peft_head_wrapper
from edpo_plugin.trainer.packable import check_packable
from edpo_plugin.trainer.packed_attention import can_share_prefixes, use_packed_attention
from edpo_plugin.trainer.packing import pack_rows, segment_logps
from edpo_plugin.trainer.tensor_parallel import (
    clip_grad_norm_mixed_,
    explain_accelerate_refusal,
    mark_tensor_parallel,
    refuse_fused_optimizer,
)

logger = logging.getLogger(__name__)

EDPO_STATE_NAME = "edpo_state.json"
_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}


class EpsilonDPOTrainer(DPOTrainer):
    """ε-DPO trainer for plain TRL; takes the same arguments as ``trl.DPOTrainer`` with an ``EpsilonDPOConfig``.

    The reference is ``ref_model`` when given, else (PEFT) the policy with its adapters disabled, else a fresh
    copy of the base model loaded by TRL.
    """

    _tag_names = ["trl", "dpo", "edpo"]
    _name = "ε-DPO"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        training_args = kwargs.get("args", args[2] if len(args) > 2 else None)
        if training_args is None:
            raise ValueError("EpsilonDPOTrainer needs `args`: an EpsilonDPOConfig (ε, β, head settings).")
        validate_edpo_args(training_args)
        for position, name in ((4, "train_dataset"), (5, "eval_dataset")):
            _check_preference_columns(kwargs.get(name, args[position] if len(args) > position else None), name)
        model = kwargs.get("model", args[0] if args else None)
        self._tensor_parallel = isinstance(model, torch.nn.Module) and mark_tensor_parallel(model)
        # TRL's DPO (1.9 to 1.16) turns padding_free off with a warning; ε-DPO packs in its own loss instead.
        self._padding_free = bool(training_args.padding_free)
        training_args.padding_free = False
        try:
            super().__init__(*args, **kwargs)
        except ValueError as err:
            raise (explain_accelerate_refusal(err) or err) from err
        finally:
            training_args.padding_free = self._padding_free
        policy_view = describe_head(self.model)  # refuses what the fused head cannot compute exactly
        if self.is_deepspeed_enabled and is_peft_head_wrapper(policy_view):
            from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

            if is_deepspeed_zero3_enabled():
                raise ValueError(
                    "PEFT modules_to_save / trainable tokens on lm_head under DeepSpeed ZeRO-3 are not supported by "
                    "ε-DPO's fused head (ZeRO-3 gathers the wrapped head only inside its own forward, which the fused "
                    "head does not call). Use ZeRO-2 or FSDP, or leave lm_head out of modules_to_save."
                )
        if self.ref_model is not None:
            _check_same_transform(policy_view, describe_head(self.accelerator.unwrap_model(self.ref_model)))
        elif is_peft_model(self.model) and "ref" in self.model.peft_config and policy_view.module is not None:
            _refuse_ref_adapter_with_head_wrapper(policy_view)
        self.beta_controller = BetaController(self.args.beta, self.args.epsilon)
        if self.is_world_process_zero():
            logger.info("ε-DPO: log-prob head %s.", _head_choice(self.args, self.model, self.accelerator.device))
        if self._padding_free:
            packed_models = [self.model]  # the policy, PEFT-wrapped or not
            if self.ref_model is not None:
                packed_models.append(self.accelerator.unwrap_model(self.ref_model))
            for model in packed_models:
                check_packable(model)  # refuses what packing would change, before any step
                causal_lm = describe_head(model).causal_lm
                attention = use_packed_attention(causal_lm)
                logger.info("ε-DPO: padding_free=True runs %s's attention as %s, one packed row per micro-batch.",
                            type(causal_lm).__name__, attention)  # fmt: skip
            self._share_prompt = self._decide_share_prompt([describe_head(m).causal_lm for m in packed_models])
            if not self.args.edpo_head_check:
                logger.warning(
                    "ε-DPO: padding_free=True with edpo_head_check=False: what the model's config and classes show is "
                    "checked (%s), not its forward on a packed micro-batch.",
                    type(policy_view.causal_lm).__name__,
                )
        else:
            self._share_prompt = False
        self._head_checked = not self.args.edpo_head_check
        self._warned_double_bos = False
        self._warned_empty_completion = False
        self._edpo_forward_redirection = _ForwardRedirection()
        self.add_callback(_BetaUpdateCallback(self))

    def _decide_share_prompt(self, packed_models: list[torch.nn.Module]) -> bool:
        """``edpo_share_prompt``: None shares prompts when every packed model can (``can_share_prefixes``), True
        requires it, False never. Never with a router auxiliary loss: it averages over the tokens the backbone ran,
        which a shared prompt would count once instead of twice."""
        if self.aux_loss_enabled:
            if self.args.edpo_share_prompt:
                raise ValueError(
                    "edpo_share_prompt=True would change the MoE router auxiliary loss, which averages over the "
                    "tokens the backbone runs (a shared prompt counts once, not twice). Leave edpo_share_prompt unset "
                    "or set router_aux_loss_coef to 0."
                )
            return False
        unable = [f"{type(m).__name__} ({m.config._attn_implementation})" for m in packed_models
                  if not can_share_prefixes(m)]  # fmt: skip
        if self.args.edpo_share_prompt and unable:
            raise ValueError(
                f"edpo_share_prompt=True needs ε-DPO's packed attention (sdpa, eager or flash_attention_2); not so for "
                f"{', '.join(unable)}. Leave edpo_share_prompt unset."
            )
        share = not unable if self.args.edpo_share_prompt is None else self.args.edpo_share_prompt
        if share:
            logger.info("ε-DPO: padding_free=True runs each pair's prompt once for both completions.")
        return share

    # ----------------------------------------------------------------------------------------------- loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("ε-DPO never materialises logits, so compute_loss cannot return model outputs.")
        inputs = self._drop_duplicate_bos(inputs)
        unwrapped = self.accelerator.unwrap_model(model)
        if not self._head_checked:  # the first micro-batch, training or evaluation
            self._head_checked = self._check_head_against_model(model, unwrapped, inputs)
        if _is_wrapped(model, unwrapped):
            # DDP / DeepSpeed / FSDP1 wrap the model: run inside the wrapper's forward so that its gradient-sync and
            # ZeRO-3 hooks fire. FSDP2 shards in place and gathers its root unit's parameters (embeddings, final
            # norm, lm_head) only inside the root's forward (and again for its backward): run the loss as that forward.
            return self._edpo_forward_redirection(model, unwrapped, self._compute_edpo_loss, unwrapped, inputs, True)
        return self._compute_edpo_loss(model, inputs, False)

    def _head_input(self, model: torch.nn.Module, view: HeadView, kwargs: dict, inside_forward: bool):
        """The model's own forward up to its output layer (:func:`forward_to_head`), under the accelerator's autocast
        as the model's own (accelerate-patched) forward runs in TRL's DPO. ``inside_forward``: the wrapper's / root's
        forward hooks already ran (forward redirection), so the model's ``forward`` is called directly."""
        run = model.forward if inside_forward else model
        with self.accelerator.autocast():
            return forward_to_head(view, lambda: run(**kwargs), kwargs["input_ids"].shape)

    def _reference_head_input(
        self, model: torch.nn.Module, view: HeadView, kwargs: dict, inside_forward: bool, gathered: contextlib.ExitStack
    ) -> tuple[torch.Tensor, HeadView, bool]:
        """``(h_ref [B, T, d], reference HeadView, whether its weights are read with adapters)``, without grad. A
        reference sharded by FSDP keeps its root unit (and an lm_head unit) gathered in ``gathered`` until the head
        has read it."""
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if self.ref_model is None:
                # PEFT: the reference is the policy with its adapters disabled (or TRL's "ref" adapter)
                with use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None):
                    return self._head_input(model, view, kwargs, inside_forward).hidden, view, False
            gathered.enter_context(_fsdp_unit_gathered(self.ref_model))
            ref_unwrapped = self.accelerator.unwrap_model(self.ref_model)
            ref_view = describe_head(ref_unwrapped)
            # its forward is called directly: a DeepSpeed engine's / FSDP2 root's hooks are not to fire outside the
            # engine's own forward (the root unit is gathered above; nested units gather in their own forward)
            hidden = self._head_input(ref_unwrapped, ref_view, kwargs, True).hidden
            gathered.enter_context(_fsdp_unit_gathered(ref_view.module))  # lm_head as its own FSDP unit
            return hidden, ref_view, True

    def _compute_edpo_loss(
        self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], inside_forward: bool
    ) -> torch.Tensor:
        mode = "train" if self.model.training else "eval"
        view = describe_head(model)
        completion = inputs["completion_mask"][:, 1:].bool()
        packed = None
        if self._padding_free:
            check_packable(model, inputs.keys())
            packed = pack_rows(
                inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"], self._share_prompt
            )
            model_kwargs = packed.model_kwargs()
            labels = packed.labels
        else:
            model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
            labels = inputs["input_ids"][:, 1:].masked_fill(~completion, -100)
        model_kwargs["use_cache"] = False

        # MoE: the policy's own forward returns its router auxiliary loss (as in TRL's DPO; the reference's is unused)
        policy_kwargs = {**model_kwargs, "output_router_logits": True} if self.aux_loss_enabled else model_kwargs
        policy_forward = self._head_input(model, view, policy_kwargs, inside_forward)
        if packed is not None:
            packed.layout.check_reached(type(view.causal_lm).__name__)
        ref_gathered = contextlib.ExitStack()
        ref_hidden, ref_view, ref_adapters = self._reference_head_input(
            model, view, model_kwargs, inside_forward, ref_gathered
        )
        if packed is not None:
            packed.layout.check_reached(f"{type(ref_view.causal_lm).__name__} (reference)")
        # padded: position t predicts token t + 1 of its row; packed: the positions that predict a label
        hidden = policy_forward.hidden[:, packed.label_index] if packed else policy_forward.hidden[:, :-1]
        ref_hidden = ref_hidden[:, packed.label_index] if packed else ref_hidden[:, :-1]

        def head_streams():
            # lm_head's parameters are read here, inside its forward: FSDP2 swaps the sharded parameters of an
            # lm_head unit for gathered ones only while that forward runs.
            weight, bias = view.weight_and_bias(adapters=True)
            ref_weight, ref_bias = ref_view.weight_and_bias(adapters=ref_adapters)
            return linear_logprobs(
                hidden,
                weight,
                labels,
                ref_hidden=ref_hidden,
                ref_weight=ref_weight,
                epsilon=self.args.epsilon,
                bias=bias,
                ref_bias=ref_bias,
                transform=view.transform,
                impl=self.args.edpo_head,
                token_chunk=self.args.edpo_head_token_chunk,
                vocab_chunk=self.args.edpo_head_vocab_chunk,
                workspace_mb=self.args.edpo_head_workspace_mb,
            )

        # The policy head runs as lm_head's own forward, so that ZeRO-3 / FSDP gather its weight for the forward
        # and, through their backward hooks, again for a backward that reads it (trainable head). A separate
        # reference head is only read in the forward: TRL's gather context is enough for it.
        ref_head_params = () if ref_view.module is view.module else tuple(ref_view.module.parameters())
        with ref_gathered, maybe_gather_lm_head_ctx(*ref_head_params):
            streams = _run_as_forward_of(view.module, head_streams)
        if packed is None:
            sums = [sequence_logps(s) for s in streams]
        else:
            sums = [segment_logps(s, packed.segment_ids, packed.n_rows) for s in streams]
        policy, ref_lp, plus, minus = (s.chunk(2) for s in sums)  # each (chosen [B], rejected [B])
        out = edpo_loss(
            policy[0], policy[1], ref_lp[0], ref_lp[1], plus[0], plus[1], minus[0], minus[1],
            beta=self.beta_controller.beta,
            epsilon=self.args.epsilon,
            label_smoothing=self.args.label_smoothing,
        )  # fmt: skip

        # As in TRL's DPO, every pair counts: a completion with no token left to score (empty, or truncated away) has
        # log-probability 0 under every model.
        loss = out.losses.mean().float()
        aux_loss = getattr(policy_forward.outputs, "aux_loss", None) if self.aux_loss_enabled else None
        # None where the model's forward computes no auxiliary loss (Llama4ForCausalLM): its objective has none; a
        # Python 0 where it collected no router logits (GraniteMoe): a zero loss
        if aux_loss is not None:
            aux_loss = torch.as_tensor(aux_loss, dtype=loss.dtype, device=loss.device)
            loss = loss + self.router_aux_loss_coef * aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss.detach()).mean().item())
        self._warn_empty_completions(completion)

        if mode == "train":
            self.beta_controller.accumulate(out.decisions)
        self._log_pair_metrics(mode, inputs, out, policy)
        backbone_tokens = model_kwargs["input_ids"].new_tensor(model_kwargs["input_ids"].numel())
        # positions one backbone forward ran on (real tokens and padding), summed over ranks, per micro-batch
        self._metrics[mode]["backbone_tokens"].append(self.accelerator.gather(backbone_tokens).sum().item())
        return loss

    def _warn_empty_completions(self, completion: torch.Tensor) -> None:
        """Once per run: say which completions have no token to score (``completion [2B, T-1]``, bool)."""
        if self._warned_empty_completion:
            return
        counts = completion.sum(-1)
        empty = int((counts == 0).sum())
        if empty:
            self._warned_empty_completion = True
            logger.warning(
                "ε-DPO: %d of %d completions in a micro-batch have no token to score (empty after the prompt, or cut "
                "by max_length=%s): their log-probability is 0 under every model and the pair still counts in the "
                "loss, as in TRL's DPO. Drop such rows or raise max_length if that is not intended.",
                empty,
                counts.numel(),
                self.args.max_length,
            )

    def _log_pair_metrics(self, mode, inputs, out, policy) -> None:
        gather = self.accelerator.gather
        metrics = self._metrics[mode]
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item()
        metrics["num_tokens"] = [self._total_train_tokens]

        def mean(t: torch.Tensor) -> float:
            return gather(t.detach().float()).mean().item()

        chosen, rejected = out.chosen_rewards, out.rejected_rewards
        metrics["rewards/chosen"].append(mean(chosen))
        metrics["rewards/rejected"].append(mean(rejected))
        metrics["rewards/accuracies"].append(mean((chosen > rejected).float()))
        metrics["rewards/margins"].append(mean(chosen - rejected))
        metrics["logps/chosen"].append(mean(policy[0]))
        metrics["logps/rejected"].append(mean(policy[1]))
        if mode == "eval":  # training logs these once per optimizer step, from the β controller
            metrics["kl/beta"].append(self.beta_controller.beta)
            metrics["kl/avg_steps"].append(mean(out.decisions))
            metrics["kl/p_epsilon_steps"].append(mean((out.decisions > 0).float()))
            metrics["kl/n_epsilon_steps"].append(mean((out.decisions < 0).float()))

    # ------------------------------------------------------------------------------------- input and head checks

    def _drop_duplicate_bos(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rows starting ``[bos, bos, …]`` (a chat template that writes BOS, tokenized again with special tokens)
        lose their first token; the rows are right-padded, so each such row shifts left by one."""
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        bos = getattr(tokenizer, "bos_token_id", None)
        ids = inputs["input_ids"]
        if bos is None or ids.shape[1] < 2:
            return inputs
        doubled = (ids[:, 0] == bos) & (ids[:, 1] == bos) & inputs["attention_mask"][:, 1].bool()
        if not bool(doubled.any()):
            return inputs
        if not self._warned_double_bos:
            self._warned_double_bos = True
            logger.warning(
                "ε-DPO: %d of %d sequences start with a doubled BOS token (the chat template writes BOS and the "
                "tokenizer adds it again); the duplicate is dropped.",
                int(doubled.sum()),
                ids.shape[0],
            )
        pad_id = getattr(tokenizer, "pad_token_id", None) or 0
        out = dict(inputs)
        for key in ("input_ids", "attention_mask", "completion_mask", "token_type_ids"):
            if key not in inputs:
                continue
            fill = pad_id if key == "input_ids" else 0
            shifted = torch.cat((inputs[key][:, 1:], torch.full_like(inputs[key][:, :1], fill)), dim=1)
            out[key] = torch.where(doubled.unsqueeze(1), shifted, inputs[key])
        if bool(doubled.all()):
            out = {k: v[:, :-1] if k in ("input_ids", "attention_mask", "completion_mask", "token_type_ids") else v
                   for k, v in out.items()}  # fmt: skip
        return out

    def _check_head_against_model(self, model, unwrapped, inputs) -> bool:
        """The first-step check (``edpo_head_check``), on the first micro-batch of training or evaluation: the fused
        head on the head input training reads (the same call path as :meth:`_compute_edpo_loss`) against the
        policy's and the reference's own plain forward, row by row — separate calls (see ``head_check.py``), with
        dropout off. Padded, one short row; padding-free, the whole micro-batch packed as training packs it. Runs on
        every rank (its forwards take the same collectives everywhere); returns False when the micro-batch has no row
        to check (then the next one is checked)."""
        if self._padding_free:
            # the micro-batch packed as training packs it, every next token a label, against each row's own forward:
            # an attention that lets a sequence see another, or a position read from the row, shows up here
            ids, mask = inputs["input_ids"], inputs["attention_mask"]
            packed = pack_rows(ids, mask, share_prefixes=self._share_prompt)
            kwargs, labels, hidden_positions = packed.model_kwargs(), packed.labels, packed.label_index
        else:
            row = check_row(inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"])
            if row is None:
                return False
            ids, mask = row
            packed = None
            kwargs = {"input_ids": ids, "attention_mask": mask}
            labels, hidden_positions = ids[:, 1:], slice(None, -1)
        kwargs["use_cache"] = False
        own_rows = [ids[i : i + 1, mask[i].bool()] for i in range(ids.shape[0]) if int(mask[i].sum()) >= 2]
        if not own_rows:
            return False
        wrapped = _is_wrapped(model, unwrapped)
        models = [unwrapped] + ([] if self.ref_model is None else [self.accelerator.unwrap_model(self.ref_model)])
        with dropout_off(models):  # both sides must compute the same function
            checks = self._head_check_pairs(model, unwrapped, kwargs, labels, hidden_positions, own_rows, packed,
                                            wrapped)  # fmt: skip
        for own_forward, got, what in checks:
            worst = compare_with_model(own_forward, got, what, packed=self._padding_free)
            logger.info("ε-DPO head check, %s: fused head within %.3g nats of the model's own log-probs.", what, worst)
        return True

    def _head_check_pairs(self, model, unwrapped, kwargs, labels, hidden_positions, own_rows, packed, wrapped):
        """``[(own forward, fused log-probs, what)]`` for the policy and the reference (see
        :meth:`_check_head_against_model`)."""

        def fused(view: HeadView, hidden: torch.Tensor, adapters: bool) -> torch.Tensor:
            weight, bias = view.weight_and_bias(adapters=adapters)
            hidden = hidden[:, hidden_positions]
            return linear_logprobs(
                hidden, weight, labels, ref_hidden=hidden, ref_weight=weight, bias=bias,
                ref_bias=bias, epsilon=self.args.epsilon, transform=view.transform, impl=self.args.edpo_head,
                token_chunk=self.args.edpo_head_token_chunk, vocab_chunk=self.args.edpo_head_vocab_chunk,
                workspace_mb=self.args.edpo_head_workspace_mb,
            ).policy  # fmt: skip

        def own(forward_model: torch.nn.Module, view: HeadView):
            parts = []
            for row in own_rows:
                row_kwargs = {"input_ids": row, "attention_mask": torch.ones_like(row), "use_cache": False}
                forward = lambda kw=row_kwargs: forward_model(**kw).logits  # noqa: E731
                parts.append(own_forward_logprobs(forward, view.module, row[:, 1:], view.transform.scale))
            return merge_own(parts)

        def training_path(kw: dict) -> tuple[torch.Tensor, HeadView, bool]:
            view = describe_head(unwrapped)
            policy = self._head_input(unwrapped, view, kw, wrapped).hidden
            if packed is not None:
                packed.layout.check_reached(type(view.causal_lm).__name__)
            with contextlib.ExitStack() as gathered:
                ref = self._reference_head_input(unwrapped, view, kw, wrapped, gathered)
            if packed is not None:
                packed.layout.check_reached(f"{type(ref[1].causal_lm).__name__} (reference)")
            return policy, ref

        with torch.no_grad(), self.accelerator.autocast():
            view = describe_head(unwrapped)
            if wrapped:
                policy_hidden, (ref_hidden, ref_view, ref_adapters) = self._edpo_forward_redirection(
                    model, unwrapped, training_path, kwargs
                )
            else:
                policy_hidden, (ref_hidden, ref_view, ref_adapters) = training_path(kwargs)
            checks = []
            own_policy = own(model, view)
            with _fsdp_unit_gathered(model):
                got = _run_as_forward_of(view.module, lambda: fused(view, policy_hidden, True))
            checks.append((own_policy, got, f"{type(view.causal_lm).__name__} (policy)"))
            if self.ref_model is None:
                with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                    own_ref = own(model, view)
                with _fsdp_unit_gathered(model):
                    got = _run_as_forward_of(view.module, lambda: fused(view, ref_hidden, False))
            else:
                own_ref = own(self.ref_model, ref_view)
                with _fsdp_unit_gathered(self.ref_model), _fsdp_unit_gathered(ref_view.module):
                    got = _run_as_forward_of(ref_view.module, lambda: fused(ref_view, ref_hidden, ref_adapters))
            checks.append((own_ref, got, f"{type(view.causal_lm).__name__} (reference)"))
        return checks

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self._tensor_parallel and not self.is_fsdp_enabled:  # FSDP2 + TP: every parameter becomes a DTensor
            refuse_fused_optimizer(optimizer)
        return optimizer

    def _clip_grad_norm(self, model):
        if self._tensor_parallel and not _is_fsdp2(model):  # DTensor and plain parameters side by side
            return clip_grad_norm_mixed_(model.parameters(), self.args.max_grad_norm)
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None and self._tensor_parallel and not _is_fsdp2(model):
            grad_norm = clip_grad_norm_mixed_(model.parameters(), float("inf"))
        return super()._get_grad_norm(model, grad_norm)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ------------------------------------------------------------------------------------------------- β

    def _apply_beta_update(self) -> None:
        """Called once per optimizer step (after ``optimizer.step``): move β and log what moved it."""
        logged = self.beta_controller.step()
        if logged is None:
            return
        for key, value in logged.items():
            self._metrics["train"][f"kl/{key}"].append(value)
        self.beta = self.beta_controller.beta

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        self._save_edpo_state(output_dir if output_dir is not None else self.args.output_dir)

    def _save_edpo_state(self, output_dir: str) -> None:
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            with open(os.path.join(output_dir, EDPO_STATE_NAME), "w") as f:
                json.dump(self.beta_controller.state_dict(), f, indent=2)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, str):
            state_file = os.path.join(checkpoint, EDPO_STATE_NAME)
            if os.path.isfile(state_file):
                with open(state_file) as f:
                    self.beta_controller.load_state_dict(json.load(f))
                self.beta = self.beta_controller.beta
                if self.is_world_process_zero():
                    logger.info("ε-DPO: resuming with β = %r from %s.", self.beta, state_file)
            else:
                logger.warning(
                    "Checkpoint %s has no %s (not written by ε-DPO): β restarts from beta=%s.",
                    checkpoint,
                    EDPO_STATE_NAME,
                    self.args.beta,
                )
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)


class _BetaUpdateCallback(TrainerCallback):
    """Applies the β update at the end of every optimizer step (training only; evaluation never moves β)."""

    def __init__(self, trainer: EpsilonDPOTrainer) -> None:
        self._trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self._trainer._apply_beta_update()

    def on_train_end(self, args, state, control, **kwargs):
        # Integrations (Axolotl) may save the final model without ``save_model``: keep the final β beside it.
        self._trainer._save_edpo_state(args.output_dir)


def sequence_logps(token_logps: torch.Tensor) -> torch.Tensor:
    """float64 ``[B]``: per-sequence sums of ``[B, T]`` token log-probs. float64 because the decisions compare sums
    that differ by O(ε) and must not flip by rounding (fp32 sums of a few thousand tokens do)."""
    return token_logps.double().sum(-1)


def _is_wrapped(model: torch.nn.Module, unwrapped: torch.nn.Module) -> bool:
    """Whether the loss must run inside ``model``'s forward (a DDP / DeepSpeed / FSDP1 wrapper, or an FSDP2 root)."""
    return unwrapped is not model or _is_fsdp2(unwrapped)


def _is_fsdp2(module: torch.nn.Module) -> bool:
    """Whether ``module`` was sharded in place by FSDP2 (``torch.distributed.fsdp.fully_shard``)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def _fsdp_unit_gathered(module: torch.nn.Module) -> Iterator[None]:
    """Gather an FSDP unit's own parameters (for a model's root: embeddings, final norm, and lm_head when it is not a
    unit of its own) for a no-grad read outside its forward; nested units gather in their own forward.
    ``module`` is an FSDP1 wrapper or an FSDP2 module; anything else is left as it is."""
    if _is_fsdp2(module):
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


def _run_as_forward_of(module: torch.nn.Module, fn: Any) -> Any:
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


# Columns that hold a prompt or a conversation under another name; TRL's DPO reads none of them.
_PROMPT_ELSEWHERE = ("messages", "conversations", "conversation", "dialogue", "history", "question", "instruction",
                     "query", "input", "context")  # fmt: skip
_TRL_FORMATS = (
    "TRL's DPO takes an explicit prompt, columns 'prompt', 'chosen', 'rejected' all strings or all message lists "
    "([{'role': 'user', 'content': ...}, ...], the completions holding the assistant turn), or an implicit one: "
    "'chosen' and 'rejected' each holding the whole conversation, whose common start (the same first messages, or "
    "characters) TRL takes as the prompt. examples/prepare_hh.py writes the explicit form as train.trl.jsonl "
    "(docs/usage.md, Plain TRL)."
)


def _check_preference_columns(dataset: Any, name: str) -> None:
    """A preference dataset needs ``chosen``, ``rejected`` and a prompt: a ``prompt`` column, or the common start of
    ``chosen`` and ``rejected`` (TRL 1.9–1.16 extract it when there is no ``prompt`` column). Refused, naming the
    columns and the formats: a missing column; no ``prompt`` column beside one TRL does not read that holds the
    prompt (``messages``: the pairs would train with no prompt); null values; a row mixing strings and message
    lists; a prompt empty in every row. A prompt empty in some rows is a warning."""
    datasets = dataset.values() if isinstance(dataset, dict) else [dataset]
    for ds in datasets:
        columns = getattr(ds, "column_names", None)
        if not columns:  # None, or an IterableDataset whose features are unknown until read
            continue
        missing = [c for c in ("chosen", "rejected") if c not in columns]
        if missing:
            raise ValueError(
                f"{name} has no {' / '.join(repr(m) for m in missing)} column (columns: {columns}). {_TRL_FORMATS}"
            )
        unread = [c for c in columns if c in _PROMPT_ELSEWHERE] if "prompt" not in columns else []
        unread_prompt = (
            f"{name} has no 'prompt' column (columns: {columns}); TRL's DPO does not read {unread}, so the pairs would "
            f"train on 'chosen' and 'rejected' with no prompt. Put the prompt in a 'prompt' column. {_TRL_FORMATS}"
        )
        if not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")):  # streamed: rows are not read up front
            if unread:
                raise ValueError(unread_prompt)
            continue
        fields = [c for c in ("prompt", "chosen", "rejected") if c in columns]
        values = {column: ds[column] for column in fields}
        for column in ("chosen", "rejected"):
            empty = [i for i, value in enumerate(values[column]) if value is None]
            if empty:
                raise ValueError(f"{name} rows {empty[:10]} have no {column!r} value (null). Drop or fix these rows.")
        prompt_sizes = []
        for i, row in enumerate(zip(*values.values(), strict=True)):
            kinds = {"messages" if isinstance(v, list) else type(v).__name__ for v in row}
            if len(kinds) > 1 or not kinds <= {"messages", "str"}:
                described = ", ".join(f"{c!r} is {type(v).__name__}" for c, v in zip(fields, row, strict=True))
                raise ValueError(
                    f"{name} row {i}: {described}; TRL needs them all strings or all message lists. {_TRL_FORMATS}"
                )
            prompt_sizes.append(len(row[0]) if "prompt" in values else _common_start(row[0], row[1]))
        no_prompt = [i for i, size in enumerate(prompt_sizes) if size == 0]
        conversations_with_prompt = not no_prompt and all(isinstance(v, list) for v in values["chosen"])
        if unread and not conversations_with_prompt:  # a shared start of two answers is no prompt
            raise ValueError(unread_prompt)
        where = "its 'prompt' is empty" if "prompt" in values else "'chosen' and 'rejected' share no start"
        if no_prompt and len(no_prompt) == len(prompt_sizes):
            raise ValueError(
                f"{name} has no prompt: {where} in every row (columns: {columns}), so the pairs would train with no "
                f"prompt. {_TRL_FORMATS}"
            )
        if no_prompt:
            logger.warning(
                "ε-DPO: %s rows %s (%d of %d) have no prompt (%s): they train on the completions alone.",
                name, no_prompt[:10], len(no_prompt), len(prompt_sizes), where,
            )  # fmt: skip


def _common_start(chosen: str | list, rejected: str | list) -> int:
    """The length (messages or characters) of the start ``chosen`` and ``rejected`` share: TRL's implicit prompt."""
    size = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        size += 1
    return size


def _head_choice(args: Any, model: torch.nn.Module, device: torch.device) -> str:
    """Which head ``args.edpo_head`` runs, as a phrase: ``'chunked' (edpo_head='auto', float32 on cpu)``. The head
    reads hidden states in the model's dtype (under autocast too, in decoders whose residual stream keeps it);
    ``auto`` on CUDA runs the Triton self-check here, cached for the first training step."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    picked = resolve_impl(args.edpo_head, device, dtype)
    return f"{picked!r} (edpo_head={args.edpo_head!r}, {str(dtype).removeprefix('torch.')} on {device.type})"


def _check_same_transform(policy: HeadView, reference: HeadView) -> None:
    if policy.transform != reference.transform:
        raise ValueError(
            f"The reference model's logit transform {reference.transform} differs from the policy's "
            f"{policy.transform} ({type(reference.causal_lm).__name__} vs {type(policy.causal_lm).__name__}): ε-DPO "
            "mixes their logits and needs one architecture. Pass a reference of the policy's architecture."
        )


def _refuse_ref_adapter_with_head_wrapper(view: HeadView) -> None:
    from peft.utils.other import AuxiliaryTrainingWrapper

    if isinstance(view.module, AuxiliaryTrainingWrapper):
        raise ValueError(
            "A PEFT 'ref' adapter as the reference together with modules_to_save / trainable tokens on lm_head is not "
            "supported: the fused head cannot tell which lm_head copy the 'ref' adapter uses. Pass ref_model instead."
        )
