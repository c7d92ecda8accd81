"""Worker for test_yaml_examples.py: validates Axolotl configs with Axolotl's own ``load_cfg``, in a process of its own.

``load_cfg`` exports ACCELERATE_*/FSDP_* variables and fills a process-wide PluginManager, so it runs here rather than
in the pytest process. Usage: ``python axolotl_config_worker.py jobs.json results.json``; ``jobs.json`` is a list of

- ``{"name", "kind": "config", "config": {...}, "world_size": int, "env": {...}}``: write the config as YAML,
  ``load_cfg`` it with the capabilities of a ``world_size``-GPU bf16 machine (this one has no GPU) and ``env`` added
  to the environment, record chosen fields or the error; ``torch.cuda.is_available()`` answers False, as here, on any
  machine (the ε-DPO head's CUDA check);
- ``{"name", "kind": "transform", "config": {...}, "row": {...}, "tokenizer": path}``: run the config's first dataset
  strategy (Axolotl's DPO ``load``) on one row, record prompt/chosen/rejected.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

FIELDS = (
    "rl", "trainer_cls", "rl_beta", "edpo_epsilon", "edpo_head", "attn_implementation", "gradient_checkpointing",
    "bf16", "batch_size", "micro_batch_size", "gradient_accumulation_steps", "num_epochs", "learning_rate",
    "lr_scheduler", "warmup_ratio", "weight_decay", "sequence_len", "adapter", "load_in_4bit", "fsdp_version",
    "model_config_type", "chat_template", "tensor_parallel_size", "dp_shard_size", "optimizer", "dpo_padding_free",
)  # fmt: skip


def _jsonable(value: Any) -> Any:
    if hasattr(value, "value") and not isinstance(value, (int, float, str)):  # enums
        return value.value
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _reset_accelerate() -> None:
    """A ZeRO-3 config sets up accelerate's process-wide state (and Axolotl caches it); the next starts from none."""
    import axolotl.utils.distributed
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
    axolotl.utils.distributed.distributed_state = None


def validate(config: dict, world_size: int, env: dict[str, str]) -> dict:
    import axolotl.cli.config as axolotl_config
    import torch

    torch.cuda.is_available = lambda: False

    def capabilities() -> tuple[dict, dict]:
        gpu = {"bf16": True, "fp8": True, "tf32": True, "n_gpu": world_size, "compute_capability": "sm_90"}
        return gpu, {"torch_version": "2.13.0"}

    saved_env = dict(os.environ)
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ.update(env)
    axolotl_config.gpu_capabilities = capabilities
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        try:
            cfg = axolotl_config.load_cfg(str(path))
        except BaseException as exc:  # noqa: BLE001 - the error is the result
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        finally:
            os.environ.clear()
            os.environ.update(saved_env)
            _reset_accelerate()
    out = {k: _jsonable(cfg.get(k)) for k in FIELDS}
    out["deepspeed_stage"] = (cfg.deepspeed or {}).get("zero_optimization", {}).get("stage")
    out["fsdp_config"] = _jsonable(dict(cfg.fsdp_config)) if cfg.fsdp_config else None
    out["dataset_types"] = [d["type"] for d in cfg.datasets]
    return {"ok": True, "cfg": out}


def transform(config: dict, row: dict, tokenizer_path: str) -> dict:
    from axolotl.prompt_strategies.dpo import load
    from axolotl.utils.dict import DictDefault
    from transformers import AutoTokenizer

    cfg = DictDefault(config)
    strategy = load(cfg.datasets[0]["type"], cfg, dataset_idx=0)
    if strategy is None:
        return {"ok": False, "error": f"Axolotl could not load dataset type {cfg.datasets[0]['type']!r}"}
    transform_fn, _ = strategy
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    return {"ok": True, "sample": transform_fn(row, tokenizer=tokenizer)}


def main(jobs_file: str, results_file: str) -> None:
    os.environ.update(HF_HUB_OFFLINE="1", AXOLOTL_DO_NOT_TRACK="1", WANDB_MODE="disabled")
    results = {}
    for job in json.loads(Path(jobs_file).read_text()):
        if job["kind"] == "config":
            results[job["name"]] = validate(job["config"], job["world_size"], job.get("env", {}))
        else:
            results[job["name"]] = transform(job["config"], job["row"], job["tokenizer"])
    Path(results_file).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
