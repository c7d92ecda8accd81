"""FlashAttention-2's varlen attention as its documentation states it, in float64: the yardstick of ε-DPO's varlen
attention on CPU (tests) and of the real kernel on a GPU (benchmarks/gpu_padding_free.py)."""

from __future__ import annotations

import torch


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale, window, softcap, dropout):
    """FlashAttention-2's ``flash_attn_varlen_func`` as its documentation states it, in float64: sequence ``s`` has
    queries ``q[cu_q[s]:cu_q[s+1]]`` and keys ``k[cu_k[s]:cu_k[s+1]]``; causal with the mask aligned to the
    bottom-right corner (FlashAttention ≥ 2.1: query ``i`` of ``L_q`` sees key ``j`` of ``L_k`` iff
    ``j ≤ i + L_k − L_q``); ``window_size=(left, right)`` keeps ``j ≥ i + L_k − L_q − left``; ``softcap`` caps the
    scores ``cap·tanh(s / cap)``; key/value heads shared by ``H / H_kv`` query heads (GQA)."""
    assert dropout == 0.0
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    heads, kv_heads = q.shape[1], k.shape[1]
    for s in range(len(cu_q) - 1):
        qs = q[int(cu_q[s]) : int(cu_q[s + 1])].double()
        ks = k[int(cu_k[s]) : int(cu_k[s + 1])].double().repeat_interleave(heads // kv_heads, dim=1)
        vs = v[int(cu_k[s]) : int(cu_k[s + 1])].double().repeat_interleave(heads // kv_heads, dim=1)
        n_q, n_k = qs.shape[0], ks.shape[0]
        assert n_q <= max_q and n_k <= max_k
        scores = torch.einsum("ihd,jhd->hij", qs, ks) * (scale if scale is not None else qs.shape[-1] ** -0.5)
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        i = torch.arange(n_q, device=q.device)[:, None] + (n_k - n_q)
        j = torch.arange(n_k, device=q.device)[None, :]
        allowed = j <= i
        if window[0] >= 0:
            allowed &= j >= i - window[0]
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[int(cu_q[s]) : int(cu_q[s + 1])] = torch.einsum("hij,jhd->ihd", scores.softmax(-1), vs)
    return out.to(q.dtype)
