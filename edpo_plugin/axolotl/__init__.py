"""Axolotl plugin: ``plugins: [edpo_plugin.EDPOPlugin]`` and ``rl: edpo`` run ε-DPO through Axolotl's DPO path.

``rl`` is a closed enum in Axolotl, so ``register`` (which sees the raw YAML before validation) turns
``rl: edpo`` into ``rl: dpo`` with ``trainer_cls`` pointing at :class:`AxolotlEpsilonDPOTrainer`. Datasets, LoRA /
QLoRA, DeepSpeed and FSDP then follow Axolotl's normal DPO handling.
"""

from __future__ import annotations

import logging
from typing import Any

from axolotl.integrations.base import BasePlugin

from edpo_plugin.axolotl.args import CFG_TO_ARGS, TRAINER_CLS
from edpo_plugin.trainer.console import LIBRARY_LOGGER

__all__ = ["EDPOPlugin", "TRAINER_CLS"]


class EDPOPlugin(BasePlugin):
    """ε-DPO for Axolotl. YAML: ``rl: edpo``, ``rl_beta`` (initial β), ``edpo_epsilon`` and optional head settings."""

    def get_input_args(self) -> str:
        return "edpo_plugin.axolotl.args.EDPOArgs"

    def get_training_args_mixin(self) -> str:
        """ε-DPO's fields become declared fields of Axolotl's training args (``args.to_dict()``, hparams logs)."""
        return "edpo_plugin.trainer.options.EpsilonDPOFields"

    def get_training_args(self, cfg: Any) -> dict[str, Any] | None:
        """The validated YAML values of ε-DPO's fields, for ``rl: edpo`` runs only."""
        if cfg.get("trainer_cls") != TRAINER_CLS:
            return None
        args = {arg: cfg[key] for key, arg in CFG_TO_ARGS.items()}
        if cfg.get("router_aux_loss_coef") is not None:  # a DPOConfig field Axolotl 0.19 never sets
            args["router_aux_loss_coef"] = cfg["router_aux_loss_coef"]
        return args

    def pre_lora_load(self, cfg: Any, model: Any) -> None:
        """Seed the adapter's initialisation with the YAML ``seed``: Axolotl's DPO path does not, so two LoRA runs of
        one config started from different random adapters."""
        if cfg.get("trainer_cls") == TRAINER_CLS and cfg.get("seed") is not None:
            from transformers import set_seed

            set_seed(int(cfg["seed"]))

    def register(self, cfg: dict[str, Any]) -> None:
        show_logs_like_axolotls()
        if cfg.get("rl") != "edpo":
            return
        if cfg.get("trainer_cls") not in (None, TRAINER_CLS):
            raise ValueError(
                f"rl: edpo sets trainer_cls to {TRAINER_CLS}; remove trainer_cls: {cfg['trainer_cls']} from the config."
            )
        cfg["rl"] = "dpo"
        cfg["trainer_cls"] = TRAINER_CLS

    def on_config_validation_error(self, cfg: dict[str, Any]) -> None:
        if cfg.get("trainer_cls") == TRAINER_CLS:
            cfg["rl"] = "edpo"
            cfg.pop("trainer_cls")


def show_logs_like_axolotls() -> None:
    """Show ε-DPO's log lines as Axolotl shows its own: INFO and up (``AXOLOTL_LOG_LEVEL``), on its console and log
    file. Axolotl's logging passes INFO records only from ``axolotl.*`` loggers: its console handlers and every logger
    created after it configured logging (ours, imported with the plugin) carry a filter that drops the rest below
    WARNING (``LOG_LEVEL``). Nothing changes when Axolotl's logging is not configured (the plugin used as a library)."""
    axolotl_logger = logging.getLogger("axolotl")
    if axolotl_logger.propagate or not axolotl_logger.handlers:
        return
    from axolotl.logging_config import AxolotlOrWarnErrorFilter

    handlers = []
    for handler in axolotl_logger.handlers:
        if any(isinstance(f, AxolotlOrWarnErrorFilter) for f in handler.filters) and isinstance(
            handler, logging.StreamHandler
        ):
            own = logging.StreamHandler(handler.stream)  # the same console and format, without the filter
            own.setFormatter(handler.formatter)
            own.setLevel(handler.level)
            handler = own
        handlers.append(handler)
    library = logging.getLogger(LIBRARY_LOGGER)
    library.handlers = handlers
    library.setLevel(axolotl_logger.level)
    library.propagate = False  # the root's console would drop INFO and print each WARNING a second time
    for name, logger in logging.Logger.manager.loggerDict.items():
        if isinstance(logger, logging.Logger) and (name == LIBRARY_LOGGER or name.startswith(LIBRARY_LOGGER + ".")):
            for axolotl_filter in [f for f in logger.filters if isinstance(f, AxolotlOrWarnErrorFilter)]:
                logger.removeFilter(axolotl_filter)
