"""The paper-gain table's gains at the exact optimum against the 1-D tool's continuous closed forms."""
import numpy as np
import pytest
import torch

from minialign.evaluate import analytic
from minialign.lab import paper_gain

K = 4000  # distinct rewards at the quantile midpoints: raw = C_hat = identity, the continuous tool's setting
MIDPOINTS = ((torch.arange(K, dtype=torch.float64) + 0.5) / K)[torch.randperm(K, generator=torch.Generator().manual_seed(0))]


def continuous(phi, kl: float, n: int, key: str) -> float:
    return analytic(phi, paper_gain.beta_at_kl(phi, kl, n), n)[key]


def test_the_gains_match_the_continuous_tool_and_t_is_the_best_of_its_grid(monkeypatch):
    monkeypatch.setattr(paper_gain, "T_GRID", (1.0, 4.0, 12.0))
    support = {"r": MIDPOINTS[None].repeat(3, 1), "gold": MIDPOINTS[None].repeat(3, 1), "scale": torch.ones(3, 1)}
    rows = {row["procedure"]: row for row in paper_gain.gain_rows(support, ns=(4,), kls=(0.5,))}
    for key, sign in (("bon", 1), ("won", -1)):
        row = rows[key]
        t = row["t"]
        rates = {tt: continuous(lambda u, tt=tt: np.sign(tt) * np.exp(tt * u), 0.5, 4, key) for tt in (sign, 4 * sign, 12 * sign)}
        assert t == max(rates, key=rates.get) and np.sign(t) == sign  # the grid's best, on the side of its procedure
        exp = rates[t]
        assert row["r_exp"] == pytest.approx(exp, abs=2e-3) and row["gold_exp"] == row["r_exp"]
        assert row["r_over_raw"] == pytest.approx(exp - continuous(lambda u: u, 0.5, 4, key), abs=2e-3)
        assert row["r_over_log"] == pytest.approx(exp - continuous(np.log, 0.5, 4, key), abs=2e-3)
        assert row["r_over_raw_se"] == pytest.approx(0.0, abs=1e-9)  # paired on identical prompts: no spread
    assert rows["bon"]["r_over_log"] > 0 and rows["won"]["r_over_raw"] > 0  # InfAlign's ordering at the optimum


def test_the_table_sets_the_gains_beside_the_papers():
    row = {"n": 4, "kl": 0.5, "t": 40.0, **{f"{v}_{k}": 0.01 for v in ("r", "gold") for k in
                                            ("exp", "over_raw", "over_log", "over_raw_se", "over_log_se")}}
    table = paper_gain.gain_markdown([{**row, "procedure": "bon"}, {**row, "procedure": "won", "t": -10.0}], 96, 32)
    assert "| 4 | 0.5 | +40 (the grid's edge) | 0.010 | +1.0 ± 1.0 | +1.0 ± 1.0 |" in table
    assert "| 4 | 0.5 | -10 | 0.010 |" in table and "+8-12 (v1)" in table and "+4-9 (v1)" in table
