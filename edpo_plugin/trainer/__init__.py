"""ε-DPO for plain TRL: ``EpsilonDPOConfig`` and ``EpsilonDPOTrainer`` (imports TRL, never Axolotl)."""

from edpo_plugin.trainer.console import quiet_cpu_kernel_noise, show_info_lines

show_info_lines()
quiet_cpu_kernel_noise()  # before TRL imports PEFT, bitsandbytes and torchao

from edpo_plugin.trainer.config import EpsilonDPOConfig, validate_edpo_args  # noqa: E402
from edpo_plugin.trainer.trainer import EDPO_STATE_NAME, EpsilonDPOTrainer  # noqa: E402

__all__ = ["EDPO_STATE_NAME", "EpsilonDPOConfig", "EpsilonDPOTrainer", "validate_edpo_args"]
