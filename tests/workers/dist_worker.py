"""Worker for test_distributed.py: one ε-DPO run with a fixed global batch, launched by torchrun on CPU (gloo).

``engine`` is ``ddp`` (the Trainer's DistributedDataParallel) or ``zero3`` (DeepSpeed ZeRO-3 with every parameter
partitioned, lm_head included, so the fused head must run on a gathered weight). DeepSpeed (0.18) also gathers a
partitioned parameter when it is read as a module attribute inside any forward, so this run checks the head's result
and gradients under ZeRO-3, not that running it as lm_head's forward is what gathers the weight (the FSDP2 test with
lm_head as its own unit does check that).
"""

from __future__ import annotations

import contextlib
import json
import sys

import torch
import torch.distributed as dist
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from edpo_plugin.trainer import EpsilonDPOConfig, EpsilonDPOTrainer

GLOBAL_BATCH, STEPS = 4, 4

ZERO3 = {
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},  # partition every parameter
    "bf16": {"enabled": False},
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
}


def main(model_dir: str, train_file: str, out_dir: str, world: int, engine: str) -> None:
    padding_free = engine.endswith("+padding_free")  # e.g. "ddp+padding_free": the same run with padding_free=True
    engine = engine.removesuffix("+padding_free")
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    args = EpsilonDPOConfig(
        output_dir=out_dir, per_device_train_batch_size=GLOBAL_BATCH // world, max_steps=STEPS, learning_rate=5e-3,
        lr_scheduler_type="constant", logging_steps=1, report_to="none", save_strategy="no", beta=0.1, epsilon=0.2,
        seed=0, use_cpu=True, ddp_backend="gloo" if world > 1 else None, dataloader_num_workers=0, disable_tqdm=True,
        max_length=64, edpo_head="chunked", bf16=False, deepspeed=ZERO3 if engine == "zero3" else None,
        padding_free=padding_free,
    )  # fmt: skip
    if engine == "zero3":
        import deepspeed

        # accelerate leaves DeepSpeed's own communicator unset on CPU; zero.Init (model loading) needs it.
        deepspeed.init_distributed(dist_backend="gloo")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ds = load_dataset("json", data_files=train_file, split="train").select(range(GLOBAL_BATCH * STEPS))
    trainer = EpsilonDPOTrainer(model=model, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)
    if engine == "zero3":
        assert trainer.model.lm_head.weight.numel() == 0, "ZeRO-3 should have partitioned lm_head"
    trainer.train()
    rank = dist.get_rank() if dist.is_initialized() else 0
    logs = [h for h in trainer.state.log_history if "kl/beta" in h]

    def gathered(p: torch.nn.Parameter):
        if engine != "zero3":
            return contextlib.nullcontext()
        import deepspeed

        # One parameter per gather: DeepSpeed's coalesced gather of several waits only on the last gloo handle, and on
        # CPU an earlier one can still be in flight (seen once: a norm of 5e17 from uninitialised memory).
        return deepspeed.zero.GatheredParameters([p])

    norms = {}
    for name, p in trainer.model.named_parameters():
        with gathered(p):
            norms[name] = p.detach().double().norm().item()
    result = {
        "world": world,
        "rank": rank,
        "betas": [h["kl/beta"] for h in logs],
        "avg_steps": [h["kl/avg_steps"] for h in logs],
        "losses": [h["loss"] for h in logs],
        "final_beta": trainer.beta_controller.beta,
        "param_norms": norms,
    }
    with open(f"{out_dir}/result-rank{rank}.json", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
