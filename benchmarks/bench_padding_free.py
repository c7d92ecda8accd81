"""Padded against padding-free ε-DPO on SmolLM2-135M-Instruct + HH harmless (the main job's model and data), one
process each: backbone tokens per optimizer step, step time, peak RSS and the β trajectories of the runs.

    python examples/prepare_hh.py && python benchmarks/bench_padding_free.py   # writes results/bench_padding_free.json

Three runs by default (``--modes``): ``padded`` (TRL's padded batch), ``packed`` (``padding_free=True``,
``edpo_share_prompt=False``: each sequence packed whole) and ``shared`` (``padding_free=True`` with each pair's
prompt run once for both completions, the default for an sdpa model). All train the same pairs in the same order:
by default drawn at random (seed 0) from all pairs whose prompt + chosen and prompt + rejected fit in ``--seq-len``
tokens (Axolotl drops the others), or the first that fit (``--order file``); LoRA r 16 on all linear layers as the
main job, fp32, SDPA. Each run is its own process (peak RSS is that process's), one after the other; step times are
the optimizer steps after the first of each run. Backbone tokens: the positions one backbone forward ran on (the
logged ``backbone_tokens``), summed over a step's micro-batches; real tokens: the attention mask's ones.
Padding-free, the model's SDPA runs once per packed sequence (``edpo_plugin.trainer.packed_attention``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import resource
import statistics
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


MODES = {
    "padded": {"padding_free": False},
    "packed": {"padding_free": True, "edpo_share_prompt": False},
    "shared": {"padding_free": True, "edpo_share_prompt": True},
}


def run(args: argparse.Namespace, mode: str, dataset) -> dict:
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
        disable_tqdm=True, dataloader_num_workers=0, **MODES[mode],
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
        "mode": mode,
        "backbone_tokens_per_step": [h["backbone_tokens"] * args.accum for h in logs],
        "real_tokens_per_step": [b - a for a, b in zip([0.0, *real[:-1]], real, strict=True)],
        "step_s": step_times,
        "beta": [h["kl/beta"] for h in logs] + [trainer.beta_controller.beta],
        "loss": [h["loss"] for h in logs],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def data_ratios(tokenizer, data: Path, seq_len: int) -> dict:
    """Real over padded tokens of the whole dataset (every pair that fits), in random micro-batches (seed 0) of 2, 4
    and 8 pairs, each padded as TRL's collator pads (its 2B sequences to the longest): a property of the data, and
    the floor of padding-free's backbone tokens over padded; and the same with each pair's common prefix (its prompt,
    at least) counted once, the floor with shared prompts."""
    sequences = [
        [
            tokenizer.apply_chat_template(pair["prompt"] + pair[k], tokenize=True)["input_ids"]
            for k in ("chosen", "rejected")
        ]
        for pair in _pairs(tokenizer, data, seq_len, n=-1, order="random")
    ]
    lengths = [len(s) for pair in sequences for s in pair]
    prefixes = []
    for chosen, rejected in sequences:
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        prefixes.append(n)
    ratios = {
        "pairs_that_fit": len(sequences),
        "median_shared_prefix_tokens": statistics.median(prefixes),
        "median_chosen_tokens_after_it": statistics.median(len(c) - n for (c, _), n in zip(sequences, prefixes)),
        "median_rejected_tokens_after_it": statistics.median(len(r) - n for (_, r), n in zip(sequences, prefixes)),
    }
    # every pair's (common prefix, chosen, rejected) token counts, in the order the micro-batches take them
    ratios["pair_lengths"] = [[n, len(c), len(r)] for (c, r), n in zip(sequences, prefixes, strict=True)]
    for b in (2, 4, 8):
        starts = range(0, len(sequences) - b + 1, b)
        padded = sum(2 * b * max(lengths[2 * i : 2 * i + 2 * b]) for i in starts)
        ratios[f"real_over_padded_{b}_pairs"] = sum(sum(lengths[2 * i : 2 * i + 2 * b]) for i in starts) / padded
        shared = sum(sum(lengths[2 * i : 2 * i + 2 * b]) - sum(prefixes[i : i + b]) for i in starts)
        ratios[f"shared_prompt_over_padded_{b}_pairs"] = shared / padded
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
    p.add_argument("--json", default=None, help="default: results/bench_padding_free.json (--data-only: "
                   "results/padding_ratio_hh_<seq-len>.json) beside this file")  # fmt: skip
    p.add_argument("--data-only", action="store_true", help="only the whole dataset's real / padded tokens")
    p.add_argument("--modes", default="padded,packed,shared", help="runs, the first the baseline (see MODES)")
    p.add_argument("--one-run", choices=tuple(MODES), help=argparse.SUPPRESS)  # a child process
    args = p.parse_args()
    name = f"padding_ratio_hh_{args.seq_len}.json" if args.data_only else "bench_padding_free.json"
    args.json = args.json or str(REPO / "benchmarks" / "results" / name)

    if args.data_only:
        from transformers import AutoTokenizer

        ratios = data_ratios(AutoTokenizer.from_pretrained(args.model), Path(args.data), args.seq_len)
        for key, value in ratios.items():
            if not isinstance(value, list):
                print(f"{key}: {value:.4g}")
        meta = {"date": date.today().isoformat(), "command": " ".join(["python", *sys.argv]), "seq_len": args.seq_len}
        text = json.dumps({"meta": meta, "data": ratios}, indent=2)
        text = re.sub(r"\[\s+(\d+),\s+(\d+),\s+(\d+)\s+\]", r"[\1, \2, \3]", text)  # one line per pair
        Path(args.json).write_text(text + "\n")
        return

    if args.one_run:
        from datasets import Dataset
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        pairs = _pairs(tokenizer, Path(args.data), args.seq_len, args.steps * args.pairs * args.accum, args.order)
        result = run(args, args.one_run, Dataset.from_list(pairs))
        Path(args.json).write_text(json.dumps(result))
        return
    modes = args.modes.split(",")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            out = Path(tmp) / f"{mode}.json"
            skip = ("json", "one_run", "data_only", "modes")
            child = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in skip]
            subprocess.run([sys.executable, __file__, *child, "--one-run", mode, "--json", str(out)], check=True)
            runs.append(json.loads(out.read_text()))
    base = runs[0]
    mean = lambda xs: sum(xs[1:]) / len(xs[1:])  # noqa: E731  (the first step also runs the first-step check)
    summary = {
        "real_over_padded_tokens": sum(base["real_tokens_per_step"]) / sum(base["backbone_tokens_per_step"]),
        f"step_s_{modes[0]}": mean(base["step_s"]),
        f"peak_rss_mib_{modes[0]}": base["peak_rss_mib"],
    }
    for other in runs[1:]:
        name = f"{other['mode']}_over_{modes[0]}"
        summary |= {
            f"step_s_{other['mode']}": mean(other["step_s"]),
            f"backbone_tokens_{name}": sum(other["backbone_tokens_per_step"]) / sum(base["backbone_tokens_per_step"]),
            f"step_time_{name}": mean(other["step_s"]) / mean(base["step_s"]),
            f"peak_rss_{name}": other["peak_rss_mib"] / base["peak_rss_mib"],
            f"beta_max_rel_diff_{name}": max(abs(a - b) / b for a, b in zip(other["beta"], base["beta"], strict=True)),
            f"loss_max_rel_diff_{name}": max(
                abs(a - b) / abs(b) for a, b in zip(other["loss"], base["loss"], strict=True)
            ),
        }
    print(f"{'':<26}" + "".join(f"{r['mode']:>10}" for r in runs))
    rows = {"backbone tokens / step": lambda r: f"{sum(r['backbone_tokens_per_step']) / len(r['step_s']):>10.0f}",
            "step time (s)": lambda r: f"{mean(r['step_s']):>10.2f}",
            "peak RSS (MiB)": lambda r: f"{r['peak_rss_mib']:>10.0f}"}  # fmt: skip
    for label, cell in rows.items():
        print(f"{label:<26}" + "".join(cell(r) for r in runs))
    for key, value in summary.items():
        print(f"{key}: {value:.6g}")
    meta = {"date": date.today().isoformat(), "machine": platform.platform(), "cpus": os.cpu_count(),
            "command": " ".join(["python", *sys.argv]), "seq_len": args.seq_len, "pairs": args.pairs, "modes": modes,
            "accum": args.accum, "steps": args.steps, "order": args.order,
            "load_avg_at_end": os.getloadavg()}  # fmt: skip
    Path(args.json).write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
