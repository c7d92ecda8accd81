"""Padding-free ε-DPO: a micro-batch's chosen and rejected sequences packed into one row.

TRL's collator gives a padded ``[2B, T]`` batch (chosen rows, then rejected rows, each flushed left). Padding-free
training keeps only its real tokens: one row ``[1, N]`` (``N`` the number of ones in the attention mask), with
``position_ids`` restarting at 0 at every sequence and no attention mask. Where each sequence lies reaches every
attention layer as a :class:`~edpo_plugin.trainer.packed_attention.PackedLayout`, worked out here once per
micro-batch on the host (ε-DPO's packed attention splits the row by it; :mod:`packed_attention`). Labels are taken
inside each row before packing, so a sequence's last token predicts nothing of the next sequence; per-sequence sums
come back through the segment ids, in float64.

With ``share_prefixes`` a pair's chosen and rejected sequences share the tokens they begin with (the prompt, at
least): the rejected sequence keeps only what follows, its ``position_ids`` going on from the shared prefix's
length ``P`` instead of 0, and its queries attend to the first ``P`` keys of the chosen sequence laid out before it.
Every label still comes from the hidden state of the token it follows, the prefix's last one predicting both
completions' first tokens.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from edpo_plugin.trainer.packed_attention import LAYOUT_KWARG, PackedLayout, Segment


class PackedBatch(NamedTuple):
    """A padded ``[R, T]`` batch with its real tokens laid end to end in one row, and its labels.

    Labels are listed in the padded batch's row-major order (row 0's, then row 1's, …), each with the packed position
    whose hidden state predicts it: ``hidden[:, label_index]`` is the head's input ``[1, M, d]``. Tensors are on the
    batch's device; ``layout`` is what every attention layer reads (host bounds, device offsets).
    """

    input_ids: torch.Tensor  # int64 [1, N]: the real tokens of each row (a shared prefix once)
    position_ids: torch.Tensor  # int64 [1, N]: each token's position in its own row
    label_index: torch.Tensor  # int64 [M]: packed position predicting each label
    labels: torch.Tensor  # int64 [1, M]: next token of the same row, where that token is a completion token
    segment_ids: torch.Tensor  # int64 [M]: the row each label belongs to
    n_rows: int  # R
    layout: PackedLayout

    def model_kwargs(self) -> dict:
        """The packed row's forward arguments: token ids, ``position_ids`` and the attention layout (no mask)."""
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, LAYOUT_KWARG: self.layout}

    def head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[1, M, d]`` of the backbone's ``[1, N, d]``: the positions that predict a label."""
        return hidden[:, self.label_index]

    def sequence_logps(self, token_logps: torch.Tensor) -> torch.Tensor:
        """float64 ``[R]`` per-row sums of the ``[1, M]`` label log-probs (:func:`segment_logps`)."""
        return segment_logps(token_logps, self.segment_ids, self.n_rows)

    def forward_done(self, model: torch.nn.Module, what: str) -> None:
        """After ``model``'s forward of this row: every attention layer read the layout
        (:meth:`PackedLayout.check_reached`)."""
        self.layout.check_reached(model, what)

    @property
    def backbone_positions(self) -> int:
        return self.input_ids.numel()


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

    The layout is worked out on the host: the masks are copied there once (the micro-batch's only device sync).
    """
    device = input_ids.device
    ids = input_ids.cpu()
    keep = attention_mask.cpu().bool()
    n_rows, width = keep.shape
    no_label = keep.new_zeros((n_rows, 1))
    has_label = torch.cat((keep[:, 1:], no_label), dim=1)
    if completion_mask is not None:
        has_label &= torch.cat((completion_mask.cpu()[:, 1:].bool(), no_label), dim=1)
    next_ids = torch.cat((ids[:, 1:], ids[:, :1]), dim=1)

    rank = keep.long().cumsum(dim=1) - 1  # each real token's position in its own row
    lengths = keep.sum(dim=1)
    shared, partner, order = _shared_prefixes(ids, keep, rank, share_prefixes)

    stored = keep & (rank >= shared[:, None])
    stored_lengths = lengths - shared
    offsets = torch.empty_like(stored_lengths)
    offsets[order] = torch.cumsum(stored_lengths[order], 0) - stored_lengths[order]
    # packed position of every real token: its own, or (a shared prefix) its partner's
    own_position = offsets[:, None] + rank - shared[:, None]
    packed_position = torch.where(rank >= shared[:, None], own_position, offsets[partner][:, None] + rank)

    n_packed = int(stored_lengths.sum())
    packed_ids = ids.new_empty(n_packed)
    packed_ids[packed_position[stored]] = ids[stored]
    position_ids = torch.empty(n_packed, dtype=torch.long)
    position_ids[packed_position[stored]] = rank[stored]
    rows = torch.arange(n_rows)[:, None].expand(n_rows, width)
    segments = tuple(
        Segment(int(offsets[r]), int(stored_lengths[r]), int(offsets[partner[r]]) if shared[r] else 0, int(shared[r]))
        for r in order.tolist()
        if stored_lengths[r] > 0
    )

    to_device = functools.partial(torch.Tensor.to, device=device, non_blocking=True)
    return PackedBatch(
        input_ids=to_device(packed_ids.unsqueeze(0)),
        position_ids=to_device(position_ids.unsqueeze(0)),
        label_index=to_device(packed_position[has_label]),
        labels=to_device(next_ids[has_label].unsqueeze(0)),
        segment_ids=to_device(rows[has_label]),
        n_rows=n_rows,
        layout=PackedLayout.from_segments(segments, device),
    )


def _shared_prefixes(
    ids: torch.Tensor, keep: torch.Tensor, rank: torch.Tensor, share: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int64 ``[R]`` each: the leading tokens a row takes from its partner (0 without ``share``), its partner (the
    pair's chosen row for a rejected one, else itself), and the rows in the order they are laid out (a pair's two rows
    side by side when ``share``)."""
    n_rows, width = keep.shape
    shared = torch.zeros(n_rows, dtype=torch.long)
    partner = torch.arange(n_rows)
    order = torch.arange(n_rows)
    if not share:
        return shared, partner, order
    if n_rows % 2:
        raise ValueError(f"share_prefixes needs chosen and rejected rows in two halves; got {n_rows} rows.")
    half = n_rows // 2
    tokens = torch.full((n_rows, width), -1, dtype=ids.dtype)
    tokens[keep.nonzero(as_tuple=True)[0], rank[keep]] = ids[keep]  # real tokens flushed left
    same = (tokens[:half] == tokens[half:]) & (tokens[:half] >= 0)
    shared[half:] = same.long().cumprod(dim=1).sum(dim=1)
    partner[half:] -= half
    return shared, partner, torch.stack((order[:half], order[half:]), dim=1).flatten()


def segment_logps(token_logps: torch.Tensor, segment_ids: torch.Tensor, n_rows: int) -> torch.Tensor:
    """float64 ``[R]``: per-row sums of packed label log-probs ``[1, M]`` (fp32), row ``r`` summing the labels whose
    ``segment_ids [M]`` is ``r``. float64 as ``sequence_logps``: the decisions compare sums that differ by O(ε)."""
    sums = torch.zeros(n_rows, dtype=torch.float64, device=token_logps.device)
    return sums.index_add(0, segment_ids, token_logps.reshape(-1).double())
