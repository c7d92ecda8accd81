"""Worker for test_vocab_parallel.py (torchrun, gloo, CPU): the head on a tiny Llama loaded with transformers'
``tp_plan="auto"`` against the same model loaded whole.

transformers builds the 1-D CPU device mesh (gloo) itself; ``lm_head.weight`` must come out a ``Shard(0)`` DTensor
(plan ``colwise_gather_output``). The policy and a second copy used as reference run their decoder to the final norm
under TP; ``linear_logprobs`` gets the TP ``lm_head`` weights (DTensors) and routes to the vocab-parallel form. The
yardsticks, computed on every rank from the whole model: the same op on full weights (streams and every
gradient), and the model's own ``log_softmax(logits)`` at the labels for the policy and reference streams. Each rank
writes ``out/rank{r}.pt``.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from edpo_plugin.ops import linear_logprobs

EPS = 0.2
GRADS = (
    "lm_head.weight",
    "model.norm.weight",
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.1.self_attn.o_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
)


def _full(t: torch.Tensor | None) -> torch.Tensor | None:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _streams(policy, ref, ids, labels, coef) -> dict:
    hidden = policy.model(input_ids=ids).last_hidden_state
    with torch.no_grad():
        ref_hidden = ref.model(input_ids=ids).last_hidden_state
    out = linear_logprobs(
        hidden, policy.lm_head.weight, labels, ref_hidden=ref_hidden, ref_weight=ref.lm_head.weight, epsilon=EPS,
        impl="chunked", vocab_chunk=16,
    )  # fmt: skip
    (out.policy * coef).sum().backward()
    params = dict(policy.named_parameters())
    with torch.no_grad():  # the model's own logits (under TP: gathered by lm_head's colwise_gather_output plan)
        own = torch.log_softmax(policy(input_ids=ids).logits.float(), -1)
        own_ref = torch.log_softmax(ref(input_ids=ids).logits.float(), -1)
    valid = labels != -100
    safe = labels.clamp(min=0).unsqueeze(-1)
    return {
        "hidden_is_plain": type(hidden) is torch.Tensor,
        "streams": torch.stack([s.detach() for s in out]),
        "own_policy": torch.where(valid, own.gather(-1, safe).squeeze(-1), 0.0),
        "own_ref": torch.where(valid, own_ref.gather(-1, safe).squeeze(-1), 0.0),
        "grads": {name: _full(params[name].grad) for name in GRADS},
    }


def main(model_dir: str, out_dir: str) -> None:
    tp = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, tp_plan="auto")
    tp_ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, tp_plan="auto").requires_grad_(False)
    rank = dist.get_rank()
    whole = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    whole_ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).requires_grad_(False)
    with torch.no_grad():  # a reference that differs from the policy, the same way in both layouts
        for model in (tp_ref, whole_ref):
            model.model.norm.weight.mul_(1.5)

    g = torch.Generator().manual_seed(0)
    vocab = whole.config.vocab_size
    ids = torch.randint(0, vocab, (2, 12), generator=g)
    labels = torch.cat((ids[:, 1:], torch.full((2, 1), -100)), dim=1)
    labels[0, :3] = -100
    coef = torch.randn(2, 12, generator=g)

    weight = tp.lm_head.weight
    layout = {
        "lm_head_type": type(weight).__name__,
        "lm_head_placements": [str(p) for p in getattr(weight, "placements", ())],
        "lm_head_local_rows": weight.to_local().shape[0] if hasattr(weight, "to_local") else weight.shape[0],
        "vocab": vocab,
        "world": dist.get_world_size(),
    }
    torch.save(
        {
            "layout": layout,
            "tp": _streams(tp, tp_ref, ids, labels, coef),
            "whole": _streams(whole, whole_ref, ids, labels, coef),
            "labels": labels,
        },
        f"{out_dir}/rank{rank}.pt",
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
