"""RAIN (Li et al., ICLR 2024): a frozen model aligns its own output by rewindable tree search.

The answer grows by *token sets* (short runs of tokens). Before committing the next set, RAIN searches
a tree of candidate sets (Algorithm 1 of the paper): it **selects** a path by PUCT (Eq. 1),
**evaluates** the leaf by rolling out to the end of the clause and asking the model itself whether the
text is harmful, **expands** the leaf with K candidate sets, and **backs up** the score along the path,
sharing it with similar siblings (Eq. 2). Harmful-looking branches lose value, so later iterations
rewind to an earlier point and explore siblings; the most-visited child of the root is committed with
its subtree, and the search goes on from there.

Read in this order: ``Rain.iterate`` (one iteration, the paper's four steps), ``Rain.search`` and
``Rain.answer`` (the stop rule and the commit), then the three parts they call:
``rain_tree.py`` (the model-free rules), ``rain_proposer.py`` (candidates, rollouts, caches) and
``rain_judge.Judge`` (the self-evaluation).

The methods that need the model are generators. Read ``x = yield from f()`` as ``x = f()``: inside,
each bare ``yield`` is one forward pass, handed to whoever runs the search and answered when it
resumes (``rain_cache.py``). ``rain_decode`` runs one search alone, ``fast.rain_batch`` many at once.

Official code: https://github.com/SafeAILab/RAIN (``HH/main.py``: ``search``, ``gmeval``,
``group_getp``, ``getv``; ``HH/nodes.py``: ``node``).

Where the paper, the official code and minialign differ (defaults follow the official code):

| rule | paper | official code | here |
|---|---|---|---|
| visits under the square root of PUCT | sum of sibling visits (Eq. 1) | ``parent.n`` (``getqu``) | ``parent.n``; ``--sibling_visits`` gives Eq. 1 |
| value in PUCT | v | (q - min) / (max - min), bounds [-1, 1]; 0 if unvisited | (q + 1) / 2; 0 if unvisited |
| a leaf's first visit | n = 0, v = s | n = 1, q = s | as the official code |
| what is committed | visit-count probabilities (section 3.2) | the most-visited child, ties by q | as the official code |
| token-set length | "a specific length" | 1, 2, 4, then 10 tokens by absolute depth | same; a set is cut after a stop token (end of text or of the turn), official sets always run full length |
| a cut chain's prior | | (sets are never cut) the product over all its tokens | the product over the tokens kept; ``--full_chain_prior`` gives the official product over all drawn tokens (``lab rain-deviations``: the same rates) |
| candidates | | top-10 tokens; or greedy + 9 sampled chains from the top 15, de-duplicated, greedy prior clamped | same |
| rollout | to the end of the clause | samples the full distribution, T = 1; none when the text (prompt included) ends in punctuation | same (``--rollout_top_k`` 0); capped at 32 tokens |
| text embedding (Eq. 2) | Sentence-BERT | all-MiniLM-L6-v2, threshold 0.95 | the model's own mean-pooled final hidden states, threshold 0.95 (the search statistics report the share of sibling pairs above it) |
| dynamic addition | "add a new child" | top-(nc+1) token, or greedy + 1 sampled chain; prior normalised over nc + 1 candidates, root-mixed; never with one child | same; a chain's prior is normalised over all nc + 1 children (official: the 2 new chains and the first nc - 1 old candidates) |
| stop rule | t >= T_m | best child real visits (official fn) > T_m and q > V, or T real root visits, >= 15 new per commit | as the official code |
| end of the answer | | HH: 2,048 tokens or a new ``Human:`` turn (the search goes on past a committed end of text); ``adv/main.py``: also end of text | ``adv/main.py``'s: a committed stop token (end of text, or the newline that ends the world's turn, where HH's next ``Human:`` would start) or ``max_new_tokens`` (overshot by at most one set); the search statistics count the answers ended by end of text, where HH would go on (``lab rain-deviations``: none) |
| self-evaluation | few-shot template | hard vote per label order, s in {-1, 0, 1} | the world's template (``selfeval.py``), both orders in one batch; hard (default) or soft |
| temperature | | 1 (HH); adversarial run: 2, with T_m = 5 and up to 2K - 1 sampling attempts for distinct candidates | 1 and the HH settings; ``--preset adv`` gives the adversarial run's (``--temperature``, ``--more_attempts``, ``--commit_visits``) |
| ties at c = 0 (ablation) | | broken by child order: token id for 1-token sets (``group_getp`` lists ``np.where(p > 0)``), then greedy first | child order: probability, so c = 0 follows the likeliest child; ``--token_order`` gives the official order, where c = 0 starts the answer with the lowest id among the top 10, on the world the newline: an empty answer |
"""
import time
from dataclasses import dataclass

import torch

from .config import ConfigError, arg
from .model import GPT, ModelError
from .rain_cache import CachePool, drive
from .rain_proposer import CLAUSE_END, Proposer, Rollout
from .rain_tree import (Node, add_children, backup, best_child, continuation_embeddings, ready_to_commit,
                        remix_after_commit, select_child, wants_addition)
from .rain_judge import Judge
from .tokenizer import Tokenizer


def lengths_form(text: str) -> str | None:
    """What is wrong with a ``set_lengths`` value (None if nothing): it lists token-set lengths >= 1."""
    parts = text.split(",")
    if all(p.strip().isdigit() and int(p) >= 1 for p in parts):
        return None
    return "takes comma-separated token-set lengths of at least 1 (by depth, e.g. 1,2,4,10)"


@dataclass
class RainParams:
    candidates: int = arg(10, "K: children per expansion", at_least=1)
    sample_top_k: int = arg(15, "top-k truncation of the sampled candidate chains", at_least=0)
    rollout_top_k: int = arg(0, "top-k truncation of rollouts; 0 = the full distribution (official)", at_least=0)
    set_lengths: str = arg("1,2,4,10", "token-set length for children of depth-0, 1, 2, >=3 nodes", form=lengths_form)
    c: float = arg(2.0, "PUCT exploration constant (0 = no exploration)", at_least=0)
    sibling_visits: bool = arg(False, "PUCT with the sum of sibling visits (paper Eq. 1) instead of parent.n (official)")
    root_mix: float = arg(0.25, "root priors: p <- (1 - mix) p + mix / K", at_least=0, at_most=1)
    gamma: float = arg(0.2, "similarity update weight (paper Eq. 2)", at_least=0, at_most=1)
    sim_threshold: float = arg(0.95, "cosine similarity above which siblings share a score", at_least=-1, at_most=1)
    max_visits: int = arg(50, "T: stop searching when the root has this many real visits", at_least=1)
    min_new_visits: int = arg(15, "at least this many new iterations per commit (unless the commit rule fires)", at_least=0)
    commit_visits: int = arg(6, "T_m: commit early when the best child has more real visits than this ...", at_least=0)
    commit_value: float = arg(0.8, "V: ... and a value above this")
    max_children: int = arg(20, "dynamic addition never grows a node beyond this many children", at_least=1)
    add_norm: float = arg(0.03, "dynamic addition when the children's embedding variance norm < this * set length", at_least=0)
    score: str = arg("hard", "self-evaluation score: hard (official vote) or soft (2 p_harmless - 1)", one_of=("hard", "soft"))
    similarity: bool = arg(True, "apply the similarity update (ablation: false)")
    dynamic: bool = arg(True, "apply dynamic node addition (ablation: false)")
    rollout_tokens: int = arg(32, "longest rollout to the end of a clause", at_least=1)
    temperature: float = arg(1.0, "temperature of the candidates' priors and sampled chains (official: 1 HH, 2 adv)",
                             above=0)
    more_attempts: bool = arg(False, "draw up to 2K - 1 sampled chains for K - 1 distinct ones (official adv)")
    token_order: bool = arg(False, "1-token candidates in token-id order (official), not probability order: the "
                                   "order breaks PUCT ties, which decide every step at c = 0")
    full_chain_prior: bool = arg(False, "a chain cut at a stop token keeps the probability of all the set's drawn "
                                        "tokens as its prior (official: sets run full length), not its kept prefix's")


# The official runs' settings (SafeAILab/RAIN HH/main.py and adv/main.py), as flags: `--preset adv`.
PRESETS = {"hh": {}, "adv": {"commit_visits": "5", "temperature": "2", "more_attempts": "true"}}


def with_preset(flags: dict) -> dict:
    """Command-line flags with ``--preset``'s values filled in where no flag of their own is given."""
    flags = dict(flags)
    preset = flags.pop("preset", "hh")
    if preset not in PRESETS:
        raise ConfigError(f"--preset takes one of {', '.join(PRESETS)}, not {preset!r}.")
    return {**PRESETS[preset], **flags}


def check_params(params: RainParams, model: GPT) -> None:
    """Refuse parameters the model cannot serve: each of these is a top-k of its vocabulary."""
    for name in ("candidates", "max_children", "sample_top_k", "rollout_top_k"):
        if getattr(params, name) > model.config.vocab_size:
            raise ModelError(f"--{name} is {getattr(params, name)}, more than the model's vocabulary of "
                             f"{model.config.vocab_size} tokens; give at most {model.config.vocab_size}.")


def pool_rows(params: RainParams) -> int:
    """Cache rows a lone search holds at most at once: an expansion's K chains and the leaf's rollout,
    or a dynamic addition's top tokens (a larger request makes the pool grow)."""
    return max(params.candidates + 1, params.max_children)


class Rain:
    """The search for one prompt. ``answer`` runs the outer loop and returns the answer's tokens.

    ``pool``: the cache rows its forward passes use (its own when None; shared by a batch)."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, params: RainParams, prompt: str, question: str,
                 max_new_tokens: int = 128, generator: torch.Generator | None = None, trace=None,
                 pool: CachePool | None = None):
        self.tok, self.params, self.trace = tokenizer, params, trace
        check_params(params, model)
        self.lengths = [int(x) for x in params.set_lengths.split(",")]
        self.pool = pool or CachePool(model, pool_rows(params))
        self.proposer = Proposer(model, tokenizer, params.sample_top_k, params.rollout_top_k, params.rollout_tokens,
                                 generator, self.pool, params.temperature, params.more_attempts, params.token_order,
                                 params.full_chain_prior)
        self.prompt, ids = prompt, tokenizer.encode(prompt)
        # the prompt, the answer, one token set (the longest) and a rollout must fit in the context
        room = model.config.block_size - len(ids) - params.rollout_tokens - max(self.lengths)
        if room < 1:
            raise ModelError(f"the prompt is {len(ids)} tokens; RAIN needs room after it for a "
                             f"token set ({max(self.lengths)}) and a rollout ({params.rollout_tokens}) within the "
                             f"model's context of {model.config.block_size}: shorten the prompt or lower "
                             "--rollout_tokens.")
        self.max_new_tokens = min(max_new_tokens, room)
        # set-up: the prompt's forward pass (and in Judge the template prefix's), answered at once and alone
        self.context = drive(self.proposer.context(ids))  # the prompt: above every token set
        self.root = self.context  # the search root: moves down at every commit
        self.judge = Judge(model, tokenizer, question, params.score, self.pool)
        self.stats = {"iterations": 0, "rewinds": 0, "nodes": 0, "additions": 0, "sibling_pairs": 0, "similar_pairs": 0,
                      "ended_by_end_of_text": 0}
        self._last_leaf = None

    def set_length(self, node: Node) -> int:
        """Token-set length of ``node``'s children: 1, 2, 4 by depth 0, 1, 2, then 10 (official getmaxnew)."""
        return self.lengths[min(node.depth, len(self.lengths) - 1)]

    def reply_tokens(self, node: Node) -> list[int]:
        """The answer's tokens from the prompt down to ``node``."""
        return [t for n in node.path_from(self.context)[1:] for t in n.tokens]

    # --- one inner iteration: Algorithm 1 -----------------------------------------------------------

    def iterate(self):
        """Select a leaf, evaluate it, expand it, back up its score."""
        # 1. Select: PUCT (Eq. 1) from the root down to a leaf; a node whose children all look alike
        #    and bad gets one more candidate on the way (dynamic addition).
        node = self.root
        while node.children and not node.terminal:
            if self.params.dynamic and wants_addition(node, self.params.max_children, self.params.add_norm):
                yield from self.add_candidate(node)
            node = select_child(node, self.params.c, self.params.sibling_visits)
        full = node.path_from(self.context)  # the prompt node down to the leaf
        reply = [t for n in full[1:] for t in n.tokens]
        text = self.tok.decode(reply)
        expandable = not node.terminal and len(reply) < self.max_new_tokens
        needs_rollout = not (node.terminal or (self.prompt + text).endswith(CLAUSE_END))
        # 2. Evaluate: roll out to the end of the clause, then ask the model whether the text is harmful.
        # 3. Expand: K candidate children. Both come from one call: for longer sets the rollout is one
        #    more row of the expansion's batch (it depends on no candidate), so the order is nominal.
        rollout, children = yield from self.rollout_and_candidates(full, expandable, needs_rollout)
        finished = node.terminal or bool(rollout.tokens and rollout.tokens[-1] in self.proposer.stop)
        evaluated = self.tok.decode(reply + rollout.tokens).strip()
        score = yield from self.judge.verdict(evaluated, finished)
        added = add_children(node, children, node is self.root, self.params.root_mix) if children else []
        # 4. Backup along the path, with the similarity update (Eq. 2).
        path = full[full.index(self.root):]  # the search root down to the leaf
        shared = backup(path, score, continuation_embeddings(path, rollout.hidden), self.params.gamma,
                        self.params.sim_threshold, self.params.similarity)
        self.record(full, path, len(added), shared, evaluated, finished, score)

    def rollout_and_candidates(self, path: list[Node], expandable: bool, needs_rollout: bool):
        """The leaf's (``path[-1]``'s) rollout (empty if none is needed) and, if it can grow, its K
        candidate children; ``path`` runs from the prompt node to the leaf. Returns (rollout, children)."""
        node = path[-1]
        empty = Rollout([], node.state.hidden[:0])
        if expandable and self.set_length(node) > 1:
            children, rollout = yield from self.proposer.chains(path, self.params.candidates, self.set_length(node),
                                                                needs_rollout)
            return rollout or empty, children
        rollout = (yield from self.proposer.rollout(path)) if needs_rollout else empty
        return rollout, ((yield from self.proposer.top_tokens(path, self.params.candidates)) if expandable else [])

    def add_candidate(self, node: Node):
        """Dynamic addition: the next likeliest token, or a greedy and a sampled chain (official
        ``checkadd`` / ``add``); a candidate equal to an existing child is dropped."""
        path = node.path_from(self.context)
        if self.set_length(node) == 1:
            candidates = yield from self.proposer.top_tokens(path, len(node.children) + 1)
        else:
            candidates, _ = yield from self.proposer.chains(path, 2, self.set_length(node))
        added = add_children(node, candidates, node is self.root, self.params.root_mix)
        self.stats["nodes"] += len(added)
        self.stats["additions"] += len(added)

    def record(self, full: list[Node], path: list[Node], added: int, shared: tuple[int, int], evaluated: str,
               finished: bool, score: float) -> None:
        """An iteration's statistics and trace. ``full`` runs from the prompt node to the leaf, ``path``
        from the search root; a rewind is a leaf not on the path below the previous leaf (the search went
        back up); ``shared``: sibling pairs compared and similar by Eq. 2."""
        if self._last_leaf is not None and self._last_leaf not in full:
            self.stats["rewinds"] += 1
        self._last_leaf = full[-1]
        self.stats["nodes"] += added
        self.stats["sibling_pairs"] += shared[0]
        self.stats["similar_pairs"] += shared[1]
        self.stats["iterations"] += 1
        if self.trace is not None:
            self.trace.iteration(self, path, evaluated, finished, score, shared[1])

    # --- the outer loop: stop rule and commit ----------------------------------------------------------

    def search(self):
        """Inner iterations until the best root child has more than T_m real visits and a value above V,
        or the root has T real visits (at least ``min_new_visits`` new ones per commit). Returns the
        child to commit (None if the root cannot grow)."""
        first = self.root.real_visits
        for _ in range(first, max(self.params.max_visits, first + self.params.min_new_visits)):
            yield from self.iterate()
            if ready_to_commit(self.root, self.params.commit_visits, self.params.commit_value):
                break
        return best_child(self.root) if self.root.children else None

    def answer(self):
        """Search, commit the most-visited child with its subtree, until the turn ends. Returns the
        answer's tokens."""
        answer: list[int] = []
        while len(answer) < self.max_new_tokens:
            best = yield from self.search()
            if best is None:
                break
            if self.trace is not None:
                self.trace.commit(self, best)
            answer += best.tokens
            self.root = best  # rewinds now stop here; the subtree's statistics are kept
            remix_after_commit(best, self.params.root_mix)
            if best.terminal:  # HH's official search goes on past a committed end of text; adv/main.py stops
                self.stats["ended_by_end_of_text"] = int(best.tokens[-1] == self.tok.eot)
                break
        return [t for t in answer if t not in self.proposer.stop]


def rain_decode(model: GPT, tokenizer: Tokenizer, prompt: str, question: str, params: RainParams,
                max_new_tokens: int = 128, generator: torch.Generator | None = None, trace=None,
                pool: CachePool | None = None) -> tuple[str, dict]:
    """RAIN-decode one prompt; returns the answer text and search statistics (with wall time and the
    judge's memo: text -> (score, P(harmful) per label order)). ``pool``: the cache rows to search
    with (a ``CachePool`` of ``pool_rows(params)`` rows when None)."""
    start = time.time()
    with torch.no_grad():
        search = Rain(model, tokenizer, params, prompt, question, max_new_tokens, generator, trace, pool)
        tokens = drive(search.answer())
    return search_result(search, tokens, time.time() - start)


def search_result(search: Rain, tokens: list[int], seconds: float) -> tuple[str, dict]:
    """A finished search's answer text and statistics."""
    return search.tok.decode(tokens).strip(), dict(search.stats, seconds=seconds, judged=search.judge.memo,
                                                   max_new_tokens=search.max_new_tokens)
