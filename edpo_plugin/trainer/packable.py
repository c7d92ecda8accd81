"""What a packed forward cannot run exactly, found from the model's config and module classes before training.

Padding-free training runs a micro-batch's sequences end to end in one row (:mod:`packing`). That is the model's own
objective only when nothing in the forward depends on a token's position in the *row* or treats the row as one
sequence: attention is split per sequence by ε-DPO's packed attention (:mod:`packed_attention`) and positions come
from ``position_ids``. :func:`packing_obstacles` lists what breaks that, each naming the feature and where it was
found; :func:`check_packable` refuses with all of them. The decision does not depend on the first-step check, so it
holds with ``edpo_head_check`` off and for evaluation.

Found here (transformers 5.16–5.24 classes):

- a sequence-mixing layer other than attention: a convolution over the sequence (``nn.Conv1d``) or a recurrent /
  state-space / linear-attention block (Mamba, Mamba-2, Jamba, Zamba2, Bamba, Falcon-H1, Nemotron-H, GraniteMoeHybrid,
  Qwen3-Next, LFM2, RecurrentGemma): their scan runs across the packed sequences;
- positions the forward does not take from ``position_ids``: a forward without a ``position_ids`` argument (the
  Bart / Whisper / TrOCR family of causal decoders counts positions from the start of the row);
- attention that depends on the position in the row: chunked attention (``attention_chunk_size``, Llama-4), NoPE
  layers with temperature tuning (``attn_temperature_tuning``, Llama-4), ALiBi biases (``alibi``, Bloom, MPT);
- an attention that transformers' ``AttentionInterface`` does not run (Falcon), or that does not take the forward's
  keyword arguments (``_supports_attention_backend = False``: StableLM, Falcon-H1, the Bart family), so ε-DPO's
  packed attention cannot replace it or never sees the layout;
- PEFT activated LoRA (``alora_invocation_tokens``): PEFT finds where the adapter switches on once per input row.

What cannot be seen here (a model that drops the keyword arguments on the way to its attention) is caught on every
packed forward: the packed attention counts its calls (:class:`~edpo_plugin.trainer.packed_attention.PackedLayout`).
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Iterable

import torch
from accelerate.utils import is_peft_model

from edpo_plugin.trainer.packed_attention import can_share_prefixes, use_packed_attention

logger = logging.getLogger(__name__)

# transformers' attention implementations that ε-DPO's packed attention replaces during padding-free training
PACKABLE_ATTENTION = ("sdpa", "eager", "flash_attention_2")
# Batch keys a packed forward can take: anything else (token_type_ids, pixel_values, …) is laid out per padded row.
PACKABLE_KEYS = {"input_ids", "attention_mask", "completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
# Class names of sequence-mixing blocks other than attention (besides any nn.Conv1d over the sequence)
_RECURRENT_CLASS = re.compile(r"Mamba|SSM|Mixer|Recurrent|Rglru|RGLRU|DeltaNet|LinearAttention|ShortConv|Lightning")
_NEUTRAL = (None, False, 0)


def packing_obstacles(model: torch.nn.Module, attention: str | None = None) -> list[str]:
    """What makes a packed forward of ``model`` differ from its own forward on each sequence, one string per feature
    (empty when none is known). ``model``: a causal LM or a ``PeftModel`` around one; ``attention``: the
    implementation it runs (default: its config's)."""
    obstacles = _peft_obstacles(model) if is_peft_model(model) else []
    causal_lm = model.base_model.model if is_peft_model(model) else model
    config = causal_lm.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    attention = attention or getattr(config, "_attn_implementation", None)
    if attention not in PACKABLE_ATTENTION and not str(attention).startswith("edpo_packed"):
        obstacles.append(f"attn_implementation={attention!r} (ε-DPO packs sdpa, eager or flash_attention_2)")
    has_attention = any("Attention" in type(m).__name__ for m in causal_lm.modules())
    if has_attention and not _can_set_attention(causal_lm):
        obstacles.append("an attention that transformers' AttentionInterface does not run (no packed attention)")
    elif has_attention and not getattr(type(causal_lm), "_supports_attention_backend", True):
        obstacles.append("an attention that takes no keyword arguments from the forward (the packed layout)")
    if "position_ids" not in inspect.signature(causal_lm.forward).parameters:
        obstacles.append("a forward without position_ids (positions counted from the start of the packed row)")
    if getattr(text, "attention_chunk_size", None) not in _NEUTRAL:
        obstacles.append(f"chunked attention (attention_chunk_size={text.attention_chunk_size}, chunks of the row)")
    if getattr(text, "attn_temperature_tuning", None) and _has_nope_layer(causal_lm, text):
        obstacles.append("NoPE layers with attn_temperature_tuning (query scaling by the position in the row)")
    if getattr(text, "alibi", None) or getattr(text, "model_type", "") in ("bloom", "mpt"):
        obstacles.append("ALiBi position biases (by the position in the row)")
    if getattr(text, "sliding_window", None) not in _NEUTRAL and getattr(text, "use_sliding_window", True) is not False:
        blind = sorted({type(m).__name__ for m in _decoder(causal_lm).modules() if _window_only_in_mask(m)})
        if blind:
            obstacles.append(
                f"a sliding window (sliding_window={text.sliding_window}) that only transformers' attention mask "
                f"applies: {', '.join(blind)} neither keeps nor passes it, and packed attention takes no mask"
            )
    obstacles += _sequence_mixers(_decoder(causal_lm), _class_prefix(causal_lm))
    return obstacles


def _window_only_in_mask(module: torch.nn.Module) -> bool:
    """A decoder attention that has no ``sliding_window`` of its own and does not pass one to the attention function
    (PhiMoE, Doge): its window lives in the mask alone. Mistral passes the config's; Gemma-2 and Qwen-2 keep theirs
    per layer (``None`` on full-attention layers)."""
    if not type(module).__name__.endswith("Attention"):
        return False
    if hasattr(module, "sliding_window"):
        return False
    try:
        return "sliding_window" not in inspect.getsource(type(module).forward)
    except (OSError, TypeError):  # no source to read: the first-step check compares with the model's own attention
        return False


def check_packable(model: torch.nn.Module, attention: str | None = None) -> None:
    """Refuse, naming the class, each feature and the fix, a model (or PEFT model) that a packed forward cannot run
    exactly (:func:`packing_obstacles`)."""
    causal_lm = model.base_model.model if is_peft_model(model) else model
    obstacles = packing_obstacles(model, attention)
    if obstacles:
        raise ValueError(
            f"padding_free=True would train {type(causal_lm).__name__} on a different objective: its forward depends "
            f"on the packed row through {'; '.join(obstacles)}. Set padding_free=False (Axolotl: dpo_padding_free: "
            "false)."
        )


def check_packable_keys(batch_keys: Iterable[str]) -> None:
    """Refuse batches carrying per-row inputs beyond the token ids (``pixel_values``, ``token_type_ids``, …)."""
    extra = sorted(set(batch_keys) - PACKABLE_KEYS)
    if extra:
        raise ValueError(
            f"padding_free=True packs token ids only, but the batches also carry {extra} (per padded row). Set "
            "padding_free=False (Axolotl: dpo_padding_free: false) for this model / dataset."
        )


def prepare_for_packing(models: list[torch.nn.Module], share_prompt: bool | None, router_aux_loss: bool) -> bool:
    """Padding-free set-up of the policy (PEFT-wrapped or not) and a separate reference: refuse what packing would
    change (:func:`check_packable`), switch each to ε-DPO's packed attention, and decide ``edpo_share_prompt``
    (``share_prompt``: None shares prompts when every model can, True requires it, False never); returns whether
    prompts are shared. Never with a router auxiliary loss: it averages over the tokens the backbone ran, which a
    shared prompt would count once instead of twice."""
    causal_lms = [model.base_model.model if is_peft_model(model) else model for model in models]
    for model, causal_lm in zip(models, causal_lms, strict=True):
        check_packable(model)
        attention = use_packed_attention(causal_lm)
        logger.info("ε-DPO: padding_free=True runs %s's attention as %s, one packed row per micro-batch.",
                    type(causal_lm).__name__, attention)  # fmt: skip
    if router_aux_loss:
        if share_prompt:
            raise ValueError(
                "edpo_share_prompt=True would change the MoE router auxiliary loss, which averages over the tokens the "
                "backbone runs (a shared prompt counts once, not twice). Leave edpo_share_prompt unset or set "
                "router_aux_loss_coef to 0."
            )
        return False
    unable = [f"{type(m).__name__} ({m.config._attn_implementation})" for m in causal_lms if not can_share_prefixes(m)]
    if share_prompt and unable:
        raise ValueError(
            f"edpo_share_prompt=True needs ε-DPO's packed attention (sdpa, eager or flash_attention_2); not so for "
            f"{', '.join(unable)}. Leave edpo_share_prompt unset."
        )
    share = not unable if share_prompt is None else share_prompt
    if share:
        logger.info("ε-DPO: padding_free=True runs each pair's prompt once for both completions.")
    return share


def _peft_obstacles(model: torch.nn.Module) -> list[str]:
    found = []
    for adapter, peft_config in model.peft_config.items():
        if getattr(peft_config, "alora_invocation_tokens", None):
            found.append(
                f"PEFT activated LoRA (adapter {adapter!r}: alora_invocation_tokens; PEFT finds where the adapter "
                "switches on once per input row)"
            )
    return found


def _decoder(causal_lm: torch.nn.Module) -> torch.nn.Module:
    """The text decoder stack (not a multimodal model's audio or vision encoders, whose convolutions never see the
    packed row)."""
    get_decoder = getattr(causal_lm, "get_decoder", None)
    try:
        decoder = get_decoder() if get_decoder is not None else None
    except (AttributeError, NotImplementedError, ValueError):
        decoder = None
    return decoder if isinstance(decoder, torch.nn.Module) else causal_lm


def _class_prefix(causal_lm: torch.nn.Module) -> str:
    """The architecture's class-name prefix (``RecurrentGemma`` of ``RecurrentGemmaForCausalLM``), which the names of
    its blocks start with and which is not itself a block kind."""
    return re.sub(r"For(CausalLM|ConditionalGeneration)$", "", type(causal_lm).__name__)


def _sequence_mixers(decoder: torch.nn.Module, prefix: str) -> list[str]:
    def mixes(m: torch.nn.Module) -> bool:
        name = type(m).__name__
        return isinstance(m, torch.nn.Conv1d) or bool(_RECURRENT_CLASS.search(name.removeprefix(prefix)))

    classes = sorted({type(m).__name__ for m in decoder.modules() if mixes(m)})
    if not classes:
        return []
    return [f"recurrent / state-space / convolutional layers across the sequence ({', '.join(classes)})"]


def _has_nope_layer(causal_lm: torch.nn.Module, text) -> bool:
    """Whether any attention layer runs without rotary embeddings (Llama-4's ``no_rope_layers`` zeros)."""
    if any(getattr(m, "use_rope", True) is False for m in causal_lm.modules()):
        return True
    return 0 in (getattr(text, "no_rope_layers", None) or [])


def _can_set_attention(causal_lm: torch.nn.Module) -> bool:
    """Whether transformers lets the model switch its attention implementation (its attention modules call the
    ``AttentionInterface``), so that ε-DPO's packed attention can run it; transformers' own test of that."""
    can_set = getattr(type(causal_lm), "_can_set_attn_implementation", None)
    return bool(can_set()) if can_set is not None else True
