"""Anthropic HH (harmless-base, test split) → preference rows for Axolotl's ``chat_template.default`` and for TRL.

python examples/prepare_hh.py                      # data/hh-rlhf-harmless-base-test.jsonl.gz → .data/hh-harmless/
python examples/prepare_hh.py --heldout 200 --out .data/hh-harmless

Each HH row is two dialogues, ``"\\n\\nHuman: …\\n\\nAssistant: …"``, that share every turn but the last
``Assistant:`` one. That last turn is the completion; everything before it is the prompt, kept as a multi-turn message
list so the model's own ChatML template renders it. Written rows (one JSON object a line)::

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...],
     "chosen": "<last assistant turn of the chosen dialogue>",
     "rejected": "<last assistant turn of the rejected dialogue>",
     "id": <index of the pair in the source file>}

``train.trl.jsonl`` and ``heldout.trl.jsonl`` hold the same pairs in TRL's conversational preference format, which
``EpsilonDPOTrainer`` (and TRL's ``DPOTrainer``) read; TRL does not read ``messages``::

    {"prompt": [{"role": "user", "content": "..."}, ...],
     "chosen": [{"role": "assistant", "content": "<last assistant turn of the chosen dialogue>"}],
     "rejected": [{"role": "assistant", "content": "<last assistant turn of the rejected dialogue>"}], "id": ...}

Pairs are dropped (and counted) when the two dialogues do not share the same prompt, when either completion is empty,
or when both completions are identical (no preference to learn). The held-out split is the last ``--heldout`` kept
pairs of the file, in file order, so it never changes between runs; ``train.jsonl`` holds the rest.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
ASSISTANT = "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant): ?")
_ROLES = {"Human": "user", "Assistant": "assistant"}


class HHFormatError(ValueError):
    """A source row that is not an HH pair (names the row and the field)."""


def split_dialogue(text: str, *, where: str) -> tuple[list[dict[str, str]], str]:
    """Split one HH dialogue into (prompt messages, last assistant turn).

    ``text``: ``"\\n\\nHuman: …\\n\\nAssistant: …"``. Returns the turns before the last ``Assistant:`` as
    ``[{"role": "user"|"assistant", "content": str}, …]`` (content stripped) and the stripped last turn.
    ``where`` names the row and field in errors.
    """
    if not isinstance(text, str):
        raise HHFormatError(f"{where}: expected a string, got {type(text).__name__}")
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise HHFormatError(f"{where}: no '\\n\\nAssistant:' turn")
    head, completion = text[:cut], text[cut + len(ASSISTANT) :].strip()
    parts = _TURN.split(head)
    if parts[0].strip():
        raise HHFormatError(f"{where}: text before the first '\\n\\nHuman:' turn: {parts[0][:60]!r}")
    messages = [{"role": _ROLES[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]
    if not messages or messages[-1]["role"] != "user":
        raise HHFormatError(f"{where}: the prompt must end with a '\\n\\nHuman:' turn")
    return messages, completion


def convert(rows: list[dict], *, source: str = "hh") -> tuple[list[dict], Counter]:
    """HH rows (``{"chosen": str, "rejected": str}``) → kept prompt/chosen/rejected rows and drop counts."""
    kept: list[dict] = []
    dropped: Counter = Counter()
    for i, row in enumerate(rows):
        for field in ("chosen", "rejected"):
            if field not in row:
                raise HHFormatError(f"{source} row {i}: missing field {field!r} (has {sorted(row)})")
        try:
            prompt_c, chosen = split_dialogue(row["chosen"], where=f"{source} row {i} field 'chosen'")
            prompt_r, rejected = split_dialogue(row["rejected"], where=f"{source} row {i} field 'rejected'")
        except HHFormatError:
            dropped["not a dialogue ending in a Human→Assistant turn"] += 1
            continue
        if prompt_c != prompt_r:
            dropped["chosen and rejected prompts differ"] += 1
        elif not chosen or not rejected:
            dropped["empty completion"] += 1
        elif chosen == rejected:
            dropped["identical completions"] += 1
        else:
            kept.append({"messages": prompt_c, "chosen": chosen, "rejected": rejected, "id": i})
    return kept, dropped


def to_trl(row: dict) -> dict:
    """A kept row → TRL's conversational preference row (explicit prompt; the completions are assistant turns)."""
    return {"prompt": row["messages"], "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}], "id": row["id"]}  # fmt: skip


def load_source(path: Path = SOURCE) -> list[dict]:
    """Read the gzipped JSONL source; a line that is not a JSON object is an error naming its line number."""
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict):
                raise HHFormatError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def prepare(out: Path, *, heldout: int = 200, train_limit: int | None = None, source: Path = SOURCE) -> dict:
    """Write ``out/{train,heldout}.jsonl`` (Axolotl) and ``out/{train,heldout}.trl.jsonl`` (TRL); returns the paths
    and counts."""
    kept, dropped = convert(load_source(source), source=source.name)
    if not 0 < heldout < len(kept):
        raise ValueError(f"heldout={heldout} must be in (0, {len(kept)})")
    train, held = kept[:-heldout], kept[-heldout:]
    if train_limit is not None:
        train = train[:train_limit]
    out = Path(out)
    paths = {}
    for split, rows in (("train", train), ("heldout", held)):
        paths[split], paths[f"{split}_trl"] = out / f"{split}.jsonl", out / f"{split}.trl.jsonl"
        write_jsonl(rows, paths[split])
        write_jsonl([to_trl(row) for row in rows], paths[f"{split}_trl"])
    return {**paths, "n_train": len(train), "n_heldout": len(held), "dropped": dict(dropped)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / ".data" / "hh-harmless")
    p.add_argument("--heldout", type=int, default=200, help="last N kept pairs form the held-out split")
    p.add_argument("--source", type=Path, default=SOURCE)
    args = p.parse_args()
    info = prepare(args.out, heldout=args.heldout, source=args.source)
    print(f"train: {info['n_train']} pairs → {info['train']} (Axolotl), {info['train_trl']} (TRL)")
    print(f"held-out: {info['n_heldout']} pairs → {info['heldout']} (Axolotl), {info['heldout_trl']} (TRL)")
    print(f"dropped: {info['dropped']}")


if __name__ == "__main__":
    main()
