"""YAML fields of the ε-DPO Axolotl plugin, validated with the rest of the Axolotl config."""

from __future__ import annotations

import difflib
from typing import Any

import torch
from pydantic import BaseModel, Field, ValidationInfo, create_model, field_validator, model_validator

from edpo_plugin.trainer.options import OPTIONS, Spelling, check_option, check_settings

TRAINER_CLS = "edpo_plugin.axolotl.trainer.AxolotlEpsilonDPOTrainer"
# YAML field -> training-args field (EpsilonDPOFields), from the options table
CFG_TO_ARGS = {option.yaml: option.name for option in OPTIONS}
_OPTION_BY_YAML = {option.yaml: option for option in OPTIONS}
# Axolotl's YAML fields -> the DPOConfig fields its DPO builder fills from them (axolotl.core.trainers.dpo's
# DPOStrategy; rl_beta in its RL builder); context_parallel_size is Axolotl's own (see options.REFUSALS)
DPO_YAML_TO_TRL = {
    "rl_beta": "beta",
    "dpo_loss_type": "loss_type",
    "dpo_loss_weights": "loss_weights",
    "dpo_label_smoothing": "label_smoothing",
    "dpo_use_weighting": "use_weighting",
    "dpo_use_liger_kernel": "use_liger_kernel",
    "dpo_padding_free": "padding_free",
    "precompute_ref_log_probs": "precompute_ref_log_probs",
    "context_parallel_size": "context_parallel_size",
}
YAML_SPELLING = Spelling(
    method="rl: edpo", names={trl: yaml for yaml, trl in [*CFG_TO_ARGS.items(), *DPO_YAML_TO_TRL.items()]}, yaml=True
)
# Set by Axolotl commands that load a config but never train: `inference` (which also sets rl to None), `merge-lora`,
# `preprocess` (often on a machine without the training GPU).
_NOT_TRAINING = ("inference", "merge_lora", "is_preprocess")


def trl_settings(data: dict[str, Any]) -> tuple[dict[str, Any], Spelling]:
    """A raw Axolotl config's ε-DPO and DPO settings under their TRL names, and the spelling that names each as this
    config writes it (``trl.beta`` where it sets β, as Axolotl's builder prefers it; the deprecated
    ``sequence_parallel_degree`` where it stands for ``context_parallel_size``)."""
    values = {trl: data.get(yaml) for yaml, trl in [*CFG_TO_ARGS.items(), *DPO_YAML_TO_TRL.items()]}
    names = dict(YAML_SPELLING.names)
    trl = data.get("trl")
    if isinstance(trl, dict) and trl.get("beta") is not None:
        values["beta"], names["beta"] = trl["beta"], "trl.beta"
    elif values["beta"] is None and data.get("dpo_beta") is not None:  # Axolotl moves it to rl_beta later
        values["beta"], names["beta"] = data["dpo_beta"], "dpo_beta"
    if not values["context_parallel_size"] and data.get("sequence_parallel_degree"):
        values["context_parallel_size"] = data["sequence_parallel_degree"]
        names["context_parallel_size"] = "sequence_parallel_degree"
    return values, Spelling(method=YAML_SPELLING.method, names=names, yaml=True)


class EDPOChecks(BaseModel):
    """The checks of ``rl: edpo`` settings; :data:`EDPOArgs` adds the fields (from the options table)."""

    @field_validator(*CFG_TO_ARGS, check_fields=False)
    @classmethod
    def check_option(cls, value: Any, info: ValidationInfo) -> Any:
        """Each option's own check from the options table, on the value pydantic has parsed."""
        check_option(_OPTION_BY_YAML[info.field_name], value, YAML_SPELLING)
        return value

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
        """Refuse, at config validation, the DPO settings that ε-DPO cannot honour (``options.check_settings``, only
        for ``rl: edpo`` runs), naming the YAML field."""
        if not isinstance(data, dict) or data.get("trainer_cls") != TRAINER_CLS:
            return data
        values, spelling = trl_settings(data)
        if data.get("orpo_alpha") is not None:
            raise ValueError(
                "orpo_alpha is ORPO's weight, and with rl: edpo Axolotl would pass it on as the initial β (when "
                "neither trl.beta nor rl_beta is set). Remove orpo_alpha; set the initial β with rl_beta."
            )
        # the machine that validates is the one that trains (not so for a Ray driver: Axolotl skips its GPU checks
        # there too, nor for the commands that never train)
        training_here = not any(data.get(k) for k in (*_NOT_TRAINING, "use_ray"))
        device = ("cuda" if torch.cuda.is_available() else "cpu") if training_here else None
        check_settings(values, spelling, device)
        return data


EDPOArgs = create_model(
    "EDPOArgs",
    __base__=EDPOChecks,
    __module__=__name__,
    __doc__="``rl: edpo`` settings: one field per row of the options table (``edpo_plugin.trainer.options``), and "
    "``router_aux_loss_coef``. ``rl_beta`` (Axolotl's own field) is the initial β.",
    **{option.yaml: (option.type, Field(default=option.default, description=option.help)) for option in OPTIONS},
    router_aux_loss_coef=(
        float | None,
        Field(
            default=None,
            ge=0.0,
            description="MoE models: weight of the router load-balancing loss added to the ε-DPO loss (TRL's DPO "
            "rule); unset keeps TRL's default (0.001), 0 turns it off. Axolotl itself does not pass this field to DPO.",
        ),
    ),
)


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
