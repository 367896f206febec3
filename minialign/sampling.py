"""Decoding: greedy, temperature, top-k and top-p sampling, batched over prompts with the KV cache.

Prompts of different lengths share one batch: the prompt block is right-padded, prefilled in one
forward pass, and each row's cache length is then set to its own prompt length, so every row continues
from its last real token (padding positions are masked and later overwritten). A row stops at
end-of-text or at the end of the assistant's turn (a token containing a newline). ``prefill`` and the
token loop ``token_loop`` are shared with the CUDA-graph decoder in ``fast/graphs.py``; best-of-N and worst-of-N, which pick
by a reward model, are in ``reward_model.py``.

``generate_uncached`` recomputes the whole sequence for every new token; it is the reference the
cached decoder is tested against and the baseline it is benchmarked against.
"""
import functools

import torch
import torch.nn.functional as F

from .data import right_pad
from .model import GPT, KVCache, ModelError
from .tokenizer import Tokenizer


@functools.cache  # one scan of the vocabulary per tokenizer (50k tokens for gpt2), not one per call
def stop_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """End-of-text plus every token whose text contains a newline (the end of the assistant's turn)."""
    enc = tokenizer.encoding
    ids = {tokenizer.eot}
    for i in range(enc.n_vocab):
        if i != tokenizer.eot and b"\n" in enc.decode_single_token_bytes(i):
            ids.add(i)
    return frozenset(ids)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask logits (B, V) outside the top-k tokens and outside the top-p nucleus with -inf."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def next_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
               generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pick one token per row from logits (B, V): argmax at temperature 0, else a filtered sample.
    Returns the tokens (B,) and the tempered, filtered logits they were sampled from (B, V; None when greedy)."""
    if temperature == 0:
        return logits.argmax(-1), None
    sampled_from = filter_logits(logits.float() / temperature, top_k, top_p)
    return torch.multinomial(F.softmax(sampled_from, dim=-1), 1, generator=generator).squeeze(-1), sampled_from


def _check_room(model: GPT, prompt_len: int, max_new_tokens: int) -> int:
    room = model.config.block_size - prompt_len
    if room <= 0:
        raise ModelError(f"the prompt is {prompt_len} tokens, but the model's context holds only "
                         f"{model.config.block_size}; shorten the prompt.")
    return min(max_new_tokens, room)


def prefill(model: GPT, prompts: list[list[int]], cache: KVCache) -> torch.Tensor:
    """Run the right-padded prompt block through ``cache`` (empty) in one forward; next-token logits (B, V).

    Each row's cache length is then cut back to its own prompt length, so it continues after its last
    real token (the padding positions are masked and later overwritten)."""
    device = model.lm_head.weight.device
    block, lengths = right_pad(prompts, device=device)  # (B, Tp), (B,)
    hidden = model.hidden(block, cache)  # (B, Tp, C)
    cache.truncate(lengths)
    return model.lm_head(hidden[torch.arange(len(prompts), device=device), lengths - 1])  # (B, V): the head only where needed


def token_loop(step, logits: torch.Tensor, max_new_tokens: int, stop: set[int], temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
           keep_stop: bool = False, check_every: int = 1, compact: bool = False, logprobs: bool = False):
    """The token loop shared by every decoder: pick a token per row from ``logits`` (B, V), feed it to
    ``step`` (tokens (B,) -> next logits (B, V)), until every row has stopped or ``max_new_tokens``.

    With ``compact``, rows that have stopped are left out of the forward pass: ``step`` takes the
    tokens of the unfinished rows and their indices, (B',) and (B',), and returns their logits (B', V).
    A stopped row keeps its last logits, so a token is still drawn for every row and a seeded sampler
    consumes its random stream exactly as without compaction (the extra tokens are discarded).
    Tokens stay on the device; whether all rows are done is read back every ``check_every`` steps (a
    host sync stalls a CUDA-graph decoder, so it checks rarely and decodes a few discarded tokens).
    Returns each row's new tokens up to its first stop token (included only with ``keep_stop``); with
    ``logprobs`` also the log-probability each of them was drawn with (a float tensor per row): the
    sampling policy's own log pi(y_t | ...), which PPO needs as pi_old and a KL estimate as log pi
    (sampling only: greedy decoding draws from no distribution).
    """
    if logprobs and temperature == 0:
        raise ValueError("token_loop: logprobs needs a sampled decoding (temperature > 0).")
    stop_tensor = torch.tensor(sorted(stop), dtype=torch.long, device=logits.device)
    done = torch.zeros(logits.size(0), dtype=torch.bool, device=logits.device)
    tokens, drawn_with = [], []
    for i in range(max_new_tokens):
        token, sampled_from = next_token(logits, temperature, top_k, top_p, generator)  # (B,), (B, V)
        tokens.append(token)
        if logprobs:  # log of the probability each token was drawn with (temperature and filters applied)
            drawn_with.append(F.log_softmax(sampled_from, dim=-1).gather(1, token[:, None]).squeeze(1))  # (B,)
        done |= torch.isin(token, stop_tensor)
        if i + 1 == max_new_tokens or ((i + 1) % check_every == 0 and done.all()):
            break
        if compact:
            active = (~done).nonzero().squeeze(1)  # (B',) rows still decoding
            logits = logits.clone()
            logits[active] = step(token[active], active)
        else:
            logits = step(token)
    rows = torch.stack(tokens, 1).tolist() if tokens else [[] for _ in range(logits.size(0))]
    out = []
    for row in rows:
        end = next((i for i, t in enumerate(row) if t in stop), None)
        out.append(row if end is None else row[: end + keep_stop])
    if not logprobs:
        return out
    drawn = torch.stack(drawn_with, 1) if tokens else torch.zeros(len(out), 0)  # (B, steps)
    return out, [drawn[b, : len(row)] for b, row in enumerate(out)]


SHRINK = 0.75  # generate copies its cache down to the unfinished rows once they are this share of it


@torch.no_grad()
def generate(model: GPT, prompts: list[list[int]], max_new_tokens: int, stop: set[int],
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             generator: torch.Generator | None = None, keep_stop: bool = False, logprobs: bool = False):
    """Continue each prompt (a list of token ids) until a stop token or ``max_new_tokens``.

    Returns the new tokens of each row; the stop token is included only with ``keep_stop`` (RL needs
    the probability of stopping); with ``logprobs`` also each token's sampling log-probability (``token_loop``).
    ``temperature=0`` is greedy.

    Rows that stop stay in the batch, fed a dummy token whose logits are dropped, until the unfinished
    rows are ``SHRINK`` of it; then the cache is copied down to them once. Gathering the unfinished
    rows' cache at every step instead would copy every layer's keys and values at every step, which
    costs more than the finished rows' wasted arithmetic.
    """
    longest = max(len(p) for p in prompts)
    max_new_tokens = _check_room(model, longest, max_new_tokens)
    cache = model.new_cache(len(prompts), longest + max_new_tokens)
    logits = prefill(model, prompts, cache)
    held = torch.arange(len(prompts), device=logits.device)  # (H,) the prompt row in each cache row, ascending

    def step(token: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:  # (B',), (B',) -> (B', V)
        nonlocal cache, held
        where = torch.searchsorted(held, rows)  # (B',) cache row of each unfinished row
        if len(rows) <= SHRINK * len(held):  # enough rows stopped: one copy into a cache of the others
            cache, held, where = cache.select(where), rows, torch.arange(len(rows), device=rows.device)
        fed = torch.zeros(len(held), dtype=token.dtype, device=token.device)  # (H,) stopped rows still held:
        fed[where] = token                                                    # a dummy token, logits dropped
        return model.lm_head(model.hidden(fed[:, None], cache)[where, -1])
    return token_loop(step, logits, max_new_tokens, stop, temperature, top_k, top_p, generator, keep_stop, compact=True,
                  logprobs=logprobs)


@torch.no_grad()
def generate_uncached(model: GPT, prompts: list[list[int]], max_new_tokens: int, stop: set[int]) -> list[list[int]]:
    """Greedy decoding that recomputes the full sequence for every token (the reference): prompts of
    one length, each row until its stop token (excluded) or ``max_new_tokens``."""
    if len({len(p) for p in prompts}) != 1:
        raise ModelError("the uncached reference decodes prompts of one length; call it once per length.")
    device = model.lm_head.weight.device
    max_new_tokens = _check_room(model, len(prompts[0]), max_new_tokens)
    seq = torch.tensor(prompts, device=device)  # (B, T)
    out, done = [[] for _ in prompts], [False] * len(prompts)
    for _ in range(max_new_tokens):
        tokens = model(seq)[:, -1].argmax(-1)  # (B,) from the whole sequence, every time
        for b, token in enumerate(tokens.tolist()):
            done[b] = done[b] or token in stop
            if not done[b]:
                out[b].append(token)
        if all(done):
            break
        seq = torch.cat([seq, tokens[:, None]], dim=1)
    return out


def response_text(tokenizer: Tokenizer, tokens: list[int], stop: set[int]) -> str:
    """The one text every stage scores and shows for a response's tokens (calibration, CTRL's rewards,
    the support of the exact optimum, the evaluation): without a final stop token (end of text, or the
    end of the turn), decoded, stripped of the whitespace around it."""
    if tokens and tokens[-1] in stop:
        tokens = tokens[:-1]
    return tokenizer.decode(tokens).strip()


def complete(model: GPT, tokenizer: Tokenizer, prompts: list[str], max_new_tokens: int = 128,
             batch_size: int = 64, **sampling) -> list[str]:
    """Text in, text out: batched ``generate`` over many prompts (responses lose their leading space)."""
    stop = stop_ids(tokenizer)
    texts = []
    for i in range(0, len(prompts), batch_size):
        ids = [tokenizer.encode(p) for p in prompts[i: i + batch_size]]
        for new in generate(model, ids, max_new_tokens, stop, **sampling):
            texts.append(response_text(tokenizer, new, stop))
    return texts
