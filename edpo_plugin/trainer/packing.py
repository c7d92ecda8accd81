"""Padding-free ε-DPO: a micro-batch's chosen and rejected sequences packed into one row.

TRL's collator gives a padded ``[2B, T]`` batch (chosen rows, then rejected rows, each flushed left). Padding-free
training keeps only its real tokens: one row ``[1, N]`` (``N`` the number of ones in the attention mask), with
``position_ids`` restarting at 0 at every sequence and no attention mask. transformers derives the packed-sequence
boundaries from the restarting ``position_ids`` (FlashAttention-2 varlen on GPU; a block-diagonal causal mask for
SDPA / eager / flex, ``masking_utils.find_packed_sequence_indices``). Labels are taken inside each row before
packing, so a sequence's last token predicts nothing of the next sequence; per-sequence sums come back through the
segment ids.
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
    """A padded ``[R, T]`` batch with its real tokens laid end to end in one row."""

    input_ids: torch.Tensor  # int64 [1, N]: the real tokens of row 0, then of row 1, …
    position_ids: torch.Tensor  # int64 [1, N]: 0, 1, …, L_r − 1 for each row r
    segment_ids: torch.Tensor  # int64 [N]: the row each token came from
    labels: torch.Tensor  # int64 [1, N]: next token of the same row where that token is a completion token, else -100
    n_rows: int  # R


def pack_rows(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> PackedBatch:
    """Pack the tokens of ``input_ids [R, T]`` where ``attention_mask [R, T]`` is 1 into one row.

    ``completion_mask [R, T]`` (1 on completion tokens) selects which next tokens are labels; ``None`` makes every
    next token of the same row a label (the first-step check). A row's last real token always gets ``ignore_index``.
    """
    keep = attention_mask.bool()
    next_ids = torch.cat((input_ids[:, 1:], input_ids.new_full((input_ids.shape[0], 1), ignore_index)), dim=1)
    next_is_label = torch.cat((keep[:, 1:], keep.new_zeros((keep.shape[0], 1))), dim=1)
    if completion_mask is not None:
        next_is_label &= torch.cat((completion_mask[:, 1:].bool(), keep.new_zeros((keep.shape[0], 1))), dim=1)
    labels = next_ids.masked_fill(~next_is_label, ignore_index)
    lengths = keep.sum(dim=1)
    segment_ids = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    position_ids = torch.arange(len(segment_ids), device=lengths.device) - starts[segment_ids]
    return PackedBatch(
        input_ids=input_ids[keep].unsqueeze(0),
        position_ids=position_ids.unsqueeze(0),
        segment_ids=segment_ids,
        labels=labels[keep].unsqueeze(0),
        n_rows=input_ids.shape[0],
    )


def segment_logps(token_logps: torch.Tensor, segment_ids: torch.Tensor, n_rows: int) -> torch.Tensor:
    """float64 ``[R]``: per-row sums of packed token log-probs ``[1, N]`` (fp32), row ``r`` summing the tokens whose
    ``segment_ids [N]`` is ``r``. float64 as ``sequence_logps``: the decisions compare sums that differ by O(ε)."""
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
