"""First-step check: the fused head against the model's own forward, on one short row.

:mod:`model_head` describes the logits of the architectures it knows; this catches the ones nobody listed (a
subclass that rescales its logits, a new architecture with a post-head op). On the first training micro-batch the
trainer takes the row with the shortest prompt, cut 16 completion tokens after it, runs the model's own forward on
it with a pre-hook on the output-embedding module capturing the hidden state the model feeds its head, and
compares ``log_softmax(logits)`` with the fused head's stream on that same hidden state. Cost: one forward of one
short row per model (policy and reference), once per run.

The tolerance follows the arithmetic of the model's own logits: they are rounded to their dtype (bf16 under
mixed precision), so a log-prob can move by up to about twice the unit roundoff times the largest logit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

CHECK_COMPLETION_TOKENS = 16


class HeadMismatchError(RuntimeError):
    """The fused head's log-probs differ from the model's own beyond rounding: training would optimise another
    objective."""


def check_row(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(ids [1, L], mask [1, L])``: the row with the shortest prompt, cut ``CHECK_COMPLETION_TOKENS`` completion
    tokens after it; ``None`` when no row has a completion token."""
    has_completion = completion_mask.bool().any(dim=1)
    if not bool(has_completion.any()):
        return None
    first = completion_mask.long().argmax(dim=1).masked_fill(~has_completion, input_ids.shape[1] + 1)
    row = int(first.argmin())
    length = min(int(first[row]) + CHECK_COMPLETION_TOKENS, int(attention_mask[row].sum()))
    length = max(length, 2)
    return input_ids[row : row + 1, :length], attention_mask[row : row + 1, :length]


class OwnForward(NamedTuple):
    """What the model's own forward gave on the check row."""

    logprobs: torch.Tensor  # float64 [1, L-1]: log_softmax(logits)[labels]
    hidden: torch.Tensor  # [1, L-1, d]: the input of the output-embedding module, as the model fed it
    logits_dtype: torch.dtype  # the precision the logits were computed in
    max_logit: float  # largest |logit|


def own_forward_logprobs(
    forward: Callable[[], torch.Tensor], head_module: torch.nn.Module, labels: torch.Tensor
) -> OwnForward:
    """Run ``forward()`` (the model's own forward, returning logits ``[1, L, V]``) while capturing the input of
    ``head_module``; ``labels`` is ``[1, L-1]``."""
    captured: list[torch.Tensor] = []

    def grab(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args[0] if args else kwargs["input"]).detach())

    handle = head_module.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        logits = forward()
    finally:
        handle.remove()
    if len(captured) != 1 or captured[0].shape[:2] != logits.shape[:2]:
        raise HeadMismatchError(
            f"The model's forward did not call its output embeddings ({type(head_module).__name__}) once on the full "
            "sequence, so ε-DPO cannot tell what its logits are. Set edpo_head_check=False only if you know the "
            "fused head computes this model's log-probs."
        )
    shifted = logits[:, :-1]
    logprobs = shifted.double().log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    # Logits may be upcast after a bf16 matmul (accelerate returns fp32 outputs under autocast): their precision is
    # that of the least precise of their dtype, the autocast dtype and the head's input.
    candidates = [logits.dtype, captured[0].dtype]
    device = logits.device.type
    if torch.is_autocast_enabled(device):
        candidates.append(torch.get_autocast_dtype(device))
    dtype = max(candidates, key=lambda d: torch.finfo(d).eps)
    return OwnForward(logprobs, captured[0][:, :-1], dtype, float(shifted.abs().max()))


def compare_with_model(own: OwnForward, fused_logprobs: torch.Tensor, what: str) -> float:
    """Raise :class:`HeadMismatchError` unless ``|fused − own| ≤ tolerance`` at every position; return the largest
    difference. Tolerance ``3·u·(1 + max|z|) + 1e-4``, ``u`` the unit roundoff of the model's logits dtype."""
    u = torch.finfo(own.logits_dtype).eps / 2
    tolerance = 3 * u * (1.0 + own.max_logit) + 1e-4
    worst = float((fused_logprobs.double() - own.logprobs).abs().max())
    if not worst <= tolerance:
        raise HeadMismatchError(
            f"{what}: the fused head's log-probs differ from the model's own forward by up to {worst:.4g} nats "
            f"(tolerance {tolerance:.3g} for {own.logits_dtype} logits of magnitude up to {own.max_logit:.3g}). Its "
            "logits are not transform(lm_head(h)) as ε-DPO describes them, so training would optimise a different "
            "objective. Please report the architecture; set edpo_head_check=False only if you know better."
        )
    return worst
