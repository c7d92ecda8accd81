"""The planner's kernel list (``edpo_plugin.ops.launches.launches``, what the cost model sums) against an independent
count of what the engine really dispatches: every PyTorch op through a ``TorchDispatchMode`` written here, with its own
byte rules (an op reads its tensor inputs and writes its outputs; indexing ops touch only the rows they index; views
are free), and every Triton launch with the bytes its loads and stores really touch (counted inside Triton's
interpreter, mask by mask). Tensor-core plans run on the meta device (CUDA's GEMM policy needs no GPU there); CPU
plans and the Triton kernels run on the CPU."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from edpo_plugin.ops import HeadCall, HeadOperands, LogitTransform, linear_logprobs, triton_available
from edpo_plugin.ops.chunked import PlanRequest, fused_linear_logprobs
from edpo_plugin.ops.launches import launches
from edpo_plugin.ops.plan import HeadPlan, HeadShape

FREE = {
    "view", "_unsafe_view", "t", "transpose", "slice", "select", "unsqueeze", "squeeze", "expand", "as_strided",
    "alias", "permute", "detach", "unbind", "split", "narrow", "lift_fresh", "_reshape_alias", "empty", "empty_like",
    "empty_strided", "new_empty", "new_empty_strided", "split_with_sizes",
}  # fmt: skip
GEMMS = {"mm", "addmm", "bmm", "baddbmm"}
CREATE = {"zeros", "full", "new_zeros", "zeros_like", "full_like", "fill_", "zero_"}


def _bytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _all(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _all(o)


@dataclass
class Count:
    launches: int = 0
    syncs: int = 0
    tc_flops: int = 0
    simt_flops: int = 0
    bytes: int = 0
    log: list = field(default_factory=list)

    def add(self, name: str, nbytes: int, launch: bool = True) -> None:
        self.launches += int(launch)
        self.bytes += int(nbytes)
        self.log.append((name, int(nbytes)))


class Dispatched(TorchDispatchMode):
    """Counts launches, host syncs, GEMM flops (tensor-core / fp32) and bytes of every op dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = Count()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._overloadpacket.__name__
        c = self.count
        if name in FREE:
            return out
        if name == "_local_scalar_dense":
            c.syncs += 1
            return out
        result = kwargs.get("out", out)
        if name.rstrip("_") in GEMMS:
            a, b = (args[0], args[1]) if name in ("mm", "bmm") else (args[1], args[2])
            flops = 2 * (a.shape[0] if a.dim() == 3 else 1) * a.shape[-2] * a.shape[-1] * b.shape[-1]
            if a.dtype in (torch.bfloat16, torch.float16):
                c.tc_flops += flops
            else:
                c.simt_flops += flops
            accumulated = _bytes(args[0]) if name.startswith("addmm") or name.startswith("baddbmm") else 0
            c.add(name, _bytes(a) + _bytes(b) + _bytes(result) + accumulated)
        elif name == "nonzero":
            c.syncs += 1
            c.add(name, _bytes(args[0]) + _bytes(out))
        elif name in CREATE:
            c.add(name, _bytes(result))
        elif name in ("index_select", "gather"):
            c.add(name, _bytes(args[2]) + 2 * _bytes(out))
        elif name in ("index_copy_", "scatter_"):
            c.add(name, _bytes(args[2]) + 2 * _bytes(args[3]))
        elif name in ("index_add_", "scatter_add_"):
            c.add(name, _bytes(args[2]) + 3 * _bytes(args[3]))
        elif name == "copy_":
            c.add(name, _bytes(args[1]) + _bytes(args[0]))
        else:
            read = sum(_bytes(t) for t in _all(args)) + sum(_bytes(v) for k, v in kwargs.items() if k != "out")
            write = _bytes(args[0]) if name.endswith("_") else sum(_bytes(t) for t in _all(result))
            c.add(name, read + write)
        return out


@contextlib.contextmanager
def triton_counted(count: Count):
    """Every interpreted Triton launch: one launch, and the bytes its masked loads and stores touch."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    real_load, real_store, real_run = builder.create_masked_load, builder.create_masked_store, None
    touched = [0]

    def load(self, ptrs, mask, other, cache_policy, is_volatile):
        touched[0] += int(mask.data.sum()) * ptrs.get_element_ty().primitive_bitwidth // 8
        return real_load(self, ptrs, mask, other, cache_policy, is_volatile)

    def store(self, ptrs, value, mask, cache_policy):
        touched[0] += int(mask.data.sum()) * ptrs.get_element_ty().primitive_bitwidth // 8
        return real_store(self, ptrs, value, mask, cache_policy)

    real_run = interpreter.InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        touched[0] = 0
        with _disable_current_modes():
            result = real_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        count.add(self.__name__, touched[0])
        return result

    builder.create_masked_load, builder.create_masked_store = load, store
    interpreter.InterpretedFunction.run = run
    try:
        yield
    finally:
        builder.create_masked_load, builder.create_masked_store = real_load, real_store
        interpreter.InterpretedFunction.run = real_run


def _planned(plan: HeadPlan, shape: HeadShape, checks: bool) -> Count:
    kernels = launches(plan, shape, moved=0.0, checks=checks)
    return Count(launches=sum(k.count for k in kernels if k.kind != "sync"),
                 syncs=sum(k.count for k in kernels if k.kind == "sync"),
                 tc_flops=sum(k.flops * k.count for k in kernels if k.kind == "gemm" and k.tensor_cores),
                 simt_flops=sum(k.flops * k.count for k in kernels if k.kind == "gemm" and not k.tensor_cores),
                 bytes=sum(k.bytes * k.count for k in kernels))  # fmt: skip


def _assert_same(planned: Count, counted: Count, what: str) -> None:
    for name in ("launches", "syncs", "tc_flops", "simt_flops", "bytes"):
        assert getattr(planned, name) == getattr(counted, name), f"{what}: {name} planned {getattr(planned, name)}, " \
            f"dispatched {getattr(counted, name)}; dispatched ops: {counted.log}"  # fmt: skip


def _head_call(shape: HeadShape, device: torch.device, scale: float = 1.0) -> tuple[HeadCall, list[torch.Tensor]]:
    """A flat :class:`HeadCall` of ``shape`` (ε = 0.1) and the tensors the policy stream's gradient is taken for."""
    g = torch.Generator().manual_seed(0)
    n, d, vocab, dtype = shape.tokens, shape.dim, shape.vocab, shape.dtype

    def rand(*size, grad=False):
        if device.type == "meta":
            return torch.empty(*size, dtype=dtype, device=device).requires_grad_(grad)
        return (scale * torch.randn(*size, generator=g)).to(dtype).requires_grad_(grad)

    trainable = shape.head == "trainable"
    h, hr = rand(n, d, grad=True), rand(n, d)
    w = rand(vocab, d, grad=trainable)
    wr = w if shape.shared else rand(vocab, d)
    b = rand(vocab, grad=trainable) if shape.bias else None
    br = (b if shape.shared else rand(vocab)) if shape.ref_bias else None
    labels = torch.randint(0, vocab, (n,), generator=g).to(device) if device.type != "meta" else torch.empty(
        n, dtype=torch.int64, device=device)  # fmt: skip
    leaves = [h] + ([w] + ([b] if b is not None else []) if trainable else [])
    return HeadCall(HeadOperands(h, w, b), HeadOperands(hr, wr, br), labels, 0.1, transform=shape.transform), leaves


@pytest.fixture
def meta_nonzero():
    """nonzero on the meta device: every label valid (all positions scored), as the planned shape says."""
    import torch.fx.experimental._config as fx_config

    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        yield


META_CASES = {
    # name: head, shared, bias, transform, token chunk, vocabulary tile, keep P
    "frozen-shared": ("frozen", True, False, (1.0, None), 16, 128, False),
    "frozen-unshared-bias-cap": ("frozen", False, True, (0.5, 30.0), 16, 128, False),
    "frozen-one-chunk-scale": ("frozen", True, False, (0.5, None), 64, 128, False),
    "trainable-chunks": ("trainable", False, False, (1.0, None), 16, 128, False),
    "trainable-one-chunk-bias-cap": ("trainable", False, True, (0.5, 30.0), 64, 128, False),
    "trainable-kept-P": ("trainable", False, False, (0.5, None), 16, 128, True),
    "trainable-kept-P-bias-cap": ("trainable", False, True, (0.5, 30.0), 16, 96, True),
}


@pytest.mark.parametrize("case", list(META_CASES))
def test_tensor_core_plans_dispatch_what_they_plan(case, meta_nonzero):
    """The GPU plans' GEMM policy (bf16 operands, fp32 output, kept P in bf16) on the meta device, with the PyTorch
    fold: launches, host syncs, tensor-core and fp32 GEMM flops, and bytes equal the plan's list exactly."""
    head, shared, bias, transform, token_chunk, vocab_chunk, keep = META_CASES[case]
    shape = HeadShape(tokens=40, valid=40, dim=24, vocab=300, dtype=torch.bfloat16, head=head, shared=shared,
                      bias=bias, ref_bias=bias, transform=LogitTransform(*transform))  # fmt: skip
    plan = HeadPlan("chunked", head, token_chunk, vocab_chunk, True, torch.bfloat16, keep_probs=keep)
    call, leaves = _head_call(shape, torch.device("meta"))
    mode = Dispatched()
    with mode:
        out = fused_linear_logprobs(call, PlanRequest(plan=plan))
        torch.autograd.grad(out[0], leaves, torch.empty(shape.tokens, device="meta"))
    _assert_same(_planned(plan, shape, checks=False), mode.count, case)


CPU_CASES = {
    # name: impl, dtype, head, shared, bias, transform, kept P
    "chunked-fp32-frozen": ("chunked", torch.float32, "frozen", True, False, (1.0, None), False),
    "chunked-bf16-trainable-bias": ("chunked", torch.bfloat16, "trainable", False, True, (0.5, None), False),
    "triton-fp32-frozen-cap": ("triton", torch.float32, "frozen", True, True, (0.5, 30.0), False),
    "triton-bf16-frozen-unshared": ("triton", torch.bfloat16, "frozen", False, False, (1.0, None), False),
    "triton-fp32-trainable-bias-cap": ("triton", torch.float32, "trainable", False, True, (0.5, 30.0), False),
    "triton-fp32-trainable-kept-P": ("triton", torch.float32, "trainable", False, True, (0.5, None), True),
}


@pytest.mark.parametrize("case", list(CPU_CASES))
def test_cpu_plans_dispatch_what_they_plan(case):
    """CPU plans through ``linear_logprobs`` (label check included; kept P through the fused function), the Triton
    kernels counted by the loads and stores they perform under the interpreter: equal to the plan's list."""
    impl, dtype, head, shared, bias, transform, keep = CPU_CASES[case]
    if impl == "triton" and not triton_available():
        pytest.skip("triton is not installed")
    # small logits: no row's reference moves after the target's logit (the plan is evaluated with moved = 0)
    shape = HeadShape(tokens=50, valid=50, dim=20, vocab=300, dtype=dtype, head=head, shared=shared, bias=bias,
                      ref_bias=bias, transform=LogitTransform(*transform))  # fmt: skip
    plan = HeadPlan(impl, head, 32, 128, False, torch.float32, keep_probs=keep, interpreted=impl == "triton")
    call, leaves = _head_call(shape, torch.device("cpu"), scale=0.3)
    (h, w, b), (hr, wr, br) = call.policy, call.ref
    upstream = torch.randn(shape.tokens)
    mode = Dispatched()
    with triton_counted(mode.count) if impl == "triton" else contextlib.nullcontext(), mode:
        if keep:
            out = fused_linear_logprobs(call, PlanRequest(plan=plan))
        else:
            out = linear_logprobs(h, w, call.labels, ref_hidden=hr, ref_weight=wr, bias=b, ref_bias=br,
                                  epsilon=call.epsilon, transform=call.transform, impl=impl, token_chunk=32,
                                  vocab_chunk=128)  # fmt: skip
        torch.autograd.grad(out[0], leaves, upstream)
    _assert_same(_planned(plan, shape, checks=not keep), mode.count, case)


def test_the_counter_sees_a_missing_kernel(meta_nonzero):
    """The comparison is not vacuous: the same run against the plan of a different vocabulary tile disagrees."""
    shape = HeadShape(tokens=40, valid=40, dim=24, vocab=300, dtype=torch.bfloat16, head="frozen")
    plan = HeadPlan("chunked", "frozen", 16, 128, True, torch.bfloat16)
    call, leaves = _head_call(shape, torch.device("meta"))
    mode = Dispatched()
    with mode:
        out = fused_linear_logprobs(call, PlanRequest(plan=plan))
        torch.autograd.grad(out[0], leaves, torch.empty(shape.tokens, device="meta"))
    with pytest.raises(AssertionError, match="launches planned"):
        _assert_same(_planned(HeadPlan("chunked", "frozen", 16, 64, True, torch.bfloat16), shape, False),
                     mode.count, "wrong tile")  # fmt: skip


def test_without_fp32_output_gemms_cuda_plans_upcast(monkeypatch, caplog):
    """A PyTorch whose CUDA GEMMs cannot write or accumulate fp32 from bf16 operands (2.6–2.9) gets plans that upcast
    their operands, not tensor-core plans that would fail at the first step. CPU PyTorch has no such GEMM at all, so
    the probe's failure branch runs here for real."""
    import logging

    from edpo_plugin.ops import dispatch, engine

    with caplog.at_level(logging.WARNING, logger="edpo_plugin.ops.engine"):
        assert engine.fp32_output_gemms.__wrapped__(torch.device("cpu")) is False
    assert "upcasts its GEMM operands to fp32" in caplog.text
    shape = HeadShape(tokens=8192, valid=8192, dim=4096, vocab=128256, dtype=torch.bfloat16, head="frozen",
                      shared=True)  # fmt: skip
    cuda = torch.device("cuda")
    assert dispatch.choose_plan(shape, cuda, "chunked").tensor_cores  # CUDA out of reach: taken to have them
    monkeypatch.setattr(engine, "fp32_output_gemms", lambda device: False)
    plan = dispatch.choose_plan(shape, cuda, "chunked")
    assert not plan.tensor_cores and plan.p_dtype == torch.float32


def test_lazy_fold_second_pass_costs_only_the_moved_rows(monkeypatch):
    """The lazy fold's second pass (P rewritten and D rescaled against a moved reference) touches only the rows whose
    reference moved, as the plan's fold kernel prices it (``moved`` = their share): one moved row in each of three
    programs, the kernel's loads and stores counted in the interpreter, against the planned fold alone."""
    if not triton_available():
        pytest.skip("triton is not installed")
    from edpo_plugin.ops import launches as launch_list
    from edpo_plugin.ops import triton_fold
    from edpo_plugin.ops.engine import RunningStats
    from edpo_plugin.ops.plan import lazy_tau

    def blocks(kind, cols, interpreted):
        return (16, 32, 4)

    monkeypatch.setattr(triton_fold, "fold_blocks", blocks)
    monkeypatch.setattr(launch_list, "fold_blocks", blocks)
    rows, cols, dim = 37, 101, 24
    g = torch.Generator().manual_seed(5)
    z = torch.zeros(4, rows, cols)
    z[0], z[1] = 3 * torch.randn(rows, cols, generator=g), 3 * torch.randn(rows, cols, generator=g)
    b_p, b_r = torch.randn(cols, generator=g), torch.randn(cols, generator=g)
    stats = RunningStats(torch.full((4, rows), -50.0), torch.ones(4, rows))  # an earlier tile's, far below this one
    top = (z[0] + b_p).amax(1)
    moved = torch.zeros(rows, dtype=torch.bool)
    moved[[0, 16, 32]] = True  # programs of 16 rows: one moved row in each
    r_in = torch.where(moved, top - 3 * lazy_tau(torch.float32, LogitTransform()), top - 1.0)
    r_out, p_out, direction = torch.empty(rows), torch.empty(rows, cols), torch.randn(rows, dim, generator=g)
    count = Count()
    with triton_counted(count):
        triton_fold.fold_triton(z, b_p, b_r, stats, 0.1, LogitTransform(), p_out, r_in, r_out, direction)
    assert torch.equal(r_out != r_in, moved)
    # the fold of a later tile (the first writes D by its GEMM, nothing to rescale) in a plan of two such tiles
    shape = HeadShape(tokens=rows, valid=rows, dim=dim, vocab=2 * cols, dtype=torch.float32, head="frozen",
                      shared=False, bias=True, ref_bias=True)  # fmt: skip
    plan = HeadPlan("triton", "frozen", rows, cols, False, torch.float32, interpreted=True)
    planned = [k.bytes for k in launches(plan, shape, moved=3 / rows) if k.name == "fold (Triton)"]
    assert planned[-1] == count.bytes, (planned, count.log)
