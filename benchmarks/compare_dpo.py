"""Stock DPO vs ε-DPO from the same Axolotl YAML, evaluated on held-out Anthropic HH (harmless) pairs.

python benchmarks/compare_dpo.py                   # CPU default (SmolLM2-135M-Instruct, full fine-tuning, short run)
python benchmarks/compare_dpo.py --paper-hh        # prints the paper's HH protocol (a GPU sweep over β) and exits
python benchmarks/compare_dpo.py --paper-hh --run  # runs that sweep (GPU; not run by this project yet)

Both runs come from ``yaml_examples/smollm2-135m-edpo-lora.yaml`` with the LoRA keys removed (full fine-tuning: Axolotl
does not seed LoRA initialisation on its DPO path, full fine-tuning starts both runs from the same weights). The stock
run drops the plugin and the ``edpo_*`` keys and sets ``rl: dpo``; everything else — seed, data and its order,
β0 (``rl_beta``), optimiser, steps — is shared. Evaluation, independent of either trainer, on the held-out split of
``examples/prepare_hh.py`` (pairs longer than ``sequence_len`` are skipped, as in training):

- preference accuracy: fraction of pairs whose implicit reward prefers the chosen completion,
  ``[log π(y_w|x) − log π_ref(y_w|x)] − [log π(y_l|x) − log π_ref(y_l|x)] > 0`` (the sign does not depend on β);
- mean margin: the mean of that log-ratio difference ``m`` in nats, and ``β_final · m`` (each run's own final β:
  β0 for DPO, the moved β for ε-DPO);
- sequence-level KL(π ‖ π_ref) on held-out prompts, a Monte-Carlo estimate: sample completions from the policy
  (temperature 1, no top-k/top-p, at most ``--kl-tokens`` tokens, stopping at ``<|im_end|>``), and average
  ``log π(y|x) − log π_ref(y|x)`` summed over the sampled tokens. It estimates the KL of the length-truncated
  completion distribution; with few samples it is noisy (its standard error is printed).

Writes ``benchmarks/results/compare.json`` and the picture ``docs/compare.md`` shows, ``docs/compare.png`` (training
curves and the KL-vs-accuracy points), and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
import prepare_hh  # noqa: E402

BASE_YAML = REPO / "yaml_examples" / "smollm2-135m-edpo-lora.yaml"
LORA_KEYS = ("adapter", "lora_r", "lora_alpha", "lora_dropout", "lora_target_linear", "lora_target_modules")
EDPO_KEYS = ("plugins", "edpo_epsilon", "edpo_head", "edpo_head_token_chunk", "edpo_head_vocab_chunk")

PAPER_HH = """The paper's Anthropic-HH protocol (Lee et al. 2025), for a GPU; not run by this project.
  model        gemma-2-2b after SFT (pass it with --base-model; SmolLM2-135M-Instruct is only the CPU stand-in)
  data         Anthropic HH: point --config at a YAML whose dataset is the HH train split (this repository embeds
               only the harmless-base test split); held-out pairs as in the CPU default
  β            {0.01, 0.05, 0.1, 0.5}, one DPO and one ε-DPO run each, ε = 0.01
  optimiser    lr 1e-6, 1 epoch, full fine-tuning, the same seed and data order for both methods
  evaluation   for every run, KL(π‖π_ref) on held-out prompts and held-out preference accuracy: each β gives one point
               per method, and the two methods' points trace a KL-vs-accuracy frontier each.
With --run this script trains that sweep (bf16, sequence_len 1024, micro-batch 8 x accumulation 8) and evaluates
each run as in the CPU default; expect hours on one GPU."""


# ------------------------------------------------------------------------------------------------ configs


def make_config(base: dict, *, rl: str, beta: float, out: Path, overrides: dict) -> dict:
    """One run's Axolotl config: ``base`` without LoRA keys, as stock DPO (``rl='dpo'``) or ε-DPO (``'edpo'``)."""
    if rl not in ("dpo", "edpo"):
        raise ValueError(f"rl must be 'dpo' or 'edpo', got {rl!r}")
    cfg = {k: v for k, v in base.items() if k not in LORA_KEYS and not k.startswith("lora_")}
    if rl == "dpo":
        cfg = {k: v for k, v in cfg.items() if k not in EDPO_KEYS}
    cfg.update(overrides)
    cfg.update(rl=rl, rl_beta=beta, output_dir=str(out))
    if cfg.get("max_steps"):
        cfg.update(save_strategy="steps", save_steps=cfg["max_steps"])
    else:
        cfg.pop("max_steps", None)
        cfg.pop("save_steps", None)
        cfg["save_strategy"] = "epoch"
    return cfg


def axolotl_train(cfg: dict, workdir: Path) -> float:
    """Run ``axolotl train`` on ``cfg`` (written to ``workdir/config.yaml``); returns wall seconds."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", HF_HUB_OFFLINE="1", AXOLOTL_DO_NOT_TRACK="1",
               WANDB_MODE="disabled")  # fmt: skip
    t0 = time.time()
    with open(workdir / "train.log", "w") as log:
        done = subprocess.run([os.path.join(bin_dir, "axolotl"), "train", str(path)], cwd=REPO, env=env,
                              stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"axolotl train failed (rc {done.returncode}); see {workdir / 'train.log'}")
    return time.time() - t0


def train_logs(out: Path) -> list[dict]:
    """Per-step training log entries of the last checkpoint's ``trainer_state.json``."""
    states = sorted(out.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    if not states:
        raise SystemExit(f"{out}: no checkpoint-*/trainer_state.json")
    return [h for h in json.loads(states[-1].read_text())["log_history"] if "loss" in h]


# ------------------------------------------------------------------------------------------------ evaluation


def render(tok, messages: list[dict], completion: str) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) as Axolotl's ``chat_template.default`` builds them: the prompt with the
    generation header, the completion followed by ``<|im_end|>``."""
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tok(completion + tok.eos_token, add_special_tokens=False)["input_ids"]
    return p_ids, c_ids


@torch.no_grad()
def sequence_logps(model, seqs: list[tuple[list[int], list[int]]], batch: int = 8) -> torch.Tensor:
    """Sum of completion-token log-probs for each (prompt ids, completion ids); float64 ``[len(seqs)]``."""
    out = []
    for i in range(0, len(seqs), batch):
        chunk = seqs[i : i + batch]
        width = max(len(p) + len(c) for p, c in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        attn = torch.zeros_like(ids)
        comp = torch.zeros_like(ids, dtype=torch.bool)
        for r, (p, c) in enumerate(chunk):
            ids[r, : len(p) + len(c)] = torch.tensor(p + c)
            attn[r, : len(p) + len(c)] = 1
            comp[r, len(p) : len(p) + len(c)] = True
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].double()
        lp = logits.log_softmax(-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        out.append((lp * comp[:, 1:]).sum(-1))
    return torch.cat(out)


def eval_pairs(tok, rows: list[dict], max_len: int, n: int) -> tuple[list[tuple], list[tuple]]:
    """The first ``n`` held-out pairs whose prompt + longer completion fit in ``max_len`` tokens."""
    chosen, rejected = [], []
    for row in rows:
        c, r = render(tok, row["messages"], row["chosen"]), render(tok, row["messages"], row["rejected"])
        if max(len(c[0]) + len(c[1]), len(r[0]) + len(r[1])) <= max_len:
            chosen.append(c)
            rejected.append(r)
        if len(chosen) == n:
            break
    return chosen, rejected


@torch.no_grad()
def sample_kl(policy, ref, eos: int, prompts: list[list[int]], samples: int, max_new: int, seed: int) -> list[float]:
    """Per-sample ``log π(y|x) − log π_ref(y|x)`` for completions ``y`` sampled from the policy at temperature 1;
    ``prompts`` are token ids (chat template applied, generation header included)."""
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # token-by-token decoding: more threads mostly spin (8x slower on a busy 2-core machine)
    values = []
    for prompt in prompts:
        p_ids = torch.tensor([prompt])
        for _ in range(samples):
            gen = policy.generate(input_ids=p_ids, attention_mask=torch.ones_like(p_ids), do_sample=True,
                                  temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new, eos_token_id=eos,
                                  pad_token_id=eos)  # fmt: skip
            y = gen[0, p_ids.shape[1] :].tolist()
            if eos in y:
                y = y[: y.index(eos) + 1]
            seq = [(p_ids[0].tolist(), y)]
            values.append((sequence_logps(policy, seq) - sequence_logps(ref, seq)).item())
    torch.set_num_threads(threads)
    return values


def evaluate(policy_dir: Path, ref, tok, chosen, rejected, ref_lp, kl_prompts, args) -> dict:
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    lp_c, lp_r = sequence_logps(policy, chosen), sequence_logps(policy, rejected)
    m = (lp_c - ref_lp[0]) - (lp_r - ref_lp[1])
    eos = tok.convert_tokens_to_ids(tok.eos_token)
    kl = sample_kl(policy, ref, eos, kl_prompts, args.kl_samples, args.kl_tokens, args.seed)
    kl_t = torch.tensor(kl, dtype=torch.float64)
    return {"accuracy": (m > 0).double().mean().item(), "margin_nats": m.mean().item(),
            "kl": kl_t.mean().item(), "kl_stderr": (kl_t.std() / math.sqrt(len(kl))).item(), "n_kl": len(kl),
            "n_pairs": len(m)}  # fmt: skip


# ------------------------------------------------------------------------------------------------ report


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for name, r in results["runs"].items():
        steps = [h["step"] for h in r["train"]]
        axes[0].plot(steps, [h["loss"] for h in r["train"]], label=name)
        axes[1].plot(steps, [h.get("kl/beta", r["beta0"]) for h in r["train"]], label=name)
        axes[2].errorbar(r["eval"]["kl"], r["eval"]["accuracy"], xerr=r["eval"]["kl_stderr"], fmt="o", label=name)
    axes[0].set(title="training loss", xlabel="optimizer step")
    axes[1].set(title="β (before each step)", xlabel="optimizer step")
    axes[2].set(title="held-out: accuracy vs KL", xlabel="KL(π‖π_ref), nats / completion", ylabel="accuracy")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=72)


def table(results: dict) -> str:
    lines = ["| method | final β | held-out accuracy | mean margin m (nats) | β·m | KL(π‖π_ref) ± s.e. | train time |",
             "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for name, r in results["runs"].items():
        e = r["eval"]
        lines.append(f"| {name} | {r['beta_final']:.4g} | {e['accuracy']:.3f} ({e['n_pairs']} pairs) | "
                     f"{e['margin_nats']:+.4f} | {r['beta_final'] * e['margin_nats']:+.5f} | "
                     f"{e['kl']:.4f} ± {e['kl_stderr']:.4f} ({e['n_kl']} samples) | "
                     f"{r['train_s']:.0f} s |")  # fmt: skip
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=BASE_YAML, help="ε-DPO YAML both runs derive from")
    p.add_argument("--base-model", default=None, help="override base_model (default: the YAML's)")
    p.add_argument("--beta", type=float, default=None, help="β0 for both runs (default: the YAML's rl_beta)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--eval-pairs", type=int, default=48, help="held-out pairs for accuracy and margin")
    p.add_argument("--kl-prompts", type=int, default=16)
    p.add_argument("--kl-samples", type=int, default=2, help="sampled completions per prompt")
    p.add_argument("--kl-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=REPO / "outputs" / "compare")
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "compare.json")
    p.add_argument("--png", type=Path, default=REPO / "docs" / "compare.png")
    p.add_argument("--paper-hh", action="store_true", help="the paper's HH protocol (GPU): print it, or run with --run")
    p.add_argument("--run", action="store_true", help="with --paper-hh: run the sweep")
    args = p.parse_args()

    if args.paper_hh:
        print(PAPER_HH)
        if not args.run:
            return
        betas, overrides = [0.01, 0.05, 0.1, 0.5], {"learning_rate": 1e-6, "num_epochs": 1, "bf16": True,
                                                     "sequence_len": 1024, "edpo_epsilon": 0.01}  # fmt: skip
        overrides |= {"max_steps": None, "micro_batch_size": 8, "gradient_accumulation_steps": 8}
    else:
        betas, overrides = [args.beta], {"learning_rate": args.lr, "max_steps": args.steps, "lr_scheduler": "constant",
                                         "micro_batch_size": args.micro_batch,
                                         "gradient_accumulation_steps": args.grad_accum}  # fmt: skip

    base = yaml.safe_load(args.config.read_text())
    if args.base_model:
        base["base_model"] = args.base_model
    overrides |= {"seed": args.seed, "dataset_prepared_path": str(args.work / "prepared")}
    held = prepare_hh.prepare(REPO / ".data" / "hh-harmless")
    heldout = [json.loads(line) for line in held["heldout"].read_text().splitlines()]
    results: dict = {"config": str(args.config), "overrides": overrides, "runs": {}}
    trained = []
    for beta in betas:
        beta = base["rl_beta"] if beta is None else beta
        for rl, label in (("dpo", "DPO"), ("edpo", "ε-DPO")):
            name = label if len(betas) == 1 else f"{label} β={beta}"
            out = args.work / f"{rl}-beta{beta}"
            cfg = make_config(base, rl=rl, beta=beta, out=out / "out", overrides=overrides)
            print(f"training {name} → {out} ...", flush=True)
            secs = axolotl_train(cfg, out)
            state = out / "out" / "edpo_state.json"
            beta_final = json.loads(state.read_text())["beta"] if state.is_file() else beta
            results["runs"][name] = {"rl": rl, "beta0": beta, "beta_final": beta_final, "train_s": secs,
                                     "train": train_logs(out / "out")}  # fmt: skip
            trained.append((name, out / "out"))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base["base_model"] if Path(base["base_model"]).is_absolute()
                                        else REPO / base["base_model"])  # fmt: skip
    ref_dir = base["base_model"] if Path(base["base_model"]).is_absolute() else REPO / base["base_model"]
    ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    seq_len = int(overrides.get("sequence_len", base["sequence_len"]))
    chosen, rejected = eval_pairs(tok, heldout, seq_len, args.eval_pairs)
    ref_lp = (sequence_logps(ref, chosen), sequence_logps(ref, rejected))
    results["base"] = {"logp_acc": (ref_lp[0] > ref_lp[1]).double().mean().item()}
    kl_prompts = [prompt for prompt, _ in chosen[: args.kl_prompts]]
    for name, out in trained:
        print(f"evaluating {name} ...", flush=True)
        results["runs"][name]["eval"] = evaluate(out, ref, tok, chosen, rejected, ref_lp, kl_prompts, args)
    results["kl_estimate"] = (
        f"{args.kl_samples} samples from π per prompt on the first {len(kl_prompts)} held-out "
        f"eval prompts, temperature 1, ≤{args.kl_tokens} tokens; mean of log π(y|x) − log π_ref(y|x)"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.png)
    print(table(results))
    print(
        f"\nBase model, before training: log π_ref(y_w|x) > log π_ref(y_l|x) on {results['base']['logp_acc']:.3f} "
        "of the same pairs (for reference: at π = π_ref every implicit reward is 0)."
    )
    print(f"\nKL estimate: {results['kl_estimate']}.\nwrote {args.json} and {args.png}")


if __name__ == "__main__":
    main()
