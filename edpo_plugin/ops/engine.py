"""The tile engine every fused head runs on: token chunks × vocabulary tiles, GEMMs by the BLAS, one fold per tile.

The loop shape, the GEMM policy and the backward's strategy come from a :class:`edpo_plugin.ops.plan.HeadPlan`
(:mod:`edpo_plugin.ops.launches` lists the same loops kernel by kernel for the cost model). For a chunk of ``rows``
completion tokens and a tile of ``cols`` vocabulary columns:

1. **GEMMs** (:func:`tile_logits`): the policy's and the reference's pre-logits ``H Wᵀ`` as fp32 ``[rows, cols]``,
   two calls of identical shape (never one over stacked rows: a GEMM's rounding can depend on a row's position, and
   a policy equal to its reference must give bit-identical logits). With ``plan.tensor_cores`` (CUDA, bf16/fp16
   operands) the GEMM reads the input dtype and writes fp32 (``torch.mm(..., out_dtype=torch.float32)``); otherwise
   the operands are upcast and multiplied in fp32 (also on a PyTorch whose CUDA GEMMs lack those overloads:
   :func:`fp32_output_gemms`).
2. **Fold** (a :data:`Fold`): bias and logit transform, both ε-mixes ``z_θ ± ε(z_θ − z_ref)``, the online update of
   four running ``(max, Σ exp(z − max))`` rows, and, when the plan keeps them, the policy's softmax weights
   ``P = exp(z − r)·J`` (``J`` the soft cap's slope) relative to a per-row reference ``r``. The fold keeps ``r`` and
   the direction accumulator ``D`` consistent: when it raises ``r`` it rescales that row of ``D`` itself (no separate
   pass). :func:`fold_torch` raises ``r`` to the running maximum every tile and rescales every row;
   :mod:`edpo_plugin.ops.triton_fold` raises it only when the tile's maximum passes ``r + τ`` (lazy).
3. **Direction** (frozen head): ``D += P W_tile`` (the first tile writes ``D`` without reading it).

Row statistics are kept as ``(max, log Σ exp(z − max))`` and never added together, so a log-prob
``(z_y − max) − log Σ`` does not inherit the rounding of a large ``max + log Σ``.

Imports only torch.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch

from edpo_plugin.ops.contract import HeadOperands
from edpo_plugin.ops.transform import LogitTransform

if TYPE_CHECKING:
    from edpo_plugin.ops.plan import HeadPlan

__all__ = [
    "Fold",
    "GradFold",
    "HeadOperands",
    "RunningStats",
    "Sweep",
    "Targets",
    "accumulate_product",
    "direction_from",
    "fold_torch",
    "gemm_operand",
    "grad_fold_torch",
    "mix_streams",
    "no_autocast",
    "probs_grads",
    "product_into",
    "recompute_grads",
    "sweep_statistics",
    "target_logits",
    "tile_logits",
]


class RunningStats(NamedTuple):
    """Online log-sum-exp state of the four streams for one token chunk: fp32 ``[4, rows]`` each (views)."""

    max: torch.Tensor
    sum: torch.Tensor


class Targets(NamedTuple):
    """What the target columns give before the sweep: transformed policy and reference target logits ``[M]`` (fp32)
    and the policy's target rows ``W[y]`` as fp32 ``[M, d]`` (for the direction's ``J_y W[y]`` term)."""

    policy: torch.Tensor
    ref: torch.Tensor
    rows: torch.Tensor


class Sweep(NamedTuple):
    """The forward sweep's results. ``row_max``, ``row_logsum``: fp32 ``[4, M]``. ``direction``: fp32 ``[M, d]``
    ``Σ_v exp(z_v − r) J_v W_v`` (frozen head), relative to ``ref_max``. ``probs``: the policy's ``P`` ``[M, V]``
    (trainable head, ``keep_probs``), tile ``t`` relative to ``probs_ref[t]`` (fp32 ``[T, M]``)."""

    row_max: torch.Tensor
    row_logsum: torch.Tensor
    direction: torch.Tensor | None
    ref_max: torch.Tensor | None
    probs: torch.Tensor | None
    probs_ref: torch.Tensor | None


# fold(z [planes, rows, cols], b_p, b_r, stats, epsilon, transform, p_out, r_in, r_out, direction) -> None
Fold = Callable[..., None]
# grad_fold(...) -> dL/du [rows, cols] in the GEMM operand dtype
GradFold = Callable[..., torch.Tensor]


def no_autocast(device: torch.device):
    """``torch.autocast(device, enabled=False)`` where autocast exists (not on the meta device)."""
    if device.type in ("cuda", "cpu", "xpu"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


logger = logging.getLogger(__name__)


@functools.cache
def fp32_output_gemms(device: torch.device) -> bool:
    """Whether PyTorch runs, on ``device``, the GEMMs of the tensor-core plans: a bf16 product written as fp32
    (``torch.mm(..., out_dtype=torch.float32, out=...)``, PyTorch ≥ 2.8 on CUDA) and accumulated into an fp32 tensor
    (``torch.addmm(fp32, bf16, bf16, out_dtype=torch.float32, out=...)``, which PyTorch 2.8 and 2.9 refuse). Probed
    once per device with 2 × 2 products, their values checked (one host sync). Where it fails, the planner gives
    plans that upcast their operands (correct, slower) and says so once. A CUDA device this process cannot reach
    (planning a GPU from a CPU machine: the cost model, tests) is taken to have them."""
    if device.type == "cuda" and not torch.cuda.is_available():
        return True
    ones = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
    acc = torch.empty(2, 2, dtype=torch.float32, device=device)
    try:
        torch.mm(ones, ones, out_dtype=torch.float32, out=acc)
        torch.addmm(acc, ones, ones, out_dtype=torch.float32, out=acc)
        works = bool((acc == 4).all())
    except (TypeError, RuntimeError) as err:
        works, reason = False, f"{type(err).__name__}: {str(err).splitlines()[0]}"
    else:
        reason = f"they gave {acc.flatten().tolist()} for 2 × 2 products that should give 4"
    if not works:
        logger.warning(
            "PyTorch %s has no bf16 GEMM writing and accumulating fp32 on %s (%s): the fused log-prob head upcasts "
            "its GEMM operands to fp32 there (correct, slower). PyTorch >= 2.10 has them.",
            torch.__version__, device, reason,
        )  # fmt: skip
    return works


def tensor_core_gemms(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a plan for ``dtype`` inputs on ``device`` multiplies them as they are, writing fp32 (CUDA, bf16 /
    fp16, where :func:`fp32_output_gemms`), rather than on fp32 copies."""
    return device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and fp32_output_gemms(device)


def gemm_operand(t: torch.Tensor, tensor_cores: bool) -> torch.Tensor:
    """``t`` as a GEMM operand: itself on the tensor-core path or when fp32, an fp32 copy otherwise."""
    return t if tensor_cores else t.float()


def tile_logits(x: torch.Tensor, w_tile: torch.Tensor, out: torch.Tensor, tensor_cores: bool) -> torch.Tensor:
    """fp32 ``out [rows, cols]`` = ``x [rows, d] @ w_tile [cols, d]ᵀ``."""
    if tensor_cores:
        return torch.mm(x, w_tile.t(), out_dtype=torch.float32, out=out)
    return torch.mm(x, w_tile.t(), out=out)


def product_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, tensor_cores: bool) -> torch.Tensor:
    """``out = a @ b`` (``out`` fp32, not read): the first tile of an accumulation."""
    if tensor_cores:
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    return torch.mm(a, b, out=out)


def accumulate_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, tensor_cores: bool) -> torch.Tensor:
    """``acc += a @ b`` in place, ``acc`` fp32."""
    if tensor_cores:
        return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    return acc.addmm_(a, b)


def weight_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, tensor_cores: bool,
                   scratch: torch.Tensor | None) -> None:  # fmt: skip
    """``out = a @ b`` written once in ``out``'s dtype (a weight-gradient tile). On tensor cores the GEMM writes fp32
    into ``scratch`` (never a reduced-precision split-K reduction), then one copy rounds it."""
    if tensor_cores:
        out.copy_(torch.mm(a, b, out_dtype=torch.float32, out=scratch))
    elif out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(torch.mm(a, b))


def mix_streams(
    z: torch.Tensor, z_ref: torch.Tensor, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(z_θ, z_ref, z⁺, z⁻)`` with ``z^± = z_θ ± ε(z_θ − z_ref)`` (= (1±ε)z_θ ∓ εz_ref), out of place.

    Written as a correction to ``z_θ`` so that ``z_θ == z_ref`` gives ``z⁺ == z⁻ == z_θ`` exactly: otherwise the
    decisions of a fresh adapter would be decided by rounding.
    """
    delta = (z - z_ref).mul_(epsilon)
    return z, z_ref, z + delta, z - delta


def target_logits(
    h: torch.Tensor, rows: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor, transform: LogitTransform
) -> torch.Tensor:
    """fp32 ``[M]``: ``T(rows_i · h_i + b[y_i])`` from the gathered fp32 target rows ``rows [M, d]``."""
    out = torch.einsum("md,md->m", h.float(), rows)
    if b is not None:
        out = out + b.index_select(0, y).float()
    return transform.apply_(out)


def gather_targets(policy: HeadOperands, ref: HeadOperands, y: torch.Tensor, transform: LogitTransform) -> Targets:
    """:class:`Targets` for targets ``y [M]`` (local ids inside ``[0, V)``); one gather of ``W[y]`` when the
    reference shares the policy's weight."""
    rows = policy.w.index_select(0, y).float()
    ref_rows = rows if ref.w is policy.w else ref.w.index_select(0, y).float()
    return Targets(target_logits(policy.h, rows, policy.b, y, transform),
                   target_logits(ref.h, ref_rows, ref.b, y, transform), rows)  # fmt: skip


def fold_torch(
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
    """One tile's fold in PyTorch; updates ``stats`` in place.

    ``z``: fp32 ``[4, rows, cols]`` whose planes 0 and 1 hold the policy's and the reference's pre-logits (all four
    planes are overwritten); ``b_p``, ``b_r``: the tile's biases. With ``p_out`` (``[rows, cols]``, may be ``z[0]``
    itself): writes ``P = exp(z_θ − r)·J`` against the new running policy maximum ``r`` (stored in ``r_out``), and
    rescales ``direction`` (if given) from ``r_in`` to ``r``.
    """
    if b_p is not None:
        z[0].add_(b_p)
    if b_r is not None:
        z[1].add_(b_r)
    transform.apply_(z[:2])
    # z[2] = z_θ + ε(z_θ − z_ref) ; z[3] = z_θ − ε(z_θ − z_ref), as in mix_streams
    torch.sub(z[0], z[1], out=z[3]).mul_(epsilon)
    torch.add(z[0], z[3], out=z[2])
    torch.sub(z[0], z[3], out=z[3])
    slope = transform.derivative(z[0]) if p_out is not None and transform.softcap is not None else None
    new_max = torch.maximum(stats.max, z.amax(dim=2))
    z.sub_(new_max.unsqueeze(2)).exp_()
    stats.sum.mul_(torch.exp(stats.max - new_max)).add_(z.sum(dim=2))
    stats.max.copy_(new_max)
    if p_out is None:
        return
    if direction is not None:
        direction.mul_(torch.exp(r_in - new_max[0]).unsqueeze(1))
    r_out.copy_(new_max[0])
    weights = z[0] if slope is None else slope.mul_(z[0])
    if weights.data_ptr() != p_out.data_ptr() or weights.dtype != p_out.dtype:
        p_out.copy_(weights)


def sweep_statistics(
    plan: HeadPlan,
    policy: HeadOperands,
    ref: HeadOperands,
    r_init: torch.Tensor | None,
    epsilon: float,
    transform: LogitTransform,
    fold: Fold,
) -> Sweep:
    """The forward sweep of ``plan`` (its tiles, GEMM policy, fold and what it keeps; see :class:`Sweep`).

    ``r_init [M]``: the first reference of ``P`` per row (the policy's target logit, or ``-inf`` where a vocabulary
    shard does not hold the target); overwritten. None when nothing is kept (statistics only).
    """
    h, w, b = policy
    n_valid, d = h.shape
    vocab = w.shape[0]
    device = h.device
    tc = plan.tensor_cores
    shared = ref.w is w
    keep_direction, keep_probs = plan.keeps_direction, plan.keep_probs
    row_max = torch.full((4, n_valid), float("-inf"), dtype=torch.float32, device=device)
    row_logsum = torch.zeros(4, n_valid, dtype=torch.float32, device=device)
    direction = torch.empty(n_valid, d, dtype=torch.float32, device=device) if keep_direction else None
    p_dtype = plan.p_dtype
    tiles = plan.vocab_tiles(vocab)
    probs = torch.empty(n_valid, vocab, dtype=p_dtype, device=device) if keep_probs else None
    probs_ref = torch.empty(len(tiles), n_valid, dtype=torch.float32, device=device) if keep_probs else None
    rows0, cols0 = min(plan.token_chunk, n_valid), tiles[0][1] - tiles[0][0] if tiles else 0
    buf = torch.empty(plan.planes * rows0 * cols0, dtype=torch.float32, device=device)
    in_place = plan.impl == "chunked" and p_dtype == torch.float32 and transform.softcap is None
    p_buf = torch.empty(rows0 * cols0, dtype=p_dtype, device=device) if keep_direction and not in_place else None
    for m0, m1 in plan.token_chunks(n_valid):
        rows = m1 - m0
        x, xr = gemm_operand(h[m0:m1], tc), gemm_operand(ref.h[m0:m1], tc)
        stats = RunningStats(row_max[:, m0:m1], row_logsum[:, m0:m1])
        for t, (v0, v1) in enumerate(tiles):
            z = _contiguous(buf, plan.planes, rows, v1 - v0)
            w_tile = gemm_operand(w[v0:v1], tc)
            tile_logits(x, w_tile, z[0], tc)
            tile_logits(xr, w_tile if shared else gemm_operand(ref.w[v0:v1], tc), z[1], tc)
            if keep_probs:
                p_out = probs[m0:m1, v0:v1]
                r_in, r_out = (r_init if t == 0 else probs_ref[t - 1])[m0:m1], probs_ref[t, m0:m1]
            elif keep_direction:  # the PyTorch fold's fp32 P (no cap) is its exp'ed plane 0 itself
                p_out = z[0] if p_buf is None else _contiguous(p_buf, rows, v1 - v0)
                r_in = r_out = r_init[m0:m1]
            else:
                p_out = r_in = r_out = None
            acc = direction[m0:m1] if keep_direction and t > 0 else None
            fold(z, _tile(b, v0, v1), _tile(ref.b, v0, v1), stats, epsilon, transform, p_out, r_in, r_out, acc)
            if keep_direction:
                (product_into if t == 0 else accumulate_product)(direction[m0:m1], p_out, w_tile, tc)
    row_logsum.log_()
    ref_max = r_init if keep_direction else None
    return Sweep(row_max, row_logsum, direction, ref_max, probs, probs_ref)


def direction_from(
    sweep: Sweep,
    row_max: torch.Tensor,
    row_logsum: torch.Tensor,
    w: torch.Tensor,
    y: torch.Tensor,
    target_logit: torch.Tensor,
    targets: Targets,
    transform: LogitTransform,
    owned: torch.Tensor | None = None,
) -> torch.Tensor:
    """The policy's ``d log p / dh = J_y W[y] − Σ_v softmax(z)_v J_v W_v`` as fp32 ``[M, d]``, in place of
    ``sweep.direction``, normalised by the policy statistics ``row_max``, ``row_logsum`` ``[M]`` (a vocabulary
    shard passes the global ones). The target term comes from ``targets`` (its rows ``W[y]`` and logits, for the
    rows ``owned``; None: every row). ``w``, ``y``, ``target_logit``: what the Triton form reads instead."""
    direction = sweep.direction
    direction.mul_(torch.exp((sweep.ref_max - row_max) - row_logsum).unsqueeze(1))
    target_rows = targets.rows
    if transform.softcap is not None:
        target_rows.mul_(transform.derivative(targets.policy).unsqueeze(1))
    if owned is None:
        torch.sub(target_rows, direction, out=direction)
    else:
        direction.neg_()
        direction.index_add_(0, owned, target_rows)
    if transform.softcap is None and transform.scale != 1.0:
        direction.mul_(transform.scale)
    return direction


def grad_fold_torch(
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
    """``dL/du [rows, cols]`` into ``out`` for ``L = Σ_i g_i · log softmax(T(u_i + b))[y_i]`` on the tile of columns
    ``[v0, v0 + cols)``.

    ``u``: fp32 pre-logits (overwritten); ``y``: each row's target id (global in this weight; rows whose target lies
    outside the tile get no one-hot term); ``row_max``, ``row_logsum``: the rows' policy statistics; ``g``: fp32
    upstream ``[rows]``.
    """
    if b is not None:
        u.add_(b)
    transform.apply_(u)
    slope = transform.derivative(u) if transform.softcap is not None else None
    # d/dz of g·(z[y] − lse) = g·(onehot(y) − softmax(z)); softmax as exp((z − max) − log Σ)
    grad = u.sub_(row_max.unsqueeze(1)).sub_(row_logsum.unsqueeze(1)).exp_().mul_(-g.unsqueeze(1))
    cols = u.shape[1]
    local = (y - v0).clamp_(0, cols - 1).unsqueeze(1)  # rows whose target lies elsewhere add 0 (no host sync)
    inside = ((y >= v0) & (y < v0 + cols)).float().mul_(g).unsqueeze(1)
    grad.scatter_add_(1, local, inside)
    if slope is not None:
        grad.mul_(slope)
    elif transform.scale != 1.0:
        grad.mul_(transform.scale)
    return out.copy_(grad) if out is not grad else out


def grad_fold_probs_torch(
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
    """:func:`grad_fold_torch` from the kept ``P = exp(z − r)·J`` of the tile (in place): ``−g·exp(r − max − log Σ)·P``
    off the target, and at the target column ``g·J_y·(1 − p_y)`` from the exact fp32 target logit (never from the
    rounded ``P``: ``1 − p_y`` cancels when the model is confident)."""
    cols = p.shape[1]
    coef = torch.exp((p_ref - row_max) - row_logsum).mul_(g).neg_()
    if transform.softcap is None and transform.scale != 1.0:
        coef.mul_(transform.scale)
    p.mul_(coef.unsqueeze(1))
    slope = transform.derivative(target_logit) if transform.softcap is not None else transform.scale
    exact = torch.expm1((target_logit - row_max) - row_logsum).neg_().mul_(g).mul_(slope)  # 1 − p_y, no cancellation
    inside = (y >= v0) & (y < v0 + cols)
    local = (y - v0).clamp_(0, cols - 1).unsqueeze(1)
    value = torch.where(inside, exact, p.gather(1, local).squeeze(1).float())
    p.scatter_(1, local, value.unsqueeze(1).to(p.dtype))
    return p


def recompute_grads(
    plan: HeadPlan,
    policy: HeadOperands,
    y: torch.Tensor,
    row_max: torch.Tensor,
    row_logsum: torch.Tensor,
    g: torch.Tensor,
    transform: LogitTransform,
    want: tuple[bool, bool, bool],
    grad_fold: GradFold,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``Σ_i g_i · log softmax(T(W h_i + b))[y_i]`` w.r.t. ``(h, W, b)`` as asked by ``want``, by
    recomputing each policy tile (``y``: targets ``[M]``, ids outside ``[0, V)`` belong to another shard).

    Vocabulary tiles outside, token chunks inside: a weight-gradient tile is written once, straight from one GEMM
    over all tokens when the plan has one token chunk (else accumulated in fp32 over the chunks); the hidden gradient
    accumulates in fp32 ``[M, d]``.
    """
    h, weight, bias = policy
    want_hidden, want_weight, want_bias = want
    n_valid, d = h.shape
    vocab = weight.shape[0]
    tc = plan.tensor_cores
    x_all = gemm_operand(h, tc)
    one_chunk = plan.token_chunk >= n_valid
    tiles = plan.vocab_tiles(vocab)
    rows0, cols0 = min(plan.token_chunk, n_valid), tiles[0][1] - tiles[0][0] if tiles else 0
    u_buf = torch.empty(rows0 * cols0, dtype=torch.float32, device=h.device)
    g_buf = torch.empty(rows0 * cols0, dtype=x_all.dtype, device=h.device) if x_all.dtype != torch.float32 else u_buf
    grad_h = torch.empty(n_valid, d, dtype=torch.float32, device=h.device) if want_hidden else None
    grad_w = (torch.empty_like(weight) if n_valid else torch.zeros_like(weight)) if want_weight else None
    grad_b = torch.zeros(vocab, dtype=torch.float32, device=h.device) if want_bias else None
    scratch = torch.empty(cols0, d, dtype=torch.float32, device=h.device) if want_weight and one_chunk and tc else None
    for t, (v0, v1) in enumerate(tiles):
        cols = v1 - v0
        w_tile = gemm_operand(weight[v0:v1], tc)
        b_tile = _tile(bias, v0, v1)
        gw_tile = None
        if want_weight and not one_chunk:
            gw_tile = torch.zeros(cols, d, dtype=torch.float32, device=h.device)
        for m0, m1 in plan.token_chunks(n_valid):
            x = x_all[m0:m1]
            u = tile_logits(x, w_tile, _contiguous(u_buf, m1 - m0, cols), tc)
            out = u if g_buf is u_buf else _contiguous(g_buf, m1 - m0, cols)  # fp32 operands: dL/du in place of u
            grad_u = grad_fold(u, b_tile, y[m0:m1], v0, row_max[m0:m1], row_logsum[m0:m1], g[m0:m1], transform, out)
            if grad_h is not None:
                (product_into if t == 0 else accumulate_product)(grad_h[m0:m1], grad_u, w_tile, tc)
            if gw_tile is not None:
                accumulate_product(gw_tile, grad_u.t(), x, tc)
            elif grad_w is not None:
                weight_product(grad_w[v0:v1], grad_u.t(), x, tc, None if scratch is None else scratch[:cols])
            if grad_b is not None:
                grad_b[v0:v1].add_(grad_u.sum(0, dtype=torch.float32))
        if gw_tile is not None:
            grad_w[v0:v1].copy_(gw_tile)
    return grad_h, grad_w, None if grad_b is None else grad_b.to(bias.dtype)


def probs_grads(
    plan: HeadPlan,
    policy: HeadOperands,
    y: torch.Tensor,
    row_max: torch.Tensor,
    row_logsum: torch.Tensor,
    target_logit: torch.Tensor,
    probs: torch.Tensor,
    probs_ref: torch.Tensor,
    g: torch.Tensor,
    transform: LogitTransform,
    want: tuple[bool, bool, bool],
    grad_fold_probs: Callable[..., torch.Tensor],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """:func:`recompute_grads` from the ``P`` the forward kept (``plan.keep_probs``): no logit GEMM in backward.
    Per vocabulary tile, the tile's ``P`` becomes ``dL/du`` in place, then ``G W`` (fp32 accumulation over tiles)
    and ``Gᵀ H`` over all tokens, written once in the weight's dtype. ``target_logit``: the policy's fp32 target
    logits ``[M]`` (rows whose target is elsewhere: any finite value)."""
    h, weight, bias = policy
    want_hidden, want_weight, want_bias = want
    n_valid, d = h.shape
    tc = plan.tensor_cores
    x_all = gemm_operand(h, tc)
    grad_h = torch.empty(n_valid, d, dtype=torch.float32, device=h.device) if want_hidden else None
    grad_w = torch.empty_like(weight) if want_weight else None
    grad_b = torch.empty(weight.shape[0], dtype=torch.float32, device=h.device) if want_bias else None
    tiles = plan.vocab_tiles(weight.shape[0])
    cols0 = tiles[0][1] - tiles[0][0] if tiles else 0
    scratch = torch.empty(cols0, d, dtype=torch.float32, device=h.device) if want_weight and tc else None
    for t, (v0, v1) in enumerate(tiles):
        w_tile = gemm_operand(weight[v0:v1], tc)
        grad_u = grad_fold_probs(probs[:, v0:v1], probs_ref[t], y, v0, row_max, row_logsum, target_logit, g,
                                 transform)  # fmt: skip
        if grad_h is not None:
            (product_into if t == 0 else accumulate_product)(grad_h, grad_u, w_tile, tc)
        if grad_w is not None:
            weight_product(grad_w[v0:v1], grad_u.t(), x_all, tc, None if scratch is None else scratch[: v1 - v0])
        if grad_b is not None:
            torch.sum(grad_u, 0, dtype=torch.float32, out=grad_b[v0:v1])
    return grad_h, grad_w, None if grad_b is None else grad_b.to(bias.dtype)


def _contiguous(flat: torch.Tensor, *shape: int) -> torch.Tensor:
    """A contiguous ``shape`` view at the start of the flat buffer ``flat`` (ragged tiles stay dense)."""
    return flat[: math.prod(shape)].view(shape)


def _tile(b: torch.Tensor | None, v0: int, v1: int) -> torch.Tensor | None:
    return None if b is None else b[v0:v1]
