"""Independent float64 statements of EDPO_SPEC.md, written from the spec (not from the package) for tests."""

from __future__ import annotations

import torch


def token_logprobs64(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    epsilon: float,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    scale: float = 1.0,
    softcap: float | None = None,
) -> list[torch.Tensor]:
    """[policy, ref, plus, minus] float64 per-token log-probs from materialised logits; 0 at ignored labels.

    Logits are ``softcap·tanh(scale·(W h + b) / softcap)`` (no tanh when ``softcap`` is None), for both models.
    """
    z = hidden.double() @ weight.double().T
    zr = ref_hidden.double() @ ref_weight.double().T
    if bias is not None:
        z = z + bias.double()
    if ref_bias is not None:
        zr = zr + ref_bias.double()
    z, zr = z * scale, zr * scale
    if softcap is not None:
        z, zr = softcap * torch.tanh(z / softcap), softcap * torch.tanh(zr / softcap)
    valid = labels != ignore_index
    y = torch.where(valid, labels, torch.zeros_like(labels)).long()
    out = []
    for logits in (z, zr, (1 + epsilon) * z - epsilon * zr, (1 - epsilon) * z + epsilon * zr):
        lp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
        out.append(torch.where(valid, lp.gather(-1, y.unsqueeze(-1)).squeeze(-1), torch.zeros((), dtype=torch.float64)))
    return out


def decisions64(pc, pr, plc, plr, mic, mir) -> torch.Tensor:
    """s_i from sequence log-probs (policy, plus, minus; chosen and rejected), as float64 in {-1, 0, 1}."""
    out = []
    for i in range(len(pc)):
        L, Lp, Lm = float(pc[i] - pr[i]), float(plc[i] - plr[i]), float(mic[i] - mir[i])
        out.append(1.0 if Lp > L > Lm else (-1.0 if Lm > L > Lp else 0.0))
    return torch.tensor(out, dtype=torch.float64)


def loss64(pc, pr, rc, rr, s, beta: float, epsilon: float, alpha: float = 0.0) -> torch.Tensor:
    """Per-pair conservative-DPO sigmoid loss with β_i = β / (1 + ε s_i), float64."""
    betas = beta / (1 + epsilon * s.double())
    m = (pc.double() - rc.double()) - (pr.double() - rr.double())
    x = betas * m
    return -(1 - alpha) * torch.nn.functional.logsigmoid(x) - alpha * torch.nn.functional.logsigmoid(-x)


def beta_trajectory64(beta: float, epsilon: float, step_decisions: list[list[float]]) -> list[float]:
    """β before each step, then the final β: β ← β / (1 + ε · mean over every pair of the step)."""
    out = [beta]
    for ds in step_decisions:
        beta = beta / (1 + epsilon * (sum(ds) / len(ds)))
        out.append(beta)
    return out
