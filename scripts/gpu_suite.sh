#!/usr/bin/env bash
# The GPU suite in one call (issue: "the GPU head at the roofline"), for a lent GPU with no network.
#
#   bash scripts/gpu_suite.sh prepare    # here, once: wheels of the peers (TRL 1.16, Liger 0.8.1) into .gpu-wheels/
#   bash scripts/gpu_suite.sh            # on the GPU (carry .gpu-wheels): parity, then the timed heads
#
# Writes $OUT/gpu_parity.json (every kept path against float64 on the GPU, bit identity when policy == reference)
# and $OUT/bench_head_gpu.json (frozen and trainable heads at the 8B shape: naive, chunked, triton, auto, TRL's
# chunked head, Liger), to be committed as docs/gpu_parity.json and docs/bench_head_gpu.json.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-run}" = prepare ]; then
  python -m pip download -q --no-deps trl==1.16.0 liger-kernel==0.8.1 -d .gpu-wheels
  exit 0
fi
OUT="${OUT:-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -m pip install -q --no-deps --no-index .gpu-wheels/*.whl 2>&1 | tail -2 || echo "peer wheels not installed"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 180 python scripts/gpu_parity.py --json "$OUT/gpu_parity.json" || echo "PARITY FAILED (see table)"
timeout 330 python scripts/bench_head.py --gpu-suite --json "$OUT/bench_head_gpu.json"
