"""What every implementation returns and accepts: the four streams, and the argument checks they share.

Imports only torch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class LinearLogprobs(NamedTuple):
    """Per-token log-probs, each fp32 with the shape of ``labels``; 0 where ``labels == ignore_index``.

    ``policy`` = log softmax(z_θ)[y] (carries the gradient), ``ref`` = log softmax(z_ref)[y],
    ``plus`` = log softmax((1+ε)z_θ − εz_ref)[y], ``minus`` = log softmax((1−ε)z_θ + εz_ref)[y], where
    ``z = transform(W h + b)`` for policy and reference alike.
    """

    policy: torch.Tensor
    ref: torch.Tensor
    plus: torch.Tensor
    minus: torch.Tensor


def check_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    epsilon: float,
    bias: torch.Tensor | None,
    ref_bias: torch.Tensor | None,
    ignore_index: int,
    check_labels: bool = True,
) -> None:
    if not 0.0 < float(epsilon) < 1.0:
        raise ValueError(f"epsilon must lie strictly between 0 and 1, got {epsilon!r}.")
    if hidden.shape != ref_hidden.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and ref_hidden {tuple(ref_hidden.shape)} must match.")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must match hidden's leading shape {tuple(hidden.shape[:-1])}.")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 or int32, got {labels.dtype}.")
    for name, w in (("weight", weight), ("ref_weight", ref_weight)):
        if w.dim() != 2 or w.shape[1] != hidden.shape[-1]:
            raise ValueError(f"{name} must be [V, {hidden.shape[-1]}], got {tuple(w.shape)}.")
    if weight.shape[0] != ref_weight.shape[0]:
        raise ValueError(
            f"weight and ref_weight disagree on the vocabulary: {weight.shape[0]} vs {ref_weight.shape[0]}."
        )
    for name, b in (("bias", bias), ("ref_bias", ref_bias)):
        if b is not None and b.shape != (weight.shape[0],):
            raise ValueError(f"{name} must be [{weight.shape[0]}], got {tuple(b.shape)}.")
    if not check_labels:  # a local vocabulary shard: linear_logprobs checked against the whole vocabulary
        return
    vocab = weight.shape[0]  # the whole vocabulary, also for a vocab-sharded DTensor
    outside = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(outside.any()):  # one device sync; an out-of-range label would give NaN (Triton) or a bare index error
        raise ValueError(
            f"labels hold {int(labels[outside][0])}, outside the vocabulary [0, {vocab}) and not ignore_index="
            f"{ignore_index}: check the tokenizer against the model's lm_head (vocab_size)."
        )
