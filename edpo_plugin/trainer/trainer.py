"""``EpsilonDPOTrainer``: TRL's ``DPOTrainer`` with ε-DPO's per-pair β, fused log-prob head and β controller.

One ε-DPO step per micro-batch: the batch is laid out padded or packed (:mod:`batch`), the policy and the reference
run to the input of their output layer and the fused head gives the policy, reference and both ε-mix token log-probs
(:mod:`forwards`; full logits are never built), and ``edpo_plugin.loss.edpo_loss`` applies the sigmoid loss with
β_i. Decisions are accumulated; after every optimizer step a callback applies ``β ← β / (1 + ε·s̄)`` and logs
``kl/*``. β is written to ``edpo_state.json`` beside every saved model and restored by
``train(resume_from_checkpoint=...)``. The first micro-batch, of training or evaluation, is checked against the
models' own forward (:mod:`head_check`).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
from accelerate.utils import is_peft_model
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint
from trl import DPOTrainer
from trl.models.utils import _ForwardRedirection

from edpo_plugin.loss import BetaController, PairLogps, edpo_loss
from edpo_plugin.trainer.batch import BatchLayout
from edpo_plugin.trainer.config import validate_edpo_args
from edpo_plugin.trainer.distributed import is_fsdp2, is_wrapped, refuse_zero3_head_wrapper
from edpo_plugin.trainer.forwards import Backbones, HeadSettings
from edpo_plugin.trainer.head_check import run_check
from edpo_plugin.trainer.model_head import HeadView, describe_head
from edpo_plugin.trainer.packable import prepare_for_packing
from edpo_plugin.trainer.preference_data import check_preference_columns, drop_duplicate_bos
from edpo_plugin.trainer.tensor_parallel import (
    clip_grad_norm_mixed_,
    explain_accelerate_refusal,
    mark_tensor_parallel,
    refuse_fused_optimizer,
)

logger = logging.getLogger(__name__)

EDPO_STATE_NAME = "edpo_state.json"


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
            check_preference_columns(kwargs.get(name, args[position] if len(args) > position else None), name)
        model = kwargs.get("model", args[0] if args else None)
        self._tensor_parallel = isinstance(model, torch.nn.Module) and mark_tensor_parallel(model)
        # TRL's DPO (1.9 to 1.16) turns padding_free off with a warning; ε-DPO packs in its own loss instead.
        padding_free = bool(training_args.padding_free)
        training_args.padding_free = False
        try:
            super().__init__(*args, **kwargs)
        except ValueError as err:
            raise (explain_accelerate_refusal(err) or err) from err
        finally:
            training_args.padding_free = padding_free
        self._check_heads()
        self.beta_controller = BetaController(self.args.beta, self.args.epsilon)
        settings = HeadSettings.from_args(self.args)
        self.backbones = Backbones(self, settings)
        if self.is_world_process_zero():
            logger.info("ε-DPO: log-prob head %s.", settings.describe(self.model, self.accelerator.device))
        self.batch_layout = BatchLayout(padding_free, padding_free and self._prepare_for_packing())
        self._head_checked = not self.args.edpo_head_check
        self._warned: set[str] = set()
        self._edpo_forward_redirection = _ForwardRedirection()
        self.add_callback(_BetaUpdateCallback(self))

    def _check_heads(self) -> None:
        """Refuse what the fused head cannot compute exactly (``describe_head``, ZeRO-3 head wrappers, a reference
        of another architecture)."""
        policy_view = describe_head(self.model)
        refuse_zero3_head_wrapper(policy_view, self.is_deepspeed_enabled)
        if self.ref_model is not None:
            _check_same_transform(policy_view, describe_head(self.accelerator.unwrap_model(self.ref_model)))
        elif is_peft_model(self.model) and "ref" in self.model.peft_config and policy_view.module is not None:
            _refuse_ref_adapter_with_head_wrapper(policy_view)

    def _prepare_for_packing(self) -> bool:
        models = [self.model] + ([] if self.ref_model is None else [self.accelerator.unwrap_model(self.ref_model)])
        share = prepare_for_packing(models, self.args.edpo_share_prompt, self.aux_loss_enabled)
        if not self.args.edpo_head_check:
            logger.warning(
                "ε-DPO: padding_free=True with edpo_head_check=False: what the model's config and classes show is "
                "checked (%s), not its forward on a packed micro-batch.",
                type(describe_head(self.model).causal_lm).__name__,
            )
        return share

    # ----------------------------------------------------------------------------------------------- loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("ε-DPO never materialises logits, so compute_loss cannot return model outputs.")
        inputs = self._drop_duplicate_bos(inputs)
        unwrapped = self.accelerator.unwrap_model(model)
        if not self._head_checked:  # the first micro-batch, training or evaluation
            self._head_checked = run_check(self.backbones, self.batch_layout, model, unwrapped, inputs,
                                           self._edpo_forward_redirection)  # fmt: skip
        if is_wrapped(model, unwrapped):
            # DDP / DeepSpeed / FSDP1 wrap the model: run inside the wrapper's forward so that its gradient-sync and
            # ZeRO-3 hooks fire. FSDP2 shards in place and gathers its root unit's parameters (embeddings, final
            # norm, lm_head) only inside the root's forward (and again for its backward): run the loss as that forward.
            return self._edpo_forward_redirection(model, unwrapped, self._compute_edpo_loss, unwrapped, inputs, True)
        return self._compute_edpo_loss(model, inputs, False)

    def _compute_edpo_loss(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], inside_forward: bool):
        mode = "train" if self.model.training else "eval"
        batch = self.batch_layout.lay_out(inputs, scored=inputs["completion_mask"])
        forwards = self.backbones.run(model, batch, inside_forward, router_logits=self.aux_loss_enabled)
        streams = self.backbones.streams(forwards, batch)
        policy, ref, plus, minus = (PairLogps(*batch.sequence_logps(s).chunk(2)) for s in streams)
        out = edpo_loss(
            policy=policy, ref=ref, plus=plus, minus=minus,
            beta=self.beta_controller.beta,
            epsilon=self.args.epsilon,
            label_smoothing=self.args.label_smoothing,
        )  # fmt: skip
        # As in TRL's DPO, every pair counts: a completion with no token left to score (empty, or truncated away) has
        # log-probability 0 under every model.
        loss = out.losses.mean().float() + self._router_aux_loss(forwards.policy.outputs, mode)
        self._warn_empty_completions(inputs["completion_mask"][:, 1:].bool())
        if mode == "train":
            self.beta_controller.accumulate(out.decisions)
        self._log_pair_metrics(mode, inputs, out, policy, batch.backbone_positions)
        return loss

    def _router_aux_loss(self, outputs: Any, mode: str) -> torch.Tensor | float:
        """``router_aux_loss_coef × aux_loss`` of the policy's forward (TRL's DPO rule). None where the model's forward
        computes none (Llama4ForCausalLM: its objective has none); a Python 0 where it collected no router logits
        (GraniteMoe in transformers 5.16): a zero loss."""
        aux_loss = getattr(outputs, "aux_loss", None) if self.aux_loss_enabled else None
        if aux_loss is None:
            return 0.0
        aux_loss = torch.as_tensor(aux_loss, dtype=torch.float32, device=self.accelerator.device)
        self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss.detach()).mean().item())
        return self.router_aux_loss_coef * aux_loss

    def _warn_empty_completions(self, completion: torch.Tensor) -> None:
        """Once per run: say which completions have no token to score (``completion [2B, T-1]``, bool)."""
        if "empty_completion" in self._warned:
            return
        counts = completion.sum(-1)
        empty = int((counts == 0).sum())
        if empty:
            self._warned.add("empty_completion")
            logger.warning(
                "ε-DPO: %d of %d completions in a micro-batch have no token to score (empty after the prompt, or cut "
                "by max_length=%s): their log-probability is 0 under every model and the pair still counts in the "
                "loss, as in TRL's DPO. Drop such rows or raise max_length if that is not intended.",
                empty,
                counts.numel(),
                self.args.max_length,
            )

    def _log_pair_metrics(self, mode, inputs, out, policy, backbone_positions: int) -> None:
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
        metrics["logps/chosen"].append(mean(policy.chosen))
        metrics["logps/rejected"].append(mean(policy.rejected))
        if mode == "eval":  # training logs these once per optimizer step, from the β controller
            metrics["kl/beta"].append(self.beta_controller.beta)
            metrics["kl/avg_steps"].append(mean(out.decisions))
            metrics["kl/p_epsilon_steps"].append(mean((out.decisions > 0).float()))
            metrics["kl/n_epsilon_steps"].append(mean((out.decisions < 0).float()))
        # positions one backbone forward ran on (real tokens and padding), summed over ranks, per micro-batch
        positions = inputs["input_ids"].new_tensor(backbone_positions)
        metrics["backbone_tokens"].append(gather(positions).sum().item())

    def _drop_duplicate_bos(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rows starting ``[bos, bos, …]`` lose the duplicate (:func:`drop_duplicate_bos`), with one warning."""
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        inputs, n_doubled = drop_duplicate_bos(
            inputs, getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "pad_token_id", None)
        )
        if n_doubled and "double_bos" not in self._warned:
            self._warned.add("double_bos")
            logger.warning(
                "ε-DPO: %d of %d sequences start with a doubled BOS token (the chat template writes BOS and the "
                "tokenizer adds it again); the duplicate is dropped.",
                n_doubled,
                inputs["input_ids"].shape[0],
            )
        return inputs

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self._tensor_parallel and not self.is_fsdp_enabled:  # FSDP2 + TP: every parameter becomes a DTensor
            refuse_fused_optimizer(optimizer)
        return optimizer

    def _clip_grad_norm(self, model):
        if self._tensor_parallel and not is_fsdp2(model):  # DTensor and plain parameters side by side
            return clip_grad_norm_mixed_(model.parameters(), self.args.max_grad_norm)
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None and self._tensor_parallel and not is_fsdp2(model):
            grad_norm = clip_grad_norm_mixed_(model.parameters(), float("inf"))
        return super()._get_grad_norm(model, grad_norm)

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
