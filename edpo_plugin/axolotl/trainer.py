"""Axolotl's DPO trainer (its optimizer, scheduler and data-loader mixins) with ε-DPO's loss and β controller."""

from __future__ import annotations

from axolotl.core.trainers.dpo.trainer import AxolotlDPOTrainer

from edpo_plugin.trainer import EpsilonDPOTrainer


class AxolotlEpsilonDPOTrainer(EpsilonDPOTrainer, AxolotlDPOTrainer):
    """Set as ``trainer_cls`` by ``EDPOPlugin.register`` for ``rl: edpo``; Axolotl builds it like its DPO trainer.

    ε-DPO's fields are declared on Axolotl's DPO config by the plugin's training-args mixin
    (:class:`~edpo_plugin.trainer.config.EpsilonDPOFields`) and filled from the YAML by
    ``EDPOPlugin.get_training_args``; ``EpsilonDPOTrainer`` validates them like an ``EpsilonDPOConfig``.
    """
