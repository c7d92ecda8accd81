"""First-step check: the fused head against the model's own forward, on one short row.

:mod:`model_head` describes the logits of the architectures it knows; this catches the ones nobody listed (a
subclass that rescales its logits, a new architecture with a post-head op). On the first training micro-batch the
trainer takes the row with the shortest prompt, cut 16 completion tokens after it (at most 256 tokens), runs the
model's own forward on it with a hook capturing the backbone's ``last_hidden_state`` (what training feeds the fused
head), and compares ``log_softmax(logits)`` with the fused head's stream on that hidden state. Cost: one forward of
one short row per model (policy and reference), once per run.

The tolerance follows the arithmetic of the model's own logits: they are rounded to the precision they are computed
in (bf16 under mixed precision, TF32 when enabled), so a log-prob can move by up to about twice the unit roundoff
times the largest logit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

CHECK_COMPLETION_TOKENS = 16
CHECK_MAX_TOKENS = 256  # bounds the check's [L, V] float64 log-softmax (256 × 128k × 8 B = 256 MiB at most)


class HeadMismatchError(RuntimeError):
    """The fused head's log-probs differ from the model's own beyond rounding: training would optimise another
    objective."""


def check_row(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [1, L], mask [1, L])``: the row with the shortest prompt (row 0 when no row has a completion token),
    cut ``CHECK_COMPLETION_TOKENS`` completion tokens after its prompt and to at most ``CHECK_MAX_TOKENS`` tokens.

    Always a row, so that every data-parallel rank runs the check (and its collectives) on its first micro-batch.
    """
    has_completion = completion_mask.bool().any(dim=1)
    first = completion_mask.long().argmax(dim=1).masked_fill(~has_completion, input_ids.shape[1])
    row = int(first.argmin())
    length = min(int(first[row]) + CHECK_COMPLETION_TOKENS, int(attention_mask[row].sum()), CHECK_MAX_TOKENS)
    length = min(max(length, 2), input_ids.shape[1])
    return input_ids[row : row + 1, :length], attention_mask[row : row + 1, :length]


class OwnForward(NamedTuple):
    """What the model's own forward gave on the check row."""

    logprobs: torch.Tensor  # float64 [1, L-1]: log_softmax(logits)[labels]
    hidden: torch.Tensor  # [1, L-1, d]: the input of the output-embedding module, as the model fed it
    roundoff: float  # unit roundoff of the precision the logits were computed in
    max_logit: float  # largest |logit|


def own_forward_logprobs(
    forward: Callable[[], torch.Tensor], backbone: torch.nn.Module, labels: torch.Tensor
) -> OwnForward:
    """Run ``forward()`` (the model's own forward, returning logits ``[1, L, V]``) while capturing the
    ``last_hidden_state`` its ``backbone`` returns — what the fused head is given in training, so that anything the
    model does between backbone and softmax (a rescaled hidden state, a scaled or capped logit) shows up as a
    difference; ``labels`` is ``[1, L-1]``."""
    captured: list[torch.Tensor] = []

    def grab(_module: torch.nn.Module, _args: tuple, output: object) -> None:
        hidden = getattr(output, "last_hidden_state", None)
        if hidden is None and isinstance(output, tuple | list):
            hidden = output[0]
        captured.append(hidden.detach())

    handle = backbone.register_forward_hook(grab)
    try:
        logits = forward()
    finally:
        handle.remove()
    if len(captured) != 1 or captured[0].shape[:2] != logits.shape[:2]:
        raise HeadMismatchError(
            f"The model's forward did not run its backbone ({type(backbone).__name__}) once on the full sequence, so "
            "ε-DPO cannot tell what its logits are. Set edpo_head_check=False only if you know the fused head "
            "computes this model's log-probs."
        )
    shifted = logits[:, :-1]
    logprobs = shifted.double().log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    # Logits may be upcast after a bf16 matmul (accelerate returns fp32 outputs under autocast), and fp32 matmuls may
    # run in TF32: their precision is the least of their dtype, the autocast dtype, the head's input and TF32's.
    device = logits.device.type
    eps = [torch.finfo(logits.dtype).eps, torch.finfo(captured[0].dtype).eps]
    if torch.is_autocast_enabled(device):
        eps.append(torch.finfo(torch.get_autocast_dtype(device)).eps)
    tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    if device == "cuda" and tf32:
        eps.append(2.0**-10)  # TF32 keeps 10 mantissa bits
    return OwnForward(logprobs, captured[0][:, :-1], max(eps) / 2, float(shifted.abs().max()))


def compare_with_model(own: OwnForward, fused_logprobs: torch.Tensor, what: str) -> float:
    """Raise :class:`HeadMismatchError` unless ``|fused − own| ≤ tolerance`` at every position; return the largest
    difference. Tolerance ``3·u·(1 + max|z|) + 1e-4``, ``u`` the unit roundoff the model's logits were computed in."""
    tolerance = 3 * own.roundoff * (1.0 + own.max_logit) + 1e-4
    worst = float((fused_logprobs.double() - own.logprobs).abs().max())
    if not worst <= tolerance:
        raise HeadMismatchError(
            f"{what}: the fused head's log-probs differ from the model's own forward by up to {worst:.4g} nats "
            f"(tolerance {tolerance:.3g} for logits of magnitude up to {own.max_logit:.3g} computed with unit "
            f"roundoff {own.roundoff:.2g}). Its logits are not transform(lm_head(h)) as ε-DPO describes them, so "
            "training would optimise a different objective. Please report the architecture; set "
            "edpo_head_check=False only if you know better."
        )
    return worst
