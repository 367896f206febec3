"""Win rates and the 1-D analytic tool against the spec's closed forms."""
import math

import numpy as np
import pytest
import torch

from minialign.evaluate import analytic, inference_time_win_rate, win_rate

IDENTITY = [(1, 0.58198, 0.04065), (5, 0.80678, 0.65012), (20, 0.95000, 1.99573)]
BON = [(2, 2 / 3, 0.19315), (4, 0.8, 0.63629), (8, 0.88889, 1.20444), (32, 0.96970, 2.49699)]


@pytest.mark.parametrize("lam,win,kl", IDENTITY)
def test_identity_rows(lam, win, kl):
    out = analytic(lambda u: u, 1 / lam)
    assert abs(out["win_rate"] - win) < 1e-4 and abs(out["kl"] - kl) < 1e-4
    assert abs(out["win_rate"] - (1 / (1 - math.exp(-lam)) - 1 / lam)) < 1e-6  # the closed form itself


@pytest.mark.parametrize("n,win,kl", BON)
def test_log_transform_at_beta_one_over_n_minus_one_is_best_of_n(n, win, kl):
    out = analytic(np.log, 1 / (n - 1), n=n)
    assert abs(out["win_rate"] - win) < 1e-4 and abs(out["kl"] - kl) < 1e-4
    assert abs(out["win_rate"] - n / (n + 1)) < 1e-6 and abs(out["kl"] - (math.log(n) - (n - 1) / n)) < 1e-6


def test_reference_policy_inference_time_win_rates_are_one_half():
    flat = analytic(lambda u: 0 * u, 1.0, n=4)
    assert abs(flat["kl"]) < 1e-9 and abs(flat["bon"] - 0.5) < 1e-6 and abs(flat["won"] - 0.5) < 1e-6
    torch.manual_seed(0)
    x = torch.randn(5, 30).round(decimals=1)
    for procedure in ("sample", "bon", "won"):
        assert inference_time_win_rate(x, x.clone(), procedure, 4)[0] == pytest.approx(0.5, abs=1e-12)


def test_best_of_n_of_reference_against_reference():
    # T(pi) = BoN_N of samples, T(pi_ref) = plain sampling: win rate N / (N + 1) for continuous rewards
    torch.manual_seed(0)
    ref = torch.rand(1, 4000)
    n = 4
    picked = torch.rand(1, 4000, n).max(-1).values
    assert inference_time_win_rate(picked, ref, "sample")[0] == pytest.approx(n / (n + 1), abs=0.01)
    # and the exact empirical formula: BoN_4 of U vs BoN_4 of U^(1/4)-distributed draws
    assert inference_time_win_rate(picked, ref, "bon", 4)[0] == pytest.approx(
        analytic(np.log, 1 / (n - 1), n=n)["bon"], abs=0.01)


def test_win_rate_counts_ties_half():
    assert win_rate(torch.tensor([1.0, 2.0]), torch.tensor([1.0])) == 0.75

