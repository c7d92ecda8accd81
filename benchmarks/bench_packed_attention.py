"""SDPA on a packed row, two ways, on CPU: one SDPA call per packed sequence (``edpo_packed_sdpa``, what the package
runs) against one SDPA call over the whole row with a ``[N, N]`` block mask built once per micro-batch from the same
layout (the alternative issue 24 names). Forward + backward of a SmolLM2-135M-wide Llama stack (random weights,
``--layers`` layers) on one micro-batch of ``--pairs`` HH-like pairs with shared prompts (lengths drawn around the HH
harmless medians at 512 tokens: ``benchmarks/hh_like.py``).

    python benchmarks/bench_packed_attention.py --json benchmarks/results/bench_packed_attention_cpu.json

Prints a table (median of ``--repeats`` timed runs after one warm-up, both ways interleaved) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date

import torch
from hh_like import hh_like_batch
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from edpo_plugin.trainer.packed_attention import LAYOUT_KWARG, PACKED_SDPA, PackedLayout, use_packed_attention
from edpo_plugin.trainer.packing import pack_rows

ONE_MASKED_CALL = "bench_one_masked_sdpa"


def _block_mask(layout: PackedLayout, n: int) -> torch.Tensor:
    """bool ``[1, 1, N, N]``: each sequence's queries see its prefix's keys and its own, causally."""
    mask = torch.zeros(n, n, dtype=torch.bool)
    for s in layout.segments:
        rows = slice(s.start, s.start + s.length)
        own = torch.ones(s.length, s.length, dtype=torch.bool).tril_()
        mask[rows, s.start : s.start + s.length] = own
        if s.prefix_length:
            mask[rows, s.prefix_start : s.prefix_start + s.prefix_length] = True
    return mask[None, None]


def one_masked_sdpa(module, query, key, value, attention_mask, **kwargs):
    layout = kwargs.pop(LAYOUT_KWARG)
    if not hasattr(layout, "bench_mask"):
        layout.bench_mask = _block_mask(layout, query.shape[2])  # once per micro-batch, on the host
    return sdpa_attention_forward(module, query, key, value, layout.bench_mask, **kwargs)


AttentionInterface.register(ONE_MASKED_CALL, one_masked_sdpa)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048)  # fmt: skip
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).float()
    use_packed_attention(model)
    ids, mask = hh_like_batch(args.pairs, config.vocab_size)
    packed = pack_rows(ids, mask, share_prefixes=True)

    def step(attention: str) -> float:
        model.config._attn_implementation = attention
        kwargs = packed.model_kwargs()
        kwargs[LAYOUT_KWARG] = PackedLayout.from_segments(packed.layout.segments, ids.device)  # a fresh layout
        start = time.perf_counter()
        hidden = model.model(**kwargs, use_cache=False).last_hidden_state
        hidden.square().mean().backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    ways = {"per_sequence": PACKED_SDPA, "one_masked_call": ONE_MASKED_CALL}
    times = {name: [] for name in ways}
    for attention in ways.values():
        step(attention)  # warm-up
    for _ in range(args.repeats):
        for name, attention in ways.items():
            times[name].append(step(attention))
    medians = {name: statistics.median(t) for name, t in times.items()}
    n = packed.input_ids.shape[1]
    scores = {
        "per_sequence": sum(s.length * (s.prefix_length + s.length) for s in packed.layout.segments),
        "one_masked_call": n * n,
    }
    print(f"packed row: {n} tokens, {len(packed.layout.segments)} sequences, {args.layers} layers, CPU")
    print(f"{'way':18s} {'median s':>10s} {'ratio':>8s} {'scores':>10s}")
    for name in ways:
        print(f"{name:18s} {medians[name]:10.3f} {medians[name] / medians['per_sequence']:8.3f} {scores[name]:10d}")
    result = {
        "meta": {
            "date": date.today().isoformat(),
            "machine": platform.platform(),
            "command": "python benchmarks/bench_packed_attention.py" + (f" --json {args.json}" if args.json else ""),
            "torch": torch.__version__,
            "pairs": args.pairs,
            "layers": args.layers,
            "repeats": args.repeats,
            "packed_tokens": n,
            "sequences": len(packed.layout.segments),
        },  # fmt: skip
        "median_s": medians,
        "times_s": times,
        "attention_scores": scores,
        "one_masked_over_per_sequence": medians["one_masked_call"] / medians["per_sequence"],
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
