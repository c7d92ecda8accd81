"""Worker for test_vocab_parallel.py: a 3-step ε-DPO run of the tiny Llama, loaded with transformers' ``tp_plan="auto"``
under torchrun (2 CPU ranks, gloo; tensor parallel size 2, one data-parallel replica) or whole in one process.

Both runs see the same global batch and data order. Each rank writes ``out/result-rank{r}.json``: the logged loss,
β (before each update), s̄ and grad norm of every optimizer step, the final β, and every parameter's norm after
training (DTensor parameters gathered whole).
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from edpo_plugin.trainer import EpsilonDPOConfig, EpsilonDPOTrainer
from edpo_plugin.trainer.tensor_parallel import refuse_fused_optimizer

BATCH, STEPS = 5, 3


def main(model_dir: str, train_file: str, out_dir: str) -> None:
    torch.manual_seed(0)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    load = dict(dtype=torch.float32, tp_plan="auto") if world > 1 else dict(dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **load)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, **load)
    ds = load_dataset("json", data_files=train_file, split="train").select(range(BATCH * STEPS))
    tok = AutoTokenizer.from_pretrained(model_dir)
    refusal = ""
    if world > 1:
        refusal = _accelerate_refusal(model_dir, ds, tok)
        _let_accelerate_configure_tp_on_cpu()
    args = EpsilonDPOConfig(
        output_dir=out_dir, per_device_train_batch_size=BATCH, max_steps=STEPS, learning_rate=5e-3,
        lr_scheduler_type="constant", logging_steps=1, report_to="none", save_strategy="no", beta=0.1, epsilon=0.2,
        seed=0, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, max_length=64, edpo_head="chunked",
        bf16=False, max_grad_norm=0.5, optim="adamw_torch",
    )  # fmt: skip
    trainer = EpsilonDPOTrainer(model=model, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)
    fused_refusal = ""
    if world > 1:
        try:
            refuse_fused_optimizer(torch.optim.AdamW(trainer.model.parameters(), fused=True))
        except ValueError as err:
            fused_refusal = str(err)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "kl/beta" in h]

    def whole(p: torch.Tensor) -> torch.Tensor:
        return p.full_tensor() if hasattr(p, "full_tensor") else p

    result = {
        "world": world,
        "lm_head_type": type(trainer.model.lm_head.weight).__name__,
        "model_class": type(trainer.model).__name__,
        "accelerate_refusal": refusal,
        "fused_refusal": fused_refusal,
        "betas": [h["kl/beta"] for h in logs],
        "avg_steps": [h["kl/avg_steps"] for h in logs],
        "losses": [h["loss"] for h in logs],
        "grad_norms": [h["grad_norm"] for h in logs],
        "final_beta": trainer.beta_controller.beta,
        "param_norms": {n: whole(p.detach()).double().norm().item() for n, p in trainer.model.named_parameters()},
    }
    rank = dist.get_rank() if dist.is_initialized() else 0
    with open(f"{out_dir}/result-rank{rank}.json", "w") as f:
        json.dump(result, f)


def _accelerate_refusal(model_dir: str, ds, tok) -> str:
    """What a user on CPU ranks gets: our explanation of accelerate's refusal of tensor parallelism."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, tp_plan="auto")
    args = EpsilonDPOConfig(output_dir="unused", report_to="none", use_cpu=True, beta=0.1, epsilon=0.2)
    try:
        EpsilonDPOTrainer(model=model, ref_model=None, args=args, train_dataset=ds, processing_class=tok)
    except ValueError as err:
        return str(err)
    return ""


def _let_accelerate_configure_tp_on_cpu() -> None:
    """Test-only shim: accelerate 1.13 sets up tensor parallelism only when its ranks are GPUs (``multi_device``);
    counting CPU ranks as such lets the rest of the GPU path (no DDP wrapper, TP-aware data loading, the
    trainer's clipping and optimizer) run here."""
    import accelerate
    from accelerate.utils import DistributedType

    accelerate.Accelerator.multi_device = property(lambda self: self.distributed_type == DistributedType.MULTI_CPU)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
