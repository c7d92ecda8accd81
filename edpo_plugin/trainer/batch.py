"""How a micro-batch runs through the backbones and comes back per sequence: padded as TRL collates it, or packed
into one row (:mod:`packing`). :meth:`BatchLayout.lay_out` is the one place that decides; the loss, the first-step
check and the trainer read the result through the same four names (``model_kwargs``, ``labels``, ``head_input``,
``sequence_logps``).

Imports torch only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from edpo_plugin.trainer.packable import check_packable_keys
from edpo_plugin.trainer.packing import PackedBatch, pack_rows

# Batch keys that are not forward arguments of the model
NOT_MODEL_INPUTS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}


class PaddedBatch(NamedTuple):
    """TRL's padded ``[R, T]`` batch (chosen rows, then rejected rows), position ``t`` predicting token ``t + 1``."""

    inputs: dict[str, torch.Tensor]  # the model's forward arguments: input_ids, attention_mask, …
    labels: torch.Tensor  # int64 [R, T-1]: the next token where it is scored, else -100

    def model_kwargs(self) -> dict[str, Any]:
        return dict(self.inputs)

    def head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[R, T-1, d]`` of the backbone's ``[R, T, d]``: every position but the last predicts a label."""
        return hidden[:, :-1]

    def sequence_logps(self, token_logps: torch.Tensor) -> torch.Tensor:
        """float64 ``[R]``: per-sequence sums of ``[R, T-1]`` token log-probs. float64 because the decisions compare
        sums that differ by O(ε) and must not flip by rounding (fp32 sums of a few thousand tokens do)."""
        return token_logps.double().sum(-1)

    def forward_done(self, model: torch.nn.Module, what: str) -> None:
        """Nothing to check after a padded forward."""

    @property
    def backbone_positions(self) -> int:
        return self.inputs["input_ids"].numel()


MicroBatch = PaddedBatch | PackedBatch


@dataclass(frozen=True)
class BatchLayout:
    """``padding_free``: pack each micro-batch into one row; ``share_prompt``: there, each pair's prompt once."""

    padding_free: bool = False
    share_prompt: bool = False

    def lay_out(self, inputs: dict[str, torch.Tensor], scored: torch.Tensor | None) -> MicroBatch:
        """The micro-batch ``inputs`` (TRL's padded batch) as the backbones run it. ``scored [R, T]`` marks the
        tokens whose log-probs count (TRL's ``completion_mask``); None scores every next token of each row (the
        first-step check)."""
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        if self.padding_free:
            check_packable_keys(inputs.keys())
            return pack_rows(ids, mask, scored, self.share_prompt)
        keep = (mask if scored is None else scored)[:, 1:].bool()
        model_inputs = {k: v for k, v in inputs.items() if k not in NOT_MODEL_INPUTS}
        return PaddedBatch(model_inputs, ids[:, 1:].masked_fill(~keep, -100))
