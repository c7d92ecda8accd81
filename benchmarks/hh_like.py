"""Synthetic preference pairs shaped like Anthropic HH harmless-base: each pair's two completions after one shared
prompt, lengths drawn log-normally (σ 0.5) around the data's medians at 512 tokens
(``benchmarks/results/padding_ratio_hh_512.json``: common prefix 118, chosen 28, rejected 36), random token ids."""

from __future__ import annotations

import random

import torch

HH_MEDIANS = {"prompt": 118, "chosen": 28, "rejected": 36}


def hh_like_batch(
    pairs: int, vocab: int, *, scale: int = 1, width: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask``, int64 ``[2 · pairs, width]``: the chosen rows, then the rejected rows,
    real tokens left-aligned; medians times ``scale``; rows cut at ``width`` (None: padded to the longest row)."""
    rng = random.Random(seed)

    def tokens(median: int) -> list[int]:
        return [rng.randrange(vocab) for _ in range(max(2, int(median * scale * rng.lognormvariate(0, 0.5))))]

    chosen, rejected = [], []
    for _ in range(pairs):
        prompt = tokens(HH_MEDIANS["prompt"])
        chosen.append(prompt + tokens(HH_MEDIANS["chosen"]))
        rejected.append(prompt + tokens(HH_MEDIANS["rejected"]))
    rows = [row[:width] for row in chosen + rejected]
    ids = torch.zeros(len(rows), width or max(map(len, rows)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask
