"""The public entry point ``linear_logprobs``: every implementation (naive, chunked, triton) against float64 logits
materialised from the same inputs, and what the caller may rely on whatever the implementation (fp32 streams under
the caller's autocast, zeros where every position is ignored, bit-identical mixes when policy == reference)."""

from __future__ import annotations

import pytest
import torch

from edpo_plugin.ops import LogitTransform, linear_logprobs, triton_available
from tests.numerics import SAME_MATH_TOL
from tests.ops.head_cases import CASES, TRITON_CASES, Case, case_ids, check_case

IMPLS_HERE = ["naive", "chunked"] + (["triton"] if triton_available() else [])


@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_parity_with_float64(case: Case, impl: str):
    check_case(case, impl)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("case", TRITON_CASES, ids=case_ids(TRITON_CASES))
def test_triton_parity_with_float64(case: Case):
    check_case(case, "triton")


def test_triton_cases_cover_the_head_configurations():
    assert {c.dtype for c in TRITON_CASES} == {torch.float32, torch.bfloat16}
    assert {c.shared for c in TRITON_CASES} == {True, False}
    assert {c.trainable_head for c in TRITON_CASES} == {True, False}
    assert {c.bias for c in TRITON_CASES} == {True, False}
    assert {(c.dtype, c.trainable_head) for c in TRITON_CASES} >= {(torch.bfloat16, True), (torch.float32, True)}
    kinds = {(c.transform[0] != 1.0, c.transform[1] is not None) for c in TRITON_CASES}
    assert kinds == {(False, False), (True, False), (False, True), (True, True)}  # none, scale, cap, both


def test_all_positions_ignored_gives_zeros_and_zero_grad():
    h = torch.randn(3, 5, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    labels = torch.full((3, 5), -100)
    for impl in ("naive", "chunked"):
        out = linear_logprobs(h, w, labels, ref_hidden=torch.randn(3, 5, 8), ref_weight=w, epsilon=0.1, impl=impl)
        assert all((s == 0).all() for s in out)
        gh, gw = torch.autograd.grad(out.policy.sum(), [h, w], allow_unused=True, materialize_grads=True)
        assert (gh == 0).all() and (gw == 0).all()


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
        assert a.dtype == b.dtype and torch.allclose(a, b, rtol=SAME_MATH_TOL, atol=SAME_MATH_TOL)
