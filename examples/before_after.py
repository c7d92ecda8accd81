"""Greedy answers to a few held-out HH (harmless) prompts: the base model vs the same model with a trained adapter.

python examples/before_after.py outputs/smollm2-135m-edpo-lora --heldout .data/hh-harmless/heldout.jsonl -n 4

The adapter directory is what ``axolotl train`` saved (``adapter_config.json`` + ``adapter_model.safetensors``); its
``base_model_name_or_path`` names the base. One model is loaded; "before" answers are generated with the adapter
disabled, "after" with it enabled. Prompts are the ``-n`` held-out rows with the shortest single-turn prompts (a fixed
choice: the held-out split is fixed), rendered with the tokenizer's chat template. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def pick_prompts(heldout: Path, n: int) -> list[list[dict[str, str]]]:
    """The ``n`` shortest single-turn prompts (message lists) of a ``prepare_hh.py`` held-out file, in file order."""
    rows = [json.loads(line) for line in heldout.read_text(encoding="utf-8").splitlines() if line.strip()]
    for i, row in enumerate(rows):
        if not isinstance(row.get("messages"), list):
            raise ValueError(f"{heldout} line {i + 1}: field 'messages' must be a list of {{role, content}} dicts")
    single = [(len(r["messages"][0]["content"]), i) for i, r in enumerate(rows) if len(r["messages"]) == 1]
    if len(single) < n:
        raise ValueError(f"{heldout}: only {len(single)} single-turn prompts, {n} asked")
    chosen = sorted(i for _, i in sorted(single)[:n])
    return [rows[i]["messages"] for i in chosen]


@torch.no_grad()
def greedy(model, tok, messages: list[dict[str, str]], max_new_tokens: int) -> str:
    """Greedy completion of a chat prompt; returns the decoded new tokens (special tokens stripped)."""
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def cell(text: str, width: int = 160) -> str:
    """One markdown table cell: single line, pipes escaped, cut at ``width`` characters."""
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def before_after(adapter: Path, prompts: list[list[dict[str, str]]], max_new_tokens: int = 48) -> list[dict]:
    """``[{"prompt", "base", "trained"}]`` for each prompt (the last user turn as ``prompt``)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    base_path = cfg.get("base_model_name_or_path")
    if not base_path:
        raise ValueError(f"{adapter}/adapter_config.json: field 'base_model_name_or_path' is empty")
    tok = AutoTokenizer.from_pretrained(adapter if (adapter / "tokenizer_config.json").is_file() else base_path)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter).eval()
    rows = []
    for messages in prompts:
        with model.disable_adapter():
            before = greedy(model, tok, messages, max_new_tokens)
        after = greedy(model, tok, messages, max_new_tokens)
        rows.append({"prompt": messages[-1]["content"], "base": before, "trained": after})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapter", type=Path, help="LoRA output_dir of `axolotl train`")
    p.add_argument("--heldout", type=Path, default=REPO / ".data" / "hh-harmless" / "heldout.jsonl")
    p.add_argument("-n", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=1, help="torch threads (token-by-token decoding of a 135M model "
                   "gains little from more, and loses a lot to spinning threads on a busy machine)")  # fmt: skip
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not (args.adapter / "adapter_config.json").is_file():
        raise SystemExit(f"{args.adapter}: no adapter_config.json (not a LoRA output_dir of `axolotl train`)")
    rows = before_after(args.adapter, pick_prompts(args.heldout, args.n), args.max_new_tokens)
    print(f"Greedy answers, {args.max_new_tokens} new tokens at most, held-out HH harmless prompts:\n")
    print("| prompt | base SmolLM2-135M-Instruct | after ε-DPO (LoRA) |")
    print("| --- | --- | --- |")
    for r in rows:
        print(f"| {cell(r['prompt'], 80)} | {cell(r['base'])} | {cell(r['trained'])} |")


if __name__ == "__main__":
    main()
