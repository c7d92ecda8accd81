"""ε-DPO for plain TRL: ``EpsilonDPOConfig`` and ``EpsilonDPOTrainer`` (imports TRL, never Axolotl)."""

from edpo_plugin.trainer.config import EpsilonDPOConfig, validate_edpo_args
from edpo_plugin.trainer.trainer import EDPO_STATE_NAME, EpsilonDPOTrainer

__all__ = ["EDPO_STATE_NAME", "EpsilonDPOConfig", "EpsilonDPOTrainer", "validate_edpo_args"]
