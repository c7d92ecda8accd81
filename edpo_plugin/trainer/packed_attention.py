"""ε-DPO's packed attention: each sequence of a packed row attends to its own tokens (and to a prefix it shares).

A packed row ``[1, N]`` holds a micro-batch's sequences end to end (:mod:`packing`). Where each sequence's queries
and keys lie is worked out once per micro-batch, on the host, as a :class:`PackedLayout`, and reaches every attention
layer as the keyword argument :data:`LAYOUT_KWARG` of the model's forward (transformers passes a forward's keyword
arguments down to its attention interface). Nothing here reads a bound back from the device.

A sequence whose ``position_ids`` start at ``P > 0`` continues a shared prefix: the first ``P`` tokens of the
sequence laid out before it (a pair's prompt, run once for its chosen and its rejected completion). Its queries see
the prefix's ``P`` keys and its own, causally: the attention it gets unpacked, bottom-right aligned.

Three implementations, registered with transformers' ``AttentionInterface``; the trainer switches a model to the one
for the attention it ran (:data:`PACKED_FOR`):

- :data:`PACKED_SDPA`: transformers' ``sdpa_attention_forward`` once per sequence (``Σ L_q · L_k`` scores, not
  ``N²``), causal without a mask where a sequence has no prefix and no window.
- :data:`PACKED_EAGER`: the model's own ``eager_attention_forward`` once per sequence, with an additive mask
  (keeps what a model's eager attention adds: soft caps, attention sinks).
- :data:`PACKED_FLASH`: one FlashAttention-2 varlen call over the whole row, with separate query and key
  ``cu_seqlens`` and the keys gathered per sequence (``[prefix; own]``); the kernel is ``flash_attn``'s
  ``flash_attn_varlen_func``, else PyTorch's ``torch.nn.attention.varlen.varlen_attn`` (:func:`varlen_kernel`).

Sliding windows apply inside each sequence at its own positions, prefix included (``sliding_window`` as the model
passes it, or the module's own). None of the three is registered with transformers' mask interface, so the model
builds no ``[N, N]`` mask (and runs none of the device syncs of packed-sequence detection). Called without a layout
(an unpacked forward: the first-step check's own rows, a generation step) each runs one causal sequence, which needs a
batch of one row: a padded batch of several rows is refused, since its padding mask never reaches them.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

LAYOUT_KWARG = "edpo_packed_layout"
PACKED_SDPA = "edpo_packed_sdpa"
PACKED_EAGER = "edpo_packed_eager"
PACKED_FLASH = "edpo_packed_varlen"  # no "flash" in the name: transformers would load a FlashAttention kernel for it
# the attention implementation a model ran -> the packed one that replaces it for padding-free training
PACKED_FOR = {"sdpa": PACKED_SDPA, "eager": PACKED_EAGER, "flash_attention_2": PACKED_FLASH}


class Segment(NamedTuple):
    """One packed sequence, in packed positions (host ints)."""

    start: int  # its first own token
    length: int  # its own tokens (the queries)
    prefix_start: int  # the shared prefix it continues (0 when none)
    prefix_length: int  # tokens of that prefix (= its first position id)


@dataclass
class PackedLayout:
    """Where each packed sequence's queries and keys lie in a row ``[1, N]``, for every attention layer.

    ``segments`` are host ints (the SDPA and eager forms slice by them); the FlashAttention form reads the device
    tensors. The attention modules that read this layout are recorded (:meth:`read_by`), so a forward whose model did
    not pass it on to its attention, in any layer, is caught (:meth:`check_reached`).
    """

    segments: tuple[Segment, ...]
    cu_seqlens_q: torch.Tensor  # int32 [S + 1]: query offsets (the packed row)
    cu_seqlens_k: torch.Tensor  # int32 [S + 1]: key offsets in the gathered keys
    max_length_q: int
    max_length_k: int
    kv_index: torch.Tensor | None  # int64 [Σ (P + L)]: packed position of each gathered key; None: keys = queries
    attention_calls: int = field(default=0, compare=False)
    readers: set[int] = field(default_factory=set, compare=False)  # id() of the attention modules that read it

    @classmethod
    def from_segments(cls, segments: tuple[Segment, ...], device: torch.device) -> PackedLayout:
        """Build the layout of ``segments`` (host arithmetic only; one copy of each index to ``device``)."""
        lengths_q = [s.length for s in segments]
        lengths_k = [s.prefix_length + s.length for s in segments]
        shared = any(s.prefix_length for s in segments)
        kv_index = None
        if shared:
            positions = []
            for s in segments:
                positions += [
                    *range(s.prefix_start, s.prefix_start + s.prefix_length),
                    *range(s.start, s.start + s.length),
                ]
            kv_index = torch.tensor(positions, dtype=torch.long).to(device, non_blocking=True)

        def offsets(lengths: list[int]) -> torch.Tensor:
            return torch.tensor([0, *_cumsum(lengths)], dtype=torch.int32).to(device, non_blocking=True)

        return cls(
            segments=segments,
            cu_seqlens_q=offsets(lengths_q),
            cu_seqlens_k=offsets(lengths_k),
            max_length_q=max(lengths_q, default=0),
            max_length_k=max(lengths_k, default=0),
            kv_index=kv_index,
        )

    def read_by(self, module: torch.nn.Module) -> None:
        """Record that ``module`` (an attention layer) attended over this layout."""
        self.attention_calls += 1
        self.readers.add(id(module))

    def check_reached(self, model: torch.nn.Module, name: str | None = None) -> None:
        """After a forward of ``model``: raise unless an attention layer read this layout and every other module of
        the classes that did read it too (a layer that dropped the forward's keyword arguments would attend across
        the packed sequences); then reset the record."""
        calls, readers = self.attention_calls, self.readers
        self.attention_calls, self.readers = 0, set()
        kinds = {type(m) for m in model.modules() if id(m) in readers}
        missed = [n for n, m in model.named_modules() if type(m) in kinds and id(m) not in readers]
        if calls == 0 or missed:
            raise ValueError(
                f"padding_free=True: {name or type(model).__name__}'s attention layers read the packed layout "
                f"{calls} times{f', not in {missed[:4]}' if missed else ''}: its forward does not pass keyword "
                "arguments on to its attention, so the packed sequences would attend to each other. Set "
                "padding_free=False."
            )


def _cumsum(values: list[int]) -> list[int]:
    total, out = 0, []
    for v in values:
        total += v
        out.append(total)
    return out


# ------------------------------------------------------------------------------------------------------ SDPA, eager


def _allowed(n_query: int, n_prefix: int, window: int | None, device: torch.device) -> torch.Tensor:
    """bool ``[L_q, P + L_q]``: query ``i`` (position ``P + i``) sees keys ``j ≤ P + i`` within the window."""
    q = torch.arange(n_prefix, n_prefix + n_query, device=device)[:, None]
    k = torch.arange(n_prefix + n_query, device=device)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= k > q - window
    return allowed


def _per_sequence(run: Callable, module, query, key, value, layout: PackedLayout, window, **kwargs) -> torch.Tensor:
    """``[1, N, H, D]``: ``run(module, q, k, v, mask_or_None, **kwargs)`` once per packed sequence."""
    _no_cache(query, key)
    outputs = []
    for s in layout.segments:
        q = query[:, :, s.start : s.start + s.length]
        own = slice(s.start, s.start + s.length)
        if s.prefix_length:
            prefix = slice(s.prefix_start, s.prefix_start + s.prefix_length)
            k, v = (torch.cat((t[:, :, prefix], t[:, :, own]), dim=2) for t in (key, value))
        else:
            k, v = key[:, :, own], value[:, :, own]
        outputs.append(run(module, q, k, v, s.prefix_length, window, **kwargs))
    return torch.cat(outputs, dim=1)


def _sdpa_sequence(module, q, k, v, n_prefix: int, window: int | None, **kwargs) -> torch.Tensor:
    n_query = q.shape[2]
    plain = n_prefix == 0 and (window is None or window >= n_query)
    mask = None if plain else _allowed(n_query, n_prefix, window, q.device)[None, None]
    return sdpa_attention_forward(module, q, k, v, mask, **kwargs)[0]


def _eager_sequence(module, q, k, v, n_prefix: int, window: int | None, **kwargs) -> torch.Tensor:
    allowed = _allowed(q.shape[2], n_prefix, window, q.device)
    mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, torch.finfo(q.dtype).min)
    return _model_eager(module)(module, q, k, v, mask[None, None], **kwargs)[0]


def _model_eager(module: torch.nn.Module) -> Callable:
    """The eager attention of the model ``module`` belongs to (its modeling file's ``eager_attention_forward``)."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise ValueError(
            f"{PACKED_EAGER}: {type(module).__name__}'s modeling file has no eager_attention_forward to run per packed "
            "sequence. Use attn_implementation='sdpa' or padding_free=False."
        )
    return eager


def _window(module: torch.nn.Module, kwargs: dict) -> int | None:
    """The sliding window of this layer: as the model passes it to its attention, else the module's own."""
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    return int(window) if window else None


def _no_cache(query: torch.Tensor, key: torch.Tensor) -> None:
    """A packed row's keys are its own tokens: keys in front of them (a cache, PEFT prefix tuning) would shift every
    sequence's bounds."""
    if key.shape[2] != query.shape[2]:
        raise ValueError(
            f"A packed row of {query.shape[2]} tokens got {key.shape[2]} keys (a cache or a prefix in front of it); "
            "padding_free=True runs packed rows without one. Set padding_free=False."
        )


def _unpacked_row(query: torch.Tensor, key: torch.Tensor) -> int:
    """An unpacked call: one causal sequence whose queries are the last of its keys (a cache before them); returns
    that cache's length. Several rows are refused: their padding mask never reaches a packed attention."""
    if query.shape[0] != 1:
        raise ValueError(
            f"A model switched to ε-DPO's packed attention for padding-free training was called on a batch of "
            f"{query.shape[0]} rows without a packed layout; it runs one unpadded row at a time. Call it per row, or "
            "use the model outside the padding-free trainer."
        )
    return key.shape[2] - query.shape[2]


def packed_sdpa_forward(module, query, key, value, attention_mask, **kwargs) -> tuple[torch.Tensor, None]:
    """``query [1, H, N, D]``, ``key`` / ``value [1, H_kv, N, D]`` → ``[1, N, H, D]`` (as ``sdpa_attention_forward``),
    one SDPA call per sequence of ``kwargs[LAYOUT_KWARG]``."""
    layout = kwargs.pop(LAYOUT_KWARG, None)
    window = _window(module, kwargs)
    if layout is None:
        if attention_mask is not None:  # a mask built by the caller, not by transformers' mask interface
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        n_cache = _unpacked_row(query, key)
        return _sdpa_sequence(module, query, key, value, n_cache, window, **kwargs), None
    layout.read_by(module)
    return _per_sequence(_sdpa_sequence, module, query, key, value, layout, window, **kwargs), None


def packed_eager_forward(module, query, key, value, attention_mask, **kwargs) -> tuple[torch.Tensor, None]:
    """As :func:`packed_sdpa_forward`, with the model's own eager attention per sequence (attention weights are not
    returned)."""
    layout = kwargs.pop(LAYOUT_KWARG, None)
    window = _window(module, kwargs)
    if layout is None:
        if attention_mask is not None:
            return _model_eager(module)(module, query, key, value, attention_mask, **kwargs)
        n_cache = _unpacked_row(query, key)
        return _eager_sequence(module, query, key, value, n_cache, window, **kwargs), None
    layout.read_by(module)
    return _per_sequence(_eager_sequence, module, query, key, value, layout, window, **kwargs), None


# ------------------------------------------------------------------------------------------------ FlashAttention-2

# fn(q [Tq, H, D], k [Tk, H_kv, D], v, cu_q, cu_k, max_q, max_k, *, scale, window, softcap, dropout) -> [Tq, H, D]
VarlenKernel = Callable[..., torch.Tensor]


def varlen_kernel() -> VarlenKernel:
    """FlashAttention-2's varlen call with causal masks aligned bottom-right (FlashAttention ≥ 2.1): ``flash_attn``'s
    ``flash_attn_varlen_func`` when installed, else PyTorch's ``varlen_attn`` (CUDA, PyTorch ≥ 2.10)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        flash_attn_varlen_func = None
    if flash_attn_varlen_func is not None:

        def flash_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale, window, softcap, dropout):
            return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=dropout, softmax_scale=scale,
                                          causal=True, window_size=window, softcap=softcap or 0.0)  # fmt: skip

        return flash_attn
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as err:
        raise ValueError(
            f"{PACKED_FLASH} needs flash_attn (flash_attn_varlen_func) or PyTorch >= 2.10 "
            "(torch.nn.attention.varlen.varlen_attn); neither is installed."
        ) from err
    return _torch_varlen(varlen_attn)


def _torch_varlen(varlen_attn: Callable) -> VarlenKernel:
    """PyTorch's ``varlen_attn`` behind flash_attn's arguments. Its signature changed between releases, so each
    switch is read from it: causal masks by an ``is_causal`` flag (the first release) or ``window_size=(left, 0)``;
    a ``scale`` keyword (else the queries are pre-scaled, the kernel applying ``D^-1/2``); grouped-query attention
    by ``enable_gqa`` (else the key/value heads are repeated). A window it cannot take is refused."""
    params = inspect.signature(varlen_attn).parameters

    def torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale, window, softcap, dropout):
        if softcap or dropout:
            raise ValueError(
                f"{PACKED_FLASH}: PyTorch's varlen_attn has no soft cap or dropout (softcap={softcap}, "
                f"dropout={dropout}); install flash_attn or use attn_implementation='sdpa'."
            )
        kwargs = {}
        if "scale" in params:
            kwargs["scale"] = scale
        elif scale is not None:
            q = q * (scale * q.shape[-1] ** 0.5)
        if k.shape[1] != q.shape[1]:
            if "enable_gqa" in params:
                kwargs["enable_gqa"] = True
            else:
                k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
        if "window_size" in params:
            kwargs["window_size"] = (window[0], 0)
        elif window[0] >= 0:
            raise ValueError(
                f"{PACKED_FLASH}: this PyTorch's varlen_attn takes no sliding window (window={window}); install "
                "flash_attn, upgrade PyTorch, or use attn_implementation='sdpa'."
            )
        if "is_causal" in params:
            kwargs["is_causal"] = True
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)

    return torch_varlen


def packed_flash_forward(module, query, key, value, attention_mask, **kwargs) -> tuple[torch.Tensor, None]:
    """``query [1, H, N, D]``, ``key`` / ``value [1, H_kv, N, D]`` → ``[1, N, H, D]``: one varlen call over the
    packed row, keys gathered per sequence by ``kv_index``, separate query and key ``cu_seqlens``."""
    layout = kwargs.pop(LAYOUT_KWARG, None)
    if attention_mask is not None:
        raise ValueError(f"{PACKED_FLASH} takes no attention mask (got one of shape {tuple(attention_mask.shape)}).")
    if kwargs.get("s_aux") is not None:
        raise ValueError(f"{PACKED_FLASH}: FlashAttention-2 has no attention sinks; use attn_implementation='eager'.")
    window = _window(module, kwargs)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, H, D]
    if layout is None:
        n_cache = _unpacked_row(query, key)
        n_q = q.shape[0]
        cu_q = torch.tensor([0, n_q], dtype=torch.int32).to(q.device, non_blocking=True)
        cu_k = torch.tensor([0, n_cache + n_q], dtype=torch.int32).to(q.device, non_blocking=True)
        bounds = (cu_q, cu_k, n_q, n_cache + n_q)
    else:
        layout.read_by(module)
        _no_cache(query, key)
        if layout.kv_index is not None:
            k, v = k.index_select(0, layout.kv_index), v.index_select(0, layout.kv_index)
        bounds = (layout.cu_seqlens_q, layout.cu_seqlens_k, layout.max_length_q, layout.max_length_k)
    dtype = _flash_dtype(query, module)
    out = varlen_kernel()(
        *(t.to(dtype).contiguous() for t in (q, k, v)),
        *bounds,
        scale=kwargs.get("scaling"),
        window=(-1, -1) if window is None else (window - 1, 0),
        softcap=kwargs.get("softcap"),
        dropout=kwargs.get("dropout", 0.0) if module.training else 0.0,
    )
    return out.unsqueeze(0), None


def _flash_dtype(query: torch.Tensor, module: torch.nn.Module) -> torch.dtype:
    """FlashAttention runs fp16 / bf16: an fp32 query (PEFT's fp32 norms) goes back to the model's half dtype, as
    transformers' own FlashAttention path does."""
    if query.dtype != torch.float32:
        return query.dtype
    from transformers.integrations.flash_attention import get_target_dtype

    return get_target_dtype(query, module) or query.dtype


AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
AttentionInterface.register(PACKED_EAGER, packed_eager_forward)
AttentionInterface.register(PACKED_FLASH, packed_flash_forward)


def use_packed_attention(causal_lm: torch.nn.Module) -> str | None:
    """Switch a model running sdpa, eager or flash_attention_2 to its packed form (:data:`PACKED_FOR`); returns the
    name it now runs, or None when it runs something else or transformers cannot switch it."""
    config = getattr(causal_lm, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current in PACKED_FOR.values():
        return current
    packed = PACKED_FOR.get(current)
    if packed is None:
        return None
    causal_lm.set_attn_implementation(packed)
    return packed if config._attn_implementation == packed else None


def can_share_prefixes(causal_lm: torch.nn.Module) -> bool:
    """Whether ``causal_lm`` runs a packed attention in every layer, so that a packed sequence can attend to a prefix
    it shares with the one before it (sliding windows included: they apply at each sequence's own positions)."""
    config = getattr(causal_lm, "config", None)
    return getattr(config, "_attn_implementation", None) in PACKED_FOR.values()
