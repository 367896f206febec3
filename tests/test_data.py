"""Data: HH transcripts split at the last Assistant turn, loss weights, response masks."""
import pytest

from minialign.data import DataError, load_pairs, pack, pad_responses, split_transcript
from minialign.tokenizer import get_tokenizer

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
    tokens, weights = pack(["x The answer is: (A)"], TOK, answer_weight=3.0)
    letter = TOK.decode(tokens[weights == 3.0].tolist())
    assert letter == "A" and (weights != 1.0).sum() == 1 and tokens[-1] == TOK.eot


def test_response_mask_selects_exactly_the_response_predictions():
    ids, mask = pad_responses([[1, 2, 3], [4]], [[7, 8], [9, 10, 11]])
    targets = ids[:, 1:]  # position t predicts ids[t + 1]
    assert targets[mask.bool()].tolist() == [7, 8, 9, 10, 11]
