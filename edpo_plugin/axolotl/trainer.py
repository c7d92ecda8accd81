"""Axolotl's DPO trainer (its optimizer, scheduler and data-loader mixins) with ε-DPO's loss and β controller."""

from __future__ import annotations

from typing import Any

from axolotl.core.trainers.dpo.trainer import AxolotlDPOTrainer
from axolotl.integrations.base import PluginManager

from edpo_plugin.trainer import EpsilonDPOTrainer

# YAML field -> EpsilonDPOConfig field
CFG_TO_ARGS = {
    "edpo_epsilon": "epsilon",
    "edpo_head": "edpo_head",
    "edpo_head_token_chunk": "edpo_head_token_chunk",
    "edpo_head_vocab_chunk": "edpo_head_vocab_chunk",
}


class AxolotlEpsilonDPOTrainer(EpsilonDPOTrainer, AxolotlDPOTrainer):
    """Set as ``trainer_cls`` by ``EDPOPlugin.register`` for ``rl: edpo``; Axolotl builds it like its DPO trainer.

    Axolotl builds an ``AxolotlDPOConfig``; the ε settings come from the validated YAML and are set on it here,
    then checked by ``EpsilonDPOTrainer`` like an ``EpsilonDPOConfig``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        cfg = PluginManager.get_instance().cfg
        training_args = kwargs["args"]
        for cfg_key, arg_name in CFG_TO_ARGS.items():
            setattr(training_args, arg_name, cfg[cfg_key])
        super().__init__(*args, **kwargs)
