"""What a plan launches: every kernel of one forward + backward of the policy stream, in the engine's order.

:func:`launches` lists, for a :class:`edpo_plugin.ops.plan.HeadPlan` and a :class:`edpo_plugin.ops.plan.HeadShape`,
every PyTorch op, cuBLAS GEMM, Triton launch and host sync :mod:`edpo_plugin.ops.engine` and
:mod:`edpo_plugin.ops.chunked` dispatch (one device; the vocab-parallel collectives are not listed), with flops and
HBM bytes, grouped by identical tiles; :func:`edpo_plugin.ops.cost_model.plan_seconds` sums them.
``tests/ops/test_plan.py`` checks these lists against an independent count of what the engine dispatches, so a
change to the engine's loops must change this module too. :func:`workspace_bytes` is what a plan holds.

Imports only torch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from edpo_plugin.ops.cost_model import MOVED_ROW_FRACTION, Kernel
from edpo_plugin.ops.plan import HeadPlan, HeadShape, fold_blocks
from edpo_plugin.ops.transform import LogitTransform


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
    want_h, want_w, want_b = shape.want_hidden, shape.want_weight, shape.bias and shape.want_bias
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
    want_h, want_w, want_b = shape.want_hidden, shape.want_weight, shape.bias and shape.want_bias
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
    L.op("grad P: expm1", 4 * rows, 4 * rows)  # 1 − p_y = −expm1(·)
    L.op("grad P: neg", 4 * rows, 4 * rows)
    L.op("grad P: ·g", 8 * rows, 4 * rows)
    L.op("grad P: ·slope", (8 if tr.softcap else 4) * rows, 4 * rows)  # the slope is a tensor under a soft cap
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
