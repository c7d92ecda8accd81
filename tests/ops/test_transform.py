"""The logit transform (``edpo_plugin.ops.transform``): ``z = cap·tanh(s·u / cap)`` and its slope against float64
autograd of that definition, the in-place and out-of-place forms agreeing bit for bit, and bad parameters refused
with an error naming them."""

from __future__ import annotations

import math

import pytest
import torch

from edpo_plugin.ops import LogitTransform, linear_logprobs
from tests.numerics import FOLD_TOL, rel

# none, Cohere-like scale, Granite-like 1/16, Gemma-2-like cap, cap with a scale, a cap that saturates tanh
TRANSFORMS = [(1.0, None), (4.0, None), (0.0625, None), (1.0, 30.0), (0.125, 50.0), (4.0, 30.0)]


@pytest.mark.parametrize("scale,softcap", TRANSFORMS)
def test_transform_and_slope_against_float64(scale, softcap):
    """``apply`` and ``apply_`` give the same bits and match float64; ``derivative`` at the transformed logits is
    dz/du of float64 autograd (a norm over the tile: where tanh saturates, 1 − t² of an fp32 t is coarse, but those
    slopes are tiny)."""
    transform = LogitTransform(scale, softcap)
    u = 40 * torch.randn(64, 257, generator=torch.Generator().manual_seed(0))
    u64 = u.double().requires_grad_()
    want = u64 * scale if softcap is None else softcap * torch.tanh(u64 * scale / softcap)
    (want_slope,) = torch.autograd.grad(want.sum(), [u64])

    z = transform.apply(u)
    assert torch.equal(transform.apply_(u.clone()), z)
    assert rel(z, want.detach()) <= FOLD_TOL
    slope = torch.as_tensor(transform.derivative(z)).expand_as(z)
    assert rel(slope, want_slope) <= FOLD_TOL
    assert transform.is_identity == (scale == 1.0 and softcap is None)


@pytest.mark.parametrize(
    "scale,softcap,match",
    [
        (0.0, None, "LogitTransform.scale must be finite and non-zero"),
        (math.inf, None, "LogitTransform.scale must be finite and non-zero"),
        (math.nan, None, "LogitTransform.scale must be finite and non-zero"),
        (1.0, 0.0, "LogitTransform.softcap must be finite and > 0"),
        (1.0, -30.0, "LogitTransform.softcap must be finite and > 0"),
        (1.0, math.inf, "LogitTransform.softcap must be finite and > 0"),
    ],
    ids=["scale-0", "scale-inf", "scale-nan", "cap-0", "cap-negative", "cap-inf"],
)
@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_bad_transform_is_refused_by_name(scale, softcap, match, impl):
    """A scale of 0 or a non-finite one, a cap that is not finite and positive: refused before any logit is computed
    (a zero scale would make every stream log(1/V), an infinite one NaN)."""
    h, w = torch.randn(3, 4), torch.randn(7, 4)
    with pytest.raises(ValueError, match=match):
        linear_logprobs(h, w, torch.tensor([1, 2, 3]), ref_hidden=h, ref_weight=w, epsilon=0.1, impl=impl,
                        transform=(scale, softcap))  # fmt: skip
