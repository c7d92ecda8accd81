"""ε-DPO preference training for TRL and Axolotl, with a fused linear log-prob head.

Layers, each importable without the ones above it:

- ``edpo_plugin.ops``: the log-prob head (``linear_logprobs``); torch and triton only.
- ``edpo_plugin.loss``: decisions, per-pair β, the loss and the β controller; torch only.
- ``edpo_plugin.trainer``: ``EpsilonDPOConfig`` / ``EpsilonDPOTrainer`` for plain TRL.
- ``edpo_plugin.axolotl``: ``EDPOPlugin`` for ``plugins: [edpo_plugin.EDPOPlugin]`` in an Axolotl YAML.

The names below are resolved lazily so that ``import edpo_plugin`` pulls in neither TRL nor Axolotl.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "EDPOPlugin": "edpo_plugin.axolotl",
    "EpsilonDPOConfig": "edpo_plugin.trainer",
    "EpsilonDPOTrainer": "edpo_plugin.trainer",
    "linear_logprobs": "edpo_plugin.ops",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edpo_plugin' has no attribute {name!r}")
