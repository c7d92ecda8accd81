#!/usr/bin/env bash
# Creates .venv-trl-latest: the newest TRL / transformers / PEFT that install on Python 3.11 (what a plain-TRL user
# gets today), without Axolotl, for a second run of the trainer-layer tests (.ci/run). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
VENV=.venv-trl-latest
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import trl, peft, transformers, edpo_plugin, pytest, tensorboard, bitsandbytes, gguf" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q torch==2.13.0  # the CPU build on local disk (see setup_env.sh)
  "$VENV/bin/python" -m pip install -q -e ".[trl-latest,test-trainer]"
  "$VENV/bin/python" -m pip install -q --no-deps liger-kernel==0.8.1  # benchmarks/roofline.py's Liger row
fi
"$VENV/bin/python" -c "import trl, transformers, peft; print('trl', trl.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
