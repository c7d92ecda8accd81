"""Padded against padding-free ε-DPO on SmolLM2-135M-Instruct + HH harmless (the main job's model and data), one
process each: backbone tokens per optimizer step, step time, peak RSS and the β trajectories of the two runs.

    python scripts/prepare_hh.py && python scripts/bench_padding_free.py --json docs/bench_padding_free.json

Both runs train the same pairs in the same order: by default drawn at random (seed 0) from all pairs whose prompt +
chosen and prompt + rejected fit in ``--seq-len`` tokens (Axolotl drops the others), or the first that fit
(``--order file``); LoRA r 16 on all linear layers as the main job, fp32, SDPA. The padded run goes first, then the
padding-free run, each in its own process (peak RSS is that process's); step times are the optimizer steps after the
first of each run. Backbone tokens: the positions one backbone forward ran on (the logged
``backbone_tokens``), summed over a step's micro-batches; real tokens: the attention mask's ones. Padding-free, the
model's SDPA runs once per packed sequence (``edpo_plugin.trainer.packed_attention``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _pairs(tokenizer, data: Path, seq_len: int, n: int, order: str) -> list[dict]:
    """``n`` HH pairs (conversational: the prompt's messages, each completion one assistant turn) whose prompt + chosen
    and prompt + rejected both fit in ``seq_len`` tokens with the model's own chat template: the first ``n`` in file
    order (``order="file"``), or ``n`` drawn at random (seed 0) from all that fit (``order="random"``); all of them
    for ``n = -1``."""
    lines = data.read_text().splitlines()
    if order == "random":
        random.Random(0).shuffle(lines)
    rows = []
    for line in lines:
        row = json.loads(line)
        pair = {
            "prompt": row["messages"],
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}],
        }
        if all(
            len(tokenizer.apply_chat_template(pair["prompt"] + pair[k], tokenize=True)["input_ids"]) <= seq_len
            for k in ("chosen", "rejected")
        ):
            rows.append(pair)
        if len(rows) == n:
            break
    return rows


def run(args: argparse.Namespace, padding_free: bool, dataset) -> dict:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from edpo_plugin.trainer import EpsilonDPOConfig, EpsilonDPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    config = EpsilonDPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.pairs, gradient_accumulation_steps=args.accum,
        max_steps=args.steps, learning_rate=2e-4, lr_scheduler_type="constant", logging_steps=1, report_to="none",
        save_strategy="no", use_cpu=True, bf16=False, max_length=args.seq_len, beta=0.1, epsilon=0.01, seed=0,
        disable_tqdm=True, dataloader_num_workers=0, padding_free=padding_free,
    )  # fmt: skip
    step_times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            step_times.append(time.perf_counter() - self.t0)

    trainer = EpsilonDPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                                peft_config=lora, callbacks=[Clock()])  # fmt: skip
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    real = [h["num_tokens"] for h in logs]
    return {
        "padding_free": padding_free,
        "backbone_tokens_per_step": [h["backbone_tokens"] * args.accum for h in logs],
        "real_tokens_per_step": [b - a for a, b in zip([0.0, *real[:-1]], real, strict=True)],
        "step_s": step_times,
        "beta": [h["kl/beta"] for h in logs] + [trainer.beta_controller.beta],
        "loss": [h["loss"] for h in logs],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def data_ratios(tokenizer, data: Path, seq_len: int) -> dict[str, float]:
    """Real over padded tokens of the whole dataset (every pair that fits), in random micro-batches (seed 0) of 2, 4
    and 8 pairs, each padded as TRL's collator pads (its 2B sequences to the longest): a property of the data, and
    the floor of padding-free's backbone tokens over padded."""
    lengths = [
        len(tokenizer.apply_chat_template(pair["prompt"] + pair[k], tokenize=True)["input_ids"])
        for pair in _pairs(tokenizer, data, seq_len, n=-1, order="random")
        for k in ("chosen", "rejected")
    ]
    ratios = {"pairs_that_fit": len(lengths) // 2}
    for b in (2, 4, 8):
        batches = [lengths[i : i + 2 * b] for i in range(0, len(lengths) - 2 * b + 1, 2 * b)]
        ratios[f"real_over_padded_{b}_pairs"] = sum(map(sum, batches)) / sum(len(x) * max(x) for x in batches)
    return ratios


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / ".models" / "smollm2-135m-instruct"))
    p.add_argument("--data", default=str(REPO / ".data" / "hh-harmless" / "train.jsonl"))
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--pairs", type=int, default=4, help="pairs per micro-batch")
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--order", choices=("random", "file"), default="random", help="which pairs (see _pairs)")
    p.add_argument("--json", default="bench_padding_free.json")
    p.add_argument("--data-only", action="store_true", help="only the whole dataset's real / padded tokens")
    p.add_argument("--one-run", choices=("padded", "padding-free"), help=argparse.SUPPRESS)  # a child process
    args = p.parse_args()

    if args.data_only:
        from transformers import AutoTokenizer

        ratios = data_ratios(AutoTokenizer.from_pretrained(args.model), Path(args.data), args.seq_len)
        for key, value in ratios.items():
            print(f"{key}: {value:.4g}")
        meta = {"date": date.today().isoformat(), "command": " ".join(["python", *sys.argv]), "seq_len": args.seq_len}
        Path(args.json).write_text(json.dumps({"meta": meta, "data": ratios}, indent=2) + "\n")
        return

    if args.one_run:
        from datasets import Dataset
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        pairs = _pairs(tokenizer, Path(args.data), args.seq_len, args.steps * args.pairs * args.accum, args.order)
        result = run(args, args.one_run == "padding-free", Dataset.from_list(pairs))
        Path(args.json).write_text(json.dumps(result))
        return
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("padded", "padding-free"):
            out = Path(tmp) / f"{mode}.json"
            skip = ("json", "one_run", "data_only")
            child = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in skip]
            subprocess.run([sys.executable, __file__, *child, "--one-run", mode, "--json", str(out)], check=True)
            runs.append(json.loads(out.read_text()))
    padded, packed = runs
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    summary = {
        "real_over_padded_tokens": sum(padded["real_tokens_per_step"]) / sum(padded["backbone_tokens_per_step"]),
        "backbone_tokens_padded_over_packed": sum(padded["backbone_tokens_per_step"])
        / sum(packed["backbone_tokens_per_step"]),
        "step_s_padded": mean(padded["step_s"][1:]),
        "step_s_packed": mean(packed["step_s"][1:]),
        "step_time_packed_over_padded": mean(packed["step_s"][1:]) / mean(padded["step_s"][1:]),
        "beta_max_rel_diff": max(abs(a - b) / b for a, b in zip(packed["beta"], padded["beta"], strict=True)),
        "loss_max_rel_diff": max(abs(a - b) / abs(b) for a, b in zip(packed["loss"], padded["loss"], strict=True)),
        "peak_rss_mib_padded": padded["peak_rss_mib"],
        "peak_rss_mib_packed": packed["peak_rss_mib"],
    }
    for key, value in summary.items():
        print(f"{key}: {value:.6g}")
    meta = {"date": date.today().isoformat(), "machine": platform.platform(), "cpus": os.cpu_count(),
            "command": " ".join(["python", *sys.argv]), "seq_len": args.seq_len, "pairs": args.pairs,
            "accum": args.accum, "steps": args.steps, "order": args.order,
            "load_avg_at_end": os.getloadavg()}  # fmt: skip
    Path(args.json).write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
