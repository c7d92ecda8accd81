"""Fused ε-DPO log-prob head in PyTorch: token chunks × vocabulary tiles, online logsumexp, no full logits.

Forward, per chunk of completion tokens (ignored positions are dropped first), sweeps the vocabulary in tiles of
``vocab_chunk`` columns and keeps, for each of the four logit vectors z_θ, z_ref, (1+ε)z_θ−εz_ref and
(1−ε)z_θ+εz_ref, a running max and a running sum of exponentials (fp32, whatever the input dtype). Target
logits come from one indexed dot product per token. The largest temporary is ``4 × token_chunk × vocab_chunk``
fp32.

Backward (gradient of the policy stream only; the rest are constants):

- frozen head (``weight``/``bias`` need no grad, the LoRA/QLoRA case): d log p / dh = W[y] − softmax(Wh)ᵀW is
  accumulated online during the forward sweep (same rescaling as the running sum) and saved as ``[M, d]``
  fp32; backward only scales it by the upstream gradient. Three matmul-equivalents in all.
- trainable head: backward recomputes the policy logits tile by tile from the saved logsumexp and produces the
  hidden, weight and bias gradients. Five matmul-equivalents in all.

``use_triton=True`` swaps the forward statistics sweep for the Triton kernel in ``triton_lse.py`` when the head is
frozen; a second, policy-only sweep in the forward then builds the hidden-state gradient direction (four
matmul-equivalents in all). With a frozen head nothing reads ``W`` in backward, which is what a ZeRO-3-sharded head
needs. With a trainable head the PyTorch sweep is used, so that the recompute backward
normalises with a logsumexp from the same arithmetic.
"""

from __future__ import annotations

import torch

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
        token_chunk: int,
        vocab_chunk: int,
        use_triton: bool,
    ):
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
        # The recompute backward normalises with the forward's logsumexp, so with a trainable head both must come
        # from the same matmul arithmetic: the Triton sweep is used for frozen heads only.
        triton_stats = use_triton and not head_trainable
        keep_direction = want_hidden and not head_trainable and not triton_stats

        direction = None
        if triton_stats:
            from edpo_plugin.ops.triton_lse import triton_mix_lse

            lse = triton_mix_lse(h, w, b, hr, wr, br, epsilon, shared=shared)
            if want_hidden:
                # in the forward, while a ZeRO-3-gathered head is still whole; nothing reads W in backward
                direction = _policy_direction(h, w, b, y, token_chunk, vocab_chunk)
        else:
            lse, direction = _lse_sweep(
                h, w, b, hr, wr, br, y, epsilon, token_chunk, vocab_chunk, shared, keep_direction
            )

        target_p = _target_logits(h, w, b, y)
        target_r = _target_logits(hr, wr, br, y)
        targets = torch.stack(
            (
                target_p,
                target_r,
                (1 + epsilon) * target_p - epsilon * target_r,
                (1 - epsilon) * target_p + epsilon * target_r,
            )
        )
        streams = (targets - lse).unbind(0)
        outputs = tuple(hidden.new_zeros(n_tokens, dtype=torch.float32).index_copy_(0, valid_idx, s) for s in streams)

        ctx.mark_non_differentiable(*outputs[1:])
        ctx.n_tokens = n_tokens
        ctx.hidden_dtype = hidden.dtype
        ctx.has_bias = bias is not None
        ctx.token_chunk, ctx.vocab_chunk = token_chunk, vocab_chunk
        if direction is not None or not want_hidden and not head_trainable:
            ctx.save_for_backward(valid_idx, direction)
            ctx.recompute = False
        else:
            ctx.save_for_backward(valid_idx, y, lse[0].contiguous(), h, weight, bias)
            ctx.recompute = True
        return outputs

    @staticmethod
    def backward(ctx, grad_policy, *_unused):
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_bias = ctx.has_bias and ctx.needs_input_grad[2]
        grad_hidden = grad_weight = grad_bias = None
        if not ctx.recompute:
            valid_idx, direction = ctx.saved_tensors
            if direction is None:  # no input needed a gradient
                return (None,) * 12
            g = grad_policy.index_select(0, valid_idx).float()
            grad_valid = direction * g[:, None]
        else:
            valid_idx, y, lse, h, weight, bias = ctx.saved_tensors
            g = grad_policy.index_select(0, valid_idx).float()
            grad_valid, grad_weight, grad_bias = _recompute_grads(
                h, weight, bias, y, lse, g, ctx.token_chunk, ctx.vocab_chunk, want_hidden, want_weight, want_bias
            )
        if want_hidden:
            grad_hidden = grad_policy.new_zeros(ctx.n_tokens, grad_valid.shape[1], dtype=ctx.hidden_dtype)
            grad_hidden.index_copy_(0, valid_idx, grad_valid.to(ctx.hidden_dtype))
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None, None, None


def _target_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
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
    y: torch.Tensor,
    epsilon: float,
    token_chunk: int,
    vocab_chunk: int,
    shared: bool,
    keep_direction: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logsumexp ``[4, M]`` of the four streams and, if asked, ``W[y] − softmax(z_θ)ᵀW`` as fp32 ``[M, d]``."""
    n_valid, d = h.shape
    vocab = w.shape[0]
    lse = torch.empty(4, n_valid, dtype=torch.float32, device=h.device)
    direction = torch.empty(n_valid, d, dtype=torch.float32, device=h.device) if keep_direction else None
    for m0 in range(0, n_valid, token_chunk):
        m1 = min(m0 + token_chunk, n_valid)
        rows = m1 - m0
        hc = h[m0:m1].float()
        hrc = hr[m0:m1].float()
        stacked = torch.cat((hc, hrc)) if shared else None
        run_max = torch.full((4, rows), float("-inf"), dtype=torch.float32, device=h.device)
        run_sum = torch.zeros(4, rows, dtype=torch.float32, device=h.device)
        expect = torch.zeros(rows, d, dtype=torch.float32, device=h.device) if keep_direction else None
        buf = None
        for v0 in range(0, vocab, vocab_chunk):
            v1 = min(v0 + vocab_chunk, vocab)
            if buf is None or buf.shape[2] != v1 - v0:
                buf = torch.empty(4, rows, v1 - v0, dtype=torch.float32, device=h.device)
            wt = w[v0:v1].float()
            if shared:
                torch.mm(stacked, wt.t(), out=buf[:2].view(2 * rows, v1 - v0))
            else:
                torch.mm(hc, wt.t(), out=buf[0])
                torch.mm(hrc, wr[v0:v1].float().t(), out=buf[1])
            if b is not None:
                buf[0].add_(b[v0:v1].float())
            if br is not None:
                buf[1].add_(br[v0:v1].float())
            # buf[2] = (1+ε)z_θ − εz_ref ; buf[3] = (1−ε)z_θ + εz_ref
            torch.sub(buf[0], buf[1], out=buf[2])
            torch.mul(buf[2], -epsilon, out=buf[3]).add_(buf[0])
            buf[2].mul_(epsilon).add_(buf[0])
            new_max = torch.maximum(run_max, buf.amax(dim=2))
            buf.sub_(new_max.unsqueeze(2)).exp_()
            rescale = torch.exp(run_max - new_max)
            run_sum.mul_(rescale).add_(buf.sum(dim=2))
            if expect is not None:
                expect.mul_(rescale[0].unsqueeze(1)).addmm_(buf[0], wt)
            run_max = new_max
        lse[:, m0:m1] = run_max + run_sum.log()
        if direction is not None:
            expect.div_(run_sum[0].unsqueeze(1))
            direction[m0:m1] = w.index_select(0, y[m0:m1]).float() - expect
    return lse, direction


def _policy_direction(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    y: torch.Tensor,
    token_chunk: int,
    vocab_chunk: int,
) -> torch.Tensor:
    """fp32 ``[M, d]``: ``W[y] − softmax(W h + b)ᵀ W`` by one online sweep (self-normalised, frozen head)."""
    n_valid, d = h.shape
    w = weight.detach()
    out = torch.empty(n_valid, d, dtype=torch.float32, device=h.device)
    for m0 in range(0, n_valid, token_chunk):
        m1 = min(m0 + token_chunk, n_valid)
        hc = h[m0:m1].float()
        run_max = torch.full((m1 - m0,), float("-inf"), dtype=torch.float32, device=h.device)
        run_sum = torch.zeros(m1 - m0, dtype=torch.float32, device=h.device)
        expect = torch.zeros(m1 - m0, d, dtype=torch.float32, device=h.device)
        for v0 in range(0, w.shape[0], vocab_chunk):
            wt = w[v0 : v0 + vocab_chunk].float()
            z = hc @ wt.t()
            if bias is not None:
                z.add_(bias.detach()[v0 : v0 + vocab_chunk].float())
            new_max = torch.maximum(run_max, z.amax(dim=1))
            p = z.sub_(new_max.unsqueeze(1)).exp_()
            rescale = torch.exp(run_max - new_max)
            run_sum.mul_(rescale).add_(p.sum(dim=1))
            expect.mul_(rescale.unsqueeze(1)).addmm_(p, wt)
            run_max = new_max
        out[m0:m1] = w.index_select(0, y[m0:m1]).float() - expect.div_(run_sum.unsqueeze(1))
    return out


def _recompute_grads(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    y: torch.Tensor,
    lse: torch.Tensor,
    g: torch.Tensor,
    token_chunk: int,
    vocab_chunk: int,
    want_hidden: bool,
    want_weight: bool,
    want_bias: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``Σ_i g_i · log softmax(W h_i + b)[y_i]`` w.r.t. ``h`` (fp32 ``[M, d]``), ``W`` and ``b``.

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
            gc = g[m0:m1]
            # d/dz of g·(z[y] − lse) = g·(onehot(y) − softmax(z))
            grad_z = z.sub_(lse[m0:m1].unsqueeze(1)).exp_().mul_(-gc.unsqueeze(1))
            yc = y[m0:m1]
            in_tile = (yc >= v0) & (yc < v1)
            rows = rows_all[: m1 - m0][in_tile]
            grad_z[rows, yc[in_tile] - v0] += gc[in_tile]
            if grad_h is not None:
                grad_h[m0:m1].addmm_(grad_z, wt)
            if gw_tile is not None:
                gw_tile.addmm_(grad_z.t(), hc)
            if gb_tile is not None:
                gb_tile.add_(grad_z.sum(0))
        if grad_w is not None:
            grad_w[v0:v1] = gw_tile.to(grad_w.dtype)
        if grad_b is not None:
            grad_b[v0:v1] = gb_tile.to(grad_b.dtype)
    return grad_h, grad_w, grad_b
