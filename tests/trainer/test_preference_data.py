"""``drop_duplicate_bos`` on a micro-batch where only some rows start ``[bos, bos, …]``: those rows shift left by one,
the others stay as they are, and the batch keeps its width (the integration tests double BOS in every row)."""

from __future__ import annotations

import torch

from edpo_plugin.trainer.preference_data import drop_duplicate_bos

BOS, PAD = 1, 0


def test_only_doubled_rows_shift():
    ids = torch.tensor([[BOS, BOS, 5, 6, 7], [BOS, 5, 6, PAD, PAD]])
    attention = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    completion = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 1, 0, 0]])
    out, n = drop_duplicate_bos(
        {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}, BOS, PAD
    )
    assert n == 1
    assert out["input_ids"].tolist() == [[BOS, 5, 6, 7, PAD], [BOS, 5, 6, PAD, PAD]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]
    assert out["completion_mask"].tolist() == [[0, 0, 1, 1, 0], [0, 0, 1, 0, 0]]


def test_every_row_doubled_drops_the_last_column():
    ids = torch.tensor([[BOS, BOS, 5, 6], [BOS, BOS, 7, PAD]])
    attention = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    out, n = drop_duplicate_bos({"input_ids": ids, "attention_mask": attention}, BOS, PAD)
    assert n == 2
    assert out["input_ids"].tolist() == [[BOS, 5, 6], [BOS, 7, PAD]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
