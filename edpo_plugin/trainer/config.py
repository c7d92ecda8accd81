"""``EpsilonDPOConfig``: TRL's ``DPOConfig`` plus ε and the log-prob head settings, validated on creation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from trl import DPOConfig

from edpo_plugin.trainer.options import OPTIONS, EpsilonDPOFields, check_option, check_settings


@dataclass
class EpsilonDPOConfig(EpsilonDPOFields, DPOConfig):
    """Configuration of :class:`~edpo_plugin.trainer.EpsilonDPOTrainer`: TRL's ``DPOConfig`` plus
    :class:`~edpo_plugin.trainer.options.EpsilonDPOFields` (the options table's fields).

    ``beta`` is the initial β; it then moves once per optimizer step by ``β ← β / (1 + ε·s̄)``.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_edpo_args(self)


def validate_edpo_args(args: Any) -> None:
    """Refuse settings that ε-DPO cannot honour, naming the option and the fix: each option's own check, then the
    DPO settings of ``options.REFUSALS``. ``args`` is a ``DPOConfig`` with ε fields."""
    for option in OPTIONS:
        if not hasattr(args, option.name):
            raise TypeError(
                f"{type(args).__name__} has no `{option.name}`: pass an EpsilonDPOConfig to EpsilonDPOTrainer."
            )
    for option in OPTIONS:
        check_option(option, getattr(args, option.name))
    on_cuda = torch.cuda.is_available() and not getattr(args, "use_cpu", False)
    check_settings(vars(args), device="cuda" if on_cuda else "cpu")
