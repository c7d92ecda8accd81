"""Padding-free on a GPU: the real varlen kernel against FlashAttention's documented semantics, and the step time of
padded / packed / shared-prompt layouts on an 8B-width Llama stack.

1. Parity: ``edpo_plugin.trainer.packed_attention.varlen_kernel()`` (flash_attn's ``flash_attn_varlen_func``, else
   PyTorch's ``varlen_attn``) on a shared-prompt layout (separate query / key ``cu_seqlens``, GQA, with and without a
   sliding window) in bf16, against ``tests/varlen_reference.py`` (float64) on the same inputs; the bound is bf16's
   rounding of the output, ``8 · 2⁻⁸`` relative to the output's largest magnitude.
2. Step time: forward + backward (activation gradients only: a LoRA step's backbone) of ``--layers`` Llama-3-8B-wide
   decoder layers (hidden 4096, 32 heads, 8 KV heads, MLP 14336, bf16, frozen weights) on one micro-batch of
   ``--pairs`` pairs in three layouts: ``padded`` (``[2·pairs, 2048]`` rows, SDPA with the padding mask), ``packed``
   (each sequence whole, ε-DPO's varlen attention) and ``shared`` (each pair's prompt once). Lengths drawn around the
   HH harmless medians × 4 for 2048-token rows (``benchmarks/hh_like.py``). CUDA events, median of
   ``--repeats`` after one warm-up.

    python benchmarks/gpu_padding_free.py --json benchmarks/results/bench_padding_free_gpu.json

On a machine without CUDA it runs a small dry run on CPU (the reference kernel standing in) and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests/varlen_reference.py, the yardstick the CPU tests use

from benchmarks.hh_like import hh_like_batch  # noqa: E402
from edpo_plugin.trainer import packed_attention  # noqa: E402
from edpo_plugin.trainer.packed_attention import LAYOUT_KWARG, use_packed_attention  # noqa: E402
from edpo_plugin.trainer.packing import pack_rows  # noqa: E402
from tests.varlen_reference import reference_varlen  # noqa: E402


def parity(device: torch.device, dtype: torch.dtype) -> list[dict]:
    """The kernel against the float64 reference on a shared-prompt layout, per window setting."""
    # on the kernel's device: the layout's bounds live where its tensors are
    ids, mask = (t.to(device) for t in hh_like_batch(4, 1000, scale=4, width=512))
    layout = pack_rows(ids, mask, share_prefixes=True).layout
    n_q, n_k = int(layout.cu_seqlens_q[-1]), int(layout.cu_seqlens_k[-1])
    g = torch.Generator().manual_seed(0)
    q = torch.randn(n_q, 32, 128, generator=g).to(device, dtype)
    k, v = (torch.randn(n_k, 8, 128, generator=g).to(device, dtype) for _ in range(2))
    kernel = packed_attention.varlen_kernel()
    bounds = (layout.cu_seqlens_q, layout.cu_seqlens_k, layout.max_length_q, layout.max_length_k)
    rows = []
    for window in ((-1, -1), (255, 0)):
        options = dict(scale=128**-0.5, window=window, softcap=None, dropout=0.0)
        try:
            got = kernel(q, k, v, *bounds, **options).double()
        except ValueError as err:  # a PyTorch varlen_attn without windows refuses them (a user gets the same)
            rows.append({"window": window, "refused": str(err), "ok": True})
            continue
        want = reference_varlen(q, k, v, *bounds, **options)
        rel = float((got - want).abs().max() / want.abs().max())
        rows.append({"window": window, "max_rel_err": rel, "bound": 8 * 2**-8, "ok": rel <= 8 * 2**-8})
    return rows


def step_times(device: torch.device, dtype: torch.dtype, layers: int, pairs: int, repeats: int, small: bool) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    if small:
        width = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    else:
        width = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)
    config = LlamaConfig(vocab_size=1000, num_hidden_layers=layers, max_position_embeddings=4096, **width)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device, dtype).eval()
    model.requires_grad_(False)
    ids, mask = hh_like_batch(pairs, config.vocab_size, scale=4, width=256 if small else 2048)
    ids, mask = ids.to(device), mask.to(device)

    def run(kwargs: dict) -> float:
        embeds = model.model.embed_tokens(kwargs.pop("input_ids")).requires_grad_(True)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        hidden = model.model(inputs_embeds=embeds, use_cache=False, **kwargs).last_hidden_state
        hidden.float().square().mean().backward()
        if device.type == "cuda":
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        return time.perf_counter() - t0

    layouts = {
        "padded": lambda: {"input_ids": ids, "attention_mask": mask},
        "packed": lambda: pack_rows(ids, mask).model_kwargs(),
        "shared": lambda: pack_rows(ids, mask, share_prefixes=True).model_kwargs(),
    }
    positions = {name: int(make()["input_ids"].numel()) for name, make in layouts.items()}
    times = {name: [] for name in layouts}
    for name, make in layouts.items():
        model.set_attn_implementation("sdpa")
        if name != "padded":
            model.config._attn_implementation = "flash_attention_2"  # switched to ε-DPO's varlen attention
            use_packed_attention(model)
        for i in range(repeats + 1):
            kwargs = make()
            seconds = run(kwargs)
            if LAYOUT_KWARG in kwargs:
                kwargs[LAYOUT_KWARG].check_reached(model)
            if i:
                times[name].append(seconds)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {
        "backbone_positions": positions,
        "median_s": medians,
        "times_s": times,
        "over_padded": {name: medians[name] / medians["padded"] for name in layouts},
        "positions_over_padded": {name: positions[name] / positions["padded"] for name in layouts},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if not cuda:  # dry run: the reference stands in for the kernel, a small model, nothing written
        packed_attention.varlen_kernel = lambda: reference_varlen
    result = {
        "meta": {
            "date": date.today().isoformat(),
            "machine": platform.platform(),
            "device": torch.cuda.get_device_name() if cuda else "cpu (dry run)",
            "torch": torch.__version__,
            "command": "python benchmarks/gpu_padding_free.py" + (f" --json {args.json}" if args.json else ""),
            "layers": args.layers,
            "pairs": args.pairs,
        },
        "parity": parity(device, dtype),
        "step": step_times(device, dtype, args.layers, args.pairs, args.repeats if cuda else 1, small=not cuda),
    }
    for row in result["parity"]:
        if "refused" in row:
            print(f"varlen kernel, window {row['window']}: refused ({row['refused']})")
            continue
        print(f"varlen kernel vs reference, window {row['window']}: max rel err {row['max_rel_err']:.2e} "
              f"(bound {row['bound']:.2e}) {'ok' if row['ok'] else 'FAIL'}")  # fmt: skip
    step = result["step"]
    print(f"{'layout':8s} {'positions':>10s} {'median s':>10s} {'time / padded':>14s}")
    for name, seconds in step["median_s"].items():
        print(f"{name:8s} {step['backbone_positions'][name]:10d} {seconds:10.4f} {step['over_padded'][name]:14.3f}")
    if args.json and cuda:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
