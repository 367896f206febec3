"""The fixed-shape (CUDA-graph) decoder against the plain KV-cached decoder, which is its reference."""
import pytest
import torch

from minialign.fast.graphs import GraphDecoder
from minialign.model import ModelError
from minialign.sampling import generate

PROMPTS = [[1, 2, 3], [40, 41, 42, 43, 44, 45, 46, 47, 48], [7], [100, 5, 9, 200, 30]]


def frequent_token(model) -> int:
    """A token the tiny random model emits often, so rows stop at different steps."""
    rows = generate(model, PROMPTS, 30, stop=set(), temperature=0)
    tokens = [t for row in rows for t in row]
    return max(set(tokens), key=tokens.count)


@pytest.mark.parametrize("keep_stop", [False, True])
def test_static_decoder_equals_plain_decoder_greedy_with_stops(tiny_model, keep_stop):
    stop = {frequent_token(tiny_model)}
    plain = generate(tiny_model, PROMPTS, 30, stop, temperature=0, keep_stop=keep_stop)
    decoder = GraphDecoder(tiny_model, len(PROMPTS), 9 + 30, use_graph=False)
    assert decoder.generate(PROMPTS, 30, stop, temperature=0, keep_stop=keep_stop) == plain
    assert len({len(row) for row in plain}) > 1  # the rows really stopped at different steps


def test_static_decoder_equals_plain_decoder_sampled_and_is_reusable(tiny_model):
    plain = generate(tiny_model, PROMPTS, 25, {256}, temperature=1.0, top_k=50,
                     generator=torch.Generator().manual_seed(3))
    decoder = GraphDecoder(tiny_model, len(PROMPTS), 40, use_graph=False)
    decoder.generate(PROMPTS[::-1], 20, {256}, temperature=0)  # a first use leaves garbage in the cache
    again = decoder.generate(PROMPTS, 25, {256}, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(3))
    assert again == plain


def test_static_decoder_rejects_what_it_cannot_hold(tiny_model):
    decoder = GraphDecoder(tiny_model, 2, 20, use_graph=False)
    with pytest.raises(ModelError, match="holds 2 rows of 20 tokens"):
        decoder.generate(PROMPTS[:2], 15, set())
    with pytest.raises(ModelError, match="context"):
        GraphDecoder(tiny_model, 1, 65)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replay_equals_eager_static_decoding(tiny_model):
    model = tiny_model.cuda()
    prompts = PROMPTS * 4  # batch 16
    stop = {frequent_token(model)}
    plain = generate(model, prompts, 40, stop, temperature=0)
    graphed = GraphDecoder(model, len(prompts), 49)
    assert graphed.graph is not None
    assert graphed.generate(prompts, 40, stop, temperature=0) == plain
    assert graphed.generate(prompts, 40, stop, temperature=0) == plain  # replays again after a reset
