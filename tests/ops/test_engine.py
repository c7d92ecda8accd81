"""The tile engine (``edpo_plugin.ops.engine``) under the plans the fused head runs: the kept-P backward against
float64, the sweep's GEMMs (policy and reference never stacked), and the recompute's accuracy at large logits."""

from __future__ import annotations

import pytest
import torch

from edpo_plugin.ops import linear_logprobs, triton_available
from tests.numerics import rel
from tests.ops.head_cases import TRAINABLE_CASES, TRITON_CASES, Case, case_ids, check_case
from tests.spec_reference import token_logprobs64

TRITON_TRAINABLE_CASES = [c for c in TRAINABLE_CASES if c in TRITON_CASES]


@pytest.mark.parametrize("case", TRAINABLE_CASES, ids=case_ids(TRAINABLE_CASES))
def test_kept_probs_parity_with_float64(case: Case):
    """A trainable head whose plan keeps P from the forward (4 matmul-equivalents) against float64."""
    check_case(case, "chunked", keep_probs=True)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("case", TRITON_TRAINABLE_CASES, ids=case_ids(TRITON_TRAINABLE_CASES))
def test_triton_kept_probs_parity_with_float64(case: Case):
    check_case(case, "triton", keep_probs=True)


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
        errors[impl] = [rel(a, b) for a, b in zip(grads, want_grads)]
    for fused, full in zip(errors["chunked"], errors["naive"]):
        assert fused <= 2 * full + 1e-7, errors
