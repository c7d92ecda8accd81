"""The four ε-DPO row statistics from the Triton head-forward kernel, without targets or direction.

``triton_mix_lse`` is the statistics-only launch of :func:`edpo_plugin.ops.triton_head_forward._head_forward_kernel`
(``WITH_TARGETS = WITH_DIRECTION = False``): a (token block × vocabulary split) grid computes ``z_θ = T(H Wᵀ + b)``
and ``z_ref`` tile by tile (fp32 accumulation; tensor-core dots on bf16/fp16, IEEE dots on fp32), forms the two
mixes in registers and keeps a running (max, Σ exp) for all four streams; the splits' partial statistics are
merged by a small PyTorch epilogue. 2 matmul-equivalents (the reference's shares the ``W`` tile when ``shared``).
Workspace: ``2 × 4 × splits × M`` fp32.
"""

from __future__ import annotations

import torch

from edpo_plugin.ops.transform import IDENTITY, LogitTransform
from edpo_plugin.ops.triton_head_forward import triton_head_forward


def triton_mix_lse(
    h: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    hr: torch.Tensor,
    wr: torch.Tensor,
    br: torch.Tensor | None,
    epsilon: float,
    transform: LogitTransform = IDENTITY,
    *,
    shared: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row statistics ``(max, log Σ exp(z − max))``, each fp32 ``[4, M]``, of z_θ, z_ref, (1+ε)z_θ−εz_ref and
    (1−ε)z_θ+εz_ref for rows of ``h``/``hr [M, d]``, with ``z = transform(W h + b)``."""
    out = triton_head_forward(h, w, b, hr, wr, br, None, epsilon, transform, shared=shared, with_direction=False)
    return out.row_max, out.row_logsum
