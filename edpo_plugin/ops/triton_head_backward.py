"""Weight and bias gradients of the policy stream for a trainable head: a Triton kernel recomputes the logit
gradient ``G`` chunk by chunk and a tensor-core GEMM contracts it with the hidden states.

For a vocabulary chunk of ``C`` columns (host loop), :func:`_logit_grad_kernel` on a (token block × column tile)
grid recomputes ``z = T(H Wᵀ + b)`` from the forward's saved row statistics (same kernel arithmetic as the
forward: 1 matmul-equivalent over all chunks) and writes

    G[m, v] = g_m · (1[v = y_m] − exp((z − max_m) − log Σ_m)) · s·(1 − tanh²)      ([M, C], the input dtype)

Then ``grad_W[chunk] = Gᵀ H`` is one ``torch.mm`` on the input dtype (cuBLAS tensor cores with fp32 accumulation on
bf16/fp16; an fp32 GEMM only for fp32 inputs): each weight row finished and written once, no atomics and no fp32
``[V, d]`` buffer. On bf16/fp16 ``G`` is written as two input-dtype terms (hi, and the rounding error lo) and the
GEMM is ``[G_hi; G_lo]ᵀ [H; H]``: rounding ``G`` once, as Liger's and cut-cross-entropy's backward do, measured
4.0e-3 relative error on a bf16 case of tests/test_ops_parity.py (over the 2⁻⁸ bound the fp32 chunked path meets);
the second term costs one more matmul-equivalent. ``grad_b[chunk] = Σ_m G`` (fp32 column sums per token block,
then summed, from the unrounded ``G``).
The hidden gradient needs no backward pass at all: it is ``g ⊙ direction`` from the forward kernel
(:mod:`edpo_plugin.ops.triton_head_forward`).
A trainable head therefore costs 5 matmul-equivalents on fp32 inputs (3 in the forward, 2 here); on bf16/fp16 the
two-term dots make it 7 in tensor-core work (4 in the forward, 3 here), none of them an fp32 GEMM.

Memory: ``G`` is ``M × C`` (``2M × C`` two-term) in the input dtype, plus ``[H; H]``; ``C`` is chosen so ``G`` stays
under ``EDPO_TRITON_WORKSPACE_MIB`` (default 128 MiB).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from edpo_plugin.ops.transform import LogitTransform
from edpo_plugin.ops.triton_common import blocks_for, dot, interpreting, tanh


@triton.jit
def _logit_grad_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    g_ptr,
    max_ptr,
    logsum_ptr,
    out_ptr,
    bsum_ptr,
    n_rows,
    vocab,
    dim,
    col0,
    n_cols,
    scale,
    softcap,
    stride_h,
    stride_w,
    stride_out,
    stride_bsum,
    HAS_BIAS: tl.constexpr,
    BIAS_GRAD: tl.constexpr,
    TWO_TERM: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``out[m, v − col0] = dL/du[m, v]`` for ``v`` in ``[col0, col0 + n_cols)``, ``u = H Wᵀ + b`` (pre-transform),
    in ``out``'s dtype (with ``TWO_TERM`` as hi in rows ``[0, M)`` plus lo in rows ``[M, 2M)``); with ``BIAS_GRAD``
    also ``bsum[row block, v − col0] = Σ_rows dL/du`` in fp32."""
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = col0 + local
    col_ok = (local < n_cols) & (cols < vocab)
    z = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
    for k0 in range(0, dim, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        k_ok = ks < dim
        h = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        z = dot(h, tl.trans(w), z, IEEE, UPCAST)
    if HAS_BIAS:
        z += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_SCALE:
        z = z * scale
    if HAS_SOFTCAP:
        th = tanh(z / softcap)
        z = softcap * th
    row_max = tl.load(max_ptr + rows, mask=row_ok, other=0.0)
    row_logsum = tl.load(logsum_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    p = tl.exp((z - row_max[:, None]) - row_logsum[:, None])
    grad = tl.where(cols[None, :] == y[:, None], g[:, None], 0.0) - g[:, None] * p
    if HAS_SOFTCAP:
        grad = grad * (1.0 - th * th)
    if HAS_SCALE:
        grad = grad * scale
    mask = row_ok[:, None] & col_ok[None, :]
    if BIAS_GRAD:  # this row block's column sums, fp32, before any rounding
        tl.store(bsum_ptr + pid_m * stride_bsum + local, tl.sum(tl.where(mask, grad, 0.0), axis=0), mask=col_ok)
    hi = grad.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * stride_out + local[None, :], hi, mask=mask)
    if TWO_TERM:  # the rounding error as a second input-dtype term, in rows [n_rows, 2·n_rows)
        lo = (grad - hi.to(tl.float32)).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + (n_rows + rows[:, None]) * stride_out + local[None, :], lo, mask=mask)


def _chunk_columns(n_rows: int, vocab: int, elt: int, block_v: int) -> int:
    budget = int(os.environ.get("EDPO_TRITON_WORKSPACE_MIB", "128")) * 2**20
    cols = max(block_v, budget // max(1, n_rows * elt) // block_v * block_v)
    return min(cols, triton.cdiv(vocab, block_v) * block_v)


def triton_head_param_grads(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    y: torch.Tensor,
    row_max: torch.Tensor,
    row_logsum: torch.Tensor,
    g: torch.Tensor,
    transform: LogitTransform,
    want_weight: bool,
    want_bias: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``Σ_i g_i · log softmax(T(W h_i + b))[y_i]`` w.r.t. ``W [V, d]`` (weight's dtype) and ``b [V]``
    (bias's dtype), from ``h [M, d]``, ``y [M]``, the policy's ``row_max``/``row_logsum`` fp32 ``[M]`` and ``g`` fp32
    ``[M]``."""
    n_rows, dim = h.shape
    vocab = weight.shape[0]
    dev = h.device
    if n_rows == 0 or not (want_weight or want_bias):
        return (torch.zeros_like(weight) if want_weight else None), (torch.zeros_like(bias) if want_bias else None)
    grad_w = torch.empty_like(weight) if want_weight else None
    grad_b = torch.empty_like(bias) if want_bias else None
    common = torch.promote_types(h.dtype, weight.dtype)
    h = h.to(common).contiguous()
    w = weight.detach().contiguous()
    b = None if bias is None else bias.detach()
    blk = blocks_for("logit_grad", common, dev)
    two_term = common != torch.float32
    cols = _chunk_columns((2 if two_term else 1) * n_rows, vocab, h.element_size(), blk.block_v)
    # [G_hi; G_lo] against [H; H]: one GEMM, fp32 accumulation, one rounding of each weight-gradient entry
    buf = torch.empty((2 if two_term else 1) * n_rows, cols, dtype=common, device=dev)
    h_stack = torch.cat((h, h)) if two_term else h
    row_blocks = triton.cdiv(n_rows, blk.block_m)
    bsum = torch.empty(row_blocks, cols, dtype=torch.float32, device=dev) if want_bias else buf
    y32, g32 = y.to(torch.int32).contiguous(), g.float().contiguous()
    row_max, row_logsum = row_max.float().contiguous(), row_logsum.float().contiguous()
    ieee = common == torch.float32
    for col0 in range(0, vocab, cols):
        width = min(cols, vocab - col0)
        _logit_grad_kernel[(row_blocks, triton.cdiv(width, blk.block_v))](
            h, w, b if b is not None else h, y32, g32, row_max, row_logsum, buf, bsum, n_rows, vocab, dim, col0,
            width, float(transform.scale), float(transform.softcap or 1.0), h.stride(0), w.stride(0), buf.stride(0),
            bsum.stride(0), HAS_BIAS=b is not None, BIAS_GRAD=want_bias, TWO_TERM=two_term,
            HAS_SCALE=transform.scale != 1.0, HAS_SOFTCAP=transform.softcap is not None,
            IEEE=ieee, UPCAST=interpreting() and not ieee,
            BLOCK_M=blk.block_m, BLOCK_V=blk.block_v, BLOCK_D=blk.block_d,
            num_warps=blk.num_warps, num_stages=blk.num_stages,
        )  # fmt: skip
        grad_chunk = buf[:, :width]
        if grad_w is not None:
            # [width, 2M] @ [2M, d] on the input dtype: tensor cores with fp32 accumulation, one rounding per entry
            grad_w[col0 : col0 + width] = torch.mm(grad_chunk.t(), h_stack).to(grad_w.dtype)
        if grad_b is not None:
            grad_b[col0 : col0 + width] = bsum[:, :width].sum(0).to(grad_b.dtype)
    return grad_w, grad_b
