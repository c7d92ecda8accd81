"""Benchmark the ε-DPO log-prob head: peak extra memory and time of forward + backward per implementation.

Each (implementation, head mode) runs in a fresh subprocess so that peak memory is measured cleanly: on CPU as
the growth of the process's peak RSS over its RSS with the inputs allocated, on CUDA with
``torch.cuda.max_memory_allocated``. Time is the median of ``--repeats`` forward+backward calls after one
warm-up. On CPU, compare implementations by their ratio within one run (absolute CPU times say little).

    python scripts/bench_head.py                                  # CPU default: fp32, N=2048, d=256, V=128256
    python scripts/bench_head.py --device cuda --dtype bf16 --tokens 8192 --dim 4096 --liger
    python scripts/bench_head.py --gpu-suite --json docs/bench_head_gpu.json      # what scripts/gpu_suite.sh runs

``--gpu-suite`` = CUDA, bf16, N=8192, d=4096, V=128256: naive, chunked, triton and auto, TRL's
``ChunkedLogProbFunction`` as a DPO head (policy with gradient + reference; needs ``trl>=1.16``) and Liger's
``LigerFusedLinearDPOLoss``, frozen and trainable heads, plus the measured bf16 GEMM rate of this GPU (a
``[N, d] × [d, 16384]`` matmul) that each row's TFLOP/s is compared with, and the Triton self-check's verdict.
TFLOP/s counts the useful matmul-equivalents (``2·N·d·V`` each: 3 for a frozen head, 5 for a trainable one, for
every implementation).

Prints a table and writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import date

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_one(args: argparse.Namespace) -> dict:
    """Runs in the child process: one implementation, one head mode."""
    import torch

    from edpo_plugin.ops import linear_logprobs

    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = getattr(torch, DTYPES[args.dtype])
    n, d, v = args.tokens, args.dim, args.vocab
    hidden = (torch.randn(n, d, device=device) / d**0.25).to(dtype).requires_grad_()
    ref_hidden = (torch.randn(n, d, device=device) / d**0.25).to(dtype)
    weight = (torch.randn(v, d, device=device) / d**0.25).to(dtype).requires_grad_(args.head == "trainable")
    ref_weight = weight if args.head == "frozen" else (torch.randn(v, d, device=device) / d**0.25).to(dtype)
    labels = torch.randint(0, v, (n,), device=device)
    upstream = torch.randn(n, device=device)

    if args.impl == "trl-chunked":
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk

        def step() -> None:  # what TRL 1.16's DPO computes: the policy's log-probs with grad, the reference's without
            with torch.no_grad():
                ChunkedLogProbFunction.apply(ref_hidden, ref_weight, None, labels, 1.0, chunk, None, 1.0, ())
            logps = ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, chunk, None, 1.0, ())[0]
            (logps * upstream).sum().backward()
    elif args.impl == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        liger = LigerFusedLinearDPOLoss(beta=0.1)
        pairs = labels.view(2, -1)  # liger expects [2B, T]: chosen rows then rejected rows

        def step() -> None:
            loss, _ = liger(weight, hidden.view(2, n // 2, d), pairs, None, ref_hidden.view(2, n // 2, d), ref_weight)
            loss.backward()
    else:

        def step() -> None:
            out = linear_logprobs(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight,
                                  epsilon=0.01, impl=args.impl)  # fmt: skip
            (out.policy * upstream).sum().backward()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def clear_grads() -> None:
        hidden.grad = None
        weight.grad = None

    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    step()
    sync()
    # what the step keeps besides its inputs: the gradients it returns are counted, they exist in every impl
    peak_extra = (torch.cuda.max_memory_allocated() if device.type == "cuda" else _peak_rss_bytes()) - base
    clear_grads()

    times = []
    for _ in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        clear_grads()
    median = statistics.median(times)
    matmuls = 3 + (2 if args.head == "trainable" else 0)  # useful work, the same for every implementation
    flops = matmuls * 2 * n * d * v
    return {
        "impl": args.impl,
        "head": args.head,
        "peak_extra_bytes": int(peak_extra),
        "time_s": median,
        "times_s": times,
        "matmul_equivalents": matmuls,
        "tflops": flops / median / 1e12,
    }


def bf16_matmul_tflops(tokens: int, dim: int) -> float:
    """Measured rate of a ``[tokens, dim] × [dim, 16384]`` bf16 GEMM on the current CUDA device (median of 10)."""
    import torch

    a = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(dim, 16384, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * tokens * dim * 16384 / statistics.median(times) / 1e12


def triton_self_check(dtype: str) -> bool:
    import torch

    from edpo_plugin.ops.triton_selfcheck import triton_passes_self_check

    return triton_passes_self_check(torch.device("cuda"), getattr(torch, DTYPES[dtype]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--impls", default="naive,chunked")
    p.add_argument("--heads", default="frozen,trainable")
    p.add_argument("--liger", action="store_true", help="also time TRL/Liger's LigerFusedLinearDPOLoss")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gpu-suite", action="store_true", help="the full GPU run of issue 10 (see the docstring)")
    p.add_argument("--json", default="bench_head.json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--head", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        print(json.dumps(run_one(args)))
        return
    if args.gpu_suite:
        args.device, args.dtype, args.tokens, args.dim, args.vocab = "cuda", "bf16", 8192, 4096, 128256
        args.impls, args.heads, args.liger = "naive,chunked,triton,auto,trl-chunked", "frozen,trainable", True
        args.repeats = 5
    extra = {}
    if args.device.startswith("cuda"):
        extra["bf16_matmul_tflops"] = bf16_matmul_tflops(args.tokens, args.dim)
        if "triton" in args.impls.split(","):
            extra["triton_self_check_passed"] = triton_self_check(args.dtype)

    impls = args.impls.split(",") + (["liger"] if args.liger else [])
    rows = []
    for head in args.heads.split(","):
        for impl in impls:
            cmd = [sys.executable, __file__, "--child", "--impl", impl, "--head", head, "--device", args.device,
                   "--dtype", args.dtype, "--tokens", str(args.tokens), "--dim", str(args.dim),
                   "--vocab", str(args.vocab), "--repeats", str(args.repeats)]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True)
            name = impl
            if done.returncode != 0:  # keep going: one failing variant must not lose the others' numbers
                print(done.stderr[-3000:], file=sys.stderr)
                rows.append({"impl": name, "head": head, "error": done.stderr[-3000:]})
                continue
            rows.append({**json.loads(done.stdout.strip().splitlines()[-1]), "impl": name})
    failed = [r for r in rows if "error" in r]
    rows = [r for r in rows if "error" not in r]

    by_key = {(r["head"], r["impl"]): r for r in rows}
    for r in rows:
        base = by_key.get((r["head"], "naive"))
        r["memory_vs_naive"] = r["peak_extra_bytes"] / base["peak_extra_bytes"] if base else None
        r["time_vs_naive"] = r["time_s"] / base["time_s"] if base else None
        if "bf16_matmul_tflops" in extra:
            r["fraction_of_bf16_matmul_rate"] = r["tflops"] / extra["bf16_matmul_tflops"]

    header = (
        f"{'head':<10}{'impl':<24}{'peak extra MiB':>15}{'mem/naive':>10}{'time s':>9}{'time/naive':>11}{'TFLOP/s':>9}"
    )
    print(f"shape: N={args.tokens} d={args.dim} V={args.vocab} {args.dtype} on {args.device}")
    print(header)
    for r in rows:
        mem_ratio = f"{r['memory_vs_naive']:.3f}" if r["memory_vs_naive"] is not None else "-"
        time_ratio = f"{r['time_vs_naive']:.2f}" if r["time_vs_naive"] is not None else "-"
        print(f"{r['head']:<10}{r['impl']:<24}{r['peak_extra_bytes'] / 2**20:>15.1f}{mem_ratio:>10}"
              f"{r['time_s']:>9.3f}{time_ratio:>11}{r['tflops']:>9.3f}")  # fmt: skip

    meta = {
        "date": date.today().isoformat(),
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "shape": {"tokens": args.tokens, "dim": args.dim, "vocab": args.vocab, "dtype": args.dtype},
        "device": args.device,
        **extra,
    }
    if args.device.startswith("cuda"):
        import torch

        meta["gpu"] = torch.cuda.get_device_name()
        meta["torch"] = torch.__version__
    print({k: v for k, v in extra.items()})
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "rows": rows, "failed": failed}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
