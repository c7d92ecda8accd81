"""The log-prob head against float64 logits materialised from the same inputs (spec_reference.token_logprobs64)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from edpo_plugin.loss import epsilon_decisions
from edpo_plugin.ops import LogitTransform, linear_logprobs, triton_available
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


def _check_case(case: Case, impl: str) -> None:
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels = _inputs(case)
    eps = 0.05
    scale, softcap = case.transform
    out = linear_logprobs(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight, epsilon=eps,
                          bias=bias, ref_bias=ref_bias, impl=impl, transform=LogitTransform(scale, softcap),
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


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("first_tile", [True, False], ids=["first-tile", "later-tile"])
@pytest.mark.parametrize("p_dtype", [None, torch.float32, torch.bfloat16], ids=["stats", "P-fp32", "P-bf16"])
def test_triton_fold_against_float64(first_tile, p_dtype, monkeypatch):
    """One tile through the Triton fold with small blocks (rows and columns not multiples of them, several column
    blocks per program), against the fold computed in float64 from its definition: bias, scale, soft cap, ε-mixes,
    the online (max, Σ) update, P = softmax weights × cap slope relative to the new max, α = exp(max_old − max_new)."""
    from edpo_plugin.ops import triton_fold
    from edpo_plugin.ops.engine import RunningStats

    monkeypatch.setattr(triton_fold, "fold_blocks", lambda cols, device: (16, 32, 4))
    rows, cols, eps, scale, cap = 37, 101, 0.05, 0.5, 30.0
    z, b_p, b_r, start = _fold_inputs(rows, cols, seed=3)
    old_max = torch.full((4, rows), float("-inf")) if first_tile else 20 * start
    old_sum = torch.zeros(4, rows) if first_tile else start.abs() + 1
    stats = RunningStats(old_max.clone(), old_sum.clone())
    out = triton_fold.fold_triton(z.clone(), b_p, b_r, stats, eps, LogitTransform(scale, cap), p_dtype)

    def t64(u, b):
        return cap * torch.tanh(scale * (u.double() + b.double()) / cap)

    zp, zr = t64(z[0], b_p), t64(z[1], b_r)
    mixes = torch.stack((zp, zr, zp + eps * (zp - zr), zp - eps * (zp - zr)))
    new_max = torch.maximum(old_max.double(), mixes.amax(2))
    new_sum = old_sum.double() * torch.exp(old_max.double() - new_max) + torch.exp(mixes - new_max[..., None]).sum(2)
    assert _rel(stats.max, new_max) <= 1e-6 and _rel(stats.sum, new_sum) <= 1e-6
    if p_dtype is None:
        assert out is None
        return
    alpha, p = out
    want_p = torch.exp(zp - new_max[0, :, None]) * scale * (1 - (zp / cap) ** 2)
    assert p.dtype == p_dtype and _rel(p, want_p) <= (1e-6 if p_dtype == torch.float32 else 2**-8)
    assert _rel(alpha, torch.exp(old_max[0].double() - new_max[0])) <= 1e-6


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_triton_grad_fold_against_float64(out_dtype):
    """The backward fold: dL/du = slope·g·(onehot(y) − softmax(z)) for L = Σ g·log softmax(T(u + b))[y], targets
    inside and outside the tile (−1), from the rows' own statistics."""
    from edpo_plugin.ops.triton_fold import grad_fold_triton

    rows, cols, scale, cap = 29, 75, 0.5, 30.0
    z, b, _, _ = _fold_inputs(rows, cols, seed=5)
    u = z[0]
    g = torch.randn(rows, generator=torch.Generator().manual_seed(1))
    y = torch.randint(-1, cols, (rows,), generator=torch.Generator().manual_seed(2))
    zz = cap * torch.tanh(scale * (u.double() + b.double()) / cap)
    row_max = zz.amax(1)
    row_logsum = torch.exp(zz - row_max[:, None]).sum(1).log()
    got = grad_fold_triton(u.clone(), b, y, row_max.float(), row_logsum.float(), g, LogitTransform(scale, cap),
                           out_dtype)  # fmt: skip
    onehot = torch.zeros(rows, cols, dtype=torch.float64)
    onehot[(y >= 0).nonzero().squeeze(1), y[y >= 0]] = 1
    want = g.double()[:, None] * (onehot - torch.softmax(zz, 1)) * scale * (1 - (zz / cap) ** 2)
    assert got.dtype == out_dtype and _rel(got, want) <= (1e-5 if out_dtype == torch.float32 else 2**-8)


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
