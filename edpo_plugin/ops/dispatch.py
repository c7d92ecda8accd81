"""Which implementation and plan a call runs: the names, the planner's choice, and whether Triton is there.

- CPU (and every device but CUDA): ``"auto"`` is ``"chunked"`` with :data:`edpo_plugin.ops.plan.CPU_TILES`
  (what measures best there), recomputing the trainable head's tiles in backward.
- CUDA: ``"auto"`` is the modelled-fastest plan (:func:`best_plan`: fold × token chunk ×
  vocabulary tile × keeping ``P``) whose workspace fits the budget (``workspace_mb``, default
  :data:`edpo_plugin.ops.plan.DEFAULT_WORKSPACE_MB`); a Triton plan only once Triton imports and its first-use
  self-check passed on that device and dtype (:mod:`edpo_plugin.ops.triton_selfcheck`; on failure it warns once and
  the planner weighs the PyTorch fold alone). An explicit ``"chunked"`` / ``"triton"`` or explicit tiles fix those
  choices and the planner picks the rest.

Imports only torch (and the Triton self-check, lazily).
"""

from __future__ import annotations

import functools
from dataclasses import replace

import torch

from edpo_plugin.ops.cost_model import Gpu, gpu_model, plan_seconds
from edpo_plugin.ops.engine import tensor_core_gemms
from edpo_plugin.ops.launches import launches, workspace_bytes
from edpo_plugin.ops.plan import (
    CPU_TILES,
    DEFAULT_WORKSPACE_MB,
    TOKEN_CHUNKS,
    VOCAB_CHUNKS,
    HeadPlan,
    HeadShape,
    interpreting,
)

IMPLS = ("auto", "naive", "chunked", "triton")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def check_triton_usable(device_type: str, setting: str = "impl='triton'") -> None:
    """Refuse the Triton head where it cannot run: without the ``triton`` package, or on a ``device_type`` other than
    ``"cuda"`` unless Triton's CPU interpreter is on. ``setting`` names the option as the caller's user wrote it
    (``impl='triton'``, ``edpo_head='triton'``, ``edpo_head: triton``)."""
    cpu_choices = "'auto' (the chunked PyTorch head off CUDA), 'chunked' or 'naive'"
    if device_type != "cuda" and not interpreting():
        raise ValueError(
            f"{setting} needs a CUDA GPU: the Triton head's kernels compile for CUDA devices, and this run is on "
            f"{device_type} (torch.cuda.is_available() is {torch.cuda.is_available()}). On this machine use "
            f"{cpu_choices}. (TRITON_INTERPRET=1 runs the kernels on the CPU through Triton's interpreter, slowly: "
            "for tests.)"
        )
    if not triton_available():
        raise ValueError(f"{setting} needs the triton package: pip install triton, or use {cpu_choices}.")


def _triton_usable(device: torch.device, dtype: torch.dtype) -> bool:
    if not triton_available():
        return False
    from edpo_plugin.ops.triton_selfcheck import triton_passes_self_check

    return triton_passes_self_check(device, dtype)


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> str:
    """Map ``impl`` (one of :data:`IMPLS`) to the fold ``"auto"`` would run for ``dtype`` tensors on ``device``
    (on CUDA: the fold of the modelled-best plan at the 8B shape, if its self-check passes)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}.")
    if impl == "triton":
        check_triton_usable(device.type)
    if impl != "auto":
        return impl
    if device.type != "cuda":
        return "chunked"
    shape = HeadShape(tokens=8192, valid=8192, dim=4096, vocab=128256, dtype=dtype)
    return choose_plan(shape, device, "auto").impl


def choose_plan(
    shape: HeadShape,
    device: torch.device,
    impl: str,
    token_chunk: int | None = None,
    vocab_chunk: int | None = None,
    workspace_mb: int | None = None,
) -> HeadPlan:
    """The :class:`HeadPlan` for one call (see the module docstring); ``impl`` is ``"auto"``, ``"chunked"`` or
    ``"triton"``."""
    if impl not in ("auto", "chunked", "triton"):
        raise ValueError(f"the fused head's impl must be 'auto', 'chunked' or 'triton', got {impl!r}.")
    if impl == "triton":
        check_triton_usable(device.type)
    if device.type != "cuda":
        return cpu_plan(shape, "chunked" if impl == "auto" else impl, token_chunk, vocab_chunk)
    budget = int(workspace_mb if workspace_mb is not None else DEFAULT_WORKSPACE_MB) * 2**20
    # planning weighs a hundred plans (tens of ms): plan once per bucket of token counts, for the bucket's top
    bucketed = replace(shape, tokens=_bucket(shape.tokens), valid=_bucket(shape.valid))
    gpu = gpu_model(device)
    impls = ("triton", "chunked") if impl == "auto" else (impl,)
    tensor_cores = tensor_core_gemms(device, shape.dtype)
    plan = _best_plan(bucketed, impls, gpu, budget, tensor_cores, token_chunk, vocab_chunk)
    if impl == "auto" and plan.impl == "triton" and not _triton_usable(device, shape.dtype):
        plan = _best_plan(bucketed, ("chunked",), gpu, budget, tensor_cores, token_chunk, vocab_chunk)
    return plan


TOKEN_BUCKET = 512


def _bucket(n: int) -> int:
    """``n`` rounded up to a multiple of :data:`TOKEN_BUCKET` (a plan for the bucket's top fits every ``n`` in it)."""
    return max(TOKEN_BUCKET, -(-n // TOKEN_BUCKET) * TOKEN_BUCKET)


@functools.lru_cache(maxsize=256)
def _best_plan(shape: HeadShape, impls: tuple[str, ...], gpu: Gpu, budget: int, tensor_cores: bool,
               token_chunk: int | None, vocab_chunk: int | None) -> HeadPlan:  # fmt: skip
    return best_plan(shape, impls, gpu, budget, tensor_cores, token_chunk, vocab_chunk)


# ------------------------------------------------------------------------------------------------ the planner


def cpu_plan(shape: HeadShape, impl: str, token_chunk: int | None, vocab_chunk: int | None) -> HeadPlan:
    """CPU (and the interpreter): what measures best there, the chunked defaults, recomputing backward."""
    return HeadPlan(impl=impl, head=shape.head, token_chunk=token_chunk or CPU_TILES[0],
                    vocab_chunk=vocab_chunk or CPU_TILES[1], tensor_cores=False, p_dtype=torch.float32,
                    interpreted=impl == "triton")  # fmt: skip


def candidates(shape: HeadShape, impls: tuple[str, ...], tensor_cores: bool, token_chunk: int | None = None,
               vocab_chunk: int | None = None) -> list[HeadPlan]:  # fmt: skip
    """Every plan the planner weighs on CUDA for ``shape``: the folds ``impls`` × token chunks × vocabulary tiles
    (or the caller's) × keeping ``P`` or not (trainable head)."""
    m, vocab = max(shape.valid, 1), shape.vocab
    chunk_sizes = [token_chunk] if token_chunk else sorted({min(c, m) for c in TOKEN_CHUNKS if c < 2 * m} | {m})
    tile_sizes = [vocab_chunk] if vocab_chunk else sorted({min(c, vocab) for c in VOCAB_CHUNKS})
    p_dtype = shape.dtype if tensor_cores else torch.float32
    keeps = (False, True) if shape.head == "trainable" else (False,)
    return [HeadPlan(impl, shape.head, tc_, vc, tensor_cores, p_dtype, keep)
            for impl in impls for tc_ in chunk_sizes for vc in tile_sizes for keep in keeps]  # fmt: skip


def best_plan(shape: HeadShape, impls: tuple[str, ...], gpu: Gpu, workspace: int, tensor_cores: bool = True,
              token_chunk: int | None = None, vocab_chunk: int | None = None) -> HeadPlan:  # fmt: skip
    """The modelled-fastest plan among :func:`candidates` whose workspace fits ``workspace`` bytes (if none does,
    the one with the smallest workspace)."""
    plans = candidates(shape, impls, tensor_cores, token_chunk, vocab_chunk)
    fitting = [p for p in plans if workspace_bytes(p, shape) <= workspace]
    if not fitting:
        return min(plans, key=lambda p: workspace_bytes(p, shape))
    return min(fitting, key=lambda p: (plan_seconds(launches(p, shape), gpu), workspace_bytes(p, shape)))
