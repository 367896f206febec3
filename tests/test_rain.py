"""RAIN's search on a scripted model (a bigram table of fixed logits) with a scripted judge, and its
model side (tree caches, rollouts, the self-evaluation) against uncached forwards of a real GPT."""
import math

import pytest
import torch
import torch.nn.functional as F

from minialign.model import GPT, GPTConfig
from minialign.rain import Rain, RainParams
from minialign.sampling import generate, stop_ids
from minialign.selfeval import Judge, hard_score, judge, soft_score
from minialign.tokenizer import get_tokenizer

TOK = get_tokenizer("bytes")
V = 257
# After the prompt's last token ':' the likely continuation is the harmful "bx." (p = 0.6); the harmless
# "gy." has p = 0.4. Every other token is improbable and leads to the end of the turn.
BIGRAM = {":": {"b": 0.6, "g": 0.4}, "b": {"x": 1.0}, "x": {".": 1.0}, "g": {"y": 1.0}, "y": {".": 1.0},
          ".": {"\n": 1.0}}


class BigramModel(GPT):
    """A GPT-shaped model whose next-token logits depend on the current token only (fixed table)."""

    def __init__(self):
        super().__init__(GPTConfig(vocab_size=V, block_size=128, n_layer=1, n_head=1, n_embd=V))
        table = torch.full((V, V), -30.0)
        table[:, ord("\n")] = 0.0  # by default: end the turn
        for prev, nexts in BIGRAM.items():
            table[ord(prev)] = -30.0
            for token, p in nexts.items():
                table[ord(prev), ord(token)] = math.log(p)
        with torch.no_grad():
            self.lm_head.weight.copy_(table.t())  # logits = one_hot(token) @ table

    def hidden(self, idx, cache=None, static_shapes=False, rows=None):
        if cache is not None:
            cache.lengths[slice(None) if rows is None else rows] += idx.size(1)
        return F.one_hot(idx, V).float()


class ScriptedJudge:
    """A reply containing 'x' is harmful (-1), anything else harmless (+1); or a fixed score."""

    def __init__(self, fixed=None):
        self.fixed, self.memo = fixed, {}

    def __call__(self, reply, finished):
        s = self.fixed if self.fixed is not None else (-1.0 if "x" in reply else 1.0)
        self.memo[(reply, finished)] = (s, torch.tensor([float(s < 0)] * 2))
        return s


def make(params=None, fixed=None, seed=0):
    search = Rain(BigramModel().eval(), TOK, params or RainParams(), "Q", "Q:", 16, torch.Generator().manual_seed(seed))
    search.judge = ScriptedJudge(fixed)
    return search


def test_commits_to_the_harmless_branch_when_the_likely_one_is_harmful():
    model = BigramModel().eval()
    assert TOK.decode(generate(model, [TOK.encode("Q:")], 8, stop_ids(TOK), temperature=0)[0]) == "bx."  # vanilla
    for seed in range(3):
        search = make(seed=seed)
        assert TOK.decode(search.decode()) == "gy." and search.stats["rewinds"] > 0


def test_without_exploration_the_search_follows_the_likely_harmful_branch():
    search = make(RainParams(c=0.0))
    assert TOK.decode(search.decode()) == "bx."


def test_first_expansion_priors_are_the_root_mixed_token_probabilities():
    search = make()
    search.iterate()  # the root: judged as it is (the prompt ends in ':'), then expanded with the top 10 tokens
    assert list(search.judge.memo) == [("", False)]  # no rollout after "Q:" (official getv)
    priors = {c.tokens[0]: c.prior for c in search.root.children}
    assert len(priors) == 10
    assert priors[ord("b")] == pytest.approx(0.75 * 0.6 + 0.025, abs=1e-6)
    assert priors[ord("g")] == pytest.approx(0.75 * 0.4 + 0.025, abs=1e-6)
    assert sum(priors.values()) == pytest.approx(1.0)


def test_a_leaf_is_rolled_out_to_the_end_of_its_clause():
    search = make()
    search.iterate()
    search.iterate()  # selects 'b' (highest prior), rolls out "x." and judges "bx."
    assert ("bx.", False) in search.judge.memo
    b = next(c for c in search.root.children if c.tokens == [ord("b")])
    assert b.fn == 1 and b.q == -1.0


def test_visits_and_values_follow_the_backup_rule():
    search = make(RainParams(similarity=False, dynamic=False))
    for _ in range(30):
        search.iterate()
    scores = []

    def check(node):  # an expanded, non-terminal node was a leaf once: fn = 1 + sum of its children's fn
        kids = node.children
        assert node.n == node.fn  # no similarity visits
        if kids and not node.terminal:
            assert node.fn == 1 + sum(c.fn for c in kids if c.fn)
            own = node.q * node.fn - sum(c.q * c.fn for c in kids)  # the score of its own evaluation
            assert own == pytest.approx(1.0) or own == pytest.approx(-1.0)
            scores.append(own)
        for c in kids:
            check(c)
    check(search.root)
    assert search.root.fn == 30 and scores


def test_dynamic_addition_gives_the_new_candidate_its_share():
    search = make(RainParams(candidates=2))
    search.iterate()  # the root gets 2 one-token children: 'b' and 'g'
    kids = list(search.root.children)
    for k in kids:
        k.embedding, k.q, k.n, k.fn = F.normalize(torch.ones(V), dim=0), -0.5, 1.0, 1
    search.iterate()  # all alike and bad: one more candidate before selecting
    assert len(search.root.children) == 3 and search.stats["additions"] == 1
    added = search.root.children[2]
    assert added.tokens not in [k.tokens for k in kids]
    assert added.prior == pytest.approx(0.25 / 3, abs=1e-6)  # p ~ e^-30: only the root's uniform share
    assert [k.prior for k in kids] == pytest.approx([0.75 * 0.6 + 0.125, 0.75 * 0.4 + 0.125], abs=1e-6)


@pytest.mark.parametrize("score", [1.0, -1.0])
def test_stop_rule(score):
    params = RainParams(commit_visits=6, commit_value=0.8, max_visits=50)
    stepped = make(params, fixed=score)  # the rule checked by hand after every iteration
    expected = None
    for i in range(1, 51):
        stepped.iterate()
        best = max(stepped.root.children, key=lambda c: (c.n, c.q))
        if best.fn > 6 and best.q > 0.8:
            expected = i
            break
    search = make(params, fixed=score)
    search.search()
    if score > 0:  # fires at the first iteration where the best child has fn > T_m and q > V
        assert expected is not None and search.stats["iterations"] == expected
    else:  # never fires: the root gets T = 50 real visits
        assert expected is None and search.stats["iterations"] == 50 and search.root.fn == 50


def test_at_least_15_new_iterations_per_commit():
    search = make(fixed=0.0)  # a value of 0 never passes V: only T and the floor stop the search
    search.root.fn = 45
    search.search()
    assert search.stats["iterations"] == 15  # T = 50 would allow 5


def test_commit_takes_the_most_visited_child_and_keeps_its_subtree():
    search = make()
    best = search.search()
    assert best is max(search.root.children, key=lambda c: (c.n, c.q))
    search.decode()
    assert search.root.depth >= 1 and search.root.fn > 0  # the committed node kept its statistics


def real_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=V, block_size=256, n_layer=2, n_head=2, n_embd=32)).eval()


def test_tree_keys_and_values_equal_an_uncached_forward():
    model = real_model()
    search = Rain(model, TOK, RainParams(), "Hi", "Human: Hi\nAssistant:", 40, torch.Generator().manual_seed(0))
    search.judge = ScriptedJudge(fixed=0.0)
    for _ in range(12):
        search.iterate()
    deepest = max((n for n in walk(search.root)), key=lambda n: n.depth)
    assert deepest.depth >= 3
    path = deepest.path_from(search.context)
    ids = torch.tensor([[t for n in path for t in n.tokens]])
    with torch.no_grad():
        reference_logits = model(ids)[0, -1]
        cache = model.new_cache(1, ids.size(1))
        model.hidden(ids, cache)
    k = torch.cat([n.state.k for n in path], 1)
    torch.testing.assert_close(k, cache.k[:, 0], rtol=1e-5, atol=1e-5)
    if deepest.state.next_logits is not None:
        torch.testing.assert_close(deepest.state.next_logits, reference_logits, rtol=1e-5, atol=1e-5)


def walk(node):
    yield node
    for c in node.children:
        yield from walk(c)


def test_hard_and_soft_scores():
    assert hard_score(torch.tensor([0.2, 0.3])) == 1.0     # both orders vote harmless
    assert hard_score(torch.tensor([0.2, 0.7])) == 0.0
    assert hard_score(torch.tensor([0.6, 0.9])) == -1.0
    assert hard_score(torch.tensor([0.5, 0.5])) == -1.0    # a tie is not a harmless vote
    assert soft_score(torch.tensor([0.2, 0.6])) == pytest.approx((0.6 - 0.2) / 2)


def test_cached_and_uncached_self_evaluation_agree():
    model = real_model()
    question = "How do I steal a bike?"
    cached = Judge(model, TOK, question, "soft")
    for reply, finished in [("Sure, here is how", False), ("I can't help with that.", True), ("It is", False)]:
        s = cached(reply, finished)
        reference = judge(model, TOK, question, [reply], [finished])[0]
        torch.testing.assert_close(cached.memo[(reply, finished)][1], reference, rtol=1e-5, atol=1e-6)
        assert s == pytest.approx(float((1 - 2 * reference).mean()), abs=1e-5)
