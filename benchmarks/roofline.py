"""Modelled GPU cost of each log-prob head at the 8B shape, kernel by kernel (no GPU): a printer of the plans.

- ε-DPO heads: the planner's own plans (:mod:`edpo_plugin.ops.dispatch`): ``auto`` (the modelled-fastest plan within the
  default workspace budget, what ``impl="auto"`` runs on that GPU), the best Triton-fold and PyTorch-fold plans, and
  the round-1 tiles (1024 × 4096, recomputing backward) for reference. Each row is the sum of the plan's own
  :func:`edpo_plugin.ops.launches.launches` list under :func:`edpo_plugin.ops.cost_model.kernel_seconds`; nothing
  is traced and nothing is patched. ``tests/ops/test_plan.py`` checks those lists against what the engine really
  dispatches.
- TRL 1.16's chunked DPO head (``trl-chunked-dpo``): written below as its own kernel list, from its source
  (``trl/kernels/chunked_logprob.py``, ``trl/trainer/utils.py: add_fused_lm_head`` as ``DPOTrainer`` calls it: the
  policy with ``outputs=("log_probs", "entropy", "mean_logits", "is_top1")`` and gradient, the reference without; a
  PEFT reference is the policy model with adapters off, so it has the policy's outputs). TRL need not be installed.
- ``naive`` and Liger's ``LigerFusedLinearDPOLoss`` (when installed; eager, ``compiled=False``): traced on the meta
  device, one kernel per dispatched op.

The model (constants and sources in ``edpo_plugin/ops/cost_model.py``): per kernel
``max(flops / (eff · peak), bytes / (0.85 · bandwidth)) + 4 µs``, ``+ 20 µs`` per host sync; GEMM efficiency by size,
capped at the GPU's published best-shape rate. **Modelled, not measured.**

    python benchmarks/roofline.py --json benchmarks/results/roofline.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from edpo_plugin.ops import cost_model as C
from edpo_plugin.ops import dispatch as D
from edpo_plugin.ops import launches as L
from edpo_plugin.ops import plan as P

SHAPE = {"n": 8192, "d": 4096, "vocab": 128256}  # Llama-3-8B: 8192 completion tokens per micro-batch
EPSILON = 0.01
META = torch.device("meta")
TRL_TOKEN_CHUNK = 4096  # trl/kernels/chunked_logprob.py TOKEN_CHUNK_SIZE (trl 1.16.0)
TRL_VOCAB_CHUNK = 32768  # trl/trainer/utils.py _CHUNKED_LOGPROB_CHUNK_SIZE (trl 1.16.0)
TRL_FOLD_BLOCK = 1024  # trl/kernels/chunked_logprob.py _BLOCK_SIZE (the backward kernel's column block)
TRL_POLICY_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")  # trl/trainer/dpo_trainer.py (no WPO)


# ------------------------------------------------------------------------------------------------- ε-DPO plans


def edpo_plans(head: str, shape: dict, gpu: C.Gpu) -> dict[str, tuple[P.HeadPlan, P.HeadShape]]:
    hs = P.HeadShape(tokens=shape["n"], valid=shape["n"], dim=shape["d"], vocab=shape["vocab"], dtype=torch.bfloat16,
                     head=head, shared=head == "frozen")  # fmt: skip
    budget = P.DEFAULT_WORKSPACE_MB * 2**20
    plans = {
        "auto": (D.best_plan(hs, ("triton", "chunked"), gpu, budget), hs),
        "triton": (D.best_plan(hs, ("triton",), gpu, budget), hs),
        "chunked": (D.best_plan(hs, ("chunked",), gpu, budget), hs),
        "triton-1024x4096": (P.HeadPlan("triton", head, 1024, 4096, True, torch.bfloat16), hs),
    }
    if head == "trainable":  # the best plan that recomputes its tiles (5 matmul-equivalents): a small budget's choice
        recompute = [p for p in D.candidates(hs, ("triton",), True) if not p.keep_probs]
        plans["triton-recompute"] = (min(recompute, key=lambda p: C.plan_seconds(L.launches(p, hs), gpu)), hs)
    return plans


# --------------------------------------------------------------------------------------------- TRL as a plan


def trl_chunked_dpo(head: str, n: int, d: int, vocab: int, e: int = 2) -> list[C.Kernel]:
    """TRL 1.16's DPO head, kernel by kernel, for ``n`` scored tokens (all valid): the reference call (no grad),
    the policy call, the policy's backward; each call as ``add_fused_lm_head``'s forward runs it on CUDA."""
    out: list[C.Kernel] = []

    def op(phase, name, read, write, count=1):
        out.append(C.Kernel(phase, name, "torch", bytes=int(read + write), count=count))

    def gemm(phase, name, m, nn, k, out_bytes, accumulate, count):
        c_read = m * nn * out_bytes if accumulate else 0
        out.append(C.Kernel(phase, name, "gemm", flops=2 * m * nn * k,
                            bytes=m * k * e + k * nn * e + m * nn * out_bytes + c_read, c_read=c_read,
                            tensor_cores=True, count=count))  # fmt: skip

    def sync(phase, name):
        out.append(C.Kernel(phase, name, "sync"))

    def boolean_index(phase, name, row_bytes):  # x[mask]: nonzero (its size: a sync), then a gather
        op(phase, f"{name}: nonzero", n, 8 * n)
        sync(phase, f"{name}: size")
        op(phase, f"{name}: gather", 8 * n + n * row_bytes, n * row_bytes)

    tiles = [(min(r + TRL_TOKEN_CHUNK, n) - r, min(c + TRL_VOCAB_CHUNK, vocab) - c)
             for r in range(0, n, TRL_TOKEN_CHUNK) for c in range(0, vocab, TRL_VOCAB_CHUNK)]  # fmt: skip

    def forward_call(phase: str, outputs: tuple[str, ...]) -> None:
        op(phase, "mask = labels != -100", 8 * n, n)
        boolean_index(phase, "hidden[mask]", d * e)
        boolean_index(phase, "labels[mask]", 8)
        op(phase, "running statistics init", 0, 4 * n, 7)
        for rows, cols in tiles:
            gemm(phase, "logits (bf16 tile)", rows, cols, d, e, False, 1)
            op(phase, "_forward_kernel", rows * cols * e + rows * (32 + 4 + e), rows * 28)  # one program per row
        op(phase, "log Σ", 4 * n, 4 * n)
        op(phase, "log_z = max + log Σ", 8 * n, 4 * n)
        op(phase, "logprobs = target − log_z", 8 * n, 4 * n)
        if "entropy" in outputs:
            op(phase, "entropy", 16 * n, 8 * n, 1)
            out[-1] = C.Kernel(phase, "entropy", "torch", bytes=12 * n, count=2)
        if "mean_logits" in outputs:
            op(phase, "mean_logits", 4 * n, 4 * n)
        if "is_top1" in outputs:
            op(phase, "is_top1 ≥ / > ", 8 * n, n, 2)
            op(phase, "is_top1 &", 2 * n, n)
        for name in outputs:  # x.new_zeros(mask.shape).masked_scatter(mask, x): zeros, a prefix sum, a scatter
            size = 1 if name == "is_top1" else 4
            op(phase, f"{name}: zeros", 0, n * size)
            op(phase, f"{name}: masked_scatter prefix sum", n, 8 * n)
            op(phase, f"{name}: masked_scatter", n + 8 * n + n * size, n * size)

    forward_call("reference", TRL_POLICY_OUTPUTS if head == "frozen" else ("log_probs",))
    forward_call("policy", TRL_POLICY_OUTPUTS)
    phase = "backward"
    op(phase, "masked_scatter backward: masked_select", 4 * n + n, 4 * n, 2)
    sync(phase, "masked_select size")
    op(phase, "grad_hidden = 0 (fp32)", 0, n * d * 4)
    if head == "trainable":
        op(phase, "grad_weight = 0 (fp32)", 0, vocab * d * 4)
    for rows, cols in tiles:
        gemm(phase, "recompute logits (bf16 tile)", rows, cols, d, e, False, 1)
        programs = -(-cols // TRL_FOLD_BLOCK)
        op(phase, "_backward_kernel (in place)", rows * cols * e + rows * programs * 16, rows * cols * e)
        gemm(phase, "grad_hidden += G·W (fp32)", rows, d, cols, 4, True, 1)
        if head == "trainable":
            gemm(phase, "grad_weight += Gᵀ·H (fp32)", cols, d, rows, 4, True, 1)
    op(phase, "grad_hidden .to(bf16)", n * d * 4, n * d * e)
    if head == "trainable":
        op(phase, "grad_weight .to(bf16)", vocab * d * 4, vocab * d * e)
    op(phase, "hidden[mask] backward: zeros", 0, n * d * e)
    op(phase, "hidden[mask] backward: nonzero", n, 8 * n)
    sync(phase, "hidden[mask] backward: size")
    op(phase, "hidden[mask] backward: index_put", 8 * n + n * d * e, n * d * e)
    return out


# ----------------------------------------------------------------------------------- traced peers (meta device)

_VIEWS = {
    "view", "_unsafe_view", "t", "transpose", "slice", "select", "unsqueeze", "squeeze", "expand", "as_strided",
    "alias", "permute", "detach", "unbind", "split", "narrow", "_reshape_alias", "lift_fresh", "empty", "empty_like",
    "empty_strided", "new_empty", "new_empty_strided", "set_", "split_with_sizes", "_to_copy_meta",
}  # fmt: skip
_GEMMS = ("mm", "addmm", "bmm", "baddbmm")


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _tensors(obj) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


class Tracer(TorchDispatchMode):
    """One :class:`edpo_plugin.ops.plan.Kernel` per dispatched op: GEMMs with their flops, other ops reading their
    inputs and writing their outputs once (views free)."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels: list[C.Kernel] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._overloadpacket.__name__
        base = name.rstrip("_")
        if name in _VIEWS:
            return out
        if base in _GEMMS:
            a, b = (args[0], args[1]) if base in ("mm", "bmm") else (args[1], args[2])
            batch = a.shape[0] if a.dim() == 3 else 1
            flops = 2 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]
            written = _nbytes(kwargs.get("out", out if isinstance(out, torch.Tensor) else None))
            c_read = written if base in ("addmm", "baddbmm") else 0
            tc = a.dtype in (torch.bfloat16, torch.float16)
            self.kernels.append(C.Kernel("traced", name, "gemm", flops=flops,
                                         bytes=_nbytes(a) + _nbytes(b) + written + c_read, c_read=c_read,
                                         tensor_cores=tc))  # fmt: skip
        elif name in ("_local_scalar_dense",):
            self.kernels.append(C.Kernel("traced", name, "sync"))
        elif name in ("zeros", "full", "zero_", "fill_", "new_zeros", "new_full", "zeros_like", "full_like", "ones",
                      "ones_like", "new_ones"):  # fmt: skip
            self.kernels.append(C.Kernel("traced", name, "torch", bytes=sum(_nbytes(t) for t in _tensors(out))))
        else:
            read = sum(_nbytes(t) for t in _tensors(args)) + sum(_nbytes(t) for t in _tensors(kwargs))
            write = 0 if name.endswith("_") else sum(_nbytes(t) for t in _tensors(out))
            self.kernels.append(C.Kernel("traced", name, "torch", bytes=read + write))
        return out


def naive_head(head: str, n: int, d: int, vocab: int) -> list[C.Kernel]:
    from edpo_plugin.ops.contract import HeadCall, HeadOperands
    from edpo_plugin.ops.naive import naive_linear_logprobs

    dtype = torch.bfloat16
    h = torch.empty(n, d, dtype=dtype, device=META, requires_grad=True)
    w = torch.empty(vocab, d, dtype=dtype, device=META, requires_grad=head == "trainable")
    wr = w.detach() if head == "frozen" else torch.empty(vocab, d, dtype=dtype, device=META)
    y = torch.zeros(n, dtype=torch.int64, device=META)
    tracer = Tracer()
    with tracer:
        call = HeadCall(HeadOperands(h, w, None), HeadOperands(torch.empty_like(h).detach(), wr, None), y, EPSILON)
        out = naive_linear_logprobs(call)
        torch.autograd.grad(out[0], [h, w] if head == "trainable" else [h], torch.empty(n, device=META))
    return tracer.kernels


def liger_dpo(head: str, n: int, d: int, vocab: int) -> list[C.Kernel] | None:
    """Liger's ``LigerFusedLinearDPOLoss`` with a reference model (eager): its forward computes the gradients chunk by
    chunk; its backward only scales them."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    except ImportError:
        return None
    dtype = torch.bfloat16
    seq = min(512, n // 2)
    pairs = n // (2 * seq)
    h = torch.empty(2 * pairs, seq, d, dtype=dtype, device=META, requires_grad=True)
    w = torch.empty(vocab, d, dtype=dtype, device=META, requires_grad=head == "trainable")
    wr = w.detach() if head == "frozen" else torch.empty(vocab, d, dtype=dtype, device=META)
    y = torch.zeros(2 * pairs, seq, dtype=torch.int64, device=META)
    tracer = Tracer()
    with tracer, contextlib.suppress(NotImplementedError):
        LigerFusedLinearDPOLoss(use_ref_model=True, compiled=False)(w, h, y, ref_input=torch.empty_like(h).detach(),
                                                                   ref_weight=wr)  # fmt: skip
    return tracer.kernels


# -------------------------------------------------------------------------------------------------------- rows


def summarise(kernels: list[C.Kernel], gpu: C.Gpu, calibration: C.Calibration | None = None) -> dict:
    gemms = [k for k in kernels if k.kind == "gemm"]
    eff = [C.gemm_efficiency(k.flops, k.c_read, gpu) for k in gemms if k.tensor_cores]
    phases: dict[str, float] = {}
    for k in kernels:
        phases[k.phase] = phases.get(k.phase, 0.0) + C.kernel_seconds(k, gpu)
    return {
        "launches": C.launch_count(kernels),
        "syncs": sum(k.count for k in kernels if k.kind == "sync"),
        "tc_tflop": round(sum(k.flops * k.count for k in gemms if k.tensor_cores) / 1e12, 2),
        "simt_tflop": round(sum(k.flops * k.count for k in gemms if not k.tensor_cores) / 1e12, 2),
        "hbm_gb": round(sum(k.bytes * k.count for k in kernels) / 1e9, 1),
        "ms": round(1e3 * C.plan_seconds(kernels, gpu), 1),
        "max_gemm_efficiency": round(max(eff), 3) if eff else None,
        "ms_by_phase": {p: round(1e3 * s, 2) for p, s in phases.items()},
        "model": "per-kernel",
        **({"calibrated_ms": round(1e3 * C.plan_seconds(kernels, gpu, calibration), 1)}
           if calibration is not None and calibration.gpu == gpu.name else {}),
    }  # fmt: skip


def rows_for(shape: dict = SHAPE, calibration: C.Calibration | None = None) -> list[dict]:
    n, d, vocab = shape["n"], shape["d"], shape["vocab"]
    rows = []
    for head in ("frozen", "trainable"):
        traced = {"naive": naive_head(head, n, d, vocab), "liger-dpo": liger_dpo(head, n, d, vocab)}
        for gpu_key, gpu in C.GPUS.items():
            for path, (plan, hs) in edpo_plans(head, shape, gpu).items():
                rows.append({"gpu": gpu_key, "head": head, "path": path, "plan": plan.describe(),
                             "workspace_gib": round(L.workspace_bytes(plan, hs) / 2**30, 2),
                             **summarise(L.launches(plan, hs), gpu, calibration)})  # fmt: skip
            rows.append({"gpu": gpu_key, "head": head, "path": "trl-chunked-dpo",
                         "plan": f"trl 1.16 {TRL_TOKEN_CHUNK}×{TRL_VOCAB_CHUNK}",
                         **summarise(trl_chunked_dpo(head, n, d, vocab), gpu, calibration)})  # fmt: skip
            for path, kernels in traced.items():
                if kernels is not None:
                    rows.append({"gpu": gpu_key, "head": head, "path": path, "plan": "traced (eager)",
                                 **summarise(kernels, gpu, calibration)})  # fmt: skip
    return rows


def constants() -> dict:
    return {
        "gpus": {k: vars(g) for k, g in C.GPUS.items()},
        "hbm_efficiency": C.HBM_EFFICIENCY,
        "launch_s": C.LAUNCH_S,
        "sync_s": C.SYNC_S,
        "gemm_efficiency": [list(p) for p in C.GEMM_EFFICIENCY],
        "small_gemm_exponent": C.SMALL_GEMM_EXPONENT,
        "moved_row_fraction": C.MOVED_ROW_FRACTION,
        "default_workspace_mb": P.DEFAULT_WORKSPACE_MB,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    p.add_argument("--shape", default=None, help="N,d,V instead of the 8B shape (tests use a small one)")
    p.add_argument("--calibration", default=None, help="a GPU suite's bench_head_gpu.json: add calibrated_ms rows")
    args = p.parse_args()
    shape = dict(SHAPE)
    if args.shape:
        shape.update(zip(("n", "d", "vocab"), (int(x) for x in args.shape.split(","))))
    calibration = None
    if args.calibration:
        with open(args.calibration) as f:
            calibration = C.calibrated(json.load(f)["meta"])
    rows = rows_for(shape, calibration)
    unit = 2 * shape["n"] * shape["d"] * shape["vocab"] / 1e12
    print(f"modelled (per kernel), N={shape['n']} d={shape['d']} V={shape['vocab']} bf16; "
          f"1 matmul-eq = {unit:.2f} TFLOP")  # fmt: skip
    print(f"{'gpu':<6}{'head':<11}{'path':<18}{'plan':<30}{'launches':>9}{'TC TFLOP':>9}{'HBM GB':>8}{'ms':>8}"
          f"{'vs TRL':>8}")  # fmt: skip
    trl = {(r["gpu"], r["head"]): r["ms"] for r in rows if r["path"] == "trl-chunked-dpo"}
    for r in rows:
        ratio = r["ms"] / trl[(r["gpu"], r["head"])]
        calibrated = f"  calibrated {r['calibrated_ms']} ms" if "calibrated_ms" in r else ""
        print(f"{r['gpu']:<6}{r['head']:<11}{r['path']:<18}{r['plan']:<30}{r['launches']:>9}{r['tc_tflop']:>9}"
              f"{r['hbm_gb']:>8}{r['ms']:>8}{ratio:>8.2f}{calibrated}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": shape, "kind": "modelled", "model": "per-kernel", "constants": constants(),
                       "rows": rows}, f, indent=2)  # fmt: skip
            f.write("\n")


if __name__ == "__main__":
    main()
