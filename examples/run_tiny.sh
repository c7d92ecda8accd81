#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, build the tiny default model and data, run ε-DPO from YAML
# with `axolotl train`, and plot β, the ε decisions, the reward margin and the loss.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 WANDB_MODE=disabled
CONFIG=${1:-yaml_examples/tiny-edpo.yaml}
python examples/make_tiny_default.py --out .tiny
axolotl train "$CONFIG"
OUT=$(python -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['output_dir'])" "$CONFIG")
STATE=$(ls -d "$OUT"/checkpoint-*/trainer_state.json | sort -V | tail -n 1)
python examples/plot_training.py "$STATE" --out "$OUT/training.png"
echo "final β: $(cat "$OUT/edpo_state.json")"
