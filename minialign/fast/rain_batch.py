"""RAIN at evaluation scale: many prompts searched at once, each exactly as it would be searched alone.

Every prompt gets its own ``Rain`` search: its own tree, judge memo, random generator and stop rule.
This driver changes only *when* their forward passes run. It keeps up to ``batch`` searches in
flight, lets each run to its next request (``rain_cache.Forward``: expansion chains, a rollout, the
judge's two rows), answers all of them with one forward pass over the shared cache rows
(``rain_cache.CachePool.run``; on CUDA ``graph_pool.GraphPool``), and resumes each with its own rows of the result. A search that finishes leaves
the batch and the next prompt takes its place.

Why the answers are the same as alone: a search draws its random tokens between its requests, from its
own generator, and a row of a forward pass depends on that row alone. The one difference is
floating-point: a matrix product over many rows may round differently from one over a few, which can
flip a near-tie (``tests/test_rain_batch.py`` shows both: exact on a scripted model and in float64,
nearly always the same in float32).
"""
import time
from typing import Generator, NamedTuple

import torch
from tqdm import tqdm

from ..model import GPT
from ..rain import Rain, RainParams, search_result
from ..rain_cache import Forward
from ..tokenizer import Tokenizer
from .graph_pool import RowGraphs, pool_for


def prompt_generator(seed: int, index: int) -> torch.Generator:
    """The random generator of the ``index``-th prompt of an evaluation: its own stream, so its search
    draws the same tokens whatever else is searched beside it (and in any order). A CPU generator: the
    searches sample on the host whatever the model's device (``rain_cache``)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


class InFlight(NamedTuple):
    """A search in the batch: its requests come from ``steps`` (its ``answer`` generator)."""
    search: Rain
    steps: Generator
    request: Forward  # the forward pass it waits for
    began: float      # wall time at its start


def rain_decode_batch(model: GPT, tokenizer: Tokenizer, prompts: list[tuple[str, str]], params: RainParams,
                      max_new_tokens: int = 128, seed: int = 0, batch: int = 16, traces: list | None = None,
                      desc: str = "rain") -> list[tuple[str, dict]]:
    """RAIN-decode (prompt, question) pairs, up to ``batch`` searches at a time; prompt i searches with
    ``prompt_generator(seed, i)``. Returns (answer text, search statistics) per prompt, as
    ``rain_decode`` does; ``seconds`` is each search's own span of wall time. With a list ``traces``
    (one ``SearchTrace`` or None per prompt) each search reports to its trace."""
    # an expansion holds K + 1 rows (the chains and the leaf's rollout), and on CUDA a step pads them to
    # the next power of two (``RowGraphs``): even a lone search's pool has that many rows to pad with
    # (a rarer, larger request, a dynamic addition's top tokens, makes the pool grow)
    pool = pool_for(model, max(batch * (params.candidates + 1), RowGraphs.size_for(params.candidates + 1)))
    results: list[tuple[str, dict] | None] = [None] * len(prompts)
    live: dict[int, InFlight] = {}  # prompt index -> its search in flight
    waiting = list(range(len(prompts)))[::-1]

    def advance(i: int, search: Rain, steps, answer, began: float) -> None:
        """Resume search i with the answer to its request; it either asks for the next or finishes."""
        try:
            live[i] = InFlight(search, steps, steps.send(answer), began)
        except StopIteration as done:
            live.pop(i, None)
            results[i] = search_result(search, done.value, time.time() - began)
            bar.update(1)

    with torch.no_grad(), tqdm(total=len(prompts), desc=desc, dynamic_ncols=True) as bar:
        while waiting or live:
            while waiting and len(live) < batch:  # fill the batch with new searches
                i = waiting.pop()
                prompt, question = prompts[i]
                search = Rain(model, tokenizer, params, prompt, question, max_new_tokens,
                              prompt_generator(seed, i), traces[i] if traces else None, pool)
                advance(i, search, search.answer(), None, time.time())
            order = list(live)
            answers = pool.run([live[i].request for i in order])  # every pending request: one forward pass
            for i, answer in zip(order, answers):
                advance(i, live[i].search, live[i].steps, answer, live[i].began)
    return results
