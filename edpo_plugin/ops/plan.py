"""The head's plan and its modelled cost: one source for the loop shape the engine runs and the kernels it launches.

A :class:`HeadPlan` fixes what :mod:`edpo_plugin.ops.engine` does for one call: the fold (``"chunked"``: PyTorch,
``"triton"``: one kernel per tile), the token chunk and vocabulary tile, the GEMM policy (tensor cores: bf16/fp16
operands with fp32 output, on CUDA) and, for a trainable head, whether the forward keeps the policy's softmax weights
``P`` for the backward (``keep_probs``: 4 matmul-equivalents instead of 5, at ``M·V`` elements of workspace).

:func:`launches` lists, kernel by kernel and in the engine's order, what that plan dispatches for a
:class:`HeadShape` (every PyTorch op, GEMM and Triton launch, with flops and HBM bytes; host syncs);
:func:`plan_seconds` sums the per-kernel model over it; :func:`best_plan` is the planner: the modelled-fastest plan
whose :func:`workspace_bytes` fits the budget. ``scripts/roofline.py`` prints these same plans;
``tests/ops/test_plan.py`` checks :func:`launches` against an independent count of what the engine dispatches.

**The per-kernel model** (every constant below, with its source): a kernel takes
``max(flops / (eff · peak), bytes / (HBM_EFFICIENCY · bandwidth)) + LAUNCH_S``, a host sync ``SYNC_S``; GEMM
efficiency ``eff`` from :data:`GEMM_EFFICIENCY` by size, capped at the GPU's published best-shape rate, lowered for a
GEMM that accumulates into its output by the time its epilogue spends reading ``C`` (exposed, not overlapped; this
reproduces the 0.63 quoted for the one-wave shape below). Elementwise kernels, PyTorch's and Triton's, are modelled
as memory-bound, every load from HBM (no L2 reuse: an upper bound). A committed GPU measurement
(``docs/bench_head_gpu.json``, ``scripts/gpu_suite.sh``) calibrates :data:`GEMM_EFFICIENCY` through
:func:`calibrated`; none exists yet, so every time here is **modelled**.

Imports only torch.
"""

from __future__ import annotations

import functools
import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch

from edpo_plugin.ops.transform import IDENTITY, LogitTransform

# ------------------------------------------------------------------------------------------- model constants


@dataclass(frozen=True)
class Gpu:
    """Peak rates of one GPU: dense tensor-core bf16/fp16 flop/s, fp32 (non-tensor-core) flop/s, HBM bytes/s, and
    the published best-shape achievable fraction of the tensor-core peak for a GEMM."""

    name: str
    tc_flops: float
    simt_flops: float
    hbm_bytes: float
    best_gemm: float


# NVIDIA H100 SXM5 / A100 SXM4 80GB datasheets (dense bf16, fp32, HBM3 / HBM2e); best-shape rates: the published
# "maximum achievable matmul FLOPS" measurements, 80.1 % (H100 SXM) and 85.9 % (A100 SXM), as quoted in issue 23.
GPUS = {
    "H100": Gpu("H100 SXM", 989e12, 67e12, 3.35e12, 0.801),
    "A100": Gpu("A100 SXM", 312e12, 19.5e12, 2.0e12, 0.859),
}
HBM_EFFICIENCY = 0.85  # achievable fraction of HBM bandwidth for a streaming kernel (issue 23 / the project brief)
LAUNCH_S = 4e-6  # per kernel launch, host side (issue 23 / the project brief)
SYNC_S = 20e-6  # per host synchronisation (.item(), nonzero's size) (issue 23 / the project brief)
# cuBLAS efficiency by GEMM size (flops), log-interpolated between points, issue 23's table: 0.70 for the one-wave
# [1024 × 4096]·[4096 × 4096] GEMM with fp32 output on an H100 (its fp32 write exposed), 0.78 from 0.4 TFLOP up.
GEMM_EFFICIENCY = ((2 * 1024 * 4096 * 4096, 0.70), (0.4e12, 0.78))
# Below the first point a GEMM fills less than one wave: efficiency ∝ sqrt(flops) (assumed, not measured).
SMALL_GEMM_EXPONENT = 0.5
# Rows whose reference for P moves in a tile (the lazy fold's masked second pass): assumed 1 % per tile (a row moves
# when its running maximum passes its target's logit + τ, i.e. p_target ≲ e^-τ); data-dependent, not yet measured.
MOVED_ROW_FRACTION = 0.01

# ------------------------------------------------------------------------------------- tiles, blocks, defaults

CPU_TILES = (1024, 4096)  # what measures best on CPU (docs/benchmarks.md): token chunk × vocabulary tile
TOKEN_CHUNKS = (1024, 2048, 4096, 8192, 16384, 32768)  # the planner's candidates on CUDA
VOCAB_CHUNKS = (4096, 8192, 16384, 32768, 65536)
DEFAULT_WORKSPACE_MB = 4096  # head workspace budget on CUDA: 5 % of an 80 GB card
LAZY_TAU_MAX = 16.0  # nats: the lazy fold lets P = exp(z − r) grow to e^16 before it moves r


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (Triton kernels run on the CPU, in Python)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fold_blocks(kind: str, cols: int, interpreted: bool) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps)`` of a Triton kernel of the head (``kind``: ``"fold"``, ``"grad_fold"``,
    ``"targets"``, ``"finish"``; ``cols``: the columns it sweeps). On a GPU: the fold 4 rows × 512 columns (a
    1024-row chunk gives 256 programs), the gradient folds and the direction's finish 32 × 128, the target dot
    products 16 rows × 256; under the interpreter, where each program and loop step costs Python time, few large
    blocks."""
    if interpreted:
        return 64, min(4096, 1 << max(0, cols - 1).bit_length()), 4
    return {"fold": (4, 512, 8), "targets": (16, 256, 4)}.get(kind, (32, 128, 4))


def lazy_tau(p_dtype: torch.dtype, transform: LogitTransform) -> float:
    """How far (nats) a tile's maximum may pass the row's reference before the lazy fold moves it: ``P ≤ e^τ·|J|``
    must stay 4× inside the ``P`` dtype's range (fp16: about 9.7 nats; bf16 / fp32: :data:`LAZY_TAU_MAX`)."""
    room = math.log(torch.finfo(p_dtype).max) - math.log(4.0) - math.log(max(1.0, abs(transform.scale)))
    return max(0.0, min(LAZY_TAU_MAX, room))


# ---------------------------------------------------------------------------------------------- shape and plan


@dataclass(frozen=True)
class HeadShape:
    """One call of the head: ``tokens`` positions, ``valid`` of them scored (labels not ignored), hidden size
    ``dim``, ``vocab`` rows of ``lm_head`` (this rank's on a shard), the inputs' ``dtype``, and the head kind:
    ``"frozen"`` (only the hidden states need grad), ``"trainable"`` (weight, maybe bias, need grad), ``"none"``."""

    tokens: int
    valid: int
    dim: int
    vocab: int
    dtype: torch.dtype = torch.bfloat16
    head: str = "frozen"
    shared: bool = True  # reference lm_head weight is the policy's (PEFT)
    bias: bool = False
    ref_bias: bool = False
    transform: LogitTransform = IDENTITY
    label_bytes: int = 8
    want_hidden: bool = True
    want_weight: bool = True  # trainable head: the weight needs grad (else only the bias)

    @property
    def elem(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


class HeadKernels(NamedTuple):
    """What a plan runs besides the GEMMs: the tile fold, the backward folds (from recomputed logits, from kept
    ``P``), the target logits before the sweep and the frozen head's direction after it."""

    fold: Callable
    grad_fold: Callable
    grad_fold_probs: Callable
    targets: Callable
    finish: Callable


@dataclass(frozen=True)
class HeadPlan:
    """What the engine runs for one call (see the module docstring)."""

    impl: str  # "chunked" (PyTorch fold) or "triton"
    head: str  # as HeadShape.head
    token_chunk: int
    vocab_chunk: int
    tensor_cores: bool
    p_dtype: torch.dtype  # dtype of P and of the logit gradient: the GEMM operand dtype
    keep_probs: bool = False
    interpreted: bool = False  # Triton under the interpreter (its block sizes)

    @property
    def keeps_direction(self) -> bool:
        return self.head == "frozen"

    @property
    def keeps_probs_or_direction(self) -> bool:
        return self.keep_probs or self.keeps_direction

    @property
    def planes(self) -> int:
        """fp32 planes of the forward tile buffer: the PyTorch fold writes both mixes into planes 2 and 3."""
        return 2 if self.impl == "triton" else 4

    def token_chunks(self, n: int) -> list[tuple[int, int]]:
        return [(a, min(a + self.token_chunk, n)) for a in range(0, n, self.token_chunk)]

    def vocab_tiles(self, vocab: int) -> list[tuple[int, int]]:
        return [(a, min(a + self.vocab_chunk, vocab)) for a in range(0, vocab, self.vocab_chunk)]

    def kernels(self) -> HeadKernels:
        """The plan's per-tile and per-call kernels: Triton's or their PyTorch forms."""
        if self.impl == "triton":
            from edpo_plugin.ops import triton_fold as t

            return HeadKernels(t.fold_triton, t.grad_fold_triton, t.grad_fold_probs_triton, t.targets_triton,
                               t.finish_triton)  # fmt: skip
        from edpo_plugin.ops import engine as e

        return HeadKernels(e.fold_torch, e.grad_fold_torch, e.grad_fold_probs_torch, e.gather_targets,
                           e.direction_from)  # fmt: skip

    def describe(self) -> str:
        keep = ", keeps P" if self.keep_probs else ""
        return f"{self.impl} {self.token_chunk}×{self.vocab_chunk}{keep}"


# ------------------------------------------------------------------------------------------------ launch list


@dataclass(frozen=True)
class Kernel:
    """One kernel (``count`` identical launches) of a plan: ``kind`` is ``"gemm"``, ``"torch"`` (a PyTorch
    elementwise / reduction / indexing op), ``"triton"`` or ``"sync"`` (a host synchronisation, no launch).
    ``bytes``: HBM read + written per launch; ``c_read``: a GEMM's bytes of ``C`` read to accumulate into it."""

    phase: str
    name: str
    kind: str
    flops: int = 0
    bytes: int = 0
    c_read: int = 0
    tensor_cores: bool = False
    count: int = 1


@dataclass
class _Launches:
    plan: HeadPlan
    shape: HeadShape
    phase: str = ""
    kernels: list[Kernel] = field(default_factory=list)
    times: int = 1

    def op(self, name: str, read: int, write: int, n: int = 1) -> None:
        self.kernels.append(Kernel(self.phase, name, "torch", bytes=read + write, count=n * self.times))

    def copy_if(self, cast: bool, name: str, elems: int, src: int, dst: int) -> None:
        """A dtype conversion (``.float()`` / ``.to()``): a kernel only when the dtypes differ."""
        if cast:
            self.op(name, elems * src, elems * dst)

    def gemm(self, name: str, m: int, n: int, k: int, a: int, b: int, out: int, accumulate: bool, tc: bool) -> None:
        """``[m, k] · [k, n]`` with operand element sizes ``a``, ``b`` and output ``out`` bytes."""
        c_read = m * n * out if accumulate else 0
        self.kernels.append(Kernel(self.phase, name, "gemm", flops=2 * m * n * k,
                                   bytes=m * k * a + k * n * b + m * n * out + c_read, c_read=c_read,
                                   tensor_cores=tc, count=self.times))  # fmt: skip

    def triton(self, name: str, nbytes: int) -> None:
        self.kernels.append(Kernel(self.phase, name, "triton", bytes=nbytes, count=self.times))

    def sync(self, name: str) -> None:
        self.kernels.append(Kernel(self.phase, name, "sync", count=self.times))


def _groups(spans: list[tuple[int, int]]) -> list[tuple[int, bool, int]]:
    """``(width, first, count)`` for the spans of a loop, first one apart."""
    counts = Counter((b - a, i == 0) for i, (a, b) in enumerate(spans))
    return [(w, first, n) for (w, first), n in counts.items()]


def _transform_ops(L: _Launches, name: str, elems: int, transform: LogitTransform) -> None:
    """``LogitTransform.apply_`` on ``elems`` fp32 values: ``mul_`` for a scale, ``div_, tanh_, mul_`` for a cap."""
    ops = (1 if transform.scale != 1.0 else 0) + (3 if transform.softcap is not None else 0)
    L.op(f"{name}: transform", elems * 4, elems * 4, ops)


def _derivative_ops(L: _Launches, name: str, elems: int) -> None:
    """``LogitTransform.derivative`` with a cap: ``t = z / cap``, ``t·t``, ``1 − ·``, ``·= scale`` (a new tensor)."""
    L.op(f"{name}: slope t", elems * 4, elems * 4)
    L.op(f"{name}: slope t·t", 2 * elems * 4, elems * 4)
    L.op(f"{name}: slope 1−t²", elems * 4, elems * 4)
    L.op(f"{name}: slope ·scale", elems * 4, elems * 4)


def launches(plan: HeadPlan, shape: HeadShape, moved: float = MOVED_ROW_FRACTION, checks: bool = True) -> list[Kernel]:
    """Every kernel one forward + backward of the policy stream dispatches under ``plan`` (one device: the
    vocab-parallel collectives are not listed), in the engine's order; grouped by identical tiles (``count``).

    ``moved``: the fraction of rows whose lazy reference moves in a tile (Triton fold; data-dependent, see
    :data:`MOVED_ROW_FRACTION`). ``checks``: include ``linear_logprobs``' label check."""
    return _launches(plan, shape, moved, checks)


@functools.lru_cache(maxsize=512)
def _launches_cached(plan: HeadPlan, shape: HeadShape, moved: float, checks: bool) -> tuple[Kernel, ...]:
    return tuple(_launches(plan, shape, moved, checks))


def _launches(plan: HeadPlan, shape: HeadShape, moved: float, checks: bool) -> list[Kernel]:
    L = _Launches(plan, shape)
    n, m, d, e = shape.tokens, shape.valid, shape.dim, shape.elem
    lb = shape.label_bytes
    if checks:
        L.phase = "check"
        L.op("labels != ignore", n * lb, n)
        L.op("labels < 0", n * lb, n)
        L.op("labels >= V", n * lb, n)
        L.op("|", 2 * n, n)
        L.op("&", 2 * n, n)
        L.op("any", n, 1)
        L.sync("bool(any)")
    L.phase = "select"
    L.op("labels != ignore", n * lb, n)
    L.op("nonzero", n, 8 * m)
    L.sync("nonzero size")
    L.op("labels[valid]", 8 * m + m * lb, m * lb)
    L.copy_if(lb != 8, "labels .long()", m, lb, 8)
    L.op("hidden[valid]", 8 * m + m * d * e, m * d * e, 2)

    L.phase = "targets"
    if plan.impl == "triton":
        block_m, block_d, _ = fold_blocks("targets", d, plan.interpreted)
        for side, has_bias in (("policy", shape.bias), ("ref", shape.ref_bias)):
            L.triton(f"target logits {side} (Triton)", 2 * m * d * e + 8 * m + (m * e if has_bias else 0) + 4 * m)
    else:
        _torch_targets(L)
    if plan.keeps_probs_or_direction:
        L.op("r = target.clone()", 4 * m, 4 * m)

    _sweep(L, moved)
    _streams(L)
    if plan.keeps_direction:
        _direction(L)
    _backward(L)
    return [k for k in L.kernels if k.count > 0]


def _torch_targets(L: _Launches) -> None:
    shape = L.shape
    m, d, e, tr = shape.valid, shape.dim, shape.elem, shape.transform
    for side in ("policy", "ref") if not shape.shared else ("policy",):
        L.op(f"W[y] {side}", 8 * m + m * d * e, m * d * e)
        L.copy_if(e != 4, f"W[y] {side} .float()", m * d, e, 4)
    for side, has_bias in (("policy", shape.bias), ("ref", shape.ref_bias)):
        L.copy_if(e != 4, f"h {side} .float()", m * d, e, 4)
        L.kernels.append(Kernel(L.phase, f"target logit {side} (bmm)", "gemm", flops=2 * m * d,
                                bytes=2 * m * d * 4 + 4 * m))  # fmt: skip
        if has_bias:
            L.op(f"b[y] {side}", 8 * m + m * e, m * e)
            L.copy_if(e != 4, f"b[y] {side} .float()", m, e, 4)
            L.op(f"+ b[y] {side}", 8 * m, 4 * m)
        _transform_ops(L, f"target {side}", m, tr)


def _sweep(L: _Launches, moved: float) -> None:
    plan, shape = L.plan, L.shape
    m, d, vocab, e, tc = shape.valid, shape.dim, shape.vocab, shape.elem, plan.tensor_cores
    eg = e if tc else 4  # GEMM operand bytes
    ep = torch.empty((), dtype=plan.p_dtype).element_size()
    upcast = not tc and e != 4
    L.phase = "sweep"
    L.op("row max = -inf", 0, 16 * m)
    L.op("row sums = 0", 0, 16 * m)
    chunks, tiles = plan.token_chunks(m), plan.vocab_tiles(vocab)
    for rows, _, n_chunks in _groups(chunks):
        L.times = n_chunks
        L.copy_if(upcast, "h chunk .float()", rows * d, e, 4)
        L.copy_if(upcast, "h ref chunk .float()", rows * d, e, 4)
        for cols, first, n_tiles in _groups(tiles):
            L.times = n_chunks * n_tiles
            L.copy_if(upcast, "W tile .float()", cols * d, e, 4)
            L.gemm("logits policy", rows, cols, d, eg, eg, 4, False, tc)
            if not shape.shared:
                L.copy_if(upcast, "W ref tile .float()", cols * d, e, 4)
            L.gemm("logits reference", rows, cols, d, eg, eg, 4, False, tc)
            with_d = plan.keeps_direction and not first
            if plan.impl == "triton":
                _triton_fold(L, rows, cols, ep, with_d, moved)
            else:
                _torch_fold(L, rows, cols, ep, with_d)
            if plan.keeps_direction:
                L.gemm("direction P·W", rows, d, cols, ep, eg, 4, not first, tc)
    L.times = 1
    L.op("log Σ", 16 * m, 16 * m)


def _torch_fold(L: _Launches, rows: int, cols: int, ep: int, with_d: bool) -> None:
    shape, plan = L.shape, L.plan
    rc, tr, eb = rows * cols, shape.transform, shape.elem
    plane = rc * 4
    if shape.bias:
        L.op("fold: + b policy", plane + cols * eb, plane)
    if shape.ref_bias:
        L.op("fold: + b reference", plane + cols * eb, plane)
    _transform_ops(L, "fold", 2 * rc, tr)
    L.op("fold: z−z_ref", 2 * plane, plane)
    L.op("fold: ·ε", plane, plane)
    L.op("fold: z⁺", 2 * plane, plane)
    L.op("fold: z⁻", 2 * plane, plane)
    keeps = plan.keeps_probs_or_direction
    if keeps and tr.softcap is not None:
        _derivative_ops(L, "fold", rc)
    L.op("fold: max", 4 * plane, 16 * rows)
    L.op("fold: new max", 32 * rows, 16 * rows)
    L.op("fold: z − max", 4 * plane + 16 * rows, 4 * plane)
    L.op("fold: exp", 4 * plane, 4 * plane)
    L.op("fold: max−new", 32 * rows, 16 * rows)
    L.op("fold: rescale", 16 * rows, 16 * rows)
    L.op("fold: Σ·rescale", 32 * rows, 16 * rows)
    L.op("fold: Σ tile", 4 * plane, 16 * rows)
    L.op("fold: Σ +", 32 * rows, 16 * rows)
    L.op("fold: max ←", 16 * rows, 16 * rows)
    if not keeps:
        return
    if with_d:
        L.op("fold: r−r_new", 8 * rows, 4 * rows)
        L.op("fold: α", 4 * rows, 4 * rows)
        L.op("fold: D·α", rows * shape.dim * 4 + 4 * rows, rows * shape.dim * 4)
    L.op("fold: r ← r_new", 4 * rows, 4 * rows)
    if tr.softcap is not None:
        L.op("fold: P·J", 2 * plane, plane)
    # P is written where it is kept (or cast to the GEMM dtype); else the direction GEMM reads the exp'ed plane 0
    if plan.keep_probs or ep != 4 or tr.softcap is not None:
        L.op("fold: P →", plane, rc * ep)


def _triton_fold(L: _Launches, rows: int, cols: int, ep: int, with_d: bool, moved: float) -> None:
    """The fold kernel's loads and stores (see ``triton_fold._fold_kernel``), all counted as HBM traffic."""
    shape, plan = L.shape, L.plan
    block_m, block_n, _ = fold_blocks("fold", cols, plan.interpreted)
    programs = -(-rows // block_m)
    eb = shape.elem
    bias = (int(shape.bias) + int(shape.ref_bias)) * programs * cols * eb  # each program loads its columns' biases
    nbytes = 8 * rows * cols + bias + 64 * rows  # two planes once; 4 (max, Σ) read and written
    if plan.keeps_probs_or_direction:
        moved_rows = rows * moved
        nbytes += 4 * rows + rows * cols * ep + 4 * rows  # r in, P, r out
        redo_programs = min(programs, moved_rows) if moved_rows else 0
        nbytes += moved_rows * cols * (4 + ep) + redo_programs * cols * eb * int(shape.bias)
        if with_d:
            nbytes += moved_rows * shape.dim * 8
    L.triton("fold (Triton)", int(nbytes))


def _streams(L: _Launches) -> None:
    shape = L.shape
    m, n = shape.valid, shape.tokens
    L.phase = "streams"
    L.op("mix: z−z_ref", 8 * m, 4 * m)
    L.op("mix: ·ε", 4 * m, 4 * m)
    L.op("mix: z⁺", 8 * m, 4 * m)
    L.op("mix: z⁻", 8 * m, 4 * m)
    L.op("stack", 16 * m, 16 * m)
    L.op("− max", 32 * m, 16 * m)
    L.op("− log Σ", 32 * m, 16 * m)
    L.op("outputs = 0", 0, 4 * n, 4)
    L.op("outputs[valid] =", 8 * m + 4 * m, 4 * m, 4)


def _direction(L: _Launches) -> None:
    shape = L.shape
    m, d, tr = shape.valid, shape.dim, shape.transform
    md = m * d * 4
    L.phase = "direction"
    if L.plan.impl == "triton":
        block_m, block_d, _ = fold_blocks("finish", d, L.plan.interpreted)
        per_row = 3 * 4 + 8 + (4 if tr.softcap is not None else 0)  # r, max, log Σ, y (and z_y for the slope)
        L.triton("direction finish (Triton)", 2 * md + m * d * shape.elem + m * -(-d // block_d) * per_row)
        return
    L.op("r − max", 8 * m, 4 * m)
    L.op("− log Σ", 8 * m, 4 * m)
    L.op("exp", 4 * m, 4 * m)
    L.op("D·exp(r − max − log Σ)", md + 4 * m, md)
    if tr.softcap is not None:
        _derivative_ops(L, "target", m)
        L.op("W[y]·J_y", md + 4 * m, md)
    L.op("W[y] − D", 2 * md, md)
    if tr.softcap is None and tr.scale != 1.0:
        L.op("·scale", md, md)


def _backward(L: _Launches) -> None:
    plan, shape = L.plan, L.shape
    if plan.head == "none":
        return
    m, n, d, e = shape.valid, shape.tokens, shape.dim, shape.elem
    L.phase = "backward"
    L.op("g[valid]", 8 * m + 4 * m, 4 * m)
    if plan.head == "frozen":
        L.op("D·g", m * d * 4 + 4 * m, m * d * e)
    else:
        (_probs_backward if plan.keep_probs else _recompute_backward)(L)
        if shape.want_hidden:
            L.copy_if(e != 4, "grad h .to()", m * d, 4, e)
    if shape.want_hidden:
        L.op("grad hidden = 0", 0, n * d * e)
        L.op("grad hidden[valid] =", 8 * m + m * d * e, m * d * e)


def _weight_product(L: _Launches, cols: int, rows: int, eg: int, one_chunk: bool) -> None:
    """``Gᵀ·H`` of one tile: straight into the weight gradient (one chunk) or accumulated in fp32 (several)."""
    plan, shape = L.plan, L.shape
    d, e, tc = shape.dim, shape.elem, plan.tensor_cores
    if not one_chunk:
        L.gemm("Gᵀ·H (fp32 acc)", cols, d, rows, eg, eg, 4, True, tc)
        return
    if tc:
        L.gemm("Gᵀ·H", cols, d, rows, eg, eg, 4, False, tc)
        L.op("grad W tile .to()", cols * d * 4, cols * d * e)
    else:
        L.gemm("Gᵀ·H", cols, d, rows, eg, eg, 4, False, tc)
        L.copy_if(e != 4, "grad W tile .to()", cols * d, 4, e)


def _recompute_backward(L: _Launches) -> None:
    plan, shape = L.plan, L.shape
    m, d, vocab, e, tc = shape.valid, shape.dim, shape.vocab, shape.elem, plan.tensor_cores
    eg = e if tc else 4
    want_h, want_w, want_b = shape.want_hidden, shape.want_weight, shape.bias
    L.copy_if(not tc and e != 4, "h .float()", m * d, e, 4)
    if want_b:
        L.op("grad b = 0", 0, 4 * vocab)
    chunks, tiles = plan.token_chunks(m), plan.vocab_tiles(vocab)
    one_chunk = len(chunks) <= 1
    for cols, first, n_tiles in _groups(tiles):
        L.times = n_tiles
        L.copy_if(not tc and e != 4, "W tile .float()", cols * d, e, 4)
        if want_w and not one_chunk:
            L.op("grad W tile = 0", 0, cols * d * 4)
        for rows, _, n_chunks in _groups(chunks):
            L.times = n_tiles * n_chunks
            L.gemm("recompute logits", rows, cols, d, eg, eg, 4, False, tc)
            if plan.impl == "triton":
                block_m, block_n, _ = fold_blocks("grad_fold", cols, plan.interpreted)
                per_row = (4 + 4 + 4 + 8) * rows * -(-cols // block_n)
                bias = int(shape.bias) * -(-rows // block_m) * cols * e
                L.triton("grad fold (Triton)", rows * cols * (4 + eg) + per_row + bias)
            else:
                _torch_grad_fold(L, rows, cols, eg)
            if want_h:
                L.gemm("G·W", rows, d, cols, eg, eg, 4, not first, tc)
            if want_w:
                _weight_product(L, cols, rows, eg, one_chunk)
            if want_b:
                L.op("Σ_rows G", rows * cols * eg, 4 * cols)
                L.op("grad b +=", 8 * cols, 4 * cols)
        L.times = n_tiles
        if want_w and not one_chunk:
            L.op("grad W tile .to()", cols * d * 4, cols * d * e)
    L.times = 1
    if want_b:
        L.copy_if(e != 4, "grad b .to()", vocab, 4, e)


def _torch_grad_fold(L: _Launches, rows: int, cols: int, eg: int) -> None:
    shape = L.shape
    rc, tr, plane = rows * cols, shape.transform, rows * cols * 4
    if shape.bias:
        L.op("grad fold: + b", plane + cols * shape.elem, plane)
    _transform_ops(L, "grad fold", rc, tr)
    if tr.softcap is not None:
        _derivative_ops(L, "grad fold", rc)
    L.op("grad fold: − max", plane + 4 * rows, plane)
    L.op("grad fold: − log Σ", plane + 4 * rows, plane)
    L.op("grad fold: exp", plane, plane)
    L.op("grad fold: −g", 4 * rows, 4 * rows)
    L.op("grad fold: ·(−g)", plane + 4 * rows, plane)
    L.op("grad fold: y − v0", 8 * rows, 8 * rows)
    L.op("grad fold: clamp", 8 * rows, 8 * rows)
    L.op("grad fold: y ≥ v0", 8 * rows, rows)
    L.op("grad fold: y < v1", 8 * rows, rows)
    L.op("grad fold: inside", 2 * rows, rows)
    L.op("grad fold: inside .float()", rows, 4 * rows)
    L.op("grad fold: ·g", 8 * rows, 4 * rows)
    L.op("grad fold: one-hot", 8 * rows + 4 * rows + 4 * rows, 4 * rows)
    if tr.softcap is not None:
        L.op("grad fold: ·slope", 2 * plane, plane)
    elif tr.scale != 1.0:
        L.op("grad fold: ·scale", plane, plane)
    L.copy_if(eg != 4, "grad fold: G .to()", rc, 4, eg)


def _probs_backward(L: _Launches) -> None:
    plan, shape = L.plan, L.shape
    m, d, vocab, e, tc = shape.valid, shape.dim, shape.vocab, shape.elem, plan.tensor_cores
    eg = e if tc else 4
    ep = torch.empty((), dtype=plan.p_dtype).element_size()
    want_h, want_w, want_b = shape.want_hidden, shape.want_weight, shape.bias
    L.copy_if(not tc and e != 4, "h .float()", m * d, e, 4)
    for cols, first, n_tiles in _groups(plan.vocab_tiles(vocab)):
        L.times = n_tiles
        L.copy_if(not tc and e != 4, "W tile .float()", cols * d, e, 4)
        if plan.impl == "triton":
            block_m, block_n, _ = fold_blocks("grad_fold", cols, plan.interpreted)
            per_row = (4 * 5 + 8) * m * -(-cols // block_n)
            L.triton("grad fold from P (Triton)", 2 * m * cols * ep + per_row)
        else:
            _torch_grad_probs(L, cols, ep)
        if want_h:
            L.gemm("G·W", m, d, cols, eg, eg, 4, not first, tc)
        if want_w:
            _weight_product(L, cols, m, eg, True)
        if want_b:
            L.op("Σ_rows G", m * cols * eg, 4 * cols)
    L.times = 1
    if want_b:
        L.copy_if(e != 4, "grad b .to()", vocab, 4, e)


def _torch_grad_probs(L: _Launches, cols: int, ep: int) -> None:
    shape = L.shape
    rows, tr = shape.valid, shape.transform
    L.op("grad P: r − max", 8 * rows, 4 * rows)
    L.op("grad P: − log Σ", 8 * rows, 4 * rows)
    L.op("grad P: exp", 4 * rows, 4 * rows)
    L.op("grad P: ·g", 8 * rows, 4 * rows)
    L.op("grad P: −", 4 * rows, 4 * rows)
    if tr.softcap is None and tr.scale != 1.0:
        L.op("grad P: ·scale", 4 * rows, 4 * rows)
    L.op("grad P: P·coef", rows * cols * ep + 4 * rows, rows * cols * ep)
    if tr.softcap is not None:
        _derivative_ops(L, "grad P target", rows)
    for name in ("z_y − max", "− log Σ"):
        L.op(f"grad P: {name}", 8 * rows, 4 * rows)
    for name in ("exp", "neg", "1 −", "·g", "·slope"):
        L.op(f"grad P: {name}", (8 if name in ("·g",) or (name == "·slope" and tr.softcap) else 4) * rows, 4 * rows)
    L.op("grad P: y ≥ v0", 8 * rows, rows)
    L.op("grad P: y < v1", 8 * rows, rows)
    L.op("grad P: inside", 2 * rows, rows)
    L.op("grad P: y − v0", 8 * rows, 8 * rows)
    L.op("grad P: clamp", 8 * rows, 8 * rows)
    L.op("grad P: gather", 8 * rows + rows * ep, rows * ep)
    L.copy_if(ep != 4, "grad P: gather .float()", rows, ep, 4)
    L.op("grad P: where", rows + 8 * rows, 4 * rows)
    L.copy_if(ep != 4, "grad P: value .to()", rows, 4, ep)
    L.op("grad P: scatter", 8 * rows + rows * ep, rows * ep)


# ------------------------------------------------------------------------------------------------- cost model


@dataclass(frozen=True)
class Calibration:
    """Measured GEMM efficiencies (fraction of peak by flops) replacing :data:`GEMM_EFFICIENCY` for one GPU."""

    gpu: str
    points: tuple[tuple[float, float], ...]


def calibrated(measurement: dict) -> Calibration:
    """The calibration hook: a ``docs/bench_head_gpu.json`` written by ``scripts/gpu_suite.sh`` gives its GPU's
    measured GEMM efficiencies (``measurement["calibration"]``); :func:`kernel_seconds` uses them instead of
    :data:`GEMM_EFFICIENCY` for that GPU."""
    cal = measurement["calibration"]
    return Calibration(cal["gpu"], tuple((float(f), float(e)) for f, e in cal["gemm_efficiency"]))


def gemm_efficiency(flops: float, c_read: float, gpu: Gpu, calibration: Calibration | None = None) -> float:
    """Modelled fraction of ``gpu``'s tensor-core peak a GEMM of ``flops`` reaches (see the module docstring)."""
    points = calibration.points if calibration is not None else GEMM_EFFICIENCY
    (f0, e0), (f1, e1) = points[0], points[-1]
    if flops >= f1:
        eff = e1
    elif flops >= f0:
        eff = e0 + (e1 - e0) * math.log(flops / f0) / math.log(f1 / f0)
    else:
        eff = e0 * (max(flops, 1.0) / f0) ** SMALL_GEMM_EXPONENT
    eff = min(eff, gpu.best_gemm)
    if c_read:
        main = flops / (eff * gpu.tc_flops)
        eff *= main / (main + c_read / (HBM_EFFICIENCY * gpu.hbm_bytes))
    return eff


def kernel_seconds(k: Kernel, gpu: Gpu, calibration: Calibration | None = None) -> float:
    """Modelled time of ``k.count`` launches of ``k`` on ``gpu``."""
    if k.kind == "sync":
        return k.count * SYNC_S
    memory = k.bytes / (HBM_EFFICIENCY * gpu.hbm_bytes)
    compute = 0.0
    if k.kind == "gemm":
        peak = gpu.tc_flops if k.tensor_cores else gpu.simt_flops
        cal = calibration if calibration is not None and calibration.gpu == gpu.name else None
        compute = k.flops / (gemm_efficiency(k.flops, k.c_read, gpu, cal) * peak)
    return k.count * (max(compute, memory) + LAUNCH_S)


def plan_seconds(kernels: list[Kernel], gpu: Gpu, calibration: Calibration | None = None) -> float:
    return sum(kernel_seconds(k, gpu, calibration) for k in kernels)


def launch_count(kernels: list[Kernel]) -> int:
    return sum(k.count for k in kernels if k.kind != "sync")


def workspace_bytes(plan: HeadPlan, shape: HeadShape) -> int:
    """Peak bytes the head holds beyond its inputs and outputs: tile buffers, the direction or the kept ``P``, the
    target rows and the backward's buffers."""
    m, d, vocab, e = shape.valid, shape.dim, shape.vocab, shape.elem
    ep = torch.empty((), dtype=plan.p_dtype).element_size()
    rows, cols = min(plan.token_chunk, m), min(plan.vocab_chunk, vocab)
    tiles = len(plan.vocab_tiles(vocab))
    eg = e if plan.tensor_cores else 4
    targets = m * d * 4 * (1 if shape.shared else 2)
    kept = 0
    if plan.keeps_direction:
        kept = m * d * 4
    elif plan.keep_probs:
        kept = m * vocab * ep + tiles * m * 4
    forward = plan.planes * rows * cols * 4 + (rows * cols * ep if plan.keeps_direction else 0) + targets + kept
    backward = kept
    if plan.head == "trainable":
        backward += m * d * 4 + cols * d * 4  # grad h (fp32), one weight-gradient tile (fp32)
        if not plan.keep_probs:
            backward += rows * cols * (4 + (eg if eg != 4 else 0))
    return max(forward, backward)


# --------------------------------------------------------------------------------------------------- planner


def cpu_plan(shape: HeadShape, impl: str, token_chunk: int | None, vocab_chunk: int | None) -> HeadPlan:
    """CPU (and the interpreter): what measures best there, the chunked defaults, recomputing backward."""
    return HeadPlan(impl=impl, head=shape.head, token_chunk=token_chunk or CPU_TILES[0],
                    vocab_chunk=vocab_chunk or CPU_TILES[1], tensor_cores=False, p_dtype=torch.float32,
                    interpreted=impl == "triton")  # fmt: skip


def candidates(shape: HeadShape, impls: tuple[str, ...], tensor_cores: bool, token_chunk: int | None = None,
               vocab_chunk: int | None = None) -> list[HeadPlan]:  # fmt: skip
    """Every plan the planner weighs on CUDA for ``shape``: the folds ``impls`` × token chunks × vocabulary tiles
    (or the caller's) × keeping ``P`` or not (trainable head)."""
    m, vocab = max(shape.valid, 1), shape.vocab
    chunk_sizes = [token_chunk] if token_chunk else sorted({min(c, m) for c in TOKEN_CHUNKS if c < 2 * m} | {m})
    tile_sizes = [vocab_chunk] if vocab_chunk else sorted({min(c, vocab) for c in VOCAB_CHUNKS})
    p_dtype = shape.dtype if tensor_cores else torch.float32
    keeps = (False, True) if shape.head == "trainable" else (False,)
    return [HeadPlan(impl, shape.head, tc_, vc, tensor_cores, p_dtype, keep)
            for impl in impls for tc_ in chunk_sizes for vc in tile_sizes for keep in keeps]  # fmt: skip


def best_plan(shape: HeadShape, impls: tuple[str, ...], gpu: Gpu, workspace: int, tensor_cores: bool = True,
              token_chunk: int | None = None, vocab_chunk: int | None = None) -> HeadPlan:  # fmt: skip
    """The modelled-fastest plan among :func:`candidates` whose workspace fits ``workspace`` bytes (if none does,
    the one with the smallest workspace)."""
    plans = candidates(shape, impls, tensor_cores, token_chunk, vocab_chunk)
    fitting = [p for p in plans if workspace_bytes(p, shape) <= workspace]
    if not fitting:
        return min(plans, key=lambda p: workspace_bytes(p, shape))
    return min(fitting, key=lambda p: (plan_seconds(list(_launches_cached(p, shape, MOVED_ROW_FRACTION, True)), gpu),
                                       workspace_bytes(p, shape)))  # fmt: skip


def gpu_model(device: torch.device) -> Gpu:
    """The model of ``device``: A100 constants on an A100 (or A800/A30-class Ampere part), H100 otherwise."""
    try:
        name = torch.cuda.get_device_name(device)
    except Exception:  # noqa: BLE001 - the planner must not fail on a naming problem
        name = ""
    return GPUS["A100"] if "A100" in name or "A800" in name else GPUS["H100"]


__all__ = [
    "CPU_TILES",
    "DEFAULT_WORKSPACE_MB",
    "GEMM_EFFICIENCY",
    "GPUS",
    "HBM_EFFICIENCY",
    "LAUNCH_S",
    "SYNC_S",
    "Gpu",
    "HeadPlan",
    "HeadShape",
    "Kernel",
    "best_plan",
    "calibrated",
    "candidates",
    "cpu_plan",
    "fold_blocks",
    "gemm_efficiency",
    "kernel_seconds",
    "launch_count",
    "launches",
    "lazy_tau",
    "plan_seconds",
    "replace",
    "workspace_bytes",
]
