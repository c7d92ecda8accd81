"""Benchmark the ε-DPO log-prob head: peak extra memory and time of forward + backward per implementation.

Each (implementation, head mode) runs in a fresh subprocess so that peak memory is measured cleanly: on CPU as
the growth of the process's peak RSS over its RSS with the inputs allocated, on CUDA with
``torch.cuda.max_memory_allocated``. Time is the median of ``--repeats`` forward+backward calls after one
warm-up. On CPU, compare implementations by their ratio within one run (absolute CPU times say little).

    python benchmarks/bench_head.py                                  # CPU default: fp32, N=2048, d=256, V=128256
    python benchmarks/bench_head.py --device cuda --dtype bf16 --tokens 8192 --dim 4096 --liger
    python benchmarks/bench_head.py --gpu-suite       # what gpu_suite.sh runs; writes results/bench_head_gpu.json
    python benchmarks/bench_head.py --gpu-suite --dry-run --json /tmp/dry.json       # the suite's code path on CPU
    python benchmarks/bench_head.py --impls chunked --before /tmp/base --rounds 6 --repeats 4   # A/B two checkouts

``--gpu-suite`` = CUDA, bf16, N=8192, d=4096, V=128256, frozen and trainable heads: the planner's plan (``auto``)
and two alternatives — the round-1 tiles (``triton`` 1024 × 4096) and the PyTorch fold at the planner's tiles
(``chunked``) — plus, for the trainable head, ``auto`` under a 1 GiB workspace budget (the plan that recomputes
instead of keeping ``P``), and TRL 1.16's ``ChunkedLogProbFunction`` as a DPO head (policy with gradient +
reference) when its wheel is installed. Each row records the plan that ran, its modelled time
(:mod:`edpo_plugin.ops.cost_model`) with the table's constants and with this GPU's measured GEMM efficiencies
(``calibration``: GEMMs of the plans' shapes and a streaming copy, timed with CUDA events), which the suite's
``bench_head_gpu.json`` hands to :func:`edpo_plugin.ops.cost_model.calibrated`. TFLOP/s counts useful
matmul-equivalents (``2·N·d·V`` each: 3 for a frozen head, 5 for a trainable one, for every implementation).

Prints a table and writes JSON (``--json``; by default into ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
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

        chunk = 32768  # trl/trainer/utils.py _CHUNKED_LOGPROB_CHUNK_SIZE in trl 1.16.0 (not imported: its deps)

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
        tiles = {"token_chunk": args.token_chunk, "vocab_chunk": args.vocab_chunk, "workspace_mb": args.workspace_mb}

        def step() -> None:
            out = linear_logprobs(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight,
                                  epsilon=0.01, impl=args.impl, **tiles)  # fmt: skip
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
        "plan": _plan_description(args, device, dtype),
        "head": args.head,
        "peak_extra_bytes": int(peak_extra),
        "time_s": median,
        "times_s": times,
        "matmul_equivalents": matmuls,
        "tflops": flops / median / 1e12,
    }


def _trl_chunked_available() -> bool:
    try:
        return importlib.util.find_spec("trl.kernels.chunked_logprob") is not None
    except (ImportError, ValueError):
        return False


def _plan_description(args: argparse.Namespace, device, dtype) -> str | None:
    """The plan the fused head ran (the planner's choice for this shape), or None for the other heads."""
    if args.impl not in ("auto", "chunked", "triton"):
        return None
    from edpo_plugin.ops.dispatch import choose_plan
    from edpo_plugin.ops.plan import HeadShape

    shape = HeadShape(tokens=args.tokens, valid=args.tokens, dim=args.dim, vocab=args.vocab, dtype=dtype,
                      head=args.head, shared=args.head == "frozen")  # fmt: skip
    return choose_plan(shape, device, args.impl, args.token_chunk, args.vocab_chunk, args.workspace_mb).describe()


def _event_seconds(fn, repeats: int = 10) -> float:
    """Median CUDA-event time of ``fn()`` after three warm-up calls."""
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def calibrate(tokens: int, dim: int, vocab: int, device: str) -> dict:
    """This GPU's GEMM efficiencies at the shapes the plans run (fraction of the model's tensor-core peak) and its
    streaming-copy fraction of HBM bandwidth: the ``calibration`` block :func:`edpo_plugin.ops.cost_model.calibrated`
    reads. On CPU (``--dry-run``) only the code path runs, on small shapes, and nothing is a measurement."""
    import torch

    from edpo_plugin.ops.cost_model import gpu_model

    dev = torch.device(device)
    if dev.type != "cuda":  # dry run: exercise the code on tiny shapes
        return {"gpu": "dry run (cpu)", "gemm_efficiency": [[1.0, 0.70], [2.0, 0.78]], "gemms": [], "dry_run": True}
    gpu = gpu_model(dev)
    bf16, fp32 = torch.bfloat16, torch.float32
    shapes = [  # (label, m, n, k, output dtype, accumulate)
        ("one-wave logits [1024 x 4096]·[4096 x 4096], fp32 out", 1024, 4096, 4096, fp32, False),
        ("plan logits [4096 x 4096]·[4096 x 65536], fp32 out", 4096, 65536, dim, fp32, False),
        ("plan direction [4096 x 65536]·[65536 x 4096], fp32 accumulate", 4096, dim, 65536, fp32, True),
        ("TRL logits [4096 x 4096]·[4096 x 32768], bf16 out", 4096, 32768, dim, bf16, False),
    ]
    gemms = []
    for label, m, n, k, out_dtype, accumulate in shapes:
        a = torch.randn(m, k, device=dev, dtype=bf16)
        b = torch.randn(k, n, device=dev, dtype=bf16)
        c = torch.zeros(m, n, device=dev, dtype=out_dtype)
        if accumulate:
            fn = lambda a=a, b=b, c=c: torch.addmm(c, a, b, out_dtype=torch.float32, out=c)  # noqa: E731
        elif out_dtype == fp32:
            fn = lambda a=a, b=b, c=c: torch.mm(a, b, out_dtype=torch.float32, out=c)  # noqa: E731
        else:
            fn = lambda a=a, b=b, c=c: torch.mm(a, b, out=c)  # noqa: E731
        seconds = _event_seconds(fn)
        flops = 2 * m * n * k
        gemms.append({"gemm": label, "flops": flops, "seconds": seconds, "efficiency": flops / seconds / gpu.tc_flops})
        del a, b, c
    x = torch.empty(2**28, device=dev, dtype=fp32)  # 1 GiB
    y = torch.empty_like(x)
    copy_seconds = _event_seconds(lambda x=x, y=y: y.copy_(x))
    del x, y
    torch.cuda.empty_cache()
    small, big = gemms[0], max(gemms[1:3], key=lambda r: r["flops"])
    return {"gpu": gpu.name, "device_name": torch.cuda.get_device_name(dev),
            "gemm_efficiency": [[small["flops"], small["efficiency"]], [big["flops"], big["efficiency"]]],
            "hbm_efficiency": 2 * 2**30 / copy_seconds / gpu.hbm_bytes, "gemms": gemms}  # fmt: skip


def modelled_ms(row: dict, args: argparse.Namespace, calibration: dict | None) -> dict:
    """The per-kernel model's time for a row's plan on this GPU, from the table and from this GPU's calibration."""
    import torch

    from edpo_plugin.ops import cost_model as C
    from edpo_plugin.ops import launches as L
    from edpo_plugin.ops import plan as P
    from edpo_plugin.ops.dispatch import choose_plan

    dev = torch.device(args.device)
    gpu = C.gpu_model(dev) if dev.type == "cuda" else C.GPUS["H100"]
    if row["impl"] == "trl-chunked":
        from roofline import trl_chunked_dpo

        kernels = trl_chunked_dpo(row["head"], args.tokens, args.dim, args.vocab)
    elif row["impl"] in ("auto", "chunked", "triton"):
        shape = P.HeadShape(
            tokens=args.tokens,
            valid=args.tokens,
            dim=args.dim,
            vocab=args.vocab,
            dtype=getattr(torch, DTYPES[args.dtype]),
            head=row["head"],
            shared=row["head"] == "frozen",
        )
        plan = choose_plan(shape, dev, row["impl"], row.get("token_chunk"), row.get("vocab_chunk"),
                           row.get("workspace_mb"))  # fmt: skip
        kernels = L.launches(plan, shape)
    else:
        return {}
    out = {"modelled_ms": 1e3 * C.plan_seconds(kernels, gpu)}
    if calibration and not calibration.get("dry_run"):
        out["calibrated_ms"] = 1e3 * C.plan_seconds(kernels, gpu, C.calibrated({"calibration": calibration}))
    return out


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


def _bench_head_in(checkout: str) -> str:
    """This script in another checkout: ``benchmarks/bench_head.py``, or ``scripts/bench_head.py`` before the move."""
    for room in ("benchmarks", "scripts"):
        path = os.path.join(checkout, room, "bench_head.py")
        if os.path.isfile(path):
            return path
    raise SystemExit(f"--before {checkout}: no benchmarks/bench_head.py or scripts/bench_head.py there")


def compare_checkouts(args: argparse.Namespace) -> None:
    """A/B on one machine in one run: for ``--rounds`` rounds (the order of the two sides alternating), each head and
    each of ``--impls`` runs once from the ``--before`` checkout and once from this one (``--repeats`` timed steps
    each, in fresh processes); reports per side the minimum and the median step time and the largest peak extra
    memory, and the ratios this / before. The minimum is the figure that resists other load on a shared machine."""
    sides = {"before": os.path.abspath(args.before), "after": str(REPO)}
    runs: dict = {}
    for rnd in range(args.rounds):
        order = list(sides.items()) if rnd % 2 == 0 else list(sides.items())[::-1]
        for side, root in order:
            for head in args.heads.split(","):
                for impl in args.impls.split(","):
                    cmd = [sys.executable, _bench_head_in(root), "--child", "--impl", impl, "--head", head,
                           "--device", args.device, "--dtype", args.dtype, "--tokens", str(args.tokens), "--dim",
                           str(args.dim), "--vocab", str(args.vocab), "--repeats", str(args.repeats)]  # fmt: skip
                    env = dict(os.environ, PYTHONPATH=root)
                    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
                    r = json.loads(done.stdout.strip().splitlines()[-1])
                    runs.setdefault((head, impl), {}).setdefault(side, []).append(r)
                    print(f"round {rnd} {side:<6} {head:<9} {impl:<8} "
                          f"{' '.join(f'{t:.2f}' for t in r['times_s'])} s, {r['peak_extra_bytes'] / 2**20:.1f} MiB",
                          flush=True)  # fmt: skip
    rows = []
    for (head, impl), by_side in runs.items():
        row = {"head": head, "impl": impl}
        for side, rs in by_side.items():
            times = [t for r in rs for t in r["times_s"]]
            row[side] = {"min_s": min(times), "median_s": statistics.median(times), "times_s": times,
                         "peak_extra_bytes": max(r["peak_extra_bytes"] for r in rs)}  # fmt: skip
        for key in ("min_s", "median_s", "peak_extra_bytes"):
            row[f"{key}_after_over_before"] = row["after"][key] / row["before"][key]
        rows.append(row)
    print(f"{'head':<10}{'impl':<9}{'min s before':>13}{'after':>7}{'ratio':>7}{'median ratio':>14}"
          f"{'peak MiB before':>17}{'after':>8}{'ratio':>7}")  # fmt: skip
    for r in rows:
        b, a = r["before"], r["after"]
        print(f"{r['head']:<10}{r['impl']:<9}{b['min_s']:>13.3f}{a['min_s']:>7.3f}{r['min_s_after_over_before']:>7.3f}"
              f"{r['median_s_after_over_before']:>14.3f}{b['peak_extra_bytes'] / 2**20:>17.1f}"
              f"{a['peak_extra_bytes'] / 2**20:>8.1f}{r['peak_extra_bytes_after_over_before']:>7.3f}")  # fmt: skip
    meta = {"date": date.today().isoformat(), "machine": platform.platform(), "cpu_count": os.cpu_count(),
            "load_average_at_end": os.getloadavg(), "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "shape": {"tokens": args.tokens, "dim": args.dim, "vocab": args.vocab, "dtype": args.dtype},
            "rounds": args.rounds, "repeats": args.repeats}  # fmt: skip
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(f"wrote {args.json}")


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
    p.add_argument("--gpu-suite", action="store_true", help="the GPU run of gpu_suite.sh (see the docstring)")
    p.add_argument("--dry-run", action="store_true", help="with --gpu-suite: its code path on CPU, tiny shape")
    p.add_argument("--json", default=None, help="default: results/bench_head_<device>[_ab|_dry].json beside this file")
    p.add_argument("--before", default=None, help="a checkout of the code before a change: A/B its --impls against "
                   "this one's, interleaved, --rounds times (see compare_checkouts)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--head", help=argparse.SUPPRESS)
    p.add_argument("--token-chunk", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--vocab-chunk", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--workspace-mb", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.json is None:
        device = "gpu" if args.gpu_suite or args.device.startswith("cuda") else "cpu"
        suffix = "_ab" if args.before else "_dry" if args.dry_run else ""
        args.json = str(RESULTS / f"bench_head_{device}{suffix}.json")

    if args.child:
        print(json.dumps(run_one(args)))
        return
    if args.before:
        compare_checkouts(args)
        return
    # (label, impl, token chunk, vocabulary tile, workspace MiB, heads)
    variants = [(impl, impl, None, None, None, tuple(args.heads.split(","))) for impl in args.impls.split(",")]
    if args.liger:
        variants.append(("liger", "liger", None, None, None, tuple(args.heads.split(","))))
    calibration = None
    if args.gpu_suite:
        args.device, args.dtype, args.tokens, args.dim, args.vocab = "cuda", "bf16", 8192, 4096, 128256
        args.repeats = 5
        if args.dry_run:
            args.device, args.dtype, args.tokens, args.dim, args.vocab, args.repeats = "cpu", "fp32", 256, 64, 3000, 1
        both = ("frozen", "trainable")
        variants = [("auto", "auto", None, None, None, both),
                    ("triton 1024x4096 (round-1 tiles)", "triton", 1024, 4096, None, both),
                    ("chunked (PyTorch fold)", "chunked", None, None, None, both),
                    ("auto, 1 GiB budget", "auto", None, None, 1024, ("trainable",))]  # fmt: skip
        if _trl_chunked_available():
            variants.append(("trl-chunked", "trl-chunked", None, None, None, both))
        calibration = calibrate(args.tokens, args.dim, args.vocab, args.device)
    extra = {}
    if args.device.startswith("cuda"):
        extra["bf16_matmul_tflops"] = bf16_matmul_tflops(args.tokens, args.dim)
        extra["triton_self_check_passed"] = triton_self_check(args.dtype)
    if calibration is not None:
        extra["calibration"] = calibration

    rows = []
    for head in args.heads.split(",") if not args.gpu_suite else ("frozen", "trainable"):
        for label, impl, token_chunk, vocab_chunk, workspace_mb, heads in variants:
            if head not in heads:
                continue
            cmd = [sys.executable, __file__, "--child", "--impl", impl, "--head", head, "--device", args.device,
                   "--dtype", args.dtype, "--tokens", str(args.tokens), "--dim", str(args.dim),
                   "--vocab", str(args.vocab), "--repeats", str(args.repeats)]  # fmt: skip
            for flag, value in (("--token-chunk", token_chunk), ("--vocab-chunk", vocab_chunk),
                                ("--workspace-mb", workspace_mb)):  # fmt: skip
                if value is not None:
                    cmd += [flag, str(value)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:  # keep going: one failing variant must not lose the others' numbers
                print(done.stderr[-3000:], file=sys.stderr)
                rows.append({"impl": label, "head": head, "error": done.stderr[-3000:]})
                continue
            row = {**json.loads(done.stdout.strip().splitlines()[-1]), "impl": impl, "label": label,
                   "token_chunk": token_chunk, "vocab_chunk": vocab_chunk, "workspace_mb": workspace_mb}  # fmt: skip
            if args.gpu_suite:
                row.update(modelled_ms(row, args, calibration))
            rows.append(row)
    failed = [r for r in rows if "error" in r]
    rows = [r for r in rows if "error" not in r]

    by_key = {(r["head"], r["label"]): r for r in rows}
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
        modelled = f"  modelled {r['modelled_ms']:.1f} ms" if "modelled_ms" in r else ""
        print(f"{r['head']:<10}{r['label'][:24]:<24}{r['peak_extra_bytes'] / 2**20:>15.1f}{mem_ratio:>10}"
              f"{r['time_s']:>9.3f}{time_ratio:>11}{r['tflops']:>9.3f}  {r.get('plan') or ''}{modelled}")  # fmt: skip

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
