"""Padding-free ε-DPO: a micro-batch's chosen and rejected sequences packed into one row.

TRL's collator gives a padded ``[2B, T]`` batch (chosen rows, then rejected rows, each flushed left). Padding-free
training keeps only its real tokens: one row ``[1, N]`` (``N`` the number of ones in the attention mask), with
``position_ids`` restarting at 0 at every sequence and no attention mask. transformers derives the packed-sequence
boundaries from the restarting ``position_ids`` (FlashAttention-2 varlen on GPU; a block-diagonal causal mask for
SDPA / eager / flex, ``masking_utils.find_packed_sequence_indices``). Labels are taken inside each row before
packing, so a sequence's last token predicts nothing of the next sequence; per-sequence sums come back through the
segment ids.

With ``share_prefixes`` a pair's chosen and rejected sequences share the tokens they begin with (the prompt, at
least): the rejected sequence keeps only what follows, its ``position_ids`` going on from the shared prefix's
length ``P`` instead of 0. Only ``PACKED_SDPA`` reads that layout (a segment starting at ``P > 0`` attends to the
first ``P`` tokens of the segment before it, :mod:`packed_attention`); every label still comes from the hidden state
of the token it follows, the prefix's last one predicting both completions' first tokens.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from edpo_plugin.trainer.packed_attention import PACKED_SDPA

# Attention implementations whose masks transformers builds from restarting position_ids when no attention mask is
# given (packed-sequence detection), or which run varlen from them (FlashAttention).
PACKED_ATTENTION = ("eager", "sdpa", PACKED_SDPA, "flash_attention_2", "flash_attention_3", "flex_attention")
# Batch keys a packed forward can take: anything else (token_type_ids, pixel_values, …) is laid out per padded row.
PACKABLE_KEYS = {"input_ids", "attention_mask", "completion_mask", "ref_chosen_logps", "ref_rejected_logps"}


class PackedBatch(NamedTuple):
    """A padded ``[R, T]`` batch with its real tokens laid end to end in one row, and its labels.

    Labels are listed in the padded batch's row-major order (row 0's, then row 1's, …), each with the packed position
    whose hidden state predicts it: ``hidden[:, label_index]`` is the head's input ``[1, M, d]``.
    """

    input_ids: torch.Tensor  # int64 [1, N]: the real tokens of each row (a shared prefix once)
    position_ids: torch.Tensor  # int64 [1, N]: each token's position in its own row
    label_index: torch.Tensor  # int64 [M]: packed position predicting each label
    labels: torch.Tensor  # int64 [1, M]: next token of the same row, where that token is a completion token
    segment_ids: torch.Tensor  # int64 [M]: the row each label belongs to
    n_rows: int  # R


def pack_rows(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor | None = None,
    share_prefixes: bool = False,
) -> PackedBatch:
    """Pack the tokens of ``input_ids [R, T]`` where ``attention_mask [R, T]`` is 1 into one row.

    ``completion_mask [R, T]`` (1 on completion tokens) selects which next tokens are labels; ``None`` makes every
    next token of the same row a label (the first-step check). A row's last real token predicts nothing.
    ``share_prefixes``: rows ``i`` and ``R/2 + i`` (a pair's chosen and rejected) are laid out next to each other
    and the second keeps only the tokens after their common prefix (see the module docstring).
    """
    keep = attention_mask.bool()
    n_rows, width = keep.shape
    device = input_ids.device
    no_label = keep.new_zeros((n_rows, 1))
    has_label = torch.cat((keep[:, 1:], no_label), dim=1)
    if completion_mask is not None:
        has_label &= torch.cat((completion_mask[:, 1:].bool(), no_label), dim=1)
    next_ids = torch.cat((input_ids[:, 1:], input_ids[:, :1]), dim=1)

    rank = keep.long().cumsum(dim=1) - 1  # each real token's position in its own row
    lengths = keep.sum(dim=1)
    shared = torch.zeros(n_rows, dtype=torch.long, device=device)  # leading tokens a row takes from its partner
    partner = torch.arange(n_rows, device=device)
    order = torch.arange(n_rows, device=device)  # rows in the order they are laid out
    if share_prefixes:
        if n_rows % 2:
            raise ValueError(f"share_prefixes needs chosen and rejected rows in two halves; got {n_rows} rows.")
        half = n_rows // 2
        tokens = torch.full((n_rows, width), -1, dtype=input_ids.dtype, device=device)
        tokens[keep.nonzero(as_tuple=True)[0], rank[keep]] = input_ids[keep]  # real tokens flushed left
        same = (tokens[:half] == tokens[half:]) & (tokens[:half] >= 0)
        shared[half:] = same.long().cumprod(dim=1).sum(dim=1)
        partner[half:] -= half
        order = torch.stack((order[:half], order[half:]), dim=1).flatten()

    stored = keep & (rank >= shared[:, None])
    stored_lengths = lengths - shared
    offsets = torch.empty_like(stored_lengths)
    offsets[order] = torch.cumsum(stored_lengths[order], 0) - stored_lengths[order]
    # packed position of every real token: its own, or (a shared prefix) its partner's
    own_position = offsets[:, None] + rank - shared[:, None]
    packed_position = torch.where(rank >= shared[:, None], own_position, offsets[partner][:, None] + rank)

    n_packed = int(stored_lengths.sum())
    packed_ids = input_ids.new_empty(n_packed)
    packed_ids[packed_position[stored]] = input_ids[stored]
    position_ids = torch.empty(n_packed, dtype=torch.long, device=device)
    position_ids[packed_position[stored]] = rank[stored]
    rows = torch.arange(n_rows, device=device)[:, None].expand(n_rows, width)
    return PackedBatch(
        input_ids=packed_ids.unsqueeze(0),
        position_ids=position_ids.unsqueeze(0),
        label_index=packed_position[has_label],
        labels=next_ids[has_label].unsqueeze(0),
        segment_ids=rows[has_label],
        n_rows=n_rows,
    )


def segment_logps(token_logps: torch.Tensor, segment_ids: torch.Tensor, n_rows: int) -> torch.Tensor:
    """float64 ``[R]``: per-row sums of packed label log-probs ``[1, M]`` (fp32), row ``r`` summing the labels whose
    ``segment_ids [M]`` is ``r``. float64 as ``sequence_logps``: the decisions compare sums that differ by O(ε)."""
    sums = torch.zeros(n_rows, dtype=torch.float64, device=token_logps.device)
    return sums.index_add(0, segment_ids, token_logps.reshape(-1).double())


def check_packable(model: torch.nn.Module, batch_keys: Any) -> None:
    """Refuse, naming the class and the fix, a model or batch a packed forward cannot run exactly: an attention
    implementation transformers does not split at restarting ``position_ids``, or per-row inputs beyond the token ids
    (multimodal ``pixel_values``, ``token_type_ids``). What this cannot see (an attention that ignores
    ``position_ids``) the first-step check catches: packed against the model's own unpadded forward."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    attention = getattr(config, "_attn_implementation", None)
    if attention is not None and attention not in PACKED_ATTENTION:
        raise ValueError(
            f"padding_free=True needs an attention that splits packed sequences at restarting position_ids; "
            f"{name} runs attn_implementation={attention!r}. Use flash_attention_2 on GPU or sdpa / eager on CPU, "
            "or set padding_free=False."
        )
    extra = sorted(set(batch_keys) - PACKABLE_KEYS)
    if extra:
        raise ValueError(
            f"padding_free=True packs token ids only, but {name}'s batches also carry {extra} (per padded row). "
            "Set padding_free=False for this model / dataset."
        )
