"""How ``edpo_plugin/trainer/model_head.py`` reads a model's output layer: ``describe_head`` (the transform of an
architecture nobody described is refused, or plain when it has no transform field; PEFT adapters and quantized heads
the fused head cannot compute are refused), ``logit_transform`` of multimodal wrappers, and ``forward_to_head`` (the
capture that stands in for the output layer during the model's own forward).

Yardsticks: the model's own forward (its log-probs, its backbone's output), and the refusals' messages.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers

from edpo_plugin.ops import LogitTransform
from edpo_plugin.trainer.model_head import describe_head, forward_to_head
from tests.numerics import MODEL_STREAM_TOL, rel
from tests.trainer.architectures import (
    ARCH_BY_ID,
    COMMON,
    VOCAB,
    arch_params,
    build_model,
    head_streams,
    model_logprobs,
    tiny_batch,
)

peft = pytest.importorskip("peft")


# ------------------------------------------------------------------------------------- architectures nobody described


def _custom_llama(field_name: str | None, value=2.0):
    """A user's own architecture: Llama with model_type 'my_llama' whose forward multiplies its logits by the config
    field ``field_name`` (which no table in model_head.py describes for this model_type)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    class MyLlamaConfig(LlamaConfig):
        model_type = "my_llama"

    class MyLlamaForCausalLM(LlamaForCausalLM):
        config_class = MyLlamaConfig

        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            if field_name is not None:
                out.logits = out.logits * getattr(self.config, field_name)
            return out

    kwargs = {k: v for k, v in COMMON.items()}
    if field_name is not None:
        kwargs[field_name] = value
    config = MyLlamaConfig(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return MyLlamaForCausalLM(config).eval()


@pytest.mark.parametrize(
    "field_name",
    [
        "final_logit_softcapping",
        "logits_soft_cap",
        "logit_softcapping",
        "logit_scale",
        "logits_scaling",
        "lm_head_multiplier",
        "output_multiplier",
        "logit_multiplier",
        "mup_width_multiplier",
    ],
)
def test_unknown_architecture_with_a_transform_field_is_refused(field_name):
    model = _custom_llama(field_name)
    with pytest.raises(ValueError, match=rf"MyLlamaForCausalLM.*{field_name}"):
        describe_head(model)


def test_unknown_architecture_without_transform_fields_is_plain():
    model = _custom_llama(None)
    ids, mask, labels = tiny_batch()
    _, streams = head_streams(model, ids, mask, labels, "chunked")
    assert rel(streams.policy, model_logprobs(model, ids, mask, labels)) <= MODEL_STREAM_TOL


@pytest.mark.parametrize(
    "config_cls,want",
    [("AyaVisionConfig", LogitTransform()), ("Cohere2VisionConfig", LogitTransform()),
     ("Granite4VisionConfig", None)],
)  # fmt: skip
def test_multimodal_wrappers_are_looked_up_by_their_own_model_type(config_cls, want):
    """Aya-Vision / Cohere2-Vision wrap a Cohere text model (logit_scale set) but their forward is a plain lm_head;
    Granite-4-Vision divides by its text model's logits_scaling; a wrapper nobody described is refused."""
    import transformers

    from edpo_plugin.trainer.model_head import logit_transform

    config = getattr(transformers, config_cls)()
    if want is None:
        text = config.get_text_config()
        text.logits_scaling = 8.0
        want = LogitTransform(scale=1 / 8.0)
    assert logit_transform(config) == want
    paligemma = transformers.PaliGemmaConfig(text_config={"model_type": "gemma2"})
    with pytest.raises(ValueError, match="wraps a 'gemma2' text model"):
        logit_transform(paligemma, "PaliGemmaForConditionalGeneration")


# ---------------------------------------------------------------------------------- heads the fused head cannot see


def _prompt_tuning(model):
    return peft.get_peft_model(model, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))


def _lora_on_lm_head(model):
    return peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))


def _tokens_on_biased_head(model):
    return peft.get_peft_model(
        model, peft.LoraConfig(target_modules=["q_proj"], trainable_token_indices={"lm_head": [3, 5]})
    )


@pytest.mark.parametrize(
    "make,base,match",
    [
        pytest.param(_prompt_tuning, "llama-untied", "prompt learning", id="prompt-tuning"),
        pytest.param(_lora_on_lm_head, "llama-untied", "lm_head", id="lora-on-lm_head"),
        pytest.param(_tokens_on_biased_head, "phi-biased-head", "bias", id="trainable-tokens-on-biased-lm_head"),
    ],
)
def test_peft_adapters_the_head_cannot_see_are_refused(make, base, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make(build_model(ARCH_BY_ID[base]))
    with pytest.raises(ValueError, match=match):
        describe_head(model)


@pytest.mark.parametrize("layer", ["Linear4bit", "Linear8bitLt"])
def test_quantized_lm_head_is_refused(layer):
    bnb = pytest.importorskip("bitsandbytes")
    model = build_model(ARCH_BY_ID["llama-untied"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.lm_head = getattr(bnb.nn, layer)(32, VOCAB, bias=False)
    with pytest.raises(ValueError, match=rf"LlamaForCausalLM's lm_head is a {layer}"):
        describe_head(model)


# ------------------------------------------------------------------------------------------- the head-input capture


def test_forward_to_head_builds_no_logits_and_never_calls_the_real_head():
    """The capture stands in for the output layer: the forward's logits are [B, T, 0] and the real lm_head (hook
    counted) is not called, so nothing [B, T, V] is built and ZeRO-3 / FSDP gather no head there; afterwards the model
    holds its own lm_head again."""
    model = build_model(ARCH_BY_ID["llama-untied"])
    view = describe_head(model)
    ids, mask, _ = tiny_batch()
    calls = []
    handle = model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    try:
        got = forward_to_head(view, lambda: model(input_ids=ids, attention_mask=mask), ids.shape)
    finally:
        handle.remove()
    assert not calls and got.outputs.logits.shape == (*ids.shape, 0) and got.hidden.shape == (*ids.shape, 32)
    assert model.lm_head is view.module and model.get_output_embeddings() is view.module


class _TwoHeadCallsLlama(transformers.LlamaForCausalLM):
    """A forward that calls its output layer on the last position only, then again on every position."""

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        self.lm_head(hidden[:, -1:])
        return transformers.modeling_outputs.CausalLMOutputWithPast(logits=self.lm_head(hidden))


def test_forward_that_does_not_call_its_head_once_on_every_position_is_refused():
    model = _TwoHeadCallsLlama(transformers.LlamaConfig(**{k: v for k, v in COMMON.items()}))
    ids, mask, _ = tiny_batch()
    with pytest.raises(ValueError, match=r"_TwoHeadCallsLlama's forward called its output layer \(lm_head\) on inputs "
                       r"of shapes \[\(2, 1, 32\), \(2, 12, 32\)\]"):  # fmt: skip
        forward_to_head(describe_head(model), lambda: model(input_ids=ids, attention_mask=mask), ids.shape)


@pytest.mark.parametrize("arch", arch_params([ARCH_BY_ID[i] for i in ("mamba", "mamba2", "falcon-mamba")]))
def test_capture_answers_mambas_read_of_the_head_weight(arch):
    """The Mamba family's forward casts the hidden state to ``lm_head.weight.dtype`` before calling its output layer:
    the capture standing in for it answers with the real layer's weight, and records the backbone's own output as the
    forward gave it."""
    model = build_model(arch)
    view = describe_head(model)
    ids, mask, _ = tiny_batch()
    with torch.no_grad():
        got = forward_to_head(view, lambda: model(input_ids=ids, attention_mask=mask), ids.shape)
        want = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert got.outputs.logits.shape == (*ids.shape, 0)
    assert torch.equal(got.hidden, want.to(view.module.weight.dtype))
    assert model.get_output_embeddings() is view.module
