"""The trainer optimises the model's own objective: TRL's DPOTrainer on the same batch as the yardstick (soft-capped,
scaled and PEFT-wrapped heads, MoE router losses, activated LoRA, a completion with no scored token), doubled BOS,
mixed precision, the moving β, float64 sequence sums. (The first-step check has its own file, test_head_check.py.)"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from trl import DPOConfig, DPOTrainer

from edpo_plugin.trainer import EpsilonDPOConfig, EpsilonDPOTrainer
from tests.numerics import MODEL_GRAD_TOL, SAME_STEP_RTOL, STEP_LOSS_RTOL, rel
from tests.spec_reference import decisions64, loss64
from tests.trainer.builders import (
    SHORT_RUN,
    edpo_config,
    perturb_,
    preference_rows,
    run_args,
    short_trainer,
    tiny_config,
    tiny_gemma2,
    tiny_llama,
    tiny_mixtral,
    tokenizer,
)

TINY_EPS = 1e-8  # β_i = β(1 ± 1e-8): ε-DPO's loss is DPO's to far below fp32 rounding


def _args(cls, out, **overrides):
    """``cls`` (EpsilonDPOConfig at ε = TINY_EPS, or TRL's DPOConfig) for two short steps (``SHORT_RUN``)."""
    if cls is EpsilonDPOConfig:
        return edpo_config(out, **(SHORT_RUN | dict(epsilon=TINY_EPS) | overrides))
    return cls(**run_args(out, **SHORT_RUN) | overrides)


def _cohere(tok):
    from transformers import CohereConfig, CohereForCausalLM

    return CohereForCausalLM(CohereConfig(**tiny_config(tok, logit_scale=0.0625)))


def _granite(tok):
    from transformers import GraniteConfig, GraniteForCausalLM

    return GraniteForCausalLM(GraniteConfig(**tiny_config(tok, logits_scaling=8.0)))


def _lora_saved_head():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
                      task_type="CAUSAL_LM")  # fmt: skip


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _one_step_losses(trainers: dict, batch: dict) -> dict[str, float]:
    """Loss of each trainer's ``compute_loss`` on ``batch`` (training mode), with ``backward`` run."""
    losses = {}
    for name, trainer in trainers.items():
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        losses[name] = loss.item()
    return losses


def _assert_same_gradients(ours: torch.nn.Module, trl: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter TRL's step gave a gradient has ours within MODEL_GRAD_TOL relative, and no other; returns
    ours."""
    ours_grads, trl_grads = _grads(ours), _grads(trl)
    assert ours_grads.keys() == trl_grads.keys() and ours_grads
    for name, want in trl_grads.items():
        err = rel(ours_grads[name], want)
        assert err < MODEL_GRAD_TOL, f"{name}: relative gradient error {err:.2e}"
    return ours_grads


CASES = {
    "gemma2-softcap": (tiny_gemma2, None),
    "cohere-logit_scale": (_cohere, None),
    "granite-logits_scaling": (_granite, None),
    "llama-lora-modules_to_save": (tiny_llama, _lora_saved_head),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_gradients_equal_trl_dpo(tiny_default, tmp_path, case):
    """ε → 0 makes ε-DPO's loss DPO's: our fused head must then give TRL's DPOTrainer loss and every gradient,
    TRL computing log-probs from the models' own logits (soft cap, scale, the saved lm_head copy under PEFT)."""
    build, peft = CASES[case]
    tok = tokenizer(tiny_default)
    data = preference_rows(tiny_default, 8)
    torch.manual_seed(0)
    base = build(tok)
    ref = None if peft else copy.deepcopy(base)
    if not peft:
        perturb_(base, scale=0.3)  # the policy away from the reference: margins and decisions not all 0

    def make(trainer_cls, args_cls, model, ref_model):
        return trainer_cls(model=model, ref_model=ref_model, args=_args(args_cls, tmp_path / args_cls.__name__),
                           train_dataset=data, processing_class=tok, peft_config=peft() if peft else None)  # fmt: skip

    ours = make(EpsilonDPOTrainer, EpsilonDPOConfig, copy.deepcopy(base), copy.deepcopy(ref) if ref else None)
    trl = make(DPOTrainer, DPOConfig, copy.deepcopy(base), copy.deepcopy(ref) if ref else None)
    if peft:  # both get the same adapter and the same perturbed saved head: policy ≠ reference
        trl.model.load_state_dict(ours.model.state_dict())
        for trainer in (ours, trl):
            perturb_(trainer.model)
        head = ours.model.base_model.model.lm_head
        assert not torch.equal(head.modules_to_save["default"].weight, head.original_module.weight)

    losses = _one_step_losses({"ours": ours, "trl": trl}, next(iter(ours.get_train_dataloader())))
    assert losses["ours"] == pytest.approx(losses["trl"], rel=STEP_LOSS_RTOL), losses
    assert abs(losses["trl"] - 0.6931) > 1e-4, "policy equal to reference proves nothing"
    _assert_same_gradients(ours.model, trl.model)


@pytest.mark.parametrize("padding_free", [False, True])
def test_a_completion_with_no_scored_token_counts_as_in_trl(tiny_default, tmp_path, caplog, padding_free):
    """A one-token chosen row (an empty prompt and an EOS-only completion, no BOS: nothing to score): TRL's DPO keeps
    the pair, its chosen log-probability 0 under both models; so do we, padded and padding-free, with the first-step
    check running on that micro-batch."""
    tok = tokenizer(tiny_default)
    data = preference_rows(tiny_default, 8)
    torch.manual_seed(0)
    base = tiny_llama(tok)
    ref = copy.deepcopy(base)
    perturb_(base, scale=0.3)
    ours = EpsilonDPOTrainer(model=copy.deepcopy(base), ref_model=copy.deepcopy(ref),
                             args=_args(EpsilonDPOConfig, tmp_path / "ours", padding_free=padding_free),
                             train_dataset=data, processing_class=tok)  # fmt: skip
    trl = DPOTrainer(model=copy.deepcopy(base), ref_model=copy.deepcopy(ref), args=_args(DPOConfig, tmp_path / "trl"),
                     train_dataset=data, processing_class=tok)  # fmt: skip
    batch = dict(next(iter(ours.get_train_dataloader())))
    for key in ("input_ids", "attention_mask", "completion_mask"):
        batch[key] = batch[key].clone()
    batch["input_ids"][0] = tok.pad_token_id
    batch["input_ids"][0, 0] = tok.eos_token_id
    batch["attention_mask"][0] = 0
    batch["attention_mask"][0, 0] = 1
    batch["completion_mask"][0] = 0
    batch["completion_mask"][0, 0] = 1
    with caplog.at_level(logging.WARNING, logger="edpo_plugin.trainer.trainer"):
        losses = _one_step_losses({"ours": ours, "trl": trl}, batch)
    assert losses["ours"] == pytest.approx(losses["trl"], rel=STEP_LOSS_RTOL), losses
    _assert_same_gradients(ours.model, trl.model)
    assert "1 of 8 completions in a micro-batch have no token to score" in caplog.text
    assert ours.beta_controller._pending[1].item() == 4  # every pair counts in β's statistics too


def test_granitemoe_router_loss_is_its_own(tiny_default, tmp_path):
    """GraniteMoe's router auxiliary loss is what its own forward returns on the batch: transformers 5.16 returns a
    Python 0 there (it collects no router logits: a zero loss, not a crash), 5.24 a tensor."""
    from transformers import GraniteMoeConfig, GraniteMoeForCausalLM

    tok = tokenizer(tiny_default)
    torch.manual_seed(0)
    model = GraniteMoeForCausalLM(GraniteMoeConfig(**tiny_config(tok, num_local_experts=4, num_experts_per_tok=2)))
    losses = {}
    for coef in (0.0, 0.5):
        trainer = short_trainer(tiny_default, tmp_path / str(coef), copy.deepcopy(model), epsilon=TINY_EPS,
                                router_aux_loss_coef=coef)  # fmt: skip
        assert trainer.aux_loss_enabled == (coef > 0)
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.model.train()
        losses[coef] = trainer.compute_loss(trainer.model, batch).item()
    with torch.no_grad():
        own = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            output_router_logits=True).aux_loss  # fmt: skip
    assert losses[0.5] == pytest.approx(losses[0.0] + 0.5 * float(own), rel=SAME_STEP_RTOL)
    assert trainer._metrics["train"]["aux_loss"] == [pytest.approx(float(own), rel=SAME_STEP_RTOL)]


def test_doubled_bos_is_dropped(tiny_default, tmp_path, caplog):
    """A prompt that already starts with BOS (a template that writes it) is tokenized to [bos, bos, …]: the
    trainer drops the duplicate, so the loss is the one of the same data without the written BOS."""
    tok = tokenizer(tiny_default)
    data = preference_rows(tiny_default, 4)
    doubled = data.map(lambda row: {"prompt": tok.bos_token + row["prompt"]})
    torch.manual_seed(0)
    model = tiny_llama(tok)
    perturb_(model)
    ref = copy.deepcopy(model)
    losses = []
    for name, ds in (("plain", data), ("doubled", doubled)):
        trainer = EpsilonDPOTrainer(model=copy.deepcopy(model), ref_model=copy.deepcopy(ref),
                                    args=_args(EpsilonDPOConfig, tmp_path / name, epsilon=0.1), train_dataset=ds,
                                    processing_class=tok)  # fmt: skip
        batch = next(iter(trainer.get_train_dataloader()))
        assert (batch["input_ids"][:, 1] == tok.bos_token_id).all() == (name == "doubled")
        with caplog.at_level(logging.WARNING, logger="edpo_plugin.trainer.trainer"):
            losses.append(trainer.compute_loss(trainer.model, batch).item())
    assert losses[0] == pytest.approx(losses[1], rel=SAME_STEP_RTOL)
    assert sum("doubled BOS" in r.getMessage() for r in caplog.records) == 1


def test_bf16_mixed_precision_runs_the_backbone_in_bf16(tiny_default, tmp_path):
    """bf16=True with fp32 weights: the backbone's projections run in bf16 under the accelerator's autocast, as in
    TRL's DPO (the head itself stays fp32)."""
    tok = tokenizer(tiny_default)
    torch.manual_seed(0)
    trainer = short_trainer(tiny_default, tmp_path, tiny_llama(tok), epsilon=TINY_EPS, bf16=True)
    seen = []
    hook = trainer.model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    trainer.train()
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}, seen


def test_loss_uses_the_moving_beta(tiny_default, tmp_path):
    """After β has moved, the loss is taken at the controller's β, not at args.beta."""
    tok = tokenizer(tiny_default)
    torch.manual_seed(0)
    model = tiny_llama(tok)
    trainer = short_trainer(tiny_default, tmp_path, model, epsilon=0.2)
    perturb_(trainer.model, scale=0.2)
    moved = 0.37
    trainer.beta_controller.beta = moved
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch).item()

    ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["completion_mask"][:, 1:].bool()
    with torch.no_grad():
        z = trainer.model.double()(input_ids=ids, attention_mask=attn).logits[:, :-1]
        zr = trainer.ref_model.double()(input_ids=ids, attention_mask=attn).logits[:, :-1]

    def seq(logits):
        return (logits.log_softmax(-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1) * mask).sum(-1).chunk(2)

    (pc, pr), (rc, rr) = seq(z), seq(zr)
    (plc, plr), (mic, mir) = seq(1.2 * z - 0.2 * zr), seq(0.8 * z + 0.2 * zr)
    s = decisions64(pc, pr, plc, plr, mic, mir)
    want = loss64(pc, pr, rc, rr, s, moved, 0.2).mean().item()
    assert loss == pytest.approx(want, rel=STEP_LOSS_RTOL)
    assert abs(want - loss64(pc, pr, rc, rr, s, 0.1, 0.2).mean().item()) > 1e-3  # args.beta would be detected


def test_evaluation_between_steps_does_not_feed_beta(tiny_default, tmp_path):
    """Evaluating after every step leaves β's trajectory exactly as without evaluation."""
    tok = tokenizer(tiny_default)
    eval_data = preference_rows(tiny_default, 8, split="eval")
    runs = {}
    for name, extra in (("plain", {}), ("eval", {"eval_strategy": "steps", "eval_steps": 1})):
        torch.manual_seed(0)
        model = tiny_llama(tok)
        perturb_(model, scale=0.1)
        trainer = EpsilonDPOTrainer(model=model, ref_model=_llama_copy_unperturbed(tok),
                                    args=_args(EpsilonDPOConfig, tmp_path / name, epsilon=0.2, max_steps=3, **extra),
                                    train_dataset=preference_rows(tiny_default, 12),
                                    eval_dataset=eval_data, processing_class=tok)  # fmt: skip
        trainer.train()
        runs[name] = [h["kl/beta"] for h in trainer.state.log_history if "kl/beta" in h and "loss" in h]
        runs[name].append(trainer.beta_controller.beta)
        if name == "eval":
            evals = [h for h in trainer.state.log_history if "eval_kl/avg_steps" in h]
            assert len(evals) == 3 and any(h["eval_kl/avg_steps"] != 0 for h in evals)
    assert runs["eval"] == runs["plain"]
    assert runs["plain"][-1] != 0.1


def _llama_copy_unperturbed(tok):
    torch.manual_seed(0)
    return tiny_llama(tok)


def test_doubled_bos_through_axolotls_chat_template_strategy(tiny_default, tmp_path):
    """Axolotl's `chat_template.default` DPO strategy with a template that writes `bos_token` (Llama-3-Instruct
    style) yields prompts TRL 1.9 tokenizes to [bos, bos, …]; the trainer's batch loss equals the one of the same
    rows rendered without the written BOS (where the tokenizer adds the only one)."""
    pytest.importorskip("axolotl", reason="the plain-TRL environment has no Axolotl")
    from axolotl.prompt_strategies.dpo.chat_template import default as chat_template_default
    from datasets import Dataset

    tok = tokenizer(tiny_default)
    chatml = tok.chat_template  # the tiny default's own ChatML template
    rows = [
        {"messages": [{"role": "user", "content": q}], "chosen": {"role": "assistant", "content": a},
         "rejected": {"role": "assistant", "content": b}}
        for q, a, b in [("hello", "yes", "no"), ("eight", "nine", "one"), ("one", "two", "eight"), ("no", "yes", "no")]
    ]  # fmt: skip

    def render(template: str) -> Dataset:
        dataset_cfg = {"type": "chat_template.default", "chat_template": "jinja", "chat_template_jinja": template}
        transform, _ = chat_template_default({"datasets": [dataset_cfg]})
        return Dataset.from_list([transform(row, tokenizer=tok) for row in rows])

    torch.manual_seed(0)
    model = tiny_llama(tok)
    perturb_(model)
    losses, firsts = [], []
    for name, template in (("plain", chatml), ("bos", "{{ bos_token }}" + chatml)):
        trainer = EpsilonDPOTrainer(model=copy.deepcopy(model), ref_model=_llama_copy_unperturbed(tok),
                                    args=_args(EpsilonDPOConfig, tmp_path / name, epsilon=0.1),
                                    train_dataset=render(template), processing_class=tok)  # fmt: skip
        batch = next(iter(trainer.get_train_dataloader()))
        firsts.append(batch["input_ids"][:, :2].tolist())
        losses.append(trainer.compute_loss(trainer.model, batch).item())
    assert all(row == [tok.bos_token_id, tok.bos_token_id] for row in firsts[1]), "the strategy no longer doubles BOS"
    assert all(row[1] != tok.bos_token_id for row in firsts[0])
    assert losses[0] == pytest.approx(losses[1], rel=SAME_STEP_RTOL)


# ------------------------------------------------------------------------------------------ round 2: MoE, PEFT hooks


def _qwen3_moe(tok):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(**tiny_config(tok, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                           head_dim=8))  # fmt: skip
    return Qwen3MoeForCausalLM(config)


def _llama4(tok):
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    config = Llama4TextConfig(**tiny_config(tok, num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=64,
                                             interleave_moe_layer_step=1, head_dim=8))  # fmt: skip
    return Llama4ForCausalLM(config)


AUX_COEF = 0.05


# model -> TRL's router_aux_loss_coef for the same objective. Llama4ForCausalLM's forward computes no router auxiliary
# loss (TRL's DPO would read a missing outputs.aux_loss): the model's own objective has none, so TRL runs with 0.
MOE_CASES = {"mixtral": (tiny_mixtral, AUX_COEF), "qwen3-moe": (_qwen3_moe, AUX_COEF), "llama4": (_llama4, 0.0)}


@pytest.mark.parametrize("case", list(MOE_CASES))
def test_moe_router_aux_loss_equals_trl_dpo(tiny_default, tmp_path, case):
    """MoE: loss = ε-DPO's + router_aux_loss_coef × the policy's own outputs.aux_loss (TRL's DPO rule, logged as
    aux_loss); at ε → 0 the loss and every gradient (router gates included) equal TRL's DPOTrainer."""
    build, trl_coef = MOE_CASES[case]
    tok = tokenizer(tiny_default)
    data = preference_rows(tiny_default, 8)
    torch.manual_seed(0)
    base = build(tok)
    ref = copy.deepcopy(base)
    perturb_(base, scale=0.3)
    trainers = {}
    for name, trainer_cls, args_cls, coef in (("ours", EpsilonDPOTrainer, EpsilonDPOConfig, AUX_COEF),
                                              ("trl", DPOTrainer, DPOConfig, trl_coef)):  # fmt: skip
        args = _args(args_cls, tmp_path / name, router_aux_loss_coef=coef)
        trainers[name] = trainer_cls(model=copy.deepcopy(base), ref_model=copy.deepcopy(ref), args=args,
                                     train_dataset=data, processing_class=tok)  # fmt: skip
    batch = next(iter(trainers["ours"].get_train_dataloader()))
    try:
        losses = _one_step_losses(trainers, batch)
    except AttributeError as err:  # TRL >= 1.10's fused DPO head reads base_model(...).last_hidden_state
        if "last_hidden_state" in str(err):
            pytest.skip(f"this TRL's DPOTrainer cannot run {type(base).__name__} (the yardstick fails: {err})")
        raise
    assert losses["ours"] == pytest.approx(losses["trl"], rel=STEP_LOSS_RTOL), losses
    logged = trainers["ours"]._metrics["train"]["aux_loss"]
    if trl_coef:
        assert len(logged) == 1 and AUX_COEF * logged[0] > 1e-3, "the auxiliary term must matter in this test"
        assert logged == pytest.approx(trainers["trl"]._metrics["train"]["aux_loss"], rel=SAME_STEP_RTOL)
    else:
        assert not logged
    ours_grads = _assert_same_gradients(trainers["ours"].model, trainers["trl"].model)
    assert any("gate" in n or "router" in n for n in ours_grads)


def test_activated_lora_equals_trl_dpo(tiny_default, tmp_path):
    """PEFT activated LoRA applies its adapter through PeftModel.forward's hooks, from the invocation tokens on: the
    training forward must go through them (loss and every LoRA gradient equal TRL's DPOTrainer, not ln 2 and 0)."""
    from peft import LoraConfig

    tok = tokenizer(tiny_default)
    data = preference_rows(tiny_default, 8)
    invocation = tok(data[0]["prompt"], add_special_tokens=False).input_ids[-1:]  # the prompt's closing ":"
    torch.manual_seed(0)
    base = tiny_llama(tok)

    def make(trainer_cls, args_cls):
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                            alora_invocation_tokens=invocation)  # fmt: skip
        return trainer_cls(model=copy.deepcopy(base), args=_args(args_cls, tmp_path / args_cls.__name__),
                           train_dataset=data, processing_class=tok, peft_config=config)  # fmt: skip

    ours, trl = make(EpsilonDPOTrainer, EpsilonDPOConfig), make(DPOTrainer, DPOConfig)
    trl.model.load_state_dict(ours.model.state_dict())
    for trainer in (ours, trl):
        perturb_(trainer.model, scale=0.3)
    losses = _one_step_losses({"ours": ours, "trl": trl}, next(iter(ours.get_train_dataloader())))
    assert abs(losses["trl"] - 0.693147) > 1e-4, "the activated adapter must change the loss"
    assert losses["ours"] == pytest.approx(losses["trl"], rel=STEP_LOSS_RTOL), losses
    ours_grads = _assert_same_gradients(ours.model, trl.model)
    assert all(g.norm() > 0 for g in ours_grads.values()), "every LoRA factor must get a gradient"


def test_sequence_sums_are_float64_so_long_completions_keep_their_decisions(tiny_default, tmp_path, monkeypatch):
    """4096-token completions whose ε-mixes differ from the policy by ~1e-6 nats a token (ε = 0.01 times a per-token
    log-ratio of 1e-4): fp32 sums of ~2e4 nats round by more than the mixes' whole difference and flip decisions; the
    trainer's decisions must be those of exact (float64) sums of the same fp32 token log-probs."""
    import edpo_plugin.trainer.forwards as forwards_module
    import edpo_plugin.trainer.trainer as trainer_module
    from edpo_plugin.loss import edpo_loss
    from edpo_plugin.ops import LinearLogprobs

    tok = tokenizer(tiny_default)
    torch.manual_seed(0)
    trainer = short_trainer(tiny_default, tmp_path, tiny_llama(tok), epsilon=0.01, edpo_head_check=False)
    batch = next(iter(trainer.get_train_dataloader()))
    rows, length = batch["input_ids"].shape[0], 4096
    g = torch.Generator().manual_seed(0)
    policy = -8 * torch.rand(rows, length, generator=g)
    delta = 4e-6 * (torch.rand(rows, length, generator=g) - 0.5)
    streams = LinearLogprobs(policy.requires_grad_(), policy.detach() - 0.1, policy.detach() + delta,
                             policy.detach() - delta)  # fmt: skip
    monkeypatch.setattr(forwards_module, "linear_logprobs", lambda *a, **k: streams)
    seen = []
    monkeypatch.setattr(trainer_module, "edpo_loss", lambda *a, **k: seen.append(edpo_loss(*a, **k)) or seen[-1])
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch)

    (pc, pr), (plc, plr), (mic, mir) = (s.detach().double().sum(-1).chunk(2) for s in streams[:1] + streams[2:])
    want = decisions64(pc, pr, plc, plr, mic, mir)
    fp32 = [s.detach().sum(-1).double().chunk(2) for s in (streams.policy, streams.plus, streams.minus)]
    assert not torch.equal(decisions64(*fp32[0], *fp32[1], *fp32[2]), want), "fp32 sums must flip a decision here"
    assert torch.equal(seen[0].decisions.double(), want)
