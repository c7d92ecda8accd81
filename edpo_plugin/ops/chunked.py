"""Fused ε-DPO log-prob head in PyTorch: token chunks × vocabulary tiles, online logsumexp, no full logits.

Forward, per chunk of completion tokens (ignored positions are dropped first), sweeps the vocabulary in tiles of
``vocab_chunk`` columns. Each tile's pre-logits ``W h + b`` of policy and reference go through the model's
:class:`~edpo_plugin.ops.transform.LogitTransform` (scale, soft cap), then the two mixes are formed as
``z_θ ± ε(z_θ − z_ref)`` (so that a policy equal to its reference gives bit-identical mixes), and for each of the
four logit vectors a running max and a running sum of exponentials are kept (fp32, whatever the input dtype).
Each row's statistics are returned as ``(max, log Σ exp(z − max))`` and never added together: the recompute below
evaluates ``exp((z − max) − log Σ)``, which does not inherit the rounding of a large ``max + log Σ``. Target logits
come from one indexed dot product per token. The largest temporary is ``4 × token_chunk × vocab_chunk`` fp32.

Backward (gradient of the policy stream only; the rest are constants), with ``J = dz/du`` of the transform:

- frozen head (``weight``/``bias`` need no grad, the LoRA/QLoRA case): d log p / dh = J_y W[y] − Σ_v p_v J_v W_v is
  accumulated online during the forward sweep (same rescaling as the running sum) and saved as ``[M, d]``
  fp32; backward only scales it by the upstream gradient. Three matmul-equivalents in all.
- trainable head: backward recomputes the policy logits tile by tile from the saved statistics and produces the
  hidden, weight and bias gradients. Five matmul-equivalents in all.

``use_triton=True`` replaces the forward sweep by one Triton kernel (:mod:`edpo_plugin.ops.triton_head_forward`)
that returns the statistics, the target logits and, when the hidden state needs a gradient, the direction above
(frozen or trainable head): 3 matmul-equivalents, on tensor cores for bf16/fp16 inputs (4 in tensor-core work
there: the direction's softmax weights enter as a hi + lo pair). With a frozen head nothing reads ``W`` in
backward, which is what a ZeRO-3-sharded head needs. With a trainable head, backward runs
:mod:`edpo_plugin.ops.triton_head_backward` (a Triton recompute of the logit gradient from the kernel's own
statistics, then ``Gᵀ H`` on the input dtype): 5 matmul-equivalents in all (7 in tensor-core work on bf16/fp16),
none of them an fp32 GEMM on bf16/fp16 inputs.

Autocast is disabled inside forward and backward. The PyTorch sweeps here (``use_triton=False``) still upcast every
tile to fp32 and run fp32 GEMMs whatever the input dtype: the portable fallback, exact but slow on a GPU.
"""

from __future__ import annotations

import torch

from edpo_plugin.ops.transform import IDENTITY, LogitTransform

DEFAULT_TOKEN_CHUNK = 1024
DEFAULT_VOCAB_CHUNK = 4096


def chunked_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    epsilon: float,
    bias: torch.Tensor | None,
    ref_bias: torch.Tensor | None,
    ignore_index: int,
    *,
    transform: LogitTransform = IDENTITY,
    token_chunk: int = DEFAULT_TOKEN_CHUNK,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    use_triton: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(policy, ref, plus, minus)``, fp32 ``[N]`` each, from ``hidden [N, d]``, ``weight [V, d]``, ``labels [N]``."""
    if token_chunk < 1 or vocab_chunk < 1:
        raise ValueError(f"token_chunk and vocab_chunk must be >= 1, got {token_chunk} and {vocab_chunk}.")
    return _ChunkedLinearLogprobs.apply(
        hidden,
        weight,
        bias,
        ref_hidden,
        ref_weight,
        ref_bias,
        labels,
        float(epsilon),
        ignore_index,
        transform,
        token_chunk,
        vocab_chunk,
        use_triton,
    )


class _ChunkedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        ref_hidden: torch.Tensor,
        ref_weight: torch.Tensor,
        ref_bias: torch.Tensor | None,
        labels: torch.Tensor,
        epsilon: float,
        ignore_index: int,
        transform: LogitTransform,
        token_chunk: int,
        vocab_chunk: int,
        use_triton: bool,
    ):
        with torch.autocast(hidden.device.type, enabled=False):
            return _forward(
                ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, epsilon, ignore_index,
                transform, token_chunk, vocab_chunk, use_triton,
            )  # fmt: skip

    @staticmethod
    def backward(ctx, grad_policy, *_unused):
        with torch.autocast(grad_policy.device.type, enabled=False):
            grads = _backward(ctx, grad_policy)
        return (*grads, None, None, None, None, None, None, None, None, None, None)


def _forward(
    ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, epsilon, ignore_index, transform,
    token_chunk, vocab_chunk, use_triton,
):  # fmt: skip
    n_tokens = hidden.shape[0]
    valid_idx = (labels != ignore_index).nonzero().squeeze(1)
    h = hidden.detach().index_select(0, valid_idx)
    hr = ref_hidden.detach().index_select(0, valid_idx)
    y = labels.index_select(0, valid_idx).long()
    w, wr = weight.detach(), ref_weight.detach()
    b = None if bias is None else bias.detach()
    br = None if ref_bias is None else ref_bias.detach()
    shared = ref_weight is weight and ref_bias is bias

    want_hidden = ctx.needs_input_grad[0]
    head_trainable = ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2])
    keep_direction = want_hidden and not head_trainable

    direction = None
    if use_triton:
        # One Triton kernel for statistics, targets and (if needed) the hidden-state direction, frozen or
        # trainable head alike; a trainable head's weight/bias gradients come from a Triton recompute that uses
        # the same dot arithmetic as these statistics (triton_head_backward).
        from edpo_plugin.ops.triton_head_forward import triton_head_forward

        fwd = triton_head_forward(h, w, b, hr, wr, br, y, epsilon, transform, shared=shared, with_direction=want_hidden)
        row_max, row_logsum, direction = fwd.row_max, fwd.row_logsum, fwd.direction
        target_p, target_r = fwd.targets.unbind(0)
    else:
        row_max, row_logsum, direction = _lse_sweep(
            h, w, b, hr, wr, br, y, epsilon, transform, token_chunk, vocab_chunk, shared, keep_direction
        )
        target_p = transform.apply_(_pre_logits_at(h, w, b, y))
        target_r = transform.apply_(_pre_logits_at(hr, wr, br, y))

    targets = torch.stack(mix_streams(target_p, target_r, epsilon))
    streams = ((targets - row_max) - row_logsum).unbind(0)
    outputs = tuple(hidden.new_zeros(n_tokens, dtype=torch.float32).index_copy_(0, valid_idx, s) for s in streams)

    ctx.mark_non_differentiable(*outputs[1:])
    ctx.n_tokens = n_tokens
    ctx.hidden_dtype = hidden.dtype
    ctx.has_bias = bias is not None
    ctx.transform = transform
    ctx.token_chunk, ctx.vocab_chunk = token_chunk, vocab_chunk
    if use_triton and head_trainable:
        ctx.mode = "triton"
        ctx.save_for_backward(valid_idx, direction, y, row_max[0].contiguous(), row_logsum[0].contiguous(), h,
                              weight, bias)  # fmt: skip
    elif direction is not None or not want_hidden and not head_trainable:
        ctx.save_for_backward(valid_idx, direction)
        ctx.mode = "direction"
    else:
        ctx.save_for_backward(valid_idx, y, row_max[0].contiguous(), row_logsum[0].contiguous(), h, weight, bias)
        ctx.mode = "recompute"
    return outputs


def _backward(ctx, grad_policy):
    want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    want_bias = ctx.has_bias and ctx.needs_input_grad[2]
    grad_hidden = grad_weight = grad_bias = None
    if ctx.mode == "direction":
        valid_idx, direction = ctx.saved_tensors
        if direction is None:  # no input needed a gradient
            return None, None, None
        g = grad_policy.index_select(0, valid_idx).float()
        grad_valid = direction * g[:, None]
    elif ctx.mode == "triton":
        from edpo_plugin.ops.triton_head_backward import triton_head_param_grads

        valid_idx, direction, y, row_max, row_logsum, h, weight, bias = ctx.saved_tensors
        g = grad_policy.index_select(0, valid_idx).float()
        grad_valid = direction * g[:, None] if want_hidden else None
        grad_weight, grad_bias = triton_head_param_grads(
            h, weight, bias, y, row_max, row_logsum, g, ctx.transform, want_weight, want_bias
        )
    else:
        valid_idx, y, row_max, row_logsum, h, weight, bias = ctx.saved_tensors
        g = grad_policy.index_select(0, valid_idx).float()
        grad_valid, grad_weight, grad_bias = _recompute_grads(
            h, weight, bias, y, row_max, row_logsum, g, ctx.transform, ctx.token_chunk, ctx.vocab_chunk,
            want_hidden, want_weight, want_bias,
        )  # fmt: skip
    if want_hidden:
        grad_hidden = grad_policy.new_zeros(ctx.n_tokens, grad_valid.shape[1], dtype=ctx.hidden_dtype)
        grad_hidden.index_copy_(0, valid_idx, grad_valid.to(ctx.hidden_dtype))
    return grad_hidden, grad_weight, grad_bias


def mix_streams(
    z: torch.Tensor, z_ref: torch.Tensor, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(z_θ, z_ref, z⁺, z⁻)`` with ``z^± = z_θ ± ε(z_θ − z_ref)`` (= (1±ε)z_θ ∓ εz_ref), out of place.

    Written as a correction to ``z_θ`` so that ``z_θ == z_ref`` gives ``z⁺ == z⁻ == z_θ`` exactly: otherwise the
    decisions of a fresh adapter would be decided by rounding.
    """
    delta = (z - z_ref).mul_(epsilon)
    return z, z_ref, z + delta, z - delta


def _pre_logits_at(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """fp32 ``[M]``: ``w[y_i] · h_i (+ b[y_i])`` without any ``[M, V]`` tensor."""
    out = torch.einsum("md,md->m", h.float(), w.index_select(0, y).float())
    return out if b is None else out + b.index_select(0, y).float()


def _lse_sweep(
    h: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    hr: torch.Tensor,
    wr: torch.Tensor,
    br: torch.Tensor | None,
    y: torch.Tensor | None,
    epsilon: float,
    transform: LogitTransform,
    token_chunk: int,
    vocab_chunk: int,
    shared: bool,
    keep_direction: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Row statistics ``(max, log Σ)``, each fp32 ``[4, M]``, of the four streams and, if asked, the policy's
    ``d log p / dh = J_y W[y] − Σ_v softmax(z)_v J_v W_v`` as fp32 ``[M, d]`` (without the ``J_y W[y]`` term when
    ``y`` is None: a vocabulary shard adds the rows it owns itself)."""
    n_valid, d = h.shape
    vocab = w.shape[0]
    row_max = torch.empty(4, n_valid, dtype=torch.float32, device=h.device)
    row_logsum = torch.empty(4, n_valid, dtype=torch.float32, device=h.device)
    direction = torch.empty(n_valid, d, dtype=torch.float32, device=h.device) if keep_direction else None
    capped = transform.softcap is not None
    for m0 in range(0, n_valid, token_chunk):
        m1 = min(m0 + token_chunk, n_valid)
        rows = m1 - m0
        hc = h[m0:m1].float()
        hrc = hr[m0:m1].float()
        run_max = torch.full((4, rows), float("-inf"), dtype=torch.float32, device=h.device)
        run_sum = torch.zeros(4, rows, dtype=torch.float32, device=h.device)
        expect = torch.zeros(rows, d, dtype=torch.float32, device=h.device) if keep_direction else None
        buf = None
        for v0 in range(0, vocab, vocab_chunk):
            v1 = min(v0 + vocab_chunk, vocab)
            if buf is None or buf.shape[2] != v1 - v0:
                buf = torch.empty(4, rows, v1 - v0, dtype=torch.float32, device=h.device)
            wt = w[v0:v1].float()
            # Two GEMMs of identical shape, never one over stacked rows: a GEMM's rounding can depend on a row's
            # position in it, and a policy equal to its reference must give bit-identical logits.
            torch.mm(hc, wt.t(), out=buf[0])
            torch.mm(hrc, wt.t() if shared else wr[v0:v1].float().t(), out=buf[1])
            if b is not None:
                buf[0].add_(b[v0:v1].float())
            if br is not None:
                buf[1].add_(br[v0:v1].float())
            transform.apply_(buf[:2])
            # buf[2] = z_θ + ε(z_θ − z_ref) ; buf[3] = z_θ − ε(z_θ − z_ref), as in mix_streams
            torch.sub(buf[0], buf[1], out=buf[3]).mul_(epsilon)
            torch.add(buf[0], buf[3], out=buf[2])
            torch.sub(buf[0], buf[3], out=buf[3])
            slope = transform.derivative(buf[0]) if expect is not None and capped else None
            new_max = torch.maximum(run_max, buf.amax(dim=2))
            buf.sub_(new_max.unsqueeze(2)).exp_()
            rescale = torch.exp(run_max - new_max)
            run_sum.mul_(rescale).add_(buf.sum(dim=2))
            if expect is not None:
                weighted = buf[0] if slope is None else slope.mul_(buf[0])
                expect.mul_(rescale[0].unsqueeze(1)).addmm_(weighted, wt)
            run_max = new_max
        row_max[:, m0:m1] = run_max
        row_logsum[:, m0:m1] = run_sum.log()
        if direction is not None:
            expect.div_(run_sum[0].unsqueeze(1))
            if y is None:
                torch.neg(expect, out=direction[m0:m1])
            else:
                direction[m0:m1] = _target_term(h[m0:m1], w, b, y[m0:m1], transform) - expect
            if not capped:
                direction[m0:m1].mul_(transform.scale)
    return row_max, row_logsum, direction


def _target_term(
    h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor, transform: LogitTransform
) -> torch.Tensor:
    """fp32 ``[M, d]``: ``J_y W[y]`` with a soft cap, plain ``W[y]`` otherwise (the constant scale is applied by the
    caller to the whole direction)."""
    rows = w.index_select(0, y).float()
    if transform.softcap is None:
        return rows
    slope = transform.derivative(transform.apply_(_pre_logits_at(h, w, b, y)))
    return rows.mul_(slope.unsqueeze(1))


def _recompute_grads(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    y: torch.Tensor,
    row_max: torch.Tensor,
    row_logsum: torch.Tensor,
    g: torch.Tensor,
    transform: LogitTransform,
    token_chunk: int,
    vocab_chunk: int,
    want_hidden: bool,
    want_weight: bool,
    want_bias: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``Σ_i g_i · log softmax(T(W h_i + b))[y_i]`` w.r.t. ``h`` (fp32 ``[M, d]``), ``W`` and ``b``.

    Vocabulary tiles outside, token chunks inside, so each weight-gradient tile is finished in fp32 and written
    once in the weight's dtype; the hidden gradient accumulates in fp32 ``[M, d]``.
    """
    n_valid, d = h.shape
    vocab = weight.shape[0]
    w = weight.detach()
    h32 = h.float()
    grad_h = torch.zeros(n_valid, d, dtype=torch.float32, device=h.device) if want_hidden else None
    grad_w = torch.empty_like(w) if want_weight else None
    grad_b = torch.empty_like(bias) if want_bias else None
    rows_all = torch.arange(n_valid, device=h.device)
    for v0 in range(0, vocab, vocab_chunk):
        v1 = min(v0 + vocab_chunk, vocab)
        wt = w[v0:v1].float()
        bt = None if bias is None else bias.detach()[v0:v1].float()
        gw_tile = torch.zeros(v1 - v0, d, dtype=torch.float32, device=h.device) if want_weight else None
        gb_tile = torch.zeros(v1 - v0, dtype=torch.float32, device=h.device) if want_bias else None
        for m0 in range(0, n_valid, token_chunk):
            m1 = min(m0 + token_chunk, n_valid)
            hc = h32[m0:m1]
            z = hc @ wt.t()
            if bt is not None:
                z.add_(bt)
            transform.apply_(z)
            slope = transform.derivative(z)
            gc = g[m0:m1]
            # d/dz of g·(z[y] − lse) = g·(onehot(y) − softmax(z)); softmax as exp((z − max) − log Σ)
            grad_z = z.sub_(row_max[m0:m1].unsqueeze(1)).sub_(row_logsum[m0:m1].unsqueeze(1)).exp_()
            grad_z.mul_(-gc.unsqueeze(1))
            yc = y[m0:m1]
            in_tile = (yc >= v0) & (yc < v1)
            rows = rows_all[: m1 - m0][in_tile]
            grad_z[rows, yc[in_tile] - v0] += gc[in_tile]
            grad_u = grad_z if isinstance(slope, float) and slope == 1.0 else grad_z.mul_(slope)  # dz/du
            if grad_h is not None:
                grad_h[m0:m1].addmm_(grad_u, wt)
            if gw_tile is not None:
                gw_tile.addmm_(grad_u.t(), hc)
            if gb_tile is not None:
                gb_tile.add_(grad_u.sum(0))
        if grad_w is not None:
            grad_w[v0:v1] = gw_tile.to(grad_w.dtype)
        if grad_b is not None:
            grad_b[v0:v1] = gb_tile.to(grad_b.dtype)
    return grad_h, grad_w, grad_b
