"""The per-kernel GPU cost model of the head, its constants in one place with their sources (no GPU needed).

A kernel takes ``max(flops / (eff · peak), bytes / (HBM_EFFICIENCY · bandwidth)) + LAUNCH_S``, a host sync
``SYNC_S``: GEMM efficiency ``eff`` from :data:`GEMM_EFFICIENCY` by size, capped at the GPU's published best-shape
rate, lowered for a GEMM that accumulates into its output by the time its epilogue spends reading ``C`` (exposed,
not overlapped; this reproduces the 0.63 quoted for the one-wave shape below). Elementwise kernels, PyTorch's and
Triton's, are modelled as memory-bound, every load from HBM (no L2 reuse: an upper bound). A GPU measurement (the
``bench_head_gpu.json`` that ``benchmarks/gpu_suite.sh`` writes) calibrates :data:`GEMM_EFFICIENCY` through
:func:`calibrated`; none exists yet, so every time here is **modelled**. The kernels a plan runs come from
:func:`edpo_plugin.ops.launches.launches`.

Imports only torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Gpu:
    """Peak rates of one GPU: dense tensor-core bf16/fp16 flop/s, fp32 (non-tensor-core) flop/s, HBM bytes/s, and
    the published best-shape achievable fraction of the tensor-core peak for a GEMM."""

    name: str
    tc_flops: float
    simt_flops: float
    hbm_bytes: float
    best_gemm: float


# NVIDIA H100 SXM5 / A100 SXM4 80GB datasheets (dense bf16, fp32, HBM3 / HBM2e); best-shape rates: the published
# "maximum achievable matmul FLOPS" measurements, 80.1 % (H100 SXM) and 85.9 % (A100 SXM), as quoted in issue 23.
GPUS = {
    "H100": Gpu("H100 SXM", 989e12, 67e12, 3.35e12, 0.801),
    "A100": Gpu("A100 SXM", 312e12, 19.5e12, 2.0e12, 0.859),
}
HBM_EFFICIENCY = 0.85  # achievable fraction of HBM bandwidth for a streaming kernel (issue 23 / the project brief)
LAUNCH_S = 4e-6  # per kernel launch, host side (issue 23 / the project brief)
SYNC_S = 20e-6  # per host synchronisation (.item(), nonzero's size) (issue 23 / the project brief)
# cuBLAS efficiency by GEMM size (flops), log-interpolated between points, issue 23's table: 0.70 for the one-wave
# [1024 × 4096]·[4096 × 4096] GEMM with fp32 output on an H100 (its fp32 write exposed), 0.78 from 0.4 TFLOP up.
GEMM_EFFICIENCY = ((2 * 1024 * 4096 * 4096, 0.70), (0.4e12, 0.78))
# Below the first point a GEMM fills less than one wave: efficiency ∝ sqrt(flops) (assumed, not measured).
SMALL_GEMM_EXPONENT = 0.5
# Rows whose reference for P moves in a tile (the lazy fold's masked second pass): assumed 1 % per tile (a row moves
# when its running maximum passes its target's logit + τ, i.e. p_target ≲ e^-τ); data-dependent, not yet measured.
MOVED_ROW_FRACTION = 0.01


@dataclass(frozen=True)
class Kernel:
    """One kernel (``count`` identical launches) of a plan: ``kind`` is ``"gemm"``, ``"torch"`` (a PyTorch
    elementwise / reduction / indexing op), ``"triton"`` or ``"sync"`` (a host synchronisation, no launch).
    ``bytes``: HBM read + written per launch; ``c_read``: a GEMM's bytes of ``C`` read to accumulate into it."""

    phase: str
    name: str
    kind: str
    flops: int = 0
    bytes: int = 0
    c_read: int = 0
    tensor_cores: bool = False
    count: int = 1


@dataclass(frozen=True)
class Calibration:
    """Measured GEMM efficiencies (fraction of peak by flops) replacing :data:`GEMM_EFFICIENCY` for one GPU."""

    gpu: str
    points: tuple[tuple[float, float], ...]


def calibrated(measurement: dict) -> Calibration:
    """The calibration hook: the ``bench_head_gpu.json`` that ``benchmarks/gpu_suite.sh`` writes gives its GPU's
    measured GEMM efficiencies (``measurement["calibration"]``); :func:`kernel_seconds` uses them instead of
    :data:`GEMM_EFFICIENCY` for that GPU."""
    cal = measurement["calibration"]
    return Calibration(cal["gpu"], tuple((float(f), float(e)) for f, e in cal["gemm_efficiency"]))


def gemm_efficiency(flops: float, c_read: float, gpu: Gpu, calibration: Calibration | None = None) -> float:
    """Modelled fraction of ``gpu``'s tensor-core peak a GEMM of ``flops`` reaches (see the module docstring)."""
    points = calibration.points if calibration is not None else GEMM_EFFICIENCY
    (f0, e0), (f1, e1) = points[0], points[-1]
    if flops >= f1:
        eff = e1
    elif flops >= f0:
        eff = e0 + (e1 - e0) * math.log(flops / f0) / math.log(f1 / f0)
    else:
        eff = e0 * (max(flops, 1.0) / f0) ** SMALL_GEMM_EXPONENT
    eff = min(eff, gpu.best_gemm)
    if c_read:
        main = flops / (eff * gpu.tc_flops)
        eff *= main / (main + c_read / (HBM_EFFICIENCY * gpu.hbm_bytes))
    return eff


def kernel_seconds(k: Kernel, gpu: Gpu, calibration: Calibration | None = None) -> float:
    """Modelled time of ``k.count`` launches of ``k`` on ``gpu``."""
    if k.kind == "sync":
        return k.count * SYNC_S
    memory = k.bytes / (HBM_EFFICIENCY * gpu.hbm_bytes)
    compute = 0.0
    if k.kind == "gemm":
        peak = gpu.tc_flops if k.tensor_cores else gpu.simt_flops
        cal = calibration if calibration is not None and calibration.gpu == gpu.name else None
        compute = k.flops / (gemm_efficiency(k.flops, k.c_read, gpu, cal) * peak)
    return k.count * (max(compute, memory) + LAUNCH_S)


def plan_seconds(kernels: list[Kernel], gpu: Gpu, calibration: Calibration | None = None) -> float:
    return sum(kernel_seconds(k, gpu, calibration) for k in kernels)


def launch_count(kernels: list[Kernel]) -> int:
    return sum(k.count for k in kernels if k.kind != "sync")


def gpu_model(device: torch.device) -> Gpu:
    """The model of ``device``: A100 constants on an A100 (or A800/A30-class Ampere part), H100 otherwise."""
    try:
        name = torch.cuda.get_device_name(device)
    except Exception:  # noqa: BLE001 - the planner must not fail on a naming problem
        name = ""
    return GPUS["A100"] if "A100" in name or "A800" in name else GPUS["H100"]
