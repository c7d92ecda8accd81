"""Padding-free ε-DPO (``padding_free=True``) against the padded run of the same batch through the same trainer, and
against the model's own padded forward: streams, loss, gradients, decisions, the MoE router loss, β over 4 steps
(the first-step check on), and the switch to the packed attention.

Packing itself is tested in test_packing.py, what it refuses in test_packable.py, the packed attentions in
test_packed_attention.py, the check that stops a broken one in test_head_check.py.
"""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from edpo_plugin.trainer import EpsilonDPOConfig
from tests.numerics import PACKED_GRAD_TOL, PACKED_TOL, SAME_RUN_RTOL, SAME_STEP_RTOL, TRAINED_RTOL, rel
from tests.trainer.builders import BETA, StepRecorder, tiny_trainer


def _padded_layout(packed_stream: torch.Tensor, batch: dict) -> torch.Tensor:
    """``[R, T-1]``: a packed ``[1, M]`` label stream put back where the padded run has it (position t predicts token
    t + 1 of its row, for every next token that is a real completion token), from the batch's masks alone."""
    scored = (batch["attention_mask"][:, 1:] * batch["completion_mask"][:, 1:]).bool()
    assert packed_stream.shape == (1, int(scored.sum()))
    out = torch.zeros(scored.shape, dtype=packed_stream.dtype)
    out[scored] = packed_stream[0]
    return out


def _shared_prefix_lengths(batch: dict) -> list[int]:
    """Tokens each pair's rejected row has in common with its chosen row from the start, counted token by token."""
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
    half = len(rows) // 2
    shared = []
    for chosen, rejected in zip(rows[:half], rows[half:], strict=True):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        shared.append(n)
    return shared


@contextlib.contextmanager
def _unpacked_attention(models):
    """The models' own attention (sdpa / eager) instead of ε-DPO's packed form, for a padded step."""
    from edpo_plugin.trainer.packed_attention import PACKED_FOR

    own = {packed: name for name, packed in PACKED_FOR.items()}
    switched = [(m, m.config._attn_implementation) for m in models if m.config._attn_implementation in own]
    for m, packed in switched:
        m.set_attn_implementation(own[packed])
    try:
        yield
    finally:
        for m, packed in switched:
            m.set_attn_implementation(packed)


def _run_step(trainer, batch, padding_free: bool, recorder: StepRecorder):
    trainer.batch_layout = dataclasses.replace(trainer.batch_layout, padding_free=padding_free)
    trainer.model.zero_grad(set_to_none=True)
    padded = contextlib.nullcontext() if padding_free else _unpacked_attention([trainer.model, trainer.ref_model])
    with padded:
        loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), recorder.streams[-1], recorder.outs[-1], grads


@pytest.mark.parametrize(("attn", "share_prompt"), [("sdpa", True), ("sdpa", False), ("eager", True)])
def test_same_batch_padded_and_padding_free_agree(tiny_default, tmp_path, monkeypatch, attn, share_prompt):
    recorder = StepRecorder(monkeypatch)
    trainer = tiny_trainer(tiny_default, tmp_path, padding_free=True, attn=attn, edpo_share_prompt=share_prompt)
    assert trainer.batch_layout.share_prompt == share_prompt
    with torch.no_grad():  # the policy away from the reference, so that decisions are not all 0
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = next(iter(trainer.get_train_dataloader()))
    mask = batch["attention_mask"]
    assert not bool(mask.all()), "the batch should carry padding"
    trainer.model.train()
    trainer._head_checked = True  # the check has its own test; here the streams are compared directly

    loss_pad, streams_pad, out_pad, grads_pad = _run_step(trainer, batch, False, recorder)
    loss_pf, streams_pf, out_pf, grads_pf = _run_step(trainer, batch, True, recorder)

    # the backbone saw only real tokens, a pair's common prefix once when shared (at least its whole prompt)
    shared = _shared_prefix_lengths(batch) if share_prompt else [0]
    if share_prompt:
        prompts = batch["completion_mask"].long().argmax(dim=1)[: len(shared)]
        assert all(n >= int(p) > 0 for n, p in zip(shared, prompts, strict=True)), "prompts should be shared"
    backbone_tokens = int(mask.sum()) - sum(shared)
    assert trainer._metrics["train"]["backbone_tokens"] == [batch["input_ids"].numel(), backbone_tokens]
    completion = batch["completion_mask"][:, 1:].bool()
    for name, pad, pf in zip(("policy", "reference", "plus", "minus"), streams_pad, streams_pf, strict=True):
        pf = _padded_layout(pf, batch)
        assert (pf - pad * completion).abs().max().item() <= PACKED_TOL, (
            f"{name}: packed and padded token log-probs differ"
        )
    # and the policy stream is the model's own padded forward
    with torch.no_grad(), _unpacked_attention([trainer.model]):
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=mask).logits[:, :-1].double()
    own = logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1) * completion
    assert (_padded_layout(streams_pf[0], batch).double() - own).abs().max().item() <= PACKED_TOL

    assert torch.equal(out_pf.decisions, out_pad.decisions)
    assert out_pad.decisions.abs().sum() > 0, "the batch should move β"
    assert abs(loss_pf.item() - loss_pad.item()) <= SAME_STEP_RTOL * abs(loss_pad.item())
    assert grads_pf.keys() == grads_pad.keys() == {n for n, _ in trainer.model.named_parameters()}
    for name, g in grads_pad.items():
        err = rel(grads_pf[name], g)
        assert err <= PACKED_GRAD_TOL, f"{name}: relative gradient difference {err:.2e}"


def test_flash_attention_model_shares_prompts_and_matches_padded(tiny_default, tmp_path, monkeypatch):
    """A FlashAttention-2 model (the 7–8B YAMLs' flash_attention: true) runs padding-free as ε-DPO's varlen attention
    and shares prompts; its step (the varlen kernel replaced by the reference written from FlashAttention's
    documented semantics) gives the padded SDPA step's streams, loss and gradients."""
    from edpo_plugin.trainer import packed_attention
    from tests.varlen_reference import reference_varlen

    monkeypatch.setattr(packed_attention, "varlen_kernel", lambda: reference_varlen)
    recorder = StepRecorder(monkeypatch)
    trainer = tiny_trainer(tiny_default, tmp_path, padding_free=True, attn="flash_attention_2")
    assert trainer.model.config._attn_implementation == packed_attention.PACKED_FLASH
    assert trainer.batch_layout.share_prompt
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    trainer._head_checked = True
    loss_pf, streams_pf, out_pf, grads_pf = _run_step(trainer, batch, True, recorder)
    for m in (trainer.model, trainer.ref_model):
        m.set_attn_implementation("sdpa")
    loss_pad, streams_pad, out_pad, grads_pad = _run_step(trainer, batch, False, recorder)
    completion = batch["completion_mask"][:, 1:].bool()
    for pad, pf in zip(streams_pad, streams_pf, strict=True):
        assert (_padded_layout(pf, batch) - pad * completion).abs().max().item() <= PACKED_TOL
    assert torch.equal(out_pf.decisions, out_pad.decisions)
    assert abs(loss_pf.item() - loss_pad.item()) <= SAME_STEP_RTOL * abs(loss_pad.item())
    for name, g in grads_pad.items():
        assert rel(grads_pf[name], g) <= PACKED_GRAD_TOL, name


def test_moe_router_aux_loss_is_the_padded_one(tiny_default, tmp_path, monkeypatch):
    """Packed, the router's load-balancing loss averages over the real tokens without an attention mask; padded, over
    the attention mask's ones: the same tokens, so the same auxiliary loss and total loss."""
    recorder = StepRecorder(monkeypatch)
    trainer = tiny_trainer(tiny_default, tmp_path, padding_free=True, moe=True, router_aux_loss_coef=0.5)
    assert trainer.aux_loss_enabled and not trainer.batch_layout.share_prompt  # a shared prompt would count once in it
    with pytest.raises(ValueError, match="edpo_share_prompt=True would change the MoE router auxiliary loss"):
        tiny_trainer(tiny_default, tmp_path / "shared", padding_free=True, moe=True, router_aux_loss_coef=0.5,
                 edpo_share_prompt=True)  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    assert not bool(batch["attention_mask"].all())
    trainer.model.train()
    trainer._head_checked = True
    loss_pad, _, _, grads_pad = _run_step(trainer, batch, False, recorder)
    loss_pf, _, _, grads_pf = _run_step(trainer, batch, True, recorder)
    aux_pad, aux_pf = trainer._metrics["train"]["aux_loss"]
    assert aux_pad > 0 and aux_pf == pytest.approx(aux_pad, rel=SAME_STEP_RTOL)
    assert abs(loss_pf.item() - loss_pad.item()) <= SAME_STEP_RTOL * abs(loss_pad.item())
    for name, g in grads_pad.items():
        assert rel(grads_pf[name], g) <= PACKED_GRAD_TOL, name


def _betas_and_losses(trainer) -> tuple[list[float], list[float]]:
    logs = trainer.state.log_history
    return [h["kl/beta"] for h in logs if "kl/beta" in h], [h["loss"] for h in logs if "loss" in h]


@pytest.mark.parametrize("share_prompt", [None, False])
def test_four_steps_padded_and_padding_free_give_the_same_beta(tiny_default, tmp_path, share_prompt):
    """Through ``train()`` with the first-step check on: β after each of 4 optimizer steps and the losses agree
    (``edpo_share_prompt`` unset shares prompts with this sdpa model)."""
    runs = {}
    for padding_free in (False, True):
        overrides = {"edpo_share_prompt": share_prompt} if padding_free else {}
        trainer = tiny_trainer(tiny_default, tmp_path / str(padding_free), padding_free=padding_free,
                           gradient_accumulation_steps=2, per_device_train_batch_size=2, **overrides)  # fmt: skip
        assert trainer.batch_layout.share_prompt == (padding_free and share_prompt is None)
        trainer.train()
        runs[padding_free] = (*_betas_and_losses(trainer), trainer.beta_controller.beta)
    (betas_pad, losses_pad, final_pad), (betas_pf, losses_pf, final_pf) = runs[False], runs[True]
    assert len(betas_pad) == 4 and final_pad != BETA, "the run should move β"
    assert betas_pf == pytest.approx(betas_pad, rel=SAME_RUN_RTOL)
    assert final_pf == pytest.approx(final_pad, rel=SAME_RUN_RTOL)
    assert losses_pf == pytest.approx(losses_pad, rel=TRAINED_RTOL)


def test_padding_free_switches_to_packed_attention(tiny_default, tmp_path):
    from edpo_plugin.trainer.packed_attention import PACKED_EAGER, PACKED_SDPA

    trainer = tiny_trainer(tiny_default, tmp_path / "pf", padding_free=True)
    assert trainer.model.config._attn_implementation == PACKED_SDPA
    assert trainer.ref_model.config._attn_implementation == PACKED_SDPA
    assert tiny_trainer(tiny_default, tmp_path / "pad", padding_free=False).model.config._attn_implementation == "sdpa"
    assert trainer.batch_layout.share_prompt
    eager = tiny_trainer(tiny_default, tmp_path / "eager", padding_free=True, attn="eager")
    assert eager.model.config._attn_implementation == PACKED_EAGER and eager.batch_layout.share_prompt
    unshared = tiny_trainer(tiny_default, tmp_path / "no", padding_free=True, edpo_share_prompt=False)
    assert not unshared.batch_layout.share_prompt
    with pytest.raises(ValueError, match="edpo_share_prompt=True .* needs padding_free=True"):
        EpsilonDPOConfig(output_dir=str(tmp_path), edpo_share_prompt=True, use_cpu=True)
