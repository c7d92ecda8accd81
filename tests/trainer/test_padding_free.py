"""Padding-free ε-DPO (``padding_free=True``) against the padded run of the same batch through the same trainer, and
against the model's own padded forward: streams, loss, gradients, decisions, the first-step check, β over 4 steps."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import edpo_plugin.trainer.forwards as forwards_module
import edpo_plugin.trainer.trainer as trainer_module
from edpo_plugin.trainer import EpsilonDPOConfig, EpsilonDPOTrainer
from edpo_plugin.trainer.head_check import HeadMismatchError
from edpo_plugin.trainer.packing import pack_rows
from tests.varied_rows import varied_rows

BETA, EPS = 0.1, 0.2


def _tiny_llama(tok, attn: str = "sdpa") -> LlamaForCausalLM:
    """A 2-layer Llama with weights large enough that attention across a sequence boundary moves the log-probs."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=-(-len(tok) // 8) * 8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.2, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)  # fmt: skip
    config._attn_implementation = "sdpa" if attn == "flash_attention_2" else attn
    model = LlamaForCausalLM(config).float()
    model.config._attn_implementation = attn  # flash_attention_2 without flash_attn on CPU: set, not loaded
    return model


def _tiny_mixtral(tok) -> torch.nn.Module:
    """A 2-layer Mixtral whose forward returns its router auxiliary loss."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=-(-len(tok) // 8) * 8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=256, initializer_range=0.2, output_router_logits=True,
                           pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id)  # fmt: skip
    return MixtralForCausalLM(config).float()


def _trainer(tiny, out, padding_free: bool, attn: str = "sdpa", n_rows: int = 16, moe: bool = False,
             **overrides) -> EpsilonDPOTrainer:  # fmt: skip
    tok = AutoTokenizer.from_pretrained(tiny["model"])
    model = _tiny_mixtral(tok) if moe else _tiny_llama(tok, attn)
    kwargs = dict(
        output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=1, max_steps=4,
        learning_rate=5e-3, lr_scheduler_type="constant", logging_steps=1, report_to="none", save_strategy="no",
        beta=BETA, epsilon=EPS, seed=0, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, max_length=64,
        edpo_head="chunked", edpo_head_token_chunk=16, edpo_head_vocab_chunk=24, bf16=False,
        padding_free=padding_free,
    )  # fmt: skip
    kwargs.update(overrides)
    dataset = Dataset.from_list(varied_rows(tiny["train"], n_rows))
    return EpsilonDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=EpsilonDPOConfig(**kwargs),
                             train_dataset=dataset, processing_class=tok)  # fmt: skip


class _Recorder:
    """Wraps the trainer's ``linear_logprobs`` and ``edpo_loss`` to keep what they returned."""

    def __init__(self, monkeypatch) -> None:
        self.streams, self.outs = [], []
        real_head, real_loss = forwards_module.linear_logprobs, trainer_module.edpo_loss

        def head(*args, **kwargs):
            out = real_head(*args, **kwargs)
            self.streams.append([t.detach().clone() for t in out])
            return out

        def loss(*args, **kwargs):
            out = real_loss(*args, **kwargs)
            self.outs.append(out)
            return out

        monkeypatch.setattr(forwards_module, "linear_logprobs", head)
        monkeypatch.setattr(trainer_module, "edpo_loss", loss)


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


def _run_step(trainer, batch, padding_free: bool, recorder: _Recorder):
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
    recorder = _Recorder(monkeypatch)
    trainer = _trainer(tiny_default, tmp_path, padding_free=True, attn=attn, edpo_share_prompt=share_prompt)
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
        assert (pf - pad * completion).abs().max().item() <= 1e-5, f"{name}: packed and padded token log-probs differ"
    # and the policy stream is the model's own padded forward
    with torch.no_grad(), _unpacked_attention([trainer.model]):
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=mask).logits[:, :-1].double()
    own = logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1) * completion
    assert (_padded_layout(streams_pf[0], batch).double() - own).abs().max().item() <= 1e-5

    assert torch.equal(out_pf.decisions, out_pad.decisions)
    assert out_pad.decisions.abs().sum() > 0, "the batch should move β"
    assert abs(loss_pf.item() - loss_pad.item()) <= 1e-6 * abs(loss_pad.item())
    assert grads_pf.keys() == grads_pad.keys() == {n for n, _ in trainer.model.named_parameters()}
    for name, g in grads_pad.items():
        rel = ((grads_pf[name] - g).norm() / g.norm()).item()
        assert rel <= 1e-5, f"{name}: relative gradient difference {rel:.2e}"


def test_flash_attention_model_shares_prompts_and_matches_padded(tiny_default, tmp_path, monkeypatch):
    """A FlashAttention-2 model (the 7–8B YAMLs' flash_attention: true) runs padding-free as ε-DPO's varlen attention
    and shares prompts; its step (the varlen kernel replaced by the reference written from FlashAttention's
    documented semantics) gives the padded SDPA step's streams, loss and gradients."""
    from edpo_plugin.trainer import packed_attention
    from tests.varlen_reference import reference_varlen

    monkeypatch.setattr(packed_attention, "varlen_kernel", lambda: reference_varlen)
    recorder = _Recorder(monkeypatch)
    trainer = _trainer(tiny_default, tmp_path, padding_free=True, attn="flash_attention_2")
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
        assert (_padded_layout(pf, batch) - pad * completion).abs().max().item() <= 1e-5
    assert torch.equal(out_pf.decisions, out_pad.decisions)
    assert abs(loss_pf.item() - loss_pad.item()) <= 1e-6 * abs(loss_pad.item())
    for name, g in grads_pad.items():
        assert ((grads_pf[name] - g).norm() / g.norm()).item() <= 1e-5, name


def test_moe_router_aux_loss_is_the_padded_one(tiny_default, tmp_path, monkeypatch):
    """Packed, the router's load-balancing loss averages over the real tokens without an attention mask; padded, over
    the attention mask's ones: the same tokens, so the same auxiliary loss and total loss."""
    recorder = _Recorder(monkeypatch)
    trainer = _trainer(tiny_default, tmp_path, padding_free=True, moe=True, router_aux_loss_coef=0.5)
    assert trainer.aux_loss_enabled and not trainer.batch_layout.share_prompt  # a shared prompt would count once in it
    with pytest.raises(ValueError, match="edpo_share_prompt=True would change the MoE router auxiliary loss"):
        _trainer(tiny_default, tmp_path / "shared", padding_free=True, moe=True, router_aux_loss_coef=0.5,
                 edpo_share_prompt=True)  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    assert not bool(batch["attention_mask"].all())
    trainer.model.train()
    trainer._head_checked = True
    loss_pad, _, _, grads_pad = _run_step(trainer, batch, False, recorder)
    loss_pf, _, _, grads_pf = _run_step(trainer, batch, True, recorder)
    aux_pad, aux_pf = trainer._metrics["train"]["aux_loss"]
    assert aux_pad > 0 and aux_pf == pytest.approx(aux_pad, rel=1e-6)
    assert abs(loss_pf.item() - loss_pad.item()) <= 1e-6 * abs(loss_pad.item())
    for name, g in grads_pad.items():
        assert ((grads_pf[name] - g).norm() / g.norm().clamp(min=1e-30)).item() <= 1e-5, name


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
        trainer = _trainer(tiny_default, tmp_path / str(padding_free), padding_free=padding_free,
                           gradient_accumulation_steps=2, per_device_train_batch_size=2, **overrides)  # fmt: skip
        assert trainer.batch_layout.share_prompt == (padding_free and share_prompt is None)
        trainer.train()
        runs[padding_free] = (*_betas_and_losses(trainer), trainer.beta_controller.beta)
    (betas_pad, losses_pad, final_pad), (betas_pf, losses_pf, final_pf) = runs[False], runs[True]
    assert len(betas_pad) == 4 and final_pad != BETA, "the run should move β"
    assert betas_pf == pytest.approx(betas_pad, rel=1e-6)
    assert final_pf == pytest.approx(final_pad, rel=1e-6)
    assert losses_pf == pytest.approx(losses_pad, rel=1e-5)


def test_pack_rows_keeps_labels_inside_each_sequence():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [1, 2, 3, 4]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    completion = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0], [0, 0, 1, 1]])
    packed = pack_rows(ids, mask, completion)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert packed.label_index.tolist() == [0, 1, 3, 6, 7]
    assert packed.labels.tolist() == [[6, 7, 9, 3, 4]]
    assert packed.segment_ids.tolist() == [0, 0, 1, 2, 2]
    everything = pack_rows(ids, mask)
    assert everything.label_index.tolist() == [0, 1, 3, 5, 6, 7]
    assert everything.labels.tolist() == [[6, 7, 9, 2, 3, 4]]


def test_pack_rows_shares_each_pairs_prefix():
    """Rows i and R/2 + i (chosen and rejected) side by side, the rejected row keeping what follows their common
    prefix at positions going on from it; the prefix's last token predicts both first completion tokens. Pair 1's
    chosen row is all prefix: its rejected row goes on from it (positions 3, 4 follow 2)."""
    ids = torch.tensor([[1, 2, 3, 4, 0], [1, 5, 6, 0, 0], [1, 2, 7, 8, 9], [1, 5, 6, 6, 3]])
    mask = (ids > 0).long()
    completion = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    packed = pack_rows(ids, mask, completion, share_prefixes=True)
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 7, 8, 9, 1, 5, 6, 6, 3]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2, 3, 4, 0, 1, 2, 3, 4]]
    assert packed.labels.tolist() == [[3, 4, 5, 6, 7, 8, 9, 5, 6, 6, 3]]
    assert packed.label_index.tolist() == [1, 2, 7, 8, 1, 4, 5, 7, 8, 9, 10]
    assert packed.segment_ids.tolist() == [0, 0, 1, 1, 2, 2, 2, 3, 3, 3, 3]
    with pytest.raises(ValueError, match="two halves; got 3 rows"):
        pack_rows(ids[:3], mask[:3], share_prefixes=True)


def _blind_per_sequence(drop: str):
    """A broken packed attention: ``drop="bounds"`` runs the whole row as one causal sequence (sequences see each
    other); ``drop="prefix"`` runs each sequence without the prefix it shares (a rejected completion loses its
    prompt)."""
    from edpo_plugin.trainer import packed_attention

    real = packed_attention._per_sequence

    def broken(run, module, query, key, value, layout, window, **kwargs):
        if drop == "bounds":
            n = query.shape[2]
            layout = packed_attention.PackedLayout.from_segments((packed_attention.Segment(0, n, 0, 0),), query.device)
        else:
            segments = tuple(s._replace(prefix_start=0, prefix_length=0) for s in layout.segments)
            layout = packed_attention.PackedLayout.from_segments(segments, query.device)
        return real(run, module, query, key, value, layout, window, **kwargs)

    return broken


@pytest.mark.parametrize(("drop", "check"), [("bounds", True), ("prefix", True), ("bounds", False)])
def test_first_step_check_refuses_attention_across_sequences(tiny_default, tmp_path, monkeypatch, drop, check):
    """An attention that lets packed sequences see each other, or that drops a shared prompt, is stopped by the
    first-step check (which packs the whole micro-batch as training does), naming it; with the check off nothing
    could tell (the refusal before training is for what the model's config and classes show)."""
    from edpo_plugin.trainer import packed_attention

    monkeypatch.setattr(packed_attention, "_per_sequence", _blind_per_sequence(drop))
    trainer = _trainer(tiny_default, tmp_path, padding_free=True, max_steps=1, edpo_head_check=check)
    assert trainer.batch_layout.share_prompt
    if check:
        with pytest.raises(HeadMismatchError, match=r"LlamaForCausalLM \(policy\): with padding_free=True"):
            trainer.train()
    else:
        trainer.train()


def test_evaluation_is_checked_too(tiny_default, tmp_path, monkeypatch):
    """``evaluate()`` before any training step runs the same first-step check on its first micro-batch."""
    from edpo_plugin.trainer import packed_attention

    monkeypatch.setattr(packed_attention, "_per_sequence", _blind_per_sequence("bounds"))
    trainer = _trainer(tiny_default, tmp_path, padding_free=True, max_steps=1)
    trainer.eval_dataset = trainer.train_dataset
    with pytest.raises(HeadMismatchError, match=r"LlamaForCausalLM \(policy\): with padding_free=True"):
        trainer.evaluate()


def test_unsupported_attention_and_batch_keys_are_refused(tiny_default, tmp_path):
    from edpo_plugin.trainer.batch import BatchLayout
    from edpo_plugin.trainer.packable import check_packable

    tok = AutoTokenizer.from_pretrained(tiny_default["model"])
    model = _tiny_llama(tok)
    model.config._attn_implementation = "paged|sdpa"
    with pytest.raises(
        ValueError,
        match=re.escape(
            "train LlamaForCausalLM on a different objective: its forward "
            "depends on the packed row through attn_implementation='paged|sdpa'"
        ),
    ):
        check_packable(model)  # fmt: skip
    ids = torch.ones(2, 3, dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": ids, "completion_mask": ids, "pixel_values": torch.zeros(2, 1)}
    with pytest.raises(ValueError, match=r"also carry \['pixel_values'\]"):
        BatchLayout(padding_free=True).lay_out(batch, scored=None)


def test_padding_free_switches_to_packed_attention(tiny_default, tmp_path):
    from edpo_plugin.trainer.packed_attention import PACKED_EAGER, PACKED_SDPA

    trainer = _trainer(tiny_default, tmp_path / "pf", padding_free=True)
    assert trainer.model.config._attn_implementation == PACKED_SDPA
    assert trainer.ref_model.config._attn_implementation == PACKED_SDPA
    assert _trainer(tiny_default, tmp_path / "pad", padding_free=False).model.config._attn_implementation == "sdpa"
    assert trainer.batch_layout.share_prompt
    eager = _trainer(tiny_default, tmp_path / "eager", padding_free=True, attn="eager")
    assert eager.model.config._attn_implementation == PACKED_EAGER and eager.batch_layout.share_prompt
    unshared = _trainer(tiny_default, tmp_path / "no", padding_free=True, edpo_share_prompt=False)
    assert not unshared.batch_layout.share_prompt
    with pytest.raises(ValueError, match="edpo_share_prompt=True .* needs padding_free=True"):
        EpsilonDPOConfig(output_dir=str(tmp_path), edpo_share_prompt=True, use_cpu=True)


def test_per_sequence_sums_are_float64():
    """The decisions compare sequence sums that differ by O(ε): packed (segment_logps) and padded (PaddedBatch)
    sums of fp32 token log-probs are float64, to the last digit of an exact sum (fp32 accumulation of these 4096
    tokens is off by ~1e-3)."""
    import math

    from edpo_plugin.trainer.batch import PaddedBatch
    from edpo_plugin.trainer.packing import segment_logps

    g = torch.Generator().manual_seed(0)
    tokens = (-3.0 - torch.rand(2, 4096, generator=g)).float()
    exact = [math.fsum(row.double().tolist()) for row in tokens]
    packed = segment_logps(tokens.reshape(1, -1), torch.arange(2).repeat_interleave(4096), 2)
    for sums in (packed, PaddedBatch({}, tokens).sequence_logps(tokens)):
        assert sums.dtype == torch.float64
        assert max(abs(got - want) for got, want in zip(sums.tolist(), exact, strict=True)) <= 1e-9


def _llama4_chunked(tok):
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(0)
    config = Llama4TextConfig(vocab_size=-(-len(tok) // 8) * 8, hidden_size=32, intermediate_size=64,
                              intermediate_size_mlp=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=8, num_local_experts=2, num_experts_per_tok=1,
                              attention_chunk_size=8, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    config._attn_implementation = "sdpa"
    return Llama4ForCausalLM(config).float()


@pytest.mark.parametrize("check", [True, False])
def test_what_packing_changes_is_refused_before_training(tiny_default, tmp_path, check):
    """Refused when the trainer is built, with the first-step check on or off (so evaluation never runs it either):
    a chunked-attention model and a PEFT activated LoRA adapter."""
    from peft import LoraConfig

    tok = AutoTokenizer.from_pretrained(tiny_default["model"])
    dataset = Dataset.from_list(varied_rows(tiny_default["train"], 8))
    args = EpsilonDPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", padding_free=True,
                            edpo_head_check=check, max_length=64)  # fmt: skip
    with pytest.raises(ValueError, match=r"Llama4ForCausalLM on a different objective: .*chunked attention"):
        model = _llama4_chunked(tok)
        EpsilonDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=dataset,
                          processing_class=tok)  # fmt: skip
    alora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], alora_invocation_tokens=[5, 6], task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match=r"PEFT activated LoRA"):
        EpsilonDPOTrainer(model=_tiny_llama(tok), args=args, train_dataset=dataset, processing_class=tok,
                          peft_config=alora)  # fmt: skip
