"""`axolotl train` on the tiny YAML examples (full fine-tune and LoRA), as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.spec_reference import beta_trajectory64
from tests.varied_rows import write_varied_rows

REPO = Path(__file__).resolve().parents[2]
STEPS = 6


def _run(tiny: dict, example: str, tmp_path: Path, train_file: Path | None = None, **overrides) -> Path:
    cfg = yaml.safe_load((REPO / "yaml_examples" / example).read_text())
    cfg.update(**overrides)
    cfg.update(
        base_model=str(overrides.get("base_model", tiny["model"])),
        dataset_prepared_path=str(tmp_path / "prepared"),
        output_dir=str(tmp_path / "out"),
        max_steps=STEPS,
        save_steps=STEPS,
    )
    cfg["datasets"][0]["path"] = str(train_file or tiny["train"])
    tmp_path.mkdir(exist_ok=True)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    bin_dir = os.path.dirname(sys.executable)  # `axolotl train` execs `accelerate` from PATH
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", HF_HUB_OFFLINE="1", AXOLOTL_DO_NOT_TRACK="1",
               WANDB_MODE="disabled", TENSORBOARD_LOGGING_DIR=str(tmp_path / "tb"))  # fmt: skip
    done = subprocess.run([os.path.join(bin_dir, "axolotl"), "train", str(config)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    (tmp_path / "axolotl.log").write_text(done.stdout + done.stderr)
    return tmp_path / "out"


QLORA = {"adapter": "qlora", "load_in_4bit": True}  # bitsandbytes 4-bit runs on CPU


@pytest.mark.parametrize("example,overrides,weights", [("tiny-edpo.yaml", {}, "model.safetensors"),
                                                       ("tiny-edpo-lora.yaml", {}, "adapter_model.safetensors"),
                                                       ("tiny-edpo-lora.yaml", QLORA, "adapter_model.safetensors")],
                         ids=["full", "lora", "qlora"])  # fmt: skip
def test_axolotl_train_tiny(tiny_default, tmp_path, example, overrides, weights):
    cfg = yaml.safe_load((REPO / "yaml_examples" / example).read_text())
    out = _run(tiny_default, example, tmp_path, use_tensorboard=True, **overrides)
    assert (out / weights).is_file(), sorted(p.name for p in out.iterdir())
    quantization = json.loads((out / "config.json").read_text()).get("quantization_config", {})
    four_bit = quantization.get("load_in_4bit", quantization.get("_load_in_4bit", False))  # key differs by version
    assert four_bit == overrides.get("load_in_4bit", False), quantization

    # ε-DPO's options are declared fields of the training args (the plugin's mixin): the args summary TensorBoard
    # receives (args.to_json_string(), i.e. to_dict()) inside the training process holds them
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0})
    events.Reload()
    summary = json.loads(events.Tensors("args/text_summary")[0].tensor_proto.string_val[0])
    assert (summary["epsilon"], summary["edpo_head"], summary["edpo_head_check"]) == (
        cfg["edpo_epsilon"], cfg["edpo_head"], True)  # fmt: skip

    history = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["log_history"]
    train = [h for h in history if "loss" in h]
    assert [h["step"] for h in train] == list(range(1, STEPS + 1))
    for h in train:
        assert {"kl/beta", "kl/avg_steps", "kl/p_epsilon_steps", "kl/n_epsilon_steps"} <= h.keys()
        assert h["kl/p_epsilon_steps"] + h["kl/n_epsilon_steps"] <= 1.0
        assert h["kl/avg_steps"] == pytest.approx(h["kl/p_epsilon_steps"] - h["kl/n_epsilon_steps"], abs=1e-12)

    # β follows β ← β / (1 + ε·s̄) from the logged s̄, starting at rl_beta, and the final β is saved
    eps, beta0 = cfg["edpo_epsilon"], cfg["rl_beta"]
    want = beta_trajectory64(beta0, eps, [[h["kl/avg_steps"]] for h in train])
    assert [h["kl/beta"] for h in train] == pytest.approx(want[:-1], rel=1e-12)
    final = json.loads((out / "edpo_state.json").read_text())
    assert final == pytest.approx({"beta": want[-1], "epsilon": eps}, rel=1e-12)
    assert any(h["kl/avg_steps"] != 0 for h in train), "the tiny run should move β"

    # ε-DPO's INFO lines reach the console as Axolotl's own do (its logging drops other libraries' INFO records)
    console = (tmp_path / "axolotl.log").read_text()
    head = "[edpo_plugin.trainer.trainer] ε-DPO: log-prob head 'chunked' (edpo_head='auto', float32 on cpu)."
    assert console.count(head) == 1, console[-3000:]
    assert "ε-DPO head check, LlamaForCausalLM (policy)" in console


def _betas(out: Path) -> list[float]:
    history = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["log_history"]
    final = json.loads((out / "edpo_state.json").read_text())["beta"]
    return [h["kl/beta"] for h in history if "kl/beta" in h] + [final]


def test_axolotl_naive_and_chunked_heads_give_the_same_beta_trajectory(tiny_default, tmp_path):
    naive = _betas(_run(tiny_default, "tiny-edpo.yaml", tmp_path / "naive", edpo_head="naive"))
    chunked = _betas(_run(tiny_default, "tiny-edpo.yaml", tmp_path / "chunked", edpo_head="chunked"))
    assert len(naive) == STEPS + 1 and naive[-1] != naive[0]
    assert chunked == pytest.approx(naive, rel=1e-6)


def test_axolotl_train_tiny_moe_with_router_aux_loss(tiny_default, tmp_path):
    """A tiny Mixtral through `axolotl train` with rl: edpo: router_aux_loss_coef from the YAML reaches the trainer
    (args summary), the router auxiliary loss is added and logged every step, and β follows the rule."""
    import torch
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_default["tokenizer"])
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=-(-len(tok) // 8) * 8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=256, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id)  # fmt: skip
    model_dir = tmp_path / "tiny-mixtral"
    MixtralForCausalLM(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = _run(tiny_default, "tiny-edpo.yaml", tmp_path / "run", base_model=model_dir, router_aux_loss_coef=0.05,
               use_tensorboard=True)  # fmt: skip
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"tensors": 0})
    events.Reload()
    summary = json.loads(events.Tensors("args/text_summary")[0].tensor_proto.string_val[0])
    assert summary["router_aux_loss_coef"] == 0.05
    history = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["log_history"]
    train = [h for h in history if "loss" in h]
    assert len(train) == STEPS and all(h["aux_loss"] > 0 for h in train), train
    want = beta_trajectory64(0.1, 0.1, [[h["kl/avg_steps"]] for h in train])
    assert [h["kl/beta"] for h in train] == pytest.approx(want[:-1], rel=1e-12)


def test_axolotl_lora_runs_of_one_config_are_identical(tiny_default, tmp_path):
    """Axolotl's DPO path leaves the LoRA initialisation unseeded; the plugin seeds it with the YAML `seed`, so two
    runs of one LoRA config log the same losses and decisions (they differed before, and a 6-step run could then move
    no β at all)."""

    def history(out: Path) -> list[tuple[float, float]]:
        logs = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["log_history"]
        return [(h["loss"], h["kl/avg_steps"]) for h in logs if "loss" in h]

    first, second = (history(_run(tiny_default, "tiny-edpo-lora.yaml", tmp_path / name)) for name in ("a", "b"))
    assert len(first) == STEPS and first == second


def test_axolotl_padding_free_matches_padded(tiny_default, tmp_path):
    """`dpo_padding_free: true` on the tiny default, rows of varied lengths: the backbones run only the real tokens,
    each pair's prompt once (`edpo_share_prompt: true` stops a run that cannot share it), and the β trajectory, the
    decisions and the losses are the padded run's (the same YAML without the options)."""
    data = write_varied_rows(tiny_default["train"], 64, tmp_path / "varied.jsonl")
    logs = {}
    for padding_free in (False, True):
        options = {"dpo_padding_free": True, "edpo_share_prompt": True} if padding_free else {}
        out = _run(tiny_default, "tiny-edpo.yaml", tmp_path / f"padding_free_{padding_free}", train_file=data,
                   **options)  # fmt: skip
        history = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["log_history"]
        logs[padding_free] = ([h for h in history if "loss" in h], _betas(out))
    (padded, betas_padded), (packed, betas_packed) = logs[False], logs[True]
    assert len(packed) == len(padded) == STEPS
    # packed: one row of the real tokens, each pair's prompt once; padded: the [2B, T] tensor. backbone_tokens is
    # the mean over a step's micro-batches, num_tokens TRL's running count of real (attention-mask) tokens
    example = yaml.safe_load((REPO / "yaml_examples" / "tiny-edpo.yaml").read_text())
    accumulation = example["gradient_accumulation_steps"]
    real_before = 0
    for p, q in zip(padded, packed, strict=True):
        assert q["num_tokens"] == p["num_tokens"]  # the same real tokens
        real = q["num_tokens"] - real_before
        real_before = q["num_tokens"]
        assert q["backbone_tokens"] * accumulation < real <= p["backbone_tokens"] * accumulation, (q, p)
        assert q["kl/avg_steps"] == p["kl/avg_steps"]
    assert betas_padded[-1] != betas_padded[0], "the run should move β"
    assert betas_packed == pytest.approx(betas_padded, rel=1e-6)
    assert [h["loss"] for h in packed] == pytest.approx([h["loss"] for h in padded], rel=1e-5)
