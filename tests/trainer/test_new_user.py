"""What a new user trips on with plain TRL (issue 27): the Triton head off CUDA refused at config time, preference data
without a usable prompt refused before TRL tokenizes it, and the log lines a run owes its user (the head picked, β
restored on resume) shown at default log settings, without the CPU-only kernel noise of TRL's imports."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from datasets import Dataset, load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from edpo_plugin.ops import linear_logprobs
from edpo_plugin.trainer import EDPO_STATE_NAME, EpsilonDPOConfig, EpsilonDPOTrainer

REPO = Path(__file__).resolve().parents[2]
CPU_CHOICES = ("'auto'", "'chunked'", "'naive'")


def _config(out, **overrides) -> EpsilonDPOConfig:
    kwargs = dict(
        output_dir=str(out), per_device_train_batch_size=4, max_steps=2, learning_rate=5e-3, logging_steps=1,
        report_to="none", save_strategy="no", beta=0.1, epsilon=0.1, seed=0, use_cpu=True, disable_tqdm=True,
        max_length=64, bf16=False,
    )  # fmt: skip
    return EpsilonDPOConfig(**{**kwargs, **overrides})


def _trainer(tiny, out, dataset, **overrides) -> EpsilonDPOTrainer:
    tok = AutoTokenizer.from_pretrained(tiny["model"])
    model = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32)
    return EpsilonDPOTrainer(model=model, args=_config(out, **overrides), train_dataset=dataset, processing_class=tok)


# ----------------------------------------------------------------------------------------- the Triton head off CUDA


def test_triton_head_without_cuda_is_refused_at_config_time(tmp_path, monkeypatch):
    """``use_cpu=True`` makes this a machine without CUDA for the trainer, with or without a GPU."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"edpo_head='triton' needs a CUDA GPU") as refused:
        _config(tmp_path, edpo_head="triton")
    assert all(choice in str(refused.value) for choice in CPU_CHOICES), refused.value


def test_triton_head_under_the_interpreter_is_allowed(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _config(tmp_path, edpo_head="triton").edpo_head == "triton"


def test_linear_logprobs_triton_on_cpu_tensors_is_refused(monkeypatch):
    """A clear ValueError naming the option, not Triton's ``RuntimeError: 0 active drivers``."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    hidden, weight, labels = torch.randn(3, 8), torch.randn(20, 8), torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match=r"impl='triton' needs a CUDA GPU.*on cpu") as refused:
        linear_logprobs(hidden, weight, labels, ref_hidden=hidden, ref_weight=weight, epsilon=0.1, impl="triton")
    assert all(choice in str(refused.value) for choice in CPU_CHOICES), refused.value


# ------------------------------------------------------------------------------------------------- the data format


@pytest.fixture(scope="module")
def hh_files(tmp_path_factory) -> Path:
    """examples/prepare_hh.py's output, as a user gets it."""
    out = tmp_path_factory.mktemp("hh")
    done = subprocess.run([sys.executable, str(REPO / "examples" / "prepare_hh.py"), "--out", str(out)],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def _rows(path: Path, n: int = 16) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()[:n]]


def test_prepared_hh_for_axolotl_is_refused_naming_its_columns(tiny_default, tmp_path, hh_files):
    """prepare_hh.py's Axolotl file (``messages`` and the two answers): TRL reads no ``messages``, and its implicit
    prompt — the common start of the two answers — is no question at all (the yardstick: TRL's own extraction)."""
    from trl import extract_prompt

    rows = _rows(hh_files / "train.jsonl")
    implicit = [extract_prompt(r)["prompt"] for r in rows]
    assert all(isinstance(p, str) and len(p) < 20 for p in implicit), implicit  # a few shared characters at most
    with pytest.raises(ValueError) as refused:
        _trainer(tiny_default, tmp_path, Dataset.from_list(rows))
    message = str(refused.value)
    for needle in ("no 'prompt' column", "['messages']", "'chosen'", "'rejected'", "'id'", "train.trl.jsonl",
                   "message lists", "implicit"):  # fmt: skip
        assert needle in message, (needle, message)


def test_prepared_hh_for_trl_trains(tiny_default, tmp_path, hh_files):
    """The same pairs from train.trl.jsonl: the prompt TRL tokenizes is the conversation before the answer."""
    rows = [r for r in _rows(hh_files / "train.trl.jsonl", 200) if len(json.dumps(r)) < 600][:8]
    assert len(rows) == 8 and any(len(r["prompt"]) > 1 for r in rows)
    trainer = _trainer(tiny_default, tmp_path, Dataset.from_list(rows), max_length=256)
    tok = trainer.processing_class
    for row, tokenized in zip(rows, trainer.train_dataset, strict=True):
        want = tok.apply_chat_template(row["prompt"], tokenize=True, add_generation_prompt=True)["input_ids"]
        assert tokenized["prompt_ids"] == want
    trainer.train()
    assert trainer.state.global_step == 2


PAIR = {"prompt": "count up from two :", "chosen": "three four five", "rejected": "nine"}
USER = {"role": "user", "content": "count up from two :"}


def _answer(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


@pytest.mark.parametrize(
    "rows,match",
    [
        ([{**PAIR, "prompt": ""}] * 4, r"its 'prompt' is empty in every row"),
        ([{"chosen": "three four five", "rejected": "nine"}] * 4, r"'chosen' and 'rejected' share no start"),
        ([{"prompt": [USER], "chosen": "three four five", "rejected": "nine"}] * 4,
         r"row 0: 'prompt' is list, 'chosen' is str, 'rejected' is str; TRL needs them all strings or all message"),
        ([{"question": "count up from two :", "chosen": "three four", "rejected": "three nine"}] * 4,
         r"no 'prompt' column .*does not read \['question'\]"),
        ([{"prompt": [USER], "chosen": [USER, *_answer("three four")], "rejected": [USER, *_answer("nine")]}] * 4,
         r"'chosen' and 'rejected' both begin with the 'prompt'"),
        ([{**PAIR, "chosen": PAIR["prompt"] + " three four", "rejected": PAIR["prompt"] + " nine"}] * 4,
         r"rows \[0, 1, 2, 3\] \(4 of 4\): 'chosen' and 'rejected' both begin with the 'prompt'"),
    ],
    ids=["empty-prompt", "implicit-without-start", "mixed-kinds", "prompt-under-another-name",
         "prompt-repeated-in-messages", "prompt-repeated-in-strings"],
)  # fmt: skip
def test_dataset_without_a_usable_prompt_is_refused(tiny_default, tmp_path, rows, match):
    with pytest.raises(ValueError, match=match) as refused:
        _trainer(tiny_default, tmp_path, Dataset.from_list(rows))
    assert "TRL's DPO takes an explicit prompt" in str(refused.value)


@pytest.mark.parametrize(
    "rows",
    [
        [PAIR] * 4,
        [{"prompt": [USER], "chosen": _answer("three four five"), "rejected": _answer("nine")}] * 4,
        [{"chosen": "\n\nHuman: count up from two :\n\nAssistant: three four", "rejected":
          "\n\nHuman: count up from two :\n\nAssistant: nine"}] * 4,
        [{"messages": [USER], "chosen": [USER, *_answer("three four")], "rejected": [USER, *_answer("nine")]}] * 4,
    ],
    ids=["explicit-strings", "explicit-messages", "implicit-strings", "implicit-messages-beside-messages"],
)  # fmt: skip
def test_trl_preference_formats_are_accepted(tiny_default, tmp_path, rows):
    trainer = _trainer(tiny_default, tmp_path, Dataset.from_list(rows))
    assert all(len(r["prompt_ids"]) > 0 for r in trainer.train_dataset)


def test_prompt_empty_in_some_rows_is_a_warning(tiny_default, tmp_path, caplog):
    rows = [PAIR, {**PAIR, "prompt": ""}, PAIR, {**PAIR, "prompt": ""}]
    with caplog.at_level(logging.WARNING, logger="edpo_plugin"):
        _trainer(tiny_default, tmp_path, Dataset.from_list(rows))
    assert "train_dataset rows [1, 3] (2 of 4) have no prompt (its 'prompt' is empty)" in caplog.text


# --------------------------------------------------------------------------------------------------- log lines


def test_start_names_the_head_and_resume_the_beta_restored(tiny_default, tmp_path, caplog):
    data = load_dataset("json", data_files=str(tiny_default["train"]), split="train").select(range(16))
    with caplog.at_level(logging.INFO, logger="edpo_plugin"):
        first = _trainer(tiny_default, tmp_path, data, save_strategy="steps", save_steps=2, max_steps=4)
    assert "ε-DPO: log-prob head 'chunked' (edpo_head='auto', float32 on cpu)." in caplog.messages
    first.args.max_steps = 2
    first.train()
    checkpoint = tmp_path / "checkpoint-2"
    saved = json.loads((checkpoint / EDPO_STATE_NAME).read_text())["beta"]
    second = _trainer(tiny_default, tmp_path, data, save_strategy="steps", save_steps=2, max_steps=4)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="edpo_plugin"):
        second.train(resume_from_checkpoint=str(checkpoint))
    assert f"ε-DPO: resuming with β = {saved!r} from {checkpoint / EDPO_STATE_NAME}." in caplog.messages


# A user's script, as written: no logging set up, edpo_plugin imported before PEFT and transformers' models (a user's
# imports in alphabetical order).
_USER_SCRIPT = """
from datasets import load_dataset
from edpo_plugin.trainer import EpsilonDPOConfig, EpsilonDPOTrainer
from transformers import AutoModelForCausalLM, AutoTokenizer

tiny, out = {tiny!r}, {out!r}
dataset = load_dataset("json", data_files=tiny + "/data/train.jsonl", split="train").select(range(8))
def trainer():
    args = EpsilonDPOConfig(output_dir=out, max_steps=2, per_device_train_batch_size=4, save_steps=1, report_to=[],
                            bf16=False, use_cpu=True, disable_tqdm=True)
    return EpsilonDPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny + "/model"), args=args,
                             train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(tiny + "/model"))
trainer().train()
trainer().train(resume_from_checkpoint=out + "/checkpoint-1")
"""
# Import-time lines of optional kernels that cannot run on this CPU machine (bitsandbytes': on any machine).
_NOISE = ("Failed to load", "is an Enum subclass", "Skipping publisher trust check")


def _run_script(code: str, tmp_path: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout + done.stderr


def _noise(output: str) -> list[str]:
    return [line for line in output.splitlines() if any(n in line for n in _NOISE)]


def test_plain_trl_user_sees_the_lines(tiny_default, tmp_path):
    """In a script that configures no logging: the head picked, the first-step check and the β restored, printed."""
    out = _run_script(textwrap.dedent(_USER_SCRIPT).format(tiny=str(tiny_default["root"]), out=str(tmp_path)), tmp_path)
    assert "ε-DPO: log-prob head 'chunked' (edpo_head='auto', float32 on cpu)." in out
    assert "ε-DPO head check" in out
    assert "ε-DPO: resuming with β = " in out and "checkpoint-1/edpo_state.json" in out


def test_importing_the_trainer_first_quiets_cpu_kernel_noise(tiny_default, tmp_path):
    """PEFT and transformers' models imported (and a model loaded) after edpo_plugin.trainer print none of the
    optional kernels' import-time lines that the same imports print without it first (the yardstick)."""
    if torch.cuda.is_available():
        pytest.skip("torchao's kernel-library lines are kept on a CUDA machine")
    model = str(tiny_default["model"])
    load = f"import peft, transformers\ntransformers.AutoModelForCausalLM.from_pretrained({model!r})\n"
    noisy = _noise(_run_script(load, tmp_path))
    if not noisy:
        pytest.skip("these imports print no kernel noise here (no torchao / bitsandbytes lines to hide)")
    assert not _noise(_run_script("import edpo_plugin.trainer\n" + load, tmp_path)), noisy
