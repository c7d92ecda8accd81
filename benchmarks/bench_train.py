"""Training benchmark: peak memory and tokens/s of ε-DPO (fused / naive head) against TRL's DPO (with and without
Liger), on a randomly initialised model with the exact Llama-3-8B shape (no download), one pair per micro-batch,
gradient checkpointing, PyTorch SDPA attention, LoRA and QLoRA (when bitsandbytes imports; its 4-bit layers also run
on CPU).

    python benchmarks/bench_train.py --model llama3-8b --seq-len 2048 --steps 6             # on a GPU
    python benchmarks/bench_train.py --model tiny --seq-len 256 --steps 3 --device cpu      # smoke run on CPU

Each variant runs in a fresh subprocess. Peak memory: ``torch.cuda.max_memory_allocated`` (CUDA) or the growth of
peak RSS over the RSS after the model is built (CPU). Tokens/s: non-padding tokens (chosen + rejected sequences)
per second over the optimizer steps after the first. Prints a table (peak = whole process, extra = peak over the
memory held once the model is built) and writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("edpo-fused", "edpo-naive", "dpo", "dpo-liger")
SHAPES = {
    # Meta-Llama-3-8B's config.json
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128256, max_position_embeddings=4096, tie_word_embeddings=False),
}  # fmt: skip


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _dataset(tokenizer, seq_len: int, n_rows: int):
    """Rows whose prompt and completions each fill about a third of ``seq_len`` tokens."""
    from datasets import Dataset

    words = [w for w in tokenizer.get_vocab() if w.startswith("Ġ") and w[1:].isalpha()][:50]
    third = max(1, seq_len // 3 - 2)

    def text(offset: int) -> str:
        return "".join(words[(offset + i) % len(words)] for i in range(third)).replace("Ġ", " ")

    rows = [{"prompt": text(i), "chosen": text(i + 1), "rejected": text(i + 2)} for i in range(n_rows)]
    return Dataset.from_list(rows)


def run_variant(args: argparse.Namespace) -> dict:
    import torch
    from peft import LoraConfig
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, TrainerCallback

    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[args.model], attn_implementation="sdpa")
    quantized = args.adapter == "qlora"
    if quantized:
        from transformers import BitsAndBytesConfig

        with tempfile.TemporaryDirectory() as tmp:  # random weights go through disk to be quantised on load
            with torch.device(args.device):
                LlamaForCausalLM(config).to(dtype).save_pretrained(tmp)
            if cuda:
                torch.cuda.empty_cache()
            bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                     bnb_4bit_use_double_quant=True)  # fmt: skip
            placement = {"": 0 if cuda else "cpu"}
            model = LlamaForCausalLM.from_pretrained(tmp, quantization_config=bnb, dtype=dtype, device_map=placement)
    else:
        with torch.device(args.device):
            model = LlamaForCausalLM(config).to(dtype)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")

    common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=1, gradient_accumulation_steps=1,
                  max_steps=args.steps, learning_rate=1e-5, logging_steps=1, report_to="none", save_strategy="no",
                  gradient_checkpointing=True, bf16=cuda, use_cpu=not cuda, max_length=args.seq_len, beta=0.01,
                  disable_tqdm=True, dataloader_num_workers=0, seed=0)  # fmt: skip
    if args.variant.startswith("edpo"):
        from edpo_plugin.trainer import EpsilonDPOConfig, EpsilonDPOTrainer

        head = "auto" if args.variant == "edpo-fused" else "naive"
        trainer_cls, targs = EpsilonDPOTrainer, EpsilonDPOConfig(**common, epsilon=0.01, edpo_head=head)
    else:
        from trl import DPOConfig, DPOTrainer

        trainer_cls, targs = DPOTrainer, DPOConfig(**common, use_liger_kernel=args.variant == "dpo-liger")

    step_times: list[float] = []
    tokens: list[int] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - self.t0)
            tokens.append(trainer._total_train_tokens)

    trainer = trainer_cls(model=model, args=targs, train_dataset=_dataset(tokenizer, args.seq_len, args.steps + 2),
                          processing_class=tokenizer, peft_config=lora, callbacks=[Clock()])  # fmt: skip
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else _rss()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    timed = step_times[1:] or step_times
    timed_tokens = tokens[-1] - tokens[0] if len(tokens) > 1 else tokens[-1]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "variant": args.variant,
        "adapter": args.adapter,
        "peak_bytes": int(peak),
        "peak_over_model_bytes": int(peak - base),
        "tokens_per_s": timed_tokens / sum(timed),
        "step_s": sum(timed) / len(timed),
        "losses": losses,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3-8b", choices=list(SHAPES))
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--adapters", default="lora,qlora", help="qlora is skipped when bitsandbytes does not import")
    p.add_argument("--tokenizer", default=".tiny/model", help="any local tokenizer (examples/make_tiny_default.py)")
    p.add_argument("--json", default=None, help="default: results/bench_train_<device>.json beside this file")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--adapter", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.json = args.json or str(RESULTS / f"bench_train_{'gpu' if args.device == 'cuda' else 'cpu'}.json")
    if args.child:
        print(json.dumps(run_variant(args)))
        return

    adapters = args.adapters.split(",")
    if "qlora" in adapters:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            print("bitsandbytes does not import: skipping QLoRA", file=sys.stderr)
            adapters.remove("qlora")
    rows = []
    for adapter in adapters:
        for variant in args.variants.split(","):
            cmd = [sys.executable, __file__, "--child", "--variant", variant, "--adapter", adapter,
                   "--model", args.model, "--seq-len", str(args.seq_len), "--steps", str(args.steps),
                   "--device", args.device, "--tokenizer", args.tokenizer]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                err = done.stderr.strip().splitlines()[-1:] or ["?"]
                print(f"{adapter}/{variant} failed: {err[0]}", file=sys.stderr)
                rows.append({"variant": variant, "adapter": adapter, "error": done.stderr[-4000:]})
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))

    print(f"model={args.model} seq_len={args.seq_len} steps={args.steps} device={args.device}")
    print(f"{'adapter':<8}{'variant':<12}{'peak GiB':>10}{'extra GiB':>11}{'tokens/s':>11}{'step s':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['adapter']:<8}{r['variant']:<12}{'failed':>10}")
            continue
        print(f"{r['adapter']:<8}{r['variant']:<12}{r['peak_bytes'] / 2**30:>10.2f}"
              f"{r['peak_over_model_bytes'] / 2**30:>11.3f}{r['tokens_per_s']:>11.1f}{r['step_s']:>9.3f}")  # fmt: skip
    meta = {"date": date.today().isoformat(), "machine": platform.platform(), "device": args.device,
            "command": " ".join(["python", *sys.argv]), "model": args.model, "seq_len": args.seq_len}  # fmt: skip
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
