"""The ε-DPO head's forward in one Triton kernel: four online logsumexps, the target logits and, for the policy,
the hidden-state gradient direction ``d log p / dh``, FlashAttention-style.

Grid: (token blocks of ``BLOCK_M`` rows) × (vocabulary splits). Each program sweeps its split in ``BLOCK_V``
tiles. Per tile, for rows ``H [BLOCK_M, d]`` and columns ``W [BLOCK_V, d]``:

1. ``z_θ = T(H Wᵀ + b)`` and ``z_ref = T(H_ref W_refᵀ + b_ref)`` (``T`` the model's scale and soft cap; one ``W``
   tile for both when the head is shared): 2 matmul-equivalents over the whole sweep (1 + 1 sharing the tile).
2. The mixes ``z_θ ± ε(z_θ − z_ref)``, and a running ``(max, Σ exp)`` for each of the four streams, fp32.
3. The target logits ``z_θ[y]``, ``z_ref[y]`` picked from the tile that holds ``y`` (same arithmetic as the
   statistics).
4. With ``WITH_DIRECTION``: ``A ← A·exp(m_old − m_new) + (P ⊙ J) W`` where ``P = exp(z_θ − m_new)`` and ``J`` the
   soft cap's slope ``1 − tanh²`` (1 without a cap). ``A [BLOCK_M, d]`` does not fit in registers for d = 4096, so
   it lives in a global fp32 workspace ``[splits, M, d]`` and is read-modified-written in ``BLOCK_D`` chunks
   (memory-efficient attention's large-head-dim scheme): 1 more matmul-equivalent, 3 in all. On bf16/fp16 inputs
   ``P ⊙ J`` enters the tensor-core dot as two input-dtype terms (hi + lo, ~2⁻¹⁶ relative) instead of one rounded
   term: FlashAttention's single rounding of P costs 2⁻⁹ per weight, which over a small vocabulary does not average
   out and pushed the bf16 hidden gradient past the 2⁻⁸ parity bound. The second dot doubles this step's
   tensor-core work, not its memory traffic (the read-modify-write below dominates).

Then :func:`_direction_epilogue_kernel` merges the splits' ``A`` with their policy statistics and adds the target
term: ``direction = s·(J_y W[y] − Σ_s e^{m_s − m} A_s / Σ_s e^{m_s − m} l_s)`` (``s`` the scale), written over split
0's workspace, fp32 ``[M, d]``. The four streams' statistics are merged in PyTorch (``[4, splits, M]``, tiny).

Workspace: ``splits × M × d`` fp32 (split 0 is the returned direction), splits capped by ``EDPO_TRITON_WORKSPACE_MIB``
(default 128 MiB beyond the direction). HBM traffic of the read-modify-write: ``8·M·d·⌈V/BLOCK_V⌉`` bytes, the
expected bottleneck at d = 4096 (docs/benchmarks.md); ``EDPO_TRITON_DIRECTION=two_pass`` computes the direction in
a second kernel instead (:mod:`edpo_plugin.ops.triton_head_direction`: one more matmul-equivalent, a quarter of
the traffic). Which is faster has not been measured (no GPU yet).

Precision: see :mod:`edpo_plugin.ops.triton_common` (bf16/fp16: tensor-core dots, fp32 accumulation, P as a
hi + lo pair of input-dtype values; fp32: IEEE dots).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from edpo_plugin.ops.transform import LogitTransform
from edpo_plugin.ops.triton_common import blocks_for, dot, interpreting, tanh, vocab_splits


@triton.jit
def _head_forward_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    hr_ptr,
    wr_ptr,
    br_ptr,
    y_ptr,
    max_ptr,
    sum_ptr,
    tgt_ptr,
    acc_ptr,
    n_rows,
    vocab,
    dim,
    cols_per_split,
    split_stride,
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
    WITH_TARGETS: tl.constexpr,
    WITH_DIRECTION: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Partial statistics ``max/sum [4, splits, M]`` (fp32), targets ``tgt [2, M]`` (fp32, written by the split
    holding ``y``), direction workspace ``acc [splits, M, dim]`` (fp32, zero-initialised)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    v_start = pid_s * cols_per_split
    v_end = tl.minimum(v_start + cols_per_split, vocab)
    acc_base = acc_ptr + pid_s.to(tl.int64) * split_stride

    neg_inf = float("-inf")
    m_p = tl.full([BLOCK_M], neg_inf, tl.float32)
    m_r = tl.full([BLOCK_M], neg_inf, tl.float32)
    m_a = tl.full([BLOCK_M], neg_inf, tl.float32)
    m_b = tl.full([BLOCK_M], neg_inf, tl.float32)
    s_p = tl.zeros([BLOCK_M], tl.float32)
    s_r = tl.zeros([BLOCK_M], tl.float32)
    s_a = tl.zeros([BLOCK_M], tl.float32)
    s_b = tl.zeros([BLOCK_M], tl.float32)
    if WITH_TARGETS:
        y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
        t_p = tl.zeros([BLOCK_M], tl.float32)
        t_r = tl.zeros([BLOCK_M], tl.float32)

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
            z = dot(h, tl.trans(w), z, IEEE, UPCAST)
            zr = dot(hr, tl.trans(wr), zr, IEEE, UPCAST)
        if HAS_BIAS:
            z += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_REF_BIAS:
            zr += tl.load(br_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_SCALE:
            z = z * scale
            zr = zr * scale
        if HAS_SOFTCAP:
            th = tanh(z / softcap)
            z = softcap * th
            zr = softcap * tanh(zr / softcap)
        if WITH_TARGETS:
            hit = cols[None, :] == y[:, None]
            t_p += tl.sum(tl.where(hit, z, 0.0), axis=1)
            t_r += tl.sum(tl.where(hit, zr, 0.0), axis=1)
        delta = (z - zr) * epsilon
        za = z + delta  # (1+ε)z_θ − εz_ref, as a correction to z_θ (see chunked.mix_streams)
        zb = z - delta  # (1−ε)z_θ + εz_ref
        keep = col_ok[None, :]
        z = tl.where(keep, z, neg_inf)
        zr = tl.where(keep, zr, neg_inf)
        za = tl.where(keep, za, neg_inf)
        zb = tl.where(keep, zb, neg_inf)

        new = tl.maximum(m_p, tl.max(z, axis=1))
        alpha = tl.exp(m_p - new)
        p = tl.exp(z - new[:, None])
        s_p = s_p * alpha + tl.sum(p, axis=1)
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

        if WITH_DIRECTION:
            if HAS_SOFTCAP:
                p = p * (1.0 - th * th)
            # P as an unevaluated sum of two input-dtype values: tensor-core dots that keep P to ~2⁻¹⁶ relative
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
                a = dot(p_hi, w, a * alpha[:, None], IEEE, UPCAST)
                if not IEEE:
                    a = dot(p_lo, w, a, IEEE, UPCAST)
                tl.store(a_ptrs, a, mask=amask)

    # statistics layout [4, n_splits, n_rows]
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
    if WITH_TARGETS:
        mine = row_ok & (y >= v_start) & (y < v_end)
        tl.store(tgt_ptr + rows, t_p, mask=mine)
        tl.store(tgt_ptr + n_rows + rows, t_r, mask=mine)


@triton.jit
def _direction_epilogue_kernel(
    acc_ptr,
    max_ptr,
    sum_ptr,
    tgt_ptr,
    y_ptr,
    w_ptr,
    n_rows,
    dim,
    n_splits,
    split_stride,
    scale,
    softcap,
    stride_w,
    HAS_SOFTCAP: tl.constexpr,
    NORMALISED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``acc[0] ← s·(J_y W[y] − Σ_s e^{m_s−m} acc[s] / Σ_s e^{m_s−m} l_s)`` for a (row block × feature block) tile;
    ``max/sum`` are the policy plane ``[splits, M]``, ``acc [splits, M, dim]`` fp32. With ``NORMALISED`` (the
    two-pass direction) the splits' ``acc`` are already divided by the final sum: ``acc[0] ← s·(J_y W[y] − Σ_s
    acc[s])`` and ``max/sum`` are not read. Elementwise, no matmul."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    ks = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (ks < dim)[None, :]
    expect = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    offs = rows[:, None] * dim + ks[None, :]
    if NORMALISED:
        for s in range(0, n_splits):
            expect += tl.load(acc_ptr + s * split_stride + offs, mask=mask, other=0.0)
    else:
        top = tl.full([BLOCK_M], float("-inf"), tl.float32)
        for s in range(0, n_splits):
            top = tl.maximum(top, tl.load(max_ptr + s * n_rows + rows, mask=row_ok, other=0.0))
        total = tl.zeros([BLOCK_M], tl.float32)
        for s in range(0, n_splits):
            c = tl.exp(tl.load(max_ptr + s * n_rows + rows, mask=row_ok, other=0.0) - top)
            total += c * tl.load(sum_ptr + s * n_rows + rows, mask=row_ok, other=1.0)
            part = tl.load(acc_ptr + s * split_stride + offs, mask=mask, other=0.0)
            expect += c[:, None] * part
        expect = expect / total[:, None]
    y = tl.load(y_ptr + rows, mask=row_ok, other=0)
    w_y = tl.load(w_ptr + y[:, None] * stride_w + ks[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        t = tl.load(tgt_ptr + rows, mask=row_ok, other=0.0) / softcap
        w_y = w_y * (1.0 - t * t)[:, None]
    out = scale * (w_y - expect)
    tl.store(acc_ptr + offs, out, mask=mask)


class HeadForward(NamedTuple):
    """Per-row results for ``M`` rows: ``row_max``/``row_logsum`` fp32 ``[4, M]`` (z_θ, z_ref, z⁺, z⁻) as
    ``(max, log Σ exp(z − max))``; ``targets`` fp32 ``[2, M]`` (z_θ[y], z_ref[y]; NaN where ``y`` lies outside
    ``[0, V)``, e.g. a label on another vocabulary shard) or None; ``direction`` fp32 ``[M, d]`` =
    ``d log softmax(z_θ)[y] / dh`` or None."""

    row_max: torch.Tensor
    row_logsum: torch.Tensor
    targets: torch.Tensor | None
    direction: torch.Tensor | None


def direction_mode() -> str:
    """``"fused"`` (default: the direction inside the statistics kernel) or ``"two_pass"`` (statistics first, then
    :mod:`edpo_plugin.ops.triton_head_direction`), from ``EDPO_TRITON_DIRECTION``."""
    mode = os.environ.get("EDPO_TRITON_DIRECTION", "fused")
    if mode not in ("fused", "two_pass"):
        raise ValueError(f"EDPO_TRITON_DIRECTION must be 'fused' or 'two_pass', got {mode!r}.")
    return mode


def _workspace_cap(n_rows: int, dim: int) -> int:
    budget = int(os.environ.get("EDPO_TRITON_WORKSPACE_MIB", "128")) * 2**20
    return 1 + budget // max(1, n_rows * dim * 4)


def triton_head_forward(
    h: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    hr: torch.Tensor,
    wr: torch.Tensor,
    br: torch.Tensor | None,
    y: torch.Tensor | None,
    epsilon: float,
    transform: LogitTransform,
    *,
    shared: bool,
    with_direction: bool,
) -> HeadForward:
    """Statistics, targets (when ``y [M]`` is given) and direction (``with_direction``, needs ``y``) for rows of
    ``h``/``hr [M, d]`` against ``w``/``wr [V, d]`` (any float dtype; fp32 results)."""
    if with_direction and y is None:
        raise ValueError("with_direction needs the labels y.")
    n_rows, dim = h.shape
    vocab = w.shape[0]
    dev = h.device
    if n_rows == 0:
        empty = torch.empty(4, 0, dtype=torch.float32, device=dev)
        return HeadForward(
            empty,
            empty.clone(),
            None if y is None else torch.empty(2, 0, dtype=torch.float32, device=dev),
            torch.empty(0, dim, dtype=torch.float32, device=dev) if with_direction else None,
        )
    h, hr, w, wr = h.contiguous(), hr.contiguous(), w.contiguous(), wr.contiguous()
    two_pass = with_direction and direction_mode() == "two_pass"
    fused = with_direction and not two_pass
    blk = blocks_for("direction" if fused else "stats", h.dtype, dev)
    cap = _workspace_cap(n_rows, dim) if fused else triton.cdiv(vocab, blk.block_v)
    n_splits = vocab_splits(n_rows, vocab, blk.block_m, blk.block_v, dev, cap)
    cols_per_split = triton.cdiv(triton.cdiv(vocab, n_splits), blk.block_v) * blk.block_v
    n_splits = triton.cdiv(vocab, cols_per_split)
    part_max = torch.empty(4, n_splits, n_rows, dtype=torch.float32, device=dev)
    part_sum = torch.empty_like(part_max)
    # NaN until written: a label outside [0, V) leaves its target NaN instead of a silent garbage value
    targets = None if y is None else torch.full((2, n_rows), float("nan"), dtype=torch.float32, device=dev)
    acc = torch.zeros(n_splits, n_rows, dim, dtype=torch.float32, device=dev) if fused else None
    ieee = h.dtype == torch.float32 or w.dtype == torch.float32
    softcap = float(transform.softcap or 1.0)
    y32 = None if y is None else y.to(torch.int32).contiguous()
    _launch_forward(
        (triton.cdiv(n_rows, blk.block_m), n_splits),
        h, w, b if b is not None else h, hr, wr, br if br is not None else h, y32 if y32 is not None else h,
        part_max, part_sum, targets if targets is not None else part_max, acc if acc is not None else part_max,
        n_rows, vocab, dim, cols_per_split, n_rows * dim, float(epsilon), float(transform.scale), softcap,
        h.stride(0), w.stride(0), hr.stride(0), wr.stride(0),
        HAS_BIAS=b is not None, HAS_REF_BIAS=br is not None, SHARED_WEIGHT=shared,
        HAS_SCALE=transform.scale != 1.0, HAS_SOFTCAP=transform.softcap is not None,
        WITH_TARGETS=y is not None, WITH_DIRECTION=fused, IEEE=ieee, UPCAST=interpreting() and not ieee,
        BLOCK_M=blk.block_m, BLOCK_V=blk.block_v, BLOCK_D=blk.block_d,
        num_warps=blk.num_warps, num_stages=blk.num_stages,
    )  # fmt: skip
    top = part_max.amax(dim=1, keepdim=True)
    logsum = (part_sum * torch.exp(part_max - top)).sum(dim=1).log_()
    direction = None
    if two_pass:
        from edpo_plugin.ops.triton_head_direction import _direction_kernel

        dblk = blocks_for("direction2", h.dtype, dev)
        n_splits = vocab_splits(n_rows, vocab, dblk.block_m, dblk.block_v, dev, _workspace_cap(n_rows, dim))
        cols_per_split = triton.cdiv(triton.cdiv(vocab, n_splits), dblk.block_v) * dblk.block_v
        n_splits = triton.cdiv(vocab, cols_per_split)
        acc = torch.zeros(n_splits, n_rows, dim, dtype=torch.float32, device=dev)
        _direction_kernel[(triton.cdiv(n_rows, dblk.block_m), n_splits)](
            h, w, b if b is not None else h, top[0, 0].contiguous(), logsum[0].contiguous(), acc, n_rows, vocab, dim,
            cols_per_split, n_rows * dim, float(transform.scale), softcap, h.stride(0), w.stride(0),
            HAS_BIAS=b is not None, HAS_SCALE=transform.scale != 1.0, HAS_SOFTCAP=transform.softcap is not None,
            IEEE=ieee, UPCAST=interpreting() and not ieee,
            BLOCK_M=dblk.block_m, BLOCK_V=dblk.block_v, BLOCK_D=dblk.block_d,
            num_warps=dblk.num_warps, num_stages=dblk.num_stages,
        )  # fmt: skip
    if with_direction:
        eblk = blocks_for("epilogue", h.dtype, dev)
        _direction_epilogue_kernel[(triton.cdiv(n_rows, eblk.block_m), triton.cdiv(dim, eblk.block_d))](
            acc, part_max[0], part_sum[0], targets, y32, w, n_rows, dim, n_splits, n_rows * dim, float(transform.scale),
            softcap, w.stride(0), HAS_SOFTCAP=transform.softcap is not None, NORMALISED=two_pass,
            BLOCK_M=eblk.block_m, BLOCK_D=eblk.block_d, num_warps=eblk.num_warps,
        )  # fmt: skip
        direction = acc[0]
    return HeadForward(top.squeeze(1), logsum, targets, direction)


def _launch_forward(grid: tuple[int, int], *args, **kwargs) -> None:
    """The one launch of :func:`_head_forward_kernel` (a seam for the self-check's failure tests)."""
    _head_forward_kernel[grid](*args, **kwargs)
