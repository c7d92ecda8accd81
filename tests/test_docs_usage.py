"""docs/usage.md's plain-TRL block (SmolLM2 + HH through EpsilonDPOTrainer), executed as written from a directory
that holds what its set-up commands make: ``examples/prepare_hh.py``'s output in ``.data/hh-harmless`` and, in
``.models/smollm2-135m-instruct``, the tiny default's model (ChatML, like SmolLM2's) or, with ``-m slow`` and the
model prepared by ``examples/prepare_smollm2.py``, SmolLM2 itself."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
USAGE = (REPO / "docs" / "usage.md").read_text(encoding="utf-8")
SMOLLM2 = REPO / ".models" / "smollm2-135m-instruct"


def _plain_trl_block() -> str:
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", USAGE, re.S) if "EpsilonDPOTrainer" in b]
    return block


def _run_block(model_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / ".models").mkdir()
    os.symlink(model_dir, tmp_path / ".models" / "smollm2-135m-instruct")
    data = tmp_path / ".data" / "hh-harmless"
    done = subprocess.run([sys.executable, str(REPO / "examples" / "prepare_hh.py"), "--out", str(data)],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict = {}
    exec(compile(_plain_trl_block(), "docs/usage.md: plain TRL", "exec"), namespace)
    trainer, args = namespace["trainer"], namespace["args"]
    assert trainer.state.global_step == args.max_steps

    # the prompts TRL tokenized are the HH conversations before the answer, rendered with the chat template
    tokenizer = trainer.processing_class
    rows = [json.loads(line) for line in (data / "train.trl.jsonl").read_text().splitlines()]
    rendered = {tuple(tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True)["input_ids"])
                for row in rows}  # fmt: skip
    tokenized = trainer.train_dataset.select(range(32))["prompt_ids"]
    assert all(tuple(ids) in rendered for ids in tokenized)
    assert min(len(ids) for ids in tokenized) > 8  # ChatML markers and the question, not an empty prompt

    # β follows the logged decisions, as printed
    logs = [h for h in trainer.state.log_history if "kl/beta" in h]
    assert len(logs) == args.max_steps
    beta = args.beta
    for h in logs:
        assert h["kl/beta"] == pytest.approx(beta, rel=1e-9)
        beta /= 1 + args.epsilon * h["kl/avg_steps"]
    assert trainer.beta == pytest.approx(beta, rel=1e-9)
    assert f"→ {trainer.beta}" in capsys.readouterr().out


def test_plain_trl_block_runs_as_written(tiny_default, tmp_path, monkeypatch, capsys):
    _run_block(tiny_default["model"], tmp_path, monkeypatch, capsys)


@pytest.mark.slow
def test_plain_trl_block_runs_on_smollm2(tmp_path, monkeypatch, capsys):
    """The real model, when examples/prepare_smollm2.py has prepared it (several minutes on 2 CPU cores)."""
    if not (SMOLLM2 / "config.json").is_file():
        pytest.skip("SmolLM2 is not prepared: python examples/prepare_smollm2.py")
    _run_block(SMOLLM2, tmp_path, monkeypatch, capsys)
