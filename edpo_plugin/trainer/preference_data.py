"""The preference data as TRL hands it over: the columns a run needs, checked before training, and the doubled BOS a
chat template leaves in a tokenized row.

Imports torch and TRL's data utilities (its implicit-prompt rule).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from trl.data_utils import extract_prompt

logger = logging.getLogger(__name__)

# Columns that hold a prompt or a conversation under another name; TRL's DPO reads none of them.
_PROMPT_ELSEWHERE = ("messages", "conversations", "conversation", "dialogue", "history", "question", "instruction",
                     "query", "input", "context")  # fmt: skip
_TRL_FORMATS = (
    "TRL's DPO takes an explicit prompt, columns 'prompt', 'chosen', 'rejected' all strings or all message lists "
    "([{'role': 'user', 'content': ...}, ...], the completions holding the assistant turn), or an implicit one: "
    "'chosen' and 'rejected' each holding the whole conversation, whose common start (the same first messages, or "
    "characters) TRL takes as the prompt. examples/prepare_hh.py writes the explicit form as train.trl.jsonl "
    "(docs/usage.md, Plain TRL)."
)


def check_preference_columns(dataset: Any, name: str) -> None:
    """A preference dataset needs ``chosen``, ``rejected`` and a prompt: a ``prompt`` column, or the common start of
    ``chosen`` and ``rejected`` (TRL 1.9–1.16 extract it when there is no ``prompt`` column). Refused, naming the
    columns and the formats: a missing column; no ``prompt`` column beside one TRL does not read that holds the
    prompt (``messages``: the pairs would train with no prompt); null values; a row mixing strings and message
    lists; a prompt empty in every row. A prompt empty in some rows is a warning."""
    datasets = dataset.values() if isinstance(dataset, dict) else [dataset]
    for ds in datasets:
        columns = getattr(ds, "column_names", None)
        if not columns:  # None, or an IterableDataset whose features are unknown until read
            continue
        missing = [c for c in ("chosen", "rejected") if c not in columns]
        if missing:
            raise ValueError(
                f"{name} has no {' / '.join(repr(m) for m in missing)} column (columns: {columns}). {_TRL_FORMATS}"
            )
        unread = [c for c in columns if c in _PROMPT_ELSEWHERE] if "prompt" not in columns else []
        unread_prompt = (
            f"{name} has no 'prompt' column (columns: {columns}); TRL's DPO does not read {unread}, so the pairs would "
            f"train on 'chosen' and 'rejected' with no prompt. Put the prompt in a 'prompt' column. {_TRL_FORMATS}"
        )
        if not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")):  # streamed: rows are not read up front
            if unread:
                raise ValueError(unread_prompt)
            continue
        fields = [c for c in ("prompt", "chosen", "rejected") if c in columns]
        values = {column: ds[column] for column in fields}
        for column in ("chosen", "rejected"):
            empty = [i for i, value in enumerate(values[column]) if value is None]
            if empty:
                raise ValueError(f"{name} rows {empty[:10]} have no {column!r} value (null). Drop or fix these rows.")
        prompt_sizes, repeated = [], []
        for i, row in enumerate(zip(*values.values(), strict=True)):
            kinds = {"messages" if isinstance(v, list) else type(v).__name__ for v in row}
            if len(kinds) > 1 or not kinds <= {"messages", "str"}:
                described = ", ".join(f"{c!r} is {type(v).__name__}" for c, v in zip(fields, row, strict=True))
                raise ValueError(
                    f"{name} row {i}: {described}; TRL needs them all strings or all message lists. {_TRL_FORMATS}"
                )
            if "prompt" in values:
                prompt = row[0]
                if prompt and all(c[: len(prompt)] == prompt for c in row[1:]):
                    repeated.append(i)
            else:  # TRL's implicit prompt: the start chosen and rejected share
                prompt = extract_prompt({"chosen": row[0], "rejected": row[1]})["prompt"]
            prompt_sizes.append(len(prompt))
        if repeated:
            raise ValueError(
                f"{name} rows {repeated[:10]} ({len(repeated)} of {len(prompt_sizes)}): 'chosen' and 'rejected' both "
                "begin with the 'prompt' (the whole conversation in each), and TRL's DPO puts the prompt before each "
                "completion: the prompt would be written twice and scored as part of both answers. With a 'prompt' "
                f"column, 'chosen' and 'rejected' hold only the answer; or drop 'prompt' for the implicit form. "
                f"{_TRL_FORMATS}"
            )
        no_prompt = [i for i, size in enumerate(prompt_sizes) if size == 0]
        conversations_with_prompt = not no_prompt and all(isinstance(v, list) for v in values["chosen"])
        if unread and not conversations_with_prompt:  # a shared start of two answers is no prompt
            raise ValueError(unread_prompt)
        where = "its 'prompt' is empty" if "prompt" in values else "'chosen' and 'rejected' share no start"
        if no_prompt and len(no_prompt) == len(prompt_sizes):
            raise ValueError(
                f"{name} has no prompt: {where} in every row (columns: {columns}), so the pairs would train with no "
                f"prompt. {_TRL_FORMATS}"
            )
        if no_prompt:
            logger.warning(
                "ε-DPO: %s rows %s (%d of %d) have no prompt (%s): they train on the completions alone.",
                name, no_prompt[:10], len(no_prompt), len(prompt_sizes), where,
            )  # fmt: skip


def drop_duplicate_bos(inputs: dict[str, torch.Tensor], bos: int | None, pad: int | None) -> tuple[dict, int]:
    """``(inputs, n)``: rows starting ``[bos, bos, …]`` (a chat template that writes BOS, tokenized again with special
    tokens) lose their first token, and ``n`` rows did. The rows are right-padded ``[R, T]``, so each such row shifts
    left by one (padding ``pad``, or 0); when every row did, the batch loses its last column."""
    ids = inputs["input_ids"]
    if bos is None or ids.shape[1] < 2:
        return inputs, 0
    doubled = (ids[:, 0] == bos) & (ids[:, 1] == bos) & inputs["attention_mask"][:, 1].bool()
    n_doubled = int(doubled.sum())
    if not n_doubled:
        return inputs, 0
    shifted_keys = ("input_ids", "attention_mask", "completion_mask", "token_type_ids")
    out = dict(inputs)
    for key in shifted_keys:
        if key in inputs:
            fill = (pad or 0) if key == "input_ids" else 0
            shifted = torch.cat((inputs[key][:, 1:], torch.full_like(inputs[key][:, :1], fill)), dim=1)
            out[key] = torch.where(doubled.unsqueeze(1), shifted, inputs[key])
    if n_doubled == ids.shape[0]:
        out = {k: v[:, :-1] if k in shifted_keys else v for k, v in out.items()}
    return out, n_doubled
