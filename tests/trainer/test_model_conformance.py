"""The fused head against each architecture's own forward: ``describe_head`` + ``linear_logprobs`` must give the
log-probs (and every parameter's gradient) that ``log_softmax(model(...).logits)`` gives, for tiny random fp32
models of every decoder-only causal LM Axolotl users commonly fine-tune, with their logit transforms made to bite.

The yardstick is always the model's (or the PeftModel's) own forward in transformers / peft, never this package.
The architectures are tests/trainer/architectures.py's table.
"""

from __future__ import annotations

import copy
import importlib
import warnings

import pytest
import torch

from edpo_plugin.ops import linear_logprobs, triton_available
from edpo_plugin.trainer.model_head import describe_head
from tests.numerics import MODEL_GRAD_NOISE, MODEL_GRAD_TOL, MODEL_LOGPROB_ATOL, MODEL_STREAM_TOL, rel
from tests.trainer.architectures import (
    ARCH_BY_ID,
    ARCHS,
    NOT_BUILT_HERE,
    Arch,
    arch_params,
    build_model,
    gather_logprobs,
    head_input,
    head_streams,
    model_logprobs,
    tiny_batch,
)

peft = pytest.importorskip("peft")

IMPLS = ["naive", "chunked"] + (["triton"] if triton_available() else [])


def _upstream(labels: torch.Tensor) -> torch.Tensor:
    return torch.randn(labels.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)


def _grads(loss: torch.Tensor, named: list[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, [p for _, p in named], allow_unused=True, materialize_grads=True))


def _assert_grads_match(named, got, want, what: str) -> None:
    assert named, f"{what}: no trainable parameters"
    bad = []
    # Below MODEL_GRAD_NOISE of the largest gradient, a gradient is fp32 cancellation noise in both (a gradient that is
    # 0 in exact arithmetic, such as a key-projection bias's): compared absolutely against that floor.
    noise = MODEL_GRAD_NOISE * max(float(w.double().norm()) for w in want)
    for (name, _), g, w in zip(named, got, want):
        if w.norm() == 0:
            if g.norm() != 0:
                bad.append(f"{name}: model gives 0, head gives |g|={g.norm():.3e}")
        elif w.double().norm() < noise:
            if (g.double() - w.double()).norm() > noise:
                bad.append(f"{name}: model gives noise (|g| < {noise:.1e}), head gives |g|={g.norm():.3e}")
        elif rel(g, w) > MODEL_GRAD_TOL:
            bad.append(f"{name}: relative error {rel(g, w):.2e}")
    assert not bad, f"{what}: gradients differ from autograd through the model's own logits:\n" + "\n".join(bad)


_CACHE: dict[str, dict] = {}


def _fixture(arch: Arch) -> dict:
    """Model, batch, the model's own log-probs and parameter gradients (built once per architecture)."""
    if arch.id not in _CACHE:
        model = build_model(arch)
        ids, mask, labels = tiny_batch()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        want = model_logprobs(model, ids, mask, labels)
        upstream = _upstream(labels)
        want_grads = _grads((want * upstream).sum(), named)
        _CACHE[arch.id] = dict(model=model, ids=ids, mask=mask, labels=labels, want=want.detach(), named=named,
                               upstream=upstream, want_grads=want_grads)  # fmt: skip
    return _CACHE[arch.id]


# -------------------------------------------------------------------------------------------- architecture tests


@pytest.mark.parametrize("arch", arch_params(ARCHS))
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
        h = head_input(view, model, f["ids"], f["mask"])
        w, b = view.weight_and_bias()
        untransformed = gather_logprobs(h.double() @ w.double().T + (0 if b is None else b.double()), labels)
    gap = (untransformed - f["want"]).abs().max().item()
    if arch.expect.is_identity:
        assert gap < MODEL_LOGPROB_ATOL, f"plain logits, yet lm_head(h) misses the model's log-probs by {gap:.2e}"
    else:
        assert gap > 1.0, f"the transform changes log-probs by only {gap:.3f} nat: the test would prove nothing"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", arch_params(ARCHS))
def test_head_matches_model_forward(arch: Arch, impl: str):
    """Policy == reference here: all four streams are the model's own log-probs; then, with loss = Σ upstream ·
    policy, every parameter's gradient (lm_head, embeddings tied or not, final norm, attention, MLP / experts)
    equals autograd through the model's own logits."""
    f = _fixture(arch)
    _, streams = head_streams(f["model"], f["ids"], f["mask"], f["labels"], impl)
    ignored = f["labels"] == -100
    for name in ("policy", "ref", "plus", "minus"):
        got = getattr(streams, name)
        assert got.dtype == torch.float32 and got.shape == f["labels"].shape
        assert (got[ignored] == 0).all(), f"{name}: ignored positions must be 0"
        err = rel(got, f["want"])
        assert err <= MODEL_STREAM_TOL, f"{arch.model_cls} {impl} {name}: relative error {err:.2e} > {MODEL_STREAM_TOL}"

    got = _grads((streams.policy.double() * f["upstream"]).sum(), f["named"])
    names = {n for n, _ in f["named"]}
    assert any("embed" in n or "wte" in n or "word_embeddings" in n for n in names)
    assert any("norm" in n or "ln_f" in n for n in names) or not arch.norm_params
    _assert_grads_match(f["named"], got, f["want_grads"], f"{arch.model_cls} ({impl})")


def _perturbed_copy(arch: Arch, model: torch.nn.Module, seed: int = 5) -> torch.nn.Module:
    try:
        ref = copy.deepcopy(model)
    except RuntimeError:  # a module holding a non-leaf tensor (RecurrentGemma): rebuild, same seed, same weights
        ref = build_model(arch)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.2 * p.std().nan_to_num(0.0) * torch.randn(p.shape, generator=g) if p.numel() > 1 else 0.0)
    return ref


@pytest.mark.parametrize("impl", ["chunked"])
@pytest.mark.parametrize("arch", arch_params(ARCHS))
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
        "policy": gather_logprobs(z, labels),
        "ref": gather_logprobs(zr, labels),
        "plus": gather_logprobs((1 + eps) * z - eps * zr, labels),
        "minus": gather_logprobs((1 - eps) * z + eps * zr, labels),
    }
    assert (want["ref"] - want["policy"]).abs().max() > 0.1, "the perturbation must change the reference"
    _, streams = head_streams(model, ids, mask, labels, impl, ref=ref, epsilon=eps)
    for name, w in want.items():
        err = rel(getattr(streams, name), w)
        assert err <= MODEL_STREAM_TOL, f"{arch.model_cls} {name}: relative error {err:.2e} > {MODEL_STREAM_TOL}"


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


# ------------------------------------------------------------------------------------------- PEFT cases that work


def _lora_saved_head(base: str):
    model = build_model(ARCH_BY_ID[base])
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
    model = build_model(ARCH_BY_ID["llama-untied"])
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices={"lm_head": [3, 5, 8]})
    return peft.get_peft_model(model, config)


def _trainable_tokens_tied():
    model = build_model(ARCH_BY_ID["llama-tied"])
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
    ids, mask, labels = tiny_batch()
    named = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]
    view = describe_head(pm)
    z_on = pm(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
    hidden = head_input(view, pm, ids, mask)
    with pm.disable_adapter(), torch.no_grad():
        z_off = pm(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
        ref_hidden = head_input(view, pm, ids, mask)
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
        "policy": gather_logprobs(z_on, labels),
        "ref": gather_logprobs(z_off, labels),
        "plus": gather_logprobs((1 + eps) * z_on - eps * z_off, labels),
        "minus": gather_logprobs((1 - eps) * z_on + eps * z_off, labels),
    }
    gap = (want["policy"] - want["ref"]).abs().max()
    assert gap > 0.5, "the adapter must change the log-probs, or the test proves nothing"
    for name, want_s in want.items():
        err = rel(getattr(streams, name), want_s)
        assert err <= MODEL_STREAM_TOL, f"{name}: relative error {err:.2e} > {MODEL_STREAM_TOL}"

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
    model = build_model(ARCH_BY_ID["llama-untied" if target else "llama-tied"])
    pm = peft.get_peft_model(model, peft.TrainableTokensConfig(target_modules=target, token_indices=[3, 5, 8]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "trainable_tokens_delta" in n:
                p.add_(3.0 * torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))
    try:
        describe_head(pm)
    except ValueError:
        return
    ids, mask, labels = tiny_batch()
    _, on = head_streams(pm, ids, mask, labels, "chunked")
    assert rel(on.policy, model_logprobs(pm, ids, mask, labels)) <= MODEL_STREAM_TOL
    with pm.disable_adapter():
        _, off = head_streams(pm, ids, mask, labels, "chunked", adapters=False)
        assert rel(off.policy, model_logprobs(pm, ids, mask, labels)) <= MODEL_STREAM_TOL


def test_merged_trainable_tokens_reference_is_the_original_rows():
    """After merge_adapter() the trained rows live in the base weight; the reference must still read the original
    rows, as PEFT's disable_adapter() forward (which unmerges) does."""
    pm = _perturb_tokens(_trainable_tokens_untied())
    pm.merge_adapter()
    ids, mask, labels = tiny_batch()
    with torch.no_grad():  # the head reads adapters=False before any disabled forward has unmerged the rows
        _, off = head_streams(pm, ids, mask, labels, "naive", adapters=False)
        with pm.disable_adapter():
            want_off = model_logprobs(pm, ids, mask, labels)
    assert rel(off.policy, want_off) <= MODEL_STREAM_TOL
