"""``edpo_plugin/trainer/packing.py``: a padded micro-batch's real tokens laid end to end in one row (``pack_rows``),
labels taken inside each sequence, a pair's shared prefix once, the layout every attention layer reads, and the
per-sequence sums in float64 (``segment_logps``; the padded layout's beside it).

Yardsticks: the packed rows, positions, labels and layouts worked out by hand from the module's documented rules;
``math.fsum`` for the sums.
"""

from __future__ import annotations

import pytest
import torch

from edpo_plugin.trainer.packed_attention import Segment
from edpo_plugin.trainer.packing import pack_rows
from tests.numerics import FLOAT64_SUM_ATOL


def test_pack_rows_keeps_labels_inside_each_sequence():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [1, 2, 3, 4]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    completion = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0], [0, 0, 1, 1]])
    packed = pack_rows(ids, mask, completion)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert packed.label_index.tolist() == [0, 1, 3, 6, 7]
    assert packed.labels.tolist() == [[6, 7, 9, 3, 4]]
    assert packed.segment_ids.tolist() == [0, 0, 1, 2, 2]
    everything = pack_rows(ids, mask)
    assert everything.label_index.tolist() == [0, 1, 3, 5, 6, 7]
    assert everything.labels.tolist() == [[6, 7, 9, 2, 3, 4]]


def test_pack_rows_shares_each_pairs_prefix():
    """Rows i and R/2 + i (chosen and rejected) side by side, the rejected row keeping what follows their common
    prefix at positions going on from it; the prefix's last token predicts both first completion tokens. Pair 1's
    chosen row is all prefix: its rejected row goes on from it (positions 3, 4 follow 2)."""
    ids = torch.tensor([[1, 2, 3, 4, 0], [1, 5, 6, 0, 0], [1, 2, 7, 8, 9], [1, 5, 6, 6, 3]])
    mask = (ids > 0).long()
    completion = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    packed = pack_rows(ids, mask, completion, share_prefixes=True)
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 7, 8, 9, 1, 5, 6, 6, 3]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2, 3, 4, 0, 1, 2, 3, 4]]
    assert packed.labels.tolist() == [[3, 4, 5, 6, 7, 8, 9, 5, 6, 6, 3]]
    assert packed.label_index.tolist() == [1, 2, 7, 8, 1, 4, 5, 7, 8, 9, 10]
    assert packed.segment_ids.tolist() == [0, 0, 1, 1, 2, 2, 2, 3, 3, 3, 3]
    with pytest.raises(ValueError, match="two halves; got 3 rows"):
        pack_rows(ids[:3], mask[:3], share_prefixes=True)


def test_pack_rows_layout_places_each_sequence_and_the_prefix_it_continues():
    """The layout of the rows above: each sequence's own tokens (start, length) in the packed row, and the shared
    prefix its queries also attend to (the first ``P`` tokens of its pair's chosen sequence, laid out just before it);
    the query and key offsets of a varlen kernel, and the packed position of every gathered key."""
    ids = torch.tensor([[1, 2, 3, 4, 0], [1, 5, 6, 0, 0], [1, 2, 7, 8, 9], [1, 5, 6, 6, 3]])
    mask = (ids > 0).long()
    whole = pack_rows(ids, mask).layout
    assert whole.segments == (Segment(0, 4, 0, 0), Segment(4, 3, 0, 0), Segment(7, 5, 0, 0), Segment(12, 5, 0, 0))
    assert whole.cu_seqlens_q.tolist() == whole.cu_seqlens_k.tolist() == [0, 4, 7, 12, 17]
    assert (whole.max_length_q, whole.max_length_k) == (5, 5) and whole.kv_index is None

    shared = pack_rows(ids, mask, share_prefixes=True).layout
    assert shared.segments == (Segment(0, 4, 0, 0), Segment(4, 3, 0, 2), Segment(7, 3, 0, 0), Segment(10, 2, 7, 3))
    assert shared.cu_seqlens_q.tolist() == [0, 4, 7, 10, 12]
    assert shared.cu_seqlens_k.tolist() == [0, 4, 9, 12, 17]
    assert (shared.max_length_q, shared.max_length_k) == (4, 5)
    assert shared.kv_index.tolist() == [0, 1, 2, 3, 0, 1, 4, 5, 6, 7, 8, 9, 7, 8, 9, 10, 11]


def test_per_sequence_sums_are_float64():
    """The decisions compare sequence sums that differ by O(ε): packed (segment_logps) and padded (PaddedBatch)
    sums of fp32 token log-probs are float64, to the last digit of an exact sum (fp32 accumulation of these 4096
    tokens is off by ~1e-3)."""
    import math

    from edpo_plugin.trainer.batch import PaddedBatch
    from edpo_plugin.trainer.packing import segment_logps

    g = torch.Generator().manual_seed(0)
    tokens = (-3.0 - torch.rand(2, 4096, generator=g)).float()
    exact = [math.fsum(row.double().tolist()) for row in tokens]
    packed = segment_logps(tokens.reshape(1, -1), torch.arange(2).repeat_interleave(4096), 2)
    for sums in (packed, PaddedBatch({}, tokens).sequence_logps(tokens)):
        assert sums.dtype == torch.float64
        assert max(abs(got - want) for got, want in zip(sums.tolist(), exact, strict=True)) <= FLOAT64_SUM_ATOL
