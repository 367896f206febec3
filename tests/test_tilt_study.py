"""The tilt experiment's pieces: agreement with gold, rewards of controlled quality, the per-prompt
scale, and the tables, on synthetic supports with known answers."""
import math

import pytest
import torch

from minialign import tilt, world
from minialign.reward_model import prompt_scale
from minialign.lab.yardstick import bottom_share, kl_by_kind
from minialign.lab.tilt_study import (TILT_TRANSFORMS, TILT_VIEWS, noisy_gold, phi_of, reward_quality_rows,
                                  style_agreement, tilt_markdown, tilt_rows)


def synthetic_support(prompts=12, k=16, seed=0) -> dict:
    """Two styles per prompt 0.5 apart, small distinct within-style gold terms, r = a noisy gold."""
    g = torch.Generator().manual_seed(seed)
    style_id = torch.randint(0, 2, (prompts, k), generator=g)
    gold = 0.5 * style_id + 0.01 * torch.randn(prompts, k, generator=g, dtype=torch.float64)
    styles = [["good" if s else "bad" for s in row] for row in style_id.tolist()]
    r = gold + 0.3 * torch.randn(prompts, k, generator=g, dtype=torch.float64)
    scale = prompt_scale([f"prompt {i}" for i in range(prompts)])[:, None]
    return {"r": r, "gold": gold, "styles": styles, "scale": scale}


def test_style_agreement_hand_case():
    gold = torch.tensor([[0.0, 0.1, 1.0]])
    styles = [["a", "a", "b"]]
    # within: the one pair (0, 1); between: (0, 2) and (1, 2)
    assert style_agreement(gold, gold, styles) == {"within": 1.0, "between": 1.0}
    flipped = torch.tensor([[0.1, 0.0, 1.0]])  # the within pair reversed, the between pairs kept
    assert style_agreement(flipped, gold, styles) == {"within": 0.0, "between": 1.0}
    tied = torch.tensor([[0.0, 0.0, -1.0]])  # a within tie counts half; both between pairs reversed
    assert style_agreement(tied, gold, styles) == {"within": 0.5, "between": 0.0}


def test_between_style_noise_keeps_each_style_in_order_and_within_noise_reorders_it():
    s = synthetic_support()
    shifted = noisy_gold(s["gold"], s["styles"], within=0.0, between=1.0, seed=0)
    agreement = style_agreement(shifted, s["gold"], s["styles"])
    assert agreement["within"] == 1.0 and agreement["between"] < 0.9
    noisy = noisy_gold(s["gold"], s["styles"], within=1.0, between=0.0, seed=0)
    assert style_agreement(noisy, s["gold"], s["styles"])["within"] < 0.7
    assert torch.equal(noisy_gold(s["gold"], s["styles"], 0.0, 0.0, seed=3), s["gold"])


def test_a_per_prompt_scale_changes_raw_and_no_calibrated_transform():
    support = synthetic_support()
    s = support["r"]
    raw, scaled = phi_of("raw", 0.0, s, support["scale"]), phi_of("raw, scaled", 0.0, s, support["scale"])
    ratio = scaled / raw
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio))  # one positive factor per prompt
    assert (ratio[:, 0] > 0).all() and ratio[:, 0].std() > 0.2
    lam = tilt.inverse_beta_at_kl(raw, 0.5)
    assert not torch.allclose(tilt.tilt(raw, lam), tilt.tilt(scaled, lam))
    for transform, t in (("identity", 0.0), ("log", 0.0), ("exp", 4.0)):  # C_hat ignores the scale
        assert torch.equal(phi_of(transform, t, s, None), phi_of(transform, t, s * ratio, None))


def test_tilt_rows_cover_every_view_and_transform_at_their_kl():
    support = synthetic_support()
    rows = tilt_rows(support, n=4, kls=(0.1, 0.3))
    assert len(rows) == len(TILT_VIEWS) * len(TILT_TRANSFORMS) * 2
    for row in rows:
        assert row["kl"] == pytest.approx(row["target_kl"], abs=1e-6)
        assert 0.5 < row["bon"] < 1 and 0.5 < row["won"] < 1 or row["judge"] != row["selector"]
    table = tilt_markdown(rows, 4)
    assert table.count("| exp(+4) |") == len(TILT_VIEWS) and "BoN_4 @ KL 0.3" in table


def test_reward_quality_rows_start_from_the_perfect_reward():
    rows = reward_quality_rows(synthetic_support(), n=4, seeds=(0,))
    perfect = next(r for r in rows if r["reward"].startswith("gold + noise (0 within, 0 between)"))
    assert perfect["within"] == 1.0 and perfect["between"] == 1.0
    # with r = gold, the calibrated exp(+4) optimum beats raw at best-of-4 (the paper's ordering)
    assert perfect["bon_exp(+4)"] > perfect["bon_raw"] and not math.isnan(rows[0]["bon_raw"])


def test_kl_by_kind_averages_the_per_prompt_kl_over_each_kind():
    """Hand-computed: KLs 0.1, 0.3 (benign), 0.5 (harmful), 0.7 (attacked) -> 0.2 / 0.5 / 0.7."""
    prompts = [world.Prompt(kind, "q", task=kind) for kind in ("benign", "benign", "harmful", "attacked")]
    out = kl_by_kind(torch.tensor([0.1, 0.3, 0.5, 0.7]), prompts)
    assert out == {"kl_benign": pytest.approx(0.2), "kl_harmful": pytest.approx(0.5), "kl_attacked": pytest.approx(0.7)}
    assert math.isnan(kl_by_kind(torch.tensor([0.1]), prompts[:1])["kl_harmful"])  # no harmful prompt


def test_bottom_share_hand_case_and_pi_ref_and_a_strong_tilt():
    """Support 1..12 (shuffled): its bottom tenth is the 2 lowest (ceil(12 / 10)), cut at 2. Responses
    valued 1, 2, 2.5 with weights 0.2, 0.3, 0.5 put 0.5 there (the tie at the cut counts); pi_ref,
    uniform on the support, 2/12; a policy tilted hard towards high rewards nearly none, and a
    worst-of-N transform's optimum less than an identity's at the same KL."""
    support = torch.tensor([[5.0, 1, 3, 2, 4, 6, 7, 8, 9, 10, 11, 12]], dtype=torch.float64)
    share = bottom_share(torch.tensor([[0.2, 0.3, 0.5]]), torch.tensor([[1.0, 2.0, 2.5]]), support)
    assert share.tolist() == [pytest.approx(0.5)]
    assert bottom_share(torch.full_like(support, 1 / 12), support, support).tolist() == [pytest.approx(2 / 12)]
    sharp = tilt.tilt(tilt.transformed("identity", 0.0, support), 50.0)
    assert float(bottom_share(sharp, support, support)) < 1e-6
    at_half = {t: tilt.tilt(phi, tilt.inverse_beta_at_kl(phi, 0.5)) for t, phi in
               (("identity", tilt.transformed("identity", 0.0, support)), ("exp-4", tilt.transformed("exp", -4.0, support)))}
    assert bottom_share(at_half["exp-4"], support, support) < bottom_share(at_half["identity"], support, support)
