"""How a RAIN search talks to the model: it asks for forward passes; someone else runs them.

A search never calls the model itself. Wherever it needs a forward pass, it *yields* a ``Forward``
request and is resumed with the answer: the final hidden states and next-token logits of the rows it
asked about (``rain.py``'s docstring says how to read the ``yield from`` calls). Who answers decides
the schedule, not the result:

- ``drive`` (end of this file) answers one search's requests one at a time, as they come;
- ``fast.rain_batch.rain_decode_batch`` advances many searches in lockstep and answers all their
  pending requests with one forward pass of the model.

Two requests set a search up: the prompt's and the judge's template prefix's. They are ``setup``
requests, answered at once by ``drive`` as the search is made, each in a pass of its own, so what a
search starts from never depends on what else is searched beside it.

The keys and values of those rows live in a ``CachePool``: one preallocated ``KVCache`` whose rows are
lent to requests and given back, so the rows of many searches sit in one tensor and a batched forward
needs no copying to gather them (``GPT.hidden(..., rows=...)`` continues just the rows it names).

Keys and values stay on the model's device; everything a search decides with (tokens, hidden states,
logits, the rows' lengths) lives on the host. A search's rules are many tiny operations (a sample, a
top-k, a cosine, a comparison read back with ``int``): on a GPU each would be a kernel launch and most
a wait for the device. So ``CachePool.run`` takes its requests' tokens from the host and returns every
answer of a round to the host in one copy, and nothing a search does between its requests waits for
the device. On a GPU the passes themselves can also be replayed as CUDA graphs: ``fast.graph_pool``
subclasses this pool for that; the search never knows which pool it has.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .model import GPT


@dataclass
class Forward:
    """One forward pass asked for by a search: ``tokens`` (R, T) continue the pool rows ``rows``, each
    of which holds ``start`` positions. The answer is (hidden (R, C), logits (R, V)) at column ``at``
    of each row ((R,); the last column when None). Tokens, ``at`` and the answer are on the host.
    ``setup``: a search's set-up pass, run alone and answered with the hidden states of every column
    (R, T, C) and the last column's logits (R, V)."""
    pool: "CachePool"
    rows: list[int]
    tokens: torch.Tensor
    start: int
    at: torch.Tensor | None = None
    setup: bool = False


class CachePool:
    """KV-cache rows lent to the requests of one or many searches.

    A row is only as wide (in positions) as the longest path asked for so far, rounded up to ``WIDTH_STEP``,
    and widens when a request reaches past it: RAIN's paths are a prompt plus at most ``max_new_tokens``,
    or the judge's template around them, so on GPT-2 (1,024 positions, 75 MB a row in fp32) a row of a
    short-prompt search holds a few hundred positions, not the whole context."""

    WIDTH_STEP = 64

    def __init__(self, model: GPT, rows: int, width: int = WIDTH_STEP):
        self.model = model
        self.device = model.lm_head.weight.device
        self.cache = model.new_cache(rows, min(width, model.config.block_size))
        self.lengths = [0] * rows  # positions each row holds, kept here: the cache's copy is written before a pass
        self.free = list(range(rows))

    def index(self, rows: list[int]) -> torch.Tensor:
        """Row numbers as a tensor on the model's device, copied without waiting for the device."""
        return torch.tensor(rows).to(self.device, non_blocking=True)

    def take(self, n: int, k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> list[int]:
        """The ``n`` lowest free rows, each holding the keys and values ``k``, ``v`` (n_layer, L, nh, hs)
        (empty rows when None); the pool doubles when it runs out of rows and widens when the keys are
        longer than its rows."""
        if k is None:
            c = self.model.config
            k = v = torch.zeros(c.n_layer, 0, c.n_head, c.n_embd // c.n_head)  # (n_layer, 0, nh, hs)
        if len(self.free) < n:
            self.grow(max(n, self.cache.batch_size))
        self.widen(k.size(1) + 1)  # + 1: a one-token pass over a view may write just past a lent row (``forward``)
        self.free.sort()
        rows, self.free = self.free[:n], self.free[n:]
        index = self.index(rows)
        self.cache.k[:, index, : k.size(1)] = k[:, None].to(self.cache.k.dtype)  # (n_layer, n, L, nh, hs)
        self.cache.v[:, index, : v.size(1)] = v[:, None].to(self.cache.v.dtype)
        for row in rows:
            self.lengths[row] = k.size(1)
        return rows

    def read(self, rows: list[int], start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the keys and values at positions start .. start + length - 1 of ``rows``:
        (n_layer, len(rows), length, nh, hs) each, which outlive the rows' return to the pool."""
        index = self.index(rows)
        return self.cache.k[:, index, start: start + length], self.cache.v[:, index, start: start + length]

    def give_back(self, rows: list[int]) -> None:
        """Return rows to the pool; a free row has length 0 (``forward`` relies on it)."""
        for row in rows:
            self.lengths[row] = 0
        self.free += rows

    def grow(self, extra: int) -> None:
        """``extra`` more rows; the rows already lent keep their place and contents."""
        n = self.cache.batch_size
        self.reallocate(n + extra, self.cache.max_len)
        self.lengths += [0] * extra
        self.free += list(range(n, n + extra))

    def widen(self, positions: int) -> None:
        """Make every row hold at least ``positions`` positions, rounded up to ``WIDTH_STEP`` and never past
        the model's context (``GPT.hidden`` refuses a longer sequence itself)."""
        if positions > self.cache.max_len:
            step = self.WIDTH_STEP
            self.reallocate(self.cache.batch_size, min(-(-positions // step) * step, self.model.config.block_size))

    def reallocate(self, rows: int, width: int) -> None:
        """A new cache of ``rows`` x ``width``; the old rows keep their place and contents."""
        old = self.cache
        self.cache = self.model.new_cache(rows, width)
        n, w = old.batch_size, min(old.max_len, width)
        self.cache.k[:, :n, :w], self.cache.v[:, :n, :w] = old.k[:, :, :w], old.v[:, :, :w]

    @torch.no_grad()
    def run(self, requests: list[Forward]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Answer requests with as few forward passes as fit: the one-token requests (decoding steps) in
        one pass; longer ones (the judge's) right-padded together while every padded row still fits in
        the context. The answers of all passes come back to the host in one copy; a ``setup`` request
        runs alone (``run_alone``)."""
        answers = {id(r): self.run_alone(r) for r in requests if r.setup}
        groups = self.groups([r for r in requests if not r.setup])
        outputs = []
        for group in groups:
            start = max(r.start for r in group)
            width = self.columns(self.width(group), start)
            self.widen(start + width)
            tokens = torch.cat([F.pad(r.tokens, (0, width - r.tokens.size(1))) for r in group])  # (R, T)
            rows = [row for r in group for row in r.rows]
            hidden = self.forward(tokens.to(self.device, non_blocking=True), rows)  # (R, T, C)
            if width == 1:  # decoding steps: the one column
                last = hidden[:, 0]  # (R, C)
            else:
                at = torch.cat([torch.full((len(r.rows),), r.tokens.size(1) - 1) if r.at is None else r.at for r in group])
                last = hidden[torch.arange(len(rows), device=self.device), at.to(self.device, non_blocking=True)]  # (R, C)
            logits = self.model.lm_head(last)  # (R, V)
            dtype = torch.promote_types(last.dtype, torch.float32)  # bf16 answers come back as float32
            outputs.append(torch.cat([last.to(dtype), logits.to(dtype)], 1))  # (R, C + V)
            for r in group:  # a padded row keeps its real length
                for row in r.rows:
                    self.lengths[row] = r.start + r.tokens.size(1)
        if outputs:
            in_order = [r for group in groups for r in group]
            C = self.model.config.n_embd
            rows = torch.cat(outputs).cpu().split([len(r.rows) for r in in_order])  # the one wait for the device
            answers.update({id(r): (a[:, :C], a[:, C:]) for r, a in zip(in_order, rows)})
        return [answers[id(r)] for r in requests]

    def run_alone(self, request: Forward) -> tuple[torch.Tensor, torch.Tensor]:
        """A set-up pass: eager, at its own width, in a pass of its own. Returns hidden states (R, T, C)
        and the last column's logits (R, V) on the host."""
        T = request.tokens.size(1)
        self.widen(request.start + T)
        self.cache.lengths.copy_(torch.tensor(self.lengths), non_blocking=True)
        hidden = self.model.hidden(request.tokens.to(self.device), self.cache, rows=self.index(request.rows))  # (R, T, C)
        for row in request.rows:
            self.lengths[row] = request.start + T
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        return hidden.to(dtype).cpu(), self.model.lm_head(hidden[:, -1]).to(dtype).cpu()

    def columns(self, width: int, start: int) -> int:
        """The tokens per row a pass of ``width`` new tokens after ``start`` positions runs with: exactly
        ``width`` here (``fast.graph_pool`` pads them to a few fixed shapes)."""
        return width

    def forward(self, tokens: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """Hidden states (R, T, C) of ``tokens`` (R, T) continuing pool rows ``rows``.

        The rows lent at any moment are those of pending requests, and ``take`` lends the lowest free
        ones, so a round's decoding rows nearly fill the range from the lowest to the highest. A one-token
        pass then runs over that whole range as a view of the pool, reading the cache in place (gathering
        scattered rows would copy their keys and values in every layer).
        The idle rows in the range compute on padding: a free row has length 0, and a lent one (the
        judge's, whose pass comes next) gets a key written just past its end that its own pass
        overwrites. Longer passes, and ranges with more idle rows than lent ones, gather."""
        self.cache.lengths.copy_(torch.tensor(self.lengths), non_blocking=True)
        lo, hi = min(rows), max(rows) + 1
        index = self.index(rows)
        if tokens.size(1) > 1 or hi - lo > 2 * len(rows):
            return self.model.hidden(tokens, self.cache, rows=index)
        padded = tokens.new_zeros(hi - lo, 1)
        padded[index - lo] = tokens
        return self.model.hidden(padded, self.cache.view(lo, hi))[index - lo]  # (R, 1, C)

    @staticmethod
    def width(group: list[Forward]) -> int:
        return max(r.tokens.size(1) for r in group)

    def groups(self, requests: list[Forward]) -> list[list[Forward]]:
        """One-token requests together; longer ones, longest first, packed while the latest start plus
        the widest request fits in the model's context."""
        steps = [r for r in requests if r.tokens.size(1) == 1]
        padded: list[list[Forward]] = []
        for r in sorted((r for r in requests if r.tokens.size(1) > 1), key=lambda r: -r.tokens.size(1)):
            if padded and max(x.start for x in padded[-1] + [r]) + self.width(padded[-1]) <= self.model.config.block_size:
                padded[-1].append(r)
            else:
                padded.append([r])
        return ([steps] if steps else []) + padded


def drive(search):
    """Run a search generator alone: each request is answered as soon as it is made. Returns what the
    generator returns."""
    try:
        request = next(search)
        while True:
            request = search.send(request.pool.run([request])[0])
    except StopIteration as done:
        return done.value
