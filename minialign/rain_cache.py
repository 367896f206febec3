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

Keys and values stay on the model's device; everything a search decides with (tokens, hidden states,
logits, the rows' lengths) lives on the host. A search's rules are many tiny operations (a sample, a
top-k, a cosine, a comparison read back with ``int``): on a GPU each would be a kernel launch and most
a wait for the device, once per search and round. So ``CachePool.run`` takes its requests' tokens from
the host and returns every answer of a round to the host in one copy, and nothing a search does
between its requests waits for the device (measured on an H100: README, "Many prompts at once").
What remains on the device is the passes themselves, and on a GPU they are replayed CUDA graphs
(``RowGraphs``, at the end of this file).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .model import GPT, KVCache


@dataclass
class Forward:
    """One forward pass asked for by a search: ``tokens`` (R, T) continue the pool rows ``rows``, each
    of which holds ``start`` positions. The answer is (hidden (R, C), logits (R, V)) at column ``at``
    of each row ((R,); the last column when None). Tokens, ``at`` and the answer are on the host."""
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

    def __init__(self, model: GPT, rows: int, width: int = WIDTH_STEP, graphs: bool | None = None):
        self.model = model
        self.device = model.lm_head.weight.device
        self.graphs = self.device.type == "cuda" if graphs is None else graphs  # see ``forward``
        self.replays: RowGraphs | None = None  # made for the current cache when first needed
        self.cache = model.new_cache(rows, min(width, model.config.block_size))
        self.lengths = [0] * rows  # positions each row holds, kept here: the cache's copy is written before a pass
        self.free = list(range(rows))

    def index(self, rows: list[int]) -> torch.Tensor:
        """Row numbers as a tensor on the model's device, copied without waiting for the device."""
        return torch.tensor(rows).to(self.device, non_blocking=True)

    def take(self, n: int, k: torch.Tensor, v: torch.Tensor) -> list[int]:
        """The ``n`` lowest free rows, each holding the keys and values ``k``, ``v`` (n_layer, L, nh, hs);
        the pool doubles when it runs out of rows and widens when the keys are longer than its rows."""
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
        self.replays = None  # captured graphs hold the old cache
        n, w = old.batch_size, min(old.max_len, width)
        self.cache.k[:, :n, :w], self.cache.v[:, :n, :w] = old.k[:, :, :w], old.v[:, :, :w]

    @torch.no_grad()
    def run(self, requests: list[Forward]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Answer requests with as few forward passes as fit: the one-token requests (decoding steps) in
        one pass; longer ones (the judge's) right-padded together while every padded row still fits in
        the context, and with ``graphs`` further to ``RowGraphs.columns_for`` where that fits too. The
        answers of all passes come back to the host in one copy."""
        groups = self.groups(requests)
        outputs = []
        for group in groups:
            width, start = self.width(group), max(r.start for r in group)
            columns = RowGraphs.columns_for(width)
            if self.graphs and start + columns <= self.model.config.block_size:
                # a few shapes, each captured once (``RowGraphs``); a padded column writes a key past
                # its row's length, which the row's next pass overwrites before any query reads it
                width = columns
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
        in_order = [r for group in groups for r in group]
        answers = torch.cat(outputs).cpu().split([len(r.rows) for r in in_order])  # the one wait for the device
        C = self.model.config.n_embd
        by_request = {id(r): (a[:, :C], a[:, C:]) for r, a in zip(in_order, answers)}
        return [by_request[id(r)] for r in requests]

    def forward(self, tokens: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """Hidden states (R, T, C) of ``tokens`` (R, T) continuing pool rows ``rows``.

        The rows lent at any moment are those of pending requests, and ``take`` lends the lowest free
        ones, so a round's decoding rows nearly fill the range from the lowest to the highest. A one-token
        pass then runs over that whole range as a view of the pool, reading the cache in place (gathering
        scattered rows copies their keys and values in every layer: about twice the time, measured).
        The idle rows in the range compute on padding: a free row has length 0, and a lent one (the
        judge's, whose pass comes next) gets a key written just past its end that its own pass
        overwrites. Longer passes, and ranges with more idle rows than lent ones, gather.

        With ``graphs`` (the default on CUDA) a pass is instead a replayed CUDA graph (``RowGraphs``,
        below) padded with free rows: on a GPU this small model's pass is launch overhead, not
        arithmetic. A CPU computes rather than launches, so there the eager pass is faster."""
        self.cache.lengths.copy_(torch.tensor(self.lengths), non_blocking=True)
        if self.graphs and RowGraphs.size_for(len(rows)) - len(rows) <= len(self.free):
            if self.replays is None:
                self.replays = RowGraphs(self.model, self.cache, use_graph=self.device.type == "cuda")
            return self.replays.run(tokens, rows, self.free)
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


class RowGraphs:
    """Forward passes over any chosen rows of a cache, replayed as CUDA graphs: RAIN's rounds.

    The pool's passes run over rows that change every round, and most rounds of an evaluation's tail
    carry a single search's few rows: on a GPU each pass is then a few hundred kernel launches from
    Python for a few microseconds of arithmetic (``graphs.py`` says why a graph helps). Here a pass of
    R rows and T tokens runs as the graph captured for its shape rounded up: the next power of two >= R
    rows, padded with rows the caller names as idle (free rows: what a pass writes there is never
    read), and T tokens as the caller padded them (``columns_for``: one for a decoding step, a multiple
    of ``COLUMN_STEP`` for the judge's templates). One capture per shape, then replays. The captured
    pass reads the row numbers and lengths on the device and attends over the cache's whole width
    (``static_shapes``).

    The graphs belong to one cache: a pool that reallocates its cache makes a new ``RowGraphs``.
    ``use_graph=False`` runs the same padded fixed-shape pass eagerly (how a CPU test checks it).
    """

    COLUMN_STEP = 32

    def __init__(self, model: GPT, cache: KVCache, use_graph: bool = True, warmup_steps: int = 3):
        self.model, self.cache, self.use_graph, self.warmup_steps = model, cache, use_graph, warmup_steps
        self.graphs: dict[tuple[int, int], tuple] = {}  # (rows, tokens) -> (graph, tokens (B, T), rows (B,), hidden (B, T, C))

    @staticmethod
    def size_for(rows: int) -> int:
        """The rows a pass of ``rows`` rows runs with: the next power of two, so a pool of N rows needs at
        most log2(N) + 1 captures per width."""
        return 1 << (rows - 1).bit_length()

    @classmethod
    def columns_for(cls, tokens: int) -> int:
        """The tokens a pass of ``tokens`` new tokens per row is padded to: one stays one (a decoding
        step); longer ones round up to a multiple of ``COLUMN_STEP`` (the judge's templates vary in length
        by the reply; a handful of widths is a handful of captures)."""
        return tokens if tokens == 1 else -(-tokens // cls.COLUMN_STEP) * cls.COLUMN_STEP

    def _forward(self, tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return self.model.hidden(tokens, self.cache, static_shapes=True, rows=rows)  # (B, T, C); lengths += T

    @torch.no_grad()
    def _capture(self, tokens: torch.Tensor, rows: torch.Tensor) -> tuple:
        lengths = self.cache.lengths.clone()  # warm-up passes advance the rows they run: put them back after each
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup_steps):
                self._forward(tokens, rows)
                self.cache.lengths.copy_(lengths)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            hidden = self._forward(tokens, rows)  # recorded, not run
        return graph, tokens, rows, hidden

    @torch.no_grad()
    def run(self, tokens: torch.Tensor, rows: list[int], idle: list[int]) -> torch.Tensor:
        """Hidden states (R, T, C) of ``tokens`` (R, T) (on the cache's device) continuing cache ``rows``;
        ``idle``: rows the pass may pad with, at least ``size_for(R) - R`` of them."""
        size, T = self.size_for(len(rows)), tokens.size(1)
        index = torch.tensor(rows + idle[: size - len(rows)]).to(tokens.device, non_blocking=True)  # (B,)
        padded = torch.cat([tokens, tokens.new_zeros(size - len(rows), T)])  # (B, T)
        if not self.use_graph:
            return self._forward(padded, index)[: len(rows)]
        if (size, T) not in self.graphs:
            self.graphs[size, T] = self._capture(padded, index)
        graph, token_buffer, row_buffer, hidden = self.graphs[size, T]
        token_buffer.copy_(padded)
        row_buffer.copy_(index)
        graph.replay()
        return hidden[: len(rows)]


def drive(search):
    """Run a search generator alone: each request is answered as soon as it is made. Returns what the
    generator returns."""
    try:
        request = next(search)
        while True:
            request = search.send(request.pool.run([request])[0])
    except StopIteration as done:
        return done.value
