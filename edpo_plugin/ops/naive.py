"""Materialising log-prob head: full ``[tokens × vocab]`` logits for all four streams.

This is what the authors' reference trainer does, kept as the simple baseline (``impl="naive"``) and as a
readable statement of what the fused paths compute. Logits are computed in fp32 with autocast disabled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edpo_plugin.ops.contract import HeadCall, LinearLogprobs
from edpo_plugin.ops.engine import mix_streams, no_autocast


def naive_linear_logprobs(call: HeadCall) -> LinearLogprobs:
    """The four streams of a flat ``call`` (hidden states ``[N, d]``, labels ``[N]``), each fp32 ``[N]``, 0 where
    ``labels == ignore_index``. Only ``policy`` carries a gradient."""
    (hidden, weight, bias), (ref_hidden, ref_weight, ref_bias) = call.policy, call.ref
    labels, transform = call.labels, call.transform
    valid = labels != call.ignore_index
    targets = labels.masked_fill(~valid, 0).unsqueeze(-1)

    def token_logprobs(logits: torch.Tensor) -> torch.Tensor:
        picked = logits.log_softmax(-1).gather(-1, targets).squeeze(-1)
        return torch.where(valid, picked, torch.zeros_like(picked))

    with no_autocast(hidden.device):
        policy_logits = transform.apply(
            F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
        )
        with torch.no_grad():
            ref_logits = transform.apply(
                F.linear(ref_hidden.float(), ref_weight.float(), None if ref_bias is None else ref_bias.float())
            )
            _, _, plus_logits, minus_logits = mix_streams(policy_logits.detach(), ref_logits, call.epsilon)
            plus, minus, ref = (token_logprobs(z) for z in (plus_logits, minus_logits, ref_logits))
        return LinearLogprobs(token_logprobs(policy_logits), ref, plus, minus)
