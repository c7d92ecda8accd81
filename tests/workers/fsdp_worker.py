"""Worker for test_distributed.py: one ε-DPO loss + backward + β update with the policy and reference sharded by FSDP.

accelerate enables FSDP only on GPUs, so on CPU the sharding is applied here the way accelerate and TRL do it:
- ``fsdp2``: ``fully_shard`` on every decoder layer, then on the root (accelerate's FSDP2 path); reference
  ``fully_shard`` on the root (TRL's ``prepare_fsdp``);
- ``fsdp2_head_unit``: the same with lm_head an FSDP2 unit of its own in policy and reference (as size-based wrapping
  or torchtitan-style sharding make it), so its weight is gathered only inside lm_head's forward;
- ``fsdp1``: ``FullyShardedDataParallel`` wrapping each decoder layer and the root (transformer auto-wrap policy,
  ``use_orig_params=True``) for both policy and reference;
- ``fsdp1_head_unit``: the same with every nn.Linear (lm_head included) wrapped on its own, in both models as
  TRL's ``prepare_fsdp`` wraps the reference with the policy's auto-wrap policy.
World 1 runs the same step unsharded. Rank 0 writes the loss, β and full gradients.
Usage: ``torchrun --nproc_per_node=W fsdp_worker.py MODEL_DIR TRAIN_JSONL OUT_DIR LAYOUT``.
"""

from __future__ import annotations

import contextlib
import functools
import sys

import torch
import torch.distributed as dist
from datasets import load_dataset
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel, fully_shard
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from edpo_plugin.trainer import EpsilonDPOConfig, EpsilonDPOTrainer

GLOBAL_BATCH = 4


def main(model_dir: str, train_file: str, out_dir: str, layout: str) -> None:
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    args = EpsilonDPOConfig(
        output_dir=out_dir, per_device_train_batch_size=1, report_to="none", beta=0.1, epsilon=0.2, seed=0,
        use_cpu=True, ddp_backend="gloo", bf16=False, max_length=64, edpo_head="chunked", dataloader_num_workers=0,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ds = load_dataset("json", data_files=train_file, split="train").select(range(GLOBAL_BATCH))
    trainer = EpsilonDPOTrainer(model=model, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)

    gen = torch.Generator().manual_seed(1)  # move the policy off the reference so that decisions are not all 0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    wrapped, full_grads = model, contextlib.nullcontext()
    if world > 1 and layout.startswith("fsdp1"):
        units = {LlamaDecoderLayer}
        if layout == "fsdp1_head_unit":
            units.add(type(model.lm_head))  # every nn.Linear becomes a unit of its own, lm_head included
        policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=units)
        fsdp1 = functools.partial(
            FullyShardedDataParallel, auto_wrap_policy=policy, device_id=torch.device("cpu"), use_orig_params=True
        )
        n_params = sum(p.numel() for p in model.parameters())
        wrapped, trainer.ref_model = fsdp1(model), fsdp1(ref)
        full_grads = FullyShardedDataParallel.summon_full_params(wrapped, writeback=False, with_grads=True)
        assert sum(p.numel() for p in model.parameters()) < n_params, "FSDP1 should hold a shard per rank"
        head_unit = isinstance(model.lm_head, FullyShardedDataParallel)
        assert head_unit == isinstance(ref.lm_head, FullyShardedDataParallel) == (layout == "fsdp1_head_unit")
    elif world > 1:
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        if layout == "fsdp2_head_unit":
            fully_shard(model.lm_head, mesh=mesh)
            fully_shard(ref.lm_head, mesh=mesh)
        fully_shard(model, mesh=mesh)
        fully_shard(ref, mesh=mesh)
        assert type(model.lm_head.weight).__name__ == "DTensor"
        assert isinstance(model.lm_head, FSDPModule) == isinstance(ref.lm_head, FSDPModule) == (layout != "fsdp2")
    per_rank = GLOBAL_BATCH // world
    rows = [trainer.train_dataset[i] for i in range(rank * per_rank, (rank + 1) * per_rank)]
    inputs = trainer._prepare_inputs(trainer.data_collator(rows))

    model.train()
    loss = trainer.compute_loss(wrapped, inputs)
    loss.backward()  # FSDP reduce-scatters the mean gradient over ranks
    logged = trainer.beta_controller.step()  # all-reduces the decisions of every rank's pairs, then moves β

    grads = {}
    with full_grads:
        for name, p in model.named_parameters():
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[name.replace("_fsdp_wrapped_module.", "")] = g.detach().clone()
    losses = [torch.zeros(()) for _ in range(world)]
    if world > 1:
        dist.all_gather(losses, loss.detach())
    else:
        losses = [loss.detach()]
    if rank == 0:
        torch.save(
            {
                "loss": torch.stack(losses).mean(),
                "avg_steps": logged["avg_steps"],
                "beta": trainer.beta_controller.beta,
                "grads": grads,
            },
            f"{out_dir}/result.pt",
        )


if __name__ == "__main__":
    main(*sys.argv[1:])
