"""Count the matmul-equivalents of each head implementation: the PyTorch side by a dispatch mode that sees every
``mm``/``addmm``/``addmm_``/``bmm`` (``torch.utils.flop_counter`` misses the in-place ``addmm_``), the Triton side
from the kernels' own loop structure (the dispatcher cannot see inside a Triton kernel).

One matmul-equivalent = ``2·N·d·V`` flops (one ``[N, d] × [d, V]`` product). Also records the dtype of every
GEMM's operands, which is how tests/test_kernel_report.py checks that the Triton path runs no fp32 GEMM on
bf16 inputs.

    python scripts/count_matmuls.py            # CPU; Triton under TRITON_INTERPRET=1 if no GPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Triton kernels' tensor-core work per launch, in matmul-equivalents (see the kernels' module docstrings):
# forward: z_θ and z_ref (2) + direction (1; two-term on bf16/fp16: 2); logit-gradient recompute: 1.
TRITON_KERNEL_MATMULS = {
    ("frozen", "fp32"): 3,
    ("frozen", "lp"): 4,
    ("trainable", "fp32"): 4,
    ("trainable", "lp"): 5,
}


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


def count(impl: str, head: str, dtype: torch.dtype, n: int = 64, d: int = 32, vocab: int = 2048) -> dict:
    """Matmul-equivalents of forward + backward of the policy stream for one implementation and head mode."""
    from edpo_plugin.ops import linear_logprobs

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(vocab, d, generator=g).to(dtype).requires_grad_(head == "trainable")
    ref_weight = weight if head == "frozen" else torch.randn(vocab, d, generator=g).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=g)
    counter = MatmulCounter()
    with counter:
        out = linear_logprobs(hidden, weight, labels, ref_hidden=torch.randn(n, d, generator=g).to(dtype),
                              ref_weight=ref_weight, epsilon=0.01, impl=impl)  # fmt: skip
        out.policy.sum().backward()
    unit = 2 * n * d * vocab
    torch_side = sum(f for _, f, _ in counter.gemms) / unit
    kernel_side = TRITON_KERNEL_MATMULS[(head, "fp32" if dtype == torch.float32 else "lp")] if impl == "triton" else 0
    return {
        "impl": impl,
        "head": head,
        "dtype": str(dtype).replace("torch.", ""),
        "torch_matmul_equivalents": round(torch_side, 3),
        "triton_matmul_equivalents": kernel_side,
        "total": round(torch_side + kernel_side, 3),
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
    print(f"{'dtype':<10}{'head':<11}{'impl':<9}{'torch':>7}{'triton':>8}{'total':>7}  GEMM operands")
    for r in rows:
        print(f"{r['dtype']:<10}{r['head']:<11}{r['impl']:<9}{r['torch_matmul_equivalents']:>7}"
              f"{r['triton_matmul_equivalents']:>8}{r['total']:>7}  {', '.join(r['gemm_operand_dtypes'])}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
