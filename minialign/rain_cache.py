"""How a RAIN search talks to the model: it asks for forward passes; someone else runs them.

A search never calls the model itself. Wherever it needs one, it *yields* a ``Forward`` request
(Python generators) and is resumed with the answer: the final hidden states and next-token logits of
the rows it asked about. Who answers decides the schedule, not the result:

- ``drive`` answers one search's requests one at a time, as they come (``rain_decode``);
- ``rain_batch.rain_decode_batch`` advances many searches in lockstep and answers all their pending
  requests with one forward pass of the model.

The keys and values of those rows live in a ``CachePool``: one preallocated ``KVCache`` whose rows are
lent to requests and given back, so the rows of many searches sit in one tensor and a batched forward
needs no copying to gather them (``GPT.hidden(..., rows=...)`` continues just the rows it names).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .model import GPT


@dataclass
class Forward:
    """One forward pass asked for by a search: ``tokens`` (R, T) continue the pool rows ``rows``, each
    of which holds ``start`` positions. The answer is (hidden (R, C), logits (R, V)) at column ``at``
    of each row ((R,); the last column when None)."""
    pool: "CachePool"
    rows: list[int]
    tokens: torch.Tensor
    start: int
    at: torch.Tensor | None = None


class CachePool:
    """KV-cache rows lent to the requests of one or many searches.

    A row is only as wide (in positions) as the longest path asked for so far, rounded up to ``WIDTH_STEP``,
    and widens when a request reaches past it: RAIN's paths are a prompt plus at most ``max_new_tokens``,
    or the judge's template around them, so on GPT-2 (1,024 positions, 75 MB a row in fp32) a row of a
    short-prompt search holds a few hundred positions, not the whole context."""

    WIDTH_STEP = 64

    def __init__(self, model: GPT, rows: int, width: int = WIDTH_STEP):
        self.model = model
        self.cache = model.new_cache(rows, min(width, model.config.block_size))
        self.free = list(range(rows))

    def take(self, n: int, k: torch.Tensor, v: torch.Tensor) -> list[int]:
        """The ``n`` lowest free rows, each holding the keys and values ``k``, ``v`` (n_layer, L, nh, hs);
        the pool doubles when it runs out of rows and widens when the keys are longer than its rows."""
        if len(self.free) < n:
            self.grow(max(n, self.cache.batch_size))
        self.widen(k.size(1) + 1)  # + 1: a one-token pass over a view may write just past a lent row (``forward``)
        self.free.sort()
        rows, self.free = self.free[:n], self.free[n:]
        index = torch.tensor(rows, device=self.cache.lengths.device)
        self.cache.k[:, index, : k.size(1)] = k[:, None].to(self.cache.k.dtype)  # (n_layer, n, L, nh, hs)
        self.cache.v[:, index, : v.size(1)] = v[:, None].to(self.cache.v.dtype)
        self.cache.lengths[index] = k.size(1)
        return rows

    def read(self, rows: list[int], start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the keys and values at positions start .. start + length - 1 of ``rows``:
        (n_layer, len(rows), length, nh, hs) each, which outlive the rows' return to the pool."""
        index = torch.tensor(rows, device=self.cache.lengths.device)
        return self.cache.k[:, index, start: start + length], self.cache.v[:, index, start: start + length]

    def give_back(self, rows: list[int]) -> None:
        """Return rows to the pool; a free row has length 0 (``forward`` relies on it)."""
        self.cache.lengths[torch.tensor(rows, device=self.cache.lengths.device)] = 0
        self.free += rows

    def grow(self, extra: int) -> None:
        """``extra`` more rows; the rows already lent keep their place and contents."""
        n = self.cache.batch_size
        self.reallocate(n + extra, self.cache.max_len)
        self.free += list(range(n, n + extra))

    def widen(self, positions: int) -> None:
        """Make every row hold at least ``positions`` positions, rounded up to ``WIDTH_STEP`` and never past
        the model's context (``GPT.hidden`` refuses a longer sequence itself)."""
        if positions > self.cache.max_len:
            step = self.WIDTH_STEP
            self.reallocate(self.cache.batch_size, min(-(-positions // step) * step, self.model.config.block_size))

    def reallocate(self, rows: int, width: int) -> None:
        """A new cache of ``rows`` x ``width``; the old rows keep their place, contents and lengths."""
        old = self.cache
        self.cache = self.model.new_cache(rows, width)
        n, w = old.batch_size, min(old.max_len, width)
        self.cache.k[:, :n, :w], self.cache.v[:, :n, :w] = old.k[:, :, :w], old.v[:, :, :w]
        self.cache.lengths[:n] = old.lengths

    @torch.no_grad()
    def run(self, requests: list[Forward]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Answer requests with as few forward passes as fit: the one-token requests (decoding steps) in
        one pass; longer ones (the judge's) right-padded together while every padded row still fits in
        the context."""
        answers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for group in self.groups(requests):
            self.widen(max(r.start for r in group) + self.width(group))
            tokens = torch.cat([F.pad(r.tokens, (0, self.width(group) - r.tokens.size(1))) for r in group])  # (R, T)
            rows = [row for r in group for row in r.rows]
            hidden = self.forward(tokens, rows)  # (R, T, C)
            at = torch.cat([torch.full((len(r.rows),), r.tokens.size(1) - 1, device=tokens.device)
                            if r.at is None else r.at for r in group])  # (R,)
            last = hidden[torch.arange(len(rows), device=tokens.device), at]  # (R, C)
            logits = self.model.lm_head(last).float()  # (R, V)
            ends = torch.tensor([r.start + r.tokens.size(1) for r in group for _ in r.rows], device=tokens.device)
            self.cache.lengths[torch.tensor(rows, device=tokens.device)] = ends  # a padded row keeps its real length
            offset = 0
            for r in group:
                answers[id(r)] = (last[offset: offset + len(r.rows)], logits[offset: offset + len(r.rows)])
                offset += len(r.rows)
        return [answers[id(r)] for r in requests]

    def forward(self, tokens: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """Hidden states (R, T, C) of ``tokens`` (R, T) continuing pool rows ``rows``.

        The rows lent at any moment are those of pending requests, and ``take`` lends the lowest free
        ones, so a round's decoding rows nearly fill the range from the lowest to the highest. A one-token
        pass then runs over that whole range as a view of the pool, reading the cache in place (gathering
        scattered rows copies their keys and values in every layer: about twice the time, measured).
        The idle rows in the range compute on padding and keep their lengths: a free row has length 0,
        and a lent one (the judge's, whose pass comes next) gets a key written just past its end that
        its own pass overwrites. Longer passes, and ranges with more idle rows than lent ones, gather."""
        lo, hi = min(rows), max(rows) + 1
        index = torch.tensor(rows, device=tokens.device)
        if tokens.size(1) > 1 or hi - lo > 2 * len(rows):
            return self.model.hidden(tokens, self.cache, rows=index)
        view = self.cache.view(lo, hi)
        lengths = view.lengths.clone()
        padded = tokens.new_zeros(hi - lo, 1)
        padded[index - lo] = tokens
        hidden = self.model.hidden(padded, view)  # (hi - lo, 1, C)
        view.lengths.copy_(lengths)  # run() sets the lent rows' new lengths
        return hidden[index - lo]

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
