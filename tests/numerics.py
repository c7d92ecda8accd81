"""How far a result may sit from its yardstick: the relative error every test measures, and the named tolerances,
each with the arithmetic behind it. Import from here; do not define a tolerance or a ``rel`` in a test file.

Units: rounding to fp32 moves a value by at most 2⁻²⁴ ≈ 6e-8 relative (24 significant bits); rounding to bf16 (8
significant bits) by at most 2⁻⁸ ≈ 4e-3 per entry, ≈ 2⁻¹⁰ as a norm over many entries. A relative tolerance below is
measured by :func:`rel` (a norm over the whole tensor) unless its comment says "per entry".
"""

from __future__ import annotations

import torch


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """``‖got − want‖ / ‖want‖`` in float64 (Frobenius norms; ``‖want‖`` floored at 1e-30, so zero against zero is 0).

    ``want`` is the yardstick (usually float64); ``got`` may have any floating dtype.
    """
    want = want.double()
    return ((got.double() - want).norm() / want.norm().clamp(min=1e-30)).item()


# --- the log-prob head (tests/ops) -----------------------------------------------------------------------------------

# Per-token streams (log-probs) against the float64 spec on the same inputs. The inputs are exact in float64 whatever
# their dtype, so a stream carries only its fp32 arithmetic: a dot product over d ≤ 48 terms and a log-sum-exp over
# the vocabulary, each term rounded at 2⁻²⁴; seen ≈ 1e-7. 1e-5 leaves ~100× room yet is ~100× below what a modelling
# slip costs (a dropped bias, a transform applied once too often, ε on the wrong side all move streams by ≥ 1e-3).
# Also an absolute bound per entry where a test compares two of our own paths (the sharded head with the unsharded
# one, megatron-core's cross entropy): log-probs of the test vocabularies are O(1)–O(10).
STREAM_TOL = 1e-5

# A tensor delivered in bf16 (a gradient of bf16 inputs, a bf16 copy of P): its own final rounding alone is ≈ 2⁻¹⁰ as a
# norm (≤ 2⁻⁸ per entry); 2⁻⁸ bounds that rounding plus the fp32 arithmetic before it.
BF16_TOL = 2**-8

# Gradients the head returns (hidden, weight, bias) against float64 autograd, by the dtype they are delivered in:
# fp32 as the streams (the same sums, once more through a GEMM); bf16 adds its final rounding (BF16_TOL).
GRAD_TOL = {torch.float32: STREAM_TOL, torch.bfloat16: BF16_TOL}

# One fold of one vocabulary tile against float64 from its definition: each entry goes through a handful of fp32
# operations (bias, scale, tanh, the ε-mixes, exp, one rescale), a row sum over ≤ 101 columns; ≈ 16 ulps (2⁻²⁴).
FOLD_TOL = 1e-6

# The sharded (vocab-parallel) head's gradients against the unsharded op / megatron-core, per entry, as a fraction of
# the largest entry: an fp32 entry is a sum of ≤ V (≤ 48) products summed in another order (per shard, then merged),
# a few V·2⁻²⁴ of the largest; a bf16 hidden gradient is two bf16-rounded halves summed in bf16 where the unsharded one
# is rounded once: a few roundings of ≤ 2⁻⁸ each, so 2⁻⁶.
SHARDED_GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 2**-6}

# The same fp32 computation under a different caller state (the caller's autocast on or off): the head disables
# autocast, so only a reduction order may differ; per entry, relative and absolute.
SAME_MATH_TOL = 1e-6

# ε-decisions (s_i) compare L⁺ / L / L⁻ of a pair's sequence sums; a sum of ≤ 23 tokens carries ≤ 23 per-token errors
# of STREAM_TOL relative (log-probs O(10)), so a float64 margin above 1e-4 cannot be flipped by rounding.
DECISION_MARGIN = 1e-4

# --- the ε-DPO loss (tests/test_loss.py) ---------------------------------------------------------------------------

# β_i = β / (1 + ε·s_i) in fp32: two roundings (≈ 1.2e-7 relative), seen 1e-7.
BETA_RTOL = 1e-6

# Per-pair loss and rewards (torch.testing.assert_close arguments) from fp32 sequence log-probs |log p| ≤ 20: rounding
# them is ≤ 20·2⁻²⁴ ≈ 1.2e-6 each; the margin m adds four, β_i ≈ 0.1 scales it, log σ has slope ≤ 1: ≤ 5e-7 absolute
# in the loss (seen 2e-7), ≤ 2.4e-7 in a reward β_i·(log π − log π_ref).
LOSS_TOL = {"rtol": 1e-5, "atol": 1e-6}

# d loss / d log π of the same fp32 loss: −(1−α)β_i·σ(−x) + α·β_i·σ(x), whose two terms nearly cancel where
# e^x ≈ (1−α)/α; seen 1.5e-6 relative (α = 0.1, 0.3) and 1e-8 absolute on gradients ≥ 1.6e-4.
LOSS_GRAD_TOL = {"rtol": 1e-5, "atol": 1e-7}
