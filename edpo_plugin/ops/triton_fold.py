"""The engine's per-tile folds as Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``).

:func:`fold_triton` is :func:`edpo_plugin.ops.engine.fold_torch` in one launch: each program owns ``BLOCK_M`` rows
of the tile and sweeps its ``cols`` columns twice, ``BLOCK_N`` at a time — first for the four streams' maxima,
then for ``Σ exp(z − max)`` and the policy's softmax weights ``P`` — recomputing bias, transform and the ε-mixes
in registers from the two fp32 pre-logit planes. HBM traffic per tile: the two planes read twice (the second read
of a program's rows usually hits L2), ``P`` written once in the GEMM's input dtype, ``O(rows)`` statistics.

:func:`grad_fold_triton` is :func:`edpo_plugin.ops.engine.grad_fold_torch`: one elementwise pass from the
recomputed policy pre-logits to ``dL/du``, written in the GEMM's input dtype for the two backward GEMMs.

Offsets are int64 (a tile's ``rows · cols`` and a plane's stride may pass 2³¹ on large chunks).

Imports torch and triton.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from edpo_plugin.ops.engine import RunningStats
from edpo_plugin.ops.transform import LogitTransform


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fold_blocks(cols: int, device: torch.device) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps)``: 4 rows × 512 columns on a GPU (a 1024-row chunk gives 256 programs);
    under the interpreter, where each program and loop step costs Python time, few large blocks."""
    if device.type != "cuda" or interpreting():
        return 64, min(4096, triton.next_power_of_2(cols)), 4
    return 4, 512, 4


@triton.jit
def _tanh(x):
    """fp32 tanh from one exp: sign(x)·(1 − e^{−2|x|}) / (1 + e^{−2|x|}) (no overflow for any x)."""
    t = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def _transformed(z_ptr, offs, mask, b_ptr, cols_idx, cmask, scale, softcap, HAS_BIAS: tl.constexpr,
                 HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):  # fmt: skip
    u = tl.load(z_ptr + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        u += tl.load(b_ptr + cols_idx, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_SCALE:
        u = u * scale
    if HAS_SOFTCAP:
        u = _tanh(u / softcap) * softcap
    return u


@triton.jit
def _fold_kernel(
    z_ptr, plane_stride, row_stride, bp_ptr, br_ptr, max_ptr, sum_ptr, stat_stride, p_ptr, p_row_stride, alpha_ptr,
    rows, cols, epsilon, scale, softcap,
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    WITH_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    r = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = r < rows
    row_off = r.to(tl.int64) * row_stride
    zr_ptr = z_ptr + plane_stride
    neg_inf = float("-inf")

    m0 = tl.full((BLOCK_M,), neg_inf, tl.float32)
    m1 = tl.full((BLOCK_M,), neg_inf, tl.float32)
    m2 = tl.full((BLOCK_M,), neg_inf, tl.float32)
    m3 = tl.full((BLOCK_M,), neg_inf, tl.float32)
    for c0 in range(0, cols, BLOCK_N):
        c = c0 + tl.arange(0, BLOCK_N)
        cmask = c < cols
        mask = rmask[:, None] & cmask[None, :]
        offs = row_off[:, None] + c[None, :]
        zp = _transformed(z_ptr, offs, mask, bp_ptr, c, cmask, scale, softcap, HAS_BIAS, HAS_SCALE, HAS_SOFTCAP)
        zr = _transformed(zr_ptr, offs, mask, br_ptr, c, cmask, scale, softcap, HAS_REF_BIAS, HAS_SCALE,
                          HAS_SOFTCAP)  # fmt: skip
        delta = (zp - zr) * epsilon
        m0 = tl.maximum(m0, tl.max(tl.where(mask, zp, neg_inf), 1))
        m1 = tl.maximum(m1, tl.max(tl.where(mask, zr, neg_inf), 1))
        m2 = tl.maximum(m2, tl.max(tl.where(mask, zp + delta, neg_inf), 1))
        m3 = tl.maximum(m3, tl.max(tl.where(mask, zp - delta, neg_inf), 1))

    old0 = tl.load(max_ptr + r, mask=rmask, other=0.0)
    old1 = tl.load(max_ptr + stat_stride + r, mask=rmask, other=0.0)
    old2 = tl.load(max_ptr + 2 * stat_stride + r, mask=rmask, other=0.0)
    old3 = tl.load(max_ptr + 3 * stat_stride + r, mask=rmask, other=0.0)
    n0 = tl.maximum(old0, m0)
    n1 = tl.maximum(old1, m1)
    n2 = tl.maximum(old2, m2)
    n3 = tl.maximum(old3, m3)

    s0 = tl.zeros((BLOCK_M,), tl.float32)
    s1 = tl.zeros((BLOCK_M,), tl.float32)
    s2 = tl.zeros((BLOCK_M,), tl.float32)
    s3 = tl.zeros((BLOCK_M,), tl.float32)
    p_row_off = r.to(tl.int64) * p_row_stride
    for c0 in range(0, cols, BLOCK_N):
        c = c0 + tl.arange(0, BLOCK_N)
        cmask = c < cols
        mask = rmask[:, None] & cmask[None, :]
        offs = row_off[:, None] + c[None, :]
        zp = _transformed(z_ptr, offs, mask, bp_ptr, c, cmask, scale, softcap, HAS_BIAS, HAS_SCALE, HAS_SOFTCAP)
        zr = _transformed(zr_ptr, offs, mask, br_ptr, c, cmask, scale, softcap, HAS_REF_BIAS, HAS_SCALE,
                          HAS_SOFTCAP)  # fmt: skip
        delta = (zp - zr) * epsilon
        e0 = tl.where(mask, tl.exp(zp - n0[:, None]), 0.0)
        s0 += tl.sum(e0, 1)
        s1 += tl.sum(tl.where(mask, tl.exp(zr - n1[:, None]), 0.0), 1)
        s2 += tl.sum(tl.where(mask, tl.exp((zp + delta) - n2[:, None]), 0.0), 1)
        s3 += tl.sum(tl.where(mask, tl.exp((zp - delta) - n3[:, None]), 0.0), 1)
        if WITH_P:
            if HAS_SOFTCAP:
                t = zp / softcap
                e0 = e0 * ((1.0 - t * t) * scale)
            tl.store(p_ptr + p_row_off[:, None] + c[None, :], e0.to(p_ptr.dtype.element_ty), mask=mask)

    sum0 = tl.load(sum_ptr + r, mask=rmask, other=0.0) * tl.exp(old0 - n0) + s0
    sum1 = tl.load(sum_ptr + stat_stride + r, mask=rmask, other=0.0) * tl.exp(old1 - n1) + s1
    sum2 = tl.load(sum_ptr + 2 * stat_stride + r, mask=rmask, other=0.0) * tl.exp(old2 - n2) + s2
    sum3 = tl.load(sum_ptr + 3 * stat_stride + r, mask=rmask, other=0.0) * tl.exp(old3 - n3) + s3
    tl.store(max_ptr + r, n0, mask=rmask)
    tl.store(max_ptr + stat_stride + r, n1, mask=rmask)
    tl.store(max_ptr + 2 * stat_stride + r, n2, mask=rmask)
    tl.store(max_ptr + 3 * stat_stride + r, n3, mask=rmask)
    tl.store(sum_ptr + r, sum0, mask=rmask)
    tl.store(sum_ptr + stat_stride + r, sum1, mask=rmask)
    tl.store(sum_ptr + 2 * stat_stride + r, sum2, mask=rmask)
    tl.store(sum_ptr + 3 * stat_stride + r, sum3, mask=rmask)
    if WITH_P:
        tl.store(alpha_ptr + r, tl.exp(old0 - n0), mask=rmask)


def fold_triton(
    z: torch.Tensor,
    b_p: torch.Tensor | None,
    b_r: torch.Tensor | None,
    stats: RunningStats,
    epsilon: float,
    transform: LogitTransform,
    p_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`edpo_plugin.ops.engine.fold_torch` as one Triton launch; reads planes 0 and 1 of ``z`` only."""
    _, rows, cols = z.shape
    if z.stride(2) != 1 or z[0].stride(0) != z.stride(1):
        raise ValueError("fold_triton needs a row-major [4, rows, cols] tile buffer.")
    with_p = p_dtype is not None
    p = torch.empty(rows, cols, dtype=p_dtype, device=z.device) if with_p else z
    alpha = torch.empty(rows, dtype=torch.float32, device=z.device) if with_p else z
    block_m, block_n, warps = fold_blocks(cols, z.device)
    cap = transform.softcap
    _fold_kernel[(triton.cdiv(rows, block_m),)](
        z, z.stride(0), z.stride(1), z if b_p is None else b_p, z if b_r is None else b_r, stats.max, stats.sum,
        stats.max.stride(0), p, p.stride(0), alpha, rows, cols, float(epsilon), float(transform.scale),
        float(cap or 1.0), HAS_BIAS=b_p is not None, HAS_REF_BIAS=b_r is not None, HAS_SCALE=transform.scale != 1.0,
        HAS_SOFTCAP=cap is not None, WITH_P=with_p, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )  # fmt: skip
    return (alpha, p) if with_p else None


@triton.jit
def _grad_fold_kernel(
    u_ptr, u_row_stride, b_ptr, y_ptr, max_ptr, logsum_ptr, g_ptr, out_ptr, out_row_stride, rows, cols, scale, softcap,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = r < rows
    cmask = c < cols
    mask = rmask[:, None] & cmask[None, :]
    z = _transformed(u_ptr, r.to(tl.int64)[:, None] * u_row_stride + c[None, :], mask, b_ptr, c, cmask, scale,
                     softcap, HAS_BIAS, HAS_SCALE, HAS_SOFTCAP)  # fmt: skip
    row_max = tl.load(max_ptr + r, mask=rmask, other=0.0)
    row_logsum = tl.load(logsum_ptr + r, mask=rmask, other=0.0)
    g = tl.load(g_ptr + r, mask=rmask, other=0.0)
    y = tl.load(y_ptr + r, mask=rmask, other=-1)
    grad = -g[:, None] * tl.exp((z - row_max[:, None]) - row_logsum[:, None])
    grad = tl.where(c[None, :] == y[:, None], grad + g[:, None], grad)
    if HAS_SOFTCAP:
        t = z / softcap
        grad = grad * ((1.0 - t * t) * scale)
    elif HAS_SCALE:
        grad = grad * scale
    offs = r.to(tl.int64)[:, None] * out_row_stride + c[None, :]
    tl.store(out_ptr + offs, grad.to(out_ptr.dtype.element_ty), mask=mask)


def grad_fold_triton(
    u: torch.Tensor,
    b: torch.Tensor | None,
    y_tile: torch.Tensor,
    row_max: torch.Tensor,
    row_logsum: torch.Tensor,
    g: torch.Tensor,
    transform: LogitTransform,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """:func:`edpo_plugin.ops.engine.grad_fold_torch` as one Triton launch (``u`` is read, not overwritten)."""
    rows, cols = u.shape
    out = torch.empty(rows, cols, dtype=out_dtype, device=u.device)
    block_m, block_n = (64, min(4096, triton.next_power_of_2(cols))) if interpreting() or not u.is_cuda else (32, 128)
    cap = transform.softcap
    grid = (triton.cdiv(rows, block_m), triton.cdiv(cols, block_n))
    _grad_fold_kernel[grid](
        u, u.stride(0), u if b is None else b, y_tile, row_max.contiguous(), row_logsum.contiguous(), g, out,
        out.stride(0), rows, cols, float(transform.scale), float(cap or 1.0), HAS_BIAS=b is not None,
        HAS_SCALE=transform.scale != 1.0, HAS_SOFTCAP=cap is not None, BLOCK_M=block_m, BLOCK_N=block_n,
    )  # fmt: skip
    return out
