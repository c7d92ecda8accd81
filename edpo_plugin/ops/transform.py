"""What a model does to ``lm_head``'s output before its softmax: ``z = cap·tanh(s·(W h + b) / cap)``.

Every causal LM whose logits are not plain ``W h + b`` that this project supports fits this form: a scale ``s``
(Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``, Falcon-H1's ``lm_head_multiplier``) then an optional
soft cap ``cap`` (Gemma-2/3's ``final_logit_softcapping``). The fused heads apply it to policy and reference logits
before the ε-mixes, with its derivative ``s·(1 − tanh²(s·u/cap))``.

Imports only torch.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class LogitTransform(NamedTuple):
    """``scale`` multiplies ``W h + b``; then ``softcap`` (if not None) applies ``cap·tanh(·/cap)``."""

    scale: float = 1.0
    softcap: float | None = None

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def check(self) -> None:
        """Raise ``ValueError`` unless the scale is finite and non-zero and the cap finite and positive."""
        if not (math.isfinite(self.scale) and self.scale != 0.0):
            raise ValueError(f"LogitTransform.scale must be finite and non-zero, got {self.scale!r}.")
        if self.softcap is not None and not (math.isfinite(self.softcap) and self.softcap > 0.0):
            raise ValueError(f"LogitTransform.softcap must be finite and > 0 (or None), got {self.softcap!r}.")

    def apply_(self, z: torch.Tensor) -> torch.Tensor:
        """Transform fp32 pre-logits ``z`` (any shape) in place and return it."""
        if self.scale != 1.0:
            z.mul_(self.scale)
        if self.softcap is not None:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """Out-of-place, differentiable form of :meth:`apply_`."""
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def derivative(self, logits: torch.Tensor) -> torch.Tensor | float:
        """``dz/du`` at transformed ``logits`` (fp32): a tensor with a soft cap, else the constant scale."""
        if self.softcap is None:
            return self.scale
        t = logits / self.softcap
        return (1.0 - t * t).mul_(self.scale)


IDENTITY = LogitTransform()
