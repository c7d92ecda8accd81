"""Modelled time of one ε-DPO LoRA step at 8B (Llama-3-8B-Instruct, the 8B YAMLs' settings) on H100 and A100, for
the padded, packed and shared-prompt layouts of the HH harmless pairs: no GPU involved, every number **modelled**.

Each micro-batch (``--pairs`` pairs, taken in the order ``benchmarks/results/padding_ratio_hh_512.json`` lists them:
random, seed 0, every pair that fits in 512 tokens with SmolLM2's chat template — a stand-in for Llama-3's) is modelled
kernel by kernel with :mod:`edpo_plugin.ops.cost_model`'s per-kernel model (``max(flops / (eff · peak), bytes / (0.85 ·
BW))`` + a launch each; its GEMM efficiencies, GPUs and launch cost):

- **backbone GEMMs** on the positions each layout runs (padded: ``2B × T``; packed: the real tokens; shared: the
  real tokens less each pair's common prefix): per layer q, k, v, o, gate, up, down, and LoRA's two r-16 GEMMs on
  each; the policy runs forward, again in backward (gradient checkpointing, as the YAMLs set it) and backward (input
  gradients through the frozen weights, LoRA's weight gradients), the reference (adapters off) forward once;
- **attention**: FlashAttention-2 varlen on each sequence's causal (query, key) pairs — the padded layout too
  (transformers' FlashAttention-2 path unpads a padded batch) — ``4 · H · d_head`` flops per pair forward, 2.5× that
  backward, at :data:`FLASH_EFFICIENCY` of the tensor-core peak;
- **elementwise** (RMSNorms, RoPE, residual adds, SiLU · up, LoRA adds): bf16 bytes per position, memory-bound;
- **the head**: the planner's own plan for a frozen head (LoRA) on that micro-batch's completion tokens, its
  kernels summed by the same model (``dispatch.best_plan``, ``launches.launches``).

    python benchmarks/step_model.py --json benchmarks/results/step_model.json
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch

from edpo_plugin.ops.cost_model import GPUS, LAUNCH_S, SYNC_S, Kernel, plan_seconds
from edpo_plugin.ops.dispatch import best_plan
from edpo_plugin.ops.launches import launches
from edpo_plugin.ops.plan import DEFAULT_WORKSPACE_MB, HeadShape

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Backbone:
    """Llama-3-8B (``meta-llama/Meta-Llama-3-8B-Instruct``'s config)."""

    layers: int = 32
    dim: int = 4096
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    ffn: int = 14336
    vocab: int = 128256
    lora_rank: int = 16  # lora_r of the 8B LoRA YAMLs, on every linear layer (lora_target_linear)

    def linears(self) -> list[tuple[str, int, int]]:
        """``(name, in, out)`` of one decoder layer's linear layers."""
        d, kv = self.dim, self.kv_heads * self.head_dim
        return [("q", d, d), ("k", d, kv), ("v", d, kv), ("o", d, d), ("gate", d, self.ffn), ("up", d, self.ffn),
                ("down", self.ffn, d)]  # fmt: skip


# FlashAttention-2's achieved fraction of the dense bf16 peak, head dim 128, causal, long sequences: forward /
# backward. A100: FlashAttention-2 paper (Dao, 2023), forward up to 73 %, backward up to 63 %; H100: FlashAttention-2
# as measured in the FlashAttention-3 paper (Shah et al., 2024), about 350 of 989 TF/s forward. Assumed, not measured
# here.
FLASH_EFFICIENCY = {"H100": (0.35, 0.30), "A100": (0.70, 0.60)}
# bf16 tensors of width d / ffn read or written per position and layer in a forward (two RMSNorms, RoPE on q and k,
# two residual adds, SiLU · up), over that many launches; a backward moves twice the bytes in twice the launches
ELEMENTWISE_PASSES = {"dim": 14, "ffn": 3, "launches": 8}


def _gemm(phase: str, name: str, m: int, k: int, n: int, count: int = 1, accumulate: bool = False) -> Kernel:
    """bf16 ``[m, k] · [k, n]`` with a bf16 output (fp32 accumulation when ``accumulate``)."""
    out = 4 if accumulate else 2
    return Kernel(phase, name, "gemm", flops=2 * m * n * k, bytes=2 * (m * k + k * n) + m * n * out * (2 if accumulate
                  else 1), c_read=m * n * out if accumulate else 0, tensor_cores=True, count=count)  # fmt: skip


def backbone_kernels(model: Backbone, positions: int, lora: bool, backward: bool) -> list[Kernel]:
    """One forward (and, if ``backward``, its input-gradient backward) of the decoder stack on ``positions`` tokens."""
    phase = "backward" if backward else "forward"
    kernels = []
    for name, d_in, d_out in model.linears():
        kernels.append(_gemm(phase, name, positions, d_in if not backward else d_out, d_out if not backward else d_in,
                             model.layers))  # fmt: skip
        if lora:  # x·A (r) then ·B, scaled and added; backward: the input gradient and both weight gradients
            r = model.lora_rank
            kernels.append(_gemm(phase, f"{name} lora A", positions, d_in, r, model.layers))
            kernels.append(_gemm(phase, f"{name} lora B", positions, r, d_out, model.layers))
            if backward:
                kernels.append(_gemm(phase, f"{name} lora dA", d_in, positions, r, model.layers))
                kernels.append(_gemm(phase, f"{name} lora dB", r, positions, d_out, model.layers))
            kernels.append(Kernel(phase, f"{name} lora add", "torch", bytes=3 * 2 * positions * d_out,
                                  count=model.layers))  # fmt: skip
    passes = ELEMENTWISE_PASSES["dim"] * model.dim + ELEMENTWISE_PASSES["ffn"] * model.ffn
    launches_per_layer = ELEMENTWISE_PASSES["launches"] * (2 if backward else 1)
    kernels.append(Kernel(phase, "norms, rope, residuals, silu·up", "torch",
                          bytes=2 * positions * passes * (2 if backward else 1) // launches_per_layer,
                          count=launches_per_layer * model.layers))  # fmt: skip
    return kernels


def attention_seconds(model: Backbone, score_pairs: int, gpu: str, backward: bool) -> float:
    """FlashAttention-2 over ``score_pairs`` causal (query, key) pairs, all layers."""
    flops = 4 * model.heads * model.head_dim * score_pairs * model.layers * (2.5 if backward else 1.0)
    efficiency = FLASH_EFFICIENCY[gpu][1 if backward else 0]
    return flops / (efficiency * GPUS[gpu].tc_flops) + model.layers * LAUNCH_S


def layouts(batch: list[list[int]]) -> dict[str, dict[str, int]]:
    """Positions the backbone runs, causal score pairs and completion tokens of one micro-batch of ``(prefix,
    chosen, rejected)`` lengths, per layout."""
    lengths = [c for _, c, _ in batch] + [r for _, _, r in batch]
    causal = sum(n * (n + 1) // 2 for n in lengths)
    # shared: a rejected sequence keeps its tokens after the prefix P; its queries see P keys and themselves causally
    shared_scores = sum(c * (c + 1) // 2 + (r - p) * p + (r - p) * (r - p + 1) // 2 for p, c, r in batch)
    # completions: tokens after each pair's common prefix (the prompt and a little more); the head's labels
    completion = sum((c - p) + (r - p) for p, c, r in batch)
    return {
        "padded": {"positions": len(lengths) * max(lengths), "scores": causal, "labels": completion},
        "packed": {"positions": sum(lengths), "scores": causal, "labels": completion},
        "shared": {
            "positions": sum(lengths) - sum(p for p, _, _ in batch),
            "scores": shared_scores,
            "labels": completion,
        },  # fmt: skip
    }


def step_seconds(model: Backbone, layout: dict[str, int], gpu: str, packed: bool) -> dict[str, float]:
    n = layout["positions"]
    g = GPUS[gpu]
    policy = backbone_kernels(model, n, lora=True, backward=False)
    parts = {
        # forward, recomputed in backward (gradient checkpointing), and the input-gradient backward
        "policy GEMMs + elementwise": 2 * plan_seconds(policy, g)
        + plan_seconds(backbone_kernels(model, n, lora=True, backward=True), g),
        "reference GEMMs + elementwise": plan_seconds(backbone_kernels(model, n, lora=False, backward=False), g),
        "attention": 3 * attention_seconds(model, layout["scores"], gpu, False)
        + attention_seconds(model, layout["scores"], gpu, True),
    }
    shape = HeadShape(tokens=layout["labels"], valid=layout["labels"], dim=model.dim, vocab=model.vocab,
                      dtype=torch.bfloat16, head="frozen")  # fmt: skip
    head_plan = best_plan(shape, ("triton",), g, DEFAULT_WORKSPACE_MB << 20)
    parts["head (planner)"] = plan_seconds(launches(head_plan, shape), g)
    parts["packing (one host sync)"] = SYNC_S if packed else 0.0
    parts["total"] = sum(parts.values())
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default=str(REPO / "benchmarks" / "results" / "padding_ratio_hh_512.json"))
    parser.add_argument("--pairs", type=int, default=4, help="pairs per micro-batch")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    pairs = json.loads(Path(args.lengths).read_text())["data"]["pair_lengths"]
    batches = [pairs[i : i + args.pairs] for i in range(0, len(pairs) - args.pairs + 1, args.pairs)]
    model = Backbone()
    result = {"meta": {"date": date.today().isoformat(), "model": "modelled (per-kernel, edpo_plugin.ops.cost_model)",
                       "command": "python benchmarks/step_model.py" + (f" --json {args.json}" if args.json else ""),
                       "lengths": str(Path(args.lengths).relative_to(REPO)), "pairs_per_micro_batch": args.pairs,
                       "micro_batches": len(batches), "backbone": "Llama-3-8B, LoRA r 16 on every linear layer, "
                       "bf16, gradient checkpointing, FlashAttention-2"}}  # fmt: skip
    for gpu in GPUS:
        totals: dict[str, dict[str, float]] = {}
        positions = {"padded": 0, "packed": 0, "shared": 0}
        for batch in batches:
            per = layouts(batch)
            for name, layout in per.items():
                positions[name] += layout["positions"]
                for part, seconds in step_seconds(model, layout, gpu, packed=name != "padded").items():
                    totals.setdefault(name, {}).setdefault(part, 0.0)
                    totals[name][part] += seconds
        per_batch = {
            name: {part: s / len(batches) * 1e3 for part, s in parts.items()} for name, parts in totals.items()
        }
        result[gpu] = {
            "ms_per_micro_batch": per_batch,
            "over_padded": {name: per_batch[name]["total"] / per_batch["padded"]["total"] for name in per_batch},
            "positions_over_padded": {name: positions[name] / positions["padded"] for name in positions},
        }
        print(f"{gpu} (modelled), {args.pairs} pairs per micro-batch, mean over {len(batches)} micro-batches")
        parts = list(per_batch["padded"])
        print(f"{'ms':28s}" + "".join(f"{name:>10s}" for name in per_batch))
        for part in parts:
            print(f"{part:28s}" + "".join(f"{per_batch[name][part]:10.2f}" for name in per_batch))
        print(f"{'total / padded':28s}" + "".join(f"{result[gpu]['over_padded'][name]:10.3f}" for name in per_batch))
        print(f"{'positions / padded':28s}"
              + "".join(f"{result[gpu]['positions_over_padded'][name]:10.3f}" for name in per_batch))  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
