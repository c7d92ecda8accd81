"""The policy's hidden-state direction from final row statistics: the two-kernel alternative to the fused forward.

Selected with ``EDPO_TRITON_DIRECTION=two_pass`` (default ``fused``): the head-forward kernel then runs without its
direction step (statistics and targets only, 2 matmul-equivalents) and :func:`_direction_kernel` follows on a
(token block × vocabulary split) grid. Knowing each row's final ``(max, log Σ)`` it needs no online rescaling and
no reference logits, so its tiles can be wider: per ``BLOCK_V`` tile it recomputes ``z_θ = T(H Wᵀ + b)``
(1 matmul-equivalent), forms ``P ⊙ J = exp((z − max) − log Σ)·(1 − tanh²)`` and adds ``(P ⊙ J) W`` to the fp32
workspace ``[splits, M, d]`` in ``BLOCK_D`` chunks (1 more, two-term on bf16/fp16 as in the fused kernel). The
direction epilogue of :mod:`edpo_plugin.ops.triton_head_forward` then sums the splits and adds the target term.

One matmul-equivalent more than the fused kernel (4 useful, 5 in tensor-core work on bf16/fp16) for
``BLOCK_V_fused / BLOCK_V`` of its read-modify-write traffic (``8·M·d·⌈V/BLOCK_V⌉`` bytes): which wins is a GPU
measurement (``scripts/bench_head.py --gpu-suite`` times both).
"""

from __future__ import annotations

import triton
import triton.language as tl

from edpo_plugin.ops.triton_common import dot, tanh


@triton.jit
def _direction_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    max_ptr,
    logsum_ptr,
    acc_ptr,
    n_rows,
    vocab,
    dim,
    cols_per_split,
    split_stride,
    scale,
    softcap,
    stride_h,
    stride_w,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``acc[split, rows] += Σ_{v in split} softmax(z_θ)_v·(1 − tanh²_v)·W_v`` (fp32 ``[splits, M, dim]``, zeroed),
    from the policy's final ``max``/``logsum`` fp32 ``[M]``."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    v_start = pid_s * cols_per_split
    v_end = tl.minimum(v_start + cols_per_split, vocab)
    acc_base = acc_ptr + pid_s.to(tl.int64) * split_stride
    row_max = tl.load(max_ptr + rows, mask=row_ok, other=0.0)
    row_logsum = tl.load(logsum_ptr + rows, mask=row_ok, other=0.0)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        z = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
        for k0 in range(0, dim, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            k_ok = ks < dim
            h = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)  # fmt: skip
            w = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=col_ok[:, None] & k_ok[None, :],
                        other=0.0)  # fmt: skip
            z = dot(h, tl.trans(w), z, IEEE, UPCAST)
        if HAS_BIAS:
            z += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_SCALE:
            z = z * scale
        if HAS_SOFTCAP:
            th = tanh(z / softcap)
            z = softcap * th
        p = tl.exp((z - row_max[:, None]) - row_logsum[:, None])
        if HAS_SOFTCAP:
            p = p * (1.0 - th * th)
        p = tl.where(col_ok[None, :] & row_ok[:, None], p, 0.0)
        p_hi = p.to(w_ptr.dtype.element_ty)
        if not IEEE:
            p_lo = (p - p_hi.to(tl.float32)).to(w_ptr.dtype.element_ty)
        for k0 in range(0, dim, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            k_ok = ks < dim
            w = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=col_ok[:, None] & k_ok[None, :],
                        other=0.0)  # fmt: skip
            a_ptrs = acc_base + rows[:, None] * dim + ks[None, :]
            amask = row_ok[:, None] & k_ok[None, :]
            a = tl.load(a_ptrs, mask=amask, other=0.0)
            a = dot(p_hi, w, a, IEEE, UPCAST)
            if not IEEE:
                a = dot(p_lo, w, a, IEEE, UPCAST)
            tl.store(a_ptrs, a, mask=amask)
