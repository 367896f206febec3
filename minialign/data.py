"""Data: packing documents into a token stream, random training windows, and the JSONL loaders.

- Language-model data is a stream of documents joined by end-of-text tokens, with a loss weight per
  target token; a batch is random windows of ``block_size + 1`` tokens (as in nanoGPT).
- Preference pairs use the Anthropic HH format: one JSON object per line,
  ``{"chosen": transcript, "rejected": transcript}``; the shared prompt is everything up to and
  including the last ``Assistant:``, and the response is what follows.
- A malformed line is a ``DataError`` naming the file and the line.
"""
import gzip
import json
import os

import torch

from .tokenizer import Tokenizer

ANSWER_CUE = "The answer is: ("  # self-evaluation documents: the letter after this cue is up-weighted


class DataError(ValueError):
    """Input data that cannot be used, with the file and line at fault."""


def pack(docs: list[str], tokenizer: Tokenizer, answer_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Documents -> (tokens (N,), weights (N,)): each document followed by end-of-text.

    ``weights[i]`` is the loss weight for predicting ``tokens[i]``; the token right after
    ``ANSWER_CUE`` gets ``answer_weight`` (the self-evaluation verdict is one token among hundreds).
    """
    tokens, weights = [], []
    cue = tokenizer.encode(ANSWER_CUE)
    for doc in docs:
        ids = tokenizer.encode(doc) + [tokenizer.eot]
        w = [1.0] * len(ids)
        for i in range(len(cue), len(ids)):
            if ids[i - len(cue):i] == cue:
                w[i] = answer_weight
        tokens += ids
        weights += w
    return torch.tensor(tokens, dtype=torch.long), torch.tensor(weights)


def random_windows(tokens: torch.Tensor, weights: torch.Tensor, batch_size: int, block_size: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of random windows: inputs x (B, T), targets y (B, T), target weights w (B, T).

    A corpus shorter than one window gives windows as long as it allows."""
    block_size = min(block_size, len(tokens) - 2)
    if block_size < 1:
        raise DataError(f"the corpus has only {len(tokens)} tokens; give it at least one real document.")
    starts = torch.randint(len(tokens) - block_size - 1, (batch_size,), generator=generator)
    offsets = starts[:, None] + torch.arange(block_size + 1)  # (B, T+1)
    chunk, wchunk = tokens[offsets], weights[offsets]
    return chunk[:, :-1], chunk[:, 1:], wchunk[:, 1:]


def read_lines(path: str) -> list[str]:
    """The lines of a UTF-8 text file, gzip-compressed if its name ends in .gz; a missing file, a folder
    or bytes that are not UTF-8 are a DataError naming the file (and the line)."""
    if os.path.isdir(path):
        raise DataError(f"{path} is a folder; give a .jsonl or .txt file (optionally .gz).")
    if not os.path.exists(path):
        raise DataError(f"{path} does not exist.")
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:  # a .gz that is not gzip, or is cut short
        raise DataError(f"{path} cannot be read ({err}); check that it is a complete file.") from None
    try:
        return raw.decode("utf-8").split("\n")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1  # the line that holds the first bad byte
        raise DataError(f"{path}, line {line}: not UTF-8 text; re-encode the file as UTF-8.") from None


def _jsonl_rows(path: str):
    """(line number, object) for each non-empty line; a broken line names the file and line."""
    for number, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {number}: not valid JSON ({err.msg}).") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {number}: expected a JSON object.")
        yield number, row


def split_transcript(transcript: str) -> tuple[str, str]:
    """Split an HH transcript at its last ``Assistant:`` into (prompt ending in "Assistant:", response)."""
    cut = transcript.rfind("Assistant:")
    if cut < 0:
        raise ValueError("no 'Assistant:' turn")
    cut += len("Assistant:")
    return transcript[:cut], transcript[cut:]


def load_pairs(path: str) -> list[tuple[str, str, str]]:
    """HH-format preference pairs -> [(prompt, chosen response, rejected response)]."""
    pairs = []
    for number, row in _jsonl_rows(path):
        try:
            prompt, chosen = split_transcript(row["chosen"])
            prompt_r, rejected = split_transcript(row["rejected"])
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise DataError(f"{path}, line {number}: expected \"chosen\" and \"rejected\" transcripts with an "
                            f"'Assistant:' turn ({err}).") from None
        if prompt != prompt_r:
            raise DataError(f"{path}, line {number}: chosen and rejected do not share the same prompt.")
        pairs.append((prompt, chosen, rejected))
    if not pairs:
        raise DataError(f"{path} holds no preference pairs.")
    return pairs


def load_documents(path: str) -> list[str]:
    """A training corpus: a .jsonl file with a "text" field per line (or HH-format pairs, whose chosen
    transcripts become the documents), or plain text split at blank lines."""
    if path.removesuffix(".gz").endswith(".jsonl"):
        docs = []
        for number, row in _jsonl_rows(path):
            text = row.get("text", row.get("chosen"))
            if not isinstance(text, str):
                raise DataError(f"{path}, line {number}: expected a \"text\" (or HH \"chosen\") string field.")
            docs.append(text)
        return docs
    return [d.strip() for d in "\n".join(read_lines(path)).split("\n\n") if d.strip()]


def load_prompts(path: str) -> list[str]:
    """Prompts from a .jsonl file with a "prompt" field per line (or one prompt per line of text)."""
    if path.removesuffix(".gz").endswith(".jsonl"):
        prompts = []
        for number, row in _jsonl_rows(path):
            if not isinstance(row.get("prompt"), str):
                raise DataError(f"{path}, line {number}: expected a \"prompt\" string field.")
            prompts.append(row["prompt"])
        return prompts
    return [line for line in read_lines(path) if line.strip()]


def right_pad(rows: list[list[int]], pad: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths as one block: ids (B, T) right-padded with ``pad``, and each
    row's length (B,). Built on the CPU and moved once."""
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.full((len(rows), int(lengths.max())), pad, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
    return ids.to(device), lengths.to(device)


def pad_responses(prompts: list[list[int]], responses: list[list[int]], pad: int = 0,
                  device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt + response token rows, right-padded: ids (B, T), and a mask (B, T-1) that is 1 where
    position t predicts a response token (aligned with ``model.token_logprobs``)."""
    ids, _ = right_pad([p + r for p, r in zip(prompts, responses)], pad)
    mask = torch.zeros(ids.size(0), ids.size(1) - 1)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        mask[b, len(p) - 1: len(p) + len(r) - 1] = 1.0
    return ids.to(device), mask.to(device)
