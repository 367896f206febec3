"""Shared fixtures: tiny models and configs that keep the suite fast on a 2-core CPU."""
import pytest
import torch

from minialign.model import GPT, GPTConfig

TINY = GPTConfig(vocab_size=257, block_size=64, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture
def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(TINY).eval()
