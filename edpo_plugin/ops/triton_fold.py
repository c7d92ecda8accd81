"""The engine's per-tile folds as Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``).

- :func:`fold_triton` is :func:`edpo_plugin.ops.engine.fold_torch` in one launch. Each program owns ``BLOCK_M``
  rows of the tile and sweeps its columns once, ``BLOCK_N`` at a time: bias, transform and the ε-mixes in registers
  from the two fp32 pre-logit planes, an online ``(max, Σ exp)`` per stream, and (when the plan keeps them) the
  policy's ``P = exp(z − r)·J`` against the row's reference ``r`` *as it stood before the tile*. ``r`` moves only
  when the tile's maximum passes ``r + τ`` (or ``r`` is still ``-inf``); for those rows alone a second, masked pass
  rewrites ``P`` against the new ``r`` and rescales the row of the direction accumulator by ``exp(r_old − r_new)``.
  ``τ`` keeps ``P ≤ e^τ`` inside the ``P`` dtype's range (:func:`edpo_plugin.ops.plan.lazy_tau`). HBM traffic per
  tile: the two planes read once, ``P`` written once, ``O(rows)`` statistics, plus the moved rows.
- :func:`grad_fold_triton`: ``dL/du`` from the recomputed policy pre-logits (one elementwise pass); the target
  column is found from the global target id and the tile's first column (no per-tile index tensors).
- :func:`grad_fold_probs_triton`: ``dL/du`` in place from the ``P`` the forward kept, with the target column's
  ``1 − p_y`` taken from the exact fp32 target logit.

Offsets are int64 (a tile's ``rows · cols`` and a plane's stride may pass 2³¹ on large chunks). Block sizes come
from :func:`edpo_plugin.ops.plan.fold_blocks`.

Imports torch and triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from edpo_plugin.ops.engine import HeadOperands, RunningStats, Sweep, Targets
from edpo_plugin.ops.plan import fold_blocks, interpreting, lazy_tau
from edpo_plugin.ops.transform import LogitTransform


@triton.jit
def _tanh(x):
    """fp32 tanh from one exp: sign(x)·(1 − e^{−2|x|}) / (1 + e^{−2|x|}) (no overflow for any x)."""
    t = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def _one_minus_exp(x):
    """``1 − e^x`` for ``x ≤ 0`` without cancellation near 0 (``−expm1``): a cubic below 1e-3 (error ≤ x⁴/24)."""
    return tl.where(x > -1e-3, -x * (1.0 + x * (0.5 + x / 6.0)), 1.0 - tl.exp(x))


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
def _online(m, s, x):
    """Rows' ``(max, Σ exp(· − max))`` after one more block ``x`` whose masked entries are ``-inf``."""
    m_new = tl.maximum(m, tl.max(x, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no column yet (out-of-range rows)
    return m_new, s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), 1)


@triton.jit
def _merge(max_ptr, sum_ptr, offs, rmask, m, s):
    """Merge a tile's ``(m, s)`` into the running state at ``offs``; returns the new maximum."""
    old = tl.load(max_ptr + offs, mask=rmask, other=float("-inf"))
    new = tl.maximum(old, m)
    new_safe = tl.where(new == float("-inf"), 0.0, new)
    total = tl.load(sum_ptr + offs, mask=rmask, other=0.0) * tl.exp(old - new_safe) + s * tl.exp(m - new_safe)
    tl.store(max_ptr + offs, new, mask=rmask)
    tl.store(sum_ptr + offs, total, mask=rmask)
    return new


@triton.jit
def _fold_kernel(
    z_ptr, plane_stride, row_stride, bp_ptr, br_ptr, max_ptr, sum_ptr, stat_stride,
    r_in_ptr, r_out_ptr, p_ptr, p_row_stride, d_ptr, d_row_stride, dim,
    rows, cols, epsilon, scale, softcap, tau,
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    WITH_P: tl.constexpr, WITH_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    neg_inf = float("-inf")
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = r < rows
    r64 = r.to(tl.int64)
    row_off = r64 * row_stride
    zr_ptr = z_ptr + plane_stride
    p_off = r64 * p_row_stride
    if WITH_P:
        ref = tl.load(r_in_ptr + r, mask=rmask, other=0.0)
    else:
        ref = tl.zeros((BLOCK_M,), tl.float32)
    ref_ok = ref > neg_inf

    m0 = tl.full((BLOCK_M,), neg_inf, tl.float32)
    m1 = tl.full((BLOCK_M,), neg_inf, tl.float32)
    m2 = tl.full((BLOCK_M,), neg_inf, tl.float32)
    m3 = tl.full((BLOCK_M,), neg_inf, tl.float32)
    s0 = tl.zeros((BLOCK_M,), tl.float32)
    s1 = tl.zeros((BLOCK_M,), tl.float32)
    s2 = tl.zeros((BLOCK_M,), tl.float32)
    s3 = tl.zeros((BLOCK_M,), tl.float32)
    for c0 in range(0, cols, BLOCK_N):
        c = c0 + tl.arange(0, BLOCK_N)
        cmask = c < cols
        mask = rmask[:, None] & cmask[None, :]
        offs = row_off[:, None] + c[None, :]
        zp = _transformed(z_ptr, offs, mask, bp_ptr, c, cmask, scale, softcap, HAS_BIAS, HAS_SCALE, HAS_SOFTCAP)
        zr = _transformed(zr_ptr, offs, mask, br_ptr, c, cmask, scale, softcap, HAS_REF_BIAS, HAS_SCALE,
                          HAS_SOFTCAP)  # fmt: skip
        delta = (zp - zr) * epsilon
        # the row maximum is over this tile's real columns only: masked loads read 0, not -inf
        m0, s0 = _online(m0, s0, tl.where(mask, zp, neg_inf))
        m1, s1 = _online(m1, s1, tl.where(mask, zr, neg_inf))
        m2, s2 = _online(m2, s2, tl.where(mask, zp + delta, neg_inf))
        m3, s3 = _online(m3, s3, tl.where(mask, zp - delta, neg_inf))
        if WITH_P:  # a row that ends up above ref + τ is rewritten below: clamp its first try, never inf
            e = tl.exp(tl.minimum(zp - ref[:, None], tau))
            if HAS_SOFTCAP:
                t = zp / softcap
                e = e * ((1.0 - t * t) * scale)
            tl.store(p_ptr + p_off[:, None] + c[None, :], e.to(p_ptr.dtype.element_ty), mask=mask & ref_ok[:, None])

    n0 = _merge(max_ptr, sum_ptr, r, rmask, m0, s0)
    _merge(max_ptr, sum_ptr, r + stat_stride, rmask, m1, s1)
    _merge(max_ptr, sum_ptr, r + 2 * stat_stride, rmask, m2, s2)
    _merge(max_ptr, sum_ptr, r + 3 * stat_stride, rmask, m3, s3)

    if WITH_P:
        redo = rmask & ((n0 > ref + tau) | (ref == neg_inf))
        new_ref = tl.where(redo, n0, ref)
        tl.store(r_out_ptr + r, new_ref, mask=rmask)
        if tl.max(redo.to(tl.int32), 0) > 0:  # the reference moved for some rows: their P again, their D rescaled
            for c0 in range(0, cols, BLOCK_N):
                c = c0 + tl.arange(0, BLOCK_N)
                cmask = c < cols
                mask = redo[:, None] & cmask[None, :]
                zp = _transformed(z_ptr, row_off[:, None] + c[None, :], mask, bp_ptr, c, cmask, scale, softcap,
                                  HAS_BIAS, HAS_SCALE, HAS_SOFTCAP)  # fmt: skip
                e = tl.exp(zp - new_ref[:, None])
                if HAS_SOFTCAP:
                    t = zp / softcap
                    e = e * ((1.0 - t * t) * scale)
                tl.store(p_ptr + p_off[:, None] + c[None, :], e.to(p_ptr.dtype.element_ty), mask=mask)
            if WITH_D:
                moved = redo & ref_ok
                alpha = tl.exp(ref - new_ref)
                d_off = r64 * d_row_stride
                for k0 in range(0, dim, BLOCK_N):
                    k = k0 + tl.arange(0, BLOCK_N)
                    dmask = moved[:, None] & (k < dim)[None, :]
                    ptrs = d_ptr + d_off[:, None] + k[None, :]
                    tl.store(ptrs, tl.load(ptrs, mask=dmask, other=0.0) * alpha[:, None], mask=dmask)


def fold_triton(
    z: torch.Tensor,
    b_p: torch.Tensor | None,
    b_r: torch.Tensor | None,
    stats: RunningStats,
    epsilon: float,
    transform: LogitTransform,
    p_out: torch.Tensor | None,
    r_in: torch.Tensor | None,
    r_out: torch.Tensor | None,
    direction: torch.Tensor | None,
) -> None:
    """:func:`edpo_plugin.ops.engine.fold_torch` as one Triton launch (reads planes 0 and 1 of ``z`` only; the
    reference of ``P`` moves lazily, see the module docstring)."""
    _, rows, cols = z.shape
    if z.stride(2) != 1 or stats.max.stride(1) != 1 or stats.max.stride(0) != stats.sum.stride(0):
        raise ValueError("fold_triton needs row-major tile planes and [4, rows] statistics with unit row stride.")
    with_p = p_out is not None
    with_d = direction is not None
    block_m, block_n, warps = fold_blocks("fold", cols, interpreting() or not z.is_cuda)
    cap = transform.softcap
    tau = lazy_tau(p_out.dtype, transform) if with_p else 0.0
    _fold_kernel[(triton.cdiv(rows, block_m),)](
        z, z.stride(0), z.stride(1), z if b_p is None else b_p, z if b_r is None else b_r, stats.max, stats.sum,
        stats.max.stride(0), r_in if with_p else z, r_out if with_p else z, p_out if with_p else z,
        p_out.stride(0) if with_p else 0, direction if with_d else z, direction.stride(0) if with_d else 0,
        direction.shape[1] if with_d else 0, rows, cols, float(epsilon), float(transform.scale), float(cap or 1.0),
        float(tau), HAS_BIAS=b_p is not None, HAS_REF_BIAS=b_r is not None, HAS_SCALE=transform.scale != 1.0,
        HAS_SOFTCAP=cap is not None, WITH_P=with_p, WITH_D=with_d, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=warps,
    )  # fmt: skip


@triton.jit
def _grad_fold_kernel(
    u_ptr, u_row_stride, b_ptr, y_ptr, v0, max_ptr, logsum_ptr, g_ptr, out_ptr, out_row_stride, rows, cols, scale,
    softcap, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr,
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
    target = tl.load(y_ptr + r, mask=rmask, other=-1) - v0  # outside [0, cols): the target is in another tile
    grad = -g[:, None] * tl.exp((z - row_max[:, None]) - row_logsum[:, None])
    grad = tl.where(c[None, :] == target[:, None], grad + g[:, None], grad)
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
    y: torch.Tensor,
    v0: int,
    row_max: torch.Tensor,
    row_logsum: torch.Tensor,
    g: torch.Tensor,
    transform: LogitTransform,
    out: torch.Tensor,
) -> torch.Tensor:
    """:func:`edpo_plugin.ops.engine.grad_fold_torch` as one Triton launch into ``out`` (``u`` is only read)."""
    rows, cols = u.shape
    block_m, block_n, warps = fold_blocks("grad_fold", cols, interpreting() or not u.is_cuda)
    cap = transform.softcap
    grid = (triton.cdiv(rows, block_m), triton.cdiv(cols, block_n))
    _grad_fold_kernel[grid](
        u, u.stride(0), u if b is None else b, y, int(v0), row_max, row_logsum, g, out, out.stride(0), rows, cols,
        float(transform.scale), float(cap or 1.0), HAS_BIAS=b is not None, HAS_SCALE=transform.scale != 1.0,
        HAS_SOFTCAP=cap is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )  # fmt: skip
    return out


@triton.jit
def _grad_probs_kernel(
    p_ptr, p_row_stride, pref_ptr, y_ptr, v0, max_ptr, logsum_ptr, zy_ptr, g_ptr, rows, cols, scale, softcap,
    HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = r < rows
    mask = rmask[:, None] & (c < cols)[None, :]
    row_max = tl.load(max_ptr + r, mask=rmask, other=0.0)
    row_logsum = tl.load(logsum_ptr + r, mask=rmask, other=0.0)
    g = tl.load(g_ptr + r, mask=rmask, other=0.0)
    coef = -g * tl.exp((tl.load(pref_ptr + r, mask=rmask, other=0.0) - row_max) - row_logsum)
    z_y = tl.load(zy_ptr + r, mask=rmask, other=0.0)
    if HAS_SOFTCAP:  # P holds J already; the target's own slope from its exact logit
        t = z_y / softcap
        slope_y = (1.0 - t * t) * scale
    else:
        slope_y = scale
        if HAS_SCALE:
            coef = coef * scale
    exact = g * slope_y * _one_minus_exp((z_y - row_max) - row_logsum)
    target = tl.load(y_ptr + r, mask=rmask, other=-1) - v0
    offs = r.to(tl.int64)[:, None] * p_row_stride + c[None, :]
    grad = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32) * coef[:, None]
    grad = tl.where(c[None, :] == target[:, None], exact[:, None], grad)
    tl.store(p_ptr + offs, grad.to(p_ptr.dtype.element_ty), mask=mask)


def grad_fold_probs_triton(
    p: torch.Tensor,
    p_ref: torch.Tensor,
    y: torch.Tensor,
    v0: int,
    row_max: torch.Tensor,
    row_logsum: torch.Tensor,
    target_logit: torch.Tensor,
    g: torch.Tensor,
    transform: LogitTransform,
) -> torch.Tensor:
    """:func:`edpo_plugin.ops.engine.grad_fold_probs_torch` as one Triton launch (``p`` overwritten in place)."""
    rows, cols = p.shape
    if p.stride(1) != 1:
        raise ValueError("grad_fold_probs_triton needs P tiles with unit column stride.")
    block_m, block_n, warps = fold_blocks("grad_fold", cols, interpreting() or not p.is_cuda)
    cap = transform.softcap
    grid = (triton.cdiv(rows, block_m), triton.cdiv(cols, block_n))
    _grad_probs_kernel[grid](
        p, p.stride(0), p_ref, y, int(v0), row_max, row_logsum, target_logit, g, rows, cols, float(transform.scale),
        float(cap or 1.0), HAS_SCALE=transform.scale != 1.0, HAS_SOFTCAP=cap is not None, BLOCK_M=block_m,
        BLOCK_N=block_n, num_warps=warps,
    )  # fmt: skip
    return p


@triton.jit
def _target_kernel(
    h_ptr, h_row_stride, w_ptr, w_row_stride, y_ptr, b_ptr, out_ptr, rows, dim, scale, softcap,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = r < rows
    y = tl.load(y_ptr + r, mask=rmask, other=0).to(tl.int64)
    h_off = r.to(tl.int64) * h_row_stride
    w_off = y * w_row_stride
    acc = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, dim, BLOCK_D):
        k = k0 + tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (k < dim)[None, :]
        hv = tl.load(h_ptr + h_off[:, None] + k[None, :], mask=mask, other=0.0).to(tl.float32)
        wv = tl.load(w_ptr + w_off[:, None] + k[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(hv * wv, 1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + y, mask=rmask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        acc = acc * scale
    if HAS_SOFTCAP:
        acc = _tanh(acc / softcap) * softcap
    tl.store(out_ptr + r, acc, mask=rmask)


def target_logits_triton(
    h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor, transform: LogitTransform
) -> torch.Tensor:
    """fp32 ``[M]``: ``T(w[y_i] · h_i + b[y_i])``, the rows of ``w`` read in place (no gathered copy), products and
    sum in fp32."""
    rows, dim = h.shape
    out = torch.empty(rows, dtype=torch.float32, device=h.device)
    if h.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError("target_logits_triton needs row-major hidden states and weight.")
    block_m, block_d, warps = fold_blocks("targets", dim, interpreting() or not h.is_cuda)
    cap = transform.softcap
    _target_kernel[(triton.cdiv(rows, block_m),)](
        h, h.stride(0), w, w.stride(0), y, h if b is None else b, out, rows, dim, float(transform.scale),
        float(cap or 1.0), HAS_BIAS=b is not None, HAS_SCALE=transform.scale != 1.0, HAS_SOFTCAP=cap is not None,
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip
    return out


@triton.jit
def _finish_kernel(
    d_ptr, d_row_stride, w_ptr, w_row_stride, y_ptr, vocab, ref_ptr, max_ptr, logsum_ptr, zy_ptr, rows, dim, scale,
    softcap, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = r < rows
    mask = rmask[:, None] & (k < dim)[None, :]
    coef = tl.exp((tl.load(ref_ptr + r, mask=rmask, other=0.0) - tl.load(max_ptr + r, mask=rmask, other=0.0))
                  - tl.load(logsum_ptr + r, mask=rmask, other=0.0))  # fmt: skip
    y = tl.load(y_ptr + r, mask=rmask, other=-1)
    owned = rmask & (y >= 0) & (y < vocab)  # on a vocabulary shard, another rank adds this row's target term
    if HAS_SOFTCAP:
        t = tl.load(zy_ptr + r, mask=rmask, other=0.0) / softcap
        j_y = (1.0 - t * t) * scale
    else:
        j_y = tl.full((BLOCK_M,), 1.0, tl.float32)
    offs = r.to(tl.int64)[:, None] * d_row_stride + k[None, :]
    dv = tl.load(d_ptr + offs, mask=mask, other=0.0)
    wv = tl.load(w_ptr + y.to(tl.int64)[:, None] * w_row_stride + k[None, :], mask=owned[:, None] & mask, other=0.0)
    out = j_y[:, None] * wv.to(tl.float32) - coef[:, None] * dv
    if not HAS_SOFTCAP and HAS_SCALE:
        out = out * scale
    tl.store(d_ptr + offs, out, mask=mask)


def direction_finish_triton(
    direction: torch.Tensor,
    ref_max: torch.Tensor,
    row_max: torch.Tensor,
    row_logsum: torch.Tensor,
    w: torch.Tensor,
    y: torch.Tensor,
    target_logit: torch.Tensor,
    transform: LogitTransform,
) -> torch.Tensor:
    """:func:`edpo_plugin.ops.engine.direction_from` in one pass, in place: ``D ← J_y W[y] − D·exp(r − max − log Σ)``
    (times the scale without a cap); rows whose target ``y`` lies outside ``[0, V)`` get no target term."""
    rows, dim = direction.shape
    block_m, block_d, warps = fold_blocks("finish", dim, interpreting() or not direction.is_cuda)
    cap = transform.softcap
    grid = (triton.cdiv(rows, block_m), triton.cdiv(dim, block_d))
    _finish_kernel[grid](
        direction, direction.stride(0), w, w.stride(0), y, w.shape[0], ref_max, row_max, row_logsum, target_logit,
        rows, dim, float(transform.scale), float(cap or 1.0), HAS_SCALE=transform.scale != 1.0,
        HAS_SOFTCAP=cap is not None, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip
    return direction


def targets_triton(policy: HeadOperands, ref: HeadOperands, y: torch.Tensor, transform: LogitTransform) -> Targets:
    """:func:`edpo_plugin.ops.engine.gather_targets` by two Triton launches (no gathered rows: the direction's
    target term is read from ``W`` by :func:`finish_triton`)."""
    return Targets(target_logits_triton(policy.h, policy.w, policy.b, y, transform),
                   target_logits_triton(ref.h, ref.w, ref.b, y, transform), None)  # fmt: skip


def finish_triton(sweep: Sweep, row_max: torch.Tensor, row_logsum: torch.Tensor, w: torch.Tensor, y: torch.Tensor,
                  target_logit: torch.Tensor, targets: Targets, transform: LogitTransform,
                  owned: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """:func:`edpo_plugin.ops.engine.direction_from` by one Triton launch (``y``: every row's target id in ``w``,
    outside ``[0, V)`` where another shard holds it; ``target_logit``: every row's policy target logit)."""
    return direction_finish_triton(sweep.direction, sweep.ref_max, row_max, row_logsum, w, y, target_logit, transform)
