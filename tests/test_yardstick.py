"""The yardstick of trained CTRL: pi_ref weighted by its exact probabilities on its distinct responses,
against hand-computed cases and against the sample support it replaces."""
import math

import pytest
import torch

from minialign import tilt
from minialign.evaluate import win_rates
from minialign.lab.yardstick import bottom_share, exact_calibrated, exact_support, training_phi


def test_exact_calibrated_counts_lower_mass_and_half_the_tied_mass():
    values = torch.tensor([[1.0, 2.0, 2.0, 3.0]], dtype=torch.float64)
    weights = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    expected = [0.05, 0.1 + 0.25, 0.1 + 0.25, 0.6 + 0.2]
    assert exact_calibrated(values, weights)[0].tolist() == pytest.approx(expected)


def test_a_distinct_support_with_its_weights_reads_like_the_sample_support_it_collapses():
    """K draws with repeats, each 1/K, against their distinct values weighted by their counts / K: the same
    optimum (mass per value), KL, and win rates, at any beta (for the unsmoothed transforms: the sample
    support's log and exp(-t) use C_hat smoothed by half a pseudo-sample, the exact C needs none)."""
    g = torch.Generator().manual_seed(0)
    distinct = torch.randn(3, 5, generator=g, dtype=torch.float64)  # 5 distinct rewards per prompt
    counts = torch.randint(1, 5, (3, 5), generator=g)
    samples = torch.stack([row.repeat_interleave(c)[:8] for row, c in zip(distinct, counts.clamp(min=2))])  # (3, 8)
    weights = torch.stack([torch.tensor([float((s == v).sum()) for v in d]) for s, d in zip(samples, distinct)]).double() / 8
    kept = weights > 0
    values = distinct.masked_fill(~kept, 0.0)
    for transform, t in (("identity", 0.0), ("exp", 4.0)):
        phi_samples = tilt.transformed(transform, t, samples)
        phi_distinct = training_phi({"transform": transform, "t": t}, {"r": values, "reference": weights}, None)
        for inverse_beta in (0.3, 2.0):
            w_samples = tilt.tilt(phi_samples, inverse_beta)
            w_distinct = tilt.tilt(phi_distinct, inverse_beta, weights)
            per_value = torch.stack([torch.stack([w[s == v].sum() for v in d]) for w, s, d in zip(w_samples, samples, distinct)])
            torch.testing.assert_close(per_value, w_distinct, rtol=0, atol=1e-6)
            torch.testing.assert_close(tilt.kl_to_reference(w_samples), tilt.kl_to_reference(w_distinct, weights))
            a = win_rates(w_samples, tilt.uniform(samples), samples, samples, 4)
            b = win_rates(w_distinct, weights, values, values, 4)
            for key in a:
                torch.testing.assert_close(a[key], b[key])


def test_tilt_with_reference_weights_by_hand_and_its_beta_at_a_kl():
    phi = torch.tensor([[0.0, 1.0, 2.0, 0.0]], dtype=torch.float64)
    reference = torch.tensor([[0.5, 0.3, 0.2, 0.0]], dtype=torch.float64)  # the last column is padding
    w = tilt.tilt(phi, 1.0, reference)
    expected = torch.tensor([0.5, 0.3 * math.e, 0.2 * math.e ** 2, 0.0]) / (0.5 + 0.3 * math.e + 0.2 * math.e ** 2)
    torch.testing.assert_close(w[0], expected.double())
    kl = float((expected[:3] * (expected[:3] / reference[0, :3]).log()).sum())
    assert float(tilt.kl_to_reference(w, reference)) == pytest.approx(kl)
    assert tilt.inverse_beta_at_kl(phi, kl, reference) == pytest.approx(1.0, rel=1e-6)
    top = tilt.tilt(phi, math.inf, reference)  # beta -> 0: all of pi_ref's mass on its best response
    assert top[0].tolist() == [0.0, 0.0, 1.0, 0.0]


def test_bottom_share_cuts_where_pi_refs_mass_reaches_a_tenth():
    support = torch.tensor([[3.0, 1.0, 2.0, 4.0]])
    reference = torch.tensor([[0.5, 0.04, 0.06, 0.4]])  # mass below: 1.0 -> 0.04, 2.0 -> 0.10: the cut is 2.0
    weights = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    assert float(bottom_share(weights, support, support, reference)) == pytest.approx(0.5)
    assert float(bottom_share(reference, support, support, reference)) == pytest.approx(0.10)


def test_exact_support_holds_each_distinct_response_once_with_its_exact_probability(tiny_model, monkeypatch):
    """On a tiny model: distinct token sequences, each weighted by its probability under the model (a plain
    forward pass over prompt and response) over the set's total, the weights summing to 1."""
    from minialign import world
    from minialign.lab import yardstick
    from minialign.model import token_logprobs
    from minialign.tokenizer import get_tokenizer
    tokenizer = get_tokenizer("bytes")
    monkeypatch.setattr(yardstick, "score", lambda model, tok, prompts, texts: torch.tensor([float(len(t)) for t in texts]))
    prompt = "Human: What is the first letter of zizisa?\nAssistant:"
    support = exact_support(tiny_model, None, tokenizer, [world.parse_prompt(prompt)], 6, seed=0)
    responses, weights = support["responses"][0], support["reference"][0]
    assert len({tuple(y) for y in responses}) == len(responses) == int((weights > 0).sum())
    assert float(weights.sum()) == pytest.approx(1.0)
    start = len(tokenizer.encode(prompt))
    probability = [float(token_logprobs(tiny_model, torch.tensor([tokenizer.encode(prompt) + y]))[0, start - 1:].sum().exp().detach())
                   for y in responses]
    assert float(support["covered"][0]) == pytest.approx(sum(probability), rel=1e-4)
    assert weights[: len(responses)].tolist() == pytest.approx([p / sum(probability) for p in probability], rel=1e-4)
    assert support["r"][0, : len(responses)].tolist() == [float(len(t)) for t in support["texts"][0]]


def test_support_logprobs_are_each_responses_own_and_minus_infinity_after_a_prompts_last(tiny_model):
    """Two prompts with two and one responses of different lengths: each entry is the response's log-probability
    by a plain forward pass over prompt and response alone (no padding), the empty slot -inf."""
    from minialign import world
    from minialign.lab.yardstick import support_logprobs
    from minialign.model import token_logprobs
    from minialign.tokenizer import get_tokenizer
    tokenizer = get_tokenizer("bytes")
    texts = ["Human: What is the first letter of zizisa?\nAssistant:", "Human: What is the first letter of kolo?\nAssistant:"]
    responses = [[tokenizer.encode(" z, it is z."), tokenizer.encode(" no")], [tokenizer.encode(" k")]]
    logp = support_logprobs(tiny_model, tokenizer, [world.parse_prompt(t) for t in texts], responses)
    assert logp.shape == (2, 2) and logp[1, 1] == -math.inf
    for i, (text, ys) in enumerate(zip(texts, responses)):
        start = len(tokenizer.encode(text))
        for j, y in enumerate(ys):
            alone = token_logprobs(tiny_model, torch.tensor([tokenizer.encode(text) + y]))[0, start - 1:].sum().detach()
            assert float(logp[i, j]) == pytest.approx(float(alone), rel=1e-5)
