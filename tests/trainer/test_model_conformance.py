"""The fused head against each architecture's own forward: ``describe_head`` + ``linear_logprobs`` must give the
log-probs (and every parameter's gradient) that ``log_softmax(model(...).logits)`` gives, for tiny random fp32
models of every decoder-only causal LM Axolotl users commonly fine-tune, with their logit transforms made to bite.

The yardstick is always the model's (or the PeftModel's) own forward in transformers / peft, never this package.
"""

from __future__ import annotations

import copy
import importlib
import re
import warnings
from dataclasses import dataclass, field

import pytest
import torch

from edpo_plugin.ops import LogitTransform, linear_logprobs, triton_available
from edpo_plugin.trainer.model_head import describe_head, forward_to_head

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 96
SEQS, SEQ_LEN = 2, 12
EPSILON = 0.01
# The head and the model's forward both compute fp32 logits from the same fp32 hidden states and weights; the only
# difference is the order of fp32 sums (~1e-7 relative), far below these bounds and far above float64 noise.
STREAM_TOL = 1e-5
GRAD_TOL = 1e-4
IMPLS = ["naive", "chunked"] + (["triton"] if triton_available() else [])

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


def _params(archs):
    return [pytest.param(a, id=a.id, marks=[pytest.mark.slow] if a.slow else []) for a in archs]


# ----------------------------------------------------------------------------------------------- building the models


def _classes(arch: Arch):
    try:
        mod = importlib.import_module(f"transformers.models.{arch.module}")
        return getattr(mod, arch.config_cls), getattr(mod, arch.model_cls)
    except (ImportError, AttributeError) as exc:
        pytest.skip(f"{arch.model_cls} cannot be built in transformers {transformers.__version__}: {exc}")


def _scale_head_(model: torch.nn.Module, target: float) -> None:
    """Scale the output embedding (the input one too, when tied) until max |W h + b| ≈ ``target``; ``W h + b`` read
    by a hook on ``get_output_embeddings()`` during the model's own forward, not with the code under test."""
    head = model.get_output_embeddings()
    ids, mask, _ = _batch()
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


def _build(arch: Arch, seed: int = 0) -> torch.nn.Module:
    config_cls, model_cls = _classes(arch)
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
    _scale_head_(model, arch.target)
    return model


def _batch():
    """Input ids, attention mask (row 1 right-padded by 3) and labels ids[:, 1:] with prompt/pad positions -100."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, VOCAB, (SEQS, SEQ_LEN), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    labels = ids[:, 1:].clone()
    labels[:, :2] = -100  # prompt
    labels[1, -3:] = -100  # padding
    labels[0, 6] = -100  # a masked position inside the completion
    return ids, mask, labels


def _upstream(labels: torch.Tensor) -> torch.Tensor:
    return torch.randn(labels.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)


def _gather(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The yardstick: float64 log_softmax of a model's own logits at the labels, 0 at ignored positions."""
    lp = torch.log_softmax(logits.double(), dim=-1)
    valid = labels != -100
    y = torch.where(valid, labels, 0)
    return torch.where(valid, lp.gather(-1, y.unsqueeze(-1)).squeeze(-1), 0.0)


def _model_logprobs(model: torch.nn.Module, ids, mask, labels) -> torch.Tensor:
    return _gather(model(input_ids=ids, attention_mask=mask).logits[:, :-1], labels)


def _head_input(view, model, ids, mask) -> torch.Tensor:
    """``[B, T-1, d]``: the input ``model``'s own forward gives its output layer, as the trainer reads it."""
    return forward_to_head(view, lambda: model(input_ids=ids, attention_mask=mask), ids.shape).hidden[:, :-1]


def _head_streams(model, ids, mask, labels, impl, *, adapters=True, ref=None, epsilon=EPSILON):
    """The package's streams for ``model`` (policy) and ``ref`` (reference; ``model`` itself if None)."""
    view = describe_head(model)
    hidden = _head_input(view, model, ids, mask)
    w, b = view.weight_and_bias(adapters=adapters)
    if ref is None:
        ref_hidden, ref_w, ref_b, ref_transform = hidden.detach(), w.detach(), b, view.transform
    else:
        ref_view = describe_head(ref)
        with torch.no_grad():
            ref_hidden = _head_input(ref_view, ref, ids, mask)
            ref_w, ref_b = ref_view.weight_and_bias()
        ref_transform = ref_view.transform
    assert ref_transform == view.transform
    streams = linear_logprobs(hidden, w, labels, ref_hidden=ref_hidden, ref_weight=ref_w, bias=b,
                              ref_bias=None if ref_b is None else ref_b.detach(), transform=view.transform,
                              epsilon=epsilon, impl=impl, token_chunk=7, vocab_chunk=32)  # fmt: skip
    return view, streams


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-30)).item()


def _grads(loss: torch.Tensor, named: list[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, [p for _, p in named], allow_unused=True, materialize_grads=True))


def _assert_grads_match(named, got, want, what: str) -> None:
    assert named, f"{what}: no trainable parameters"
    bad = []
    # A gradient that is 0 in exact arithmetic (a key-projection bias: softmax ignores a constant shift of every key
    # score) is fp32 cancellation noise in both, of the order of 1e-7 of the gradients around it.
    noise = 1e-6 * max(float(w.double().norm()) for w in want)
    for (name, _), g, w in zip(named, got, want):
        if w.norm() == 0:
            if g.norm() != 0:
                bad.append(f"{name}: model gives 0, head gives |g|={g.norm():.3e}")
        elif w.double().norm() < noise:
            if (g.double() - w.double()).norm() > noise:
                bad.append(f"{name}: model gives noise (|g| < {noise:.1e}), head gives |g|={g.norm():.3e}")
        elif _rel(g, w) > GRAD_TOL:
            bad.append(f"{name}: relative error {_rel(g, w):.2e}")
    assert not bad, f"{what}: gradients differ from autograd through the model's own logits:\n" + "\n".join(bad)


_CACHE: dict[str, dict] = {}


def _fixture(arch: Arch) -> dict:
    """Model, batch, the model's own log-probs and parameter gradients (built once per architecture)."""
    if arch.id not in _CACHE:
        model = _build(arch)
        ids, mask, labels = _batch()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        want = _model_logprobs(model, ids, mask, labels)
        upstream = _upstream(labels)
        want_grads = _grads((want * upstream).sum(), named)
        _CACHE[arch.id] = dict(model=model, ids=ids, mask=mask, labels=labels, want=want.detach(), named=named,
                               upstream=upstream, want_grads=want_grads)  # fmt: skip
    return _CACHE[arch.id]


# -------------------------------------------------------------------------------------------- architecture tests


@pytest.mark.parametrize("arch", _params(ARCHS))
def test_transform_is_read_and_bites(arch: Arch):
    """describe_head reads the transform the model's forward applies, and here it changes log-probs by > 1 nat."""
    f = _fixture(arch)
    model, labels = f["model"], f["labels"]
    view = describe_head(model)
    assert view.transform == arch.expect, f"{type(model).__name__}: {view.transform} != {arch.expect}"
    assert view.module is model.get_output_embeddings()
    tied = view.weight_and_bias()[0] is model.get_input_embeddings().weight
    if arch.tied is not None:
        assert tied == arch.tied
    with torch.no_grad():
        h = _head_input(view, model, f["ids"], f["mask"])
        w, b = view.weight_and_bias()
        untransformed = _gather(h.double() @ w.double().T + (0 if b is None else b.double()), labels)
    gap = (untransformed - f["want"]).abs().max().item()
    if arch.expect.is_identity:
        assert gap < 1e-4, f"plain logits, yet lm_head(h) misses the model's log-probs by {gap:.2e}"
    else:
        assert gap > 1.0, f"the transform changes log-probs by only {gap:.3f} nat: the test would prove nothing"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", _params(ARCHS))
def test_head_matches_model_forward(arch: Arch, impl: str):
    """Policy == reference here: all four streams are the model's own log-probs; then, with loss = Σ upstream ·
    policy, every parameter's gradient (lm_head, embeddings tied or not, final norm, attention, MLP / experts)
    equals autograd through the model's own logits."""
    f = _fixture(arch)
    _, streams = _head_streams(f["model"], f["ids"], f["mask"], f["labels"], impl)
    ignored = f["labels"] == -100
    for name in ("policy", "ref", "plus", "minus"):
        got = getattr(streams, name)
        assert got.dtype == torch.float32 and got.shape == f["labels"].shape
        assert (got[ignored] == 0).all(), f"{name}: ignored positions must be 0"
        err = _rel(got, f["want"])
        assert err <= STREAM_TOL, f"{arch.model_cls} {impl} {name}: relative error {err:.2e} > {STREAM_TOL}"

    got = _grads((streams.policy.double() * f["upstream"]).sum(), f["named"])
    names = {n for n, _ in f["named"]}
    assert any("embed" in n or "wte" in n or "word_embeddings" in n for n in names)
    assert any("norm" in n or "ln_f" in n for n in names) or not arch.norm_params
    _assert_grads_match(f["named"], got, f["want_grads"], f"{arch.model_cls} ({impl})")


def _perturbed_copy(arch: Arch, model: torch.nn.Module, seed: int = 5) -> torch.nn.Module:
    try:
        ref = copy.deepcopy(model)
    except RuntimeError:  # a module holding a non-leaf tensor (RecurrentGemma): rebuild, same seed, same weights
        ref = _build(arch)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.2 * p.std().nan_to_num(0.0) * torch.randn(p.shape, generator=g) if p.numel() > 1 else 0.0)
    return ref


@pytest.mark.parametrize("impl", ["chunked"])
@pytest.mark.parametrize("arch", _params(ARCHS))
def test_reference_from_a_perturbed_copy(arch: Arch, impl: str):
    """Reference = a copy with different weights: ref stream = the copy's own forward; the ε-mixes = log_softmax of
    (1 ± ε) z_θ ∓ ε z_ref from both models' own logits (ε large enough here for the mix to matter)."""
    f = _fixture(arch)
    model, ids, mask, labels = f["model"], f["ids"], f["mask"], f["labels"]
    ref = _perturbed_copy(arch, model)
    eps = 0.25
    with torch.no_grad():
        z = model(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
        zr = ref(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
    want = {
        "policy": _gather(z, labels),
        "ref": _gather(zr, labels),
        "plus": _gather((1 + eps) * z - eps * zr, labels),
        "minus": _gather((1 - eps) * z + eps * zr, labels),
    }
    assert (want["ref"] - want["policy"]).abs().max() > 0.1, "the perturbation must change the reference"
    _, streams = _head_streams(model, ids, mask, labels, impl, ref=ref, epsilon=eps)
    for name, w in want.items():
        err = _rel(getattr(streams, name), w)
        assert err <= STREAM_TOL, f"{arch.model_cls} {name}: relative error {err:.2e} > {STREAM_TOL}"


def test_suite_covers_model_head_table():
    """Every model_type model_head.py maps to a transform has a case here (or is named as not buildable)."""
    from edpo_plugin.trainer import model_head

    tables = {**model_head._SOFTCAP_FIELD, **model_head._MULTIPLY_FIELD, **model_head._DIVIDE_FIELD}
    covered = set()
    for arch in ARCHS:
        mod = importlib.import_module(f"transformers.models.{arch.module}")
        covered.add(getattr(mod, arch.config_cls).model_type)
    missing = sorted(set(tables) - covered - set(NOT_BUILT_HERE))
    assert not missing, f"model_head.py's table names model types without a conformance case: {missing}"


# Table entries without a tiny text-only build here, and why (each is still covered by the first-step check).
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
# Built only to be refused: recurrent hybrids, ALiBi, Llama-4's NoPE temperature; (config, model, kwargs, feature)
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
}  # fmt: skip


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
@pytest.mark.parametrize("arch", _params(ARCHS))
def test_padding_free_is_exact_or_refused(arch: Arch, attn: str):
    """Every architecture packed the way padding-free training packs it (whole sequences, and shared prompts) gives
    each token the log-prob of the model's own forward on its row alone — or is refused up front, from its config and
    classes, naming the feature (then no check has to catch it)."""
    from edpo_plugin.trainer.packable import packing_obstacles
    from edpo_plugin.trainer.packed_attention import use_packed_attention
    from edpo_plugin.trainer.packing import pack_rows

    model = _build(arch)
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
        want = torch.cat([_gather(model(input_ids=r[None]).logits[:, :-1], r[None, 1:]) for r in rows], dim=1)
    assert use_packed_attention(model)
    for share in (False, True):
        packed = pack_rows(ids, mask, share_prefixes=share)
        with torch.no_grad():
            logits = model(**packed.model_kwargs(), use_cache=False).logits[:, packed.label_index]
        packed.layout.check_reached(arch.model_cls)
        assert (_gather(logits, packed.labels) - want).abs().max().item() <= STREAM_TOL, f"share_prefixes={share}"


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

    model = get_peft_model(_build(ARCH_BY_ID["llama-untied"]), LoraConfig(r=2, target_modules=["q_proj"],
                                                                          alora_invocation_tokens=[5, 6]))  # fmt: skip
    with pytest.raises(ValueError, match=r"PEFT activated LoRA \(adapter 'default': alora_invocation_tokens"):
        check_packable(model)
    assert not check_packable(
        get_peft_model(_build(ARCH_BY_ID["llama-tied"]), LoraConfig(r=2, target_modules=["q_proj"]))
    )


# ----------------------------------------------------------------------------------------------------- refusals


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
    ids, mask, labels = _batch()
    _, streams = _head_streams(model, ids, mask, labels, "chunked")
    assert _rel(streams.policy, _model_logprobs(model, ids, mask, labels)) <= STREAM_TOL


def _llama(tied: bool, seed: int = 0):
    return _build(ARCH_BY_ID["llama-tied" if tied else "llama-untied"], seed)


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
        model = make(_build(ARCH_BY_ID[base]))
    with pytest.raises(ValueError, match=match):
        describe_head(model)


# ------------------------------------------------------------------------------------------- PEFT cases that work


def _lora_saved_head(base: str):
    model = _build(ARCH_BY_ID[base])
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
                             init_lora_weights=False)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, config)
    saved = pm.base_model.model.get_output_embeddings()
    assert type(saved).__name__ == "ModulesToSaveWrapper"
    with torch.no_grad():
        w = saved.modules_to_save["default"].weight
        w.add_(0.3 * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(3)))
    return pm


def _trainable_tokens_untied():
    model = _build(ARCH_BY_ID["llama-untied"])
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices={"lm_head": [3, 5, 8]})
    return peft.get_peft_model(model, config)


def _trainable_tokens_tied():
    model = _build(ARCH_BY_ID["llama-tied"])
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [3, 5, 8]})
    return peft.get_peft_model(model, config)


def _perturb_tokens(pm):
    head = pm.base_model.model.get_output_embeddings()
    assert type(head).__name__ == "TrainableTokensWrapper", type(head).__name__
    with torch.no_grad():
        for delta in head.token_adapter.trainable_tokens_delta.values():
            delta.add_(3.0 * torch.randn(delta.shape, generator=torch.Generator().manual_seed(4)))
    return pm


PEFT_CASES = [
    pytest.param(lambda: _lora_saved_head("llama-untied"), id="lora+modules_to_save-untied"),
    pytest.param(lambda: _lora_saved_head("llama-tied"), id="lora+modules_to_save-tied"),
    pytest.param(lambda: _lora_saved_head("gemma2"), id="lora+modules_to_save-gemma2-softcap"),
    pytest.param(lambda: _perturb_tokens(_trainable_tokens_untied()), id="trainable-tokens-untied-lm_head"),
    pytest.param(lambda: _perturb_tokens(_trainable_tokens_tied()), id="trainable-tokens-tied-via-embed_tokens"),
]


@pytest.mark.parametrize("impl", ["naive", "chunked"])
@pytest.mark.parametrize("make", PEFT_CASES)
def test_peft_head_matches_peft_forward(make, impl):
    """As ε-DPO uses a PeftModel: policy = weight_and_bias(adapters=True) on the adapted backbone's hidden states,
    reference = weight_and_bias(adapters=False) (read outside disable_adapter(): the flag alone must select it) on
    the hidden states under disable_adapter(). Policy, reference and both ε-mixes must be those of the PeftModel's
    own forward with and without its adapters, and every trainable parameter's gradient (LoRA, saved head copy,
    trainable-token delta) must equal autograd through its own logits."""
    pm = make()
    ids, mask, labels = _batch()
    named = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]
    view = describe_head(pm)
    z_on = pm(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
    hidden = _head_input(view, pm, ids, mask)
    with pm.disable_adapter(), torch.no_grad():
        z_off = pm(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
        ref_hidden = _head_input(view, pm, ids, mask)
        inside = [view.weight_and_bias(adapters=a) for a in (True, False)]
    w, b = view.weight_and_bias(adapters=True)
    ref_w, ref_b = view.weight_and_bias(adapters=False)
    for w_in, b_in in inside:  # inside disable_adapter() both flags read what the disabled forward uses
        assert torch.equal(w_in, ref_w) and (b_in is None) == (ref_b is None)
    eps = 0.25
    streams = linear_logprobs(hidden, w, labels, ref_hidden=ref_hidden, ref_weight=ref_w.detach(), bias=b,
                              ref_bias=None if ref_b is None else ref_b.detach(), transform=view.transform,
                              epsilon=eps, impl=impl, token_chunk=7, vocab_chunk=32)  # fmt: skip
    want = {
        "policy": _gather(z_on, labels),
        "ref": _gather(z_off, labels),
        "plus": _gather((1 + eps) * z_on - eps * z_off, labels),
        "minus": _gather((1 - eps) * z_on + eps * z_off, labels),
    }
    gap = (want["policy"] - want["ref"]).abs().max()
    assert gap > 0.5, "the adapter must change the log-probs, or the test proves nothing"
    for name, want_s in want.items():
        err = _rel(getattr(streams, name), want_s)
        assert err <= STREAM_TOL, f"{name}: relative error {err:.2e} > {STREAM_TOL}"

    upstream = _upstream(labels)
    got = _grads((streams.policy.double() * upstream).sum(), named)
    want_grads = _grads((want["policy"] * upstream).sum(), named)
    assert any("modules_to_save" in n or "trainable_tokens_delta" in n for n, _ in named)
    _assert_grads_match(named, got, want_grads, f"PEFT {type(view.module).__name__} ({impl})")


@pytest.mark.parametrize(
    "target",
    [pytest.param(["lm_head"], id="untied-lm_head"), pytest.param(None, id="tied-via-default-embed_tokens")],
)
def test_standalone_trainable_tokens_is_exact_or_refused(target):
    """peft's own TrainableTokensConfig (not LoRA's trainable_token_indices) puts a TrainableTokensLayer on lm_head:
    the head must either reproduce the PeftModel's forward or refuse with ValueError, never train something else."""
    model = _build(ARCH_BY_ID["llama-untied" if target else "llama-tied"])
    pm = peft.get_peft_model(model, peft.TrainableTokensConfig(target_modules=target, token_indices=[3, 5, 8]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "trainable_tokens_delta" in n:
                p.add_(3.0 * torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))
    try:
        describe_head(pm)
    except ValueError:
        return
    ids, mask, labels = _batch()
    _, on = _head_streams(pm, ids, mask, labels, "chunked")
    assert _rel(on.policy, _model_logprobs(pm, ids, mask, labels)) <= STREAM_TOL
    with pm.disable_adapter():
        _, off = _head_streams(pm, ids, mask, labels, "chunked", adapters=False)
        assert _rel(off.policy, _model_logprobs(pm, ids, mask, labels)) <= STREAM_TOL


def test_merged_trainable_tokens_reference_is_the_original_rows():
    """After merge_adapter() the trained rows live in the base weight; the reference must still read the original
    rows, as PEFT's disable_adapter() forward (which unmerges) does."""
    pm = _perturb_tokens(_trainable_tokens_untied())
    pm.merge_adapter()
    ids, mask, labels = _batch()
    with torch.no_grad():  # the head reads adapters=False before any disabled forward has unmerged the rows
        _, off = _head_streams(pm, ids, mask, labels, "naive", adapters=False)
        with pm.disable_adapter():
            want_off = _model_logprobs(pm, ids, mask, labels)
    assert _rel(off.policy, want_off) <= STREAM_TOL


@pytest.mark.parametrize("layer", ["Linear4bit", "Linear8bitLt"])
def test_quantized_lm_head_is_refused(layer):
    bnb = pytest.importorskip("bitsandbytes")
    model = _build(ARCH_BY_ID["llama-untied"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.lm_head = getattr(bnb.nn, layer)(32, VOCAB, bias=False)
    with pytest.raises(ValueError, match=rf"LlamaForCausalLM's lm_head is a {layer}"):
        describe_head(model)


@pytest.mark.parametrize("arch", _params(ARCHS))
def test_first_step_check_accepts_every_supported_architecture(arch: Arch):
    """The trainer's first-step check (captured head input → fused head vs the model's own logits) passes on every
    architecture described here — no false refusal (MiniCPM3 divides its hidden state before lm_head)."""
    from edpo_plugin.trainer.head_check import check_row, compare_with_model, own_forward_logprobs

    model = _build(arch)
    view = describe_head(model)
    ids, mask, labels = _batch()
    completion = (labels != -100).long()
    row_ids, row_mask = check_row(ids, mask, torch.cat((torch.zeros_like(ids[:, :1]), completion), dim=1))
    with torch.no_grad():
        own = own_forward_logprobs(lambda: model(input_ids=row_ids, attention_mask=row_mask).logits, view.module,
                                   row_ids[:, 1:], view.transform.scale)  # fmt: skip
        hidden = _head_input(view, model, row_ids, row_mask)
        weight, bias = view.weight_and_bias()
        fused = linear_logprobs(hidden, weight, row_ids[:, 1:], ref_hidden=hidden, ref_weight=weight, bias=bias,
                                ref_bias=bias, epsilon=EPSILON, transform=view.transform, impl="chunked")  # fmt: skip
    assert compare_with_model(own, fused.policy, arch.id) <= 1e-4


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


def test_forward_to_head_builds_no_logits_and_never_calls_the_real_head():
    """The capture stands in for the output layer: the forward's logits are [B, T, 0] and the real lm_head (hook
    counted) is not called, so nothing [B, T, V] is built and ZeRO-3 / FSDP gather no head there; afterwards the model
    holds its own lm_head again."""
    model = _build(ARCH_BY_ID["llama-untied"])
    view = describe_head(model)
    ids, mask, _ = _batch()
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
    ids, mask, _ = _batch()
    with pytest.raises(ValueError, match=r"_TwoHeadCallsLlama's forward called its output layer \(lm_head\) on inputs "
                       r"of shapes \[\(2, 1, 32\), \(2, 12, 32\)\]"):  # fmt: skip
        forward_to_head(describe_head(model), lambda: model(input_ids=ids, attention_mask=mask), ids.shape)
