"""Plot an ε-DPO run from its ``trainer_state.json``: β, the fractions of +ε / −ε decisions, reward margin, loss.

python examples/plot_training.py outputs/tiny-edpo/checkpoint-30/trainer_state.json   # writes training.png beside it
"""

from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load_train_logs(path: str) -> list[dict]:
    """Training log entries (one per logging step) that carry the ε-DPO keys."""
    with open(path) as f:
        history = json.load(f)["log_history"]
    rows = [h for h in history if "kl/beta" in h and "loss" in h]
    if not rows:
        raise SystemExit(f"{path} has no training entries with kl/beta: is it an ε-DPO run with logging_steps set?")
    return rows


def plot(rows: list[dict], out: str) -> None:
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
    ax = axes[0][0]
    ax.plot(steps, [r["kl/beta"] for r in rows], marker=".")
    ax.set_title("β (before the step's update)")
    ax = axes[0][1]
    ax.plot(steps, [r["kl/p_epsilon_steps"] for r in rows], label="s = +1 (relax, β/(1+ε))")
    ax.plot(steps, [r["kl/n_epsilon_steps"] for r in rows], label="s = −1 (tighten, β/(1−ε))")
    ax.plot(steps, [r["kl/avg_steps"] for r in rows], label="s̄", linestyle="--")
    ax.set_title("ε decisions (fraction of pairs)")
    ax.legend(fontsize=8)
    ax = axes[1][0]
    ax.plot(steps, [r["rewards/margins"] for r in rows])
    ax.set_title("reward margin")
    ax.set_xlabel("optimizer step")
    ax = axes[1][1]
    ax.plot(steps, [r["loss"] for r in rows])
    ax.set_title("loss")
    ax.set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trainer_state", help="path to trainer_state.json (in a checkpoint folder)")
    p.add_argument("--out", default=None, help="default: training.png beside trainer_state.json")
    args = p.parse_args()
    args.out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.trainer_state)), "training.png")
    plot(load_train_logs(args.trainer_state), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
