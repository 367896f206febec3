"""Many RAIN searches as one batch: each prompt's answer and search statistics are exactly those of its
search alone (a scripted model; a real GPT in float64), and the shared cache rows answer any mix of
requests as lone forward passes would."""
import pytest
import torch

import minialign.rain as rain
from minialign.model import GPT, GPTConfig
from minialign.rain import RainParams, rain_decode
from minialign.fast import rain_batch
from minialign.fast.graph_pool import GraphPool, RowGraphs, pool_for
from minialign.fast.rain_batch import prompt_generator, rain_decode_batch
from minialign.rain_cache import CachePool, Forward
from test_rain import TOK, V, BigramModel, ScriptedJudge

STATS = ("iterations", "rewinds", "nodes", "additions", "sibling_pairs", "similar_pairs", "ended_by_end_of_text",
         "max_new_tokens")


def alone_and_batched(model, prompts, params, max_new_tokens, batch):
    alone = [rain_decode(model, TOK, prompt, question, params, max_new_tokens, prompt_generator(7, i))
             for i, (prompt, question) in enumerate(prompts)]
    return alone, rain_decode_batch(model, TOK, prompts, params, max_new_tokens, seed=7, batch=batch)


def assert_same_searches(alone, batched):
    for (a_answer, a), (b_answer, b) in zip(alone, batched, strict=True):
        assert b_answer == a_answer
        assert {k: b[k] for k in STATS} == {k: a[k] for k in STATS}
        assert list(b["judged"]) == list(a["judged"])  # the same texts judged, in the same order
        for key, (score, p_harmful) in a["judged"].items():
            assert b["judged"][key][0] == score
            torch.testing.assert_close(b["judged"][key][1], p_harmful, rtol=0, atol=1e-9)


def test_batched_searches_on_a_scripted_model_are_the_lone_searches(monkeypatch):
    # question "hard": every text is judged harmful, so the stop rule never fires early and that search
    # runs T = 50 iterations per commit against 12 for the others
    monkeypatch.setattr(rain, "Judge", lambda model, tokenizer, question, score, pool:
                        ScriptedJudge(fixed=-1.0 if question == "hard" else None))
    prompts = [("Q:", "Q"), ("A longer Q:", "hard"), ("Q?:", "Q"), ("Hi. Q:", "hard"), ("Q:", "Q")]
    params = RainParams(set_lengths="1,2,3,4")
    rounds = []
    run = CachePool.run
    monkeypatch.setattr(CachePool, "run", lambda pool, requests: rounds.append(len(requests)) or run(pool, requests))
    alone, batched = alone_and_batched(BigramModel().eval(), prompts, params, 16, batch=3)
    assert_same_searches(alone, batched)
    iterations = {stats["iterations"] for _, stats in alone}
    assert len(iterations) > 1  # the searches finish at different times: the batch shrinks and refills
    assert max(rounds) == 3  # never more searches in flight than the batch (lone rounds have 1)
    assert all(0 < stats["seconds"] < 60 for _, stats in batched)  # each search's own span of wall time


def test_each_search_reports_to_its_own_trace(monkeypatch):
    from minialign.lab.rain_trace import SearchTrace
    monkeypatch.setattr(rain, "Judge", lambda model, tokenizer, question, score, pool: ScriptedJudge())
    traces = [SearchTrace(), SearchTrace()]
    results = rain_decode_batch(BigramModel().eval(), TOK, [("Q:", "Q"), ("Hi Q:", "Q")], RainParams(), 16,
                                batch=2, traces=traces)
    for trace, (answer, stats) in zip(traces, results):
        record = trace.finish(answer)
        assert record["prompt"] in ("Q:", "Hi Q:") and record["answer"] == answer == "gy."
        assert sum(len(s["iterations"]) for s in record["steps"]) == stats["iterations"]
    assert traces[0].prompt == "Q:" and traces[1].prompt == "Hi Q:"


def force_graphs(monkeypatch, graphs: bool) -> None:
    """The batched driver's cache pool with graphs forced on or off (on a CPU graphs' padded passes run eagerly)."""
    monkeypatch.setattr(rain_batch, "pool_for", lambda model, rows: pool_for(model, rows, graphs))


@pytest.mark.parametrize("graphs", [False, True])  # True: passes padded to fixed shapes, as on CUDA
def test_batched_searches_on_a_float64_gpt_are_the_lone_searches(monkeypatch, graphs):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, block_size=160, n_layer=2, n_head=2, n_embd=32)).double().eval()
    prompts = [(f"Human: {q}\nAssistant:", q) for q in ("Hi", "How do I bake bread?", "Why?", "Tell me a joke, please.")]
    params = RainParams(max_visits=12, min_new_visits=6, rollout_tokens=12)
    force_graphs(monkeypatch, graphs)
    alone, batched = alone_and_batched(model, prompts, params, 12, batch=3)
    assert_same_searches(alone, batched)
    assert all(stats["judged"] for _, stats in alone) and len({a for a, _ in alone}) > 1


def test_a_lone_search_in_the_batched_driver_pads_every_pass(monkeypatch):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, block_size=160, n_layer=1, n_head=2, n_embd=16)).eval()
    force_graphs(monkeypatch, True)  # graphs, as on CUDA
    passes = []  # the method that ran each pass
    for cls, name in ((GraphPool, "forward"), (RowGraphs, "run")):
        def counted(*args, method=getattr(cls, name), name=name):
            passes.append(name)
            return method(*args)
        monkeypatch.setattr(cls, name, counted)
    rain_decode_batch(model, TOK, [("Human: Hi\nAssistant:", "Hi")], RainParams(max_visits=6, min_new_visits=3), 8,
                      batch=1)
    assert passes and passes.count("run") == passes.count("forward")  # K + 1 = 11 rows need 5 free rows to make 16


def uncached_last(model, ids):
    with torch.no_grad():
        h = model.hidden(torch.tensor([ids]))[0, -1]
    return h, model.lm_head(h).float()


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("width", [24, 4])  # the whole context; too narrow: rows widen keeping what they hold
def test_a_mixed_round_of_requests_equals_lone_uncached_forwards(width, graphs):
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=V, block_size=24, n_layer=2, n_head=2, n_embd=16)).eval()
    pool = (GraphPool if graphs else CachePool)(model, 1, width)  # too few rows: it grows and keeps what its rows hold
    prefixes = [[5, 6, 7], [8] * 10, [9, 10], [11] * 14, [12] * 15]
    news = [[3], [4] * 10, [12], [13, 14, 15, 16, 17, 18], [19, 20]]  # 2 steps, 3 longer requests
    requests = []
    for prefix, new in zip(prefixes, news):
        cache = model.new_cache(1, len(prefix))
        with torch.no_grad():
            model.hidden(torch.tensor([prefix]), cache)
        rows = pool.take(1, cache.k[:, 0], cache.v[:, 0])
        requests.append(Forward(pool, rows, torch.tensor([new]), len(prefix)))
    # padded to the widest (10), the one starting at 14 just fits the context of 24, the one at 15 not
    assert [[len(r.tokens[0]) for r in g] for g in pool.groups(requests)] == [[1, 1], [10, 6], [2]]
    for (h, logits), prefix, new, r in zip(pool.run(requests), prefixes, news, requests):
        ref_h, ref_logits = uncached_last(model, prefix + new)
        torch.testing.assert_close(h[0], ref_h, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits[0], ref_logits, rtol=1e-5, atol=1e-5)
        assert pool.lengths[r.rows[0]] == len(prefix + new)  # padding is not kept
    pool.give_back([r.rows[0] for r in requests])
    assert sorted(pool.free) == list(range(pool.cache.batch_size))  # growing lost no row
    assert pool.cache.max_len == 24  # never wider than the context, whatever doubling asks


def test_rows_are_as_wide_as_the_paths_asked_for():
    torch.manual_seed(4)
    model = GPT(GPTConfig(vocab_size=V, block_size=512, n_layer=1, n_head=2, n_embd=16)).eval()
    pool = CachePool(model, 2, width=8)
    empty = torch.zeros(1, 0, 2, 8)
    (h, _), = pool.run([Forward(pool, pool.take(1, empty, empty), torch.tensor([list(range(1, 70))]), 0)])
    torch.testing.assert_close(h[0], uncached_last(model, list(range(1, 70)))[0], rtol=1e-5, atol=1e-5)
    assert pool.cache.max_len == 128  # 8 -> the 69 positions asked for, rounded up to 64s; not the context's 512


@pytest.mark.parametrize("graphs", [False, True])  # True: the pass is padded to 32 columns and 4 rows
def test_padded_requests_answer_at_the_columns_asked(graphs):
    torch.manual_seed(2)
    model = GPT(GPTConfig(vocab_size=V, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    pool = (GraphPool if graphs else CachePool)(model, 4, width=4)
    empty = torch.zeros(1, 0, 2, 8)
    a = Forward(pool, pool.take(2, empty, empty), torch.tensor([[1, 2, 3, 0], [4, 5, 6, 7]]), 0, torch.tensor([2, 3]))
    b = Forward(pool, pool.take(1, empty, empty), torch.tensor([[8, 9]]), 0)
    (h_a, _), (h_b, _) = pool.run([a, b])
    assert pool.groups([a, b]) == [[a, b]]
    for h, ids in ((h_a[0], [1, 2, 3]), (h_a[1], [4, 5, 6, 7]), (h_b[0], [8, 9])):
        torch.testing.assert_close(h, uncached_last(model, ids)[0], rtol=1e-5, atol=1e-5)
    assert [pool.lengths[row] for row in a.rows + b.rows] == [4, 4, 2]  # padding is not kept
    assert pool.cache.max_len == (32 if graphs else 4)  # the padded pass's columns had to fit
    assert (getattr(pool, "replays", None) is not None) == graphs
    more = pool.take(3, empty, empty)  # one row free, three asked: the pool grows and keeps the free one
    assert 3 in more and pool.cache.batch_size == 8
    pool.give_back(a.rows + b.rows + more)
    assert sorted(pool.free) == list(range(8))


def test_prompt_generators_are_distinct_streams():
    draws = {(s, i): int(torch.randint(1 << 30, (1,), generator=prompt_generator(s, i))) for s in (0, 1) for i in range(50)}
    assert len(set(draws.values())) == len(draws)  # no two (seed, prompt) pairs share a stream


@pytest.mark.parametrize("graphs", [False, True])
def test_one_token_requests_on_dense_and_on_scattered_rows(graphs):
    torch.manual_seed(3)
    model = GPT(GPTConfig(vocab_size=V, block_size=32, n_layer=2, n_head=2, n_embd=16)).eval()
    prefix = [1, 2, 3, 4]
    cache = model.new_cache(1, len(prefix))
    with torch.no_grad():
        model.hidden(torch.tensor([prefix]), cache)
    reference = uncached_last(model, prefix + [7])[0]
    for lent in ([0, 1, 2], [0, 9]):  # a range read in place; a range mostly idle: its rows are gathered
        pool = (GraphPool if graphs else CachePool)(model, 10)
        rows = pool.take(10, cache.k[:, 0], cache.v[:, 0])
        pool.give_back([r for r in rows if r not in lent])
        (h, _), = pool.run([Forward(pool, lent, torch.full((len(lent), 1), 7), len(prefix))])
        for row in h:
            torch.testing.assert_close(row, reference, rtol=1e-5, atol=1e-5)
        assert pool.lengths == [len(prefix) + 1 if r in lent else 0 for r in range(10)]
        assert (getattr(pool, "replays", None) is not None) == graphs  # the fixed-shape pass ran when asked for


def test_graphs_are_cuda_only_by_default_and_padded_to_few_shapes():
    model = GPT(GPTConfig(vocab_size=V, block_size=16, n_layer=1, n_head=1, n_embd=8))
    assert type(pool_for(model, 2)) is CachePool  # a CPU computes rather than launches: exact spans are faster
    assert [RowGraphs.size_for(n) for n in (1, 2, 3, 4, 5, 8, 9, 11)] == [1, 2, 4, 4, 8, 8, 16, 16]
    assert [RowGraphs.columns_for(n) for n in (1, 2, 31, 32, 33, 100)] == [1, 32, 32, 32, 64, 128]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_replayed_graphs_equal_eager_passes():
    torch.manual_seed(6)
    model = GPT(GPTConfig(vocab_size=V, block_size=64, n_layer=2, n_head=2, n_embd=16)).cuda().eval()
    pools = [pool_for(model, 16), CachePool(model, 16)]  # graphs: the default on CUDA
    k, v = torch.randn(2, 2, 5, 2, 8, device="cuda").unbind(0)  # the same random prefix in every row
    for pool in pools:
        pool.give_back(pool.take(16, k, v)[12:])  # rows 12..15 free: what a pass pads with
    for step, lent in enumerate(([0, 1, 2], [3, 4, 5, 6, 7], [8], [0, 1, 2], [9, 10, 11])):  # sizes repeat: replays
        (graphed, _), (eager, _) = [pool.run([Forward(pool, lent, torch.full((len(lent), 1), 3 + step),
                                                      pool.lengths[lent[0]])])[0] for pool in pools]
        torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)
    for lent, tokens in (([0, 1], [[5, 6, 7], [7, 6, 5]]), ([3, 4], [[1, 2, 3, 4, 5]] * 2)):  # judge-like passes
        (graphed, _), (eager, _) = [pool.run([Forward(pool, lent, torch.tensor(tokens), pool.lengths[lent[0]])])[0]
                                    for pool in pools]
        torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)
        assert pools[0].lengths == pools[1].lengths  # the padded columns are not kept
    assert sorted(pools[0].replays.graphs) == [(1, 1), (2, 32), (4, 1), (8, 1)]  # captured once per shape


def test_an_idle_row_as_wide_as_the_pool_survives_a_pass_over_its_range():
    torch.manual_seed(5)
    model = GPT(GPTConfig(vocab_size=V, block_size=128, n_layer=1, n_head=2, n_embd=16)).eval()
    prefixes = [[1, 2, 3], list(range(1, 9)), [4, 5, 6]]  # the middle row fills a pool 8 wide
    pool = CachePool(model, 3, width=8)
    rows = []
    for prefix in prefixes:
        cache = model.new_cache(1, len(prefix))
        with torch.no_grad():
            model.hidden(torch.tensor([prefix]), cache)
        rows += pool.take(1, cache.k[:, 0], cache.v[:, 0])
    # a pass over rows 0 and 2 runs over the view of rows 0..2: it writes one key past the idle row 1
    steps = pool.run([Forward(pool, [rows[0], rows[2]], torch.tensor([[7], [7]]), 3)])[0][0]
    torch.testing.assert_close(steps[1], uncached_last(model, [4, 5, 6, 7])[0], rtol=1e-5, atol=1e-5)
    (h, _), = pool.run([Forward(pool, [rows[1]], torch.tensor([[9]]), 8)])  # the idle row's own pass comes next
    torch.testing.assert_close(h[0], uncached_last(model, list(range(1, 9)) + [9])[0], rtol=1e-5, atol=1e-5)


def test_a_search_runs_every_forward_pass_through_the_pool(monkeypatch):
    # the protocol's promise: a search never calls the model itself, set-up included; every pass (the
    # prompt's, the judge prefix's, each step and verdict) happens inside CachePool.run
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, block_size=160, n_layer=1, n_head=2, n_embd=16)).eval()
    inside, outside, setups = [False], [], []
    run, hidden = CachePool.run, model.hidden

    def counted_run(pool, requests):
        inside[0] = True
        setups.extend(r.setup for r in requests)
        try:
            return run(pool, requests)
        finally:
            inside[0] = False

    monkeypatch.setattr(CachePool, "run", counted_run)
    monkeypatch.setattr(model, "hidden", lambda *a, **k: outside.append(1) if not inside[0] else hidden(*a, **k))
    rain_decode(model, TOK, "Q: hi\nA:", "hi", RainParams(max_visits=6), 6, torch.Generator().manual_seed(0))
    assert not outside and setups.count(True) == 2 and len(setups) > 2  # the prompt's and the judge prefix's


def test_set_up_passes_equal_a_fresh_cache_forward():
    # a set-up request runs alone at its own width: the prompt's keys, values, hidden states and logits
    # are bit for bit those of a plain forward into a cache of its own, whatever the pool holds
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=V, block_size=64, n_layer=2, n_head=2, n_embd=16)).eval()
    ids = torch.randint(0, V, (1, 21))
    with torch.no_grad():
        cache = model.new_cache(1, 21)
        hidden = model.hidden(ids, cache)  # (1, T, C)
        pool = CachePool(model, 4)
        busy = pool.take(2)
        step = Forward(pool, busy, torch.randint(0, V, (2, 5)), 0)
        rows = pool.take(1)
        (_, _), (h, logits) = pool.run([step, Forward(pool, rows, ids, 0, setup=True)])
        k, v = pool.read(rows, 0, 21)
    assert torch.equal(h, hidden) and torch.equal(logits, model.lm_head(hidden[:, -1]))
    assert torch.equal(k, cache.k) and torch.equal(v, cache.v)
