"""First-use self-check of the Triton head, behind ``impl="auto"``.

The first time the planner would pick a Triton plan for a (device, dtype), :func:`triton_passes_self_check` runs
the Triton folds under the plans a GPU runs — a frozen shared head (lazy reference, direction rescaled in the fold),
a trainable unshared head recomputing its tiles and one keeping ``P`` — at the production specialisation (the CPU
tiles, so the kernels compile with 16-divisible strides; d = 128) on a probe of 48 rows with ignored positions, a
vocabulary of one full tile plus a ragged one, large logits (so references move), a bias, a scale and a soft cap, and
compares its four streams and its gradients with the PyTorch fold on the same inputs and plan. A compile error, a
launch error or a mismatch makes it warn once, naming the device and the error, and ``auto`` plans with the PyTorch
fold for that (device, dtype) from then on. The result is cached per process; the probe costs milliseconds on a GPU
(plus the kernels' first compilation, which the real call would pay anyway).

Imports torch (triton lazily, through the Triton path itself).
"""

from __future__ import annotations

import warnings

import torch

_RESULTS: dict[tuple[str, int | None, torch.dtype], bool] = {}
# Both folds feed the same GEMMs; they differ by the fold's fp32 rounding (tanh, exp), far below these bounds.
STREAM_TOL = 1e-5
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 2**-7, torch.float16: 2**-7}  # ~4× the outputs' own rounding


def triton_passes_self_check(device: torch.device, dtype: torch.dtype) -> bool:
    """True if the Triton head matches the chunked head on a small probe on ``device`` with ``dtype`` inputs
    (cached; warns once on failure)."""
    key = (device.type, device.index, dtype)
    if key not in _RESULTS:
        try:
            # the first caller may be an evaluation loop under no_grad or inference_mode: the probe needs autograd
            with torch.inference_mode(False), torch.enable_grad():
                problem = _probe(device, dtype)
        except Exception as exc:  # a compile or launch failure of any kind means "do not use Triton here"
            problem = f"{type(exc).__name__}: {exc}"
        if problem is not None:
            warnings.warn(
                f"edpo_plugin: the Triton log-prob head failed its self-check on {_device_name(device)} with "
                f"{dtype} inputs ({problem}); edpo_head 'auto' uses the chunked PyTorch head there instead.",
                RuntimeWarning,
                stacklevel=3,
            )
        _RESULTS[key] = problem is None
    return _RESULTS[key]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        try:
            return f"{device} ({torch.cuda.get_device_name(device)})"
        except Exception:  # noqa: BLE001 - naming the device must not fail the fallback
            return str(device)
    return str(device)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def _probe(device: torch.device, dtype: torch.dtype) -> str | None:
    """None if the Triton head agrees with the chunked head, else a description of the first disagreement."""
    from edpo_plugin.ops.chunked import PlanRequest, fused_linear_logprobs
    from edpo_plugin.ops.contract import HeadCall, HeadOperands
    from edpo_plugin.ops.engine import tensor_core_gemms
    from edpo_plugin.ops.plan import CPU_TILES, HeadPlan, interpreting
    from edpo_plugin.ops.transform import LogitTransform

    g = torch.Generator().manual_seed(0)
    n, d, vocab = 48, 128, CPU_TILES[1] + 515
    tensor_cores = tensor_core_gemms(device, dtype)

    def rand(*shape: int, s: float = 1.0) -> torch.Tensor:
        return (s * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype)

    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::5] = -100
    labels = labels.to(device)
    hidden, ref_hidden = rand(n, d, s=3.0), rand(n, d, s=3.0)
    weight, ref_weight, bias, ref_bias = rand(vocab, d), rand(vocab, d), rand(vocab), rand(vocab)
    upstream = torch.randn(n, generator=g).to(device)
    transform = LogitTransform(0.5, 30.0)
    for head, trainable, keep_probs in (("frozen", False, False), ("trainable", True, False),
                                        ("trainable (kept P)", True, True)):  # fmt: skip
        results = {}
        for impl in ("triton", "chunked"):
            plan = HeadPlan(impl, "trainable" if trainable else "frozen", *CPU_TILES, tensor_cores,
                            dtype if tensor_cores else torch.float32, keep_probs,
                            interpreted=impl == "triton" and (interpreting() or device.type != "cuda"))  # fmt: skip
            h = hidden.clone().requires_grad_()
            w = weight.clone().requires_grad_(trainable)
            b = bias.clone().requires_grad_(trainable)
            wr, br = (ref_weight, ref_bias) if trainable else (w, b)
            with torch.enable_grad():
                call = HeadCall(HeadOperands(h, w, b), HeadOperands(ref_hidden, wr, br), labels, 0.05,
                                transform=transform)  # fmt: skip
                out = fused_linear_logprobs(call, PlanRequest(plan=plan))
                leaves = [h, w, b] if trainable else [h]
                grads = torch.autograd.grad((out[0] * upstream).sum(), leaves)
            results[impl] = (tuple(out), grads)
        for name, got, want in zip(("policy", "ref", "plus", "minus"), results["triton"][0], results["chunked"][0]):
            if not torch.isfinite(got).all() or _rel(got, want) > STREAM_TOL:
                return f"{head} head: {name} stream differs from the chunked head by {_rel(got, want):.1e}"
        for name, got, want in zip(("hidden", "weight", "bias"), results["triton"][1], results["chunked"][1]):
            tol = GRAD_TOL.get(dtype, 3e-2)
            if not torch.isfinite(got).all() or _rel(got, want) > tol:
                return f"{head} head: {name} gradient differs from the chunked head by {_rel(got, want):.1e}"
    return None
