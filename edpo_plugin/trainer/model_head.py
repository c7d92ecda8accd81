"""What a causal LM's logits really are, read from the model: head input, head weight and bias, logit transform.

The fused head never computes the model's logits; it needs the model's own objective stated as ``transform(W h + b)``
with ``h`` the input the model's own forward gives its output layer. :func:`forward_to_head` runs the model's forward
(PEFT's ``PeftModel.forward`` and its hooks, a wrapper's or a multimodal model's own routing, MoE router outputs
included) with the output layer swapped for a capture, so ``h`` is found the model's way, whatever the class calls
its backbone. :func:`describe_head` turns a causal LM — plain, PEFT-wrapped, or inside a
DDP / DeepSpeed / FSDP wrapper (pass the unwrapped module) — into a :class:`HeadView`, or refuses with a message
naming the model class and the field. What it covers:

- the post-head transform by architecture (``model_type``): soft cap ``c·tanh(z/c)`` (Gemma-2/3/3n/4, VaultGemma,
  NanoChat, RecurrentGemma), ``× logit_scale`` (Cohere family), ``÷ logits_scaling`` (Granite family),
  ``× logits_scaling`` (HyperCLOVA X), ``× lm_head_multiplier``
  (Falcon-H1). The same field name means opposite things in different families (Granite divides by
  ``logits_scaling``, HyperCLOVA X multiplies), so an architecture not listed here that sets any such field is
  refused rather than guessed. A rescale before the head (MiniCPM3 divides the hidden state) is part of the
  captured head input, so it needs no entry;
- PEFT ``modules_to_save`` on ``lm_head``: the policy reads the trained copy, the reference the original module;
- PEFT trainable tokens on ``lm_head``: the policy reads the base weight with the trained rows merged in
  (differentiable in the delta), the reference the base weight;
- refused: prompt-learning adapters (virtual tokens are not in the hidden states read here), a LoRA adapter on
  ``lm_head``, a quantized ``lm_head``, trainable tokens on a head with a bias (PEFT drops the bias itself).

Anything this table does not know is caught at run time by the first-step check (``head_check.py``), which
compares the fused head with the model's own forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from accelerate.utils import is_peft_model

from edpo_plugin.ops import LogitTransform

# model_type -> transform, from each architecture's ``*ForCausalLM.forward`` in transformers 5.16.
_SOFTCAP_FIELD = {
    "gemma2": "final_logit_softcapping",
    "gemma3": "final_logit_softcapping",
    "gemma3_text": "final_logit_softcapping",
    "gemma3n": "final_logit_softcapping",
    "gemma3n_text": "final_logit_softcapping",
    "gemma4": "final_logit_softcapping",
    "gemma4_text": "final_logit_softcapping",
    "vaultgemma": "final_logit_softcapping",
    "nanochat": "final_logit_softcapping",
    "recurrent_gemma": "logits_soft_cap",
}
_MULTIPLY_FIELD = {
    "cohere": "logit_scale",
    "cohere2": "logit_scale",
    "cohere2_moe": "logit_scale",
    "hyperclovax": "logits_scaling",
    "falcon_h1": "lm_head_multiplier",
}
_DIVIDE_FIELD = {
    "granite": "logits_scaling",
    "granite_swa": "logits_scaling",
    "granitemoe": "logits_scaling",
    "granitemoe_swa": "logits_scaling",
    "granitemoeshared": "logits_scaling",
    "granitemoehybrid": "logits_scaling",
    "granite4_vision": "logits_scaling",
}
# Plain transform although the config sets a transform field: multimodal wrappers whose forward is lm_head(h), and
# MiniCPM3, which divides the hidden state before lm_head (the head input forward_to_head captures is already divided).
_PLAIN_WRAPPERS = {"aya_vision", "cohere2_vision", "minicpm3"}
# Fields that, set on an architecture not in the tables above, mean its logits are probably not ``W h + b``.
_TRANSFORM_FIELDS = (
    "final_logit_softcapping",
    "logits_soft_cap",
    "logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "lm_head_multiplier",
    "output_multiplier",
    "logit_multiplier",
    "mup_width_multiplier",
)
_NEUTRAL = (None, 1, 1.0, False)

WeightReader = Callable[[bool], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass(frozen=True)
class HeadView:
    """A causal LM's logits as ``transform(W h + b)``.

    ``h`` (``[B, T, d]``) is what :func:`forward_to_head` captures; ``module`` is the output-embedding module
    (``lm_head`` or the PEFT wrapper around it), whose forward the fused head runs as so that ZeRO-3 / FSDP gather
    it; :meth:`weight_and_bias` reads ``W [V, d]`` and ``b [V]`` and must be called inside that forward. ``slot`` is
    ``(parent, attribute)`` under which the model holds ``module``.
    """

    causal_lm: torch.nn.Module
    module: torch.nn.Module
    transform: LogitTransform
    slot: tuple[torch.nn.Module, str]
    _read: WeightReader

    def weight_and_bias(self, adapters: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W, b)`` as the model's forward uses them with its PEFT adapters active (the policy: trained
        ``modules_to_save`` copy, merged trainable tokens) or, ``adapters=False``, disabled (PEFT's reference)."""
        return self._read(adapters)


def describe_head(model: torch.nn.Module) -> HeadView:
    """:class:`HeadView` of an unwrapped causal LM (a ``PreTrainedModel`` or a ``PeftModel`` around one).

    Raises ``ValueError`` naming the model class and the field or option for what cannot be described exactly.
    """
    causal_lm = _causal_lm(model)
    name = type(causal_lm).__name__
    module = causal_lm.get_output_embeddings() if hasattr(causal_lm, "get_output_embeddings") else None
    if module is None:
        raise ValueError(f"{name} has no output embeddings (lm_head): ε-DPO's head needs a causal LM head.")
    if module is causal_lm.get_input_embeddings():
        raise ValueError(
            f"{name}'s output embeddings are its input embedding module: ε-DPO cannot capture the head input."
        )
    transform = logit_transform(causal_lm.config, name)
    read = _head_reader(module, name)
    return HeadView(causal_lm=causal_lm, module=module, transform=transform, slot=_slot(causal_lm, module), _read=read)


class ForwardToHead(NamedTuple):
    """What one run of the model's own forward gave, up to its output layer."""

    hidden: torch.Tensor  # [B, T, d]: the input the forward gave its output layer, as it gave it
    outputs: Any  # the forward's own output (``aux_loss`` of an MoE model, …); its ``logits`` are ``[B, T, 0]``


def forward_to_head(view: HeadView, forward: Callable[[], Any], shape: tuple[int, int]) -> ForwardToHead:
    """Run ``forward()`` — the model's own forward on a ``[B, T]`` batch (``shape``) — with the output layer swapped
    for a capture that records its input and returns empty ``[B, T, 0]`` logits, so that whatever the forward does
    before the head (PEFT forward hooks, a decoder reached as ``model.decoder``, a pre-head rescale) is in ``h`` and no
    ``[B, T, V]`` tensor is built. The real output layer is not called (ZeRO-3 / FSDP do not gather it here).

    Raises ``ValueError`` naming the class when the forward does not call its output layer exactly once on every
    position."""
    parent, attribute = view.slot
    capture = _HeadInputCapture(view.module)
    setattr(parent, attribute, capture)
    try:
        outputs = forward()
    finally:
        setattr(parent, attribute, view.module)
    name = type(view.causal_lm).__name__
    seen = [tuple(h.shape) for h in capture.inputs]
    if len(seen) != 1 or len(seen[0]) != 3 or seen[0][:2] != tuple(shape):
        raise ValueError(
            f"{name}'s forward called its output layer ({attribute}) on inputs of shapes {seen} for a batch of shape "
            f"{tuple(shape)}; ε-DPO's fused head needs exactly one call on every position. This architecture is not "
            "supported by rl: edpo."
        )
    return ForwardToHead(capture.inputs[0], outputs)


class _HeadInputCapture(torch.nn.Module):
    """Stands in for the output layer during :func:`forward_to_head`. Its ``weight`` is the real layer's (Mamba's
    forward casts the hidden states to ``lm_head.weight.dtype`` before calling it), not registered as its own."""

    def __init__(self, real: torch.nn.Module) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []
        object.__setattr__(self, "_real", real)  # not a submodule: the capture holds no parameters

    @property
    def weight(self) -> torch.Tensor:
        return _plain_weight(self._real)

    def forward(self, hidden: torch.Tensor, *_args: Any, **_kwargs: Any) -> torch.Tensor:
        self.inputs.append(hidden)
        return hidden.new_zeros((*hidden.shape[:-1], 0))


def _slot(causal_lm: torch.nn.Module, module: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """``(parent, attribute)`` holding ``module`` inside ``causal_lm``."""
    for path, candidate in causal_lm.named_modules(remove_duplicate=False):
        if candidate is module and path:
            parent_path, _, attribute = path.rpartition(".")
            return causal_lm.get_submodule(parent_path), attribute
    raise ValueError(
        f"{type(causal_lm).__name__}'s output embeddings are not a submodule of the model: ε-DPO cannot capture the "
        "head input."
    )


def logit_transform(config: Any, model_class: str = "the model") -> LogitTransform:
    """The post-head transform of a model with this ``config``.

    Looked up by the top-level ``model_type``: a multimodal wrapper is described only where its own forward is known
    (Gemma-3/3n/4 and Granite-4-Vision apply their text model's transform; Aya-Vision and Cohere2-Vision do not, though
    their text configs set ``logit_scale``); a wrapper of a listed text model that is not described is refused.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = _model_type(config)
    text_type = getattr(text, "model_type", "") or ""
    known = {**_SOFTCAP_FIELD, **_MULTIPLY_FIELD, **_DIVIDE_FIELD}
    if model_type in _PLAIN_WRAPPERS:
        return LogitTransform()
    if model_type not in known:
        if text_type in known:
            raise ValueError(
                f"{model_class} (model_type {model_type!r}) wraps a {text_type!r} text model whose logits are "
                "transformed, and ε-DPO does not know whether this wrapper's forward applies that transform: it "
                "refuses rather than guess. Fine-tune the text model's *ForCausalLM, or open an issue."
            )
        for cfg in {id(config): config, id(text): text}.values():
            for field in _TRANSFORM_FIELDS:
                value = getattr(cfg, field, None)
                if value not in _NEUTRAL:
                    raise ValueError(
                        f"{model_class} (model_type {model_type!r}) sets {field}={value!r}, so its logits are probably "
                        f"not lm_head(h); ε-DPO's fused head does not know how this architecture uses {field} and "
                        "refuses rather than train a different objective. Use a supported architecture or open an "
                        "issue."
                    )
        return LogitTransform()
    if model_type in _SOFTCAP_FIELD:
        cap = getattr(text, _SOFTCAP_FIELD[model_type], None)
        transform = LogitTransform(softcap=None if cap is None else float(cap))
    else:
        field = _MULTIPLY_FIELD.get(model_type) or _DIVIDE_FIELD[model_type]
        value = getattr(text, field, None)
        if value is None:
            return LogitTransform()
        if float(value) == 0.0:
            raise ValueError(f"{model_class} sets {field}=0, which leaves no logits: fix the model config.")
        transform = LogitTransform(scale=float(value) if model_type in _MULTIPLY_FIELD else 1.0 / float(value))
    transform.check()
    return transform


def is_peft_head_wrapper(view: HeadView) -> bool:
    """Whether the output embeddings are a PEFT ``modules_to_save`` / trainable-tokens wrapper."""
    from peft.utils.other import AuxiliaryTrainingWrapper

    return isinstance(view.module, AuxiliaryTrainingWrapper)


def _model_type(config: Any) -> str:
    """The top-level ``model_type`` (a multimodal wrapper's own, not its text model's)."""
    return getattr(config, "model_type", "") or ""


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM inside ``model``; refuses PEFT adapters whose effect the head cannot see."""
    if not is_peft_model(model):
        return model
    config = model.active_peft_config
    if config.is_prompt_learning:
        raise ValueError(
            f"PEFT {config.peft_type} (prompt learning) adds virtual tokens outside the model's hidden states, which "
            "ε-DPO's fused head reads directly: use LoRA / QLoRA (or full fine-tuning) instead."
        )
    return model.base_model.model


def _head_reader(module: torch.nn.Module, model_class: str) -> WeightReader:
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper, TrainableTokensWrapper

    if isinstance(module, BaseTunerLayer) and type(module).__name__ == "TrainableTokensLayer":
        raise ValueError(
            f"A standalone PEFT TrainableTokensConfig adapter on {model_class}'s output embeddings is not supported by "
            "ε-DPO's fused head. Use LoraConfig(trainable_token_indices=...) instead (supported), or train the head "
            "with modules_to_save."
        )
    if isinstance(module, BaseTunerLayer):
        raise ValueError(
            f"A PEFT adapter ({type(module).__name__}) on {model_class}'s lm_head is not supported by ε-DPO's fused "
            "head. Remove 'lm_head' from lora_target_modules / target_modules; to train the head, list it in "
            "modules_to_save (lora_modules_to_save in Axolotl) instead."
        )
    if isinstance(module, ModulesToSaveWrapper):
        original = _plain_linear(module.original_module, model_class)

        def read_saved(adapters: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
            if not adapters or module.disable_adapters or not module.active_adapters:
                return original.weight, original.bias
            trained = _plain_linear(module.modules_to_save[module.active_adapters[0]], model_class)
            return trained.weight, trained.bias

        return read_saved
    if isinstance(module, TrainableTokensWrapper):
        layer = module.token_adapter
        base = _plain_linear(layer.base_layer, model_class)
        if base.bias is not None:
            raise ValueError(
                f"PEFT trainable tokens on {model_class}'s biased lm_head: PEFT's own forward drops the bias there, so "
                "there is no single objective to reproduce. Train the head with modules_to_save instead."
            )

        def read_tokens(adapters: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
            if layer.merged:  # the trained rows live in base.weight; the reference needs the original rows back
                if adapters and not layer.disable_adapters:
                    return base.weight, None
                weight = base.weight
                for name in layer.merged_adapters:
                    index = torch.tensor(layer.token_indices[name], device=weight.device)
                    weight = weight.index_copy(0, index, layer.trainable_tokens_original[name].to(weight))
                return weight, None
            if not adapters or layer.disable_adapters or not layer.active_adapters:
                return base.weight, None
            return layer.get_merged_weights(layer.active_adapters), None

        return read_tokens
    linear = _plain_linear(module, model_class)
    return lambda adapters: (linear.weight, linear.bias)


def _plain_linear(module: torch.nn.Module, model_class: str) -> torch.nn.Module:
    """``module`` itself (or the module an FSDP1 wrapper holds) if it is a plain, unquantized linear head."""
    inner = getattr(module, "_fsdp_wrapped_module", module)
    weight = getattr(inner, "weight", None)
    quantized = weight is not None and (
        not (weight.is_floating_point() or _is_meta_sharded(weight)) or type(weight).__name__ in ("Params4bit",)
    )
    if weight is None or quantized or type(inner).__name__ in ("Linear4bit", "Linear8bitLt"):
        raise ValueError(
            f"{model_class}'s lm_head is a {type(inner).__name__}"
            + (f" with a {weight.dtype} weight" if weight is not None else " without a weight")
            + ": ε-DPO's fused head needs a floating-point linear head. Keep lm_head unquantized (bitsandbytes "
            "skips it by default; do not add it to the quantized modules)."
        )
    return module


def _plain_weight(module: torch.nn.Module) -> torch.Tensor:
    """The weight a head module's forward multiplies by (through a PEFT or FSDP1 wrapper)."""
    inner = getattr(module, "_fsdp_wrapped_module", module)
    for attribute in ("original_module", "base_layer"):  # modules_to_save, trainable tokens
        inner = getattr(inner, attribute, inner)
    return inner.weight


def _is_meta_sharded(weight: torch.Tensor) -> bool:
    """A ZeRO-3-partitioned parameter is an empty float tensor until gathered; its dtype still tells."""
    return hasattr(weight, "ds_numel")
