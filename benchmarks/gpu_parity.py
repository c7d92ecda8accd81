"""Parity of every kept head path on a GPU against float64 computed on the same GPU (part of benchmarks/gpu_suite.sh).

For each path (``chunked``, ``triton``, ``auto``), head (frozen shared; trainable unshared under the default workspace
budget, where the planner keeps ``P``; trainable with a 1 MiB budget, where it recomputes), dtype (bf16, fp32) and
logit transform (plain; scale + soft cap + bias), at a shape with several token chunks and a ragged vocabulary tile
(N = 2500, d = 256, V = 9000; ``--small`` for a CPU dry run): the plan the planner chose, the four streams' relative
error, the gradients' relative error, and whether a policy equal to its reference gives bit-identical streams (the
engine's two identical-shape GEMMs). Prints a table, writes JSON, exits non-zero on a failure.

    python benchmarks/gpu_parity.py --json benchmarks/results/gpu_parity.json
    python benchmarks/gpu_parity.py --device cpu --small        # dry run of this script (Triton under the interpreter)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/spec_reference.py, the tests' float64 yardstick
from tests.spec_reference import token_logprobs64  # noqa: E402

STREAM_TOL = 1e-5
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 2**-7}
HEADS = (("frozen", None), ("trainable", None), ("trainable", 1))  # (head, workspace_mb): default budget, 1 MiB


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def check(path: str, head: str, workspace_mb: int | None, dtype: torch.dtype, transformed: bool,
          device: torch.device, shape: tuple[int, int, int]) -> dict:  # fmt: skip
    from edpo_plugin.ops import LogitTransform, linear_logprobs
    from edpo_plugin.ops.dispatch import choose_plan
    from edpo_plugin.ops.plan import HeadShape

    trainable = head == "trainable"
    g = torch.Generator(device="cpu").manual_seed(0)
    n, d, vocab = shape

    def rand(*size, s=1.0):
        return (s * torch.randn(*size, generator=g)).to(device=device, dtype=dtype)

    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::7] = -100
    labels = labels.to(device)
    h, hr = rand(n, d, s=0.5), rand(n, d, s=0.5)
    w = rand(vocab, d, s=0.5).requires_grad_(trainable)
    wr = rand(vocab, d, s=0.5) if trainable else w
    b = rand(vocab).requires_grad_(trainable) if transformed else None
    br = (rand(vocab) if trainable else b) if transformed else None
    scale, cap = (0.5, 30.0) if transformed else (1.0, None)
    transform = LogitTransform(scale, cap)
    h.requires_grad_()
    kwargs = dict(epsilon=0.05, transform=transform, impl=path, workspace_mb=workspace_mb)
    out = linear_logprobs(h, w, labels, ref_hidden=hr, ref_weight=wr, bias=b, ref_bias=br, **kwargs)
    valid = int((labels != -100).sum())
    plan = choose_plan(HeadShape(tokens=n, valid=valid, dim=d, vocab=vocab, dtype=dtype, head=head,
                                 shared=not trainable, bias=transformed, ref_bias=transformed, transform=transform),
                       device, path if path != "naive" else "chunked", workspace_mb=workspace_mb)  # fmt: skip
    leaves = [h] + ([w] + ([b] if b is not None else []) if trainable else [])
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    h64 = leaves64[0]
    w64 = leaves64[1] if trainable else w.detach()
    b64 = (leaves64[2] if trainable else b.detach()) if b is not None else None
    want = token_logprobs64(h64, w64, labels, hr, wr if trainable else w64, 0.05, bias=b64,
                            ref_bias=br if trainable else b64, scale=scale, softcap=cap)  # fmt: skip
    upstream = torch.randn(n, generator=g).to(device=device, dtype=torch.float64)
    grads = torch.autograd.grad((out.policy.double() * upstream).sum(), leaves)
    grads64 = torch.autograd.grad((want[0] * upstream).sum(), leaves64)
    stream_err = max(_rel(o, w_) for o, w_ in zip(out, want))
    grad_err = max(_rel(a, b_) for a, b_ in zip(grads, grads64))
    with torch.no_grad():  # a policy equal to its reference (fresh adapter): mixes equal the policy bit for bit
        same = linear_logprobs(h.detach(), w.detach(), labels, ref_hidden=h.detach().clone(), ref_weight=w.detach(),
                               bias=None if b is None else b.detach(), ref_bias=None if b is None else b.detach(),
                               **kwargs)  # fmt: skip
    bit_identical = all(torch.equal(same.policy, s) for s in (same.ref, same.plus, same.minus))
    ok = stream_err <= STREAM_TOL and grad_err <= GRAD_TOL[dtype] and bit_identical
    return {"path": path, "plan": plan.describe(), "head": head, "workspace_mb": workspace_mb,
            "dtype": str(dtype).replace("torch.", ""), "transform": "scale+cap+bias" if transformed else "plain",
            "stream_rel_err": stream_err, "grad_rel_err": grad_err, "bit_identical_when_equal": bit_identical,
            "ok": ok}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="N=300, d=32, V=1100: a quick dry run (CPU)")
    args = p.parse_args()
    device = torch.device(args.device)
    shape = (300, 32, 1100) if args.small else (2500, 256, 9000)
    rows = [
        check(path, head, budget, dtype, transformed, device, shape)
        for path in ("chunked", "triton", "auto")
        for head, budget in HEADS
        for dtype in (torch.bfloat16, torch.float32)
        for transformed in (False, True)
    ]
    print(f"{'path':<9}{'plan':<32}{'head':<11}{'MiB':>6} {'dtype':<10}{'transform':<16}{'streams':>10}{'grads':>10}"
          "  bit-id  ok")  # fmt: skip
    for r in rows:
        print(f"{r['path']:<9}{r['plan']:<32}{r['head']:<11}{r['workspace_mb'] or '-':>6} {r['dtype']:<10}"
              f"{r['transform']:<16}{r['stream_rel_err']:>10.1e}{r['grad_rel_err']:>10.1e}  "
              f"{r['bit_identical_when_equal']!s:<6}  {r['ok']}")  # fmt: skip
    if args.json:
        meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else str(device),
                "torch": torch.__version__, "shape": shape}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    sys.exit(0 if all(r["ok"] for r in rows) else 1)


if __name__ == "__main__":
    main()
