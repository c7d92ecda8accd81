"""Preference rows of varied lengths for the padding-free tests (the tiny default's rows all have one length)."""

from __future__ import annotations

import json
from pathlib import Path


def varied_rows(train_file: str | Path, n_rows: int) -> list[dict[str, str]]:
    """The first ``n_rows`` tiny default rows with prompts and completions of varied lengths, so that a padded batch
    carries padding and a pair's chosen and rejected differ in length."""
    rows = [json.loads(line) for line in Path(train_file).read_text().splitlines()[:n_rows]]
    for i, row in enumerate(rows):
        row["prompt"] = " ".join([row["prompt"]] * (1 + i % 3))
        row["chosen"] = " ".join(row["chosen"].split()[: 1 + i % 3])
        row["rejected"] = " ".join([row["rejected"]] * (1 + (i // 2) % 2))
    return rows


def write_varied_rows(train_file: str | Path, n_rows: int, out: Path) -> Path:
    """:func:`varied_rows` written as JSON lines to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row) + "\n" for row in varied_rows(train_file, n_rows)))
    return out
