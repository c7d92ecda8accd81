"""Which implementation a call runs: the names, ``"auto"``'s choice on CUDA, and whether Triton is there.

Imports only torch (and the Triton self-check, lazily).
"""

from __future__ import annotations

import os

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


def triton_interpreting() -> bool:
    """Whether Triton kernels run on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``: tests, slow)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_triton_usable(device_type: str, setting: str = "impl='triton'") -> None:
    """Refuse the Triton head where it cannot run: without the ``triton`` package, or on a ``device_type`` other than
    ``"cuda"`` unless Triton's CPU interpreter is on. ``setting`` names the option as the caller's user wrote it
    (``impl='triton'``, ``edpo_head='triton'``, ``edpo_head: triton``)."""
    cpu_choices = "'auto' (the chunked PyTorch head off CUDA), 'chunked' or 'naive'"
    if device_type != "cuda" and not triton_interpreting():
        raise ValueError(
            f"{setting} needs a CUDA GPU: the Triton head's kernels compile for CUDA devices, and this run is on "
            f"{device_type} (torch.cuda.is_available() is {torch.cuda.is_available()}). On this machine use "
            f"{cpu_choices}. (TRITON_INTERPRET=1 runs the kernels on the CPU through Triton's interpreter, slowly: "
            "for tests.)"
        )
    if not triton_available():
        raise ValueError(f"{setting} needs the triton package: pip install triton, or use {cpu_choices}.")


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> str:
    """Map ``impl`` (one of :data:`IMPLS`) to a concrete implementation for ``dtype`` tensors on ``device``; an
    explicit ``"triton"`` where it cannot run is refused (:func:`check_triton_usable`)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}.")
    if impl == "triton":
        check_triton_usable(device.type)
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
