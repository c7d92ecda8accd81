"""The tiny random fp32 models the trainer tests build, one :class:`Arch` per decoder-only causal LM Axolotl users
commonly fine-tune (``ARCHS``), and how the tests read them: the model's own log-probs (the yardstick) and the fused
head's streams on the head input training captures.

Shared by test_model_head.py, test_model_conformance.py, test_packable.py and test_head_check.py; not collected. Each
architecture's logit transform is made to bite (``target``: max |W h + b| before the transform), so a test that reads
it wrong fails by more than a nat.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass, field

import pytest
import torch
import transformers

from edpo_plugin.ops import LinearLogprobs, LogitTransform, linear_logprobs
from edpo_plugin.trainer.model_head import HeadView, describe_head, forward_to_head

VOCAB = 96
SEQS, SEQ_LEN = 2, 12
EPSILON = 0.01

# A small model, layered on by each architecture (names each config understands).
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,  # two where layers alternate (sliding / full, recurrent / attention, mamba / attention)
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    pad_token_id=None,
    bos_token_id=1,
    eos_token_id=2,
)
PLAIN = LogitTransform()
CAP = 30.0  # soft cap for every capped architecture; the pre-cap logits are scaled to ~80 so tanh bites


@dataclass(frozen=True)
class Arch:
    id: str
    module: str  # transformers.models.<module>
    config_cls: str
    model_cls: str
    kwargs: dict = field(default_factory=dict)
    expect: LogitTransform = PLAIN  # what the model's forward does to W h + b (read from transformers 5.16)
    target: float = 8.0  # max |W h + b| before the transform, set by scaling the output embedding
    drop: tuple[str, ...] = ()  # COMMON keys this config does not take
    norm_params: bool = True  # False where the final norm has no weight (NanoChat)
    # Set for a wrapper whose config nests the text model's: the small-model kwargs become ``text_config`` and these
    # are the wrapper config's own kwargs.
    outer: dict | None = None
    slow: bool = False
    # "required": the architectures this suite must cover; "table": others model_head.py's table names;
    # "extra": other common fine-tuning targets (plain logits) that are cheap to add.
    group: str = "required"

    @property
    def tied(self) -> bool | None:
        return self.kwargs.get("tie_word_embeddings")


_TWO = dict(num_hidden_layers=2)
_MOE = dict(num_local_experts=4, num_experts_per_tok=2)
_MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}
_OMNI_OUTER = dict(
    vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32),
    audio_config=dict(encoder_layers=1, d_model=16, encoder_attention_heads=2, encoder_ffn_dim=32, output_dim=32,
                      num_mel_bins=8),
    vision_start_token_id=VOCAB - 1,
)  # fmt: skip
_GRANITE_MUP = dict(logits_scaling=8.0, embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.125)

ARCHS = [
    Arch("llama-untied", "llama", "LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    Arch("llama-tied", "llama", "LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    Arch("mistral", "mistral", "MistralConfig", "MistralForCausalLM", dict(sliding_window=4)),
    Arch("mixtral", "mixtral", "MixtralConfig", "MixtralForCausalLM", dict(_MOE)),
    Arch("qwen2", "qwen2", "Qwen2Config", "Qwen2ForCausalLM"),
    Arch("qwen3", "qwen3", "Qwen3Config", "Qwen3ForCausalLM"),
    Arch(
        "qwen3-moe",
        "qwen3_moe",
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    ),
    Arch("gemma", "gemma", "GemmaConfig", "GemmaForCausalLM"),
    Arch(
        "gemma2",
        "gemma2",
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(
            final_logit_softcapping=CAP, attn_logit_softcapping=50.0, sliding_window=4, query_pre_attn_scalar=8, **_TWO
        ),
        LogitTransform(softcap=CAP),
        target=80.0,
    ),
    Arch(
        "gemma3-text",
        "gemma3",
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(final_logit_softcapping=CAP, sliding_window=4, query_pre_attn_scalar=8, **_TWO),
        LogitTransform(softcap=CAP),
        target=80.0,
    ),
    Arch("phi3", "phi3", "Phi3Config", "Phi3ForCausalLM"),
    Arch(
        "cohere",
        "cohere",
        "CohereConfig",
        "CohereForCausalLM",
        dict(logit_scale=0.0625),
        LogitTransform(scale=0.0625),
        target=80.0,
    ),
    Arch(
        "cohere2",
        "cohere2",
        "Cohere2Config",
        "Cohere2ForCausalLM",
        dict(logit_scale=0.0625, sliding_window=4, **_TWO),
        LogitTransform(scale=0.0625),
        target=80.0,
    ),
    Arch(
        "granite",
        "granite",
        "GraniteConfig",
        "GraniteForCausalLM",
        dict(_GRANITE_MUP),
        LogitTransform(scale=1 / 8),
        target=60.0,
    ),
    Arch(
        "granitemoe",
        "granitemoe",
        "GraniteMoeConfig",
        "GraniteMoeForCausalLM",
        dict(_GRANITE_MUP, **_MOE),
        LogitTransform(scale=1 / 8),
        target=60.0,
    ),
    Arch("olmo2", "olmo2", "Olmo2Config", "Olmo2ForCausalLM"),
    Arch("stablelm", "stablelm", "StableLmConfig", "StableLmForCausalLM"),
    Arch("gpt-neox", "gpt_neox", "GPTNeoXConfig", "GPTNeoXForCausalLM"),
    Arch("falcon", "falcon", "FalconConfig", "FalconForCausalLM", drop=("head_dim",)),
    # --- the rest of model_head.py's table
    Arch(
        "vaultgemma",
        "vaultgemma",
        "VaultGemmaConfig",
        "VaultGemmaForCausalLM",
        dict(final_logit_softcapping=CAP, sliding_window=4, **_TWO),
        LogitTransform(softcap=CAP),
        target=80.0,
        group="table",
    ),
    Arch(
        "nanochat",
        "nanochat",
        "NanoChatConfig",
        "NanoChatForCausalLM",
        dict(final_logit_softcapping=CAP),
        LogitTransform(softcap=CAP),
        target=80.0,
        norm_params=False,
        group="table",
    ),
    Arch(
        "hyperclovax",
        "hyperclovax",
        "HyperCLOVAXConfig",
        "HyperCLOVAXForCausalLM",
        dict(logits_scaling=4.0),  # multiplies (Granite divides by the same field name)
        LogitTransform(scale=4.0),
        target=3.0,
        group="table",
    ),
    Arch(
        "minicpm3",
        "minicpm3",
        "MiniCPM3Config",
        "MiniCPM3ForCausalLM",
        # logits_scaling = hidden_size / dim_model_base = 4: the hidden state is divided before lm_head
        dict(
            num_key_value_heads=4,  # MLA: one key/value head per query head (the config's default is 40)
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=4,
            v_head_dim=8,
            dim_model_base=8,
        ),
        PLAIN,  # the head input forward_to_head captures is already divided
        target=40.0,
        drop=("head_dim",),
        group="table",
    ),
    Arch(
        "cohere2-moe",
        "cohere2_moe",
        "Cohere2MoeConfig",
        "Cohere2MoeForCausalLM",
        dict(
            logit_scale=0.0625, sliding_window=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, **_TWO
        ),
        LogitTransform(scale=0.0625),
        target=80.0,
        group="table",
    ),
    Arch(
        "granitemoeshared",
        "granitemoeshared",
        "GraniteMoeSharedConfig",
        "GraniteMoeSharedForCausalLM",
        dict(_GRANITE_MUP, shared_intermediate_size=32, **_MOE),
        LogitTransform(scale=1 / 8),
        target=60.0,
        group="table",
    ),
    Arch(
        "granitemoehybrid",
        "granitemoehybrid",
        "GraniteMoeHybridConfig",
        "GraniteMoeHybridForCausalLM",
        dict(
            _GRANITE_MUP,
            shared_intermediate_size=32,
            layer_types=["mamba", "attention"],
            num_hidden_layers=2,
            mamba_n_heads=8,
            mamba_d_head=8,
            mamba_d_state=16,
            mamba_chunk_size=16,
            **_MOE,
        ),
        LogitTransform(scale=1 / 8),
        target=60.0,
        group="table",
        slow=True,
    ),
    Arch(
        "granite-swa",
        "granite_swa",
        "GraniteSWAConfig",
        "GraniteSWAForCausalLM",
        dict(_GRANITE_MUP, sliding_window=4, **_TWO),
        LogitTransform(scale=1 / 8),
        target=60.0,
        group="table",
    ),
    Arch(
        "granitemoe-swa",
        "granitemoe_swa",
        "GraniteMoeSWAConfig",
        "GraniteMoeSWAForCausalLM",
        dict(_GRANITE_MUP, sliding_window=4, **_MOE, num_hidden_layers=2),
        LogitTransform(scale=1 / 8),
        target=60.0,
        group="table",
    ),
    Arch(
        "recurrent-gemma",
        "recurrent_gemma",
        "RecurrentGemmaConfig",
        "RecurrentGemmaForCausalLM",
        dict(
            logits_soft_cap=CAP, block_types=("recurrent", "attention"), lru_width=32, attention_window_size=16, **_TWO
        ),
        LogitTransform(softcap=CAP),
        target=80.0,
        drop=("head_dim",),
        group="table",
    ),
    Arch(
        "falcon-h1",
        "falcon_h1",
        "FalconH1Config",
        "FalconH1ForCausalLM",
        dict(
            lm_head_multiplier=0.25,
            mamba_d_ssm=64,
            mamba_n_heads=8,
            mamba_d_head=8,
            mamba_d_state=16,
            mamba_chunk_size=16,
        ),
        LogitTransform(scale=0.25),
        target=40.0,
        group="table",
        slow=True,
    ),
    # --- other common fine-tuning targets with plain logits
    Arch("phi-biased-head", "phi", "PhiConfig", "PhiForCausalLM", group="extra"),  # lm_head has a bias
    Arch(
        "qwen2-moe",
        "qwen2_moe",
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32),
        group="extra",
    ),
    Arch(
        "olmoe", "olmoe", "OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2), group="extra"
    ),
    Arch("starcoder2", "starcoder2", "Starcoder2Config", "Starcoder2ForCausalLM", group="extra"),
    Arch("smollm3", "smollm3", "SmolLM3Config", "SmolLM3ForCausalLM", group="extra"),
    Arch(
        "gpt-oss", "gpt_oss", "GptOssConfig", "GptOssForCausalLM", dict(_MOE, sliding_window=4, **_TWO), group="extra"
    ),
]
# Classes whose forward reaches its decoder other than through ``base_model`` (``model.decoder``, a
# ``base_model_prefix`` naming a module the class does not have): the head input must be found the model's way.
_NOT_LLAMA = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim")  # fmt: skip
_BART_LIKE = dict(d_model=32, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64, encoder_layers=1,
                  encoder_attention_heads=4, encoder_ffn_dim=64)  # fmt: skip
ARCHS += [
    Arch(
        "opt",
        "opt",
        "OPTConfig",
        "OPTForCausalLM",
        dict(ffn_dim=64, word_embed_proj_dim=32),
        drop=("intermediate_size", "num_key_value_heads", "head_dim"),
        group="decoder",
    ),  # fmt: skip
    Arch("bart-causal", "bart", "BartConfig", "BartForCausalLM", dict(_BART_LIKE), drop=_NOT_LLAMA, group="decoder"),
    Arch(
        "mbart-causal", "mbart", "MBartConfig", "MBartForCausalLM", dict(_BART_LIKE), drop=_NOT_LLAMA, group="decoder"
    ),  # fmt: skip
    Arch(
        "marian-causal",
        "marian",
        "MarianConfig",
        "MarianForCausalLM",
        dict(_BART_LIKE, decoder_vocab_size=VOCAB),
        drop=_NOT_LLAMA,
        group="decoder",
    ),  # fmt: skip
    Arch(
        "pegasus-causal",
        "pegasus",
        "PegasusConfig",
        "PegasusForCausalLM",
        dict(_BART_LIKE),
        drop=_NOT_LLAMA,
        group="decoder",
    ),  # fmt: skip
    Arch(
        "blenderbot-causal",
        "blenderbot",
        "BlenderbotConfig",
        "BlenderbotForCausalLM",
        dict(_BART_LIKE),
        drop=_NOT_LLAMA,
        group="decoder",
    ),  # fmt: skip
    Arch(
        "plbart-causal",
        "plbart",
        "PLBartConfig",
        "PLBartForCausalLM",
        dict(_BART_LIKE),
        drop=_NOT_LLAMA,
        group="decoder",
    ),  # fmt: skip
    Arch("mvp-causal", "mvp", "MvpConfig", "MvpForCausalLM", dict(_BART_LIKE), drop=_NOT_LLAMA, group="decoder"),
    Arch(
        "trocr-causal",
        "trocr",
        "TrOCRConfig",
        "TrOCRForCausalLM",
        dict(d_model=32, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64),
        drop=_NOT_LLAMA,
        group="decoder",
    ),  # fmt: skip
    Arch(
        "whisper-causal",
        "whisper",
        "WhisperConfig",
        "WhisperForCausalLM",
        dict(_BART_LIKE, max_target_positions=64),
        drop=_NOT_LLAMA,
        group="decoder",
    ),  # fmt: skip
    Arch(
        "llama4-text",
        "llama4",
        "Llama4TextConfig",
        "Llama4ForCausalLM",
        dict(num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=64, interleave_moe_layer_step=1),
        group="decoder",
    ),  # fmt: skip
    Arch(
        "mllama-text",
        "mllama",
        "MllamaTextConfig",
        "MllamaForCausalLM",
        dict(cross_attention_layers=[]),
        group="decoder",
    ),  # fmt: skip
    # The Omni thinkers: text + vision + audio encoders, the text stack reached as ``self.model``; their forward reads
    # vision_start_token_id even for text-only input, so the tiny config sets it (real checkpoints carry it).
    Arch(
        "qwen2.5-omni-thinker",
        "qwen2_5_omni",
        "Qwen2_5OmniThinkerConfig",
        "Qwen2_5OmniThinkerForConditionalGeneration",
        dict(rope_parameters=_MROPE),
        drop=("head_dim",),
        outer=_OMNI_OUTER,
        group="decoder",
    ),  # fmt: skip
    Arch(
        "qwen3-omni-moe-thinker",
        "qwen3_omni_moe",
        "Qwen3OmniMoeThinkerConfig",
        "Qwen3OmniMoeThinkerForConditionalGeneration",
        dict(rope_parameters=_MROPE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
        outer=_OMNI_OUTER,
        group="decoder",
    ),  # fmt: skip
]
# State-space models: no attention, lm_head read by the forward (it casts the hidden state to lm_head.weight.dtype)
_NOT_SSM = ("intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings")
ARCHS += [
    Arch("mamba", "mamba", "MambaConfig", "MambaForCausalLM", dict(state_size=8), drop=_NOT_SSM, group="decoder"),
    Arch(
        "mamba2",
        "mamba2",
        "Mamba2Config",
        "Mamba2ForCausalLM",
        dict(state_size=8, num_heads=4, head_dim=16, n_groups=1, expand=2, chunk_size=16),
        drop=_NOT_SSM,
        group="decoder",
    ),
    Arch(
        "falcon-mamba",
        "falcon_mamba",
        "FalconMambaConfig",
        "FalconMambaForCausalLM",
        dict(state_size=8),
        drop=_NOT_SSM,
        group="decoder",
    ),  # fmt: skip
]
ARCH_BY_ID = {a.id: a for a in ARCHS}


def arch_params(archs: list[Arch]) -> list:
    """``archs`` as pytest parameters named by id, the slow ones marked ``slow``."""
    return [pytest.param(a, id=a.id, marks=[pytest.mark.slow] if a.slow else []) for a in archs]


# model_head.py's table entries without a tiny text-only build here, and why (each is still covered by the first-step
# check).
NOT_BUILT_HERE = {
    "gemma3": "multimodal wrapper; its text model is gemma3_text (Gemma3ForCausalLM), covered",
    "gemma3n": "multimodal wrapper around gemma3n_text",
    "gemma3n_text": "AltUp/LAuReL/per-layer-input stack, no tiny text-only build in this suite",
    "gemma4": "multimodal wrapper around gemma4_text",
    "gemma4_text": "per-layer-input stack, no tiny text-only build in this suite",
    "granite4_vision": "multimodal wrapper dividing by text_config.logits_scaling (read from its forward, not built)",
}

# ----------------------------------------------------------------------------------------------------- padding-free

# What packing is refused for, by architecture: the feature the refusal names (packable.packing_obstacles).
PACKING_REFUSED = {
    "stablelm": "takes no keyword arguments",
    "falcon": "AttentionInterface does not run",
    "granitemoehybrid": "GraniteMoeHybridMambaLayer",
    "recurrent-gemma": "RecurrentGemmaRglru",
    "falcon-h1": "FalconH1Mixer",
    **{a.id: "forward without position_ids" for a in ARCHS if a.id.endswith("-causal")},
    "llama4-text": "chunked attention",
    "mamba": "MambaMixer",
    "mamba2": "Mamba2Mixer",
    "falcon-mamba": "FalconMambaMixer",
}
_HYBRID = dict(COMMON, num_hidden_layers=2)
# Built only to be refused: recurrent hybrids, ALiBi, Llama-4's NoPE temperature, windows only in the mask;
# (config, model, kwargs, feature)
REFUSED_ONLY = {
    "jamba": ("JambaConfig", "JambaForCausalLM", dict(_HYBRID, num_experts=2, num_experts_per_tok=1,
              attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8, mamba_dt_rank=4, use_mamba_kernels=False),
              "JambaMambaMixer"),
    "zamba2": ("Zamba2Config", "Zamba2ForCausalLM", dict(_HYBRID, mamba_d_state=8, mamba_headdim=8, n_mamba_heads=8,
               layers_block_type=["mamba", "hybrid"], num_mem_blocks=1, chunk_size=16), "Zamba2MambaMixer"),
    "bamba": ("BambaConfig", "BambaForCausalLM", dict(_HYBRID, attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=8,
              mamba_d_state=16, mamba_chunk_size=16), "BambaMixer"),
    "nemotron-h": ("NemotronHConfig", "NemotronHForCausalLM", dict(_HYBRID, hybrid_override_pattern="M*",
                   mamba_num_heads=8, mamba_head_dim=8, ssm_state_size=16, chunk_size=16, n_groups=1),
                   "NemotronHMamba2Mixer"),
    "qwen3-next": ("Qwen3NextConfig", "Qwen3NextForCausalLM", dict(_HYBRID, layer_types=["linear_attention",
                   "full_attention"], linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=8,
                   linear_value_head_dim=8, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32,
                   shared_expert_intermediate_size=32), "Qwen3NextGatedDeltaNet"),
    "lfm2": ("Lfm2Config", "Lfm2ForCausalLM", dict(_HYBRID, layer_types=["conv", "full_attention"]), "Lfm2ShortConv"),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=4), "ALiBi"),
    "falcon-alibi": ("FalconConfig", "FalconForCausalLM", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                     num_attention_heads=4, alibi=True), "ALiBi"),
    "llama4-nope": ("Llama4TextConfig", "Llama4ForCausalLM", dict(_HYBRID, num_local_experts=4, num_experts_per_tok=1,
                    intermediate_size_mlp=64, interleave_moe_layer_step=1, no_rope_layers=[1, 0], floor_scale=4),
                    "NoPE layers with attn_temperature_tuning"),
    # a window only transformers' mask applies: the attention neither keeps nor passes it
    "phimoe-window": ("PhimoeConfig", "PhimoeForCausalLM", dict(_HYBRID, num_local_experts=4, sliding_window=4),
                      "that only transformers' attention mask applies: PhimoeAttention"),
    "doge-window": ("DogeConfig", "DogeForCausalLM", dict(_HYBRID, sliding_window=4),
                    "that only transformers' attention mask applies: DogeAttention"),
}  # fmt: skip


# ----------------------------------------------------------------------------------------------- building the models


def model_classes(arch: Arch) -> tuple[type, type]:
    """``(config class, model class)`` of ``arch`` in the installed transformers; skips the test where it has none."""
    try:
        mod = importlib.import_module(f"transformers.models.{arch.module}")
        return getattr(mod, arch.config_cls), getattr(mod, arch.model_cls)
    except (ImportError, AttributeError) as exc:
        pytest.skip(f"{arch.model_cls} cannot be built in transformers {transformers.__version__}: {exc}")


def scale_head_(model: torch.nn.Module, target: float) -> None:
    """Scale the output embedding (the input one too, when tied) until max |W h + b| ≈ ``target``; ``W h + b`` read
    by a hook on ``get_output_embeddings()`` during the model's own forward, not with the code under test."""
    head = model.get_output_embeddings()
    ids, mask, _ = tiny_batch()
    with torch.no_grad():
        for _ in range(4):
            seen = []
            handle = head.register_forward_hook(lambda _m, _a, out, seen=seen: seen.append(out))
            try:
                model(input_ids=ids, attention_mask=mask)
            finally:
                handle.remove()
            peak = seen[0].double().abs().max().item()
            if abs(peak / target - 1) < 0.1:
                return
            head.weight.mul_(target / peak)
            if head.bias is not None:
                head.bias.mul_(target / peak)
    raise AssertionError(f"could not scale the head to |z| ≈ {target}: {peak}")


def build_model(arch: Arch, seed: int = 0) -> torch.nn.Module:
    config_cls, model_cls = model_classes(arch)
    kwargs = {k: v for k, v in COMMON.items() if k not in arch.drop}
    kwargs.update(arch.kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = config_cls(**kwargs) if arch.outer is None else config_cls(text_config=kwargs, **arch.outer)
        config._attn_implementation = "eager"
        torch.manual_seed(seed)
        model = model_cls(config).float().eval()
        head_bias = getattr(model.get_output_embeddings(), "bias", None)
        if head_bias is not None:  # initialised to 0: make it matter (Phi)
            with torch.no_grad():
                head_bias.normal_(0.0, arch.target / 8, generator=torch.Generator().manual_seed(seed + 1))
    scale_head_(model, arch.target)
    return model


def tiny_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int64 ``[SEQS, SEQ_LEN]`` input ids and attention mask (row 1 right-padded by 3), and labels ``ids[:, 1:]``
    with prompt / pad positions -100."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, VOCAB, (SEQS, SEQ_LEN), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    labels = ids[:, 1:].clone()
    labels[:, :2] = -100  # prompt
    labels[1, -3:] = -100  # padding
    labels[0, 6] = -100  # a masked position inside the completion
    return ids, mask, labels


# -------------------------------------------------------------------- the model's own log-probs and the fused head's


def gather_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The yardstick: float64 log_softmax of a model's own logits at the labels, 0 at ignored positions."""
    lp = torch.log_softmax(logits.double(), dim=-1)
    valid = labels != -100
    y = torch.where(valid, labels, 0)
    return torch.where(valid, lp.gather(-1, y.unsqueeze(-1)).squeeze(-1), 0.0)


def model_logprobs(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """float64 ``[B, T-1]``: :func:`gather_logprobs` of ``model``'s own forward on the padded batch."""
    return gather_logprobs(model(input_ids=ids, attention_mask=mask).logits[:, :-1], labels)


def head_input(view: HeadView, model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, T-1, d]``: the input ``model``'s own forward gives its output layer, as the trainer reads it."""
    return forward_to_head(view, lambda: model(input_ids=ids, attention_mask=mask), ids.shape).hidden[:, :-1]


def head_streams(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
    impl: str,
    *,
    adapters: bool = True,
    ref: torch.nn.Module | None = None,
    epsilon: float = EPSILON,
) -> tuple[HeadView, LinearLogprobs]:
    """The package's streams for ``model`` (policy) and ``ref`` (reference; ``model`` itself if None)."""
    view = describe_head(model)
    hidden = head_input(view, model, ids, mask)
    w, b = view.weight_and_bias(adapters=adapters)
    if ref is None:
        ref_hidden, ref_w, ref_b, ref_transform = hidden.detach(), w.detach(), b, view.transform
    else:
        ref_view = describe_head(ref)
        with torch.no_grad():
            ref_hidden = head_input(ref_view, ref, ids, mask)
            ref_w, ref_b = ref_view.weight_and_bias()
        ref_transform = ref_view.transform
    assert ref_transform == view.transform
    streams = linear_logprobs(hidden, w, labels, ref_hidden=ref_hidden, ref_weight=ref_w, bias=b,
                              ref_bias=None if ref_b is None else ref_b.detach(), transform=view.transform,
                              epsilon=epsilon, impl=impl, token_chunk=7, vocab_chunk=32)  # fmt: skip
    return view, streams
