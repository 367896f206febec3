"""RAIN's cache pool on a GPU: its forward passes padded to a few fixed shapes and replayed as CUDA graphs.

A search's rules run on the host and its passes are small: most rounds of an evaluation's tail carry a
single search's few rows, and on a GPU such a pass is a few hundred kernel launches from Python for a
few microseconds of arithmetic (``graphs.py`` says why a graph helps). ``GraphPool`` answers the same
requests as ``rain_cache.CachePool``, with the same answers, but runs each pass as the graph captured
for its shape (``RowGraphs``). A CPU computes rather than launches, so there the eager pool is faster:
``pool_for`` picks this one on CUDA only.
"""
import torch

from ..model import GPT, KVCache
from ..rain_cache import CachePool


def pool_for(model: GPT, rows: int, graphs: bool | None = None) -> CachePool:
    """The cache pool for ``model``'s device: replayed graphs on CUDA, eager passes elsewhere
    (``graphs`` forces one or the other; on a CPU the padded fixed-shape pass then runs eagerly)."""
    use = model.lm_head.weight.device.type == "cuda" if graphs is None else graphs
    return GraphPool(model, rows) if use else CachePool(model, rows)


class GraphPool(CachePool):
    """A ``CachePool`` whose passes are padded (rows to a power of two with free rows, tokens to a
    multiple of ``RowGraphs.COLUMN_STEP``) and run through ``RowGraphs``."""

    def __init__(self, model: GPT, rows: int, width: int = CachePool.WIDTH_STEP):
        super().__init__(model, rows, width)
        self.replays: RowGraphs | None = None  # made for the current cache when first needed

    def reallocate(self, rows: int, width: int) -> None:
        super().reallocate(rows, width)
        self.replays = None  # captured graphs hold the old cache

    def columns(self, width: int, start: int) -> int:
        """A few shapes, each captured once: a padded column writes a key past its row's length, which the
        row's next pass overwrites before any query reads it (the exact width where padding would not fit)."""
        columns = RowGraphs.columns_for(width)
        return columns if start + columns <= self.model.config.block_size else width

    def forward(self, tokens: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """Hidden states (R, T, C): a replayed graph padded with free rows, or the eager pass when too few
        rows are free to pad with."""
        if RowGraphs.size_for(len(rows)) - len(rows) > len(self.free):
            return super().forward(tokens, rows)
        self.cache.lengths.copy_(torch.tensor(self.lengths), non_blocking=True)
        if self.replays is None:
            self.replays = RowGraphs(self.model, self.cache, use_graph=self.device.type == "cuda")
        return self.replays.run(tokens, rows, self.free)


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
