"""The input checks every implementation shares (``edpo_plugin.ops.contract.check_inputs``, reached through
``linear_logprobs``): a bad argument is refused with an error naming it, labels outside the vocabulary are refused
unless they are ``ignore_index``, whatever ``ignore_index`` is."""

from __future__ import annotations

import pytest
import torch

from edpo_plugin.ops import linear_logprobs, triton_available
from tests.numerics import STREAM_TOL, rel
from tests.spec_reference import token_logprobs64

IMPLS_HERE = ["naive", "chunked"] + (["triton"] if triton_available() else [])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"epsilon": 1.0}, "epsilon"),
        ({"epsilon": 0.0}, "epsilon"),
        ({"impl": "cuda"}, "impl"),
        ({"ref_hidden": torch.randn(2, 4)}, "ref_hidden"),
        ({"ref_weight": torch.randn(9, 4)}, "vocabulary"),
        ({"bias": torch.randn(3)}, "bias"),
        ({"ref_bias": torch.randn(3)}, "ref_bias"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    args = {"ref_hidden": torch.randn(3, 4), "ref_weight": torch.randn(7, 4), "epsilon": 0.1}
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        linear_logprobs(torch.randn(3, 4), torch.randn(7, 4), torch.tensor([1, 2, 3]), **args)


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
        assert (got[labels == -1] == 0).all() and rel(got, ref) <= STREAM_TOL
    (grad,) = torch.autograd.grad(out.policy.sum(), [h])
    assert (grad[labels == -1] == 0).all() and (grad[labels != -1] != 0).any()
    with pytest.raises(ValueError, match=r"labels hold -100, outside the vocabulary \[0, 70\) and not ignore_index=-1"):
        linear_logprobs(h, w, torch.tensor([1, -100, 5, 3, -1, 2]), ref_hidden=hr, ref_weight=w, epsilon=0.1,
                        impl=impl, ignore_index=-1)  # fmt: skip


@pytest.mark.parametrize(
    "labels,error,match",
    [
        (torch.tensor([1.0, 2.0, 3.0]), TypeError, "labels must be int64 or int32"),
        (torch.tensor([1, 2]), ValueError, r"labels \(2,\) must match hidden's leading shape \(3,\)"),
    ],
    ids=["float", "short"],
)
def test_bad_labels_are_named(labels, error, match):
    with pytest.raises(error, match=match):
        linear_logprobs(torch.randn(3, 4), torch.randn(7, 4), labels, ref_hidden=torch.randn(3, 4),
                        ref_weight=torch.randn(7, 4), epsilon=0.1)  # fmt: skip
