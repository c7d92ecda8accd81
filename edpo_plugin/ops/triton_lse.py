"""Triton sweep for the four ε-DPO logsumexps: a (token block × vocabulary split) grid writes partial
(max, sum-exp) statistics per split, and a small PyTorch epilogue merges them.

Each program computes ``z_θ = H Wᵀ`` and ``z_ref = H_ref W_refᵀ`` for its token block, one ``BLOCK_V`` tile at a
time (fp32 accumulation), forms the two mixes in registers and updates a running max / sum for all four
streams; no logits leave the chip. The model's logit transform (scale, soft cap) is applied to both before the
mixes. Workspace: ``2 × 4 × splits × tokens`` fp32.

fp32 inputs use IEEE fp32 dots (parity with fp32 references). bf16/fp16 inputs use native tensor-core dots with
fp32 accumulation, except under ``TRITON_INTERPRET=1`` where low-precision dots are not reliable and loads are
upcast instead.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from edpo_plugin.ops.transform import IDENTITY, LogitTransform


@triton.jit
def _tanh(x):
    """fp32 tanh from one exp: sign(x)·(1 − e^{−2|x|}) / (1 + e^{−2|x|}) (no overflow for any x)."""
    t = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def _mix_lse_partial_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    hr_ptr,
    wr_ptr,
    br_ptr,
    max_ptr,
    sum_ptr,
    n_rows,
    vocab,
    dim,
    cols_per_split,
    epsilon,
    scale,
    softcap,
    stride_h,
    stride_w,
    stride_hr,
    stride_wr,
    HAS_BIAS: tl.constexpr,
    HAS_REF_BIAS: tl.constexpr,
    SHARED_WEIGHT: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    v_start = pid_s * cols_per_split
    v_end = tl.minimum(v_start + cols_per_split, vocab)

    neg_inf = float("-inf")
    m_p = tl.full([BLOCK_M], neg_inf, tl.float32)
    m_r = tl.full([BLOCK_M], neg_inf, tl.float32)
    m_a = tl.full([BLOCK_M], neg_inf, tl.float32)
    m_b = tl.full([BLOCK_M], neg_inf, tl.float32)
    s_p = tl.zeros([BLOCK_M], tl.float32)
    s_r = tl.zeros([BLOCK_M], tl.float32)
    s_a = tl.zeros([BLOCK_M], tl.float32)
    s_b = tl.zeros([BLOCK_M], tl.float32)

    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        z = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
        zr = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
        for k0 in range(0, dim, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            k_ok = ks < dim
            hmask = row_ok[:, None] & k_ok[None, :]
            wmask = col_ok[:, None] & k_ok[None, :]
            h = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=hmask, other=0.0)
            hr = tl.load(hr_ptr + rows[:, None] * stride_hr + ks[None, :], mask=hmask, other=0.0)
            w = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=wmask, other=0.0)
            if SHARED_WEIGHT:
                wr = w
            else:
                wr = tl.load(wr_ptr + cols[:, None] * stride_wr + ks[None, :], mask=wmask, other=0.0)
            if DOT_FP32:
                z = tl.dot(h.to(tl.float32), tl.trans(w.to(tl.float32)), z, input_precision="ieee")
                zr = tl.dot(hr.to(tl.float32), tl.trans(wr.to(tl.float32)), zr, input_precision="ieee")
            else:
                z = tl.dot(h, tl.trans(w), z)
                zr = tl.dot(hr, tl.trans(wr), zr)
        if HAS_BIAS:
            z += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_REF_BIAS:
            zr += tl.load(br_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_SCALE:
            z = z * scale
            zr = zr * scale
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
            zr = softcap * _tanh(zr / softcap)
        delta = (z - zr) * epsilon
        za = z + delta  # (1+ε)z_θ − εz_ref, as a correction to z_θ (see chunked.mix_streams)
        zb = z - delta  # (1−ε)z_θ + εz_ref
        keep = col_ok[None, :]
        z = tl.where(keep, z, neg_inf)
        zr = tl.where(keep, zr, neg_inf)
        za = tl.where(keep, za, neg_inf)
        zb = tl.where(keep, zb, neg_inf)

        new = tl.maximum(m_p, tl.max(z, axis=1))
        s_p = s_p * tl.exp(m_p - new) + tl.sum(tl.exp(z - new[:, None]), axis=1)
        m_p = new
        new = tl.maximum(m_r, tl.max(zr, axis=1))
        s_r = s_r * tl.exp(m_r - new) + tl.sum(tl.exp(zr - new[:, None]), axis=1)
        m_r = new
        new = tl.maximum(m_a, tl.max(za, axis=1))
        s_a = s_a * tl.exp(m_a - new) + tl.sum(tl.exp(za - new[:, None]), axis=1)
        m_a = new
        new = tl.maximum(m_b, tl.max(zb, axis=1))
        s_b = s_b * tl.exp(m_b - new) + tl.sum(tl.exp(zb - new[:, None]), axis=1)
        m_b = new

    # layout [4, n_splits, n_rows]
    plane = n_splits * n_rows
    out = pid_s * n_rows + rows
    tl.store(max_ptr + out, m_p, mask=row_ok)
    tl.store(sum_ptr + out, s_p, mask=row_ok)
    tl.store(max_ptr + plane + out, m_r, mask=row_ok)
    tl.store(sum_ptr + plane + out, s_r, mask=row_ok)
    tl.store(max_ptr + 2 * plane + out, m_a, mask=row_ok)
    tl.store(sum_ptr + 2 * plane + out, s_a, mask=row_ok)
    tl.store(max_ptr + 3 * plane + out, m_b, mask=row_ok)
    tl.store(sum_ptr + 3 * plane + out, s_b, mask=row_ok)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _block_sizes(dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_V, BLOCK_D, num_warps); overridable with EDPO_TRITON_BLOCKS="M,V,D"."""
    override = os.environ.get("EDPO_TRITON_BLOCKS")
    if override:
        bm, bv, bd = (int(x) for x in override.split(","))
        return bm, bv, bd, 8
    if _interpreting():
        return 64, 256, 64, 4  # large blocks: the interpreter's cost is per program and per loop iteration
    if dtype == torch.float32:
        return 64, 64, 32, 4
    return 64, 128, 64, 8


def triton_mix_lse(
    h: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    hr: torch.Tensor,
    wr: torch.Tensor,
    br: torch.Tensor | None,
    epsilon: float,
    transform: LogitTransform = IDENTITY,
    *,
    shared: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row statistics ``(max, log Σ exp(z − max))``, each fp32 ``[4, M]``, of z_θ, z_ref, (1+ε)z_θ−εz_ref and
    (1−ε)z_θ+εz_ref for rows of ``h``/``hr [M, d]``, with ``z = transform(W h + b)``."""
    n_rows, dim = h.shape
    vocab = w.shape[0]
    if n_rows == 0:
        empty = torch.empty(4, 0, dtype=torch.float32, device=h.device)
        return empty, empty.clone()
    h, hr, w, wr = h.contiguous(), hr.contiguous(), w.contiguous(), wr.contiguous()
    block_m, block_v, block_d, num_warps = _block_sizes(h.dtype)
    row_blocks = triton.cdiv(n_rows, block_m)
    if h.is_cuda:
        sms = torch.cuda.get_device_properties(h.device).multi_processor_count
        n_splits = max(1, min(triton.cdiv(vocab, block_v), triton.cdiv(2 * sms, row_blocks)))
    else:
        n_splits = 1
    cols_per_split = triton.cdiv(triton.cdiv(vocab, n_splits), block_v) * block_v
    n_splits = triton.cdiv(vocab, cols_per_split)
    part_max = torch.empty(4, n_splits, n_rows, dtype=torch.float32, device=h.device)
    part_sum = torch.empty_like(part_max)
    dot_fp32 = h.dtype == torch.float32 or w.dtype == torch.float32 or _interpreting()
    _mix_lse_partial_kernel[(row_blocks, n_splits)](
        h,
        w,
        b if b is not None else h,
        hr,
        wr,
        br if br is not None else h,
        part_max,
        part_sum,
        n_rows,
        vocab,
        dim,
        cols_per_split,
        float(epsilon),
        float(transform.scale),
        float(transform.softcap or 1.0),
        h.stride(0),
        w.stride(0),
        hr.stride(0),
        wr.stride(0),
        HAS_BIAS=b is not None,
        HAS_REF_BIAS=br is not None,
        SHARED_WEIGHT=shared,
        HAS_SCALE=transform.scale != 1.0,
        HAS_SOFTCAP=transform.softcap is not None,
        DOT_FP32=dot_fp32,
        BLOCK_M=block_m,
        BLOCK_V=block_v,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    top = part_max.amax(dim=1, keepdim=True)
    logsum = (part_sum * torch.exp(part_max - top)).sum(dim=1).log_()
    return top.squeeze(1), logsum
