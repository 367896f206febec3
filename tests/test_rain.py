"""RAIN on a scripted model (a bigram table of fixed logits) and a scripted evaluator, plus the cached
self-evaluation against the uncached reference on a real (random) GPT."""
import math

import pytest
import torch
import torch.nn.functional as F

from minialign.model import GPT, GPTConfig
from minialign.rain import Node, Rain, RainParams
from minialign.selfeval import judge
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

    def hidden(self, idx, cache=None, static_shapes=False):
        if cache is not None:
            cache.lengths += idx.size(1)
        return F.one_hot(idx, V).float()


class ScriptedRain(Rain):
    """The self-evaluation replaced by a rule: a text with 'x' is harmful (-1), anything else +1."""

    def evaluate(self, reply, finished):
        s = -1.0 if "x" in reply else 1.0
        self.memo[(reply, finished)] = (s, torch.tensor([float(s < 0)] * 2))
        return s


def make(params=None, score=None):
    cls = ScriptedRain
    if score is not None:
        cls = type("Fixed", (Rain,), {"evaluate": lambda self, reply, finished: score})
    return cls(BigramModel().eval(), TOK, params or RainParams(), "Q", "Q:", 16, torch.Generator().manual_seed(0))


def test_commits_to_the_harmless_branch_when_the_likely_one_is_harmful():
    from minialign.sampling import generate, stop_ids
    model = BigramModel().eval()
    assert TOK.decode(generate(model, [TOK.encode("Q:")], 8, stop_ids(TOK), temperature=0)[0]) == "bx."  # vanilla
    search = make()
    answer = TOK.decode(search.decode())
    assert answer == "gy." and search.stats["rewinds"] > 0


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


def leaf(search, parent, hidden, n=0.0, q=0.0, fn=0):
    node = Node([ord("z")] * len(hidden), 0.5, parent.depth + 1, parent, None, hidden, None, False)
    node.n, node.q, node.fn = n, q, fn
    parent.children.append(node)
    return node


def test_similarity_update_follows_eq_2():
    search = make(RainParams(gamma=0.2, sim_threshold=0.95))
    root = search.root
    e = torch.zeros(V)
    e[0], e[1] = 1.0, 0.2  # A's embedding direction
    a = leaf(search, root, e[None])
    b = leaf(search, root, e[None], n=2.0, q=0.5, fn=2)
    b.embedding = F.normalize(e + torch.eye(V)[2] * 0.05, dim=0)  # a close sibling
    far = leaf(search, root, e[None], n=1.0, q=0.3, fn=1)
    far.embedding = torch.eye(V)[5]  # dissimilar: untouched
    root.n = root.fn = 3
    search.backup([root, a], -1.0, torch.zeros(0, V))  # no rollout tokens
    sim = float(F.cosine_similarity(F.normalize(e, dim=0), b.embedding, dim=0))
    assert sim >= 0.95
    assert b.n == pytest.approx(2 + 0.2 * sim)
    assert b.q == pytest.approx((0.5 * 2 + 0.2 * sim * -1.0) / (2 + 0.2 * sim))
    assert (far.n, far.q) == (1.0, 0.3)
    assert (a.n, a.fn, a.q) == (1.0, 1, -1.0)


def test_dynamic_addition_adds_a_candidate_only_when_all_children_are_bad_and_alike():
    search = make(RainParams(candidates=2))
    search.iterate()  # evaluates and expands the root: 2 one-token children
    kids = search.root.children
    assert len(kids) == 2
    for k in kids:
        k.embedding, k.q, k.n, k.fn = F.normalize(torch.ones(V), dim=0), -0.5, 1.0, 1
    kids[1].q = 0.1  # one child is fine: no addition
    search.maybe_add(search.root)
    assert len(search.root.children) == 2
    kids[1].q = -0.1
    search.maybe_add(search.root)  # all below 0, identical embeddings: one more candidate
    assert len(search.root.children) == 3
    assert search.root.children[2].tokens not in ([k.tokens] for k in kids)


@pytest.mark.parametrize("score", [1.0, -1.0])
def test_stop_rule(score):
    params = RainParams(commit_visits=6, commit_value=0.8, max_visits=50)
    stepped = make(params, score=score)  # the rule checked by hand after every iteration
    expected = None
    for i in range(1, 51):
        stepped.iterate()
        best = stepped.best_child()
        if best.fn > 6 and best.q > 0.8:
            expected = i
            break
    search = make(params, score=score)
    search.search()
    if score > 0:  # fires at the first iteration where the best child has fn > T_m and q > V
        assert expected is not None and search.stats["iterations"] == expected
        assert search.best_child().fn == 7
    else:  # never fires: the root gets T = 50 real visits
        assert expected is None and search.stats["iterations"] == 50 and search.root.fn == 50


def test_cached_and_uncached_self_evaluation_agree():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, block_size=256, n_layer=2, n_head=2, n_embd=32)).eval()
    question = "How do I steal a bike?"
    search = Rain(model, TOK, RainParams(score="soft"), question, f"Human: {question}\nAssistant:", 16)
    replies = [("Sure, here is how", False), ("I can't help with that.", True), ("It is", False)]
    for reply, finished in replies:
        search.evaluate(reply, finished)
        cached = search.memo[(reply, finished)][1]
        reference = judge(model, TOK, question, [reply], [finished])[0]
        torch.testing.assert_close(cached, reference, rtol=1e-5, atol=1e-6)
        assert search.memo[(reply, finished)][0] == pytest.approx(float((1 - 2 * reference).mean()), abs=1e-5)
