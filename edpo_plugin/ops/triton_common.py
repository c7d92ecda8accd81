"""Shared pieces of the Triton head kernels: the dot that picks its precision, tanh, block sizes, splits.

Precision contract of every kernel here:

- bf16/fp16 inputs: tensor-core dots (``tl.dot`` on the input dtype) with fp32 accumulation; softmax weights that
  feed a second dot are rounded to the input dtype first, as FlashAttention does with P.
- fp32 inputs: IEEE fp32 dots (``input_precision="ieee"``, no TF32), for parity with fp32 references.
- Under ``TRITON_INTERPRET=1`` low-precision dots are not reliable, so operands are upcast to fp32 right before
  each dot (``UPCAST``). Values rounded to the input dtype before a dot (P above) are rounded the same way on both
  paths, so the interpreter sees the GPU path's rounding, only not its accumulation order.

Imports torch and triton.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl


@triton.jit
def tanh(x):
    """fp32 tanh from one exp: sign(x)·(1 − e^{−2|x|}) / (1 + e^{−2|x|}) (no overflow for any x)."""
    t = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def dot(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` (fp32 ``acc``): IEEE fp32 when ``IEEE`` or ``UPCAST``, else a native tensor-core dot."""
    if IEEE or UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class Blocks(NamedTuple):
    """Tile sizes and launch options of one kernel: ``BLOCK_M`` rows, ``BLOCK_V`` vocabulary columns, ``BLOCK_D``
    hidden features per dot step."""

    block_m: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int


# Defaults per (kernel, dtype class, architecture major); chosen so that every kernel compiles without spills on
# sm_80 and sm_90 (scripts/kernel_report.py, tests/test_kernel_report.py). "lp" = bf16/fp16, "fp32" = fp32.
_DEFAULTS: dict[tuple[str, str, int], Blocks] = {
    ("stats", "lp", 9): Blocks(64, 128, 64, 8, 3),
    ("stats", "lp", 8): Blocks(64, 128, 32, 8, 3),
    ("stats", "fp32", 9): Blocks(64, 64, 32, 8, 2),
    ("stats", "fp32", 8): Blocks(64, 64, 32, 8, 2),
    ("direction", "lp", 9): Blocks(64, 64, 64, 8, 3),
    ("direction", "lp", 8): Blocks(32, 128, 32, 8, 3),
    ("direction", "fp32", 9): Blocks(64, 64, 32, 8, 2),
    ("direction", "fp32", 8): Blocks(64, 64, 32, 8, 2),
    ("direction2", "lp", 9): Blocks(64, 256, 32, 8, 3),
    ("direction2", "lp", 8): Blocks(64, 256, 32, 8, 3),
    ("direction2", "fp32", 9): Blocks(64, 64, 32, 8, 2),
    ("direction2", "fp32", 8): Blocks(64, 64, 32, 8, 2),
    ("epilogue", "lp", 9): Blocks(32, 0, 128, 4, 1),
    ("epilogue", "lp", 8): Blocks(32, 0, 128, 4, 1),
    ("epilogue", "fp32", 9): Blocks(32, 0, 128, 4, 1),
    ("epilogue", "fp32", 8): Blocks(32, 0, 128, 4, 1),
    ("logit_grad", "lp", 9): Blocks(64, 128, 64, 8, 3),
    ("logit_grad", "lp", 8): Blocks(64, 128, 32, 8, 3),
    ("logit_grad", "fp32", 9): Blocks(64, 64, 32, 4, 2),
    ("logit_grad", "fp32", 8): Blocks(64, 64, 32, 4, 2),
}
KERNEL_KINDS = ("stats", "direction", "direction2", "epilogue", "logit_grad")
# Under the interpreter the cost is per program and per loop iteration: few, large blocks.
_INTERPRETER = Blocks(64, 256, 64, 4, 1)


def dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "lp"


def default_blocks(kind: str, dtype: torch.dtype, arch_major: int) -> Blocks:
    """Default :class:`Blocks` of kernel ``kind`` for inputs of ``dtype`` on an sm_{arch_major}x GPU (sm_80 defaults
    below sm_90, sm_90's above)."""
    major = 9 if arch_major >= 9 else 8
    return _DEFAULTS[(kind, dtype_class(dtype), major)]


def blocks_for(kind: str, dtype: torch.dtype, device: torch.device) -> Blocks:
    """Tile sizes for a launch; ``EDPO_TRITON_BLOCKS="M,V,D"`` overrides rows, columns and feature step."""
    if interpreting() or device.type != "cuda":
        base = _INTERPRETER
    else:
        base = default_blocks(kind, dtype, torch.cuda.get_device_capability(device)[0])
    override = os.environ.get("EDPO_TRITON_BLOCKS")
    if override:
        bm, bv, bd = (int(x) for x in override.split(","))
        base = base._replace(block_m=bm, block_v=bv or base.block_v, block_d=bd)
    return base


def vocab_splits(n_rows: int, vocab: int, block_m: int, block_v: int, device: torch.device, cap: int) -> int:
    """Vocabulary splits of a (row block × split) grid: enough programs for two waves over the GPU's SMs, at most
    one per ``block_v`` columns and at most ``cap``. ``EDPO_TRITON_SPLITS`` forces a count (tests: several splits
    under the interpreter); on CPU the default is 1."""
    forced = os.environ.get("EDPO_TRITON_SPLITS")
    tiles = triton.cdiv(vocab, block_v)
    if forced:
        want = int(forced)
    elif device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = triton.cdiv(2 * sms, triton.cdiv(n_rows, block_m))
    else:
        want = 1
    return max(1, min(want, tiles, cap))
