#!/usr/bin/env bash
# Creates .venv (Python 3.11) with torch 2.13.0 (CPU build), this package, Axolotl 0.19.0, DeepSpeed (Python
# only, no compiled ops: the ZeRO-3 example YAMLs are validated through it) and the test tools.
# Idempotent: a second run only checks that the packages are there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import axolotl, deepspeed, edpo_plugin, triton, pytest, matplotlib, bitsandbytes, tensorboard, megatron.core, gguf" 2>/dev/null; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first: 2.13.0 is the CPU build on local disk; letting a resolver pick torch pulls a CUDA build.
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -e ".[axolotl,test]"
  # Axolotl's deepspeed extra also pulls deepspeed-kernels (CUDA); on CPU only DeepSpeed itself, ops not built.
  DS_BUILD_OPS=0 .venv/bin/python -m pip install -q --no-build-isolation "deepspeed>=0.18.6,<0.19.0"
fi
