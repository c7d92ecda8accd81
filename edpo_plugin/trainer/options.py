"""ε-DPO's options and the DPO settings it refuses, each written once.

``OPTIONS`` is the options table: for each ε-DPO option its ``EpsilonDPOConfig`` (TRL) name, its Axolotl YAML name,
type, default, help and what is valid. :class:`EpsilonDPOFields` (mixed into ``EpsilonDPOConfig`` and, through the
Axolotl plugin, into Axolotl's training args) is built from it, and so are the plugin's YAML model and its YAML →
training-args map (``edpo_plugin.axolotl.args``); tests hold the README's options table against it.

``REFUSALS`` and :func:`check_settings` are the one set of refusals of DPO settings ε-DPO cannot honour, read from a
mapping of TRL names. ``validate_edpo_args`` runs them on a TRL config; the Axolotl validator maps its YAML names to
TRL names first and passes a :class:`Spelling` that names each field as the YAML writes it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, make_dataclass
from typing import Any

from edpo_plugin.ops import IMPLS
from edpo_plugin.ops.dispatch import check_triton_usable
from edpo_plugin.ops.plan import DEFAULT_WORKSPACE_MB


def _any(value: Any) -> bool:
    return True


def _positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _positive_or_unset(value: Any) -> bool:
    return value is None or _positive(value)


@dataclass(frozen=True)
class Option:
    """One ε-DPO option: ``name`` in ``EpsilonDPOConfig`` (TRL), ``yaml`` in an Axolotl config, the value's ``type``,
    ``default`` and ``help`` (TRL's field metadata, the YAML field's description). ``valid(value)`` is true for an
    accepted value; a refused one reads "<name> must <must>, got <value>.". ``choices`` feeds argparse (TRL's CLI)."""

    name: str
    yaml: str
    type: Any
    default: Any
    help: str
    valid: Callable[[Any], bool] = _any
    must: str = ""
    choices: tuple[str, ...] | None = None


OPTIONS: tuple[Option, ...] = (
    Option(
        "epsilon", "edpo_epsilon", float, 0.01,
        "ε of the perturbed policies and of the β update; 0 < ε < 1 (paper: 0.005, 0.01, 0.02).",
        valid=lambda eps: math.isfinite(eps) and 0 < eps < 1,
        must="lie strictly between 0 and 1 (at ε >= 1 the (1-ε)·z_θ + ε·z_ref mix is no longer a mix; the paper "
        "uses 0.005-0.02)",
    ),
    Option(
        "edpo_head", "edpo_head", str, "auto",
        "Log-prob head: 'auto' (the modelled-best path on CUDA, chunked elsewhere), 'chunked', 'triton' (CUDA only) "
        "or 'naive' (materialises full-vocabulary logits, as the authors' reference trainer does).",
        valid=lambda head: head in IMPLS, must=f"be one of {', '.join(IMPLS)}", choices=IMPLS,
    ),
    Option(
        "edpo_head_token_chunk", "edpo_head_token_chunk", int | None, None,
        "Completion tokens per chunk in the fused head; unset (None): the planner's.",
        valid=_positive_or_unset, must="be an integer >= 1 or unset",
    ),
    Option(
        "edpo_head_vocab_chunk", "edpo_head_vocab_chunk", int | None, None,
        "Vocabulary columns per tile in the fused head; unset (None): the planner's.",
        valid=_positive_or_unset, must="be an integer >= 1 or unset",
    ),
    Option(
        "edpo_head_workspace_mb", "edpo_head_workspace_mb", int, DEFAULT_WORKSPACE_MB,
        "CUDA: the most memory (MiB) the fused head's plan may hold beyond its inputs and outputs.",
        valid=_positive, must="be an integer >= 1",
    ),
    Option(
        "edpo_head_check", "edpo_head_check", bool, True,
        "On the first training micro-batch, compare the fused head's policy and reference log-probs on one short row "
        "with the models' own forward, and stop on a disagreement (an architecture whose logits are not what the head "
        "computes). One extra short forward per model, once per run.",
    ),
    Option(
        "edpo_share_prompt", "edpo_share_prompt", bool | None, None,
        "With padding-free batches (padding_free; dpo_padding_free in Axolotl): run each pair's shared prefix (its "
        "prompt) once, for both completions. Needs plain causal SDPA attention (CPU); unset (None): whenever the "
        "models have it, True: require it, False: pack chosen and rejected sequences whole.",
    ),
)  # fmt: skip
OPTION_NAMES = tuple(option.name for option in OPTIONS)


def _field(option: Option) -> Any:
    metadata: dict[str, Any] = {"help": option.help}  # HfArgumentParser passes metadata to argparse: nothing else
    if option.choices:
        metadata["choices"] = list(option.choices)
    return field(default=option.default, metadata=metadata)


EpsilonDPOFields = make_dataclass(
    "EpsilonDPOFields",
    [(option.name, option.type, _field(option)) for option in OPTIONS],
    namespace={
        "__module__": __name__,
        "__doc__": "ε-DPO's own training arguments, one field per row of ``OPTIONS`` (help in the field metadata, as "
        "TRL's): mixed into ``EpsilonDPOConfig`` and (through the Axolotl plugin's training-args mixin) into "
        "Axolotl's DPO config, so they reach ``args.to_dict()`` and hparams logs.",
    },
)


@dataclass(frozen=True)
class Spelling:
    """How a refusal names settings: as in a TRL config (``name=value``, repr values; the method is "ε-DPO") or as
    in an Axolotl YAML (``yaml_name: value``; "rl: edpo"). ``names`` maps a TRL name to the user's, where it differs."""

    method: str = "ε-DPO"
    names: Mapping[str, str] = field(default_factory=dict)
    yaml: bool = False

    def name(self, trl_name: str) -> str:
        return self.names.get(trl_name, trl_name)

    def value(self, value: Any) -> str:
        if not self.yaml:
            return repr(value)
        return value if isinstance(value, str) else json.dumps(value, default=str)

    def setting(self, trl_name: str, value: Any) -> str:
        if self.yaml:
            return f"{self.name(trl_name)}: {self.value(value)}"
        return f"{self.name(trl_name)}={value!r}"


TRL_SPELLING = Spelling()


def check_option(option: Option, value: Any, spelling: Spelling = TRL_SPELLING) -> None:
    """Raise ``ValueError`` naming ``option`` as ``spelling`` writes it if ``value`` is not valid for it (a value of
    the wrong type included)."""
    try:
        valid = bool(option.valid(value))
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(f"{spelling.name(option.name)} must {option.must}, got {spelling.value(value)}.")


@dataclass(frozen=True)
class Refusal:
    """A DPO setting ε-DPO cannot honour: TRL's ``field`` set (not None) to a value for which ``refused(value)``.
    ``message`` is formatted with ``setting`` (the field and its value, as the user wrote them), ``name``, ``value``,
    ``fix`` (the field set to ``fix``), ``method`` ("ε-DPO" or "rl: edpo") and each option's name (``{edpo_head}``: as
    the user writes it); it says the fix."""

    field: str
    refused: Callable[[Any], bool]
    message: str
    fix: Any = None


def _refuses(refusal: Refusal, value: Any) -> bool:
    try:
        return bool(refusal.refused(value))
    except (TypeError, ValueError):  # a value of the wrong type: refused, naming the field
        return True


def _splits_sequences(config: Any) -> bool:
    """Whether accelerate's ``ParallelismConfig`` splits sequences across ranks (context or sequence parallelism)."""
    return (getattr(config, "cp_size", 1) or 1) * (getattr(config, "sp_size", 1) or 1) > 1


def _loss_types(loss_type: Any) -> list[str]:
    return [loss_type] if isinstance(loss_type, str) else list(loss_type)


REFUSALS: tuple[Refusal, ...] = (
    Refusal(
        "beta", lambda beta: not (math.isfinite(beta) and beta > 0),
        "{name} must be a finite number > 0, got {value}; the paper uses 0.01 (UltraFeedback).",
    ),
    Refusal(
        "loss_type", lambda loss_type: _loss_types(loss_type) != ["sigmoid"],
        "{method} defines only the sigmoid loss, not {setting}: set {fix} or leave {name} unset.", fix=["sigmoid"],
    ),
    Refusal(
        "loss_weights", lambda weights: weights != [1.0],
        "{setting} has no meaning for {method}'s single loss: leave {name} unset.",
    ),
    Refusal(
        "precompute_ref_log_probs", bool,
        "{setting} cannot be used with {method}: the perturbed policies mix policy and reference logits over the "
        "whole vocabulary at every completion token, so the reference forward must run each step. Set {fix}.",
        fix=False,
    ),
    # a DPOConfig field of TRL before 1.0 (1.9-1.16 have none): refused wherever a config carries it
    Refusal(
        "reference_free", bool,
        "{setting} is impossible for {method}: the perturbed policies need the reference. Set {fix}.", fix=False,
    ),
    Refusal(
        "f_divergence_type", lambda divergence: getattr(divergence, "value", divergence) != "reverse_kl",
        "{method} uses the reverse-KL (standard DPO) form, not {setting}: set {fix}.", fix="reverse_kl",
    ),
    Refusal(
        "ld_alpha", _any,
        "{setting} (LD-DPO length weighting) is not part of {method}: leave {name} unset.",
    ),
    Refusal(
        "use_weighting", bool,
        "{setting} (WPO weighting) is not part of {method}: set {fix}.", fix=False,
    ),
    Refusal(
        "sync_ref_model", bool,
        "{setting} (TR-DPO) moves the reference toward the policy during training, but {method}'s perturbed policies "
        "and β update are defined against a fixed reference: set {fix}.", fix=False,
    ),
    Refusal(
        "use_liger_kernel", bool,
        "{setting} selects TRL's Liger DPO loss, which {method} replaces with its own fused head: set {fix} and "
        "choose the head with {edpo_head}.", fix=False,
    ),
    Refusal(
        "label_smoothing", lambda smoothing: not 0.0 <= smoothing < 0.5,
        "{name} must lie in [0, 0.5), got {value}.",
    ),
    # transformers' TrainingArguments: accelerate's ParallelismConfig, context / sequence parallelism split sequences
    Refusal(
        "parallelism_config", _splits_sequences,
        "{name} with cp_size or sp_size > 1 (context / sequence parallelism) is not supported by {method}: the fused "
        "head and the ε-decisions need each sequence whole on one rank. Leave cp_size and sp_size at 1 (tensor "
        "parallelism, FSDP and DDP are supported).",
    ),
    # Axolotl's name (TRL configs have no field of it): Axolotl does not wire context parallelism into its DPO pipeline
    Refusal(
        "context_parallel_size", lambda size: int(size) > 1,
        "{setting} is not supported by {method}: Axolotl does not wire context parallelism into its DPO pipeline, and "
        "the fused head needs each sequence whole. Remove {name} (tensor_parallel_size and dp_shard_size are "
        "supported).",
    ),
)  # fmt: skip


def check_settings(values: Mapping[str, Any], spelling: Spelling = TRL_SPELLING, device: str | None = None) -> None:
    """Raise ``ValueError`` on the first setting in ``values`` (TRL names; None or absent: unset) that ε-DPO cannot
    honour: each of ``REFUSALS``, ``edpo_share_prompt`` without ``padding_free``, and ``edpo_head='triton'`` where the
    run's ``device`` ("cuda", "cpu"; None: not known where the run trains, not checked) cannot run it. Each
    message names the field as ``spelling`` writes it, and the fix."""
    for refusal in REFUSALS:
        value = values.get(refusal.field)
        if value is not None and _refuses(refusal, value):
            raise ValueError(
                refusal.message.format(
                    setting=spelling.setting(refusal.field, value),
                    name=spelling.name(refusal.field),
                    value=spelling.value(value),
                    fix=spelling.setting(refusal.field, refusal.fix),
                    method=spelling.method,
                    **{name: spelling.name(name) for name in OPTION_NAMES},
                )
            )
    if values.get("edpo_share_prompt") and not values.get("padding_free"):
        raise ValueError(
            f"{spelling.setting('edpo_share_prompt', True)} shares prompts inside packed rows: it needs "
            f"{spelling.setting('padding_free', True)}."
        )
    if values.get("edpo_head") == "triton" and device is not None:  # at validation, not after the model has loaded
        check_triton_usable(device, spelling.setting("edpo_head", "triton"))
