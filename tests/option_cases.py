"""One table of the settings ε-DPO refuses, as a TRL ``EpsilonDPOConfig`` and as an Axolotl YAML write them, with what
each refusal must say in the user's spelling (the field and the fix); and settings at the edge that both accept.
tests/trainer/test_options.py holds the TRL config to it, tests/axolotl/test_args.py Axolotl's validation."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from accelerate.parallelism_config import ParallelismConfig


class Refused(NamedTuple):
    """A setting refused by both sides. ``guards``: the TRL name of the option or ``options.REFUSALS`` entry it
    exercises. ``trl`` / ``yaml``: the settings (None: that side has no such field); ``trl_says`` / ``yaml_says``: a
    piece of the message naming the field as written and the fix."""

    case: str
    guards: str
    trl: dict[str, Any] | None
    trl_says: str
    yaml: dict[str, Any] | None = None
    yaml_says: str = ""


REFUSED = [
    Refused("epsilon_zero", "epsilon", {"epsilon": 0.0}, "epsilon must lie strictly between 0 and 1",
            {"edpo_epsilon": 0.0}, "edpo_epsilon must lie strictly between 0 and 1"),
    Refused("epsilon_one", "epsilon", {"epsilon": 1.0}, "epsilon must lie strictly between 0 and 1 (at ε >= 1",
            {"edpo_epsilon": 1.0}, "edpo_epsilon must lie strictly between 0 and 1 (at ε >= 1"),
    Refused("head_unknown", "edpo_head", {"edpo_head": "fast"}, "edpo_head must be one of auto, naive, chunked, triton",
            {"edpo_head": "cuda"}, "edpo_head must be one of auto, naive, chunked, triton, got cuda"),
    Refused("token_chunk_zero", "edpo_head_token_chunk", {"edpo_head_token_chunk": 0},
            "edpo_head_token_chunk must be an integer >= 1 or unset, got 0",
            {"edpo_head_token_chunk": 0}, "edpo_head_token_chunk must be an integer >= 1 or unset, got 0"),
    Refused("vocab_chunk_negative", "edpo_head_vocab_chunk", {"edpo_head_vocab_chunk": -4},
            "edpo_head_vocab_chunk must be an integer >= 1 or unset, got -4",
            {"edpo_head_vocab_chunk": -4}, "edpo_head_vocab_chunk must be an integer >= 1 or unset, got -4"),
    Refused("token_chunk_fraction", "edpo_head_token_chunk", {"edpo_head_token_chunk": 2.5},
            "edpo_head_token_chunk must be an integer >= 1 or unset, got 2.5"),
    Refused("workspace_unset", "edpo_head_workspace_mb", {"edpo_head_workspace_mb": None},
            "edpo_head_workspace_mb must be an integer >= 1, got None"),
    Refused("workspace_zero", "edpo_head_workspace_mb", {"edpo_head_workspace_mb": 0},
            "edpo_head_workspace_mb must be an integer >= 1, got 0",
            {"edpo_head_workspace_mb": 0}, "edpo_head_workspace_mb must be an integer >= 1, got 0"),
    Refused("triton_without_cuda", "edpo_head", {"edpo_head": "triton"}, "edpo_head='triton' needs a CUDA GPU",
            {"edpo_head": "triton"}, "edpo_head: triton needs a CUDA GPU"),
    Refused("share_prompt_padded", "edpo_share_prompt", {"edpo_share_prompt": True},
            "edpo_share_prompt=True shares prompts inside packed rows: it needs padding_free=True",
            {"edpo_share_prompt": True},
            "edpo_share_prompt: true shares prompts inside packed rows: it needs dpo_padding_free: true"),
    Refused("beta_zero", "beta", {"beta": 0.0}, "beta must be a finite number > 0, got 0.0",
            {"rl_beta": 0.0}, "rl_beta must be a finite number > 0, got 0.0"),
    Refused("beta_negative", "beta", {"beta": -0.1}, "beta must be a finite number > 0, got -0.1",
            {"rl_beta": None, "trl": {"beta": -0.1}}, "trl.beta must be a finite number > 0, got -0.1"),
    Refused("dpo_beta_zero", "beta", None, "", {"rl_beta": None, "dpo_beta": 0.0},
            "dpo_beta must be a finite number > 0, got 0.0"),
    Refused("orpo_alpha", "beta", None, "", {"orpo_alpha": 0.5}, "Remove orpo_alpha; set the initial β with rl_beta"),
    Refused("loss_ipo", "loss_type", {"loss_type": ["ipo"]}, "set loss_type=['sigmoid'] or leave loss_type unset",
            {"dpo_loss_type": ["ipo"]}, 'set dpo_loss_type: ["sigmoid"] or leave dpo_loss_type unset'),
    Refused("loss_sigmoid_and_sft", "loss_type", {"loss_type": ["sigmoid", "sft"]},
            "not loss_type=['sigmoid', 'sft']",
            {"dpo_loss_type": ["sigmoid", "sft"]}, 'not dpo_loss_type: ["sigmoid", "sft"]'),
    Refused("loss_weights", "loss_weights", {"loss_weights": [2.0]}, "leave loss_weights unset",
            {"dpo_loss_weights": [2.0]}, "leave dpo_loss_weights unset"),
    Refused("precompute_ref", "precompute_ref_log_probs", {"precompute_ref_log_probs": True},
            "Set precompute_ref_log_probs=False",
            {"precompute_ref_log_probs": True}, "Set precompute_ref_log_probs: false"),
    Refused("reference_free", "reference_free", {"reference_free": True}, "Set reference_free=False"),
    Refused("f_divergence", "f_divergence_type", {"f_divergence_type": "js_divergence"},
            "set f_divergence_type='reverse_kl'"),
    Refused("ld_alpha", "ld_alpha", {"ld_alpha": 0.5}, "leave ld_alpha unset"),
    Refused("sync_ref", "sync_ref_model", {"sync_ref_model": True}, "set sync_ref_model=False"),
    Refused("wpo", "use_weighting", {"use_weighting": True}, "set use_weighting=False",
            {"dpo_use_weighting": True}, "set dpo_use_weighting: false"),
    Refused("liger", "use_liger_kernel", {"use_liger_kernel": True},
            "set use_liger_kernel=False and choose the head with edpo_head",
            {"dpo_use_liger_kernel": True}, "set dpo_use_liger_kernel: false and choose the head with edpo_head"),
    Refused("label_smoothing_half", "label_smoothing", {"label_smoothing": 0.5},
            "label_smoothing must lie in [0, 0.5), got 0.5",
            {"dpo_label_smoothing": 0.5}, "dpo_label_smoothing must lie in [0, 0.5), got 0.5"),
    Refused("parallelism_config_cp", "parallelism_config", {"parallelism_config": ParallelismConfig(cp_size=2)},
            "parallelism_config with cp_size or sp_size > 1 (context / sequence parallelism) is not supported"),
    Refused("parallelism_config_sp", "parallelism_config", {"parallelism_config": ParallelismConfig(sp_size=2)},
            "parallelism_config with cp_size or sp_size > 1 (context / sequence parallelism) is not supported"),
    Refused("context_parallel", "context_parallel_size", None, "",
            {"context_parallel_size": 2}, "context_parallel_size: 2 is not supported by rl: edpo"),
    Refused("sequence_parallel", "context_parallel_size", None, "",
            {"sequence_parallel_degree": 2}, "Remove sequence_parallel_degree"),
]  # fmt: skip

# (case, TRL settings or None, YAML settings or None): at the edge, accepted by both
ACCEPTED = [
    ("epsilon_half", {"epsilon": 0.5}, {"edpo_epsilon": 0.5}),
    ("chunks_one", {"edpo_head_token_chunk": 1, "edpo_head_vocab_chunk": 1, "edpo_head_workspace_mb": 1},
     {"edpo_head_token_chunk": 1, "edpo_head_vocab_chunk": 1, "edpo_head_workspace_mb": 1}),
    ("sigmoid_spelled_out", {"loss_type": ["sigmoid"], "loss_weights": [1.0]},
     {"dpo_loss_type": ["sigmoid"], "dpo_loss_weights": [1.0]}),
    ("label_smoothing_below_half", {"label_smoothing": 0.49}, {"dpo_label_smoothing": 0.49}),
    ("share_prompt_padding_free", {"edpo_share_prompt": True, "padding_free": True},
     {"edpo_share_prompt": True, "dpo_padding_free": True}),
    ("off_switches_off", {"use_weighting": False, "use_liger_kernel": False, "precompute_ref_log_probs": False},
     {"dpo_use_weighting": False, "dpo_use_liger_kernel": False, "precompute_ref_log_probs": False}),
    ("context_parallel_one", None, {"context_parallel_size": 1}),
]  # fmt: skip


def trl_config(out, settings: dict[str, Any]):
    """An ``EpsilonDPOConfig`` with ``settings`` on CPU. A setting this TRL has no field for (``reference_free``: TRL
    before 1.0) is set on a valid config, then validated as ``EpsilonDPOTrainer`` validates its args."""
    from edpo_plugin.trainer import EpsilonDPOConfig, validate_edpo_args

    fields = {f.name for f in dataclasses.fields(EpsilonDPOConfig)}
    known = {k: v for k, v in settings.items() if k in fields}
    config = EpsilonDPOConfig(output_dir=str(out), report_to="none", use_cpu=True, bf16=False, **known)
    if len(known) < len(settings):
        for name, value in settings.items():
            setattr(config, name, value)
        validate_edpo_args(config)
    return config
