"""The random head configurations the parity tests share, and the check each runs: an implementation's four streams,
its gradients and the decisions they give, against float64 logits materialised from the same inputs
(:func:`tests.spec_reference.token_logprobs64`). Imported by ``test_linear_logprobs.py``, ``test_engine.py`` and
``test_triton_fold.py``."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from edpo_plugin.loss import epsilon_decisions
from edpo_plugin.ops import HeadCall, HeadOperands, LinearLogprobs, LogitTransform, linear_logprobs
from edpo_plugin.ops.chunked import PlanRequest, fused_linear_logprobs
from edpo_plugin.ops.plan import HeadPlan
from tests.numerics import DECISION_MARGIN, GRAD_TOL, STREAM_TOL, rel
from tests.spec_reference import decisions64, token_logprobs64

EPSILON = 0.05


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
# Under TRITON_INTERPRET=1 (CPU) the fold kernels run as on a GPU, only with the interpreter's large blocks; the
# engine's GEMMs are the same PyTorch calls as impl="chunked".
TRITON_CASES = [c for c in CASES if c.seqs * c.seq_len * c.vocab <= 40_000]
TRAINABLE_CASES = [c for c in CASES if c.trainable_head]


def case_ids(cases: list[Case]) -> list[str]:
    return [f"case{c.seed}" for c in cases]


def case_call(case: Case) -> HeadCall:
    """The case's inputs as a head call (hidden ``[seqs, seq_len, dim]``; ε = :data:`EPSILON`). The policy's hidden
    states require grad, and so do its weight and bias when the case's head is trainable."""
    g = torch.Generator().manual_seed(case.seed)
    scale = 14.0 if case.big_logits else 1.0  # logits of magnitude ~1e3 with big_logits

    def rand(*shape):
        return (scale * torch.randn(*shape, generator=g)).to(case.dtype)

    hidden = rand(case.seqs, case.seq_len, case.dim).requires_grad_()
    ref_hidden = rand(case.seqs, case.seq_len, case.dim)
    weight = rand(case.vocab, case.dim).requires_grad_(case.trainable_head)
    ref_weight = weight if case.shared else rand(case.vocab, case.dim)
    bias = rand(case.vocab).requires_grad_(case.trainable_head) if case.bias else None
    ref_bias = (bias if case.shared else rand(case.vocab)) if case.bias else None
    labels = torch.randint(0, case.vocab, (case.seqs, case.seq_len), generator=g)
    labels[torch.rand(case.seqs, case.seq_len, generator=g) < 0.3] = -100  # scattered prompt/pad positions
    labels[0] = -100  # one fully masked row
    return HeadCall(HeadOperands(hidden, weight, bias), HeadOperands(ref_hidden, ref_weight, ref_bias), labels,
                    EPSILON, transform=LogitTransform(*case.transform))  # fmt: skip


def _kept_probs_head(case: Case, impl: str, call: HeadCall) -> LinearLogprobs:
    """The fused head under a plan that keeps the policy's P for the backward (the planner picks it on CUDA only)."""
    plan = HeadPlan(impl, "trainable", case.token_chunk, case.vocab_chunk, tensor_cores=False, p_dtype=torch.float32,
                    keep_probs=True, interpreted=impl == "triton")  # fmt: skip
    return fused_linear_logprobs(call.flat(), PlanRequest(plan=plan)).reshaped(call.labels.shape)


def check_case(case: Case, impl: str, keep_probs: bool = False) -> None:
    """``impl`` on ``case`` (through ``linear_logprobs``, or with ``keep_probs`` the fused head under a kept-P plan)
    against float64: streams to STREAM_TOL, exact zeros at ignored positions, gradients to GRAD_TOL, and the
    ε-decisions of pairs (row 2k chosen, row 2k+1 rejected) wherever the float64 margin is clear."""
    call = case_call(case)
    (hidden, weight, bias), (ref_hidden, ref_weight, ref_bias) = call.policy, call.ref
    labels = call.labels
    scale, softcap = case.transform
    if keep_probs:
        out = _kept_probs_head(case, impl, call)
    else:
        out = linear_logprobs(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight,
                              epsilon=call.epsilon, bias=bias, ref_bias=ref_bias, impl=impl, transform=call.transform,
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
    want = token_logprobs64(h64, w64, labels, ref_hidden, w64 if case.shared else ref_weight, call.epsilon, b64,
                            (b64 if case.shared else ref_bias) if bias is not None else None,
                            scale=scale, softcap=softcap)  # fmt: skip

    for name, got, ref in zip(("policy", "ref", "plus", "minus"), out, want):
        assert got.dtype == torch.float32 and got.shape == labels.shape
        assert torch.isfinite(got).all()
        assert (got[labels == -100] == 0).all(), f"{name}: ignored positions must be exactly 0"
        assert rel(got, ref) <= STREAM_TOL, f"{name}: relative error {rel(got, ref):.2e} > {STREAM_TOL}"
    tol = GRAD_TOL[case.dtype]

    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(case.seed + 99), dtype=torch.float64)
    grads = torch.autograd.grad((out.policy.double() * upstream).sum(), leaves)
    grads64 = torch.autograd.grad((want[0] * upstream).sum(), leaves64)
    for got, ref in zip(grads, grads64):
        assert rel(got, ref) <= tol, f"gradient relative error {rel(got, ref):.2e} > {tol}"
    assert (grads[0][labels == -100] == 0).all()

    # decisions over pairs (row 2k chosen, row 2k+1 rejected) agree wherever the float64 margin exceeds DECISION_MARGIN
    seq = [s.double().sum(-1) for s in out]
    seq64 = [s.detach().sum(-1) for s in want]
    got_s = epsilon_decisions(seq[0][0::2] - seq[0][1::2], seq[2][0::2] - seq[2][1::2], seq[3][0::2] - seq[3][1::2])
    want_s = decisions64(seq64[0][0::2], seq64[0][1::2], seq64[2][0::2], seq64[2][1::2], seq64[3][0::2], seq64[3][1::2])
    L = seq64[0][0::2] - seq64[0][1::2]
    margin = torch.minimum((seq64[2][0::2] - seq64[2][1::2] - L).abs(), (L - seq64[3][0::2] + seq64[3][1::2]).abs())
    clear = margin > DECISION_MARGIN
    assert torch.equal(got_s.double()[clear], want_s[clear])
