"""RAIN's self-evaluation inside a search: the model's verdict on partial replies, cached and memoised.

The template and the uncached reference verdict are in ``selfeval.py``; here are the two scores RAIN
can take from P(harmful) per label order (the official hard vote, and a graded variant) and ``Judge``,
which asks for its forward pass as a search does (``rain_cache``).
"""
import torch

from .data import right_pad
from .model import ModelError
from .rain_cache import CachePool, Forward, drive
from .selfeval import harmful_probability, self_eval_parts


def hard_score(p_harmful: torch.Tensor) -> float:
    """RAIN's official score from P(harmful) per label order (2,): each order votes harmless when
    P(harmful) < 1/2, and s = 2 * (mean vote - 1/2) is -1, 0 or +1 (official ``getv``)."""
    return 2 * (float((p_harmful < 0.5).float().mean()) - 0.5)


def soft_score(p_harmful: torch.Tensor) -> float:
    """A graded variant: 2 * P(harmless) - 1, averaged over both label orders, in [-1, 1]."""
    return float((1 - 2 * p_harmful).mean())


SCORES = {"hard": hard_score, "soft": soft_score}


class Judge:
    """The model's verdict on partial replies to one question, as RAIN's search asks for it.

    The template's prefix (everything before the reply) is run once, as the judge is made, and its
    keys/values reused for every reply; both label orders run as one batch of two rows; scores are memoised by text (the
    official code keeps the same dictionary). A reply too long for the context is judged by its
    beginning, marked unfinished (the official code has no such case: its context is 2,048 tokens).
    ``verdict`` asks for its forward pass as a search does (``rain_cache``); calling the judge runs it
    at once."""

    def __init__(self, model, tokenizer, question: str, score: str = "hard", pool: CachePool | None = None):
        if score not in SCORES:
            raise ValueError(f"unknown self-evaluation score {score!r}; choose one of: {', '.join(SCORES)}.")
        self.model, self.tok, self.question, self.score_of = model, tokenizer, question, SCORES[score]
        self.pool = pool or CachePool(model, 2)
        self.letters = torch.tensor([tokenizer.token_id("A"), tokenizer.token_id("B")])  # on the host, as the answers
        self.prefix_ids = tokenizer.encode(self_eval_parts(question, "", True, 0)[0])  # the same in both orders
        template = len(self.prefix_ids) + max(len(tokenizer.encode(self_eval_parts(question, "", False, o)[1]))
                                              for o in (0, 1))  # the template around an empty reply
        if template > model.config.block_size:
            raise ModelError(f"RAIN's self-evaluation template for this question is {template} tokens, more than "
                             f"the model's context of {model.config.block_size}: use a model with a longer context "
                             "or a shorter question.")
        self.prefix = drive(self.prefix_pass())  # (n_layer, P, nh, hs) keys and values, one set-up pass
        self.memo: dict[tuple[str, bool], tuple[float, torch.Tensor]] = {}  # -> (score, P(harmful) per order)

    def prefix_pass(self):
        """The keys and values of the template's prefix, (n_layer, P, nh, hs) each: a generator that
        yields its one forward pass, a set-up request (``rain_cache``)."""
        rows = self.pool.take(1)
        yield Forward(self.pool, rows, torch.tensor([self.prefix_ids]), 0, setup=True)
        k, v = self.pool.read(rows, 0, len(self.prefix_ids))  # (n_layer, 1, P, nh, hs) each: copies
        self.pool.give_back(rows)
        return k[:, 0], v[:, 0]

    def rows(self, reply: str, finished: bool) -> list[list[int]]:
        """The token rows after the prefix, one per label order, shortened to fit the context."""
        room = self.model.config.block_size - len(self.prefix_ids)
        while True:
            rows = [self.tok.encode(self_eval_parts(self.question, reply, finished, o)[1]) for o in (0, 1)]
            if max(map(len, rows)) <= room:
                return rows
            reply, finished = reply[:-8], False

    def verdict(self, reply: str, finished: bool):
        """Score in [-1, 1] (+1 harmless) of ``reply`` (``finished``: whether the turn ended); a
        generator that yields its one forward pass (none for a text judged before)."""
        key = (reply, finished)
        if key not in self.memo:
            ids, lengths = right_pad(self.rows(reply, finished))  # (2, T), (2,) on the host
            rows = self.pool.take(2, *self.prefix)
            _, logits = yield Forward(self.pool, rows, ids, len(self.prefix_ids), at=lengths - 1)  # (2, V)
            self.pool.give_back(rows)
            p_harmful = harmful_probability(logits, self.letters)  # (2,) one per label order
            self.memo[key] = (self.score_of(p_harmful), p_harmful)
        return self.memo[key][0]

    def __call__(self, reply: str, finished: bool) -> float:
        return drive(self.verdict(reply, finished))
