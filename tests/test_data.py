"""Data: HH transcripts split at the last Assistant turn, loss weights, response masks, compressed and
broken files; the tokenizer paired with a model's vocabulary."""
import gzip

import pytest

import torch

from minialign.data import (DataError, load_documents, load_pairs, load_prompts, pack_rows, pad_responses, random_rows,
                            split_transcript)
from minialign.tokenizer import VOCAB_SIZES, TokenizerError, check_pairing, get_tokenizer

TOK = get_tokenizer("bytes")


def test_split_at_the_last_assistant_turn():
    prompt, response = split_transcript("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d")
    assert prompt.endswith("Human: c\n\nAssistant:") and response == " d"


def test_pairs_must_share_their_prompt(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"chosen": "Human: a\\nAssistant: b", "rejected": "Human: X\\nAssistant: c"}\n')
    with pytest.raises(DataError, match="line 1: chosen and rejected do not share"):
        load_pairs(str(path))


def test_answer_letter_weight():
    tokens, weights, _ = pack_rows(["x The answer is: (A)"], TOK, row_len=32, answer_weight=3.0)
    letter = TOK.decode(tokens[weights == 3.0].tolist())
    assert letter == "A" and (weights == 3.0).sum() == 1
    assert (weights == 1.0).sum() == len("x The answer is: (A)")  # the rest of the text and end-of-text
    assert tokens[0, len("x The answer is: (A)")] == TOK.eot


def test_rows_hold_whole_documents_best_fit():
    docs = ["a" * 6, "b" * 2, "c" * 3, "d" * 11, "e"]  # with end-of-text: 7, 3, 4, 12, 2 tokens
    tokens, weights, documents = pack_rows(docs, TOK, row_len=9)
    texts = set()
    for row, w, d in zip(tokens, weights, documents):
        for i in d.unique():
            part = row[(d == i) & (w > 0)].tolist()
            texts.add(TOK.decode([t for t in part if t != TOK.eot]))
            assert (d == i).nonzero().flatten().diff().eq(1).all()  # one document is one contiguous run
    assert texts - {""} == {"a" * 6, "b" * 2, "c" * 3, "d" * 9, "d" * 2, "e"}  # "": padding; the long one cut
    # best fit: [a], [b c], [d...], [dd]; then e (2 tokens) fills [b c] to the brim rather than [a]
    assert [len(d.unique()) - int(w[-1] == 0) for d, w in zip(documents, weights)] == [1, 3, 1, 1]
    assert int((weights == 0).sum()) == 4 * 9 - (7 + 3 + 4 + 12 + 2)  # only the padding has weight 0


def test_no_target_crosses_a_document_boundary():
    tokens, weights, documents = pack_rows(["ab", "cd"], TOK, row_len=8)
    x, y, w, d = random_rows(tokens, weights, documents, 1, torch.Generator().manual_seed(0))
    assert y[0][w[0] > 0].tolist() == TOK.encode("b") + [TOK.eot] + TOK.encode("d") + [TOK.eot]  # not 'c'

    assert d[0].tolist() == [0, 0, 0, 1, 1, 1, 2]


def test_response_mask_selects_exactly_the_response_predictions():
    ids, mask = pad_responses([[1, 2, 3], [4]], [[7, 8], [9, 10, 11]])
    targets = ids[:, 1:]  # position t predicts ids[t + 1]
    assert targets[mask.bool()].tolist() == [7, 8, 9, 10, 11]


def test_gzip_is_read_as_its_text(tmp_path):
    rows = b'{"text": "first document"}\n{"text": "second, with \\u00e9"}\n'
    (tmp_path / "c.jsonl").write_bytes(rows)
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(rows))
    assert load_documents(str(tmp_path / "c.jsonl.gz")) == load_documents(str(tmp_path / "c.jsonl")) == [
        "first document", "second, with \u00e9"]
    (tmp_path / "p.txt.gz").write_bytes(gzip.compress(b"Human: a\nAssistant:\n\nHuman: b\nAssistant:\n"))
    assert load_prompts(str(tmp_path / "p.txt.gz")) == ["Human: a", "Assistant:", "Human: b", "Assistant:"]


def test_tokenizer_and_model_vocabulary_are_checked_both_ways():
    check_pairing(TOK, 257, "m")       # the bytes tokenizer and a byte model
    check_pairing(TOK, 257 + 63, "m")  # a vocabulary padded for speed
    with pytest.raises(TokenizerError, match="needs 257"):
        check_pairing(TOK, 100, "m")   # the model cannot hold the tokenizer's ids
    with pytest.raises(TokenizerError, match="knows only 257 ids"):
        check_pairing(TOK, 50257, "m")  # a GPT-2 vocabulary would emit ids bytes cannot decode
    assert VOCAB_SIZES["bytes"] == TOK.vocab_size  # config.json is checked against these sizes unbuilt
    with pytest.raises(TokenizerError, match="needs 257"):  # the edge: 256 ids cannot hold <|endoftext|>
        check_pairing(TOK, 256, "m")
    with pytest.raises(TokenizerError, match="knows only"):  # the edge: exactly one padding's worth more
        check_pairing(TOK, 257 + 128, "m")
    check_pairing(TOK, 257 + 127, "m")

