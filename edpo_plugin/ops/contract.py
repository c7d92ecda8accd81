"""What every implementation accepts and returns: one head call (:class:`HeadCall`, each side's
:class:`HeadOperands`), the four streams (:class:`LinearLogprobs`), and the input checks they share.

Imports only torch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from edpo_plugin.ops.transform import IDENTITY, LogitTransform


class HeadOperands(NamedTuple):
    """One side of the head: hidden states ``h [..., d]`` (``[M, d]`` inside the engine), ``lm_head`` weight
    ``w [V, d]``, bias ``b [V]`` or None."""

    h: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor | None


class HeadCall(NamedTuple):
    """One call of the ε-DPO head, as the checks and every implementation receive it.

    ``policy``: the policy's operands; ``h`` carries the gradient, ``w`` / ``b`` too when they require grad.
    ``ref``: the reference's, shaped like the policy's and treated as constants (``ref.w`` may be ``policy.w``
    itself, e.g. PEFT's frozen head: the engine then reads its tiles once for both GEMMs). ``labels``: target ids
    (int64/int32) with ``h``'s leading shape. ``epsilon``: the ε of the two mixes. ``ignore_index``: the label whose
    positions get 0 in every stream and no gradient. ``transform``: the model's logit transform, applied to policy
    and reference logits before the mixes.
    """

    policy: HeadOperands
    ref: HeadOperands
    labels: torch.Tensor
    epsilon: float
    ignore_index: int = -100
    transform: LogitTransform = IDENTITY

    def flat(self) -> HeadCall:
        """The same call with hidden states ``[N, d]`` and labels ``[N]`` (views where the layout allows)."""
        d = self.policy.h.shape[-1]
        return self._replace(
            policy=self.policy._replace(h=self.policy.h.reshape(-1, d)),
            ref=self.ref._replace(h=self.ref.h.reshape(-1, d)),
            labels=self.labels.reshape(-1),
        )


def as_transform(transform: LogitTransform | tuple[float, float | None] | None) -> LogitTransform:
    """``transform`` as a :class:`LogitTransform` (None: plain logits; a ``(scale, softcap)`` tuple is accepted)."""
    return IDENTITY if transform is None else LogitTransform(*transform)


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

    def reshaped(self, shape: torch.Size) -> LinearLogprobs:
        """The four streams reshaped to ``shape`` (the labels' shape of a flattened call)."""
        return LinearLogprobs(*(s.reshape(shape) for s in self))


def check_inputs(call: HeadCall, check_labels: bool = True) -> None:
    """Raise ``ValueError`` / ``TypeError`` naming the field unless ``call`` is one the head computes as stated.

    ``check_labels=False`` (a local vocabulary shard) skips the range check of the labels, which
    :func:`edpo_plugin.ops.linear_logprobs` makes against the whole vocabulary (one device sync).
    """
    (hidden, weight, bias), (ref_hidden, ref_weight, ref_bias) = call.policy, call.ref
    labels, epsilon, ignore_index = call.labels, call.epsilon, call.ignore_index
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
    call.transform.check()
    if not check_labels:  # a local vocabulary shard: linear_logprobs checked against the whole vocabulary
        return
    vocab = weight.shape[0]  # the whole vocabulary, also for a vocab-sharded DTensor
    outside = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(outside.any()):  # one device sync; an out-of-range label would give NaN (Triton) or a bare index error
        raise ValueError(
            f"labels hold {int(labels[outside][0])}, outside the vocabulary [0, {vocab}) and not ignore_index="
            f"{ignore_index}: check the tokenizer against the model's lm_head (vocab_size)."
        )
