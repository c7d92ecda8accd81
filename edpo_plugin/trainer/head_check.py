"""First-step check: the fused head against the model's own forward, on the first micro-batch.

:mod:`model_head` describes the logits of the architectures it knows; this catches the ones nobody listed (a
subclass that rescales its logits, a new architecture with a post-head op). On the first micro-batch of training or
evaluation, with dropout off, the trainer runs each model (policy and reference) twice: once the way training runs it
(:func:`~edpo_plugin.trainer.model_head.forward_to_head`, whose head input feeds the fused head), once as the model's
own plain forward, one row at a time, whose ``log_softmax(logits)`` is the yardstick. Padded training checks the row
with the shortest prompt, cut 16 completion tokens after it (at most 256 tokens); padding-free training checks the
whole micro-batch packed exactly as training packs it (its real lengths, shared prompts), every next token a label,
so that attention across packed sequences or a position read from the row shows up. Separate calls, so a training
path that differs from the model's forward in any way (a hook that does not fire, a rescaled hidden state, a scaled
or capped logit) shows up as a difference. Cost: once per run, one training-path forward and one own forward per row,
per model.

The tolerance follows the arithmetic of the model's own logits: they are rounded to the precision they are computed
in (bf16 under mixed precision, TF32 when enabled), so a log-prob can move by up to about twice the unit roundoff
times the largest logit.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from trl.trainer.utils import use_adapter

from edpo_plugin.trainer.batch import BatchLayout, MicroBatch
from edpo_plugin.trainer.distributed import fsdp_unit_gathered, is_wrapped, run_as_forward_of
from edpo_plugin.trainer.forwards import Backbones, Forwards
from edpo_plugin.trainer.model_head import HeadView

logger = logging.getLogger(__name__)

CHECK_COMPLETION_TOKENS = 16
CHECK_MAX_TOKENS = 256  # the padded check's row
LOGSOFTMAX_ROWS = 256  # positions per float64 log-softmax of the model's own logits (256 × 128k × 8 B = 256 MiB)


class HeadMismatchError(RuntimeError):
    """The fused head's log-probs differ from the model's own beyond rounding: training would optimise another
    objective."""


def check_row(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(ids [1, L], mask [1, L])``: among the rows with at least two real tokens (one label), the one with the
    shortest prompt, cut ``CHECK_COMPLETION_TOKENS`` completion tokens after its prompt and to at most
    ``CHECK_MAX_TOKENS`` tokens; None when every row has fewer than two tokens.
    """
    lengths = attention_mask.sum(dim=1)
    if not bool((lengths >= 2).any()):
        return None
    first = _completion_starts(input_ids, completion_mask).masked_fill(lengths < 2, input_ids.shape[1] + 1)
    row = int(first.argmin())
    length = min(int(first[row]) + CHECK_COMPLETION_TOKENS, int(lengths[row]), CHECK_MAX_TOKENS)
    length = max(length, 2)
    return input_ids[row : row + 1, :length], attention_mask[row : row + 1, :length]


def _completion_starts(input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """int64 ``[R]``: each row's first completion position (``T`` for a row with none)."""
    has_completion = completion_mask.bool().any(dim=1)
    return completion_mask.long().argmax(dim=1).masked_fill(~has_completion, input_ids.shape[1])


@contextlib.contextmanager
def dropout_off(models: list[torch.nn.Module]) -> Iterator[None]:
    """Dropout layers, and attention modules with an ``attention_dropout``, out of training mode while the check runs
    (each module's own flag only). Not ``model.eval()``: that would put every module in inference mode, and some
    change their weights there (bitsandbytes repacks 4-bit weights for CPU inference)."""
    flipped = [
        m
        for model in models
        for m in model.modules()
        if m.training and (isinstance(m, torch.nn.modules.dropout._DropoutNd) or getattr(m, "attention_dropout", 0))
    ]
    for m in flipped:
        m.training = False
    try:
        yield
    finally:
        for m in flipped:
            m.training = True


class OwnForward(NamedTuple):
    """What the model's own forward gave on the check row."""

    logprobs: torch.Tensor  # float64 [1, L-1]: log_softmax(logits)[labels]
    roundoff: float  # unit roundoff of the precision the logits were computed in
    max_logit: float  # largest |z| of the logits before and after the transform (pre-cap under a soft cap)


def own_forward_logprobs(
    forward: Callable[[], torch.Tensor], head_module: torch.nn.Module, labels: torch.Tensor, scale: float = 1.0
) -> OwnForward:
    """Run ``forward()`` (the model's own forward, returning logits ``[1, L, V]``; ``labels`` is ``[1, L-1]``) and
    read, through a hook on its output layer ``head_module``, the magnitude of the logits before the transform: a
    rounding error there reaches the final logits through the transform's slope (``scale``, at most 1 under a soft
    cap), so the tolerance follows ``max(|z_final|, |scale|·|z_pre|)``."""
    pre: list[float] = []
    eps = []

    def grab(_module: torch.nn.Module, _args: tuple, output: torch.Tensor) -> None:
        local = output.to_local() if hasattr(output, "to_local") else output
        pre.append(float(local.detach().abs().max()) if local.numel() else 0.0)
        eps.append(torch.finfo(local.dtype).eps)  # the output layer's own precision (a bf16 model's bf16 logits)

    handle = head_module.register_forward_hook(grab)
    try:
        logits = forward()
    finally:
        handle.remove()
    shifted = logits[:, :-1]
    logprobs = torch.cat(
        [
            shifted[:, t : t + LOGSOFTMAX_ROWS]
            .double()
            .log_softmax(-1)
            .gather(-1, labels[:, t : t + LOGSOFTMAX_ROWS, None])
            for t in range(0, shifted.shape[1], LOGSOFTMAX_ROWS)
        ],
        dim=1,
    ).squeeze(-1)
    # Logits may be upcast after a bf16 matmul (accelerate returns fp32 outputs under autocast), and fp32 matmuls may
    # run in TF32: their precision is the least of their dtype, the output layer's, the autocast dtype and TF32's.
    device = logits.device.type
    eps.append(torch.finfo(logits.dtype).eps)
    if torch.is_autocast_enabled(device):
        eps.append(torch.finfo(torch.get_autocast_dtype(device)).eps)
    tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    if device == "cuda" and tf32:
        eps.append(2.0**-10)  # TF32 keeps 10 mantissa bits
    magnitude = max([float(shifted.abs().max())] + [abs(scale) * p for p in pre])
    return OwnForward(logprobs, max(eps) / 2, magnitude)


def merge_own(parts: list[OwnForward]) -> OwnForward:
    """One :class:`OwnForward` for several rows checked separately: log-probs laid end to end (``[1, Σ(L_i − 1)]``),
    the coarsest roundoff and the largest logit."""
    return OwnForward(
        torch.cat([p.logprobs for p in parts], dim=1),
        max(p.roundoff for p in parts),
        max(p.max_logit for p in parts),
    )


def compare_with_model(own: OwnForward, fused_logprobs: torch.Tensor, what: str, packed: bool = False) -> float:
    """Raise :class:`HeadMismatchError` unless ``|fused − own| ≤ tolerance`` at every position; return the largest
    difference. Tolerance ``3·u·(1 + max|z|) + 1e-4``, ``u`` the unit roundoff the model's logits were computed in.
    ``packed``: the fused side ran padding-free (several sequences packed into one row)."""
    tolerance = 3 * own.roundoff * (1.0 + own.max_logit) + 1e-4
    worst = float((fused_logprobs.double() - own.logprobs).abs().max())
    if not worst <= tolerance and packed:
        raise HeadMismatchError(
            f"{what}: with padding_free=True, two sequences packed into one row as training packs them get log-probs "
            f"up to {worst:.4g} nats away from each sequence's own unpadded forward (tolerance {tolerance:.3g}). "
            "Its attention does not keep packed sequences apart (it needs restarting position_ids to split them: "
            "FlashAttention-2 on GPU, SDPA / eager on CPU), or its logits are not what ε-DPO's head computes (then "
            "padding_free=False fails the same check). Set padding_free=False (Axolotl: remove dpo_padding_free); "
            "if only the shared prompts are at fault, edpo_share_prompt=False."
        )
    if not worst <= tolerance:
        raise HeadMismatchError(
            f"{what}: the fused head's log-probs differ from the model's own forward by up to {worst:.4g} nats "
            f"(tolerance {tolerance:.3g} for logits of magnitude up to {own.max_logit:.3g} computed with unit "
            f"roundoff {own.roundoff:.2g}). Its logits are not transform(lm_head(h)) as ε-DPO describes them, so "
            "training would optimise a different objective. Please report the architecture; set "
            "edpo_head_check=False only if you know better."
        )
    return worst


# ------------------------------------------------------------------------------------------ the check, as trained


class CheckSide(NamedTuple):
    """One model of the check: the forward that is the yardstick, and what training's path gave for it."""

    what: str  # "LlamaForCausalLM (policy)"
    own_forward: torch.nn.Module  # called per row: the model's own plain forward
    view: HeadView  # its head, as training reads it
    hidden: torch.Tensor  # training's head input for the check batch (no grad)
    adapters: bool  # whether its head weights are read with adapters on
    gather: Callable[[], contextlib.AbstractContextManager]  # gathers its sharded units for the head's read
    peft_reference: bool  # the policy with its adapters off (PEFT) is this model


def check_batch(layout: BatchLayout, inputs: dict[str, torch.Tensor]) -> tuple[MicroBatch, list[torch.Tensor]] | None:
    """``(the batch the check runs, each row's real tokens [1, L] with L ≥ 2)``, or None when there is no row with a
    label. Padded: one short row (:func:`check_row`); padding-free: the whole micro-batch packed as training packs it,
    every next token a label."""
    if layout.padding_free:
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        batch = layout.lay_out({"input_ids": ids, "attention_mask": mask}, scored=None)
    else:
        row = check_row(inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"])
        if row is None:
            return None
        ids, mask = row
        batch = layout.lay_out({"input_ids": ids, "attention_mask": mask}, scored=None)
    rows = [ids[i : i + 1, mask[i].bool()] for i in range(ids.shape[0]) if int(mask[i].sum()) >= 2]
    return (batch, rows) if rows else None


def own_logprobs(side: CheckSide, rows: list[torch.Tensor]) -> OwnForward:
    """The model's own forward, one unpadded row at a time, as the yardstick."""
    parts = []
    for row in rows:
        kwargs = {"input_ids": row, "attention_mask": torch.ones_like(row), "use_cache": False}
        forward = functools.partial(_logits, side.own_forward, kwargs)
        parts.append(own_forward_logprobs(forward, side.view.module, row[:, 1:], side.view.transform.scale))
    return merge_own(parts)


@contextlib.contextmanager
def own_attention(causal_lm: torch.nn.Module) -> Iterator[None]:
    """The model's own attention (sdpa / eager) while the yardstick runs, not ε-DPO's packed form: its unpacked path
    is code under test, and it never sees what transformers puts in the mask (a sliding window the attention module
    does not pass on, PhiMoE's). The varlen form stays (FlashAttention-2 may not be loadable here)."""
    from edpo_plugin.trainer.packed_attention import PACKED_EAGER, PACKED_SDPA

    packed = causal_lm.config._attn_implementation
    own = {PACKED_SDPA: "sdpa", PACKED_EAGER: "eager"}.get(packed)
    if own is None:
        yield
        return
    causal_lm.set_attn_implementation(own)
    try:
        yield
    finally:
        causal_lm.set_attn_implementation(packed)


def _logits(model: torch.nn.Module, kwargs: dict) -> torch.Tensor:
    return model(**kwargs).logits


def fused_logprobs(backbones: Backbones, side: CheckSide, batch: MicroBatch) -> torch.Tensor:
    """The fused head's policy stream on training's head input for ``side`` (its reference: itself)."""
    weight, bias = side.view.weight_and_bias(adapters=side.adapters)
    hidden = batch.head_input(side.hidden)
    return backbones.fused(hidden, weight, bias, batch.labels, side.view).policy


def check_side(backbones: Backbones, side: CheckSide, batch: MicroBatch, rows: list[torch.Tensor], packed: bool,
               unwrapped: torch.nn.Module) -> float:  # fmt: skip
    """Compare one model's fused head with its own forward (:func:`compare_with_model`); the largest difference."""
    adapter = "ref" if side.peft_reference and "ref" in unwrapped.peft_config else None
    own_context = use_adapter(unwrapped, adapter_name=adapter) if side.peft_reference else contextlib.nullcontext()
    with own_context, own_attention(side.view.causal_lm):
        own = own_logprobs(side, rows)
    with side.gather():
        got = run_as_forward_of(side.view.module, functools.partial(fused_logprobs, backbones, side, batch))
    return compare_with_model(own, got, side.what, packed=packed)


def run_check(backbones: Backbones, layout: BatchLayout, model: torch.nn.Module, unwrapped: torch.nn.Module,
              inputs: dict[str, torch.Tensor], redirect: Callable) -> bool:  # fmt: skip
    """The first-step check on one micro-batch (see the module docstring), on every rank (its forwards take the same
    collectives everywhere); False when the micro-batch has no row to check (the next one is checked then).
    ``model``: the trainer's (maybe wrapped) model, ``unwrapped`` the module inside; ``redirect``: TRL's forward
    redirection, to run training's path inside a wrapper's forward."""
    picked = check_batch(layout, inputs)
    if picked is None:
        return False
    batch, rows = picked
    ref_model = backbones.ref_model
    models = [unwrapped] + ([] if ref_model is None else [backbones.accelerator.unwrap_model(ref_model)])
    with dropout_off(models), torch.no_grad(), backbones.accelerator.autocast():
        if is_wrapped(model, unwrapped):
            forwards = redirect(model, unwrapped, backbones.run, unwrapped, batch, True, False)
        else:
            forwards = backbones.run(model, batch, False, False)
        forwards.ref_gathered.close()
        worst = [(side.what, check_side(backbones, side, batch, rows, layout.padding_free, unwrapped))
                 for side in _sides(model, ref_model, forwards)]  # fmt: skip
    for what, difference in worst:
        logger.info("ε-DPO head check, %s: fused head within %.3g nats of the model's own log-probs.", what, difference)
    return True


def _sides(model: torch.nn.Module, ref_model: torch.nn.Module | None, forwards: Forwards) -> list[CheckSide]:
    name = type(forwards.view.causal_lm).__name__
    policy_units = functools.partial(fsdp_unit_gathered, model)
    policy = CheckSide(f"{name} (policy)", model, forwards.view, forwards.policy.hidden, True, policy_units, False)
    if ref_model is None:  # PEFT: the policy with its adapters off
        reference = CheckSide(f"{name} (reference)", model, forwards.view, forwards.ref_hidden, False, policy_units,
                              True)  # fmt: skip
    else:
        units = functools.partial(_gathered, ref_model, forwards.ref_view.module)
        reference = CheckSide(f"{name} (reference)", ref_model, forwards.ref_view, forwards.ref_hidden,
                              forwards.ref_adapters, units, False)  # fmt: skip
    return [policy, reference]


@contextlib.contextmanager
def _gathered(*modules: torch.nn.Module) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for module in modules:
            stack.enter_context(fsdp_unit_gathered(module))
        yield
