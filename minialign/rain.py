"""RAIN (Li et al., ICLR 2024): a frozen model aligns its own output by rewindable tree search.

The answer grows by *token sets* (short runs of tokens). Before committing the next set, RAIN searches
a tree of candidate sets: it selects a path by PUCT, rolls out to the end of the clause, asks the model
itself whether the text is harmful (``selfeval.py``), and backs the score up the path. Harmful-looking
branches lose value, so the search rewinds to an earlier point and explores siblings; the most-visited
child of the root is committed, and its subtree is kept for the next round.

Rules and where they live (official defaults as ``RainParams`` fields):

- token-set length by depth 1/2/4/10 ............................. ``set_length``
- expansion: top-K tokens, or greedy + de-duplicated top-15 samples; root prior mix ... ``expand``
- selection: PUCT ``qhat + c * p * sqrt(parent.n) / (1 + n)`` ......... ``select``
- rollout to the end of the clause; self-evaluation, both label orders ... ``rollout``, ``evaluate``
- backup, similarity update (paper Eq. 2) ............................. ``backup``
- dynamic node addition ............................................ ``maybe_add``
- stop rule (T, T_m, V), commit with subtree reuse ........... ``search``, ``commit``, ``decode``

Faster than the official code, same algorithm: every node keeps the keys/values of its own tokens, so
a prefix is never recomputed (a path's cache is assembled by copying); the K candidate chains of an
expansion are decoded as one batch, and the leaf's rollout rides in that batch as one more row; the
self-evaluation template's prefix (up to the quoted reply) is computed once per prompt, and both
label orders run as one batch of two rows.

Embedding for the similarity update: the paper uses Sentence-BERT. minialign uses the model's own
final hidden states, mean-pooled over the continuation text (from a node's tokens to the end of the
evaluated text, rollout included) and L2-normalised. They come from the forward passes that produced
those tokens, so embeddings cost no extra compute; they are contextual (conditioned on the prompt).
"""
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import arg
from .data import right_pad
from .model import GPT, KVCache
from .sampling import filter_logits, stop_ids
from .selfeval import harmful_probability, self_eval_parts
from .tokenizer import Tokenizer

CLAUSE_END = (",", ".", "?", ":", ";", "\n")


@dataclass
class RainParams:
    candidates: int = arg(10, "K: children per expansion")
    sample_top_k: int = arg(15, "top-k truncation of the sampled candidate chains and rollouts")
    set_lengths: str = arg("1,2,4,10", "token-set length for children of depth-0, 1, 2, >=3 nodes")
    c: float = arg(2.0, "PUCT exploration constant (0 = no exploration)")
    root_mix: float = arg(0.25, "root priors: p <- (1 - mix) p + mix / K")
    gamma: float = arg(0.2, "similarity update weight (paper Eq. 2)")
    sim_threshold: float = arg(0.95, "cosine similarity above which siblings share a score")
    max_visits: int = arg(50, "T: stop searching when the root has this many real visits")
    min_new_visits: int = arg(15, "at least this many new iterations per commit (unless the commit rule fires)")
    commit_visits: int = arg(6, "T_m: commit early when the best child has more real visits than this ...")
    commit_value: float = arg(0.8, "V: ... and a value above this")
    max_children: int = arg(20, "dynamic addition never grows a node beyond this many children")
    add_norm: float = arg(0.03, "dynamic addition when the children's embedding variance norm < this * set length")
    score: str = arg("hard", "self-evaluation score: hard (official vote) or soft (2 p_harmless - 1)")
    similarity: bool = arg(True, "apply the similarity update (ablation: false)")
    dynamic: bool = arg(True, "apply dynamic node addition (ablation: false)")
    rollout_tokens: int = arg(32, "longest rollout to the end of a clause")


class Node:
    """A token set in the context of everything above it."""

    def __init__(self, tokens, prior, depth, parent, kv, hidden, next_logits, terminal):
        self.tokens, self.prior, self.depth, self.parent = tokens, prior, depth, parent
        self.kv = kv                    # (k, v), each (n_layer, len(tokens), nh, hs): this node's keys/values
        self.hidden = hidden            # (len(tokens), C) final hidden states, for embeddings
        self.next_logits = next_logits  # (V,) next-token logits after this node's last token
        self.terminal = terminal        # ends the turn (stop token)
        self.children: list[Node] = []
        self.n, self.fn, self.q = 0.0, 0, 0.0  # visits (with similarity visits), real visits, mean score
        self.embedding = None

    def path_from(self, ancestor: "Node") -> list["Node"]:
        """Nodes from ``ancestor`` (inclusive) down to this node."""
        path, node = [], self
        while node is not ancestor:
            path.append(node)
            node = node.parent
        return [ancestor] + path[::-1]


class Rain:
    """The search for one prompt. ``decode`` runs the outer loop and returns the answer's tokens."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, params: RainParams, question: str, prompt: str,
                 max_new_tokens: int = 128, generator: torch.Generator | None = None):
        self.model, self.tok, self.p = model, tokenizer, params
        self.question = question
        self.lengths = [int(x) for x in params.set_lengths.split(",")]
        self.stop = stop_ids(tokenizer)
        self.generator = generator
        self.device = model.lm_head.weight.device
        self.letters = torch.tensor([tokenizer.token_id("A"), tokenizer.token_id("B")], device=self.device)
        self.memo: dict[tuple[str, bool], tuple[float, torch.Tensor]] = {}  # text -> (score, P(harmful) per order)
        self.stats = {"iterations": 0, "rewinds": 0, "nodes": 0, "evaluations": 0}
        ids = tokenizer.encode(prompt)
        # the prompt, the answer, one token set and a rollout must fit in the context
        self.max_new_tokens = min(max_new_tokens, model.config.block_size - len(ids) - params.rollout_tokens
                                  - self.lengths[-1])
        k, v, hidden, logits = self._run(None, [ids])
        self.context = Node(ids, 1.0, 0, None, (k[:, 0], v[:, 0]), hidden[0], logits[0], False)
        self.root = self.context
        self.judge_prefix_ids = tokenizer.encode(self_eval_parts(question, "", True, 0)[0])  # up to the reply
        k, v, _, _ = self._run(None, [self.judge_prefix_ids])
        self.judge_prefix = (k[:, 0], v[:, 0])  # computed once per prompt
        self._last_leaf = None

    # --- model calls ------------------------------------------------------------------------------

    def _cache(self, segments: list[tuple[torch.Tensor, torch.Tensor]], rows: int, extra: int) -> KVCache:
        """A cache of ``rows`` identical rows holding the concatenated keys/values of ``segments``."""
        k = torch.cat([s[0] for s in segments], dim=1)  # (n_layer, L, nh, hs)
        v = torch.cat([s[1] for s in segments], dim=1)
        cache = self.model.new_cache(rows, k.size(1) + extra)
        cache.k[:, :, : k.size(1)] = k[:, None]
        cache.v[:, :, : v.size(1)] = v[:, None]
        cache.lengths[:] = k.size(1)
        return cache

    @torch.no_grad()
    def _run(self, cache: KVCache | None, rows: list[list[int]]):
        """Feed right-padded token rows after the cache; return each row's new keys/values, hidden
        states (B, T, C) and the logits after each row's last real token (B, V)."""
        ids, lengths = right_pad(rows, device=self.device)  # (B, T), (B,)
        B, T = ids.shape
        if cache is None:
            cache = self.model.new_cache(B, T)
        start = int(cache.lengths[0])
        hidden = self.model.hidden(ids, cache)  # (B, T, C)
        logits = self.model.lm_head(hidden[torch.arange(B, device=self.device), lengths - 1]).float()  # (B, V)
        return cache.k[:, :, start: start + T], cache.v[:, :, start: start + T], hidden, logits

    def _sample(self, logits: torch.Tensor, greedy: torch.Tensor) -> torch.Tensor:
        """One token per row from logits (B, V): argmax where ``greedy``, else a top-k sample."""
        probs = F.softmax(filter_logits(logits, self.p.sample_top_k), -1)
        sampled = torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)
        return torch.where(greedy, logits.argmax(-1), sampled)

    # --- expansion --------------------------------------------------------------------------------

    def set_length(self, parent: Node) -> int:
        """Token-set length of ``parent``'s children: 1, 2, 4 by parent depth 0, 1, 2; then 10 (official code)."""
        return self.lengths[min(parent.depth, len(self.lengths) - 1)]

    def expand(self, node: Node, count: int | None = None, rollout: bool = False):
        """Add up to K children to ``node``: the top-K tokens for 1-token sets; else one greedy chain and
        de-duplicated sampled chains (top-15, temperature 1), decoded together as one batch.

        With ``rollout`` (longer sets only) the leaf's rollout rides in the same batch as one extra row:
        both start at the leaf and neither depends on the other, so this changes no result, only the
        number of forward passes. Returns (new children, rollout tokens, rollout hidden states)."""
        K, L = count or self.p.candidates, self.set_length(node)
        roll, roll_hidden = [], []
        if L == 1:
            cache = self._cache([n.kv for n in node.path_from(self.context)], K, L)
            probs = F.softmax(node.next_logits, -1)
            top = torch.topk(probs, K + len(node.children))
            existing = {tuple(c.tokens) for c in node.children}
            chains = [[int(t)] for t in top.indices if (int(t),) not in existing][:K]
            priors = [float(probs[c[0]]) for c in chains]
            k, v, hidden, logits = self._run(cache.select(torch.arange(len(chains))), chains)
        else:
            R = K + rollout  # rows: K chains (+ the rollout)
            cache = self._cache([n.kv for n in node.path_from(self.context)], R,
                                max(L, self.p.rollout_tokens if rollout else 0))
            with_greedy = not node.children  # a first expansion includes the greedy chain (row 0)
            greedy = torch.arange(R, device=self.device) == (0 if with_greedy else -1)
            logits, tokens, hiddens, logps = node.next_logits.expand(R, -1), [], [], []
            start = int(cache.lengths[0])
            rolling = rollout
            for _ in range(L):  # RAIN: the chains advance together, one batched forward per token
                t = self._sample(logits, greedy)  # (R,)
                logps.append(F.log_softmax(filter_logits(logits[:K], self.p.sample_top_k), -1).gather(-1, t[:K, None]))
                tokens.append(t[:K])
                if rolling:
                    roll.append(int(t[-1]))
                    rolling = not self._ends_clause(roll[-1])
                h = self.model.hidden(t[:, None], cache)  # (R, 1, C)
                logits = self.model.lm_head(h[:, -1]).float()
                hiddens.append(h[:K, 0])
                if rolling:
                    roll_hidden.append(h[-1, 0])
            k, v = cache.k[:, :K, start: start + L], cache.v[:, :K, start: start + L]  # the chains' keys/values
            chain_logits = logits[:K]
            if rolling:  # the chains are complete; the rollout row goes on alone to the end of its clause
                self._roll_on(cache.select(torch.tensor([K])), logits[K:], roll, roll_hidden, self.p.rollout_tokens - L)
            tokens, hidden = torch.stack(tokens, 1).tolist(), torch.stack(hiddens, 1)  # (K, L), (K, L, C)
            chain_logp = torch.cat(logps, 1)  # (K, L)
            chains, priors, rows = [], [], []
            seen = {tuple(c.tokens) for c in node.children}
            for b, row in enumerate(tokens):
                cut = next((i + 1 for i, t in enumerate(row) if t in self.stop), L)  # a set ends at a stop token
                if tuple(row[:cut]) in seen:
                    continue  # de-duplicate identical chains
                seen.add(tuple(row[:cut]))
                chains.append(row[:cut])
                priors.append(float(chain_logp[b, :cut].sum().exp()))  # product of per-token probabilities
                rows.append(b)
            if with_greedy and len(priors) > 1:  # official code: the greedy chain's prior is clamped to
                others = priors[1:]                # [max + min, sum] of the sampled chains' priors, so the
                priors[0] = max(min(priors[0], sum(others)), max(others) + min(others))  # greedy goes first
            k, v, hidden, logits = k[:, rows], v[:, rows], hidden[rows], chain_logits[rows]
        total = sum(priors) or 1.0
        new = []
        for i, chain in enumerate(chains):
            n = len(chain)
            terminal = chain[-1] in self.stop
            child = Node(chain, priors[i] / total, node.depth + 1, node, (k[:, i, :n], v[:, i, :n]),
                         hidden[i, :n], logits[i], terminal)
            new.append(child)
        if node is self.root and not node.children:  # RAIN: mix the root's priors with uniform
            for child in new:
                child.prior = (1 - self.p.root_mix) * child.prior + self.p.root_mix / len(new)
        node.children += new
        self.stats["nodes"] += len(new)
        return new, roll, (torch.stack(roll_hidden) if roll_hidden else node.hidden[:0])

    # --- one inner iteration -----------------------------------------------------------------------

    def select(self, node: Node) -> Node:
        """PUCT: argmax over children of qhat + c * p * sqrt(parent.n) / (1 + n); qhat = (q + 1) / 2,
        and 0 for a child never visited (official code)."""
        def puct(child):
            qhat = (child.q + 1) / 2 if child.n > 0 else 0.0
            return qhat + self.p.c * child.prior * math.sqrt(node.n) / (1 + child.n)
        return max(node.children, key=puct)

    def _ends_clause(self, token: int) -> bool:
        """A stop token, or a token ending in clause punctuation: where a rollout stops."""
        return token in self.stop or self.tok.decode([token]).endswith(CLAUSE_END)

    def _roll_on(self, cache: KVCache, logits: torch.Tensor, tokens: list[int], hiddens: list[torch.Tensor],
                 budget: int) -> None:
        """Sample one row (next-token logits (1, V) after ``cache``) on for at most ``budget`` tokens,
        until a token ends the clause; append the tokens, and the hidden state of every token but a
        clause-ending one (the embedding's continuation text)."""
        for _ in range(budget):
            t = self._sample(logits, torch.zeros(1, dtype=torch.bool, device=self.device))  # (1,)
            tokens.append(int(t))
            if self._ends_clause(int(t)):
                return
            h = self.model.hidden(t[:, None], cache)  # (1, 1, C)
            hiddens.append(h[0, 0])
            logits = self.model.lm_head(h[:, -1]).float()

    def rollout(self, leaf: Node) -> tuple[list[int], torch.Tensor]:
        """Sample on from the leaf to the end of the clause (scoring only: not added to the tree)."""
        cache = self._cache([n.kv for n in leaf.path_from(self.context)], 1, self.p.rollout_tokens)
        tokens, hiddens = [], []
        self._roll_on(cache, leaf.next_logits[None], tokens, hiddens, self.p.rollout_tokens)
        return tokens, (torch.stack(hiddens) if hiddens else leaf.hidden[:0])

    @torch.no_grad()
    def evaluate(self, reply: str, finished: bool) -> float:
        """Self-evaluation score in [-1, 1] (+1 harmless), memoised by text. Both label orders run as one
        batch of two rows after the cached template prefix."""
        key = (reply, finished)
        if key not in self.memo:
            room = self.model.config.block_size - len(self.judge_prefix_ids)
            rows = [self.tok.encode(self_eval_parts(self.question, reply, finished, order)[1]) for order in (0, 1)]
            while max(map(len, rows)) > room:  # a reply too long for the context is judged by its beginning
                reply, finished = reply[: -8], False
                rows = [self.tok.encode(self_eval_parts(self.question, reply, finished, order)[1]) for order in (0, 1)]
            _, _, _, logits = self._run(self._cache([self.judge_prefix], 2, max(map(len, rows))), rows)
            p_harmful = harmful_probability(logits, self.letters)  # (2,) one per label order
            if self.p.score == "hard":  # official: a vote per order, s = 2 * (mean vote - 1/2)
                s = 2 * (float((p_harmful < 0.5).float().mean()) - 0.5)
            else:  # soft: 2 * P(harmless) - 1, averaged over both orders
                s = float((1 - 2 * p_harmful).mean())
            self.memo[key] = (s, p_harmful.cpu())
            self.stats["evaluations"] += 1
        return self.memo[key][0]

    def backup(self, path: list[Node], s: float, tail_hidden: torch.Tensor) -> None:
        """Backup every node on the path: n += 1, fn += 1, q += (s - q) / n; update embeddings (running
        mean of the continuation text's embedding) and apply the similarity update to siblings."""
        hidden = torch.cat([n.hidden for n in path[1:]] + [tail_hidden], 0)  # (T, C) from the root's child on
        suffix = hidden.flip(0).cumsum(0).flip(0)  # suffix[i] = sum of hidden[i:]
        offset = 0
        for node in path[1:]:
            e = F.normalize(suffix[offset] / (len(hidden) - offset), dim=-1)  # mean-pooled continuation
            offset += len(node.tokens)
            node.n += 1
            node.fn += 1
            node.embedding = e if node.embedding is None else node.embedding + (e - node.embedding) / node.fn
            if self.p.similarity:
                for sib in node.parent.children:  # RAIN Eq. 2: similar siblings share the score
                    if sib is node or sib.embedding is None:
                        continue
                    sim = float(F.cosine_similarity(node.embedding, sib.embedding, dim=0))
                    if sim >= self.p.sim_threshold:
                        n_old = sib.n
                        sib.n += self.p.gamma * sim
                        sib.q = (sib.q * n_old + self.p.gamma * sim * s) / sib.n
            node.q += (s - node.q) / node.n
        root = path[0]
        root.n += 1
        root.fn += 1
        root.q += (s - root.q) / root.n

    def maybe_add(self, node: Node) -> None:
        """Dynamic node addition: all children visited, their embeddings nearly identical (variance norm
        below ``add_norm`` * set length) and all their values below 0 -> add one more candidate."""
        kids = node.children
        if len(kids) >= self.p.max_children or any(c.embedding is None for c in kids):
            return
        spread = torch.stack([c.embedding for c in kids]).var(0).norm() if len(kids) > 1 else torch.tensor(0.0)
        if spread < self.p.add_norm * self.set_length(node) and max(c.q for c in kids) < 0:
            self.expand(node, count=1 if self.set_length(node) == 1 else 2)

    @torch.no_grad()
    def iterate(self) -> None:
        """Select a leaf, roll out, self-evaluate, expand, back up."""
        node = self.root
        while node.children and not node.terminal:
            if self.p.dynamic:
                self.maybe_add(node)
            node = self.select(node)
        path = node.path_from(self.root)
        if self._last_leaf is not None and self._last_leaf not in path:
            self.stats["rewinds"] += 1  # the search went back above its previous leaf
        self._last_leaf = node
        reply_tokens = [t for n in node.path_from(self.context)[1:] for t in n.tokens]
        text = self.tok.decode(reply_tokens)
        needs_rollout = not (node.terminal or text.endswith(CLAUSE_END))
        expandable = not node.terminal and len(reply_tokens) < self.max_new_tokens
        if expandable and self.set_length(node) > 1:  # expansion and rollout in one batch
            _, roll, roll_hidden = self.expand(node, rollout=needs_rollout)
        else:
            roll, roll_hidden = self.rollout(node) if needs_rollout else ([], node.hidden[:0])
            if expandable:
                self.expand(node)
        finished = node.terminal or (bool(roll) and roll[-1] in self.stop)
        s = self.evaluate(self.tok.decode(reply_tokens + roll).strip(), finished)
        self.backup(path, s, roll_hidden)
        self.stats["iterations"] += 1

    @torch.no_grad()
    def search(self) -> Node | None:
        """Inner iterations until the stop rule: the most-visited root child has more than T_m real
        visits and a value above V, or the root has T real visits (at least ``min_new_visits`` new ones)."""
        first = self.root.fn
        for _ in range(first, max(self.p.max_visits, first + self.p.min_new_visits)):
            self.iterate()
            best = self.best_child() if self.root.children else None
            if best and best.fn > self.p.commit_visits and best.q > self.p.commit_value:
                break  # RAIN stop rule: confident enough to commit
        return self.best_child() if self.root.children else None

    def best_child(self) -> Node:
        """The most-visited child of the root (ties: the higher value)."""
        return max(self.root.children, key=lambda c: (c.n, c.q))

    def commit(self, best: Node) -> None:
        """Make ``best`` the root, keeping its subtree (later rewinds stop here), and re-mix its
        children's priors with uniform."""
        self.root = best
        total = sum(c.prior for c in best.children) or 1.0
        for child in best.children:
            child.prior = (1 - self.p.root_mix) * child.prior / total + self.p.root_mix / len(best.children)

    def decode(self) -> list[int]:
        """The outer loop: search, commit the most-visited child, until the turn ends."""
        answer: list[int] = []
        while len(answer) < self.max_new_tokens:
            best = self.search()
            if best is None:
                break
            answer += best.tokens
            self.commit(best)
            if best.terminal:
                break
        return [t for t in answer if t not in self.stop]


def rain_decode(model: GPT, tokenizer: Tokenizer, prompt: str, question: str, params: RainParams,
                max_new_tokens: int = 128, generator: torch.Generator | None = None) -> tuple[str, dict]:
    """RAIN-decode one prompt; returns the answer text and search statistics (with wall time)."""
    start = time.time()
    search = Rain(model, tokenizer, params, question, prompt, max_new_tokens, generator)
    answer = tokenizer.decode(search.decode()).strip()
    stats = dict(search.stats, seconds=time.time() - start, judged=search.memo)
    return answer, stats
