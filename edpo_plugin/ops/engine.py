"""The tile engine every fused head runs on: token chunks × wide vocabulary tiles, GEMMs by the BLAS, one fold per tile.

For a chunk of ``rows`` completion tokens and a tile of ``cols`` vocabulary columns:

1. **GEMMs** (:func:`tile_logits`): the policy's and the reference's pre-logits ``H Wᵀ`` as fp32 ``[rows, cols]``,
   two calls of identical shape (never one over stacked rows: a GEMM's rounding can depend on a row's position, and
   a policy equal to its reference must give bit-identical logits). On CUDA with bf16/fp16 operands the GEMM reads
   the input dtype and writes fp32 (``torch.mm(..., out_dtype=torch.float32)``: tensor cores, fp32 accumulation);
   elsewhere the operands are upcast and multiplied in fp32.
2. **Fold** (a :data:`Fold`): bias and logit transform, both ε-mixes ``z_θ ± ε(z_θ − z_ref)``, and the online
   update of four running ``(max, Σ exp(z − max))`` rows; for a frozen head also the policy's softmax weights ``P``
   (times the soft cap's slope) relative to the new maximum and the rescale factor ``α = exp(max_old − max_new)``.
   :func:`fold_torch` is the PyTorch form; :mod:`edpo_plugin.ops.triton_fold` is one Triton kernel per tile.
3. **Direction** (frozen head only): ``D ← α·D + P W_tile`` with ``D`` the ``[rows, d]`` fp32 accumulator of
   ``Σ_v p_v J_v W_v``, rescaled once per wide tile.

Cost in matmul-equivalents (one = ``2·N·d·V`` flops): frozen head 3 (two logit GEMMs, one direction GEMM, and
backward only scales the saved ``[N, d]`` direction); trainable head 5 (two logit GEMMs forward; backward recomputes
the policy tile, then ``G W`` and ``Gᵀ H``). Memory: ``2·rows·cols`` fp32 logit tiles plus ``P`` and ``D``.

Row statistics are kept as ``(max, log Σ exp(z − max))`` and never added together, so a log-prob
``(z_y − max) − log Σ`` does not inherit the rounding of a large ``max + log Σ``.

Imports only torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from edpo_plugin.ops.transform import LogitTransform

__all__ = [
    "Fold",
    "GradFold",
    "HeadOperands",
    "RunningStats",
    "Tiles",
    "accumulate_product",
    "fold_torch",
    "grad_fold_torch",
    "mix_streams",
    "recompute_grads",
    "sweep_statistics",
    "target_logits",
    "target_term",
    "tensor_core_operands",
    "tile_logits",
]


class HeadOperands(NamedTuple):
    """One side of the head: hidden states ``h [M, d]``, ``lm_head`` weight ``w [V, d]``, bias ``b [V]`` or None."""

    h: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor | None


class Tiles(NamedTuple):
    """Loop shape: ``token_chunk`` rows per chunk, ``vocab_chunk`` vocabulary columns per tile."""

    token_chunk: int
    vocab_chunk: int


class RunningStats(NamedTuple):
    """Online log-sum-exp state of the four streams for one token chunk: fp32 ``[4, rows]`` each."""

    max: torch.Tensor
    sum: torch.Tensor

    @classmethod
    def empty(cls, rows: int, device: torch.device) -> RunningStats:
        return cls(
            torch.full((4, rows), float("-inf"), dtype=torch.float32, device=device),
            torch.zeros(4, rows, dtype=torch.float32, device=device),
        )


# fold(z [4, rows, cols], b_p, b_r, stats, epsilon, transform, p_dtype) -> (alpha [rows], P [rows, cols]) or None
Fold = Callable[
    [torch.Tensor, torch.Tensor | None, torch.Tensor | None, RunningStats, float, LogitTransform, torch.dtype | None],
    tuple[torch.Tensor, torch.Tensor] | None,
]  # fmt: skip
# grad_fold(u, b, y_tile, row_max, row_logsum, g, transform, out_dtype) -> dL/du [rows, cols]
GradFold = Callable[
    [torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, LogitTransform,
     torch.dtype],
    torch.Tensor,
]  # fmt: skip


def tensor_core_operands(t: torch.Tensor) -> bool:
    """True when GEMMs on ``t`` run on its own bf16/fp16 dtype with fp32 output (CUDA); else they upcast to fp32."""
    return t.device.type == "cuda" and t.dtype in (torch.bfloat16, torch.float16)


def gemm_operand(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a GEMM operand: itself on the tensor-core path, an fp32 copy (or itself if fp32) otherwise."""
    return t if tensor_core_operands(t) else t.float()


def tile_logits(x: torch.Tensor, w_tile: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 ``[rows, cols]`` = ``x [rows, d] @ w_tile [cols, d]ᵀ``, both operands as :func:`gemm_operand` gives them."""
    if tensor_core_operands(x):
        if out is None:
            return torch.mm(x, w_tile.t(), out_dtype=torch.float32)
        return torch.mm(x, w_tile.t(), out_dtype=torch.float32, out=out)
    return torch.mm(x, w_tile.t(), out=out)


def accumulate_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc += a @ b`` in place, ``acc`` fp32; bf16/fp16 ``a``, ``b`` on CUDA multiply on tensor cores."""
    if tensor_core_operands(a) and a.dtype == b.dtype:
        return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    return acc.addmm_(a.float(), b.float())


def mix_streams(
    z: torch.Tensor, z_ref: torch.Tensor, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(z_θ, z_ref, z⁺, z⁻)`` with ``z^± = z_θ ± ε(z_θ − z_ref)`` (= (1±ε)z_θ ∓ εz_ref), out of place.

    Written as a correction to ``z_θ`` so that ``z_θ == z_ref`` gives ``z⁺ == z⁻ == z_θ`` exactly: otherwise the
    decisions of a fresh adapter would be decided by rounding.
    """
    delta = (z - z_ref).mul_(epsilon)
    return z, z_ref, z + delta, z - delta


def target_logits(side: HeadOperands, y: torch.Tensor, transform: LogitTransform) -> torch.Tensor:
    """fp32 ``[M]``: ``T(w[y_i] · h_i + b[y_i])`` without any ``[M, V]`` tensor."""
    out = torch.einsum("md,md->m", side.h.float(), side.w.index_select(0, y).float())
    if side.b is not None:
        out = out + side.b.index_select(0, y).float()
    return transform.apply_(out)


def target_term(side: HeadOperands, y: torch.Tensor, transform: LogitTransform) -> torch.Tensor:
    """fp32 ``[M, d]``: ``J_y W[y]`` with a soft cap, plain ``W[y]`` otherwise (the constant scale is applied by the
    caller to the whole direction)."""
    rows = side.w.index_select(0, y).float()
    if transform.softcap is None:
        return rows
    return rows.mul_(transform.derivative(target_logits(side, y, transform)).unsqueeze(1))


def fold_torch(
    z: torch.Tensor,
    b_p: torch.Tensor | None,
    b_r: torch.Tensor | None,
    stats: RunningStats,
    epsilon: float,
    transform: LogitTransform,
    p_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One tile's fold in PyTorch; updates ``stats`` in place.

    ``z``: fp32 ``[4, rows, cols]`` whose planes 0 and 1 hold the policy's and the reference's pre-logits (all four
    planes are overwritten); ``b_p``, ``b_r``: the tile's biases. Returns ``(α [rows], P [rows, cols])``, ``P`` in
    ``p_dtype``, when ``p_dtype`` is given (frozen head), else None.
    """
    if b_p is not None:
        z[0].add_(b_p.float())
    if b_r is not None:
        z[1].add_(b_r.float())
    transform.apply_(z[:2])
    # z[2] = z_θ + ε(z_θ − z_ref) ; z[3] = z_θ − ε(z_θ − z_ref), as in mix_streams
    torch.sub(z[0], z[1], out=z[3]).mul_(epsilon)
    torch.add(z[0], z[3], out=z[2])
    torch.sub(z[0], z[3], out=z[3])
    slope = transform.derivative(z[0]) if p_dtype is not None and transform.softcap is not None else None
    new_max = torch.maximum(stats.max, z.amax(dim=2))
    z.sub_(new_max.unsqueeze(2)).exp_()
    rescale = torch.exp(stats.max - new_max)
    stats.sum.mul_(rescale).add_(z.sum(dim=2))
    stats.max.copy_(new_max)
    if p_dtype is None:
        return None
    weights = z[0] if slope is None else slope.mul_(z[0])
    return rescale[0], weights.to(p_dtype)


def sweep_statistics(
    policy: HeadOperands,
    ref: HeadOperands,
    y: torch.Tensor | None,
    epsilon: float,
    transform: LogitTransform,
    tiles: Tiles,
    keep_direction: bool,
    fold: Fold = fold_torch,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Row statistics ``(max, log Σ)``, each fp32 ``[4, M]``, of the four streams and, if asked, the policy's
    ``d log p / dh = J_y W[y] − Σ_v softmax(z)_v J_v W_v`` as fp32 ``[M, d]`` (without the ``J_y W[y]`` term when
    ``y`` is None: a vocabulary shard adds the rows it owns itself)."""
    h, w, b = policy
    n_valid, d = h.shape
    vocab = w.shape[0]
    device = h.device
    shared = ref.w is w
    row_max = torch.empty(4, n_valid, dtype=torch.float32, device=device)
    row_logsum = torch.empty(4, n_valid, dtype=torch.float32, device=device)
    direction = torch.empty(n_valid, d, dtype=torch.float32, device=device) if keep_direction else None
    p_dtype = (h.dtype if tensor_core_operands(h) else torch.float32) if keep_direction else None
    for m0 in range(0, n_valid, tiles.token_chunk):
        m1 = min(m0 + tiles.token_chunk, n_valid)
        x, xr = gemm_operand(h[m0:m1]), gemm_operand(ref.h[m0:m1])
        stats = RunningStats.empty(m1 - m0, device)
        expect = torch.zeros(m1 - m0, d, dtype=torch.float32, device=device) if keep_direction else None
        buf = None
        for v0 in range(0, vocab, tiles.vocab_chunk):
            v1 = min(v0 + tiles.vocab_chunk, vocab)
            if buf is None or buf.shape[2] != v1 - v0:
                buf = torch.empty(4, m1 - m0, v1 - v0, dtype=torch.float32, device=device)
            w_tile = gemm_operand(w[v0:v1])
            tile_logits(x, w_tile, out=buf[0])
            tile_logits(xr, w_tile if shared else gemm_operand(ref.w[v0:v1]), out=buf[1])
            folded = fold(buf, _tile(b, v0, v1), _tile(ref.b, v0, v1), stats, epsilon, transform, p_dtype)
            if expect is not None:
                alpha, weights = folded
                accumulate_product(expect.mul_(alpha.unsqueeze(1)), weights, w_tile)
        row_max[:, m0:m1] = stats.max
        row_logsum[:, m0:m1] = stats.sum.log()
        if direction is not None:
            expect.div_(stats.sum[0].unsqueeze(1))
            if y is None:
                torch.neg(expect, out=direction[m0:m1])
            else:
                chunk = HeadOperands(h[m0:m1], w, b)
                direction[m0:m1] = target_term(chunk, y[m0:m1], transform) - expect
            if transform.softcap is None:
                direction[m0:m1].mul_(transform.scale)
    return row_max, row_logsum, direction


def grad_fold_torch(
    u: torch.Tensor,
    b: torch.Tensor | None,
    y_tile: torch.Tensor,
    row_max: torch.Tensor,
    row_logsum: torch.Tensor,
    g: torch.Tensor,
    transform: LogitTransform,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``dL/du [rows, cols]`` in ``out_dtype`` for ``L = Σ_i g_i · log softmax(T(u_i + b))[y_i]`` on one tile.

    ``u``: fp32 pre-logits (overwritten); ``y_tile``: each row's target column in this tile, −1 if outside it;
    ``row_max``, ``row_logsum``: the rows' policy statistics; ``g``: fp32 upstream ``[rows]``.
    """
    if b is not None:
        u.add_(b.float())
    transform.apply_(u)
    slope = transform.derivative(u)
    # d/dz of g·(z[y] − lse) = g·(onehot(y) − softmax(z)); softmax as exp((z − max) − log Σ)
    grad = u.sub_(row_max.unsqueeze(1)).sub_(row_logsum.unsqueeze(1)).exp_().mul_(-g.unsqueeze(1))
    inside = y_tile >= 0  # no host sync: rows whose target lies elsewhere add 0 at column 0
    grad.scatter_add_(1, y_tile.clamp(min=0).unsqueeze(1), torch.where(inside, g, 0.0).unsqueeze(1))
    if not (isinstance(slope, float) and slope == 1.0):
        grad.mul_(slope)
    return grad.to(out_dtype)


def recompute_grads(
    policy: HeadOperands,
    y: torch.Tensor,
    row_max: torch.Tensor,
    row_logsum: torch.Tensor,
    g: torch.Tensor,
    transform: LogitTransform,
    tiles: Tiles,
    want: tuple[bool, bool, bool],
    grad_fold: GradFold = grad_fold_torch,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``Σ_i g_i · log softmax(T(W h_i + b))[y_i]`` w.r.t. ``(h, W, b)`` as asked by ``want``.

    ``y``: targets ``[M]`` (a vocabulary shard passes local ids; ids outside ``[0, V)`` belong to another shard).
    Vocabulary tiles outside, token chunks inside, so each weight-gradient tile is finished in fp32 and written once in
    the weight's dtype; the hidden gradient accumulates in fp32 ``[M, d]``. Per tile and chunk: one logit GEMM, then
    ``G W`` and ``Gᵀ H`` on the operands' dtype with fp32 accumulation.
    """
    h, weight, bias = policy
    want_hidden, want_weight, want_bias = want
    n_valid, d = h.shape
    vocab = weight.shape[0]
    w = weight.detach()
    x_all = gemm_operand(h)
    out_dtype = x_all.dtype
    grad_h = torch.zeros(n_valid, d, dtype=torch.float32, device=h.device) if want_hidden else None
    grad_w = torch.empty_like(w) if want_weight else None
    grad_b = torch.empty_like(bias) if want_bias else None
    for v0 in range(0, vocab, tiles.vocab_chunk):
        v1 = min(v0 + tiles.vocab_chunk, vocab)
        w_tile = gemm_operand(w[v0:v1])
        b_tile = _tile(None if bias is None else bias.detach(), v0, v1)
        gw_tile = torch.zeros(v1 - v0, d, dtype=torch.float32, device=h.device) if want_weight else None
        gb_tile = torch.zeros(v1 - v0, dtype=torch.float32, device=h.device) if want_bias else None
        for m0 in range(0, n_valid, tiles.token_chunk):
            m1 = min(m0 + tiles.token_chunk, n_valid)
            x = x_all[m0:m1]
            yc = y[m0:m1]
            y_tile = torch.where((yc >= v0) & (yc < v1), yc - v0, -1)
            grad_u = grad_fold(tile_logits(x, w_tile), b_tile, y_tile, row_max[m0:m1], row_logsum[m0:m1],
                               g[m0:m1], transform, out_dtype)  # fmt: skip
            if grad_h is not None:
                accumulate_product(grad_h[m0:m1], grad_u, w_tile)
            if gw_tile is not None:
                accumulate_product(gw_tile, grad_u.t(), x)
            if gb_tile is not None:
                gb_tile.add_(grad_u.float().sum(0))
        if grad_w is not None:
            grad_w[v0:v1] = gw_tile.to(grad_w.dtype)
        if grad_b is not None:
            grad_b[v0:v1] = gb_tile.to(grad_b.dtype)
    return grad_h, grad_w, grad_b


def _tile(b: torch.Tensor | None, v0: int, v1: int) -> torch.Tensor | None:
    return None if b is None else b[v0:v1]
