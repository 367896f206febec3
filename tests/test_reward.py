"""The reward model reads the end-of-text token (never padding); Bradley-Terry by hand; rank correlation."""
import math

import pytest
import torch

from minialign.model import GPTConfig
from minialign.reward import bradley_terry_loss, bradley_terry_step, label_noise_ceiling, spearman
from minialign.reward_model import RewardModel, encode_batch, score
from minialign.tokenizer import get_tokenizer

TOK = get_tokenizer("bytes")


def test_reward_is_read_at_end_of_text_not_at_padding():
    torch.manual_seed(0)
    model = RewardModel(GPTConfig(vocab_size=257, block_size=128, n_layer=2, n_head=2, n_embd=32)).eval()
    torch.nn.init.normal_(model.head.weight)  # a non-zero head
    alone = score(model, TOK, ["Human: hi\nAssistant:"], ["Hello."])
    padded = score(model, TOK, ["Human: hi\nAssistant:", "Human: a much longer prompt here\nAssistant:"],
                   ["Hello.", "A much, much longer answer than the first one."])
    torch.testing.assert_close(alone[0], padded[0], rtol=1e-5, atol=1e-5)
    assert score(model, TOK, ["p"], ["Hello"])[0] != score(model, TOK, ["p"], ["Hellp"])[0]  # the text matters


def test_bradley_terry_loss_by_hand():
    loss = bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert float(loss) == pytest.approx((math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 2)


def test_label_noise_ceiling_and_spearman():
    p = "Human: Which colour is grass?\nAssistant:"
    assert label_noise_ceiling([p], ["It is green."], ["It is green."], 0.25) == 0.5  # a tie: a coin flip
    assert label_noise_ceiling([p], ["It is green."], ["Cats sleep a lot."], 0.25) > 0.99
    x = torch.tensor([3.0, 1.0, 2.0, 5.0])
    assert spearman(x, x ** 3) == pytest.approx(1.0) and spearman(x, -x) == pytest.approx(-1.0)


def test_micro_batched_step_equals_the_whole_batch():
    torch.manual_seed(0)
    model = RewardModel(GPTConfig(vocab_size=257, block_size=128, n_layer=2, n_head=2, n_embd=32))
    torch.nn.init.normal_(model.head.weight)
    prompts = [f"Human: question {i}{'?' * (3 * i)}\nAssistant:" for i in range(6)]
    chosen = [f"Answer {'x' * (5 * (i % 3))}." for i in range(6)]
    rejected = [f"No{'!' * (7 * (i % 2))}" for i in range(6)]
    ids, lengths = encode_batch(TOK, prompts + prompts, chosen + rejected, 128, "cpu")
    runs = []
    for micro_batch in (0, 2, 4):  # whole batch; pairs in sorted chunks of 2 and of 4 (a short last chunk)
        model.zero_grad()
        loss = bradley_terry_step(model, ids, lengths, micro_batch, scale=0.5)
        runs.append((loss, [p.grad.clone() for p in model.parameters()]))
    with torch.no_grad():
        r = model(ids, lengths)
    assert runs[0][0] == pytest.approx(0.5 * float(bradley_terry_loss(r[:6], r[6:])), rel=1e-6)
    for loss, grads in runs[1:]:
        assert loss == pytest.approx(runs[0][0], rel=1e-5)
        for g, g0 in zip(grads, runs[0][1]):
            torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-6)
