"""Count the matmul-equivalents of each head implementation by running it (CPU; Triton folds under
``TRITON_INTERPRET=1`` if no GPU) under a dispatch mode that sees every ``mm``/``addmm``/``addmm_``/``bmm``
(``torch.utils.flop_counter`` misses the in-place ``addmm_``). Every GEMM of every path is a PyTorch call; the
Triton kernels only fold tiles.

One matmul-equivalent = ``2·N·d·V`` flops (one ``[N, d] × [d, V]`` product). Also records the dtype of every GEMM's
operands (on CPU the engine upcasts to fp32; benchmarks/roofline.py shows the CUDA policy).

    python benchmarks/count_matmuls.py            # CPU; Triton under TRITON_INTERPRET=1 if no GPU
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


class MatmulCounter(TorchDispatchMode):
    """Adds up the flops of every matrix product dispatched while active, with its operands' dtypes."""

    def __init__(self) -> None:
        super().__init__()
        self.gemms: list[tuple[str, int, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._overloadpacket.__name__
        kwargs = kwargs or {}
        if name in ("mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_"):
            a, b = (args[0], args[1]) if name in ("mm", "bmm") else (args[1], args[2])
            batch = a.shape[0] if a.dim() == 3 else 1
            m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
            self.gemms.append((name, 2 * batch * m * k * n, f"{a.dtype}x{b.dtype}".replace("torch.", "")))
        return func(*args, **kwargs)


def count(impl: str, head: str, dtype: torch.dtype, n: int = 64, d: int = 32, vocab: int = 2048,
          keep_probs: bool = False) -> dict:  # fmt: skip
    """Matmul-equivalents of forward + backward of the policy stream for one implementation and head mode
    (``keep_probs``: a trainable head under a plan that keeps P from the forward, as the GPU planner may pick)."""
    from edpo_plugin.ops import linear_logprobs
    from edpo_plugin.ops.chunked import PlanRequest, fused_linear_logprobs
    from edpo_plugin.ops.contract import HeadCall, HeadOperands
    from edpo_plugin.ops.plan import CPU_TILES, HeadPlan

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(vocab, d, generator=g).to(dtype).requires_grad_(head == "trainable")
    ref_weight = weight if head == "frozen" else torch.randn(vocab, d, generator=g).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=g)
    counter = MatmulCounter()
    ref_hidden = torch.randn(n, d, generator=g).to(dtype)
    with counter:
        if keep_probs:
            plan = HeadPlan(impl, head, *CPU_TILES, False, torch.float32, keep_probs=True, interpreted=impl == "triton")
            call = HeadCall(HeadOperands(hidden, weight, None), HeadOperands(ref_hidden, ref_weight, None), labels,
                            0.01)  # fmt: skip
            out = fused_linear_logprobs(call, PlanRequest(plan=plan))
        else:
            out = linear_logprobs(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight, epsilon=0.01,
                                  impl=impl)  # fmt: skip
        out.policy.sum().backward()
    unit = 2 * n * d * vocab
    return {
        "impl": impl + (" (kept P)" if keep_probs else ""),
        "head": head,
        "dtype": str(dtype).replace("torch.", ""),
        "shape": [n, d, vocab],
        "total": round(sum(f for _, f, _ in counter.gemms) / unit, 3),
        "gemm_operand_dtypes": sorted({dt for _, f, dt in counter.gemms if f >= unit // 64}),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rows = [
        count(impl, head, dtype)
        for dtype in (torch.float32, torch.bfloat16)
        for head in ("frozen", "trainable")
        for impl in ("naive", "chunked", "triton")
    ]
    rows += [count(impl, "trainable", dtype, keep_probs=True) for dtype in (torch.float32, torch.bfloat16)
             for impl in ("chunked", "triton")]  # fmt: skip
    print(f"{'dtype':<10}{'head':<11}{'impl':<20}{'matmul-eq':>10}  GEMM operands")
    for r in rows:
        print(f"{r['dtype']:<10}{r['head']:<11}{r['impl']:<20}{r['total']:>10}  {', '.join(r['gemm_operand_dtypes'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
