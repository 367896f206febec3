"""The exact tilt on an empirical support against the continuous closed forms, a hand-computed case
with ties, and the sampled estimator of ``evaluate``."""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from minialign.evaluate import analytic, pick_distribution, win_rate
from minialign.tilt import inverse_beta_at_kl, kl_to_reference, readout, tilt, transformed

K = 20_000  # distinct rewards: C_hat = (k + 1/2) / K, the midpoint rule of the continuous tool
DISTINCT = torch.randn(1, K, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

CASES = [  # transform, t, beta, the same Phi for the continuous tool
    ("identity", 0.0, 0.2, lambda u: u),
    ("identity", 0.0, 1.0, lambda u: u),
    ("log", 0.0, 1 / 3, np.log),  # the BoN_4 policy of pi_ref
    ("exp", 4.0, 10.0, lambda u: np.exp(4 * u)),
    ("exp", -4.0, 0.2, lambda u: -np.exp(-4 * u)),
    ("exp", 8.0, 200.0, lambda u: np.exp(8 * u)),
]


@pytest.mark.parametrize("transform,t,beta,phi", CASES)
def test_many_distinct_rewards_reproduce_the_continuous_closed_forms(transform, t, beta, phi):
    # the selector is also the judge, so C_hat's order is the judge's order: the 1-D tool's setting
    exact = readout(transformed(transform, t, DISTINCT), 1 / beta, DISTINCT, DISTINCT, n=4)
    continuous = analytic(phi, beta, n=4)
    for key in ("kl", "win_rate", "bon", "won"):
        assert exact[key] == pytest.approx(continuous[key], abs=1e-3), key


def test_log_transform_reproduces_best_of_n_closed_form():
    out = readout(transformed("log", 0.0, DISTINCT), 3.0, DISTINCT, DISTINCT, n=4)  # beta = 1/(N-1), N = 4
    assert out["win_rate"] == pytest.approx(0.8, abs=1e-3) and out["kl"] == pytest.approx(math.log(4) - 0.75, abs=1e-3)


def test_hand_computed_case_with_ties():
    # support a, b, c (mass 1/3 each); selector s = (0, 1, 1): b and c tie; judge j = (0, 1, 2)
    s = torch.tensor([[0.0, 1.0, 1.0]], dtype=torch.float64)
    j = torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64)
    # identity transform: C_hat = (1/2, 2, 2) / 3 (a is below both; b and c count each other half)
    phi = transformed("identity", 0.0, s)
    assert phi[0].tolist() == pytest.approx([1 / 6, 2 / 3, 2 / 3])
    lam = 2 * math.log(3)  # exp(lam / 2) = 3: b and c each weigh 3x a
    w = tilt(phi, lam)
    assert w[0].tolist() == pytest.approx([1 / 7, 3 / 7, 3 / 7])
    assert float(kl_to_reference(w)[0]) == pytest.approx(1 / 7 * math.log(3 / 7) + 6 / 7 * math.log(9 / 7))
    # best-of-2 by s under pi_ref: a only if both draws are a (1/9); b and c share the rest (4/9 each)
    uniform = torch.full_like(w, 1 / 3)
    assert pick_distribution(uniform, s, "bon", 2)[0].tolist() == pytest.approx([1 / 9, 4 / 9, 4 / 9])
    # worst-of-2 by s under w: a unless both draws miss it: 1 - (6/7)^2 = 13/49; b, c 18/49 each
    assert pick_distribution(w, s, "won", 2)[0].tolist() == pytest.approx([13 / 49, 18 / 49, 18 / 49])
    # best-of-2 by s under w: a only if both are a (1/49); b and c share 48/49
    pw = [Fraction(1, 49), Fraction(24, 49), Fraction(24, 49)]
    pr = [Fraction(1, 9), Fraction(4, 9), Fraction(4, 9)]
    jv = [0, 1, 2]
    hand = sum(pw[a] * pr[b] * (1 if jv[a] > jv[b] else Fraction(1, 2) if jv[a] == jv[b] else 0)
               for a in range(3) for b in range(3))
    assert float(win_rate(pick_distribution(w, s, "bon", 2), pick_distribution(uniform, s, "bon", 2), j)[0]) \
        == pytest.approx(float(hand))
    assert readout(phi, lam, s, j, n=2)["bon"] == pytest.approx(float(hand))


def test_reference_against_itself_is_one_half_under_any_judge():
    g = torch.Generator().manual_seed(1)
    s = torch.randint(0, 4, (6, 16), generator=g).double()  # many ties
    j = torch.randint(0, 3, (6, 16), generator=g).double()
    out = readout(transformed("exp", 4.0, s), 0.0, s, j, n=4)  # 1/beta = 0: pi = pi_ref
    assert out["kl"] == pytest.approx(0.0, abs=1e-12)
    for key in ("win_rate", "bon", "won"):
        assert out[key] == pytest.approx(0.5, abs=1e-12)


def test_inverse_beta_at_kl_hits_the_target_and_saturates():
    g = torch.Generator().manual_seed(3)
    phi = transformed("identity", 0.0, torch.randn(4, 32, generator=g).double())
    lam = inverse_beta_at_kl(phi, 0.5)
    assert float(kl_to_reference(tilt(phi, lam)).mean()) == pytest.approx(0.5, abs=1e-6)
    assert inverse_beta_at_kl(phi, math.log(32) + 0.1) == math.inf  # more than a point mass allows
    steep = transformed("exp", 34.0, torch.randn(4, 32, generator=g).double())  # spans e^34: 1/beta ~ 1e-13
    for kl in (0.05, 0.5, 2.0):
        assert float(kl_to_reference(tilt(steep, inverse_beta_at_kl(steep, kl))).mean()) == pytest.approx(kl, abs=1e-6)


def test_beta_zero_is_the_limit_of_the_tilt():
    phi = torch.tensor([[0.0, 1.0, 1.0, 0.5]], dtype=torch.float64)
    assert tilt(phi, math.inf)[0].tolist() == [0.0, 0.5, 0.5, 0.0]
    assert torch.allclose(tilt(phi, 1e4), tilt(phi, math.inf))
    assert float(kl_to_reference(tilt(phi, math.inf))[0]) == pytest.approx(math.log(2))  # log(K / #top)
