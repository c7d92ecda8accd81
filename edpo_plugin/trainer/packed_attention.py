"""SDPA run once per packed sequence: what FlashAttention-2 varlen does on GPU, for transformers' ``sdpa``.

A packed row ``[1, N]`` holding sequences of lengths ``L_1 … L_k`` gets a block-diagonal causal mask from
transformers (``masking_utils.find_packed_sequence_indices``), and SDPA then computes all ``N²`` scores and masks
most of them: attention costs more than the padded batch it replaced. ``packed_sdpa_forward`` instead calls
transformers' own ``sdpa_attention_forward`` once per sequence, on that sequence's queries, keys and values and its
diagonal block of the same mask: ``Σ L_i²`` scores, and the same function on the same operands (a block that is plain
causal goes without a mask, ``is_causal=True``, as an unpadded forward runs). Sequence starts come from the restarting
``position_ids`` the attention receives (as FlashAttention's varlen path finds them); with none, a batch of several
rows, a key/value cache or a non-boolean mask, it is ``sdpa_attention_forward`` unchanged.

A sequence whose positions start at ``P > 0`` instead of 0 continues a shared prefix: the first ``P`` tokens of the
last sequence that started at 0 (a pair's prompt, computed once for its chosen and its rejected completion,
``packing.pack_rows(share_prefixes=True)``). Its queries attend to those ``P`` keys and causally to its own, the
attention the sequence would get unpacked, prefix included. Only a plain causal attention can be split that way: a
sequence whose mask block is anything else (a sliding window) stops with an error rather than attend differently.

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
    firsts = position_ids[0, [start for start, _ in bounds]].tolist()
    outputs = []
    root = None  # start of the last sequence that began at position 0
    windowed = bool(kwargs.get("sliding_window") or getattr(module, "sliding_window", None))
    for (start, end), first in zip(bounds, firsts, strict=True):
        block = attention_mask[..., start:end, start:end]
        causal = torch.ones(end - start, end - start, dtype=torch.bool, device=block.device).tril_()
        plain_causal = torch.equal(block, causal.expand_as(block))
        q, k, v = (t[:, :, start:end] for t in (query, key, value))
        if first == 0:
            root, root_plain_causal = start, plain_causal
            mask = None if plain_causal else block
        else:
            if root is None or root + first > start:
                raise ValueError(
                    f"{PACKED_SDPA}: a packed sequence starts at position {first}, continuing a prefix, but no "
                    "earlier sequence of the row starts at 0 with that many tokens."
                )
            if windowed or not (plain_causal and root_plain_causal):
                raise ValueError(
                    f"{PACKED_SDPA}: a packed sequence shares a prefix with the one before it, but its attention is "
                    "not plain causal (a sliding window). Set edpo_share_prompt=False."
                )
            k, v = (torch.cat((t[:, :, root : root + first], part), dim=2) for t, part in ((key, k), (value, v)))
            mask = torch.cat((causal.new_ones(end - start, first), causal), dim=1).expand(1, 1, -1, -1)
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


def can_share_prefixes(causal_lm: torch.nn.Module) -> bool:
    """Whether ``causal_lm`` runs ``PACKED_SDPA`` with plain causal attention in every layer (no sliding window, no
    chunked attention), so that a packed sequence can attend to a prefix it shares with the one before it."""
    config = getattr(causal_lm, "config", None)
    if getattr(config, "_attn_implementation", None) != PACKED_SDPA:
        return False
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    windowed = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    return layer_types == {"full_attention"} and not windowed and not getattr(config, "attention_chunk_size", None)
