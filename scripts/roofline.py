"""Modelled GPU cost of each log-prob head at the 8B shape: tensor-core and fp32 FLOPs, HBM bytes, time (no GPU).

Every path runs its own code on the ``meta`` device (shapes only, no data) under a dispatch counter:

- GEMMs (``mm``/``addmm``/``bmm`` and their ``out_dtype`` forms): ``2·m·k·n`` flops, tensor-core work when the
  operands are bf16/fp16, fp32 SIMT work otherwise; bytes: both operands read, the output written (and read, when
  accumulated into).
- every other PyTorch op: its input and output tensors read / written once (eager, unfused; views are free).
- Triton launches, which the dispatcher cannot see into: bytes from the kernel's grid and tile loads (stubs below
  state them per kernel), counted as if every load came from HBM (an upper bound: a fold's second read of its rows
  usually hits L2).

Modelled time = ``max(tensor-core flops / peak, fp32 flops / peak, bytes / bandwidth)`` on H100 SXM (989 TF/s bf16
dense, 67 TF/s fp32, 3.35 TB/s) and A100 SXM (312, 19.5, 2.0). The ε-DPO paths emulate CUDA's GEMM policy
(bf16 operands, fp32 output). Peers: TRL 1.16's ``ChunkedLogProbFunction`` as a DPO head (policy with gradient +
reference, needs ``trl>=1.16``) and Liger's ``LigerFusedLinearDPOLoss`` (eager, ``compiled=False``: its memory is an
upper bound of the compiled form).

    python scripts/roofline.py --json docs/roofline.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from collections.abc import Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

GPUS = {
    "H100": {"tc_flops": 989e12, "simt_flops": 67e12, "hbm_bytes": 3.35e12},
    "A100": {"tc_flops": 312e12, "simt_flops": 19.5e12, "hbm_bytes": 2.0e12},
}
SHAPE = {"n": 8192, "d": 4096, "vocab": 128256}  # Llama-3-8B: 8192 completion tokens per micro-batch
EPSILON = 0.01
META = torch.device("meta")
_GEMMS = ("mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_")
_FREE = {
    "view", "_unsafe_view", "t", "transpose", "slice", "select", "unsqueeze", "squeeze", "expand", "as_strided",
    "alias", "permute", "detach", "unbind", "split", "narrow", "_reshape_alias", "lift_fresh", "empty", "empty_like",
    "empty_strided", "new_empty", "new_empty_strided", "set_", "_to_copy_meta", "split_with_sizes",
}  # fmt: skip


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


class CostCounter(TorchDispatchMode):
    """Tensor-core flops, fp32 SIMT flops and HBM bytes of everything dispatched while active (see module doc)."""

    def __init__(self) -> None:
        super().__init__()
        self.tc_flops = 0
        self.simt_flops = 0
        self.bytes = 0
        self.gemm_flops_by_dtype: dict[str, int] = {}

    def add_launch(self, nbytes: int) -> None:
        self.bytes += int(nbytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._overloadpacket.__name__
        if name in _GEMMS:
            a, b = (args[0], args[1]) if name in ("mm", "bmm") else (args[1], args[2])
            batch = a.shape[0] if a.dim() == 3 else 1
            flops = 2 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]
            low = a.dtype in (torch.bfloat16, torch.float16)
            if low:
                self.tc_flops += flops
            else:
                self.simt_flops += flops
            key = str(a.dtype).replace("torch.", "")
            self.gemm_flops_by_dtype[key] = self.gemm_flops_by_dtype.get(key, 0) + flops
            written = _nbytes(kwargs.get("out", out if isinstance(out, torch.Tensor) else None))
            accumulated = name != "mm" and name != "bmm"
            self.bytes += _nbytes(a) + _nbytes(b) + written * (2 if accumulated else 1)
        elif name in ("zeros", "full", "zero_", "fill_", "new_zeros", "new_full", "zeros_like", "full_like"):
            self.bytes += sum(_nbytes(t) for t in _tensors(out))
        elif name == "copy_":
            self.bytes += 2 * _nbytes(args[1])
        elif name not in _FREE:
            self.bytes += sum(_nbytes(t) for t in _tensors(args)) + sum(_nbytes(t) for t in _tensors(kwargs))
            if not name.endswith("_"):  # an in-place op's output is its (already counted) input
                self.bytes += sum(_nbytes(t) for t in _tensors(out))
        return out


# ------------------------------------------------------------------------------------------ the ε-DPO tile engine


@contextlib.contextmanager
def cuda_gemm_policy() -> Iterator[None]:
    """Make the engine treat bf16/fp16 meta tensors as it treats CUDA ones (GEMMs on the input dtype, fp32 out)."""
    from edpo_plugin.ops import engine

    real = engine.tensor_core_operands
    engine.tensor_core_operands = lambda t: t.dtype in (torch.bfloat16, torch.float16)
    try:
        yield
    finally:
        engine.tensor_core_operands = real


def triton_fold_stubs(counter: CostCounter) -> tuple[Callable, Callable]:
    """Meta stand-ins for the two fold kernels of :mod:`edpo_plugin.ops.triton_fold`, recording their HBM bytes."""

    def fold(z, b_p, b_r, stats, epsilon, transform, p_dtype):
        _, rows, cols = z.shape
        planes = 2 * 2 * rows * cols * 4  # two fp32 planes, read in both passes
        bias = 2 * (_nbytes(b_p) + _nbytes(b_r)) * math.ceil(rows / 4)  # per program (4 rows), per pass
        stats_rw = 2 * 2 * 4 * rows * 4
        if p_dtype is None:
            counter.add_launch(planes + bias + stats_rw)
            return None
        p_bytes = rows * cols * torch.empty((), dtype=p_dtype).element_size()
        counter.add_launch(planes + bias + stats_rw + p_bytes + rows * 4)
        return torch.empty(rows, device=META), torch.empty(rows, cols, dtype=p_dtype, device=META)

    def grad_fold(u, b, y_tile, row_max, row_logsum, g, transform, out_dtype):
        rows, cols = u.shape
        out = torch.empty(rows, cols, dtype=out_dtype, device=META)
        counter.add_launch(_nbytes(u) + _nbytes(out) + 4 * rows * 4 * math.ceil(cols / 128))
        return out

    return fold, grad_fold


def edpo_head(counter: CostCounter, path: str, head: str, n: int, d: int, vocab: int, dtype=torch.bfloat16) -> None:
    """One ε-DPO head step (forward + backward of the policy stream) on meta tensors, with the orchestration of
    ``edpo_plugin.ops.chunked`` over the engine (all ``n`` tokens valid)."""
    from edpo_plugin.ops.chunked import DEFAULT_TOKEN_CHUNK, DEFAULT_VOCAB_CHUNK
    from edpo_plugin.ops.engine import (
        HeadOperands,
        Tiles,
        fold_torch,
        grad_fold_torch,
        mix_streams,
        recompute_grads,
        sweep_statistics,
        target_logits,
    )
    from edpo_plugin.ops.transform import IDENTITY

    fold, grad_fold = triton_fold_stubs(counter) if path == "triton" else (fold_torch, grad_fold_torch)
    tiles = Tiles(DEFAULT_TOKEN_CHUNK, DEFAULT_VOCAB_CHUNK)
    h, hr = (torch.empty(n, d, dtype=dtype, device=META) for _ in range(2))
    w = torch.empty(vocab, d, dtype=dtype, device=META)
    wr = w if head == "frozen" else torch.empty(vocab, d, dtype=dtype, device=META)
    y = torch.empty(n, dtype=torch.int64, device=META)
    policy, ref = HeadOperands(h, w, None), HeadOperands(hr, wr, None)
    with cuda_gemm_policy(), counter:
        row_max, row_logsum, direction = sweep_statistics(
            policy, ref, y, EPSILON, IDENTITY, tiles, head == "frozen", fold
        )
        targets = torch.stack(mix_streams(target_logits(policy, y, IDENTITY), target_logits(ref, y, IDENTITY),
                                          EPSILON))  # fmt: skip
        ((targets - row_max) - row_logsum).unbind(0)
        g = torch.empty(n, device=META)
        if head == "frozen":
            (direction * g[:, None]).to(dtype)
        else:
            gh, gw, _ = recompute_grads(policy, y, row_max[0], row_logsum[0], g, IDENTITY, tiles,
                                        (True, True, False), grad_fold)  # fmt: skip
            gh.to(dtype)


def naive_head(counter: CostCounter, head: str, n: int, d: int, vocab: int, dtype=torch.bfloat16) -> None:
    from edpo_plugin.ops.naive import naive_linear_logprobs

    h = torch.empty(n, d, dtype=dtype, device=META, requires_grad=True)
    w = torch.empty(vocab, d, dtype=dtype, device=META, requires_grad=head == "trainable")
    wr = w.detach() if head == "frozen" else torch.empty(vocab, d, dtype=dtype, device=META)
    y = torch.zeros(n, dtype=torch.int64, device=META)
    real_autocast = torch.autocast
    torch.autocast = lambda *args, **kwargs: contextlib.nullcontext()  # autocast has no meta form; it is off anyway
    try:
        with counter:
            out = naive_linear_logprobs(h, w, y, torch.empty_like(h).detach(), wr, EPSILON, None, None, -100)
            out[0].sum().backward()
    finally:
        torch.autocast = real_autocast


# ------------------------------------------------------------------------------------------------------- peers


def trl_chunked_dpo(counter: CostCounter, head: str, n: int, d: int, vocab: int, dtype=torch.bfloat16) -> bool:
    """TRL 1.16's memory-efficient DPO head: ``ChunkedLogProbFunction`` on the policy (with gradient) and on the
    reference, as ``add_fused_lm_head`` calls it (chunk 32768 columns, 4096 tokens, Triton folds). False if the
    installed TRL has no such function."""
    try:
        from trl.kernels import chunked_logprob as clp
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk
    except ImportError:
        return False

    class Launch:
        def __init__(self, backward: bool):
            self.backward = backward

        def __getitem__(self, grid):
            def launch(tile, *args, **kwargs):
                rows, cols = tile.shape
                per_row_state = 8 * 4 * rows * (2 if not self.backward else 1)
                counter.add_launch(_nbytes(tile) * (2 if self.backward else 1) + per_row_state)

            return launch

    def addmm_fp32_as_on_cuda(acc, a, b):  # TRL's own CUDA branch (bf16 operands, fp32 out)
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)

    saved = clp._use_triton, clp._forward_kernel, clp._backward_kernel, torch.is_autocast_enabled, clp._addmm_fp32
    clp._addmm_fp32 = addmm_fp32_as_on_cuda
    clp._use_triton = lambda device: True
    clp._forward_kernel, clp._backward_kernel = Launch(False), Launch(True)
    torch.is_autocast_enabled = lambda *args: False  # no meta form; autocast is off in this comparison
    try:
        h = torch.empty(n, d, dtype=dtype, device=META, requires_grad=True)
        w = torch.empty(vocab, d, dtype=dtype, device=META, requires_grad=head == "trainable")
        wr = w.detach() if head == "frozen" else torch.empty(vocab, d, dtype=dtype, device=META)
        y = torch.zeros(n, dtype=torch.int64, device=META)
        with counter:
            with torch.no_grad():
                clp.ChunkedLogProbFunction.apply(torch.empty_like(h), wr, None, y, 1.0, chunk, None, 1.0, ())
            logps = clp.ChunkedLogProbFunction.apply(h, w, None, y, 1.0, chunk, None, 1.0, ())[0]
            logps.sum().backward()
    finally:
        clp._use_triton, clp._forward_kernel, clp._backward_kernel, torch.is_autocast_enabled, clp._addmm_fp32 = saved
    return True


def liger_dpo(counter: CostCounter, head: str, n: int, d: int, vocab: int, dtype=torch.bfloat16) -> bool:
    """Liger's ``LigerFusedLinearDPOLoss`` with a reference model (eager here). Its forward computes the gradients
    chunk by chunk (``torch.func.grad_and_value``); its backward only scales them, so the forward is the cost."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    except ImportError:
        return False
    seq = min(512, n // 2)
    pairs = n // (2 * seq)
    h = torch.empty(2 * pairs, seq, d, dtype=dtype, device=META, requires_grad=True)
    w = torch.empty(vocab, d, dtype=dtype, device=META, requires_grad=head == "trainable")
    wr = w.detach() if head == "frozen" else torch.empty(vocab, d, dtype=dtype, device=META)
    y = torch.zeros(2 * pairs, seq, dtype=torch.int64, device=META)
    loss_fn = LigerFusedLinearDPOLoss(use_ref_model=True, compiled=False)
    with counter:
        loss_fn(w, h, y, ref_input=torch.empty_like(h).detach(), ref_weight=wr)
    return True


# -------------------------------------------------------------------------------------------------------- model


def resolve_auto() -> str:
    """The path ``resolve_impl("auto", cuda, bf16)`` picks (with Triton importable and its self-check passing)."""
    from edpo_plugin.ops import auto_cuda_impl

    return auto_cuda_impl()


def measure(name: str, head: str, shape: dict) -> CostCounter | None:
    counter = CostCounter()
    n, d, vocab = shape["n"], shape["d"], shape["vocab"]
    if name in ("triton", "chunked"):
        edpo_head(counter, name, head, n, d, vocab)
    elif name == "naive":
        naive_head(counter, head, n, d, vocab)
    elif name == "trl-chunked-dpo":
        if not trl_chunked_dpo(counter, head, n, d, vocab):
            return None
    elif name == "liger-dpo":
        if not liger_dpo(counter, head, n, d, vocab):
            return None
    else:
        raise ValueError(name)
    return counter


def rows_for(shape: dict = SHAPE) -> list[dict]:
    auto = resolve_auto()
    rows = []
    for head in ("frozen", "trainable"):
        for name in ("triton", "chunked", "naive", "trl-chunked-dpo", "liger-dpo"):
            c = measure(name, head, shape)
            if c is None:
                continue
            for gpu, peak in GPUS.items():
                ms = 1e3 * max(c.tc_flops / peak["tc_flops"], c.simt_flops / peak["simt_flops"],
                               c.bytes / peak["hbm_bytes"])  # fmt: skip
                for path in [name, "auto"] if name == auto else [name]:
                    rows.append({"gpu": gpu, "path": path, "head": head, "tc_tflop": round(c.tc_flops / 1e12, 2),
                                 "simt_tflop": round(c.simt_flops / 1e12, 2), "hbm_gb": round(c.bytes / 1e9, 1),
                                 "ms": round(ms, 1)})  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    p.add_argument("--shape", default=None, help="N,d,V instead of the 8B shape (tests use a small one)")
    args = p.parse_args()
    if args.shape:
        SHAPE.update(zip(("n", "d", "vocab"), (int(x) for x in args.shape.split(","))))
    rows = rows_for(SHAPE)
    unit = 2 * SHAPE["n"] * SHAPE["d"] * SHAPE["vocab"] / 1e12
    print(f"modelled, shape N={SHAPE['n']} d={SHAPE['d']} V={SHAPE['vocab']} bf16; 1 matmul-eq = {unit:.2f} TFLOP")
    print(f"{'gpu':<6}{'head':<11}{'path':<17}{'tc TFLOP':>9}{'fp32 TFLOP':>11}{'HBM GB':>8}{'ms':>8}")
    for r in rows:
        print(f"{r['gpu']:<6}{r['head']:<11}{r['path']:<17}{r['tc_tflop']:>9}{r['simt_tflop']:>11}{r['hbm_gb']:>8}"
              f"{r['ms']:>8}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": SHAPE, "gpus": GPUS, "kind": "modelled", "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
