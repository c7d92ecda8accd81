"""ε-DPO math: per-pair decisions, per-pair β, the sigmoid loss and the β controller.

Imports only torch. Every input is a per-pair sequence log-probability of shape ``[B]`` (sum over
completion tokens); see ``EDPO_SPEC.md`` for the definitions. Two deliberate fixes to the authors'
reference trainer live here: label smoothing uses ``log σ(−β_i·m_i)`` in its second term, and the β
controller averages the decisions over every pair of an optimizer step (exact sum and count, all-reduced
over data-parallel ranks) instead of averaging per-micro-batch means.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F


class EDPOLossOutput(NamedTuple):
    """Per-pair outputs of :func:`edpo_loss`, each ``[B]``.

    ``losses`` carries the gradient; the rest are detached.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    decisions: torch.Tensor
    betas: torch.Tensor


def check_epsilon_beta(beta: float, epsilon: float) -> None:
    """Raise ``ValueError`` unless ``β > 0`` and ``0 < ε < 1`` (both finite)."""
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}.")
    if not (math.isfinite(epsilon) and 0 < epsilon < 1):
        raise ValueError(
            f"epsilon must lie strictly between 0 and 1, got {epsilon!r} "
            "(at epsilon >= 1 the (1-ε)·z_θ + ε·z_ref mix is no longer a mix; the paper uses 0.005-0.02)."
        )


def epsilon_decisions(
    policy_logratio: torch.Tensor, plus_logratio: torch.Tensor, minus_logratio: torch.Tensor
) -> torch.Tensor:
    """Per-pair decision ``s_i`` ∈ {−1, 0, +1} as float32 ``[B]`` (no gradient).

    ``+1`` when ``L⁺ > L > L⁻`` (relax the KL penalty), ``−1`` when ``L⁻ > L > L⁺`` (tighten it), else 0.
    Each argument is ``log π(y_w|x) − log π(y_l|x)`` for the policy, the ``(1+ε)`` mix and the ``(1−ε)`` mix.
    """
    policy, plus, minus = policy_logratio.detach(), plus_logratio.detach(), minus_logratio.detach()
    relax = (plus > policy) & (policy > minus)
    tighten = (minus > policy) & (policy > plus)
    return relax.float() - tighten.float()


def pair_betas(beta: float, epsilon: float, decisions: torch.Tensor) -> torch.Tensor:
    """``β_i = β / (1 + ε·s_i)`` as float32 ``[B]``."""
    return beta / (1.0 + epsilon * decisions.float())


class PairLogps(NamedTuple):
    """Sequence log-probs of ``B`` preference pairs under one model or mix: ``chosen`` and ``rejected``, ``[B]``
    each (sums over completion tokens)."""

    chosen: torch.Tensor
    rejected: torch.Tensor

    @property
    def logratio(self) -> torch.Tensor:
        """``log π(y_w|x) − log π(y_l|x)``, ``[B]``."""
        return self.chosen - self.rejected


def edpo_loss(
    *,
    policy: PairLogps,
    ref: PairLogps,
    plus: PairLogps,
    minus: PairLogps,
    beta: float,
    epsilon: float,
    label_smoothing: float = 0.0,
) -> EDPOLossOutput:
    """Sigmoid DPO loss with per-pair ``β_i`` from the pairs' sequence log-probs under the policy, the reference and
    the ``(1+ε)`` / ``(1−ε)`` mixes (the four streams of :class:`edpo_plugin.ops.LinearLogprobs`, summed per
    sequence), each a :class:`PairLogps` of ``[B]`` tensors; keyword-only, so that no two look-alike groups can trade
    places silently.

    Gradient flows through ``policy`` only. ``label_smoothing`` is the conservative-DPO ``α``:
    ``ℓ_i = −(1−α)·log σ(β_i·m_i) − α·log σ(−β_i·m_i)``.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing!r}.")
    decisions = epsilon_decisions(policy.logratio, plus.logratio, minus.logratio)
    betas = pair_betas(beta, epsilon, decisions).to(policy.chosen.dtype)
    chosen_logratio = policy.chosen - ref.chosen.detach()
    rejected_logratio = policy.rejected - ref.rejected.detach()
    logits = betas * (chosen_logratio - rejected_logratio)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits)
    if label_smoothing > 0:
        losses = losses - label_smoothing * F.logsigmoid(-logits)
    return EDPOLossOutput(
        losses=losses,
        chosen_rewards=(betas * chosen_logratio).detach(),
        rejected_rewards=(betas * rejected_logratio).detach(),
        decisions=decisions,
        betas=betas.detach(),
    )


class BetaController:
    """Holds the global β and moves it once per optimizer step: ``β ← β / (1 + ε·s̄)``.

    ``accumulate`` is called for every micro-batch; ``step`` once per optimizer step. ``s̄`` is the exact
    mean of ``s_i`` over every pair accumulated since the last step, on every data-parallel rank (sum and
    count are all-reduced when ``torch.distributed`` is initialised), so all ranks end with the same β.
    """

    def __init__(self, beta: float, epsilon: float) -> None:
        check_epsilon_beta(beta, epsilon)
        self.beta = float(beta)
        self.epsilon = float(epsilon)
        self._pending: torch.Tensor | None = None  # float64 [4]: sum s_i, count, #(+1), #(-1)

    def accumulate(self, decisions: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add one micro-batch of decisions ``[B]`` (values in {−1, 0, 1}) without a host sync.

        ``mask`` (bool ``[B]``, optional) leaves out pairs that did not contribute to the loss.
        """
        d = decisions.detach().to(torch.float64).reshape(-1)
        keep = torch.ones_like(d) if mask is None else mask.detach().reshape(-1).to(d)
        d = d * keep
        stats = torch.stack([d.sum(), keep.sum(), (d > 0).sum().double(), (d < 0).sum().double()])
        self._pending = stats if self._pending is None else self._pending + stats.to(self._pending.device)

    def step(self) -> dict[str, float] | None:
        """Apply the β update from everything accumulated; return the logged values or ``None``.

        The dict holds ``beta`` (β before the update), ``avg_steps`` (s̄), ``p_epsilon_steps`` and
        ``n_epsilon_steps`` (fractions of pairs with ``s_i = +1`` / ``−1``). Collective when distributed:
        every rank must call it at the same optimizer step.
        """
        pending = self._pending
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            if pending is None:  # a rank with no pair still takes part in the collective
                pending = torch.zeros(4, dtype=torch.float64, device=_collective_device())
            pending = pending.to(_collective_device())
            dist.all_reduce(pending, op=dist.ReduceOp.SUM)
        self._pending = None
        if pending is None:
            return None
        total, count, n_plus, n_minus = pending.tolist()
        if count == 0:
            return None
        avg = total / count
        logged = {
            "beta": self.beta,
            "avg_steps": avg,
            "p_epsilon_steps": n_plus / count,
            "n_epsilon_steps": n_minus / count,
        }
        self.beta = self.beta / (1.0 + self.epsilon * avg)
        return logged

    def state_dict(self) -> dict[str, float]:
        return {"beta": self.beta, "epsilon": self.epsilon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        check_epsilon_beta(float(state["beta"]), float(state["epsilon"]))
        if not math.isclose(float(state["epsilon"]), self.epsilon):
            raise ValueError(
                f"checkpoint was trained with epsilon={state['epsilon']}, this run sets epsilon={self.epsilon}; "
                "use the same epsilon to resume."
            )
        self.beta = float(state["beta"])
        self._pending = None


def _collective_device() -> torch.device:
    """The device the process group's backend reduces on (CUDA for NCCL, else CPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
