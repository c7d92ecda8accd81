"""Bytes each tensor-parallel rank sends per step for ε-DPO's head: gathered logits vs the vocab-parallel head.

Two ways to run the head when ``lm_head`` is sharded over the vocabulary on ``R`` ranks, for ``N`` tokens, hidden
size ``d``, vocabulary ``V``:

- gathered logits (transformers' ``colwise_gather_output`` plan, then any full-logit loss): the policy's and the
  reference's ``[N, V/R]`` logit shards are all-gathered to ``[N, V]`` on every rank. A ring all-gather sends
  ``(R−1)/R · N·V`` elements per rank, per model.
- vocab-parallel (``edpo_plugin.ops.vocab_parallel``): one all-gather of the ``[11, N]`` fp32 statistics; each rank
  sends its ``11·N·4`` bytes to the ``R−1`` others: ``(R−1) · 44·N`` bytes.

Both then sum the ``[N, d]`` hidden-state gradient over the group in backward (one all-reduce in the hidden dtype;
a ring all-reduce sends ``2(R−1)/R · N·d`` elements per rank); it is listed separately, the same for both.
The counts are per rank and per micro-batch of ``N`` tokens (upper bound: the vocab-parallel head drops ignored
positions first, so it gathers statistics of completion tokens only).

    python benchmarks/tp_comm_bytes.py --json benchmarks/results/tp_comm_bytes.json     # table for Llama-3-8B shapes
    torchrun --standalone --nproc-per-node 2 benchmarks/tp_comm_bytes.py --measure out.json   # gloo check, CPU

``--measure`` runs both paths at a small shape on a gloo group and counts the bytes the process writes to its
sockets (``wchar`` of ``/proc/self/io`` around each collective; gloo sends with ``write``), next to the formula.
"""

from __future__ import annotations

import argparse
import json
import sys

LLAMA3_8B = {"vocab": 128256, "hidden": 4096}
STAT_ROWS = 11  # edpo_plugin.ops.vocab_parallel.STAT_ROWS (kept literal: the table needs no torch)


def bytes_per_rank(
    tokens: int, vocab: int, hidden: int, tp: int, logit_bytes: int = 2, grad_bytes: int = 2
) -> dict[str, int]:
    """Bytes one rank sends per step (ring collectives): forward of each path, and the common backward."""
    gathered = 2 * (tp - 1) * tokens * (vocab // tp) * logit_bytes  # policy + reference logits, all-gather
    statistics = (tp - 1) * STAT_ROWS * tokens * 4  # one fp32 all-gather of [11, N]
    hidden_grad = 2 * (tp - 1) * tokens * hidden * grad_bytes // tp  # one all-reduce of [N, d]
    return {
        "gathered_logits_forward": gathered,
        "vocab_parallel_forward": statistics,
        "hidden_grad_backward": hidden_grad,
    }


def table(tokens: int, vocab: int, hidden: int, tps: list[int]) -> list[dict]:
    return [{"tp": tp, "tokens": tokens, "vocab": vocab, "hidden": hidden, **bytes_per_rank(tokens, vocab, hidden, tp)}
            for tp in tps]  # fmt: skip


def _fmt(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def print_table(rows: list[dict]) -> None:
    print("| TP | gathered logits, forward | vocab-parallel, forward | ratio | hidden-grad all-reduce (both) |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        ratio = r["gathered_logits_forward"] / r["vocab_parallel_forward"]
        print(
            f"| {r['tp']} | {_fmt(r['gathered_logits_forward'])} | {_fmt(r['vocab_parallel_forward'])} | "
            f"{ratio:,.0f}× | {_fmt(r['hidden_grad_backward'])} |"
        )


# ----------------------------------------------------------------------------------------------------------- gloo
def _wchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no wchar line")


def measure(tokens: int, vocab: int, hidden: int) -> dict:
    """Under torchrun (gloo): bytes this rank writes to its sockets for each path's collectives, fp32 throughout."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    from edpo_plugin.ops import linear_logprobs

    dist.init_process_group("gloo")
    tp = dist.get_world_size()
    mesh = init_device_mesh("cpu", (tp,))
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g)
    w_full = torch.randn(vocab, hidden, generator=g)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    w = distribute_tensor(w_full, mesh, [Shard(0)])

    # gathered logits: each model's local logit shard, redistributed Shard(-1) -> Replicate (colwise_gather_output)
    dist.barrier()
    before = _wchar()
    for weight in (w, w):  # policy and reference (same shapes)
        local = h @ weight.to_local().t()
        DTensor.from_local(local, mesh, [Shard(-1)], run_check=False).redistribute(mesh, [Replicate()]).to_local()
    gathered = _wchar() - before

    hidden_in = h.clone().requires_grad_()
    dist.barrier()
    before = _wchar()
    out = linear_logprobs(hidden_in, w, labels, ref_hidden=h, ref_weight=w, epsilon=0.1, impl="chunked")
    forward = _wchar() - before
    loss = out.policy.sum()
    dist.barrier()
    before = _wchar()
    loss.backward()
    backward = _wchar() - before

    expected = bytes_per_rank(tokens, vocab, hidden, tp, logit_bytes=4, grad_bytes=4)
    measured = {
        "gathered_logits_forward": gathered,
        "vocab_parallel_forward": forward,
        "hidden_grad_backward": backward,
    }
    result = {"rank": dist.get_rank(), "tp": tp, "tokens": tokens, "vocab": vocab, "hidden": hidden,
              "measured": measured, "formula": expected}  # fmt: skip
    dist.destroy_process_group()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=LLAMA3_8B["vocab"])
    parser.add_argument("--hidden", type=int, default=LLAMA3_8B["hidden"])
    parser.add_argument("--tp", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--json", help="write the table (or, with --measure, rank 0's measurement) here")
    parser.add_argument("--measure", action="store_true", help="gloo measurement under torchrun at a small shape")
    args = parser.parse_args()
    if args.measure:
        tokens, vocab, hidden = (256, 1000, 64) if args.tokens == 8192 else (args.tokens, args.vocab, args.hidden)
        result = measure(tokens, vocab, hidden)
        print(json.dumps(result))
        if args.json and result["rank"] == 0:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        return
    rows = table(args.tokens, args.vocab, args.hidden, args.tp)
    print(f"N = {args.tokens} tokens, V = {args.vocab}, d = {args.hidden}; bf16 logits and hidden gradient")
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": {"tokens": args.tokens, "vocab": args.vocab, "hidden": args.hidden}, "rows": rows}, f,
                      indent=2)  # fmt: skip
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
