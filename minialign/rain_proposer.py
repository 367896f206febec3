"""The model side of RAIN: candidate token sets for a node, rollouts, and the caches that make them cheap.

The search (``rain.py``) asks three things of the model, and this file answers them:

- ``top_tokens``: the K likeliest next tokens after a node (1-token sets; official ``group_getp``
  with ``maxnew == 1``);
- ``chains``: one greedy chain and sampled chains of L tokens from the top-15 distribution, with
  their probabilities (longer sets; official ``group_getp``), optionally decoding the leaf's rollout in
  the same batch;
- ``rollout``: sample on from a node to the end of its clause (official ``getv``), for scoring only.

Every node keeps the keys/values, final hidden states and next-token logits of its own tokens
(``NodeState``), so a path's prefix is never recomputed: pool rows (``rain_cache.CachePool``) are
loaded with the path's keys/values and the new tokens continue them. The official code recomputes
every prefix and decodes each chain alone.

Each method is a generator: every forward pass is a ``rain_cache.Forward`` it yields, and its result
is what it returns (run one alone with ``rain_cache.drive``). Random draws happen here, between the
requests, from the search's own generator, so a batched search draws exactly what a lone one draws.
They happen on the host, as does all else here but the keys and values (``rain_cache`` says why), so
the generator is a CPU one whatever the model's device.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .model import GPT
from .rain_cache import CachePool, Forward
from .rain_tree import Node, clamp_greedy_prior
from .sampling import filter_logits, stop_ids
from .tokenizer import Tokenizer

CLAUSE_END = (",", ".", "?", ":", ";", "\n")  # where a rollout stops (official getv)


@dataclass
class NodeState:
    """What the model computed for a node's tokens: keys and values on the model's device, the rest on
    the host."""
    k: torch.Tensor            # (n_layer, L, nh, hs) keys of the node's L tokens
    v: torch.Tensor            # (n_layer, L, nh, hs) values
    hidden: torch.Tensor       # (L, C) final hidden states: the similarity update's embeddings
    next_logits: torch.Tensor | None  # (V,) next-token logits after the last token; None if terminal


@dataclass
class Rollout:
    tokens: list[int]      # sampled after the leaf, up to and including the clause end
    hidden: torch.Tensor   # (n, C) hidden states of those tokens, a clause-ending last one excluded


class Proposer:
    def __init__(self, model: GPT, tokenizer: Tokenizer, sample_top_k: int, rollout_top_k: int,
                 rollout_tokens: int, generator: torch.Generator | None = None, pool: CachePool | None = None,
                 temperature: float = 1.0, more_attempts: bool = False, token_order: bool = False,
                 full_chain_prior: bool = False):
        if generator is not None and generator.device.type != "cpu":
            raise ValueError(f"RAIN samples on the host: give it a CPU torch.Generator, not one on {generator.device}.")
        self.model, self.tok, self.generator = model, tokenizer, generator
        self.pool = pool or CachePool(model, 16)
        self.sample_top_k, self.rollout_top_k, self.rollout_tokens = sample_top_k, rollout_top_k, rollout_tokens
        self.temperature = temperature  # of the candidates (priors and chains); rollouts sample at 1 (official getv)
        self.more_attempts = more_attempts  # 2K - 1 sampled chains for K - 1 distinct ones (official adv group_getp)
        self.token_order = token_order  # 1-token candidates by token id, as official group_getp lists them
        self.full_chain_prior = full_chain_prior  # a cut chain's prior over all L drawn tokens, as official chains run
        self.stop = stop_ids(tokenizer)

    def scaled(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits at the candidates' temperature (official ``getp(..., temperature)``)."""
        return logits if self.temperature == 1.0 else logits / self.temperature

    def ends_clause(self, token: int) -> bool:
        """A stop token, or a token whose text ends in clause punctuation."""
        return token in self.stop or self.tok.decode([token]).endswith(CLAUSE_END)

    def context(self, ids: list[int]):
        """The prompt as the tree's top node (its tokens are the prompt; it is never committed): a
        generator that yields the prompt's one forward pass, a set-up request."""
        rows = self.pool.take(1)
        hidden, logits = yield Forward(self.pool, rows, torch.tensor([ids]), 0, setup=True)  # (1, T, C), (1, V)
        k, v = self.pool.read(rows, 0, len(ids))  # (n_layer, 1, T, nh, hs) each: copies
        self.pool.give_back(rows)
        return Node(ids, 1.0, state=NodeState(k[:, 0], v[:, 0], hidden[0], logits[0]))

    def rows_for(self, path: list[Node], n: int) -> tuple[list[int], int]:
        """``n`` pool rows, each holding the keys/values of the path's tokens, and that length."""
        k = torch.cat([node.state.k for node in path], dim=1)  # (n_layer, T, nh, hs)
        v = torch.cat([node.state.v for node in path], dim=1)
        return self.pool.take(n, k, v), k.size(1)

    def sample(self, logits: torch.Tensor, top_k: int) -> torch.Tensor:
        """One token per row of logits (B, V), at temperature 1 from the top-k (0: all) distribution."""
        return self.draw(filter_logits(logits, top_k))

    def draw(self, filtered: torch.Tensor) -> torch.Tensor:
        """One token per row of logits (B, V) already masked by ``filter_logits``, at temperature 1."""
        return torch.multinomial(F.softmax(filtered, -1), 1, generator=self.generator).squeeze(-1)  # (B,)

    def step(self, rows: list[int], tokens: torch.Tensor, start: int):
        """Feed one token per row (R,) to pool rows holding ``start`` positions: returns hidden states
        (R, C) and next-token logits (R, V)."""
        return (yield Forward(self.pool, rows, tokens[:, None], start))

    @torch.no_grad()
    def top_tokens(self, path: list[Node], k: int):
        """Children of ``path[-1]`` for its k likeliest next tokens; raw prior = the token's probability.
        They come in probability order, or with ``token_order`` in token-id order (official ``group_getp``
        lists ``np.where(p > 0)``): the order breaks PUCT's ties, which decide every step at c = 0."""
        leaf = path[-1]
        probs = F.softmax(self.scaled(leaf.state.next_logits), -1)  # (V,)
        top = torch.topk(probs, k)
        tokens = top.indices.sort().values if self.token_order else top.indices  # (k,)
        rows, start = self.rows_for(path, k)
        h, logits = yield from self.step(rows, tokens, start)  # (k, C), (k, V)
        k_new, v_new = self.pool.read(rows, start, 1)  # (n_layer, k, 1, nh, hs)
        self.pool.give_back(rows)
        return [Node([int(t)], float(probs[t]), leaf, int(t) in self.stop,
                     NodeState(k_new[:, i], v_new[:, i], h[i: i + 1], None if int(t) in self.stop else logits[i]))
                for i, t in enumerate(tokens)]

    @torch.no_grad()
    def chains(self, path: list[Node], k: int, length: int, with_rollout: bool = False):
        """Children of ``path[-1]``: row 0 the greedy chain, then sampled chains (top-``sample_top_k``, at the
        candidates' temperature), ``length`` tokens each, decoded as one batch; identical chains are kept
        once. K - 1 chains are sampled, or with ``more_attempts`` 2K - 1 of which the first K - 1 distinct
        are kept (the official adversarial run draws them one by one and stops there: the same children).
        Returns (children, the rollout or None).

        A chain is cut after its first stop token (the turn ends there; official chains always run
        ``maxnew`` tokens). Raw prior = product of the per-token probabilities under the truncated
        distribution of the tokens kept, or with ``full_chain_prior`` of all ``length`` drawn (what an
        official chain, which runs on past the stop, carries), the greedy chain's clamped as in the
        official code. With ``with_rollout`` the leaf's rollout is one more row of the same batch (it
        starts at the same place and depends on no chain), then goes on alone: fewer forward passes, the
        same result."""
        leaf = path[-1]
        want, k = k, (2 * k if self.more_attempts else k)  # K children from the greedy and K - 1 (or 2K - 1) samples
        rows, start = self.rows_for(path, k + with_rollout)
        logits = leaf.state.next_logits.expand(len(rows), -1)  # (R, V)
        tokens, hiddens, logps = [], [], []
        for i in range(length):  # one batched forward per token for all chains
            filtered = filter_logits(self.scaled(logits[:k]), self.sample_top_k)  # (k, V): each chain's distribution
            t = self.draw(filtered)  # (k,)
            t[0] = logits[0].argmax()  # row 0 is the greedy chain
            logps.append(F.log_softmax(filtered, -1).gather(-1, t[:, None]))
            if with_rollout:
                t = torch.cat([t, self.sample(logits[k:], self.rollout_top_k)])
            tokens.append(t)
            h, logits = yield from self.step(rows, t, start + i)
            hiddens.append(h)
        tokens, hidden = torch.stack(tokens, 1), torch.stack(hiddens, 1)  # (R, L), (R, L, C)
        chain_logp = torch.cat(logps, 1)  # (k, L)
        k_new, v_new = self.pool.read(rows[:k], start, length)  # (n_layer, k, L, nh, hs)
        self.pool.give_back(rows[:k])
        rollout = None
        if with_rollout:
            rollout = yield from self._finish_rollout(tokens[k].tolist(), hidden[k], rows[k:], start + length, logits[k:])
        chain_tokens = tokens[:k].tolist()  # (k, L)
        children, seen = [], set()
        for b, row in enumerate(chain_tokens):
            cut = next((i + 1 for i, t in enumerate(row) if t in self.stop), length)
            if tuple(row[:cut]) in seen or len(children) == want:
                continue
            seen.add(tuple(row[:cut]))
            terminal = row[cut - 1] in self.stop
            state = NodeState(k_new[:, b, :cut], v_new[:, b, :cut], hidden[b, :cut], None if terminal else logits[b])
            prior = chain_logp[b, : length if self.full_chain_prior else cut].sum().exp()
            children.append(Node(row[:cut], float(prior), leaf, terminal, state))
        if len(children) > 1:
            children[0].raw_prior = clamp_greedy_prior(children[0].raw_prior, [c.raw_prior for c in children[1:]])
        return children, rollout

    def _finish_rollout(self, tokens: list[int], hidden: torch.Tensor, row: list[int], start: int,
                        logits: torch.Tensor):
        """Cut a batched rollout row at its first clause end, or sample it on alone until one."""
        for i, t in enumerate(tokens):
            if self.ends_clause(t):
                self.pool.give_back(row)
                return Rollout(tokens[: i + 1], hidden[:i])
        return (yield from self._roll_on(tokens, list(hidden), row, start, logits))

    def _roll_on(self, tokens: list[int], hiddens: list[torch.Tensor], row: list[int], start: int,
                 logits: torch.Tensor):
        """Sample the pool row ``row`` (holding ``start`` positions; next-token logits (1, V)) on until a
        token ends the clause or the rollout reaches ``rollout_tokens``; the row goes back to the pool."""
        while len(tokens) < self.rollout_tokens:
            t = self.sample(logits, self.rollout_top_k)  # (1,)
            tokens.append(int(t))
            if self.ends_clause(int(t)):
                break
            h, logits = yield from self.step(row, t, start)
            start += 1
            hiddens.append(h[0])
        self.pool.give_back(row)
        C = self.model.config.n_embd
        return Rollout(tokens, torch.stack(hiddens) if hiddens else torch.zeros(0, C))

    @torch.no_grad()
    def rollout(self, path: list[Node]):
        """Sample on from ``path[-1]`` to the end of the clause (scoring only: not added to the tree)."""
        row, start = self.rows_for(path, 1)
        return (yield from self._roll_on([], [], row, start, path[-1].state.next_logits[None]))
