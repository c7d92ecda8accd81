"""ε-DPO's packed attention against each sequence's own unpadded forward: SDPA, eager and FlashAttention-2 (its varlen
kernel replaced on CPU by a reference written from FlashAttention's documented semantics), whole sequences and shared
prompts, sliding windows, and no host sync inside a packed forward."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

import edpo_plugin.trainer.packed_attention as packed_attention
from edpo_plugin.trainer.packed_attention import PACKED_FOR, use_packed_attention
from edpo_plugin.trainer.packing import pack_rows
from tests.numerics import PACKED_TOL
from tests.varlen_reference import reference_varlen

VOCAB = 64


def _llama(attn: str = "sdpa"):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.2)  # fmt: skip
    config._attn_implementation = attn
    return LlamaForCausalLM(config).float().eval()


def _mistral(attn: str = "sdpa", sliding_window: int | None = 5):
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           initializer_range=0.2, sliding_window=sliding_window)  # fmt: skip
    config._attn_implementation = attn
    return MistralForCausalLM(config).float().eval()


def _gemma2(attn: str = "sdpa"):
    """Alternating sliding / full layers and an attention soft cap (eager and FlashAttention apply it)."""
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                          initializer_range=0.2, sliding_window=4, attn_logit_softcapping=5.0,
                          query_pre_attn_scalar=8)  # fmt: skip
    config._attn_implementation = attn
    return Gemma2ForCausalLM(config).float().eval()


MODELS = {"llama": _llama, "mistral-window": _mistral, "gemma2": _gemma2}


def _pairs():
    """Two pairs sharing their prompts (one rejected row continuing its chosen row whole), padded ``[4, T]``."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g) for n in (6, 3)]
    tails = [torch.randint(1, VOCAB, (n,), generator=g) for n in (5, 2, 4, 3)]
    rows = [torch.cat((prompts[0], tails[0])), torch.cat((prompts[1], tails[1])),
            torch.cat((prompts[0], tails[2])), torch.cat((prompts[1], tails[1], tails[3]))]  # fmt: skip
    ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True)
    return rows, ids, mask


def _own_logprobs(model, rows) -> torch.Tensor:
    """float64 log-prob of every next token, each row through the model's own forward alone."""
    with torch.no_grad():
        return torch.cat([model(input_ids=r[None]).logits[0, :-1].double().log_softmax(-1)
                          .gather(-1, r[1:, None]).squeeze(-1) for r in rows])  # fmt: skip


def _packed_logprobs(model, packed) -> torch.Tensor:
    with torch.no_grad():
        logits = model(**packed.model_kwargs(), use_cache=False).logits[0, packed.label_index].double()
    return logits.log_softmax(-1).gather(-1, packed.labels[0, :, None]).squeeze(-1)


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", sorted(MODELS))
def test_packed_attention_is_each_sequences_own_forward(family, attn, share):
    """Every token's log-prob from the packed row equals the model's own forward on its row alone (sdpa or eager as
    the model ran it), whole sequences or a shared prompt run once, windows applying inside each sequence."""
    rows, ids, mask = _pairs()
    try:
        model = MODELS[family](attn)
    except ValueError as err:  # Gemma-2 has no sdpa in transformers 5.24 (its attention soft cap)
        pytest.skip(str(err).split(". ")[0])
    want = _own_logprobs(model, rows)
    assert use_packed_attention(model) == PACKED_FOR[attn]
    packed = pack_rows(ids, mask, share_prefixes=share)
    assert (packed.input_ids.shape[1] < int(mask.sum())) == share
    got = _packed_logprobs(model, packed)
    assert packed.layout.attention_calls == model.config.num_hidden_layers
    assert (got - want).abs().max().item() <= PACKED_TOL
    # the unpacked forward of a switched model (one row, no layout) is still the model's own
    assert (_own_logprobs(model, rows) - want).abs().max().item() <= PACKED_TOL


def test_packed_sdpa_runs_each_sequence_on_its_own_keys(monkeypatch):
    """(queries, keys) of every SDPA call: each chosen row whole, each rejected completion against its prompt and
    itself (pair 1's rejected row goes on from its whole chosen row); Σ L_q·L_k scores, not N²."""
    rows, ids, mask = _pairs()
    model = _llama()
    use_packed_attention(model)
    shapes = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, *args, **kwargs):
        shapes.append((query.shape[-2], key.shape[-2]))
        return real_sdpa(query, key, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    _packed_logprobs(model, pack_rows(ids, mask, share_prefixes=True))
    assert shapes == [(11, 11), (4, 10), (5, 5), (3, 8)] * 2


@pytest.fixture
def reference_flash(monkeypatch):
    """FlashAttention-2 models on CPU: flash_attention_2 switched to ε-DPO's packed form, the varlen kernel replaced
    by :func:`reference_varlen`."""
    monkeypatch.setattr(packed_attention, "varlen_kernel", lambda: reference_varlen)

    def build(family: str):
        model = MODELS[family]("eager" if family == "gemma2" else "sdpa")
        model.config._attn_implementation = "flash_attention_2"  # no flash_attn on CPU: set, not loaded
        return model

    return build


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("family", sorted(MODELS))
def test_packed_flash_is_each_sequences_own_forward(reference_flash, family, share):
    """One varlen call per layer, keys gathered per sequence ([prefix; own]), separate query and key cu_seqlens:
    every token's log-prob is the model's own forward (SDPA) on its row alone; Gemma-2's attention soft cap goes to
    the kernel (its own eager forward is the yardstick there, SDPA has no soft cap)."""
    rows, ids, mask = _pairs()
    yardstick = MODELS[family]("eager" if family == "gemma2" else "sdpa")
    want = _own_logprobs(yardstick, rows)
    model = reference_flash(family)
    assert use_packed_attention(model) == PACKED_FOR["flash_attention_2"]
    packed = pack_rows(ids, mask, share_prefixes=share)
    layout = packed.layout
    if share:
        assert layout.cu_seqlens_q.tolist() == [0, 11, 15, 20, 23]
        assert layout.cu_seqlens_k.tolist() == [0, 11, 21, 26, 34]
        assert (layout.max_length_q, layout.max_length_k) == (11, 11)
    else:
        assert layout.kv_index is None and torch.equal(layout.cu_seqlens_q, layout.cu_seqlens_k)
    got = _packed_logprobs(model, packed)
    assert (got - want).abs().max().item() <= PACKED_TOL
    assert (_own_logprobs(model, rows) - want).abs().max().item() <= PACKED_TOL


def test_flash_kernel_gets_the_window_and_the_cap(reference_flash, monkeypatch):
    """What reaches the varlen kernel: window (W−1, 0) on Gemma-2's sliding layers and none on its full ones, its
    attention soft cap, the model's scaling."""
    seen = []

    def spy(*args, **kwargs):
        seen.append((kwargs["window"], kwargs["softcap"], kwargs["scale"]))
        return reference_varlen(*args, **kwargs)

    model = reference_flash("gemma2")
    use_packed_attention(model)
    monkeypatch.setattr(packed_attention, "varlen_kernel", lambda: spy)
    rows, ids, mask = _pairs()
    _packed_logprobs(model, pack_rows(ids, mask, share_prefixes=True))
    assert seen == [((3, 0), 5.0, 8**-0.5), ((-1, -1), 5.0, 8**-0.5)]


class _SyncCounter(TorchDispatchMode):
    """Counts the ops that read a tensor's values back to the host (``.item()``, ``bool()``, ``.tolist()`` go through
    ``_local_scalar_dense``) or whose output shape depends on values (``nonzero``)."""

    SYNCS = {"_local_scalar_dense", "nonzero", "equal", "is_nonzero", "masked_select", "unique", "_unique2"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._overloadpacket.__name__ in self.SYNCS:
            self.seen.append(func._overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("attn", ["sdpa", "eager", "flash_attention_2"])
def test_no_host_sync_inside_a_packed_forward(reference_flash, monkeypatch, attn):
    """The layout is worked out once per micro-batch on the host; the forward itself reads nothing back (counted by a
    dispatch mode over the whole forward, and ``Tensor.tolist`` spied)."""
    monkeypatch.setattr(packed_attention, "varlen_kernel", lambda: _no_sync_varlen)
    model = reference_flash("mistral-window") if attn == "flash_attention_2" else _mistral(attn)
    use_packed_attention(model)
    rows, ids, mask = _pairs()
    packed = pack_rows(ids, mask, share_prefixes=True)
    tolist_calls = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: tolist_calls.append(t.shape) or real_tolist(t))
    with torch.no_grad(), _SyncCounter() as counter:
        model(**packed.model_kwargs(), use_cache=False)
    assert counter.seen == [] and tolist_calls == []


def _no_sync_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs):
    """A stand-in kernel that reads no offsets (the real one reads them on the device)."""
    return torch.zeros_like(q)


@pytest.mark.parametrize("layers", ["every", "one"])
def test_a_model_that_drops_the_layout_is_refused(monkeypatch, layers):
    """A forward that does not pass its keyword arguments on to attention never shows the layout to it, in every
    layer or in one: the packed sequences would attend to each other there, so the forward's end raises."""
    from transformers.models.llama import modeling_llama

    real_forward = modeling_llama.LlamaAttention.forward
    model = _llama()
    dropping = model.model.layers[1].self_attn

    def forward_dropping_kwargs(self, hidden_states, position_embeddings, attention_mask, **kwargs):
        if layers == "every" or self is dropping:
            kwargs.pop(packed_attention.LAYOUT_KWARG, None)
        return real_forward(self, hidden_states, position_embeddings, attention_mask, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", forward_dropping_kwargs)
    use_packed_attention(model)
    rows, ids, mask = _pairs()
    packed = pack_rows(ids, mask)
    with torch.no_grad():
        model(**packed.model_kwargs(), use_cache=False)
    match = "read the packed layout 0 times" if layers == "every" else r"1 times, not in \['model.layers.1.self_attn'\]"
    with pytest.raises(ValueError, match=match):
        packed.layout.check_reached(model)


def test_an_unpacked_padded_batch_is_refused():
    model = _llama()
    use_packed_attention(model)
    ids = torch.randint(1, VOCAB, (2, 5))
    with pytest.raises(ValueError, match="called on a batch of 2 rows without a packed layout"):
        model(input_ids=ids, attention_mask=torch.ones_like(ids))


# PyTorch's varlen_attn as each release documents it (docs.pytorch.org, torch.nn.attention.varlen): the first with
# an ``is_causal`` flag and no scale (``D^-1/2``) or GQA; then keyword-only ``scale`` and ``window_size`` ((-1, 0)
# causal, (W, 0) sliding causal); then ``enable_gqa``. Each fake checks what its release cannot take and runs the
# reference; only causal calls are expected, so a non-causal request fails.
def _varlen_is_causal(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):
    assert is_causal and k.shape[1] == q.shape[1]
    return reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, window=(-1, 0), softcap=None, dropout=0.0)


def _varlen_window(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
    assert window_size[1] == 0 and k.shape[1] == q.shape[1]
    return reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window=window_size, softcap=None,
                            dropout=0.0)  # fmt: skip


def _varlen_gqa(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1),
                enable_gqa=False):  # fmt: skip
    assert window_size[1] == 0 and (enable_gqa or k.shape[1] == q.shape[1])
    return reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window=window_size, softcap=None,
                            dropout=0.0)  # fmt: skip


@pytest.mark.parametrize("release", [_varlen_is_causal, _varlen_window, _varlen_gqa])
@pytest.mark.parametrize("window", [(-1, -1), (2, 0)])
def test_torch_varlen_adapter_keeps_flash_attn_semantics(release, window):
    """The adapter behind each released ``varlen_attn`` signature gives FlashAttention's result (GQA, a non-default
    scale, a shared prefix, a window) — or refuses the window a release cannot take."""
    torch.manual_seed(0)
    cu_q, cu_k = torch.tensor([0, 3, 5], dtype=torch.int32), torch.tensor([0, 3, 8], dtype=torch.int32)
    q, k, v = torch.randn(5, 4, 8), torch.randn(8, 2, 8), torch.randn(8, 2, 8)
    kernel = packed_attention._torch_varlen(release)
    args = (q, k, v, cu_q, cu_k, 3, 5)
    if release is _varlen_is_causal and window != (-1, -1):
        with pytest.raises(ValueError, match="no sliding window"):
            kernel(*args, scale=0.3, window=window, softcap=None, dropout=0.0)
        return
    got = kernel(*args, scale=0.3, window=window, softcap=None, dropout=0.0)
    want = reference_varlen(*args, scale=0.3, window=window, softcap=None, dropout=0.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_packed_forward_with_keys_in_front_is_refused():
    """Keys in front of a packed row's own (PEFT prefix tuning's key/value prefix; a cache) would shift every
    sequence's bounds: refused, not attended (prefix tuning through a packed forward was 0.28 nats off each row's own
    forward). The trainer refuses prompt learning before it gets here; this is the attention's own guard."""
    import peft

    base = _llama("sdpa")
    model = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    use_packed_attention(base)
    _, ids, mask = _pairs()
    packed = pack_rows(ids, mask)
    with torch.no_grad(), pytest.raises(ValueError, match=r"got \d+ keys \(a cache or a prefix in front of it\)"):
        model(**packed.model_kwargs(), use_cache=False)
