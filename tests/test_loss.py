"""ε-DPO math against the float64 statement of the spec in spec_reference.py."""

import math

import pytest
import torch

from edpo_plugin.loss import BetaController, PairLogps, edpo_loss, epsilon_decisions, pair_betas
from tests.numerics import BETA_RTOL, LOSS_GRAD_TOL, LOSS_TOL
from tests.spec_reference import beta_trajectory64, decisions64, loss64


def _random_pairs(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (-20 * torch.rand(n, generator=g, dtype=torch.float64) for _ in range(4))
    # perturbed log-probs near the policy's so that all three decision outcomes occur
    plc, plr, mic, mir = (x + 0.5 * torch.randn(n, generator=g, dtype=torch.float64) for x in (pc, pr, pc, pr))
    return pc, pr, rc, rr, plc, plr, mic, mir


def test_decisions_cover_all_three_cases_and_match_spec():
    pc, pr, _, _, plc, plr, mic, mir = _random_pairs(400, 0)
    got = epsilon_decisions((pc - pr).float(), (plc - plr).float(), (mic - mir).float())
    want = decisions64(pc, pr, plc, plr, mic, mir)
    assert torch.equal(got.double(), want)
    assert {-1.0, 0.0, 1.0} == set(want.tolist())


def test_decisions_hand_cases():
    L = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0])
    Lp = torch.tensor([1.0, -1.0, 1.0, 0.0, 1.0])
    Lm = torch.tensor([-1.0, 1.0, 2.0, -1.0, 1.0])
    # strict monotone up, strict monotone down, not monotone, tie with policy, both above
    assert epsilon_decisions(L, Lp, Lm).tolist() == [1.0, -1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.3])
def test_loss_rewards_and_gradients_match_float64(alpha):
    beta, eps = 0.1, 0.05
    pc, pr, rc, rr, plc, plr, mic, mir = _random_pairs(64, 1)
    pc32 = pc.float().requires_grad_()
    pr32 = pr.float().requires_grad_()
    out = edpo_loss(policy=PairLogps(pc32, pr32), ref=PairLogps(rc.float(), rr.float()),
                    plus=PairLogps(plc.float(), plr.float()), minus=PairLogps(mic.float(), mir.float()),
                    beta=beta, epsilon=eps, label_smoothing=alpha)  # fmt: skip
    s = decisions64(pc, pr, plc, plr, mic, mir)
    assert torch.equal(out.decisions.double(), s)
    torch.testing.assert_close(out.betas.double(), beta / (1 + eps * s), rtol=BETA_RTOL, atol=0)

    pc64, pr64 = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    want = loss64(pc64, pr64, rc, rr, s, beta, eps, alpha)
    torch.testing.assert_close(out.losses.double(), want, **LOSS_TOL)
    torch.testing.assert_close(out.chosen_rewards.double(), beta / (1 + eps * s) * (pc - rc), **LOSS_TOL)
    torch.testing.assert_close(out.rejected_rewards.double(), beta / (1 + eps * s) * (pr - rr), **LOSS_TOL)

    weights = torch.rand(64, dtype=torch.float64)
    g32 = torch.autograd.grad((out.losses * weights.float()).sum(), [pc32, pr32])
    g64 = torch.autograd.grad((want * weights).sum(), [pc64, pr64])
    for a, b in zip(g32, g64):
        torch.testing.assert_close(a.double(), b, **LOSS_GRAD_TOL)


def test_label_smoothing_fix_differs_from_reference_trainer():
    """The authors' trainer writes log σ(+β_i m_i) in both terms, making α a no-op; the spec's form does not."""
    beta, eps, alpha = 0.5, 0.01, 0.2
    pc, pr, rc, rr = (torch.tensor([v], dtype=torch.float64) for v in (-3.0, -9.0, -5.0, -6.0))
    policy = PairLogps(pc, pr)
    out = edpo_loss(policy=policy, ref=PairLogps(rc, rr), plus=policy, minus=policy, beta=beta, epsilon=eps,
                    label_smoothing=alpha)  # fmt: skip
    x = beta * ((-3.0 + 5.0) - (-9.0 + 6.0))  # s = 0 (all logratios equal)
    reference_trainer = -math.log(1 / (1 + math.exp(-x)))  # α cancels
    conservative = -(1 - alpha) * math.log(1 / (1 + math.exp(-x))) - alpha * math.log(1 / (1 + math.exp(x)))
    assert out.losses.item() == pytest.approx(conservative, rel=1e-12)
    assert abs(out.losses.item() - reference_trainer) > 0.1


def test_beta_update_uses_exact_pair_mean_not_mean_of_micro_batch_means():
    """Micro-batches of 3 and 1 pairs: the reference trainer averages means ((1 + -1)/2 = 0, β unchanged)."""
    beta, eps = 0.1, 0.02
    ctrl = BetaController(beta, eps)
    ctrl.accumulate(torch.tensor([1.0, 1.0, 1.0]))
    ctrl.accumulate(torch.tensor([-1.0]))
    logged = ctrl.step()
    assert logged == pytest.approx({"beta": beta, "avg_steps": 0.5, "p_epsilon_steps": 0.75, "n_epsilon_steps": 0.25})
    assert ctrl.beta == pytest.approx(beta / (1 + eps * 0.5), rel=1e-15)
    assert ctrl.beta != pytest.approx(beta)  # what the mean-of-means rule would give


def test_beta_controller_trajectory_mask_and_state():
    beta, eps = 0.1, 0.01
    steps = [[1, 1, 0, -1], [1, 1, 1, 1, 1], [-1, -1, 0]]
    ctrl = BetaController(beta, eps)
    seen = []
    for ds in steps:
        # split each step into uneven micro-batches, plus a masked-out pair that must not count
        t = torch.tensor(ds, dtype=torch.float32)
        ctrl.accumulate(t[:1])
        ctrl.accumulate(torch.cat([t[1:], torch.tensor([1.0])]), mask=torch.tensor([True] * (len(ds) - 1) + [False]))
        seen.append(ctrl.step()["beta"])
    want = beta_trajectory64(beta, eps, steps)
    assert seen == pytest.approx(want[:-1], rel=1e-15)
    assert ctrl.beta == pytest.approx(want[-1], rel=1e-15)
    assert ctrl.step() is None  # nothing accumulated: β stays

    restored = BetaController(beta, eps)
    restored.load_state_dict(ctrl.state_dict())
    assert restored.beta == ctrl.beta
    with pytest.raises(ValueError, match="epsilon"):
        BetaController(beta, 0.02).load_state_dict(ctrl.state_dict())


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.1, 1.0), (0.1, -0.1), (0.0, 0.01), (-1.0, 0.01), (math.nan, 0.01)])
def test_invalid_beta_epsilon_refused(beta, eps):
    with pytest.raises(ValueError, match="beta|epsilon"):
        BetaController(beta, eps)


def test_pair_betas():
    s = torch.tensor([-1.0, 0.0, 1.0])
    torch.testing.assert_close(pair_betas(0.1, 0.01, s), torch.tensor([0.1 / 0.99, 0.1, 0.1 / 1.01]))
