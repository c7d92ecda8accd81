"""EpsilonDPOTrainer with plain TRL on the tiny default model (CPU)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from edpo_plugin.trainer import EDPO_STATE_NAME, EpsilonDPOTrainer
from tests.numerics import (
    FLOAT64_TOL,
    LOGGED_ATOL,
    LOGGED_RTOL,
    MODEL_GRAD_TOL,
    SAME_RUN_RTOL,
    SAME_STEP_RTOL,
    STEP_LOSS_RTOL,
    TRAINED_ATOL,
    TRAINED_RTOL,
    rel,
)
from tests.spec_reference import beta_trajectory64, decisions64, loss64
from tests.trainer.builders import BETA, EPS, edpo_config, edpo_trainer, preference_rows, tokenizer


def _trainer(tiny, out, n_rows=16, peft_config=None, dataset=None, **overrides) -> EpsilonDPOTrainer:
    """:func:`~tests.trainer.builders.edpo_trainer` on the tiny default model (fp32, seed 0) and its first ``n_rows``
    rows (or ``dataset``)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32)
    if dataset is None:
        dataset = preference_rows(tiny, n_rows)
    return edpo_trainer(tiny, model, edpo_config(out, **overrides), dataset, peft_config=peft_config)


def _fresh64(tiny, model: torch.nn.Module) -> torch.nn.Module:
    fresh = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float64)
    fresh.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    return fresh


def _kl_logs(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "kl/beta" in h]


def _streams64(model64, ref64, batch, eps):
    """Four float64 token log-prob streams from full logits, summed per sequence; policy keeps its graph."""
    ids, attn = batch["input_ids"], batch["attention_mask"]
    z = model64(input_ids=ids, attention_mask=attn).logits[:, :-1].double()
    with torch.no_grad():
        zr = ref64(input_ids=ids, attention_mask=attn).logits[:, :-1].double()
    mask = batch["completion_mask"][:, 1:].bool()
    y = ids[:, 1:].unsqueeze(-1)

    def seq(logits):
        return (logits.log_softmax(-1).gather(-1, y).squeeze(-1) * mask).sum(-1)

    zd = z.detach()
    return seq(z), seq(zr), seq((1 + eps) * zd - eps * zr), seq((1 - eps) * zd + eps * zr)


@pytest.mark.parametrize("alpha", [0.0, 0.2], ids=["sigmoid", "label_smoothing"])
def test_step_loss_and_gradients_match_float64_full_logits(tiny_default, tmp_path, alpha):
    """``label_smoothing`` (TRL's field, the conservative-DPO α) reaches the loss: accepted, it must not be ignored."""
    trainer = _trainer(tiny_default, tmp_path, label_smoothing=alpha)
    # move the policy away from the reference so that decisions are not all 0
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    # The yardstick models are fresh float64 loads given the trainer's weights, not deep copies of models the trainer
    # has touched (with TRL 1.16 / transformers 5.24 such a copy's embedding gets no gradient).
    model64, ref64 = (_fresh64(tiny_default, m) for m in (trainer.model, trainer.ref_model))
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()

    pol, ref, plus, minus = _streams64(model64, ref64, batch, EPS)
    (pc, pr), (rc, rr), (plc, plr), (mic, mir) = (t.chunk(2) for t in (pol, ref, plus, minus))
    s = decisions64(pc.detach(), pr.detach(), plc, plr, mic, mir)
    want = loss64(pc, pr, rc, rr, s, BETA, EPS, alpha).mean()
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=STEP_LOSS_RTOL)
    n_checked = 0
    params64 = dict(model64.named_parameters())
    for name, p in trainer.model.named_parameters():
        if p.grad is None:
            continue
        p64 = params64[name]
        assert p64.grad is not None, f"{name}: the float64 yardstick got no gradient"
        err = rel(p.grad, p64.grad)
        assert err < MODEL_GRAD_TOL, f"{name}: relative gradient error {err:.2e}"
        n_checked += 1
    assert n_checked == sum(1 for _ in trainer.model.parameters())
    # the β statistics of this micro-batch are the float64 decisions
    logged = trainer.beta_controller.step()
    assert logged["avg_steps"] == pytest.approx(s.mean().item(), abs=FLOAT64_TOL)


def _beta_run(tiny, out, micro, accum, steps=5):
    trainer = _trainer(tiny, out, n_rows=4 * steps, per_device_train_batch_size=micro,
                       gradient_accumulation_steps=accum, max_steps=steps)  # fmt: skip
    trainer.train()
    logs = _kl_logs(trainer)
    assert len(logs) == steps
    return [h["kl/beta"] for h in logs], [h["kl/avg_steps"] for h in logs], trainer.beta_controller.beta


def test_beta_trajectory_independent_of_micro_batch_and_accumulation(tiny_default, tmp_path):
    runs = {
        shape: _beta_run(tiny_default, tmp_path / f"{shape[0]}x{shape[1]}", *shape)
        for shape in [(4, 1), (2, 2), (1, 4)]
    }
    betas, avgs, final = runs[(4, 1)]
    assert any(a != 0 for a in avgs), "the run should move β"
    # β follows the rule from the logged values: β_{t+1} = β_t / (1 + ε s̄_t)
    assert betas == pytest.approx(beta_trajectory64(BETA, EPS, [[a] for a in avgs])[:-1], rel=FLOAT64_TOL)
    for shape, (b, a, f) in runs.items():
        assert b == pytest.approx(betas, rel=SAME_RUN_RTOL), shape
        assert a == pytest.approx(avgs, abs=SAME_RUN_RTOL), shape
        assert f == pytest.approx(final, rel=SAME_RUN_RTOL), shape


@pytest.mark.parametrize("padding_free", [False, True])
def test_resume_equals_straight_run(tiny_default, tmp_path, padding_free):
    k = 3
    straight = _trainer(tiny_default, tmp_path / "straight", n_rows=8 * k, max_steps=2 * k, padding_free=padding_free)
    straight.train()

    first = _trainer(tiny_default, tmp_path / "resumed", n_rows=8 * k, max_steps=2 * k, save_strategy="steps",
                     save_steps=k, padding_free=padding_free)  # fmt: skip
    first.args.max_steps = k  # stop after k steps, with the schedule of a 2k run
    first.train()
    ckpt = tmp_path / "resumed" / f"checkpoint-{k}"
    state = json.loads((ckpt / EDPO_STATE_NAME).read_text())
    assert state["beta"] == pytest.approx(first.beta_controller.beta, rel=0)
    # padding-free switches the model to the plugin's per-sequence SDPA; the saved config must not name it
    assert "edpo_packed_sdpa" not in (ckpt / "config.json").read_text()

    second = _trainer(tiny_default, tmp_path / "resumed", n_rows=8 * k, max_steps=2 * k, save_strategy="steps",
                      save_steps=k, padding_free=padding_free)  # fmt: skip
    assert second.beta_controller.beta == BETA
    second.train(resume_from_checkpoint=str(ckpt))
    assert second.beta_controller.beta == pytest.approx(straight.beta_controller.beta, rel=SAME_RUN_RTOL)
    assert straight.beta_controller.beta != BETA
    for p, q in zip(straight.model.parameters(), second.model.parameters()):
        torch.testing.assert_close(p, q, rtol=TRAINED_RTOL, atol=TRAINED_ATOL)


def test_evaluation_does_not_move_beta(tiny_default, tmp_path):
    trainer = _trainer(tiny_default, tmp_path, max_steps=2)
    trainer.train()
    beta = trainer.beta_controller.beta
    metrics = trainer.evaluate(eval_dataset=preference_rows(tiny_default, split="eval"))
    assert trainer.beta_controller.beta == beta
    assert metrics["eval_kl/beta"] == pytest.approx(beta)
    assert math.isfinite(metrics["eval_loss"])


def test_peft_reference_is_the_base_model(tiny_default, tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = _trainer(tiny_default, tmp_path, peft_config=lora, max_steps=3, learning_rate=2e-2)
    assert trainer.ref_model is None
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    # fresh LoRA (B = 0): policy == reference, so every margin is 0, the loss is log 2 and no pair moves β
    loss = trainer.compute_loss(trainer.model, batch)
    assert loss.item() == pytest.approx(math.log(2), rel=SAME_STEP_RTOL)
    assert trainer.beta_controller.step()["avg_steps"] == 0.0
    trainer.train()
    logs = _kl_logs(trainer)
    assert len(logs) == 3 and trainer.state.log_history[-2]["loss"] < math.log(2)
    assert any(h["kl/p_epsilon_steps"] + h["kl/n_epsilon_steps"] > 0 for h in logs[1:])


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"loss_type": "ipo"}, "loss_type"),
        ({"loss_type": ["sigmoid", "sft"]}, "loss_type"),
        ({"precompute_ref_log_probs": True}, "precompute_ref_log_probs"),
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon": 1.0}, "epsilon"),
        ({"beta": 0.0}, "beta"),
        ({"beta": -0.1}, "beta"),
        ({"use_liger_kernel": True}, "use_liger_kernel"),
        ({"edpo_head": "fast"}, "edpo_head"),
        ({"label_smoothing": 0.5}, "label_smoothing"),
    ],
)
def test_refused_options(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        edpo_config(tmp_path, **overrides)


def test_dataset_row_missing_chosen_is_refused(tiny_default, tmp_path):
    bad = Dataset.from_list([{"prompt": "count up from two :", "rejected": "nine"}] * 4)
    with pytest.raises(ValueError, match="chosen"):
        _trainer(tiny_default, tmp_path, dataset=bad)


def test_dataset_row_with_null_chosen_is_refused(tiny_default, tmp_path):
    rows = [{"prompt": "count up from two :", "chosen": "three four five", "rejected": "nine"}] * 3
    bad = Dataset.from_list([*rows, {"prompt": "count up from two :", "chosen": None, "rejected": "nine"}])
    with pytest.raises(ValueError, match=r"rows \[3\] have no 'chosen'"):
        _trainer(tiny_default, tmp_path, dataset=bad)


def test_plain_dpo_config_is_refused(tiny_default, tmp_path):
    from trl import DPOConfig

    tok = tokenizer(tiny_default)
    model = AutoModelForCausalLM.from_pretrained(tiny_default["model"])
    ds = preference_rows(tiny_default, 4)
    with pytest.raises(TypeError, match="EpsilonDPOConfig"):
        plain = DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
        EpsilonDPOTrainer(model=model, args=plain, train_dataset=ds, processing_class=tok)


def test_naive_and_chunked_heads_agree_on_a_step(tiny_default, tmp_path):
    losses = {}
    for head in ("naive", "chunked"):
        trainer = _trainer(tiny_default, tmp_path / head, edpo_head=head, max_steps=3)
        trainer.train()
        losses[head] = (
            [h["loss"] for h in trainer.state.log_history if "loss" in h],
            [h["kl/beta"] for h in _kl_logs(trainer)],
        )
    assert losses["naive"][0] == pytest.approx(losses["chunked"][0], rel=TRAINED_RTOL)
    assert losses["naive"][1] == pytest.approx(losses["chunked"][1], rel=SAME_RUN_RTOL)


def test_tensorboard_receives_edpo_metrics(tiny_default, tmp_path, monkeypatch):
    """With ``report_to="tensorboard"`` every optimizer step's kl/* and reward scalars reach the event file, equal to
    the trainer's log history, and the β scalars follow the spec's rule from the logged s̄."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    trainer = _trainer(tiny_default, tmp_path, report_to="tensorboard")
    trainer.train()
    logs = _kl_logs(trainer)
    assert len(logs) == 4

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    scalars = {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    for key in ("kl/beta", "kl/avg_steps", "kl/p_epsilon_steps", "kl/n_epsilon_steps", "rewards/margins", "loss"):
        assert scalars[f"train/{key}"] == pytest.approx([h[key] for h in logs], rel=LOGGED_RTOL, abs=LOGGED_ATOL), key
    avgs = scalars["train/kl/avg_steps"]
    assert any(a != 0 for a in avgs), "the run should move β"
    assert scalars["train/kl/beta"] == pytest.approx(
        beta_trajectory64(BETA, EPS, [[a] for a in avgs])[:-1], rel=LOGGED_RTOL
    )


def test_qlora_step_matches_float64_dequantized_model(tiny_default, tmp_path):
    """QLoRA: a 4-bit NF4 base (bitsandbytes, CPU) with LoRA. The reference is a float64 dense model holding the
    dequantized 4-bit weights, with the same LoRA factors as plain float64 leaf tensors: policy = W + (α/r)·B·A,
    reference = W. Loss and the gradients of every LoRA factor match. (TRL keeps QLoRA adapters in bf16; the test
    casts them to fp32 so that the comparison is at fp32 accuracy.)"""
    import bitsandbytes as bnb
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    torch.manual_seed(0)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_default["model"], quantization_config=quant, device_map="cpu")
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                      task_type="CAUSAL_LM")  # fmt: skip
    trainer = edpo_trainer(
        tiny_default, model, edpo_config(tmp_path), preference_rows(tiny_default, 16), peft_config=lora
    )
    gen = torch.Generator().manual_seed(1)
    factors = {}  # LoRA-wrapped module name -> (A [r, in], B [out, r]) trainable parameters
    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            # TRL stores QLoRA adapters in bf16 (QLoRA paper); in fp32 the step can be checked to fp32 accuracy
            assert p.dtype == torch.bfloat16, name
            p.data = p.data.float()
        if "lora_B" in name:
            with torch.no_grad():
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))  # B = 0 would make policy == reference
    for name, module in trainer.model.named_modules():
        if isinstance(getattr(module, "base_layer", None), bnb.nn.Linear4bit):
            dense_name = name.removeprefix("base_model.model.")
            factors[dense_name] = (module.lora_A["default"].weight, module.lora_B["default"].weight)
    assert len(factors) == 3 * 2  # three targets per layer, two layers

    # float64 dense model: dequantized 4-bit weights, every other weight as loaded
    dense64 = AutoModelForCausalLM.from_pretrained(tiny_default["model"], dtype=torch.float64)
    n_dequantized = 0
    with torch.no_grad():
        for name, module in trainer.model.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                w = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                dense_name = name.removeprefix("base_model.model.").removesuffix(".base_layer")
                dense64.get_submodule(dense_name).weight.copy_(w.double())
                n_dequantized += 1
    assert n_dequantized == 7 * 2  # every attention and MLP projection of both layers is 4-bit
    leaves = {name: (a.detach().double().requires_grad_(), b.detach().double().requires_grad_())
              for name, (a, b) in factors.items()}  # fmt: skip
    scale = lora.lora_alpha / lora.r

    def with_lora(module_name):
        a, b = leaves[module_name]
        return lambda mod, args, out: out + scale * (args[0] @ a.T @ b.T)

    ref64 = copy.deepcopy(dense64)  # reference = the dequantized base; the policy adds the float64 LoRA factors
    for module_name in leaves:
        dense64.get_submodule(module_name).register_forward_hook(with_lora(module_name))

    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()

    pol, ref, plus, minus = _streams64(dense64, ref64, batch, EPS)
    (pc, pr), (rc, rr), (plc, plr), (mic, mir) = (t.chunk(2) for t in (pol, ref, plus, minus))
    s = decisions64(pc.detach(), pr.detach(), plc, plr, mic, mir)
    assert (s != 0).any(), "the perturbed adapter should move β"
    want = loss64(pc, pr, rc, rr, s, BETA, EPS).mean()
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=STEP_LOSS_RTOL)
    for name, (a, b) in factors.items():
        a64, b64 = leaves[name]
        for got, ref_grad, which in ((a.grad, a64.grad, "A"), (b.grad, b64.grad, "B")):
            err = rel(got, ref_grad)
            assert err < MODEL_GRAD_TOL, f"{name}.lora_{which}: relative gradient error {err:.2e}"
    assert trainer.beta_controller.step()["avg_steps"] == pytest.approx(s.mean().item(), abs=FLOAT64_TOL)
