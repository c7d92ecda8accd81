"""YAML fields of the ε-DPO Axolotl plugin, validated with the rest of the Axolotl config."""

from __future__ import annotations

import difflib
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field, model_validator

from edpo_plugin.ops.dispatch import check_triton_usable
from edpo_plugin.trainer.config import EpsilonDPOFields

TRAINER_CLS = "edpo_plugin.axolotl.trainer.AxolotlEpsilonDPOTrainer"
# YAML field -> training-args field (EpsilonDPOFields); the defaults are EpsilonDPOFields' own
CFG_TO_ARGS = {
    "edpo_epsilon": "epsilon",
    "edpo_head": "edpo_head",
    "edpo_head_token_chunk": "edpo_head_token_chunk",
    "edpo_head_vocab_chunk": "edpo_head_vocab_chunk",
    "edpo_head_workspace_mb": "edpo_head_workspace_mb",
    "edpo_head_check": "edpo_head_check",
    "edpo_share_prompt": "edpo_share_prompt",
}
_DEFAULTS = EpsilonDPOFields()
# Set by Axolotl commands that load a config but never train: `inference` (which also sets rl to None), `merge-lora`,
# `preprocess` (often on a machine without the training GPU).
_NOT_TRAINING = ("inference", "merge_lora", "is_preprocess")


class EDPOArgs(BaseModel):
    """``rl: edpo`` settings. ``rl_beta`` is the initial β (Axolotl's own field); these add ε and the head."""

    edpo_epsilon: float = Field(
        default=_DEFAULTS.epsilon, gt=0.0, lt=1.0, description="ε of the perturbation, 0 < ε < 1."
    )
    edpo_head: Literal["auto", "naive", "chunked", "triton"] = Field(
        default=_DEFAULTS.edpo_head,
        description="Log-prob head: auto (the modelled-best path on CUDA, chunked elsewhere), chunked, triton "
        "(CUDA only) or naive.",
    )
    edpo_head_token_chunk: int | None = Field(
        default=_DEFAULTS.edpo_head_token_chunk, ge=1, description="Completion tokens per chunk; unset: the planner's."
    )
    edpo_head_vocab_chunk: int | None = Field(
        default=_DEFAULTS.edpo_head_vocab_chunk, ge=1, description="Vocabulary columns per tile; unset: the planner's."
    )
    edpo_head_workspace_mb: int = Field(
        default=_DEFAULTS.edpo_head_workspace_mb, ge=1, description="CUDA: MiB the head's plan may hold (workspace)."
    )
    edpo_head_check: bool = Field(
        default=_DEFAULTS.edpo_head_check,
        description="Check the fused head against the models' own forward on the first micro-batch.",
    )
    edpo_share_prompt: bool | None = Field(
        default=_DEFAULTS.edpo_share_prompt,
        description="With dpo_padding_free: run each pair's prompt once for both completions (plain causal SDPA "
        "attention only); unset: whenever the model allows, true: require it, false: never.",
    )
    router_aux_loss_coef: float | None = Field(
        default=None,
        ge=0.0,
        description="MoE models: weight of the router load-balancing loss added to the ε-DPO loss (TRL's DPO rule); "
        "unset keeps TRL's default (0.001), 0 turns it off. Axolotl itself does not pass this field to DPO.",
    )

    @model_validator(mode="before")
    @classmethod
    def check_edpo_fields(cls, data: Any) -> Any:
        """With the plugin listed: a key that looks like an ε-DPO option but is none (a typo would otherwise train
        silently at the default) is refused naming the nearest option, and ε-DPO options without ``rl: edpo``
        (which they would not reach) are refused naming ``rl: edpo``."""
        if not isinstance(data, dict):
            return data
        known = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}
        for key in data:
            if isinstance(key, str) and key not in known:
                _refuse_near_miss(key)
        given = [key for key in CFG_TO_ARGS if data.get(key) is not None]
        if given and data.get("trainer_cls") != TRAINER_CLS and not data.get("inference"):  # it sets rl to None
            rl = f"rl: {data['rl']}" if data.get("rl") else "no rl (supervised fine-tuning)"
            raise ValueError(
                f"{', '.join(given)} {'acts' if len(given) == 1 else 'act'} only with rl: edpo; this config has {rl}, "
                "which would train without ε-DPO. Set rl: edpo, or remove the edpo_* fields."
            )
        return data

    @model_validator(mode="before")
    @classmethod
    def check_edpo_compatible(cls, data: Any) -> Any:
        """Refuse, at config validation, the DPO options that ε-DPO cannot honour (only for ``rl: edpo`` runs)."""
        if not isinstance(data, dict) or data.get("trainer_cls") != TRAINER_CLS:
            return data
        if data.get("edpo_head") == "triton" and not any(data.get(k) for k in (*_NOT_TRAINING, "use_ray")):
            # the machine that validates is the one that trains (not so for a Ray driver: Axolotl skips its GPU
            # checks there too)
            check_triton_usable("cuda" if torch.cuda.is_available() else "cpu", "edpo_head: triton")
        beta = data.get("rl_beta")
        trl = data.get("trl") or {}
        if isinstance(trl, dict) and trl.get("beta") is not None:
            beta = trl["beta"]
        if beta is not None and not float(beta) > 0:
            raise ValueError(f"rl_beta must be > 0 for rl: edpo (got {beta}); the paper uses 0.01 (UltraFeedback).")
        loss_type = data.get("dpo_loss_type")
        if loss_type not in (None, "sigmoid", ["sigmoid"]):
            raise ValueError(f"rl: edpo defines only the sigmoid loss: remove dpo_loss_type (got {loss_type!r}).")
        if data.get("dpo_loss_weights") not in (None, [1.0]):
            raise ValueError("dpo_loss_weights has no meaning for rl: edpo's single loss: remove it.")
        if data.get("precompute_ref_log_probs"):
            raise ValueError(
                "precompute_ref_log_probs cannot be used with rl: edpo: the perturbed policies need the reference "
                "model's logits at every step. Remove precompute_ref_log_probs."
            )
        if data.get("dpo_use_weighting"):
            raise ValueError("dpo_use_weighting (WPO) is not part of ε-DPO: remove it for rl: edpo.")
        if data.get("dpo_use_liger_kernel"):
            raise ValueError(
                "dpo_use_liger_kernel selects TRL's Liger DPO loss; rl: edpo has its own fused head. Remove "
                "dpo_use_liger_kernel and pick the head with edpo_head."
            )
        if data.get("edpo_share_prompt") and not data.get("dpo_padding_free"):
            raise ValueError("edpo_share_prompt: true shares prompts inside packed rows: set dpo_padding_free: true.")
        context_parallel = data.get("context_parallel_size") or data.get("sequence_parallel_degree") or 1
        if int(context_parallel) > 1:
            raise ValueError(
                f"context_parallel_size={context_parallel} is not supported by rl: edpo: Axolotl does not wire context "
                "parallelism into its DPO pipeline, and the fused head needs each sequence whole. Remove "
                "context_parallel_size (tensor_parallel_size and dp_shard_size are supported)."
            )
        return data


def _refuse_near_miss(key: str) -> None:
    """Refuse ``key`` (no field of the config) if it looks like an ε-DPO option: ``edpo…``, within a typo of one, or
    an ``EpsilonDPOConfig`` name whose YAML name differs (``epsilon``)."""
    options = list(CFG_TO_ARGS)
    yaml_name = {arg: name for name, arg in CFG_TO_ARGS.items() if arg != name}.get(key)
    if yaml_name:
        raise ValueError(f"{key} is EpsilonDPOConfig's name; in an Axolotl config ε-DPO's option is {yaml_name}.")
    normalised = key.lower().replace("-", "_")
    near = difflib.get_close_matches(normalised, options, n=1, cutoff=0.6 if normalised.startswith("edpo") else 0.85)
    if near or normalised.startswith("edpo"):
        hint = f"did you mean {near[0]}? " if near else ""
        raise ValueError(f"{key} is not an ε-DPO option: {hint}The ε-DPO options are {', '.join(options)}.")
