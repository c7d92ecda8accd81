#!/usr/bin/env python
"""Build a tiny, fully offline default setup for smoke tests and examples.

Creates, deterministically from a seed and without any network access::

    <out>/tokenizer/        word-level byte-level fast tokenizer with ChatML special tokens and chat template
    <out>/model/            tiny random ``LlamaForCausalLM`` (safetensors) plus the same tokenizer files
    <out>/data/train.jsonl  ``n_train`` preference rows ``{"prompt", "chosen", "rejected"}``
    <out>/data/eval.jsonl   32 preference rows drawn from a separate RNG stream
    <out>/manifest.json     the parameters the files were built with

A rebuild also deletes ``<out>/prepared/`` (the Axolotl dataset cache the example YAMLs point at).

The preference is learnable by a tiny model in ~20 steps: the chosen answer always counts up by one
(``count up from seven :`` -> ``eight nine ten``), the rejected answer breaks the rule (reversed, shuffled,
out of order, repeated, or counting down: ``six five four``).

Usage::

    python examples/make_tiny_default.py                 # writes .tiny/ in the repository root
    python examples/make_tiny_default.py --out /tmp/tiny --seed 1 --n-train 512 --force

or from Python::

    from examples.make_tiny_default import build_tiny_default  # or load the file via importlib
    paths = build_tiny_default(".tiny")
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["DEFAULT_OUT", "N_EVAL", "build_tiny_default", "make_rows", "build_tokenizer", "build_model", "main"]

DEFAULT_OUT = Path(__file__).resolve().parent.parent / ".tiny"
N_EVAL = 32
FORMAT_VERSION = 2

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, IM_START, IM_END]

# Standard ChatML template (same shape as Axolotl's/Qwen's "chatml").
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

NUMBERS = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
]  # fmt: skip
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]  # in the vocabulary only, for ad-hoc prompts
PROMPT_TEMPLATE = "count up from {x} :"
ANSWER_LEN = 3
REJECT_KINDS = ("reverse", "shuffle", "skip", "repeat", "wrong_way")
PROMPT_WORDS = ["count", "up", "down", "from", "after", "before", "letters", "numbers", ":", ",", "."]
ROLE_WORDS = ["system", "user", "assistant"]

# GPT-2 byte-level alphabet: a space is rendered as "Ġ" and a newline as "Ċ".
_SPACE, _NEWLINE = "\u0120", "\u010a"


# --------------------------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------------------------
def _one_row(rng: random.Random) -> dict[str, str]:
    """Draw one preference row: the chosen answer counts up by one, the rejected answer breaks that rule.

    The rule lives in the answer's bigrams (``x -> x + 1``), which a tiny model picks up within ~20 DPO steps.
    """
    kind = rng.choice(REJECT_KINDS)
    lo = ANSWER_LEN if kind == "wrong_way" else 0  # wrong_way needs ANSWER_LEN numbers below the start
    i = rng.randint(lo, len(NUMBERS) - 1 - ANSWER_LEN)
    chosen = NUMBERS[i + 1 : i + 1 + ANSWER_LEN]
    if kind == "reverse":
        rejected = chosen[::-1]
    elif kind == "shuffle":
        rejected = chosen[:]
        while rejected in (chosen, chosen[::-1]):
            rng.shuffle(rejected)
    elif kind == "skip":
        rejected = [chosen[0], chosen[2], chosen[1]] if rng.random() < 0.5 else [chosen[1], chosen[2], chosen[0]]
    elif kind == "repeat":
        rejected = [chosen[0]] * ANSWER_LEN
    else:  # wrong_way
        rejected = NUMBERS[i - ANSWER_LEN : i][::-1]
    assert rejected != chosen
    return {"prompt": PROMPT_TEMPLATE.format(x=NUMBERS[i]), "chosen": " ".join(chosen), "rejected": " ".join(rejected)}


def make_rows(n: int, seed: int) -> list[dict[str, str]]:
    """Generate ``n`` preference rows ``{"prompt", "chosen", "rejected"}`` from a seeded RNG."""
    rng = random.Random(seed)
    return [_one_row(rng) for _ in range(n)]


def _write_jsonl(path: Path, rows: Sequence[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------------------------------
def vocabulary() -> list[str]:
    """Fixed, ordered vocabulary: special tokens, whitespace pieces, then each word with and without a leading space."""
    words = list(dict.fromkeys(ROLE_WORDS + PROMPT_WORDS + NUMBERS + LETTERS))
    vocab = SPECIAL_TOKENS + [_NEWLINE, _NEWLINE * 2, _SPACE]
    for word in words:
        vocab += [word, _SPACE + word]
    return vocab


def build_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    """Build the tiny fast tokenizer (WordLevel over a fixed vocabulary, GPT-2 byte-level pre-tokenization).

    Byte-level pre-tokenization keeps spaces and newlines inside the tokens ("Ġeight", "Ċ"), so ``decode(encode(s))``
    reproduces ChatML-formatted dataset text exactly. A BOS token is prepended like Llama tokenizers do.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: idx for idx, tok in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok.add_special_tokens(SPECIAL_TOKENS)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=256,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    fast.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    fast.chat_template = CHATML_TEMPLATE
    return fast


# --------------------------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------------------------
def build_model(tokenizer, seed: int):  # -> transformers.LlamaForCausalLM
    """Build a tiny randomly initialised ``LlamaForCausalLM`` whose vocab is ``len(tokenizer)`` rounded up to 8."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab_size = -(-len(tokenizer) // 8) * 8
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    if model.generation_config is not None:
        model.generation_config.bos_token_id = tokenizer.bos_token_id
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)]
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


# --------------------------------------------------------------------------------------------------------------------
# orchestration
# --------------------------------------------------------------------------------------------------------------------
def _paths(out: Path) -> dict[str, Path]:
    return {
        "root": out,
        "tokenizer": out / "tokenizer",
        "model": out / "model",
        "data": out / "data",
        "train": out / "data" / "train.jsonl",
        "eval": out / "data" / "eval.jsonl",
        "manifest": out / "manifest.json",
        "prepared": out / "prepared",
    }


def _required_files(paths: dict[str, Path]) -> list[Path]:
    return [
        paths["tokenizer"] / "tokenizer.json",
        paths["tokenizer"] / "tokenizer_config.json",
        paths["model"] / "config.json",
        paths["model"] / "model.safetensors",
        paths["model"] / "tokenizer.json",
        paths["train"],
        paths["eval"],
        paths["manifest"],
    ]


def _manifest(seed: int, n_train: int) -> dict[str, int]:
    return {"format_version": FORMAT_VERSION, "seed": seed, "n_train": n_train, "n_eval": N_EVAL}


def _is_complete(paths: dict[str, Path], manifest: dict[str, int]) -> bool:
    if not all(p.is_file() for p in _required_files(paths)):
        return False
    try:
        return json.loads(paths["manifest"].read_text(encoding="utf-8")) == manifest
    except (OSError, ValueError):
        return False


def _check_roundtrip(tokenizer, rows: Sequence[dict[str, str]]) -> None:
    """Fail loudly if ChatML-formatted rows do not survive encode/decode or hit ``<unk>``."""
    for row in rows[:8]:
        text = (
            f"{IM_START}user\n{row['prompt']}{IM_END}\n{IM_START}assistant\n{row['chosen']}{IM_END}\n"
            f"{IM_START}assistant\n{row['rejected']}{IM_END}"
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if tokenizer.unk_token_id in ids:
            raise RuntimeError(f"tokenizer produced <unk> for {text!r}")
        decoded = tokenizer.decode(ids, skip_special_tokens=False)
        if decoded != text:
            raise RuntimeError(f"tokenizer round trip failed: {text!r} -> {decoded!r}")


def build_tiny_default(
    out_dir: str | Path = DEFAULT_OUT, *, seed: int = 0, n_train: int = 256, force: bool = False
) -> dict[str, Path]:
    """Create (or reuse) the tiny tokenizer, model and preference data under ``out_dir``.

    Args:
        out_dir: Target directory (created if missing).
        seed: Seed for the model weights and the data RNG (eval rows use ``seed + 1``).
        n_train: Number of training rows.
        force: Rebuild even if everything is already present.

    Returns:
        Mapping with the keys ``root``, ``tokenizer``, ``model``, ``data``, ``train``, ``eval``, ``manifest`` and
        ``prepared`` (Axolotl's dataset cache dir, deleted on every rebuild). ``model`` also holds the tokenizer
        files, so it can be used directly as Axolotl's ``base_model``.
    """
    if n_train < 1:
        raise ValueError("n_train must be >= 1")
    out = Path(out_dir).expanduser().resolve()
    paths = _paths(out)
    manifest = _manifest(seed, n_train)
    if not force and _is_complete(paths, manifest):
        print(f"tiny default already present in {out} (use --force to rebuild)")
        return paths

    train_rows = make_rows(n_train, seed)
    eval_rows = make_rows(N_EVAL, seed + 1)
    tokenizer = build_tokenizer()
    _check_roundtrip(tokenizer, train_rows + eval_rows)
    model = build_model(tokenizer, seed)

    # ``prepared/`` is where the example YAMLs let Axolotl cache the tokenized data set. Axolotl keys that cache on
    # the config, not on the file contents, so a rebuilt data set must not meet a stale cache.
    for key in ("tokenizer", "model", "data", "prepared"):
        if paths[key].exists():
            shutil.rmtree(paths[key])
    paths["manifest"].unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer.save_pretrained(paths["tokenizer"])
    model.save_pretrained(paths["model"], safe_serialization=True)
    tokenizer.save_pretrained(paths["model"])
    _write_jsonl(paths["train"], train_rows)
    _write_jsonl(paths["eval"], eval_rows)
    paths["manifest"].write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")  # written last: "done" marker

    for key in ("tokenizer", "model", "train", "eval"):
        print(f"wrote {key:<9} {paths[key]}")
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: <repo>/.tiny)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and data (default: 0)")
    parser.add_argument("--n-train", type=int, default=256, help="number of training rows (default: 256)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the files already exist")
    args = parser.parse_args(argv)
    build_tiny_default(args.out, seed=args.seed, n_train=args.n_train, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
