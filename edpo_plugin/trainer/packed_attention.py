"""SDPA run once per packed sequence: what FlashAttention-2 varlen does on GPU, for transformers' ``sdpa``.

A packed row ``[1, N]`` holding sequences of lengths ``L_1 … L_k`` gets a block-diagonal causal mask from
transformers (``masking_utils.find_packed_sequence_indices``), and SDPA then computes all ``N²`` scores and masks
most of them: attention costs more than the padded batch it replaced. ``packed_sdpa_forward`` instead calls
transformers' own ``sdpa_attention_forward`` once per sequence, on that sequence's queries, keys and values and its
diagonal block of the same mask: ``Σ L_i²`` scores, and the same function on the same operands (a block that is plain
causal goes without a mask, ``is_causal=True``, as an unpadded forward runs). Sequence starts come from the restarting
``position_ids`` the attention receives (as FlashAttention's varlen path finds them); with none, a batch of several
rows, a key/value cache or a non-boolean mask, it is ``sdpa_attention_forward`` unchanged.

It is registered with transformers' ``AttentionInterface`` (and ``sdpa_mask`` with ``AttentionMaskInterface``) as
``PACKED_SDPA``; the trainer switches an ``sdpa`` model to it when ``padding_free=True``.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

PACKED_SDPA = "edpo_packed_sdpa"


def sequence_bounds(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """``[(start, end), …]`` of the sequences in a packed row: ``position_ids [1, N]`` restarts (any step other than
    +1) at each sequence start, the rule transformers' packed-sequence detection applies."""
    restarts = (torch.diff(position_ids[0]) != 1).nonzero().flatten() + 1
    starts = [0, *restarts.tolist()]
    return list(zip(starts, [*starts[1:], position_ids.shape[1]], strict=True))


def packed_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """``query [1, H, N, D]``, ``key`` / ``value [1, H_kv, N, D]``, ``attention_mask`` bool ``[1, 1, N, N]`` →
    ``[1, N, H, D]`` (as ``sdpa_attention_forward``), one SDPA call per sequence of the packed row."""
    position_ids = kwargs.get("position_ids")
    if (
        position_ids is None
        or attention_mask is None
        or attention_mask.dtype != torch.bool
        or query.shape[0] != 1
        or position_ids.shape[0] != 1
        or query.shape[2] != key.shape[2]
        or query.shape[2] != position_ids.shape[1]
        or kwargs.get("position_bias") is not None
    ):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    bounds = sequence_bounds(position_ids)
    if len(bounds) == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outputs = []
    for start, end in bounds:
        block = attention_mask[..., start:end, start:end]
        causal = torch.ones(end - start, end - start, dtype=torch.bool, device=block.device).tril_()
        mask = None if torch.equal(block, causal.expand_as(block)) else block
        q, k, v = (t[:, :, start:end] for t in (query, key, value))
        outputs.append(sdpa_attention_forward(module, q, k, v, mask, **kwargs)[0])
    return torch.cat(outputs, dim=1), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)


def use_packed_sdpa(causal_lm: torch.nn.Module) -> bool:
    """Switch a model running ``sdpa`` to ``PACKED_SDPA``; True when it now runs it. Any other attention, or a model
    that cannot change its attention after loading (transformers warns), is left as it is (False)."""
    config = getattr(causal_lm, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    causal_lm.set_attn_implementation(PACKED_SDPA)
    return config._attn_implementation == PACKED_SDPA
