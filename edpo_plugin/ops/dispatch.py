"""Which implementation a call runs: the names, ``"auto"``'s choice on CUDA, and whether Triton is there.

Imports only torch (and the Triton self-check, lazily).
"""

from __future__ import annotations

import torch

IMPLS = ("auto", "naive", "chunked", "triton")
# What "auto" runs on CUDA: the argmin of the modelled time in docs/roofline.json (tests/ops/test_roofline.py keeps the
# two in step; docs/bench_head_gpu.json, once a GPU has measured, takes precedence there).
AUTO_ON_CUDA = "triton"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> str:
    """Map ``impl`` (one of :data:`IMPLS`) to a concrete implementation for ``dtype`` tensors on ``device``."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}.")
    if impl == "auto":
        if device.type != "cuda":
            return "chunked"
        choice = auto_cuda_impl()
        if choice != "triton":
            return choice
        if not triton_available():
            return "chunked"
        from edpo_plugin.ops.triton_selfcheck import triton_passes_self_check

        return "triton" if triton_passes_self_check(device, dtype) else "chunked"
    return impl


def auto_cuda_impl() -> str:
    """The implementation ``"auto"`` prefers on CUDA (:data:`AUTO_ON_CUDA`), before the Triton self-check."""
    return AUTO_ON_CUDA
