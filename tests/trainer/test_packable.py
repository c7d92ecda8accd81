"""Padding-free training packs a micro-batch into one row; ``edpo_plugin/trainer/packable.py`` refuses, before
training, the models packing would train on a different objective. Every architecture of the table
(tests/trainer/architectures.py) packed as training packs it gives each token its own forward's log-prob, or is
refused naming the feature; models built only to be refused; PEFT activated LoRA; an attention the packed form does
not cover; the refusals when the trainer is built, with the first-step check on or off.

Yardstick: each row's own unpadded forward in transformers.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import transformers

from tests.numerics import PACKED_TOL
from tests.trainer.architectures import (
    ARCH_BY_ID,
    ARCHS,
    PACKING_REFUSED,
    REFUSED_ONLY,
    VOCAB,
    Arch,
    arch_params,
    build_model,
    gather_logprobs,
)
from tests.trainer.builders import edpo_config, edpo_trainer, packing_llama, tiny_config, tokenizer


def _packing_rows():
    """Two pairs sharing their prompts, padded ``[4, T]``, and the rows themselves."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g) for n in (5, 9)]
    tails = [torch.randint(3, VOCAB, (n,), generator=g) for n in (6, 4, 7, 3)]
    rows = [torch.cat((prompts[0], tails[0])), torch.cat((prompts[1], tails[1])),
            torch.cat((prompts[0], tails[2])), torch.cat((prompts[1], tails[3]))]  # fmt: skip
    ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True)
    return rows, ids, mask


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", arch_params(ARCHS))
def test_padding_free_is_exact_or_refused(arch: Arch, attn: str):
    """Every architecture packed the way padding-free training packs it (whole sequences, and shared prompts) gives
    each token the log-prob of the model's own forward on its row alone — or is refused up front, from its config and
    classes, naming the feature (then no check has to catch it)."""
    from edpo_plugin.trainer.packable import packing_obstacles
    from edpo_plugin.trainer.packed_attention import use_packed_attention
    from edpo_plugin.trainer.packing import pack_rows

    model = build_model(arch)
    if attn == "sdpa":
        if not getattr(model, "_supports_sdpa", False):
            pytest.skip(f"{arch.model_cls} has no sdpa attention")
        model.set_attn_implementation("sdpa")
    obstacles = "; ".join(packing_obstacles(model))
    if arch.id in PACKING_REFUSED:
        assert PACKING_REFUSED[arch.id] in obstacles, obstacles
        return
    assert not obstacles
    rows, ids, mask = _packing_rows()
    with torch.no_grad():
        want = torch.cat([gather_logprobs(model(input_ids=r[None]).logits[:, :-1], r[None, 1:]) for r in rows], dim=1)
    assert use_packed_attention(model)
    for share in (False, True):
        packed = pack_rows(ids, mask, share_prefixes=share)
        with torch.no_grad():
            logits = model(**packed.model_kwargs(), use_cache=False).logits[:, packed.label_index]
        packed.layout.check_reached(model)
        assert (gather_logprobs(logits, packed.labels) - want).abs().max().item() <= PACKED_TOL, (
            f"share_prefixes={share}"
        )


@pytest.mark.parametrize("case", sorted(REFUSED_ONLY))
def test_padding_free_refuses_recurrent_alibi_and_nope_models(case):
    from edpo_plugin.trainer.packable import check_packable

    config_cls, model_cls, kwargs, feature = REFUSED_ONLY[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = getattr(transformers, config_cls)(**kwargs)
        config._attn_implementation = "eager"
        model = getattr(transformers, model_cls)(config)
    with pytest.raises(
        ValueError,
        match=rf"padding_free=True would train {model_cls} on a different objective: .*"
        rf"{re.escape(feature)}.* Set padding_free=False \(Axolotl: dpo_padding_free: false\)",
    ):
        check_packable(model)  # fmt: skip


def test_padding_free_refuses_activated_lora():
    from peft import LoraConfig, get_peft_model

    from edpo_plugin.trainer.packable import check_packable

    model = get_peft_model(build_model(ARCH_BY_ID["llama-untied"]), LoraConfig(r=2, target_modules=["q_proj"],
                                                                          alora_invocation_tokens=[5, 6]))  # fmt: skip
    with pytest.raises(ValueError, match=r"PEFT activated LoRA \(adapter 'default': alora_invocation_tokens"):
        check_packable(model)
    assert not check_packable(
        get_peft_model(build_model(ARCH_BY_ID["llama-tied"]), LoraConfig(r=2, target_modules=["q_proj"]))
    )


def test_unsupported_attention_is_refused(tiny_default):
    from edpo_plugin.trainer.packable import check_packable

    model = packing_llama(tokenizer(tiny_default))
    model.config._attn_implementation = "paged|sdpa"
    with pytest.raises(
        ValueError,
        match=re.escape(
            "train LlamaForCausalLM on a different objective: its forward "
            "depends on the packed row through attn_implementation='paged|sdpa'"
        ),
    ):
        check_packable(model)  # fmt: skip


def _llama4_chunked(tok):
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(0)
    config = Llama4TextConfig(**tiny_config(tok, intermediate_size_mlp=64, head_dim=8, num_local_experts=2,
                                            num_experts_per_tok=1, attention_chunk_size=8,
                                            max_position_embeddings=256))  # fmt: skip
    config._attn_implementation = "sdpa"
    return Llama4ForCausalLM(config).float()


@pytest.mark.parametrize("check", [True, False])
def test_what_packing_changes_is_refused_before_training(tiny_default, tmp_path, check):
    """Refused when the trainer is built, with the first-step check on or off (so evaluation never runs it either):
    a chunked-attention model and a PEFT activated LoRA adapter."""
    from datasets import Dataset
    from peft import LoraConfig

    from tests.varied_rows import varied_rows

    tok = tokenizer(tiny_default)
    dataset = Dataset.from_list(varied_rows(tiny_default["train"], 8))
    args = edpo_config(tmp_path, padding_free=True, edpo_head_check=check)
    with pytest.raises(ValueError, match=r"Llama4ForCausalLM on a different objective: .*chunked attention"):
        edpo_trainer(tiny_default, _llama4_chunked(tok), args, dataset)
    alora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], alora_invocation_tokens=[5, 6], task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match=r"PEFT activated LoRA"):
        edpo_trainer(tiny_default, packing_llama(tok), args, dataset, peft_config=alora)
