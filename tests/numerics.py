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

# --- the trainer (tests/trainer) -----------------------------------------------------------------------------------
# The yardsticks here are models' own forwards (transformers / peft, fp32), float64 copies of them and TRL's
# DPOTrainer on the same batch. Token log-probs are O(1–10) nats; the test models' logits reach |z| ≤ 80 (the
# architecture table scales heads so that transforms bite), so one fp32 rounding of a logit is ≤ 80·2⁻²⁴ ≈ 5e-6.

# The fused head's four streams against log_softmax of the model's own fp32 logits (relative, rel()): the same fp32
# head input and weights, the logits summed in another order (the head tiles the vocabulary; the model runs one
# GEMM) before one log-sum-exp; seen ≤ 1.2e-7 over every architecture of tests/trainer/architectures.py. 1e-5 leaves
# ~100× room, and a misread transform moves the streams by > 1 nat there (the table makes every transform bite).
MODEL_STREAM_TOL = 1e-5

# A parameter's gradient through the fused head against autograd through the model's own logits (or a float64 copy of
# the model, or TRL's DPOTrainer), relative per parameter. The head's d loss / d h is as close as its streams (~1e-7),
# but a parameter's gradient is a sum over positions, layers and the two routes of a tied embedding whose terms
# largely cancel: its relative error is the terms' fp32 rounding over the small net, and backprop through norms and
# attention amplifies it. Seen ≤ 2.7e-6 against the model's autograd (Mamba-2's dt_bias; ≤ 1e-6 elsewhere), ≤ 8e-7
# against a float64 model, ≤ 1.5e-6 for QLoRA's factors, ≤ 9e-7 against TRL. 1e-4: ~40× room, where a modelling slip
# (a transform on the wrong side, a dropped bias or adapter) moves gradients by ≥ 1e-2.
MODEL_GRAD_TOL = 1e-4

# A gradient that is 0 in exact arithmetic (a key-projection bias: softmax ignores a constant shift of every key score)
# is fp32 cancellation noise in both, of the order of 1e-7 of the largest gradient: below 1e-6 of that, a gradient is
# compared absolutely against that floor, not relatively.
MODEL_GRAD_NOISE = 1e-6

# One token's log-prob from two fp32 computations of the same logits (lm_head(h) in float64 from the captured head
# input against the model's own logits; the first-step check's fused head against the model's forward), absolute
# nats per entry: ≤ ~2 roundings of |z| ≤ 80, ≈ 1e-5; seen ≤ 6.6e-6 (MiniCPM3). 1e-4 is the first-step check's own
# floor (head_check.compare_with_model: 3·u·(1 + max|z|) + 1e-4), so a model the check must pass passes with room.
MODEL_LOGPROB_ATOL = 1e-4

# A token's log-prob from a packed row (padding-free: sequences end to end, a pair's prompt once) against its row's own
# unpadded or padded forward, absolute nats per entry: the same fp32 model, attention summing the same keys in another
# grouping (one call per sequence, or a varlen call) and the GEMMs over another number of rows; seen ≤ 3.4e-6 over
# the architecture table (|z| ≤ 80), ≤ 1.9e-6 through the trainer. Attention across a sequence boundary, or a dropped
# shared prompt, moves log-probs by ≥ 1e-2.
PACKED_TOL = 1e-5

# The same step's parameter gradients packed and padded (relative, per parameter): both go through the fused head and
# the same backbone; only the attention's grouping and reduction orders differ (~1e-7 per term), summed over positions
# whose contributions cancel in part (see MODEL_GRAD_TOL): seen ≤ 1.1e-6.
PACKED_GRAD_TOL = 1e-5

# A step's loss against a float64 yardstick (full float64 logits through the spec's loss) or TRL's DPOTrainer on the
# same batch (relative): the loss (O(0.7)) is a mean of log σ over margins of float64 sums of fp32 token log-probs
# (STREAM_TOL-level relative errors on sums of O(10–100) nats, four to a margin, times β ≈ 0.1); seen ≤ 1.2e-7.
STEP_LOSS_RTOL = 1e-5

# One step's loss by two routes that compute the same fp32 token log-probs (packed and padded; a doubled BOS dropped or
# never written; the router auxiliary term added; a fresh LoRA's policy equal to its reference), relative: only the
# order of fp32 reductions differs; seen ≤ 7e-8.
SAME_STEP_RTOL = 1e-6

# β and s̄ of two runs whose decisions must be identical (micro-batched 4×1, 2×2, 1×4; packed or padded; resumed or
# straight): β = β / (1 + ε·s̄) in float64 from the same decisions, logged through fp32 means (2⁻²⁴ each); relative
# for β, absolute for s̄ ∈ [−1, 1]; seen equal. One flipped decision moves s̄ by 1/(pairs in the step), 1/4 here.
SAME_RUN_RTOL = 1e-6

# Losses, grad norms and weights of two equivalent runs after several optimizer steps (tensor-parallel or whole,
# packed or padded, naive or chunked head, resumed or straight): their gradients differ by fp32 rounding (~1e-7
# relative) and Adam's normalised update passes that on to the weights step by step; seen ≤ 3.5e-7 (naive / chunked
# after 3 steps). 1e-5 relative, 1e-6 absolute for weights near 0.
TRAINED_RTOL = 1e-5
TRAINED_ATOL = 1e-6

# A float64 computation on both sides from identical inputs (β's rule from the logged s̄, s̄ from float64 decisions;
# relative, or absolute for quantities of order 1): a handful of float64 roundings, ~1e-16 each.
FLOAT64_TOL = 1e-12

# float64 per-sequence sums of 4096 fp32 token log-probs of ≈ −3.5 against math.fsum (absolute): torch's blocked
# reduction errs by ≤ log2(4096)·2⁻⁵³·Σ|x| ≈ 12 · 1.1e-16 · 1.4e4 ≈ 2e-11; an fp32 accumulation errs by ~1e-3.
FLOAT64_SUM_ATOL = 1e-9

# A metric as TensorBoard stores it (an fp32 scalar) against the float64 value the trainer logged: one rounding,
# 2⁻²⁴ ≈ 6e-8 relative; absolute 1e-7 for values near 0 (margins, s̄).
LOGGED_RTOL = 1e-6
LOGGED_ATOL = 1e-7
