"""The benchmark compares like with like: transformers decodes the very same greedy tokens."""
import pytest
import torch


def test_bench_decoding_matches_transformers_with_the_same_weights():
    pytest.importorskip("transformers")
    from minialign.lab.bench import decode_speed
    from minialign.model import GPTConfig
    result = decode_speed(GPTConfig(vocab_size=300, block_size=64, n_layer=2, n_head=2, n_embd=32), 1, 16,
                          torch.device("cpu"))
    assert result["same_tokens"] and "transformers_tokens_per_s" in result and result["cached_tokens_per_s"] > 0
