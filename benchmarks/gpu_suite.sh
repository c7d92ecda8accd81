#!/usr/bin/env bash
# The GPU suite in one call, for a lent GPU with no network; expected about 5 minutes (never run yet).
#
#   bash benchmarks/gpu_suite.sh prepare    # here, once (optional): TRL 1.16's wheel (pure Python) into .gpu-wheels/
#   bash benchmarks/gpu_suite.sh            # on the GPU (carry .gpu-wheels if prepared): parity, calibration, timings
#   bash benchmarks/gpu_suite.sh dry-run    # here, no GPU: the suite's Python on CPU (tiny shapes, Triton interpreted)
#
# Writes into $OUT (default benchmarks/results, where the files are committed; a dry run's default is a temporary
# folder): bench_padding_free_gpu.json (the real varlen kernel against the float64 reference; padded / packed /
# shared step times on 8B-width layers: gpu_padding_free.py), gpu_parity.json (every kept path and plan against
# float64 on the GPU, bit identity when policy == reference) and bench_head_gpu.json (the planner's plan at the 8B
# shape and two alternatives, frozen and trainable, each with its modelled time; the GEMM efficiencies and HBM
# fraction this GPU measures: the "calibration" block edpo_plugin.ops.cost_model.calibrated reads).
# `python benchmarks/roofline.py --calibration $OUT/bench_head_gpu.json` then prints the calibrated model. TRL's row
# needs TRL's trainer utilities to import (accelerate, datasets): where they do not, the row records the import
# error and the rest goes on.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-run}" = prepare ]; then
  python -m pip download -q --no-deps trl==1.16.0 -d .gpu-wheels
  exit 0
fi
if [ "${1:-run}" = dry-run ]; then OUT="${OUT:-$(mktemp -d)}"; else OUT="${OUT:-benchmarks/results}"; fi
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
if [ "${1:-run}" = dry-run ]; then
  TRITON_INTERPRET=1 python benchmarks/gpu_parity.py --device cpu --small --json "$OUT/gpu_parity_dry.json" | tail -4
  TRITON_INTERPRET=1 python benchmarks/bench_head.py --gpu-suite --dry-run --json "$OUT/bench_head_dry.json" | tail -12
  python benchmarks/gpu_padding_free.py | tail -6
  echo "dry run took $(( $(date +%s) - start )) s"
  exit 0
fi
if ls .gpu-wheels/*.whl >/dev/null 2>&1; then
  python -m pip install -q --no-deps --no-index .gpu-wheels/*.whl 2>&1 | tail -2 || echo "peer wheels not installed"
fi
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/gpu.txt"
timeout 180 python benchmarks/gpu_parity.py --json "$OUT/gpu_parity.json" || echo "PARITY FAILED or timed out (see the table)"
timeout 200 python benchmarks/bench_head.py --gpu-suite --json "$OUT/bench_head_gpu.json" || echo "BENCH FAILED or timed out"
timeout 60 python benchmarks/gpu_padding_free.py --json "$OUT/bench_padding_free_gpu.json" || echo "PADDING-FREE FAILED or timed out"
echo "suite took $(( $(date +%s) - start )) s"
