"""``edpo_plugin/trainer/batch.py``: ``BatchLayout.lay_out`` turns TRL's padded micro-batch into what the backbones
run, padded (labels ``[R, T-1]``) or packed into one row (the same labels, each read from the hidden state of the
token before it in its own row, the same float64 sums), and refuses per-row keys packing cannot carry.

Yardsticks: labels worked out by hand from the padded batch; for the packed layout, the padded one.
"""

from __future__ import annotations

import pytest
import torch

from edpo_plugin.trainer.batch import BatchLayout, PaddedBatch
from edpo_plugin.trainer.packed_attention import LAYOUT_KWARG
from edpo_plugin.trainer.packing import PackedBatch
from tests.numerics import FLOAT64_TOL, rel


def _batch() -> dict[str, torch.Tensor]:
    """Two pairs (rows 0, 1 chosen; 2, 3 rejected), right-padded; a completion mask on the answers."""
    ids = torch.tensor([[1, 2, 3, 4, 0], [1, 5, 6, 0, 0], [1, 2, 7, 8, 9], [1, 5, 6, 6, 3]])
    completion = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    return {"input_ids": ids, "attention_mask": (ids > 0).long(), "completion_mask": completion}


def test_padded_layout_scores_the_completion_tokens():
    """Padded: position ``t`` predicts token ``t + 1`` where that token is scored (a completion token; with
    ``scored=None``, any real token), else -100; the model gets every key but the completion mask and precomputed
    reference log-probs; the head reads every position but the last; sums are float64."""
    batch = _batch() | {"ref_chosen_logps": torch.zeros(2), "ref_rejected_logps": torch.zeros(2)}
    laid = BatchLayout().lay_out(batch, scored=batch["completion_mask"])
    assert isinstance(laid, PaddedBatch)
    assert laid.labels.tolist() == [[-100, 3, 4, -100], [5, 6, -100, -100], [-100, 7, 8, 9], [5, 6, 6, 3]]
    every = BatchLayout().lay_out(batch, scored=None)
    assert every.labels.tolist() == [[2, 3, 4, -100], [5, 6, -100, -100], [2, 7, 8, 9], [5, 6, 6, 3]]
    assert laid.model_kwargs().keys() == {"input_ids", "attention_mask"}
    assert laid.backbone_positions == 20
    hidden = torch.randn(4, 5, 8)
    assert torch.equal(laid.head_input(hidden), hidden[:, :-1])
    tokens = -torch.rand(4, 4, generator=torch.Generator().manual_seed(0))
    sums = laid.sequence_logps(tokens)
    assert sums.dtype == torch.float64 and torch.equal(sums, tokens.double().sum(-1))


@pytest.mark.parametrize("share_prompt", [False, True])
def test_packed_layout_scores_what_the_padded_one_does(share_prompt):
    """Packed: the padded layout's labels in its row-major order, each read from the hidden state of the token that
    precedes it in its own row (a shared prefix's token, for a rejected row's first answer token), the same float64
    per-sequence sums; the backbone runs the real tokens only (a pair's common prefix once) and gets no mask."""
    batch = _batch()
    padded = BatchLayout().lay_out(batch, scored=batch["completion_mask"])
    packed = BatchLayout(padding_free=True, share_prompt=share_prompt).lay_out(batch, scored=batch["completion_mask"])
    assert isinstance(packed, PackedBatch)
    scored = padded.labels != -100
    assert packed.labels[0].tolist() == padded.labels[scored].tolist()
    preceding = batch["input_ids"][:, :-1][scored]
    assert packed.input_ids[0, packed.label_index].tolist() == preceding.tolist()
    hidden = torch.randn(1, packed.input_ids.shape[1], 8)
    assert torch.equal(packed.head_input(hidden), hidden[:, packed.label_index])
    assert packed.model_kwargs().keys() == {"input_ids", "position_ids", LAYOUT_KWARG}
    shared = 2 + 3 if share_prompt else 0  # each pair's common prefix: [1, 2] and [1, 5, 6]
    assert packed.backbone_positions == int(batch["attention_mask"].sum()) - shared

    tokens = -torch.rand(padded.labels.shape, generator=torch.Generator().manual_seed(0))
    sums = packed.sequence_logps(tokens[scored][None])
    assert sums.dtype == torch.float64
    assert rel(sums, padded.sequence_logps(tokens * scored)) <= FLOAT64_TOL


def test_per_row_batch_keys_are_refused():
    """A batch key packing cannot lay out (one entry per padded row: pixel values) is refused, naming it."""
    ids = torch.ones(2, 3, dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": ids, "completion_mask": ids, "pixel_values": torch.zeros(2, 1)}
    with pytest.raises(ValueError, match=r"also carry \['pixel_values'\]"):
        BatchLayout(padding_free=True).lay_out(batch, scored=None)
