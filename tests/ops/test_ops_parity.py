"""The log-prob head against float64 logits materialised from the same inputs (spec_reference.token_logprobs64)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from edpo_plugin.loss import epsilon_decisions
from edpo_plugin.ops import LinearLogprobs, LogitTransform, linear_logprobs, triton_available
from edpo_plugin.ops.chunked import PlanRequest, fused_linear_logprobs
from edpo_plugin.ops.plan import HeadPlan
from tests.spec_reference import decisions64, token_logprobs64


@dataclass(frozen=True)
class Case:
    seqs: int
    seq_len: int
    dim: int
    vocab: int
    dtype: torch.dtype
    shared: bool
    bias: bool
    trainable_head: bool
    big_logits: bool
    token_chunk: int
    vocab_chunk: int
    transform: tuple[float, float | None]  # (scale, softcap)
    seed: int


def _cases(n: int) -> list[Case]:
    rng = random.Random(1234)
    out = []
    for i in range(n):
        out.append(
            Case(
                seqs=rng.choice([2, 4, 6]),
                seq_len=rng.choice([5, 11, 23]),  # relative error is a norm over a case: keep several tokens
                dim=rng.choice([8, 24, 40]),
                vocab=rng.choice([17, 101, 257, 1031]),  # odd sizes, never a multiple of the tile
                dtype=torch.bfloat16 if i % 3 == 2 else torch.float32,
                shared=i % 2 == 0,
                bias=i % 4 in (1, 2),
                trainable_head=i % 5 in (0, 3),
                big_logits=i % 4 == 3,
                token_chunk=rng.choice([3, 16, 64]),
                vocab_chunk=rng.choice([7, 32, 128]),
                # Cohere-like scale, Granite-like 1/8, Gemma-2-like cap (bites on big logits), cap with a scale
                transform=[(1.0, None), (0.0625, None), (1.0, 30.0), (0.125, 50.0), (1.0, None), (1.0, 30.0)][i % 6],
                seed=i,
            )
        )
    return out


CASES = _cases(24)
# Inputs are exact in float64 too, so streams carry only fp32 arithmetic error (~1e-7) whatever the input dtype;
# a gradient returned in bf16 carries its final rounding (2⁻⁹ relative) on top.
STREAM_TOL = 1e-5
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 2**-8}


def _inputs(case: Case):
    g = torch.Generator().manual_seed(case.seed)
    scale = 14.0 if case.big_logits else 1.0  # logits of magnitude ~1e3 with big_logits

    def rand(*shape):
        return (scale * torch.randn(*shape, generator=g)).to(case.dtype)

    n = case.seqs * case.seq_len
    hidden = rand(case.seqs, case.seq_len, case.dim).requires_grad_()
    ref_hidden = rand(case.seqs, case.seq_len, case.dim)
    weight = rand(case.vocab, case.dim).requires_grad_(case.trainable_head)
    ref_weight = weight if case.shared else rand(case.vocab, case.dim)
    bias = rand(case.vocab).requires_grad_(case.trainable_head) if case.bias else None
    ref_bias = (bias if case.shared else rand(case.vocab)) if case.bias else None
    labels = torch.randint(0, case.vocab, (case.seqs, case.seq_len), generator=g)
    labels[torch.rand(case.seqs, case.seq_len, generator=g) < 0.3] = -100  # scattered prompt/pad positions
    labels[0] = -100  # one fully masked row
    assert n > 0
    return hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm().clamp(min=1e-30)).item()


def _kept_probs_head(case: Case, impl: str, hidden, weight, labels, ref_hidden, ref_weight, eps, bias, ref_bias,
                     transform) -> LinearLogprobs:  # fmt: skip
    """The fused head under a plan that keeps the policy's P for the backward (the planner picks it on CUDA only)."""
    plan = HeadPlan(impl, "trainable", case.token_chunk, case.vocab_chunk, tensor_cores=False, p_dtype=torch.float32,
                    keep_probs=True, interpreted=impl == "triton")  # fmt: skip
    d = hidden.shape[-1]
    streams = fused_linear_logprobs(hidden.reshape(-1, d), weight, labels.reshape(-1), ref_hidden.reshape(-1, d),
                                    ref_weight, eps, bias, ref_bias, -100, transform=transform,
                                    request=PlanRequest(plan=plan))  # fmt: skip
    return LinearLogprobs(*(t.reshape(labels.shape) for t in streams))


def _check_case(case: Case, impl: str, keep_probs: bool = False) -> None:
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels = _inputs(case)
    eps = 0.05
    scale, softcap = case.transform
    transform = LogitTransform(scale, softcap)
    if keep_probs:
        out = _kept_probs_head(case, impl, hidden, weight, labels, ref_hidden, ref_weight, eps, bias, ref_bias,
                               transform)  # fmt: skip
    else:
        out = linear_logprobs(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight, epsilon=eps,
                              bias=bias, ref_bias=ref_bias, impl=impl, transform=transform,
                              token_chunk=case.token_chunk, vocab_chunk=case.vocab_chunk)  # fmt: skip

    leaves = (
        [hidden]
        + ([weight] if case.trainable_head else [])
        + ([bias] if case.trainable_head and bias is not None else [])
    )
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    h64 = leaves64[0]
    w64 = leaves64[1] if case.trainable_head else weight.detach()
    b64 = (leaves64[2] if case.trainable_head else bias.detach()) if bias is not None else None
    want = token_logprobs64(h64, w64, labels, ref_hidden, w64 if case.shared else ref_weight, eps, b64,
                            (b64 if case.shared else ref_bias) if bias is not None else None,
                            scale=scale, softcap=softcap)  # fmt: skip

    for name, got, ref in zip(("policy", "ref", "plus", "minus"), out, want):
        assert got.dtype == torch.float32 and got.shape == labels.shape
        assert torch.isfinite(got).all()
        assert (got[labels == -100] == 0).all(), f"{name}: ignored positions must be exactly 0"
        assert _rel(got, ref) <= STREAM_TOL, f"{name}: relative error {_rel(got, ref):.2e} > {STREAM_TOL}"
    tol = GRAD_TOL[case.dtype]

    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(case.seed + 99), dtype=torch.float64)
    grads = torch.autograd.grad((out.policy.double() * upstream).sum(), leaves)
    grads64 = torch.autograd.grad((want[0] * upstream).sum(), leaves64)
    for got, ref in zip(grads, grads64):
        assert _rel(got, ref) <= tol, f"gradient relative error {_rel(got, ref):.2e} > {tol}"
    assert (grads[0][labels == -100] == 0).all()

    # decisions over pairs (row 2k chosen, row 2k+1 rejected) agree wherever the float64 margin exceeds 1e-4
    seq = [s.double().sum(-1) for s in out]
    seq64 = [s.detach().sum(-1) for s in want]
    got_s = epsilon_decisions(seq[0][0::2] - seq[0][1::2], seq[2][0::2] - seq[2][1::2], seq[3][0::2] - seq[3][1::2])
    want_s = decisions64(seq64[0][0::2], seq64[0][1::2], seq64[2][0::2], seq64[2][1::2], seq64[3][0::2], seq64[3][1::2])
    L = seq64[0][0::2] - seq64[0][1::2]
    margin = torch.minimum((seq64[2][0::2] - seq64[2][1::2] - L).abs(), (L - seq64[3][0::2] + seq64[3][1::2]).abs())
    clear = margin > 1e-4
    assert torch.equal(got_s.double()[clear], want_s[clear])


@pytest.mark.parametrize("case", CASES, ids=[f"case{c.seed}" for c in CASES])
@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_parity_with_float64(case: Case, impl: str):
    _check_case(case, impl)


# Under TRITON_INTERPRET=1 (CPU) the fold kernels run as on a GPU, only with the interpreter's large blocks; the
# engine's GEMMs are the same PyTorch calls as impl="chunked".
TRITON_CASES = [c for c in CASES if c.seqs * c.seq_len * c.vocab <= 40_000]


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("case", TRITON_CASES, ids=[f"case{c.seed}" for c in TRITON_CASES])
def test_triton_parity_with_float64(case: Case):
    _check_case(case, "triton")


TRAINABLE_CASES = [c for c in CASES if c.trainable_head]


@pytest.mark.parametrize("case", TRAINABLE_CASES, ids=[f"case{c.seed}" for c in TRAINABLE_CASES])
def test_kept_probs_parity_with_float64(case: Case):
    """A trainable head whose plan keeps P from the forward (4 matmul-equivalents) against float64."""
    _check_case(case, "chunked", keep_probs=True)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("case", [c for c in TRAINABLE_CASES if c in TRITON_CASES],
                         ids=[f"case{c.seed}" for c in TRAINABLE_CASES if c in TRITON_CASES])  # fmt: skip
def test_triton_kept_probs_parity_with_float64(case: Case):
    _check_case(case, "triton", keep_probs=True)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("keep_probs", [False, True], ids=["recompute", "kept-P"])
def test_triton_trainable_head_with_a_scale_and_no_cap(keep_probs):
    """Issue 25: the Triton trainable backward must apply a logit scale without a soft cap (Cohere / Granite), weight
    gradient included."""
    case = Case(seqs=2, seq_len=11, dim=24, vocab=101, dtype=torch.float32, shared=False, bias=True,
                trainable_head=True, big_logits=False, token_chunk=16, vocab_chunk=32, transform=(0.0625, None),
                seed=77)  # fmt: skip
    _check_case(case, "triton", keep_probs)


def test_triton_cases_cover_the_head_configurations():
    assert {c.dtype for c in TRITON_CASES} == {torch.float32, torch.bfloat16}
    assert {c.shared for c in TRITON_CASES} == {True, False}
    assert {c.trainable_head for c in TRITON_CASES} == {True, False}
    assert {c.bias for c in TRITON_CASES} == {True, False}
    assert {(c.dtype, c.trainable_head) for c in TRITON_CASES} >= {(torch.bfloat16, True), (torch.float32, True)}
    kinds = {(c.transform[0] != 1.0, c.transform[1] is not None) for c in TRITON_CASES}
    assert kinds == {(False, False), (True, False), (False, True), (True, True)}  # none, scale, cap, both


def _fold_inputs(rows: int, cols: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    z = torch.empty(4, rows, cols)
    z[0], z[1] = 40 * torch.randn(rows, cols, generator=g), 40 * torch.randn(rows, cols, generator=g)
    b_p, b_r = torch.randn(cols, generator=g), torch.randn(cols, generator=g)
    start = torch.randn(4, rows, generator=g)  # a running state from earlier tiles (first tile: -inf, 0)
    return z, b_p, b_r, start


def _t64(u: torch.Tensor, b: torch.Tensor, scale: float, cap: float) -> torch.Tensor:
    return cap * torch.tanh(scale * (u.double() + b.double()) / cap)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
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
    assert _rel(stats.max, new_max) <= 1e-6 and _rel(stats.sum, new_sum) <= 1e-6
    if p_dtype is None:
        return
    moved = moves | first
    want_r = torch.where(moved, new_max[0], r_in.double())
    assert torch.equal(r_out[~moved], r_in[~moved]) and _rel(r_out, want_r) <= 1e-6
    want_p = torch.exp(zp - want_r[:, None]) * scale * (1 - (zp / cap) ** 2)
    assert _rel(p_out, want_p) <= (1e-6 if p_dtype == torch.float32 else 2**-8)
    if direction is not None:
        want_d = d_in.double() * torch.exp(r_in.double() - want_r)[:, None]
        assert _rel(direction, want_d) <= 1e-6
        assert torch.equal(direction[~moves], d_in[~moves])  # rows whose reference stays are not touched


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
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
                assert _rel(got, ref) <= STREAM_TOL, (vocab_chunk, trainable)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
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
    assert got is out and _rel(got, want) <= (1e-5 if out_dtype == torch.float32 else 2**-8)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
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
        assert _rel(got, want) <= 1e-5, fn.__name__


def test_all_positions_ignored_gives_zeros_and_zero_grad():
    h = torch.randn(3, 5, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    labels = torch.full((3, 5), -100)
    for impl in ("naive", "chunked"):
        out = linear_logprobs(h, w, labels, ref_hidden=torch.randn(3, 5, 8), ref_weight=w, epsilon=0.1, impl=impl)
        assert all((s == 0).all() for s in out)
        gh, gw = torch.autograd.grad(out.policy.sum(), [h, w], allow_unused=True, materialize_grads=True)
        assert (gh == 0).all() and (gw == 0).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"epsilon": 1.0}, "epsilon"),
        ({"epsilon": 0.0}, "epsilon"),
        ({"impl": "cuda"}, "impl"),
        ({"ref_hidden": torch.randn(2, 4)}, "ref_hidden"),
        ({"ref_weight": torch.randn(9, 4)}, "vocabulary"),
        ({"bias": torch.randn(3)}, "bias"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    args = {"ref_hidden": torch.randn(3, 4), "ref_weight": torch.randn(7, 4), "epsilon": 0.1}
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        linear_logprobs(torch.randn(3, 4), torch.randn(7, 4), torch.tensor([1, 2, 3]), **args)


IMPLS_HERE = ["naive", "chunked"] + (["triton"] if triton_available() else [])


@pytest.mark.parametrize("impl", IMPLS_HERE)
def test_policy_equal_to_reference_gives_bit_identical_mixes(impl):
    """A fresh adapter (policy == reference) must give L⁺ == L == L⁻, i.e. s_i = 0, not a decision by rounding."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(4, 9, 32, generator=g)
    w = 3 * torch.randn(300, 32, generator=g)
    labels = torch.randint(0, 300, (4, 9), generator=g)
    out = linear_logprobs(h, w, labels, ref_hidden=h.clone(), ref_weight=w, epsilon=0.01, impl=impl,
                          transform=LogitTransform(1.0, 30.0), token_chunk=5, vocab_chunk=64)  # fmt: skip
    assert torch.equal(out.plus, out.policy) and torch.equal(out.minus, out.policy)
    assert torch.equal(out.ref, out.policy)


def test_policy_and_reference_logits_come_from_gemms_of_identical_shape():
    """Bit identity of a policy equal to its reference must not depend on the machine: a GEMM's rounding can depend
    on a row's position in it (seen on AMD EPYC), so the chunked sweep must never stack policy and reference rows into
    one GEMM. Every logit GEMM of the forward sweep has at most ``token_chunk`` rows, shared head or not."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class RowsSeen(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.rows: list[int] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._overloadpacket.__name__ in ("mm", "addmm", "addmm_"):
                a = args[0] if func._overloadpacket.__name__ == "mm" else args[1]
                self.rows.append(a.shape[0])
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(20, 16, generator=g), torch.randn(200, 16, generator=g)
    labels = torch.randint(0, 200, (20,), generator=g)
    seen = RowsSeen()
    with seen, torch.no_grad():
        linear_logprobs(h, w, labels, ref_hidden=h.clone(), ref_weight=w, epsilon=0.01, impl="chunked",
                        token_chunk=5, vocab_chunk=64)  # fmt: skip
    assert seen.rows and max(seen.rows) <= 5, f"a GEMM over {max(seen.rows)} rows: policy and reference stacked"


@pytest.mark.parametrize("impl", IMPLS_HERE)
@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_caller_autocast_changes_nothing(impl, trainable):
    """Under the caller's bf16 autocast the head still computes in fp32: same streams and gradients as without
    (backward outside autocast, as PyTorch prescribes and the HF Trainer does)."""
    g = torch.Generator().manual_seed(4)
    h = torch.randn(2, 6, 16, generator=g).requires_grad_()
    w = torch.randn(70, 16, generator=g).requires_grad_(trainable)
    hr, wr = torch.randn(2, 6, 16, generator=g), torch.randn(70, 16, generator=g)
    labels = torch.randint(0, 70, (2, 6), generator=g)

    def run():
        return linear_logprobs(h, w, labels, ref_hidden=hr, ref_weight=wr, epsilon=0.1, impl=impl)

    leaves = [h, w] if trainable else [h]
    plain = run()
    plain_grads = torch.autograd.grad(plain.policy.sum(), leaves)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = run()
    cast_grads = torch.autograd.grad(cast.policy.sum(), leaves)
    for a, b in zip((*plain, *plain_grads), (*cast, *cast_grads)):
        assert a.dtype == b.dtype and torch.allclose(a, b, rtol=1e-6, atol=1e-6)


def test_trainable_head_gradients_at_large_logits_as_accurate_as_full_logits():
    """|z| ≈ 800, fp32: the recompute's softmax is exp((z − max) − log Σ), so the chunked gradients are no less
    accurate against float64 than autograd through materialised fp32 logits (within 2×)."""
    g = torch.Generator().manual_seed(5)
    h = (40 * torch.randn(64, 48, generator=g)).requires_grad_()
    w = (0.45 * torch.randn(2000, 48, generator=g)).requires_grad_()
    labels = torch.randint(0, 2000, (64,), generator=g)
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = token_logprobs64(h64, w64, labels, h64.detach(), w64.detach(), 0.01)[0]
    assert want.abs().max() > 100  # logits of magnitude ~1e3
    upstream = torch.randn(64, generator=g, dtype=torch.float64)
    want_grads = torch.autograd.grad((want * upstream).sum(), [h64, w64])
    errors = {}
    for impl in ("naive", "chunked"):
        out = linear_logprobs(h, w, labels, ref_hidden=h.detach(), ref_weight=w.detach(), epsilon=0.01, impl=impl,
                              vocab_chunk=256)  # fmt: skip
        grads = torch.autograd.grad((out.policy.double() * upstream).sum(), [h, w])
        errors[impl] = [_rel(a, b) for a, b in zip(grads, want_grads)]
    for fused, full in zip(errors["chunked"], errors["naive"]):
        assert fused <= 2 * full + 1e-7, errors


@pytest.mark.parametrize("impl", IMPLS_HERE)
@pytest.mark.parametrize("bad", [-1, 70, 1000])
def test_label_outside_the_vocabulary_is_refused(impl, bad):
    """A label outside [0, V) that is not ignore_index raises a ValueError naming it, on every implementation."""
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(6, 16, generator=g), torch.randn(70, 16, generator=g)
    labels = torch.tensor([1, -100, 5, bad, 3, 2])
    with pytest.raises(ValueError, match=rf"labels hold {bad}, outside the vocabulary \[0, 70\)"):
        linear_logprobs(h, w, labels, ref_hidden=h, ref_weight=w, epsilon=0.1, impl=impl)


@pytest.mark.parametrize("impl", IMPLS_HERE)
def test_ignore_index_other_than_minus_100(impl):
    """Issue 25: the label check uses ignore_index, not a hard-coded -100: with ignore_index=-1, -1 labels are
    ignored (0 in every stream, no gradient) and the rest match the float64 spec; -100 labels are then refused."""
    g = torch.Generator().manual_seed(8)
    h = torch.randn(6, 16, generator=g).requires_grad_()
    w = torch.randn(70, 16, generator=g)
    hr = torch.randn(6, 16, generator=g)
    labels = torch.tensor([1, -1, 5, 69, -1, 2])
    out = linear_logprobs(h, w, labels, ref_hidden=hr, ref_weight=w, epsilon=0.1, impl=impl, ignore_index=-1)
    want = token_logprobs64(h.detach(), w, labels, hr, w, 0.1, ignore_index=-1)
    for got, ref in zip(out, want):
        assert (got[labels == -1] == 0).all() and _rel(got, ref) <= STREAM_TOL
    (grad,) = torch.autograd.grad(out.policy.sum(), [h])
    assert (grad[labels == -1] == 0).all() and (grad[labels != -1] != 0).any()
    with pytest.raises(ValueError, match=r"labels hold -100, outside the vocabulary \[0, 70\) and not ignore_index=-1"):
        linear_logprobs(h, w, torch.tensor([1, -100, 5, 3, -1, 2]), ref_hidden=hr, ref_weight=w, epsilon=0.1,
                        impl=impl, ignore_index=-1)  # fmt: skip
