"""The first-step check (``edpo_plugin/trainer/head_check.py``): the fused head against the model's own forward on the
first micro-batch, so that an objective nobody described stops training instead of being optimised.

Its parts: ``check_row`` (the padded check's row, one-token rows passed over), ``dropout_off``, ``compare_with_model``
(a tolerance that follows the pre-cap logits) and every architecture of the table accepted; through the trainer: an
undescribed logit transform or pre-head rescale stopped, a described model passed, dropout off while it runs, and a
packed attention that lets sequences see each other stopped, in training and in evaluation.

Yardsticks: the model's own forward (``log_softmax`` of its logits), and rows picked by hand from the documented rule.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from edpo_plugin.ops import linear_logprobs
from edpo_plugin.trainer.head_check import HeadMismatchError, check_row, dropout_off
from edpo_plugin.trainer.model_head import describe_head
from tests.numerics import MODEL_LOGPROB_ATOL
from tests.trainer.architectures import ARCHS, EPSILON, Arch, arch_params, build_model, head_input, tiny_batch
from tests.trainer.builders import (
    edpo_config,
    edpo_trainer,
    perturb_,
    short_trainer,
    tiny_config,
    tiny_gemma2,
    tiny_llama,
    tiny_trainer,
    tokenizer,
)

# ---------------------------------------------------------------------------------------------------- its parts


def _rows(lengths: list[int], prompts: list[int], width: int):
    """Right-padded ``[R, width]`` ids, attention mask and completion mask: row ``r`` has ``lengths[r]`` real tokens,
    the first ``prompts[r]`` of them its prompt."""
    columns = torch.arange(width)
    mask = (columns < torch.tensor(lengths)[:, None]).long()
    completion = mask * (columns >= torch.tensor(prompts)[:, None]).long()
    ids = torch.arange(1, len(lengths) * width + 1).reshape(len(lengths), width) * mask
    return ids, mask, completion


@pytest.mark.parametrize(
    ("lengths", "prompts", "width", "row", "length"),
    [
        pytest.param([30, 1, 25, 9], [10, 0, 6, 7], 40, 2, 22, id="shortest-prompt-cut-16-after-it"),
        pytest.param([12, 30], [5, 8], 30, 0, 12, id="cut-at-its-end"),
        pytest.param([300, 280], [250, 260], 300, 0, 256, id="at-most-256"),
    ],
)
def test_check_row_is_the_shortest_prompt_with_a_label(lengths, prompts, width, row, length):
    """The padded check's row: among the rows with at least two real tokens, the one whose completion starts first,
    cut 16 completion tokens after its prompt, at its end, or at 256 tokens. A one-token row (an empty prompt and an
    EOS-only completion: its completion starts at 0, yet it has no label) is passed over."""
    ids, mask, completion = _rows(lengths, prompts, width)
    got_ids, got_mask = check_row(ids, mask, completion)
    assert torch.equal(got_ids, ids[row : row + 1, :length]) and torch.equal(got_mask, mask[row : row + 1, :length])


def test_check_row_of_one_token_rows_is_none():
    """No row has a label: nothing to check on this micro-batch (the trainer checks the next one)."""
    assert check_row(*_rows([1, 1], [0, 0], 4)) is None


def test_dropout_off_turns_off_only_dropout_and_restores_it():
    """Inside ``dropout_off``: dropout layers (LoRA's) and attention modules with an ``attention_dropout`` out of
    training mode, so two forwards give the same logits; every other module keeps its flag (not ``model.eval()``: some
    modules change their weights there), a dropout layer already off stays off; afterwards each flag is as it was."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.5)  # fmt: skip
    config._attn_implementation = "eager"
    lora = LoraConfig(r=4, lora_dropout=0.5, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(LlamaForCausalLM(config), lora)
    model.train()
    dropping = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) or getattr(m, "attention_dropout", 0)]
    others = [m for m in model.modules() if all(m is not d for d in dropping)]
    assert any(isinstance(m, torch.nn.Dropout) for m in dropping) and any(not isinstance(m, torch.nn.Dropout)
                                                                          for m in dropping)  # fmt: skip
    already_off = next(m for m in dropping if isinstance(m, torch.nn.Dropout))
    already_off.eval()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    with dropout_off([model]):
        assert not any(m.training for m in dropping) and all(m.training for m in others)
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    assert all(m.training for m in dropping if m is not already_off) and not already_off.training
    assert all(m.training for m in others)
    with torch.no_grad():  # dropout is on again, and changes the logits: the check above could fail
        assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_first_step_check_tolerance_follows_the_pre_cap_logits():
    """Gemma-2 with fp32 weights under bf16 autocast and pre-cap logits of ~300: bf16 rounding of a logit is
    ~u·|z_pre| before the cap, so a tolerance from the capped magnitude (≤ 30) falsely refused some seeds; none of
    twelve is refused, and a real transform error (no cap) still is."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from edpo_plugin.ops import linear_logprobs
    from edpo_plugin.trainer.head_check import compare_with_model, own_forward_logprobs
    from edpo_plugin.trainer.model_head import describe_head, forward_to_head

    config = Gemma2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, final_logit_softcapping=30.0,
                          sliding_window=8, query_pre_attn_scalar=16)  # fmt: skip
    for seed in range(12):
        torch.manual_seed(seed)
        model = Gemma2ForCausalLM(config).eval()
        with torch.no_grad():
            model.lm_head.weight.mul_(300.0 / 4)  # tied: pre-cap logits of a few hundred
        ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(seed))
        labels = ids[:, 1:]
        view = describe_head(model)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            own = own_forward_logprobs(lambda m=model, x=ids: m(input_ids=x).logits, view.module, labels,
                                       view.transform.scale)  # fmt: skip
            full = forward_to_head(view, lambda m=model, x=ids: m(input_ids=x), ids.shape).hidden
            hidden = full[:, :-1]
            w, _ = view.weight_and_bias()
            fused = linear_logprobs(hidden, w, labels, ref_hidden=hidden, ref_weight=w, epsilon=0.01,
                                    transform=view.transform).policy  # fmt: skip
            uncapped = linear_logprobs(hidden, w, labels, ref_hidden=hidden, ref_weight=w, epsilon=0.01).policy
        pre_cap = float((full.double() @ w.double().T).abs().max())  # the head input times W, in float64
        assert pre_cap > 100, "the pre-cap logits must be large for this test"
        # a few bf16 roundings (2⁻⁸ each) apart, where the capped magnitude (≤ 30) is 10× off
        assert own.max_logit == pytest.approx(pre_cap, rel=2e-2), "the tolerance must follow the pre-cap logits"
        compare_with_model(own, fused, f"seed {seed}")
        with pytest.raises(HeadMismatchError):
            compare_with_model(own, uncapped, f"seed {seed}, no cap")


@pytest.mark.parametrize("arch", arch_params(ARCHS))
def test_first_step_check_accepts_every_supported_architecture(arch: Arch):
    """The trainer's first-step check (captured head input → fused head vs the model's own logits) passes on every
    architecture described here — no false refusal (MiniCPM3 divides its hidden state before lm_head)."""
    from edpo_plugin.trainer.head_check import check_row, compare_with_model, own_forward_logprobs

    model = build_model(arch)
    view = describe_head(model)
    ids, mask, labels = tiny_batch()
    completion = (labels != -100).long()
    row_ids, row_mask = check_row(ids, mask, torch.cat((torch.zeros_like(ids[:, :1]), completion), dim=1))
    with torch.no_grad():
        own = own_forward_logprobs(lambda: model(input_ids=row_ids, attention_mask=row_mask).logits, view.module,
                                   row_ids[:, 1:], view.transform.scale)  # fmt: skip
        hidden = head_input(view, model, row_ids, row_mask)
        weight, bias = view.weight_and_bias()
        fused = linear_logprobs(hidden, weight, row_ids[:, 1:], ref_hidden=hidden, ref_weight=weight, bias=bias,
                                ref_bias=bias, epsilon=EPSILON, transform=view.transform, impl="chunked")  # fmt: skip
    assert compare_with_model(own, fused.policy, arch.id) <= MODEL_LOGPROB_ATOL


# ------------------------------------------------------------------------------------------ through the trainer


class _ScaledLogitsLlama(LlamaForCausalLM):
    """An architecture nobody described: its forward halves the logits."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out


def test_first_step_check_stops_an_undescribed_logit_transform(tiny_default, tmp_path):
    tok = tokenizer(tiny_default)
    torch.manual_seed(0)
    model = _ScaledLogitsLlama(LlamaConfig(**tiny_config(tok)))
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # logits large enough that halving them changes log-probs by nats
    trainer = short_trainer(tiny_default, tmp_path / "checked", copy.deepcopy(model), epsilon=0.1)
    with pytest.raises(HeadMismatchError, match=r"_ScaledLogitsLlama \(policy\).*differ from the model's own"):
        trainer.train()
    # documented way out: the check off, and training runs (on the objective the head describes)
    unchecked = short_trainer(tiny_default, tmp_path / "unchecked", model, epsilon=0.1, edpo_head_check=False)
    unchecked.train()
    assert unchecked.state.global_step == 2


def test_first_step_check_passes_on_a_described_model(tiny_default, tmp_path, caplog):
    tok = tokenizer(tiny_default)
    torch.manual_seed(0)
    trainer = short_trainer(tiny_default, tmp_path, tiny_gemma2(tok), epsilon=0.1)
    with caplog.at_level(logging.INFO, logger="edpo_plugin.trainer.trainer"):
        trainer.train()
    checks = [r.getMessage() for r in caplog.records if "head check" in r.getMessage()]
    assert len(checks) == 2 and "(policy)" in checks[0] and "(reference)" in checks[1], checks


def test_first_step_check_runs_without_dropout(tiny_default, tmp_path):
    """LoRA dropout kept (``disable_dropout=False``; TRL's default zeroes it) on an adapter that is not zero (a
    resumed run): the check's two forwards must compute the same function, so dropout is off while it runs (only the
    dropout layers: ``model.eval()`` would let bitsandbytes repack 4-bit weights)."""
    from peft import LoraConfig

    tok = tokenizer(tiny_default)
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = short_trainer(tiny_default, tmp_path, tiny_llama(tok), peft_config=lora, max_steps=1, epsilon=0.1,
                       disable_dropout=False)  # fmt: skip
    perturb_(trainer.model, scale=0.5)  # lora_B away from 0: dropout on the adapter's input would change log-probs
    trainer.train()
    assert trainer.state.global_step == 1 and trainer.model.training


class _DividingLinear(torch.nn.Linear):
    """An lm_head that divides its input first (MiniCPM-1/2 do this in remote code, with no config field to see)."""

    def forward(self, x):
        return super().forward(x / 4)


def test_first_step_check_sees_a_hidden_state_rescaled_before_lm_head(tiny_default, tmp_path):
    tok = tokenizer(tiny_default)
    torch.manual_seed(0)
    model = tiny_llama(tok)
    head = _DividingLinear(model.lm_head.in_features, model.lm_head.out_features, bias=False)
    with torch.no_grad():
        head.weight.copy_(40 * model.lm_head.weight)
    model.lm_head = head
    trainer = short_trainer(tiny_default, tmp_path, model, epsilon=0.1)
    with pytest.raises(HeadMismatchError, match=r"LlamaForCausalLM \(policy\)"):
        trainer.train()


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
    trainer = tiny_trainer(tiny_default, tmp_path, padding_free=True, max_steps=1, edpo_head_check=check)
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
    trainer = tiny_trainer(tiny_default, tmp_path, padding_free=True, max_steps=1)
    trainer.eval_dataset = trainer.train_dataset
    with pytest.raises(HeadMismatchError, match=r"LlamaForCausalLM \(policy\): with padding_free=True"):
        trainer.evaluate()


def test_the_check_compares_with_the_models_own_attention(tiny_default, tmp_path, monkeypatch):
    """The yardstick runs the model's own attention, not the packed form under test: a packed attention that forgets
    Mistral's sliding window is stopped by evaluate()'s check (with the packed form as its own yardstick it passed),
    and the packed form is back afterwards."""
    import transformers
    from datasets import Dataset

    from edpo_plugin.trainer import packed_attention
    from tests.trainer.builders import ATTENTION_BITES
    from tests.varied_rows import varied_rows

    monkeypatch.setattr(packed_attention, "_window", lambda module, kwargs: None)
    tok = tokenizer(tiny_default)
    torch.manual_seed(0)
    config = transformers.MistralConfig(**tiny_config(tok, sliding_window=4, **ATTENTION_BITES))
    config._attn_implementation = "sdpa"
    model = transformers.MistralForCausalLM(config).float().eval()
    dataset = Dataset.from_list(varied_rows(tiny_default["train"], 8))
    trainer = edpo_trainer(tiny_default, model, edpo_config(tmp_path, padding_free=True, max_steps=1), dataset)
    trainer.eval_dataset = trainer.train_dataset
    with pytest.raises(HeadMismatchError, match=r"MistralForCausalLM \(policy\): with padding_free=True"):
        trainer.evaluate()
    assert trainer.model.config._attn_implementation == packed_attention.PACKED_SDPA
