"""The Triton folds (``edpo_plugin.ops.triton_fold``; CPU: under ``TRITON_INTERPRET=1``) against float64 computed
from their definitions: the forward fold of one tile (statistics, the lazy reference, P, the direction's rescale), the
row maximum over masked columns, the backward folds (recompute and from kept P), and the trainable backward's scale
without a soft cap through the whole head."""

from __future__ import annotations

import pytest
import torch

from edpo_plugin.ops import LogitTransform, linear_logprobs, triton_available
from tests.numerics import BF16_TOL, FOLD_TOL, GRAD_TOL, STREAM_TOL, rel
from tests.ops.head_cases import Case, check_case
from tests.spec_reference import token_logprobs64

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


@pytest.mark.parametrize("keep_probs", [False, True], ids=["recompute", "kept-P"])
def test_triton_trainable_head_with_a_scale_and_no_cap(keep_probs):
    """Issue 25: the Triton trainable backward must apply a logit scale without a soft cap (Cohere / Granite), weight
    gradient included."""
    case = Case(seqs=2, seq_len=11, dim=24, vocab=101, dtype=torch.float32, shared=False, bias=True,
                trainable_head=True, big_logits=False, token_chunk=16, vocab_chunk=32, transform=(0.0625, None),
                seed=77)  # fmt: skip
    check_case(case, "triton", keep_probs)


def _fold_inputs(rows: int, cols: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    z = torch.empty(4, rows, cols)
    z[0], z[1] = 40 * torch.randn(rows, cols, generator=g), 40 * torch.randn(rows, cols, generator=g)
    b_p, b_r = torch.randn(cols, generator=g), torch.randn(cols, generator=g)
    start = torch.randn(4, rows, generator=g)  # a running state from earlier tiles (first tile: -inf, 0)
    return z, b_p, b_r, start


def _t64(u: torch.Tensor, b: torch.Tensor, scale: float, cap: float) -> torch.Tensor:
    return cap * torch.tanh(scale * (u.double() + b.double()) / cap)


@pytest.mark.parametrize("reference", ["first-tile", "stays", "moves"])
@pytest.mark.parametrize("p_dtype", [None, torch.float32, torch.bfloat16], ids=["stats", "P-fp32", "P-bf16"])
def test_triton_fold_against_float64(reference, p_dtype, monkeypatch):
    """One tile through the Triton fold with small blocks (rows and columns not multiples of them, several column
    blocks per program), against the fold computed in float64 from its definition: bias, scale, soft cap, ε-mixes,
    the online (max, Σ) update; with P: the reference r moves to the new running maximum only where that passes
    r + τ (or r is -inf), P = exp(z − r)·J against the reference after the tile, and a moved row of the direction D
    is rescaled by exp(r_old − r_new)."""
    from edpo_plugin.ops import triton_fold
    from edpo_plugin.ops.engine import RunningStats
    from edpo_plugin.ops.plan import lazy_tau

    monkeypatch.setattr(triton_fold, "fold_blocks", lambda kind, cols, interpreted: (16, 32, 4))
    rows, cols, dim, eps, scale, cap = 37, 101, 40, 0.05, 0.5, 30.0
    transform = LogitTransform(scale, cap)
    z, b_p, b_r, start = _fold_inputs(rows, cols, seed=3)
    first = reference == "first-tile"
    old_max = torch.full((4, rows), float("-inf")) if first else 20 * start
    old_sum = torch.zeros(4, rows) if first else start.abs() + 1
    stats = RunningStats(old_max.clone(), old_sum.clone())

    zp, zr = _t64(z[0], b_p, scale, cap), _t64(z[1], b_r, scale, cap)
    mixes = torch.stack((zp, zr, zp + eps * (zp - zr), zp - eps * (zp - zr)))
    new_max = torch.maximum(old_max.double(), mixes.amax(2))
    new_sum = old_sum.double() * torch.exp(old_max.double() - new_max) + torch.exp(mixes - new_max[..., None]).sum(2)
    p_out = r_in = r_out = direction = None
    if p_dtype is not None:
        tau = lazy_tau(p_dtype, transform)
        n0 = new_max[0].float()
        moves = torch.arange(rows) % 2 == 0 if reference == "moves" else torch.zeros(rows, dtype=torch.bool)
        r_in = torch.full((rows,), float("-inf")) if first else torch.where(moves, n0 - 3 * tau, n0 - 1.0)
        r_out, p_out = torch.empty(rows), torch.empty(rows, cols, dtype=p_dtype)
        direction = None if first else torch.randn(rows, dim, generator=torch.Generator().manual_seed(4))
        d_in = None if direction is None else direction.clone()
    triton_fold.fold_triton(z.clone(), b_p, b_r, stats, eps, transform, p_out, r_in, r_out, direction)
    assert rel(stats.max, new_max) <= FOLD_TOL and rel(stats.sum, new_sum) <= FOLD_TOL
    if p_dtype is None:
        return
    moved = moves | first
    want_r = torch.where(moved, new_max[0], r_in.double())
    assert torch.equal(r_out[~moved], r_in[~moved]) and rel(r_out, want_r) <= FOLD_TOL
    want_p = torch.exp(zp - want_r[:, None]) * scale * (1 - (zp / cap) ** 2)
    assert rel(p_out, want_p) <= (FOLD_TOL if p_dtype == torch.float32 else BF16_TOL)
    if direction is not None:
        want_d = d_in.double() * torch.exp(r_in.double() - want_r)[:, None]
        assert rel(direction, want_d) <= FOLD_TOL
        assert torch.equal(direction[~moves], d_in[~moves])  # rows whose reference stays are not touched


def test_triton_fold_row_max_ignores_masked_columns():
    """Issue 25: rows whose logits are all strongly negative (a large negative bias), with a vocabulary that is not a
    multiple of the fold's column block: a masked column (loaded as 0) must not become the row maximum. Against the
    float64 spec, frozen and trainable heads, one tile and several."""
    g = torch.Generator().manual_seed(11)
    n, d, vocab = 12, 16, 37
    h, hr = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    w = torch.randn(vocab, d, generator=g)
    b = torch.full((vocab,), -1000.0) + torch.randn(vocab, generator=g)
    labels = torch.randint(0, vocab, (n,), generator=g)
    for vocab_chunk in (vocab, 16):
        for trainable in (False, True):
            hh, ww, bb = h.clone().requires_grad_(), w.clone().requires_grad_(trainable), b.clone()
            out = linear_logprobs(hh, ww, labels, ref_hidden=hr, ref_weight=ww if not trainable else w, bias=bb,
                                  ref_bias=bb, epsilon=0.1, impl="triton", vocab_chunk=vocab_chunk)  # fmt: skip
            want = token_logprobs64(hh.detach(), w, labels, hr, w, 0.1, b, b)
            for got, ref in zip(out, want):
                assert rel(got, ref) <= STREAM_TOL, (vocab_chunk, trainable)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_triton_grad_fold_against_float64(out_dtype):
    """The backward fold: dL/du = slope·g·(onehot(y) − softmax(z)) for L = Σ g·log softmax(T(u + b))[y], on the tile
    of columns [v0, v0 + cols): targets inside it, before it and after it (global ids)."""
    from edpo_plugin.ops.triton_fold import grad_fold_triton

    rows, cols, v0, scale, cap = 29, 75, 7, 0.5, 30.0
    z, b, _, _ = _fold_inputs(rows, cols, seed=5)
    u = z[0]
    g = torch.randn(rows, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, v0 + cols + 5, (rows,), generator=torch.Generator().manual_seed(2))
    zz = _t64(u, b, scale, cap)
    row_max = zz.amax(1)
    row_logsum = torch.exp(zz - row_max[:, None]).sum(1).log()
    out = torch.empty(rows, cols, dtype=out_dtype)
    got = grad_fold_triton(u.clone(), b, y, v0, row_max.float(), row_logsum.float(), g, LogitTransform(scale, cap),
                           out)  # fmt: skip
    onehot = torch.zeros(rows, cols, dtype=torch.float64)
    inside = (y >= v0) & (y < v0 + cols)
    onehot[inside.nonzero().squeeze(1), y[inside] - v0] = 1
    want = g.double()[:, None] * (onehot - torch.softmax(zz, 1)) * scale * (1 - (zz / cap) ** 2)
    assert got is out and rel(got, want) <= GRAD_TOL[out_dtype]


@pytest.mark.parametrize("cap", [30.0, None], ids=["cap", "scale-only"])
def test_triton_grad_fold_from_kept_probs_against_float64(cap):
    """The backward fold from the forward's P = exp(z − r)·J (in place): −g·J·softmax(z) off the target, and at the
    target g·J_y·(1 − p_y) from the exact target logit; rows whose target lies in another tile get no one-hot."""
    from edpo_plugin.ops.engine import grad_fold_probs_torch
    from edpo_plugin.ops.triton_fold import grad_fold_probs_triton

    rows, cols, v0, scale = 29, 75, 7, 0.5
    z, b, _, _ = _fold_inputs(rows, cols, seed=6)
    zz = scale * z[0].double() if cap is None else _t64(z[0], torch.zeros(cols), scale, cap)
    slope = scale * (1 - (zz / cap) ** 2) if cap is not None else torch.full_like(zz, scale)
    row_max = zz.amax(1) + 0.5  # the tile is part of a wider row: its own max is not the row's
    row_logsum = torch.exp(zz - row_max[:, None]).sum(1).log() + 0.3
    r = row_max - torch.rand(rows, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 5
    g = torch.randn(rows, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, v0 + cols + 5, (rows,), generator=torch.Generator().manual_seed(2))
    inside = (y >= v0) & (y < v0 + cols)
    z_y = torch.where(inside, zz.gather(1, (y - v0).clamp(0, cols - 1)[:, None]).squeeze(1), 1.0)
    p_kept = torch.exp(zz - r[:, None]) * (slope if cap is not None else 1.0)
    onehot = torch.zeros(rows, cols, dtype=torch.float64)
    onehot[inside.nonzero().squeeze(1), y[inside] - v0] = 1
    softmax = torch.exp(zz - row_max[:, None] - row_logsum[:, None])
    want = g.double()[:, None] * (onehot - softmax) * slope
    transform = LogitTransform(scale, cap)
    args = (r.float(), y, v0, row_max.float(), row_logsum.float(), z_y.float(), g, transform)
    for fn in (grad_fold_probs_triton, grad_fold_probs_torch):
        got = fn(p_kept.float().clone(), *args)
        assert rel(got, want) <= GRAD_TOL[torch.float32], fn.__name__


@pytest.mark.parametrize("p_dtype", [torch.float32, torch.bfloat16])
def test_grad_fold_from_kept_probs_is_exact_at_a_confident_target(p_dtype):
    """A confident model (p_y = 1 − 2e-7): the target column's g·J_y·(1 − p_y) must come from the exact fp32 target
    logit, not from the kept P (whose rounding alone, 2⁻²⁴ in fp32 and 2⁻⁹ in bf16, is larger than 1 − p_y). Checked
    entry by entry on the target column, against float64, for both folds."""
    from edpo_plugin.ops.engine import grad_fold_probs_torch
    from edpo_plugin.ops.triton_fold import grad_fold_probs_triton

    rows, cols, v0 = 8, 64, 0
    gen = torch.Generator().manual_seed(9)
    zz = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    y = torch.randint(0, cols, (rows,), generator=gen)
    zz[torch.arange(rows), y] = 20.0
    row_max = zz.amax(1)
    row_logsum = torch.exp(zz - row_max[:, None]).sum(1).log()
    g = torch.randn(rows, generator=gen)
    p_y = torch.exp(zz[torch.arange(rows), y] - row_max - row_logsum)
    assert (1 - p_y).max() < 1e-6
    want = g.double() * (1 - p_y)
    args = (row_max.float(), y, v0, row_max.float(), row_logsum.float(), zz[torch.arange(rows), y].float(), g,
            LogitTransform())  # fmt: skip
    for fn in (grad_fold_probs_triton, grad_fold_probs_torch):
        got = fn(torch.exp(zz - row_max[:, None]).to(p_dtype), *args)[torch.arange(rows), y]
        assert rel(got, want) <= BF16_TOL, (fn.__name__, rel(got, want))


@pytest.mark.parametrize("p_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_triton_fold_keeps_p_inside_its_dtype(p_dtype, monkeypatch):
    """The lazy reference must move before P = exp(z − r)·J leaves the P dtype's range: every row starts 15 nats
    below the tile's maximum (e^15 > fp16's 65504), so in fp16 each row has to move, and P stays finite and equal to
    exp(z − r_out)·J against whichever reference (old, or the new maximum) the fold reports."""
    from edpo_plugin.ops import triton_fold
    from edpo_plugin.ops.engine import RunningStats

    monkeypatch.setattr(triton_fold, "fold_blocks", lambda kind, cols, interpreted: (16, 32, 4))
    rows, cols, scale, cap = 37, 101, 0.5, 30.0
    transform = LogitTransform(scale, cap)
    z, b_p, b_r, _ = _fold_inputs(rows, cols, seed=8)
    zp = _t64(z[0], b_p, scale, cap)
    n0 = zp.amax(1)
    stats = RunningStats(torch.full((4, rows), float("-inf")), torch.zeros(4, rows))
    r_in = (n0 - 15.0).float()
    r_out, p_out = torch.empty(rows), torch.empty(rows, cols, dtype=p_dtype)
    triton_fold.fold_triton(z.clone(), b_p, b_r, stats, 0.05, transform, p_out, r_in, r_out, None)
    assert torch.isfinite(p_out).all(), f"P overflowed {p_dtype}"
    assert ((r_out == r_in) | (r_out.double() - n0).abs().le(1e-4)).all()
    want_p = torch.exp(zp - r_out.double()[:, None]) * scale * (1 - (zp / cap) ** 2)
    # z − r is rounded at |z| ≈ 30 · 2⁻²⁴ before exp: STREAM_TOL, not FOLD_TOL, for fp32 P this far above 1
    assert rel(p_out, want_p) <= (STREAM_TOL if p_dtype == torch.float32 else BF16_TOL)
