"""Data: packing documents into training rows, random batches of rows, and the JSONL loaders.

- Language-model data is packed rows of whole documents, each ended by end-of-text, with a loss
  weight per target token; a batch is random rows, and each document in a row sees only itself, from
  position 0 (document masking), so training sees prompts exactly where inference puts them.
- Preference pairs use the Anthropic HH format: one JSON object per line,
  ``{"chosen": transcript, "rejected": transcript}``; the shared prompt is everything up to and
  including the last ``Assistant:``, and the response is what follows.
- A malformed line is a ``DataError`` naming the file and the line.
"""
import gzip
import json
import os
import re

import torch

from .tokenizer import Tokenizer

ANSWER_RE = re.compile(rb"(?:The answer is: \(|It is )([^.)\n]*)")  # group 1: an answer, up-weighted
# (a self-evaluation verdict, or a world task's answer: a few tokens among the dozens of a document)


class DataError(ValueError):
    """Input data that cannot be used, with the file and line at fault."""


def document_ids(doc: str, tokenizer: Tokenizer, answer_weight: float) -> tuple[list[int], list[float]]:
    """One document's tokens, followed by end-of-text, and the loss weight of predicting each one: a
    token that overlaps an answer (group 1 of ``ANSWER_RE``) gets ``answer_weight``, the rest 1."""
    ids, text = tokenizer.encode(doc), doc.encode()
    in_answer = bytearray(len(text))  # (bytes,) 1 inside an answer
    for m in ANSWER_RE.finditer(text):
        in_answer[m.start(1): m.end(1)] = b"\1" * (m.end(1) - m.start(1))
    weights, start = [], 0
    for token in ids:
        end = start + tokenizer.byte_length(token)
        weights.append(answer_weight if any(in_answer[start:end]) else 1.0)
        start = end
    return ids + [tokenizer.eot], weights + [1.0]


def pack_rows(docs: list[str], tokenizer: Tokenizer, row_len: int,
              answer_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Documents -> rows of ``row_len`` tokens that hold whole documents: tokens (R, L), loss weights
    (R, L) and the document index of each token within its row (R, L).

    Each document goes to the open row it fills most tightly (best fit), so few rows are left part
    empty; a document longer than a row is cut into row-long pieces. The rest of a row is padding
    (end-of-text, weight 0, a document index of its own). With ``GPT.forward(..., documents=)`` every
    document then starts at position 0 and sees only itself, exactly as a prompt does at inference.
    """
    rows, open_rows = [], [[] for _ in range(row_len + 1)]  # open_rows[r]: rows with r tokens of room
    for doc in docs:
        ids, weights = document_ids(doc, tokenizer, answer_weight)
        for i in range(0, len(ids), row_len):
            piece = (ids[i: i + row_len], weights[i: i + row_len])
            room = next((r for r in range(len(piece[0]), row_len + 1) if open_rows[r]), None)
            if room is None:
                rows.append([])
                row, room = len(rows) - 1, row_len
            else:
                row = open_rows[room].pop()
            rows[row].append(piece)
            open_rows[room - len(piece[0])].append(row)
    if not rows:
        raise DataError("the corpus has no documents; give it at least one.")
    tokens = torch.full((len(rows), row_len), tokenizer.eot, dtype=torch.long)
    weights = torch.zeros(len(rows), row_len)
    documents = torch.empty(len(rows), row_len, dtype=torch.long)
    for r, pieces in enumerate(rows):
        start = 0
        documents[r] = len(pieces)  # the padding's own index
        for d, (ids, w) in enumerate(pieces):
            tokens[r, start: start + len(ids)] = torch.tensor(ids)
            weights[r, start: start + len(ids)] = torch.tensor(w)
            documents[r, start: start + len(ids)] = d
            start += len(ids)
    return tokens, weights, documents


def random_rows(tokens: torch.Tensor, weights: torch.Tensor, documents: torch.Tensor, batch_size: int,
                generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """A batch of random packed rows: inputs x (B, T), targets y (B, T), target weights w (B, T) and the
    inputs' document indices (B, T), with T = row_len - 1. A target that starts a new document gets
    weight 0: at inference a document (a prompt) is never predicted from the one before it."""
    chosen = torch.randint(len(tokens), (batch_size,), generator=generator)
    chunk, wchunk, dchunk = tokens[chosen], weights[chosen], documents[chosen]  # (B, T+1)
    same_document = dchunk[:, 1:] == dchunk[:, :-1]
    return chunk[:, :-1], chunk[:, 1:], wchunk[:, 1:] * same_document, dchunk[:, :-1]


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
        except RecursionError:
            raise DataError(f"{path}, line {number}: JSON nested too deeply to be a row.") from None
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
    else:
        docs = [d.strip() for d in "\n".join(read_lines(path)).split("\n\n") if d.strip()]
    if not docs:
        raise DataError(f"{path} holds no documents; give text documents separated by blank lines "
                        "(or a .jsonl with a \"text\" field).")
    return docs


def load_prompts(path: str) -> list[str]:
    """Prompts from a .jsonl file with a "prompt" field per line (or one prompt per line of text)."""
    if path.removesuffix(".gz").endswith(".jsonl"):
        prompts = []
        for number, row in _jsonl_rows(path):
            if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
                raise DataError(f"{path}, line {number}: expected a non-empty \"prompt\" string field.")
            prompts.append(row["prompt"])
    else:
        prompts = [line for line in read_lines(path) if line.strip()]  # blank lines separate nothing
    if not prompts:
        raise DataError(f"{path} holds no prompts; give one per line (or a .jsonl with a \"prompt\" field).")
    return prompts


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


def pad_with_lengths(prompts: list[list[int]], responses: list[list[int]],
                     device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``pad_responses`` (ids (B, T), mask (B, T-1)) and each row's real length (B,), in input order:
    with the lengths, ``model.micro_batches`` runs rows of similar length together and cuts each
    micro-batch to its longest row."""
    ids, mask = pad_responses(prompts, responses, device=device)
    return ids, mask, torch.tensor([len(p) + len(r) for p, r in zip(prompts, responses)])
