"""``EpsilonDPOConfig``: TRL's ``DPOConfig`` plus ε and the log-prob head settings, validated on creation."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from trl import DPOConfig

from edpo_plugin.loss import check_epsilon_beta
from edpo_plugin.ops import IMPLS
from edpo_plugin.ops.dispatch import check_triton_usable
from edpo_plugin.ops.plan import DEFAULT_WORKSPACE_MB


@dataclass
class EpsilonDPOFields:
    """ε-DPO's own training arguments: one definition, mixed into ``EpsilonDPOConfig`` and (through the Axolotl
    plugin's training-args mixin) into Axolotl's DPO config, so they reach ``args.to_dict()`` and hparams logs."""

    epsilon: float = field(
        default=0.01,
        metadata={"help": "ε of the perturbed policies and of the β update; 0 < ε < 1 (paper: 0.005, 0.01, 0.02)."},
    )
    edpo_head: str = field(
        default="auto",
        metadata={
            "help": "Log-prob head: 'auto' (the modelled-best path on CUDA, chunked elsewhere), 'chunked', 'triton' "
            "or 'naive' (materialises full-vocabulary logits, as the authors' reference trainer does).",
            "choices": list(IMPLS),
        },
    )
    edpo_head_token_chunk: int | None = field(
        default=None, metadata={"help": "Completion tokens per chunk in the fused head; None: the planner's."}
    )
    edpo_head_vocab_chunk: int | None = field(
        default=None, metadata={"help": "Vocabulary columns per tile in the fused head; None: the planner's."}
    )
    edpo_head_workspace_mb: int = field(
        default=DEFAULT_WORKSPACE_MB,
        metadata={"help": "CUDA: the most memory (MiB) the fused head's plan may hold beyond its inputs and outputs."},
    )
    edpo_head_check: bool = field(
        default=True,
        metadata={
            "help": "On the first training micro-batch, compare the fused head's policy and reference log-probs on "
            "one short row with the models' own forward, and stop on a disagreement (an architecture whose logits "
            "are not what the head computes). One extra short forward per model, once per run."
        },
    )
    edpo_share_prompt: bool | None = field(
        default=None,
        metadata={
            "help": "With padding_free=True: run each pair's shared prefix (its prompt) once, for both completions. "
            "Needs plain causal SDPA attention (CPU); None: whenever the models have it, True: require it, False: "
            "pack chosen and rejected sequences whole."
        },
    )


EDPO_FIELD_NAMES = tuple(f.name for f in fields(EpsilonDPOFields))


@dataclass
class EpsilonDPOConfig(EpsilonDPOFields, DPOConfig):
    """Configuration of :class:`~edpo_plugin.trainer.EpsilonDPOTrainer`: TRL's ``DPOConfig`` plus
    :class:`EpsilonDPOFields`.

    ``beta`` is the initial β; it then moves once per optimizer step by ``β ← β / (1 + ε·s̄)``.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_edpo_args(self)


def validate_edpo_args(args: Any) -> None:
    """Refuse settings that ε-DPO cannot honour, naming the option. ``args`` is a ``DPOConfig`` with ε fields."""
    for name in EDPO_FIELD_NAMES:
        if not hasattr(args, name):
            raise TypeError(f"{type(args).__name__} has no `{name}`: pass an EpsilonDPOConfig to EpsilonDPOTrainer.")
    check_epsilon_beta(args.beta, args.epsilon)
    loss_type = [args.loss_type] if isinstance(args.loss_type, str) else list(args.loss_type)
    if loss_type != ["sigmoid"]:
        raise ValueError(f"ε-DPO defines only the sigmoid loss: set loss_type='sigmoid' (got {args.loss_type!r}).")
    if args.loss_weights not in (None, [1.0]):
        raise ValueError(f"loss_weights={args.loss_weights!r} has no meaning for ε-DPO's single loss; leave it unset.")
    if args.precompute_ref_log_probs:
        raise ValueError(
            "precompute_ref_log_probs=True cannot be used with ε-DPO: the perturbed policies mix policy and reference "
            "logits over the whole vocabulary at every completion token, so the reference forward must run each "
            "step. Set precompute_ref_log_probs=False."
        )
    if getattr(args, "reference_free", False):
        raise ValueError("reference_free=True is impossible for ε-DPO: the perturbed policies need the reference.")
    if args.f_divergence_type != "reverse_kl":
        raise ValueError("ε-DPO uses the reverse-KL (standard DPO) form: set f_divergence_type='reverse_kl'.")
    if args.ld_alpha is not None:
        raise ValueError("ld_alpha (LD-DPO length weighting) is not part of ε-DPO: leave ld_alpha unset.")
    if args.use_weighting:
        raise ValueError("use_weighting (WPO) is not part of ε-DPO: set use_weighting=False.")
    if args.use_liger_kernel:
        raise ValueError(
            "use_liger_kernel=True selects TRL's Liger DPO loss, which ε-DPO replaces with its own fused head: "
            "set use_liger_kernel=False and choose the head with edpo_head."
        )
    if not 0.0 <= args.label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {args.label_smoothing!r}.")
    if args.edpo_head not in IMPLS:
        raise ValueError(f"edpo_head must be one of {IMPLS}, got {args.edpo_head!r}.")
    if args.edpo_head == "triton":  # here, not at the first step after the model and data have loaded
        on_cuda = torch.cuda.is_available() and not getattr(args, "use_cpu", False)
        check_triton_usable("cuda" if on_cuda else "cpu", "edpo_head='triton'")
    if args.edpo_share_prompt and not args.padding_free:
        raise ValueError("edpo_share_prompt=True shares prompts inside packed rows: it needs padding_free=True.")
    for name in ("edpo_head_token_chunk", "edpo_head_vocab_chunk", "edpo_head_workspace_mb"):
        if getattr(args, name) is not None and int(getattr(args, name)) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(args, name)!r}.")
