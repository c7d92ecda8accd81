"""Every 7-8B example YAML passes Axolotl's own config validation, with the base model swapped for a local tiny model
of the same architecture (no download), and holds the paper's settings; bad ε-DPO settings fail naming the field."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parents[1] / "workers" / "axolotl_config_worker.py"
EXAMPLES = ROOT / "yaml_examples"
MODELS = {"llama3-8b-instruct": "llama", "mistral-7b-instruct-v0.2": "mistral"}
VARIANTS = ("lora", "qlora", "full-zero3", "full-fsdp")
GPUS = {"lora": 1, "qlora": 1, "full-zero3": 8, "full-fsdp": 8, "full-tp": 8}
DECODER_LAYER = {"llama": "LlamaDecoderLayer", "mistral": "MistralDecoderLayer"}
EXAMPLE_NAMES = [f"{m}-edpo-{v}" for m in MODELS for v in VARIANTS] + [
    "llama3-8b-instruct-edpo-full-tp",
    "llama3-8b-instruct-edpo-lora-padding-free",
]
PADDING_FREE = "-padding-free"  # an example name's suffix: the same variant with dpo_padding_free: true
TRAINER_CLS = "edpo_plugin.axolotl.trainer.AxolotlEpsilonDPOTrainer"

# A row shaped like princeton-nlp/{llama3,mistral-instruct}-ultrafeedback (the examples' datasets).
ULTRAFEEDBACK_ROW = {
    "prompt_id": "0",
    "prompt": "Count up from 7 :",
    "chosen": [{"role": "user", "content": "Count up from 7 :"}, {"role": "assistant", "content": "8 9 10"}],
    "rejected": [{"role": "user", "content": "Count up from 7 :"}, {"role": "assistant", "content": "3 1 4"}],
}

# (name, change to the Llama LoRA example, None leaving a key out; text the error must contain)
BAD_CONFIGS = [
    ("epsilon_ge_1", {"edpo_epsilon": 1.0}, "edpo_epsilon"),
    ("epsilon_zero", {"edpo_epsilon": 0.0}, "edpo_epsilon"),
    ("beta_zero", {"rl_beta": 0.0}, "rl_beta"),
    ("head_unknown", {"edpo_head": "cuda"}, "edpo_head"),
    ("loss_ipo", {"dpo_loss_type": ["ipo"]}, "dpo_loss_type"),
    ("precompute_ref", {"precompute_ref_log_probs": True}, "precompute_ref_log_probs"),
    ("liger_dpo", {"dpo_use_liger_kernel": True}, "dpo_use_liger_kernel"),
    ("context_parallel", {"context_parallel_size": 2}, "context_parallel_size: 2 is not supported by rl: edpo"),
    ("no_plugin", {"plugins": None}, "rl"),
    ("share_prompt_padded", {"edpo_share_prompt": True}, "edpo_share_prompt: true shares prompts inside packed rows"),
    # a typo would train at the default ε; with the plugin listed it is refused, for rl: edpo and for any other rl
    ("typo", {"edpo_epsion": 0.1}, "edpo_epsion is not an ε-DPO option: did you mean edpo_epsilon?"),
    ("typo_rl_dpo", {"rl": "dpo", "edpo_epsilon": None, "edpo_head": None, "edpo_epsion": 0.1},
     "edpo_epsion is not an ε-DPO option: did you mean edpo_epsilon?"),
    ("typo_dash", {"edpo-head": "naive"}, "did you mean edpo_head?"),
    ("trainer_name", {"epsilon": 0.1}, "in an Axolotl config ε-DPO's option is edpo_epsilon"),
    # rl: dpo would train plain DPO, the ε-DPO fields doing nothing
    ("edpo_fields_rl_dpo", {"rl": "dpo"}, "edpo_epsilon, edpo_head act only with rl: edpo; this config has rl: dpo"),
    # no CUDA here (the worker says so on any machine) and no TRITON_INTERPRET: it would fail at the first step
    ("triton_without_cuda", {"edpo_head": "triton"}, "edpo_head: triton needs a CUDA GPU"),
]  # fmt: skip
# (name, change to the Llama LoRA example, environment): configs that must validate
ACCEPTED_CONFIGS = [
    ("plugin_with_plain_dpo", {"rl": "dpo", "edpo_epsilon": None, "edpo_head": None}, {}),
    ("triton_under_interpreter", {"edpo_head": "triton"}, {"TRITON_INTERPRET": "1"}),
    ("triton_merge_lora", {"edpo_head": "triton", "merge_lora": True}, {}),  # `axolotl merge-lora` sets merge_lora
    ("triton_preprocess", {"edpo_head": "triton", "is_preprocess": True}, {}),  # `axolotl preprocess`
    ("inference", {"inference": True, "rl": None}, {}),  # `axolotl inference` sets inference, and rl to None
]


def _variant(name: str) -> str:
    """``lora``, ``full-zero3``, …: what follows ``-edpo-`` in an example's name, without the padding-free suffix."""
    return name.rsplit("-edpo-")[1].removesuffix(PADDING_FREE)


def _example(name: str) -> dict:
    return yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())


def _tiny_mistral(out_dir: Path) -> Path:
    """A 2-layer MistralForCausalLM with the v0.2 layout (no sliding window, rope θ 1e6), saved locally."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=136, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, sliding_window=None, rope_theta=1e6,
    )  # fmt: skip
    MistralForCausalLM(config).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def validated(tiny_default, tmp_path_factory) -> dict:
    """Runs the worker once over every example, every bad config and the dataset transform; returns its results."""
    tmp = tmp_path_factory.mktemp("yaml_examples")
    base_models = {"llama": str(tiny_default["model"]), "mistral": str(_tiny_mistral(tmp / "tiny-mistral"))}
    jobs = []
    for name in EXAMPLE_NAMES:
        config = _example(name)
        arch = next(a for prefix, a in MODELS.items() if name.startswith(prefix))
        config["base_model"] = base_models[arch]
        config["output_dir"] = str(tmp / name)
        jobs.append({"name": name, "kind": "config", "config": config, "world_size": GPUS[_variant(name)]})
    for name, change, env in [(n, c, {}) for n, c, _ in BAD_CONFIGS] + ACCEPTED_CONFIGS:
        config = _example("llama3-8b-instruct-edpo-lora")
        config.update({"base_model": base_models["llama"], "output_dir": str(tmp / name)}, **change)
        for key in [k for k, v in change.items() if v is None]:  # None: the key is left out
            del config[key]
        jobs.append({"name": name, "kind": "config", "config": config, "world_size": 1, "env": env})
    jobs.append({
        "name": "transform", "kind": "transform", "config": _example("llama3-8b-instruct-edpo-lora"),
        "row": copy.deepcopy(ULTRAFEEDBACK_ROW), "tokenizer": str(tiny_default["tokenizer"]),
    })  # fmt: skip
    jobs_file, results_file = tmp / "jobs.json", tmp / "results.json"
    jobs_file.write_text(json.dumps(jobs))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("TRITON_INTERPRET", None)  # a user's machine: the jobs that need it set it
    done = subprocess.run(
        [sys.executable, str(WORKER), str(jobs_file), str(results_file)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(results_file.read_text())


def test_every_example_yaml_is_checked():
    # tiny-* and smollm2-* are the CPU examples, run for real by test_axolotl_train.py / test_real_model.py
    on_disk = {p.stem for p in EXAMPLES.glob("*.yaml") if not p.stem.startswith(("tiny-", "smollm2-"))}
    assert on_disk == set(EXAMPLE_NAMES)


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_example_validates_with_paper_settings(validated, name):
    result = validated[name]
    assert result["ok"], result.get("error")
    cfg = result["cfg"]
    arch = next(a for prefix, a in MODELS.items() if name.startswith(prefix))
    variant = _variant(name)
    # rl: edpo became Axolotl's DPO pipeline with the ε-DPO trainer, with the paper's β and ε
    assert (cfg["rl"], cfg["trainer_cls"]) == ("dpo", TRAINER_CLS)
    assert (cfg["rl_beta"], cfg["edpo_epsilon"], cfg["edpo_head"]) == (0.01, 0.01, "auto")
    assert cfg["model_config_type"] == arch
    # paper: 1 epoch, global batch 128, cosine, warm-up 0.1, no weight decay, 2048 tokens; bf16, FA2, checkpointing
    replicas = GPUS[variant] // (cfg["tensor_parallel_size"] or 1)  # data-parallel replicas
    assert cfg["batch_size"] == 128 == cfg["micro_batch_size"] * cfg["gradient_accumulation_steps"] * replicas
    assert (cfg["num_epochs"], cfg["lr_scheduler"], cfg["warmup_ratio"], cfg["weight_decay"]) == (1, "cosine", 0.1, 0)
    assert cfg["sequence_len"] == 2048
    assert (cfg["bf16"], cfg["attn_implementation"], cfg["gradient_checkpointing"]) == (True, "flash_attention_2", True)
    assert cfg["dataset_types"] == ["chat_template.argilla_chat"]
    # dpo_padding_free reaches Axolotl's config (its DPO builder passes it on as the training args' padding_free)
    assert bool(cfg["dpo_padding_free"]) == name.endswith(PADDING_FREE)
    # FlashAttention-2 padding-free shares prompts unless edpo_share_prompt says otherwise: none of the examples does
    assert cfg.get("edpo_share_prompt") is None
    assert cfg["chat_template"] == "tokenizer_default"
    if variant.startswith("full"):
        assert math.isclose(cfg["learning_rate"], 5e-7)
        assert cfg["adapter"] is None
    else:
        assert cfg["adapter"] == variant
        assert bool(cfg["load_in_4bit"]) == (variant == "qlora")
    assert cfg["deepspeed_stage"] == (3 if variant == "full-zero3" else None)
    if variant == "full-tp":  # TP 2 × FSDP2 4 on 8 GPUs; the plain AdamW (DTensor and plain parameters mixed)
        assert (cfg["tensor_parallel_size"], cfg["dp_shard_size"], cfg["optimizer"]) == (2, 4, "adamw_torch")
        assert 128256 % cfg["tensor_parallel_size"] == 0  # Llama-3's vocabulary splits evenly (colwise_gather_output)
    else:
        assert cfg["tensor_parallel_size"] == 1
    if variant in ("full-fsdp", "full-tp"):
        assert cfg["fsdp_version"] == 2
        layer = cfg["fsdp_config"]["transformer_layer_cls_to_wrap"]
        assert layer == DECODER_LAYER[arch]
        module = __import__(f"transformers.models.{arch}.modeling_{arch}", fromlist=[layer])
        assert hasattr(module, layer)
    else:
        assert cfg["fsdp_version"] is None and cfg["fsdp_config"] is None


@pytest.mark.parametrize(("name", "field"), [(n, f) for n, _, f in BAD_CONFIGS])
def test_bad_setting_fails_naming_the_field(validated, name, field):
    result = validated[name]
    assert not result["ok"], f"{name} was accepted"
    assert field in result["error"], result["error"]


def test_triton_without_cuda_names_the_cpu_choices(validated):
    error = validated["triton_without_cuda"]["error"]
    assert all(choice in error for choice in ("'auto'", "'chunked'", "'naive'", "TRITON_INTERPRET=1")), error


@pytest.mark.parametrize("name", [n for n, _, _ in ACCEPTED_CONFIGS])
def test_accepted_config_validates(validated, name):
    """The plugin listed with plain DPO and no ε-DPO field; the Triton head under Triton's CPU interpreter; and the
    commands that load the config without training here (merge-lora, preprocess, inference)."""
    result = validated[name]
    assert result["ok"], result.get("error")
    if name == "plugin_with_plain_dpo":
        assert (result["cfg"]["rl"], result["cfg"]["trainer_cls"]) == ("dpo", None)
    elif name.startswith("triton"):
        assert (result["cfg"]["trainer_cls"], result["cfg"]["edpo_head"]) == (TRAINER_CLS, "triton")


def test_rl_edpo_without_plugin_is_an_enum_error(validated):
    """Without the plugins line no hook runs before Axolotl's enum check: its own error names rl and 'edpo'."""
    error = validated["no_plugin"]["error"]
    assert re.search(r"^rl$", error, flags=re.MULTILINE), error
    assert "input_value='edpo'" in error


def test_example_dataset_type_reads_ultrafeedback_rows(validated):
    """The examples' dataset type turns a prompt / chosen / rejected message-list row into DPO text fields."""
    result = validated["transform"]
    assert result["ok"], result.get("error")
    sample = result["sample"]
    # the tiny tokenizer's template is ChatML; with the real models it is their own (chat_template: tokenizer_default)
    assert sample["prompt"] == "<|im_start|>user\nCount up from 7 :<|im_end|>\n<|im_start|>assistant\n"
    assert sample["chosen"] == "8 9 10<|im_end|>"
    assert sample["rejected"] == "3 1 4<|im_end|>"
