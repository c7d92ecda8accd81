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
from edpo_plugin.ops import linear_logprobs
from edpo_plugin.trainer.config import validate_edpo_args
from edpo_plugin.trainer.head_check import (
    check_pair,
    check_row,
    compare_with_model,
    merge_own,
    own_forward_logprobs,
)
from edpo_plugin.trainer.model_head import HeadView, describe_head, forward_to_head, is_peft_head_wrapper
from edpo_plugin.trainer.packed_attention import PACKED_SDPA, can_share_prefixes, use_packed_sdpa
from edpo_plugin.trainer.packing import PackedBatch, check_packable, pack_rows, segment_logps
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
        if self._padding_free:
            packed_models = [policy_view.causal_lm]
            if self.ref_model is not None:
                packed_models.append(describe_head(self.accelerator.unwrap_model(self.ref_model)).causal_lm)
            for causal_lm in packed_models:
                check_packable(causal_lm, ())
                # SDPA over the whole packed row would compute every cross-sequence score only to mask it
                if use_packed_sdpa(causal_lm):
                    logger.info("ε-DPO: padding_free=True runs %s's SDPA once per packed sequence (%s).",
                                type(causal_lm).__name__, PACKED_SDPA)  # fmt: skip
            self._share_prompt = self._decide_share_prompt(packed_models)
            if not self.args.edpo_head_check:
                logger.warning(
                    "ε-DPO: padding_free=True with edpo_head_check=False: nothing checks that %s's attention keeps "
                    "the packed sequences apart.",
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
                f"edpo_share_prompt=True needs plain causal attention run by {PACKED_SDPA} (an sdpa model without "
                f"sliding window or chunked attention); not so for {', '.join(unable)}. Use "
                "attn_implementation='sdpa' or leave edpo_share_prompt unset."
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
        if not self._head_checked and self.model.training:
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
            check_packable(view.causal_lm, inputs.keys())
            packed = pack_rows(
                inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"], self._share_prompt
            )
            model_kwargs = packed_model_kwargs(packed)
            labels = packed.labels
        else:
            model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
            labels = inputs["input_ids"][:, 1:].masked_fill(~completion, -100)
        model_kwargs["use_cache"] = False

        # MoE: the policy's own forward returns its router auxiliary loss (as in TRL's DPO; the reference's is unused)
        policy_kwargs = {**model_kwargs, "output_router_logits": True} if self.aux_loss_enabled else model_kwargs
        policy_forward = self._head_input(model, view, policy_kwargs, inside_forward)
        ref_gathered = contextlib.ExitStack()
        ref_hidden, ref_view, ref_adapters = self._reference_head_input(
            model, view, model_kwargs, inside_forward, ref_gathered
        )
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

        # A pair with no completion token left (empty completion, or truncated away) carries no signal: it is
        # left out of the loss and of β's statistics, with a warning.
        n_completion = completion.sum(-1).chunk(2)
        contributes = (n_completion[0] > 0) & (n_completion[1] > 0)
        n_pairs = contributes.sum()
        loss = ((out.losses * contributes).sum() / n_pairs.clamp(min=1)).float()
        # None where the model's forward computes no auxiliary loss (Llama4ForCausalLM): its objective has none
        aux_loss = getattr(policy_forward.outputs, "aux_loss", None) if self.aux_loss_enabled else None
        if aux_loss is not None:
            loss = loss + self.router_aux_loss_coef * aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss.detach()).mean().item())
        if not self._warned_empty_completion and not bool(contributes.all()):
            self._warned_empty_completion = True
            logger.warning(
                "ε-DPO: a pair whose chosen or rejected completion has no token after truncation (max_length=%s) was "
                "left out of the loss and of the β update. Raise max_length or drop such rows from the dataset.",
                self.args.max_length,
            )

        if mode == "train":
            self.beta_controller.accumulate(out.decisions, contributes)
        self._log_pair_metrics(mode, inputs, out, policy, contributes)
        backbone_tokens = model_kwargs["input_ids"].new_tensor(model_kwargs["input_ids"].numel())
        # positions one backbone forward ran on (real tokens and padding), summed over ranks, per micro-batch
        self._metrics[mode]["backbone_tokens"].append(self.accelerator.gather(backbone_tokens).sum().item())
        return loss

    def _log_pair_metrics(self, mode, inputs, out, policy, contributes) -> None:
        gather = self.accelerator.gather
        metrics = self._metrics[mode]
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item()
        metrics["num_tokens"] = [self._total_train_tokens]
        keep = gather(contributes.float())
        n = keep.sum().clamp(min=1)

        def mean(t: torch.Tensor) -> float:
            return ((gather(t.detach().float()) * keep).sum() / n).item()

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
        """The first-step check (``edpo_head_check``): on one short row, the fused head on the head input training
        reads (the same call path as :meth:`_compute_edpo_loss`) against the policy's and the reference's own plain
        forward — two separate calls (see ``head_check.py``). Runs on every rank's first training micro-batch (its
        forwards take the same collectives everywhere); returns True."""
        if self._padding_free:
            # two sequences packed the way training packs them, against each one's own unpadded forward: an
            # attention that lets the second see the first, or ignores the restarted positions, shows up here
            ids, mask = check_pair(inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"])
            packed = pack_rows(ids, mask, share_prefixes=self._share_prompt)
            kwargs = {**packed_model_kwargs(packed), "use_cache": False}
            labels, scored = packed.labels, torch.ones_like(packed.labels, dtype=torch.bool)
            hidden_positions = packed.label_index
        else:
            ids, mask = check_row(inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"])
            kwargs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
            labels, scored = ids[:, 1:], torch.ones_like(ids[:, 1:], dtype=torch.bool)
            hidden_positions = slice(None, -1)
        own_rows = [ids[i : i + 1, : int(n)] for i, n in enumerate(mask.sum(dim=1))]
        wrapped = _is_wrapped(model, unwrapped)

        def fused(view: HeadView, hidden: torch.Tensor, adapters: bool) -> torch.Tensor:
            weight, bias = view.weight_and_bias(adapters=adapters)
            hidden = hidden[:, hidden_positions]
            return linear_logprobs(
                hidden, weight, labels, ref_hidden=hidden, ref_weight=weight, bias=bias,
                ref_bias=bias, epsilon=self.args.epsilon, transform=view.transform, impl=self.args.edpo_head,
                token_chunk=self.args.edpo_head_token_chunk, vocab_chunk=self.args.edpo_head_vocab_chunk,
                workspace_mb=self.args.edpo_head_workspace_mb,
            ).policy[scored].unsqueeze(0)  # fmt: skip

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
            with contextlib.ExitStack() as gathered:
                ref = self._reference_head_input(unwrapped, view, kw, wrapped, gathered)
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
        for own_forward, got, what in checks:
            worst = compare_with_model(own_forward, got, what, packed=self._padding_free)
            logger.info("ε-DPO head check, %s: fused head within %.3g nats of the model's own log-probs.", what, worst)
        return True

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


def packed_model_kwargs(packed: PackedBatch) -> dict[str, torch.Tensor]:
    """Forward arguments of a packed row: token ids and restarting ``position_ids`` ``[1, N]``, and no attention
    mask, so that transformers splits attention at every sequence start."""
    return {"input_ids": packed.input_ids, "position_ids": packed.position_ids}


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


def _check_preference_columns(dataset: Any, name: str) -> None:
    """A preference dataset needs ``chosen`` and ``rejected`` (``prompt`` may be implicit in them)."""
    datasets = dataset.values() if isinstance(dataset, dict) else [dataset]
    for ds in datasets:
        columns = getattr(ds, "column_names", None)
        if not columns:  # None, or an IterableDataset whose features are unknown until read
            continue
        missing = [c for c in ("chosen", "rejected") if c not in columns]
        if missing:
            raise ValueError(
                f"{name} has no {' / '.join(repr(m) for m in missing)} column (columns: {columns}). ε-DPO needs "
                "preference rows with 'prompt', 'chosen' and 'rejected' (TRL's preference format)."
            )
        if hasattr(ds, "__getitem__") and hasattr(ds, "__len__"):  # map-style: columns can be read whole
            for column in ("chosen", "rejected"):
                empty = [i for i, value in enumerate(ds[column]) if value is None]
                if empty:
                    raise ValueError(
                        f"{name} rows {empty[:10]} have no {column!r} value (null). Drop or fix these rows."
                    )


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
