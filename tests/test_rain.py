"""RAIN's search on a scripted model (a bigram table of fixed logits) with a scripted judge, and its
model side (tree caches, rollouts, the self-evaluation) against uncached forwards of a real GPT."""
import math

import pytest
import torch
import torch.nn.functional as F

from minialign.model import GPT, GPTConfig
from minialign.rain import Rain, RainParams
from minialign.rain_cache import drive
from minialign.rain_tree import Node
from minialign.sampling import generate, stop_ids
from minialign.rain_judge import Judge, hard_score, soft_score
from minialign.selfeval import self_eval_parts, self_evaluate
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

    def verdict(self, reply, finished):  # a generator, as the model's judge: it asks for no forward pass
        yield from ()
        s = self.fixed if self.fixed is not None else (-1.0 if "x" in reply else 1.0)
        self.memo[(reply, finished)] = (s, torch.tensor([float(s < 0)] * 2))
        return s


def make(params=None, fixed=None, seed=0):
    search = Rain(BigramModel().eval(), TOK, params or RainParams(), "Q:", "Q", 16, torch.Generator().manual_seed(seed))
    search.judge = ScriptedJudge(fixed)
    return search


def test_commits_to_the_harmless_branch_when_the_likely_one_is_harmful():
    model = BigramModel().eval()
    assert TOK.decode(generate(model, [TOK.encode("Q:")], 8, stop_ids(TOK), temperature=0)[0]) == "bx."  # vanilla
    for seed in range(3):
        search = make(seed=seed)
        assert TOK.decode(drive(search.answer())) == "gy." and search.stats["rewinds"] > 0


def test_without_exploration_the_search_follows_the_likely_harmful_branch():
    search = make(RainParams(c=0.0))
    assert TOK.decode(drive(search.answer())) == "bx."


def test_first_expansion_priors_are_the_root_mixed_token_probabilities():
    search = make()
    drive(search.iterate())  # the root: judged as it is (the prompt ends in ':'), then expanded with the top 10 tokens
    assert list(search.judge.memo) == [("", False)]  # no rollout after "Q:" (official getv)
    priors = {c.tokens[0]: c.prior for c in search.root.children}
    assert len(priors) == 10
    assert priors[ord("b")] == pytest.approx(0.75 * 0.6 + 0.025, abs=1e-6)
    assert priors[ord("g")] == pytest.approx(0.75 * 0.4 + 0.025, abs=1e-6)
    assert sum(priors.values()) == pytest.approx(1.0)


def test_a_leaf_is_rolled_out_to_the_end_of_its_clause():
    search = make()
    drive(search.iterate())
    drive(search.iterate())  # selects 'b' (highest prior), rolls out "x." and judges "bx."
    assert ("bx.", False) in search.judge.memo
    b = next(c for c in search.root.children if c.tokens == [ord("b")])
    assert b.real_visits == 1 and b.q == -1.0


def test_visits_and_values_follow_the_backup_rule():
    search = make(RainParams(similarity=False, dynamic=False))
    for _ in range(30):
        drive(search.iterate())
    scores = []

    def check(node):  # an expanded, non-terminal node was a leaf once: real visits = 1 + the sum of its children's
        kids = node.children
        assert node.n == node.real_visits  # no similarity visits
        if kids and not node.terminal:
            assert node.real_visits == 1 + sum(c.real_visits for c in kids if c.real_visits)
            own = node.q * node.real_visits - sum(c.q * c.real_visits for c in kids)  # the score of its own evaluation
            assert own == pytest.approx(1.0) or own == pytest.approx(-1.0)
            scores.append(own)
        for c in kids:
            check(c)
    check(search.root)
    assert search.root.real_visits == 30 and scores


def test_dynamic_addition_gives_the_new_candidate_its_share():
    search = make(RainParams(candidates=2))
    drive(search.iterate())  # the root gets 2 one-token children: 'b' and 'g'
    kids = list(search.root.children)
    for k in kids:
        k.embedding, k.q, k.n, k.real_visits = F.normalize(torch.ones(V), dim=0), -0.5, 1.0, 1
    drive(search.iterate())  # all alike and bad: one more candidate before selecting
    assert len(search.root.children) == 3 and search.stats["additions"] == 1
    added = search.root.children[2]
    assert added.tokens not in [k.tokens for k in kids]
    assert added.prior == pytest.approx(0.25 / 3, abs=1e-6)  # p ~ e^-30: only the root's uniform share
    assert [k.prior for k in kids] == pytest.approx([0.75 * 0.6 + 0.125, 0.75 * 0.4 + 0.125], abs=1e-6)
    drive(search.add_candidate(search.root))  # one more: the counters add up
    assert search.stats["additions"] == 2 and search.stats["nodes"] == sum(1 for _ in walk(search.context)) - 1


@pytest.mark.parametrize("score", [1.0, -1.0])
def test_stop_rule(score):
    params = RainParams(commit_visits=6, commit_value=0.8, max_visits=50)
    stepped = make(params, fixed=score)  # the rule checked by hand after every iteration
    expected = None
    for i in range(1, 51):
        drive(stepped.iterate())
        best = max(stepped.root.children, key=lambda c: (c.n, c.q))
        if best.real_visits > 6 and best.q > 0.8:
            expected = i
            break
    search = make(params, fixed=score)
    drive(search.search())
    if score > 0:  # fires at the first iteration where the best child has real visits > T_m and q > V
        assert expected is not None and search.stats["iterations"] == expected
    else:  # never fires: the root gets T = 50 real visits
        assert expected is None and search.stats["iterations"] == 50 and search.root.real_visits == 50


def test_at_least_15_new_iterations_per_commit():
    search = make(fixed=0.0)  # a value of 0 never passes V: only T and the floor stop the search
    search.root.real_visits = 45
    drive(search.search())
    assert search.stats["iterations"] == 15  # T = 50 would allow 5


def test_commit_takes_the_most_visited_child_and_keeps_its_subtree():
    search = make()
    best = drive(search.search())
    assert best is max(search.root.children, key=lambda c: (c.n, c.q))
    drive(search.answer())
    assert search.root.depth >= 1 and search.root.real_visits > 0  # the committed node kept its statistics


def real_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=V, block_size=256, n_layer=2, n_head=2, n_embd=32)).eval()


def test_tree_keys_and_values_equal_an_uncached_forward():
    model = real_model()
    search = Rain(model, TOK, RainParams(), "Human: Hi\nAssistant:", "Hi", 40, torch.Generator().manual_seed(0))
    search.judge = ScriptedJudge(fixed=0.0)
    for _ in range(12):
        drive(search.iterate())
    nodes = list(walk(search.root))
    assert max(n.depth for n in nodes) >= 3 and len(nodes) > 20
    for node in nodes:  # every candidate, from every row of its batch
        path = node.path_from(search.context)
        ids = torch.tensor([[t for n in path for t in n.tokens]])
        with torch.no_grad():
            reference_logits = model(ids)[0, -1]
            cache = model.new_cache(1, ids.size(1))
            model.hidden(ids, cache)
        torch.testing.assert_close(torch.cat([n.state.k for n in path], 1), cache.k[:, 0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.cat([n.state.v for n in path], 1), cache.v[:, 0], rtol=1e-5, atol=1e-5)
        if node.state.next_logits is not None:
            torch.testing.assert_close(node.state.next_logits, reference_logits, rtol=1e-5, atol=1e-5)


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
        reference = self_evaluate(model, TOK, question, [reply], [finished])[0]
        torch.testing.assert_close(cached.memo[(reply, finished)][1], reference, rtol=1e-5, atol=1e-6)
        assert s == pytest.approx(float((1 - 2 * reference).mean()), abs=1e-5)


def test_rain_decode_returns_the_answer_text_and_the_search_statistics(monkeypatch):
    import minialign.rain as rain
    from minialign.lab.rain_trace import SearchTrace
    questions = []
    monkeypatch.setattr(rain, "Judge", lambda model, tokenizer, question, score, pool: questions.append(question) or ScriptedJudge())
    trace = SearchTrace()
    model = BigramModel().eval()
    state = torch.get_rng_state()
    answer, stats = rain.rain_decode(model, TOK, "Q:", "Q", RainParams(), 16,
                                     torch.Generator().manual_seed(0), trace)
    assert torch.equal(torch.get_rng_state(), state)  # sampled from the given generator only
    assert answer == "gy." and questions == ["Q"] and trace.steps
    assert stats["iterations"] > 0 and stats["rewinds"] > 0 and stats["nodes"] > 0 and 0 < stats["seconds"] < 60
    assert ("bx.", False) in stats["judged"] and stats["judged"][("bx.", False)][0] == -1.0


def test_set_lengths_by_depth_and_the_room_left_for_the_answer():
    search = make()
    drive(search.iterate())
    drive(search.iterate())
    depths = {}
    for d in range(6):
        probe = Node([0], 1.0)
        probe.depth = d
        depths[d] = search.set_length(probe)
    assert depths == {0: 1, 1: 2, 2: 4, 3: 10, 4: 10, 5: 10}
    for child in walk(search.context):
        if child.parent is not None and not child.terminal:
            assert len(child.tokens) == search.set_length(child.parent)
    wide = Rain(BigramModel().eval(), TOK, RainParams(), "Q:", "Q", 1000)
    assert wide.max_new_tokens == 128 - 2 - 32 - 10  # context - prompt - rollout - longest set
    deep_first = Rain(BigramModel().eval(), TOK, RainParams(set_lengths="12,1"), "Q:", "Q", 1000)
    assert deep_first.max_new_tokens == 128 - 2 - 32 - 12  # the longest set, wherever it comes
    assert all(v == 0 for v in wide.stats.values())


def test_set_lengths_take_positive_integers_by_depth():
    from minialign.rain import lengths_form
    assert all(lengths_form(text) is None for text in ("1,2,4,10", "3", " 2, 5"))
    for bad in ("", "1,,2", "0,1", "1.5", "a", "-1", "1;2"):
        assert lengths_form(bad) == "takes comma-separated token-set lengths of at least 1 (by depth, e.g. 1,2,4,10)"


def test_one_token_sets_roll_out_on_their_own():
    search = make(RainParams(set_lengths="1,1,1,1"))
    drive(search.iterate())
    drive(search.iterate())  # selects 'b', expands it with one-token children, rolls out "x." alone
    assert ("bx.", False) in search.judge.memo


def test_multi_token_addition_is_a_greedy_and_a_sampled_chain():
    search = make()
    drive(search.iterate())
    drive(search.iterate())  # 'b' (depth 1) now has 2-token children
    b = next(c for c in search.root.children if c.tokens == [ord("b")])
    before = {tuple(c.tokens) for c in b.children}
    total = sum(c.raw_prior for c in b.children)
    drive(search.add_candidate(b))
    added = [c for c in b.children if tuple(c.tokens) not in before]
    assert len(added) <= 1 and search.stats["additions"] == len(added)  # the greedy chain is a duplicate
    for c in added:
        assert len(c.tokens) == 2 and c.prior == pytest.approx(c.raw_prior / (total + c.raw_prior))


def test_rewinds_are_leaves_not_below_the_previous_leaf():
    from minialign.lab.rain_trace import SearchTrace
    search = make()
    search.trace = SearchTrace()
    drive(search.answer())
    paths = [it["path"] for step in search.trace.steps for it in step["iterations"]]
    expected = sum(prev[-1] not in path for prev, path in zip(paths, paths[1:]))
    assert search.stats["rewinds"] == expected > 0


def test_harmful_probability_by_hand():
    from minialign.selfeval import harmful_probability
    letters = torch.tensor([0, 1])
    logits = torch.tensor([[math.log(0.2), math.log(0.6), 5.0],    # order 0: (A) harmful -> P(A) = 0.25
                           [math.log(0.2), math.log(0.6), -5.0]])  # order 1: (B) harmful -> P(B) = 0.75
    assert harmful_probability(logits, letters) == pytest.approx(torch.tensor([0.25, 0.75]))


def test_an_overlong_reply_is_judged_by_its_beginning():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, block_size=160, n_layer=1, n_head=1, n_embd=8)).eval()
    j = Judge(model, TOK, "Q?", "hard")
    room = 160 - len(j.prefix_ids)
    reply = "word " * 40
    rows = j.rows(reply, True)
    assert max(map(len, rows)) <= room
    kept = TOK.decode(rows[0]).split('..." (unfinished)')[0]
    assert reply.startswith(kept) and len(kept) > 8 and (len(reply) - len(kept)) % 8 == 0  # cut 8 at a time
    longer = [TOK.encode(self_eval_parts("Q?", reply[: len(kept) + 8], False, o)[1]) for o in (0, 1)]
    assert max(map(len, longer)) > room  # 8 more characters would not fit
    assert j.rows("short", True)[0] == TOK.encode(self_eval_parts("Q?", "short", True, 0)[1])


def test_proposer_samples_within_top_k_reproducibly():
    from minialign.rain_proposer import Proposer
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]])).expand(4000, -1)
    draw = lambda seed, k: Proposer(BigramModel(), TOK, 15, 0, 32, torch.Generator().manual_seed(seed)).sample(logits, k)
    assert torch.equal(draw(1, 0), draw(1, 0)) and not torch.equal(draw(1, 0), draw(2, 0))
    top2 = draw(0, 2)
    assert set(top2.tolist()) == {0, 1} and (top2 == 0).float().mean() == pytest.approx(4 / 7, abs=0.03)
    assert (draw(0, 0) == 3).float().mean() == pytest.approx(0.1, abs=0.02)


def test_proposer_refuses_a_generator_off_the_host():
    from types import SimpleNamespace
    from minialign.rain_proposer import Proposer
    on_gpu = SimpleNamespace(device=torch.device("cuda"))  # what a torch.Generator("cuda") reports, without CUDA
    with pytest.raises(ValueError, match="RAIN samples on the host: give it a CPU torch.Generator, not one on cuda"):
        Proposer(BigramModel(), TOK, 15, 0, 32, on_gpu)


def test_continuation_embeddings_by_hand():
    from minialign.rain_proposer import NodeState
    from minialign.rain_tree import continuation_embeddings
    def node(tokens, hidden, parent):
        return Node(tokens, 1.0, parent, state=NodeState(None, None, torch.tensor(hidden), None))
    root = node([0], [[9.0, 9.0, 9.0]], None)
    a = node([1, 2], [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], root)
    b = node([3], [[0.0, 1.0, 0.0]], a)
    c = node([4, 5], [[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]], b)
    tail = torch.tensor([[0.0, 0.0, 3.0]])  # the rollout's hidden states
    e_a, e_b, e_c = continuation_embeddings([root, a, b, c], tail)
    assert e_a == pytest.approx(F.normalize(torch.tensor([2.0, 3.0, 4.0]), dim=0))  # a's tokens to the end
    assert e_b == pytest.approx(F.normalize(torch.tensor([0.0, 3.0, 4.0]), dim=0))  # from b on
    assert e_c == pytest.approx(F.normalize(torch.tensor([0.0, 2.0, 4.0]), dim=0))  # from c on


def test_the_search_samples_only_from_its_own_generator():
    model = real_model()
    state = torch.get_rng_state()
    answers = []
    for _ in range(2):
        search = Rain(model, TOK, RainParams(), "Human: Hi\nAssistant:", "Hi", 24, torch.Generator().manual_seed(3))
        search.judge = ScriptedJudge(fixed=0.0)
        answers.append(drive(search.answer()))
    assert answers[0] == answers[1] and torch.equal(torch.get_rng_state(), state)  # the global stream untouched


def test_node_count_and_a_multi_token_addition_asks_for_two_chains():
    search = make()
    asked = []
    chains = search.proposer.chains
    search.proposer.chains = lambda path, k, length, with_rollout=False: asked.append(k) or chains(path, k, length, with_rollout)
    for _ in range(6):
        drive(search.iterate())
    b = next(c for c in search.root.children if c.tokens == [ord("b")])
    drive(search.add_candidate(b))
    drive(search.add_candidate(b))
    assert asked[-2:] == [2, 2]  # official add: group_getp(topk=2), a greedy and a sampled chain
    assert search.stats["nodes"] == sum(1 for _ in walk(search.context)) - 1  # every node ever added


def test_a_batched_rollout_is_cut_at_its_clause_end():
    search = make(RainParams(set_lengths="1,4,4,4"))
    drive(search.iterate())
    drive(search.iterate())  # 'b' expands with 4-token chains; its rollout row reads "x.\n..." and is cut after '.'
    assert ("bx.", False) in search.judge.memo and ("bx.", True) not in search.judge.memo


def test_judge_defaults_to_the_hard_vote_and_names_a_bad_score():
    model = real_model()
    assert Judge(model, TOK, "Q?").score_of is hard_score
    with pytest.raises(ValueError, match="unknown self-evaluation score 'vote'; choose one of: hard, soft"):
        Judge(model, TOK, "Q?", "vote")


def test_answer_letters_and_the_whole_template():
    from minialign.selfeval import answer_letter, self_eval_prompt
    assert [answer_letter(h, o) for h in (True, False) for o in (0, 1)] == ["A", "B", "B", "A"]
    text = self_eval_prompt("Why?", "Because", False, 1)
    assert text == "".join(self_eval_parts("Why?", "Because", False, 1)) and text.startswith("User: Why?\n")
    assert text.endswith("(A) harmless, (B) harmful.\nThe answer is: (")


def test_a_rollout_samples_as_the_uncached_model_would():
    from minialign.rain_proposer import Proposer
    model = real_model()
    proposer = Proposer(model, TOK, 15, 0, 12, torch.Generator().manual_seed(5))
    context = drive(proposer.context(TOK.encode("Human: Hi\nAssistant:")))
    rollout = drive(proposer.rollout([context]))
    g, ids, reference = torch.Generator().manual_seed(5), list(context.tokens), []
    with torch.no_grad():
        for _ in range(12):  # the reference: the whole sequence through the model for every token
            t = int(torch.multinomial(F.softmax(model(torch.tensor([ids]))[0, -1], -1)[None], 1, generator=g))
            reference.append(t)
            ids.append(t)
            if proposer.ends_clause(t):
                break
        hidden = model.hidden(torch.tensor([ids]))[0, len(context.tokens):]
    assert rollout.tokens == reference and len(reference) > 1
    n = len(reference) - proposer.ends_clause(reference[-1])  # a clause-ending token has no embedding
    torch.testing.assert_close(rollout.hidden, hidden[:n], rtol=1e-5, atol=1e-5)


def test_a_leaf_without_rollout_adds_nothing_to_its_embedding():
    search = make()
    drive(search.iterate())
    leaf = search.root.children[0]
    rollout, children = drive(search.rollout_and_candidates(leaf.path_from(search.context), expandable=False, needs_rollout=False))
    assert rollout.tokens == [] and rollout.hidden.shape == (0, V) and children == []


def test_a_batched_rollout_goes_on_alone_through_the_cache():
    from minialign.rain_proposer import Proposer
    model = real_model()
    proposer = Proposer(model, TOK, 15, 0, 16, torch.Generator().manual_seed(2))
    proposer.ends_clause = lambda token: False  # never ends: the rollout runs its 16 tokens
    context = drive(proposer.context(TOK.encode("Human: Hi\nAssistant:")))
    _, rollout = drive(proposer.chains([context], 3, 2, with_rollout=True))  # 2 tokens in the batch, 14 alone
    assert len(rollout.tokens) == 16
    with torch.no_grad():
        hidden = model.hidden(torch.tensor([context.tokens + rollout.tokens]))[0, len(context.tokens):]
    torch.testing.assert_close(rollout.hidden, hidden, rtol=1e-5, atol=1e-5)


def test_a_float64_search_past_its_commits_matches_uncached_forwards_everywhere(monkeypatch):
    """A real search on a float64 GPT, run through several commits, against full forwards of each text:
    every node's keys, values, hidden states and next-token logits, every one-token candidate's prior,
    every rollout's hidden states, and every judged text starting from the prompt's committed answer."""
    import minialign.rain as rain
    torch.manual_seed(4)
    model = GPT(GPTConfig(vocab_size=V, block_size=256, n_layer=2, n_head=2, n_embd=32)).double().eval()
    prompt = "Human: Hi\nAssistant:"
    search = Rain(model, TOK, RainParams(max_visits=8, min_new_visits=4), prompt, "Hi", 24,
                  torch.Generator().manual_seed(2))
    rollouts, judged, commits = [], [], []
    rollout_and_candidates, verdict = search.rollout_and_candidates, search.judge.verdict

    def recording_rollouts(path, expandable, needs_rollout):
        rollout, children = yield from rollout_and_candidates(path, expandable, needs_rollout)
        rollouts.append(([t for n in path for t in n.tokens], rollout))
        return rollout, children

    def recording_verdicts(reply, finished):
        judged.append((TOK.decode(search.reply_tokens(search.root)).strip(), reply, finished))
        return (yield from verdict(reply, finished))

    def recording_embeddings(path, tail, embed=rain.continuation_embeddings):
        embeddings.append(([n.tokens for n in path[1:]], embed(path, tail)))
        return embeddings[-1][1]

    def checked_additions(node, children, is_root, mix, add=rain.add_children):
        assert is_root == (node is search.root)  # the root mix applies at the search root, wherever it has moved
        return add(node, children, is_root, mix)
    embeddings = []
    monkeypatch.setattr(search, "rollout_and_candidates", recording_rollouts)
    monkeypatch.setattr(search.judge, "verdict", recording_verdicts)
    monkeypatch.setattr(rain, "continuation_embeddings", recording_embeddings)
    monkeypatch.setattr(rain, "add_children", checked_additions)
    monkeypatch.setattr(rain, "remix_after_commit", lambda best, mix, remix=rain.remix_after_commit:
                        commits.append(best) or remix(best, mix))
    drive(search.answer())
    assert len(commits) >= 2 and max(n.depth for n in walk(search.context)) >= 3

    @torch.no_grad()
    def uncached(ids):
        cache = model.new_cache(1, len(ids))
        hidden = model.hidden(torch.tensor([ids]), cache)[0]  # (T, C)
        return cache, hidden, model.lm_head(hidden[-1])
    for node in walk(search.context):  # the prompt node, the committed path and every sibling ever made
        path = node.path_from(search.context)
        ids = [t for n in path for t in n.tokens]
        cache, hidden, logits = uncached(ids)
        torch.testing.assert_close(torch.cat([n.state.k for n in path], 1), cache.k[:, 0], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(torch.cat([n.state.v for n in path], 1), cache.v[:, 0], rtol=1e-9, atol=1e-9)
        tol = 1e-9 if node.state.hidden.dtype == torch.float64 else 1e-6  # the prompt node keeps float32
        torch.testing.assert_close(node.state.hidden.double(), hidden[-len(node.tokens):], rtol=tol, atol=tol)
        if node.state.next_logits is not None:
            torch.testing.assert_close(node.state.next_logits.double(), logits, rtol=tol, atol=tol)
        if node.parent is not None and len(node.tokens) == 1 and node.depth == 1:  # a one-token candidate
            _, _, parent_logits = uncached(ids[:-1])
            assert node.raw_prior == pytest.approx(float(parent_logits.softmax(-1)[node.tokens[0]]), rel=1e-6)  # float32 logits
    for ids, rollout in rollouts:  # each rollout continues its leaf's text, as a full forward would
        if rollout.tokens:
            _, hidden, _ = uncached(ids + rollout.tokens)
            torch.testing.assert_close(rollout.hidden, hidden[len(ids): len(ids) + len(rollout.hidden)],
                                       rtol=1e-9, atol=1e-9)
    assert any(answer for answer, _, _ in judged)  # some texts were judged after a commit
    assert all(reply.startswith(answer) for answer, reply, _ in judged)
    stop = stop_ids(TOK)
    assert len(judged) == len(rollouts) == len(embeddings)  # one of each per iteration
    for (ids, rollout), (_, _, finished), (sets, embedded) in zip(rollouts, judged, embeddings):
        assert finished == ((ids + rollout.tokens)[-1] in stop)  # the turn ended in the leaf or in its rollout
        _, hidden, _ = uncached(ids + rollout.tokens)
        end = len(ids) + len(rollout.hidden)  # the text's hidden states: a clause-ending last token has none
        start = end - len(rollout.hidden) - sum(map(len, sets))
        for tokens, e in zip(sets, embedded):  # Eq. 2's text: from each node's tokens to the rollout's end
            torch.testing.assert_close(e.double(), F.normalize(hidden[start:end].mean(0), dim=-1), rtol=1e-6, atol=1e-6)
            start += len(tokens)


def test_after_a_commit_the_root_mix_moves_with_the_search_root(monkeypatch):
    """Every expansion and dynamic addition mixes priors at the search root, which moves down at each
    commit: here every node whose children all look bad gets one more, so the new roots grow too."""
    import minialign.rain as rain
    search = Rain(real_model(), TOK, RainParams(candidates=3, max_visits=12, min_new_visits=6, add_norm=1e9),
                  "Human: Hi\nAssistant:", "Hi", 24, torch.Generator().manual_seed(0))
    search.judge = ScriptedJudge(fixed=-1.0)  # every text harmful: every node with children wants an addition
    at_moved_root = []

    def checked(node, children, is_root, mix, add=rain.add_children):
        assert is_root == (node is search.root)
        at_moved_root.append(is_root and node is not search.context)
        return add(node, children, is_root, mix)
    monkeypatch.setattr(rain, "add_children", checked)
    drive(search.answer())
    assert any(at_moved_root)  # the check ran where the two differ


def test_the_adversarial_preset_is_the_official_adv_settings_and_flags_still_win():
    from minialign.config import ConfigError, build
    from minialign.rain import with_preset
    adv = build(RainParams, with_preset({"preset": "adv"}))
    assert (adv.commit_visits, adv.temperature, adv.more_attempts) == (5, 2.0, True)  # adv/main.py: minT, group_getp
    assert build(RainParams, with_preset({"preset": "adv", "commit_visits": "7"})).commit_visits == 7
    assert build(RainParams, with_preset({})) == RainParams()  # hh: the defaults
    with pytest.raises(ConfigError, match="--preset takes one of hh, adv, not 'ad'"):
        with_preset({"preset": "ad"})


def test_candidates_at_a_temperature_and_with_more_attempts():
    from minialign.rain_proposer import Proposer
    model = real_model()
    root = Rain(model, TOK, RainParams(), "Human: Hi\nAssistant:", "Hi", 24).context
    hot = Proposer(model, TOK, 15, 0, 32, torch.Generator().manual_seed(0), temperature=2.0)
    children = drive(hot.top_tokens([root], 10))
    expected = torch.softmax(root.state.next_logits / 2.0, -1)  # official getp: logits / T, then softmax
    assert [c.raw_prior for c in children] == pytest.approx(expected.topk(10).values.tolist(), rel=1e-6)
    asked = []
    more = Proposer(model, TOK, 15, 0, 32, torch.Generator().manual_seed(0), more_attempts=True)
    rows_for = more.rows_for
    more.rows_for = lambda path, n: asked.append(n) or rows_for(path, n)
    chains = drive(more.chains([root], 4, 3))[0]
    assert asked == [8]  # the greedy chain and 2K - 1 = 7 samples
    greedy = [int(root.state.next_logits.argmax())]
    assert chains[0].tokens[0] == greedy[0] and 1 < len(chains) <= 4  # at most K children, the greedy first
    assert len({tuple(c.tokens) for c in chains}) == len(chains)


def test_below_the_root_a_chain_addition_gets_its_share_unmixed_and_the_greedy_chain_is_clamped():
    """Away from the root (a depth-1 node with 2-token chains, on a real GPT whose top-15 branches): an
    added chain's prior is its raw prior over all the node's candidates, with no root mix, and the greedy
    chain's raw prior sits within the official clamp of its sampled siblings."""
    search = Rain(real_model(), TOK, RainParams(candidates=4), "Human: Hi\nAssistant:", "Hi", 24,
                  torch.Generator().manual_seed(1))
    search.judge = ScriptedJudge(fixed=-1.0)
    for _ in range(3):
        drive(search.iterate())
    node = next(c for c in search.root.children if len(c.children) > 1)  # a depth-1 node, expanded with chains
    greedy, sampled = node.children[0], [c.raw_prior for c in node.children[1:]]
    assert max(sampled) + min(sampled) - 1e-12 <= greedy.raw_prior <= sum(sampled) + 1e-12  # clamp_greedy_prior
    before, total = list(node.children), sum(c.raw_prior for c in node.children)
    assert [c.prior for c in before] == pytest.approx([c.raw_prior / total for c in before])  # no root mix below it
    drive(search.add_candidate(node))
    added = [c for c in node.children if c not in before]
    assert added and all(len(c.tokens) == 2 for c in added)
    for c in added:
        assert c.prior == pytest.approx(c.raw_prior / (total + sum(a.raw_prior for a in added)))


def test_at_c_0_the_order_of_the_children_breaks_every_tie():
    """At c = 0 every unvisited child scores 0, so the first child wins: the likeliest token, or with
    ``token_order`` the smallest token id (official group_getp lists the top tokens by id). After ':' the
    harmless 'g' is made the likelier here, so the two orders commit different answers."""
    model = BigramModel().eval()
    with torch.no_grad():  # lm_head.weight[next, previous]
        model.lm_head.weight[ord("g"), ord(":")], model.lm_head.weight[ord("b"), ord(":")] = math.log(0.6), math.log(0.4)
    answers, candidates = {}, {}
    for token_order in (False, True):
        search = Rain(model, TOK, RainParams(c=0.0, token_order=token_order), "Q:", "Q", 16, torch.Generator().manual_seed(0))
        search.judge = ScriptedJudge()
        answers[token_order] = TOK.decode(drive(search.answer()))
        candidates[token_order] = [(c.tokens[0], c.raw_prior) for c in search.context.children]
    assert answers == {False: "gy.", True: "bx."}
    assert [t for t, _ in candidates[True]] == sorted(t for t, _ in candidates[True])
    assert candidates[False][0][0] == ord("g") and sorted(candidates[False]) == candidates[True]  # same candidates, priors


def test_a_cut_chain_keeps_its_prefix_prior_or_with_full_chain_prior_all_its_drawn_tokens():
    """Every token stops the turn here, so every chain is cut after its first token: its prior is that
    token's probability, or with ``full_chain_prior`` the product over all L drawn tokens, which the
    same draws without any stop token give as the uncut chain's prior (official sets run full length)."""
    from minialign.rain_proposer import Proposer
    model = real_model()
    context = Rain(model, TOK, RainParams(), "Human: Hi\nAssistant:", "Hi", 24).context
    children = {}
    for name, full, stop in (("prefix", False, frozenset(range(V))), ("full", True, frozenset(range(V))),
                             ("uncut", False, frozenset())):
        proposer = Proposer(model, TOK, 15, 0, 32, torch.Generator().manual_seed(3), full_chain_prior=full)
        proposer.stop = stop
        children[name] = drive(proposer.chains([context], 6, 4))[0]
    top15 = torch.topk(context.state.next_logits, 15)
    top = dict(zip(top15.indices.tolist(), F.softmax(top15.values, -1).tolist()))  # the truncated distribution
    for cut, full in zip(children["prefix"][1:], children["full"][1:]):  # past the clamped greedy chain
        assert cut.tokens == full.tokens and len(cut.tokens) == 1 and cut.terminal
        assert cut.raw_prior == pytest.approx(top[cut.tokens[0]], rel=1e-5)
        uncut = next(c for c in children["uncut"] if c.tokens[0] == cut.tokens[0])  # the first row drawing it
        assert full.raw_prior == pytest.approx(uncut.raw_prior, rel=1e-5) and full.raw_prior < cut.raw_prior


def test_the_search_counts_an_answer_ended_by_end_of_text():
    """adv/main.py ends the answer at a committed end of text, as here; HH's search would go on, so the
    statistics say when that happened: the bigram's turn ends at a newline, or at end of text once '.'
    leads there."""
    newline = make()
    assert TOK.decode(drive(newline.answer())) == "gy." and newline.stats["ended_by_end_of_text"] == 0
    model = BigramModel().eval()
    with torch.no_grad():  # lm_head.weight[next, previous]: after '.' comes end of text, not the newline
        model.lm_head.weight[:, ord(".")] = -30.0
        model.lm_head.weight[TOK.eot, ord(".")] = 0.0
    search = Rain(model, TOK, RainParams(), "Q:", "Q", 16, torch.Generator().manual_seed(0))
    search.judge = ScriptedJudge()
    assert TOK.decode(drive(search.answer())) == "gy." and search.stats["ended_by_end_of_text"] == 1


def test_the_search_hands_its_parameters_to_the_rules_and_counts_what_they_return(monkeypatch):
    """Rain.iterate passes each RainParams field to the rule that uses it (PUCT's visits, Eq. 2's gamma,
    threshold and switch; the proposer's options), and its statistics add up what backup reports."""
    import minialign.rain as rain
    params = RainParams(sibling_visits=True, gamma=0.3, sim_threshold=-1.0, similarity=True, more_attempts=True,
                        token_order=True, full_chain_prior=True, temperature=1.5)
    selected, backed = [], []

    def recording_select(node, c, sibling_visits, select=rain.select_child):
        selected.append(sibling_visits)
        return select(node, c, sibling_visits)

    def recording_backup(path, score, embeddings, gamma, threshold, similarity, backup=rain.backup):
        backed.append(((gamma, threshold, similarity), backup(path, score, embeddings, gamma, threshold, similarity)))
        return backed[-1][1]
    monkeypatch.setattr(rain, "select_child", recording_select)
    monkeypatch.setattr(rain, "backup", recording_backup)
    search = Rain(real_model(), TOK, params, "Human: Hi\nAssistant:", "Hi", 24, torch.Generator().manual_seed(0))
    search.judge = ScriptedJudge(fixed=-1.0)
    p = search.proposer
    assert (p.more_attempts, p.token_order, p.full_chain_prior, p.temperature) == (True, True, True, 1.5)
    for _ in range(6):
        drive(search.iterate())
    assert selected and all(s is True for s in selected)
    assert all(args == (0.3, -1.0, True) for args, _ in backed)
    assert search.stats["sibling_pairs"] == sum(r[0] for _, r in backed) > 0
    assert search.stats["similar_pairs"] == sum(r[1] for _, r in backed) > 0  # threshold -1: every pair shares
    assert any(node.n != node.real_visits for node in walk(search.context))  # fractional visits from Eq. 2
