"""Win rates and the 1-D analytic tool against the spec's closed forms."""
import math

import numpy as np
import pytest
import torch

from minialign.evaluate import analytic, pick_distribution, sampled_win_rates, win_rate

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


def cdf_estimator(policy: torch.Tensor, reference: torch.Tensor, procedure: str, n: int) -> float:
    """An independent reference: the inference-time win rate of two sets of rewards (P, M) and (P, K),
    the same reward picking and judging, from T's CDF over the union of values (F, F^n, 1 - (1 - F)^n)."""
    def cdf(values, samples):
        F = torch.searchsorted(samples.sort().values, values, side="right").double() / len(samples)
        return {"sample": F, "bon": F ** n, "won": 1 - (1 - F) ** n}[procedure]
    rates = []
    for x, z in zip(policy, reference):
        support = torch.cat([x, z]).unique()  # sorted
        below = torch.cat([support.new_tensor([float("-inf")]), support[:-1]])
        px = cdf(support, x) - cdf(below, x)  # P(T(pi) returns value v)
        Gz, Gz_below = cdf(support, z), cdf(below, z)
        rates.append(float((px * (Gz_below + 0.5 * (Gz - Gz_below))).sum()))
    return sum(rates) / len(rates)


def test_reference_policy_inference_time_win_rates_are_one_half():
    flat = analytic(lambda u: 0 * u, 1.0, n=4)
    assert abs(flat["kl"]) < 1e-9 and abs(flat["bon"] - 0.5) < 1e-6 and abs(flat["won"] - 0.5) < 1e-6
    torch.manual_seed(0)
    x = torch.randn(5, 30).round(decimals=1)  # ties
    same = sampled_win_rates((x, x), (x.clone(), x.clone()), 4)
    for key in ("win_rate", "bon", "won"):
        assert same[key] == pytest.approx(0.5, abs=1e-12)


def test_best_of_n_of_reference_against_reference():
    # T(pi) = BoN_N of samples, T(pi_ref) = plain sampling: win rate N / (N + 1) for continuous rewards
    torch.manual_seed(0)
    ref = torch.rand(1, 4000, dtype=torch.float64)
    n = 4
    picked = torch.rand(1, 4000, n, dtype=torch.float64).max(-1).values
    rates = sampled_win_rates((picked, picked), (ref, ref), n)
    assert rates["win_rate"] == pytest.approx(n / (n + 1), abs=0.01)
    # and BoN_4 of U^(1/4)-distributed draws against BoN_4 of U: the log tilt's closed form
    assert rates["bon"] == pytest.approx(analytic(np.log, 1 / (n - 1), n=n)["bon"], abs=0.01)


def test_win_rate_counts_ties_half():
    rates = sampled_win_rates((torch.tensor([[1.0, 2.0]]),) * 2, (torch.tensor([[1.0]]),) * 2, 1)
    assert rates["win_rate"] == 0.75


def test_sampled_win_rates_equal_the_cdf_estimator():
    g = torch.Generator().manual_seed(4)
    policy = torch.randint(0, 6, (5, 12), generator=g).double()  # ties within and across the two sides
    reference = torch.randint(0, 6, (5, 20), generator=g).double()
    rates = sampled_win_rates((policy, policy), (reference, reference), n=4)
    for key, procedure in (("win_rate", "sample"), ("bon", "bon"), ("won", "won")):
        assert rates[key] == pytest.approx(cdf_estimator(policy, reference, procedure, 4), abs=1e-9)


def test_weights_equal_the_cdf_estimator_on_repeated_samples():
    # weights (1, 2, ..., 8) / 36 on a support equal the support's samples each repeated that many times
    g = torch.Generator().manual_seed(2)
    rewards = torch.randint(0, 5, (3, 8), generator=g).double()  # ties within a prompt
    counts = torch.arange(1, 9)
    w = (counts.double() / counts.sum()).expand(3, 8)
    uniform = torch.full_like(w, 1 / 8)
    repeated = torch.stack([row.repeat_interleave(counts) for row in rewards])
    for procedure in ("sample", "bon", "won"):
        exact = win_rate(pick_distribution(w, rewards, procedure, 3), pick_distribution(uniform, rewards, procedure, 3),
                         rewards)
        for i in range(3):
            assert float(exact[i]) == pytest.approx(cdf_estimator(repeated[i: i + 1], rewards[i: i + 1], procedure, 3),
                                                    abs=1e-9)


def test_selecting_by_one_reward_and_judging_by_another():
    s = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    j = torch.tensor([[1.0, 0.0]], dtype=torch.float64)  # the s-best sample is the j-worst
    # the policy always returns its one sample (s 1, j 0); pi_ref's best-of-2 by s is that same kind of
    # sample unless both draws are the other (1/4): a tie w.p. 3/4, a loss w.p. 1/4
    rates = sampled_win_rates((s[:, 1:], j[:, 1:]), (s, j), n=2)
    assert rates["bon"] == pytest.approx(0.75 * 0.5)
    assert rates["won"] == pytest.approx(0.25 * 0.5)  # worst-of-2 by s: pi_ref keeps s 0 (j 1) w.p. 3/4


def test_compare_policies_judges_by_r_and_by_gold_apart():
    """Two random byte models write garbage, which the gold reward grades all alike (ties: 0.5), while an
    r that sums the bytes tells them apart: each column must follow its own judge."""
    from minialign import world
    from minialign.evaluate import compare_policies
    from minialign.model import GPT, GPTConfig
    from minialign.tokenizer import get_tokenizer
    config = GPTConfig(vocab_size=257, block_size=128, n_layer=1, n_head=2, n_embd=32)
    torch.manual_seed(0)
    policy, reference = GPT(config).eval(), GPT(config).eval()
    r = lambda prompts, texts: torch.tensor([float(sum(t.encode())) for t in texts])  # noqa: E731
    prompts = [p.text for p in world.eval_prompts(1)]
    out = compare_policies(policy, reference, get_tokenizer("bytes"), prompts, samples=4, n=2, reward=r,
                           max_new_tokens=8)
    assert out["win_rate_gold"] == out["bon2_gold"] == 0.5 and out["win_rate_gold_se"] == 0.0
    assert out["win_rate_r"] != 0.5 and out["bon2_r"] != out["win_rate_r"]


def test_sample_responses_log_ratio_is_the_full_forwards_difference():
    """Each sample's log pi(y|x) - log pi_ref(y|x), from the sampler's log-probabilities and the
    reference's length-sorted forward, equals the two models' full forwards on the same tokens (rows of
    different lengths, more than one 256-row batch); and is 0 against the policy itself."""
    from minialign.data import pad_responses
    from minialign.evaluate import sample_responses
    from minialign.model import GPT, GPTConfig, token_logprobs
    from minialign.sampling import generate, stop_ids
    from minialign.tokenizer import get_tokenizer
    config = GPTConfig(vocab_size=257, block_size=64, n_layer=1, n_head=2, n_embd=32)
    torch.manual_seed(0)
    policy, reference = GPT(config).eval(), GPT(config).eval()
    tok = get_tokenizer("bytes")
    prompts = ["Hi", "What is two and two?", "Say a word"]
    _, log_ratio = sample_responses(policy, tok, prompts, 90, 12, seed=1, reference=reference)  # 270 rows
    rows = [tok.encode(p) for p in prompts for _ in range(90)]
    g = torch.Generator().manual_seed(1)  # the same draws, to know each sample's tokens
    responses = [y for i in (0, 256) for y in generate(policy, rows[i: i + 256], 12, stop_ids(tok), temperature=1.0,
                                                         generator=g, keep_stop=True)]
    assert len({len(y) for y in responses}) > 1
    ids, mask = pad_responses(rows, responses)
    with torch.no_grad():
        full = ((token_logprobs(policy, ids) - token_logprobs(reference, ids)) * mask).sum(1)  # (270,)
    torch.testing.assert_close(log_ratio, full, rtol=0, atol=1e-4)
    assert full.abs().mean() > 0.1  # two different models: the check can fail
    _, itself = sample_responses(policy, tok, prompts, 4, 12, seed=1, reference=policy)
    torch.testing.assert_close(itself, torch.zeros(12), rtol=0, atol=1e-4)
