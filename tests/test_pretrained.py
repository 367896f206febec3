"""GPT-2 loading: a folder written by transformers loads with identical logits and greedy tokens,
in both the save_pretrained layout and the original hub layout (bare keys, mask buffers, .bin)."""
import os

import pytest
import torch

from minialign.gpt2 import from_pretrained
from minialign.model import ModelError
from minialign.sampling import generate

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=48, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(config).eval()


def hf_greedy(model, prompt, steps):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, len(prompt):].tolist()


def check_same(ours, hf_model):
    x = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), hf_model(x).logits, rtol=0, atol=1e-5)
    prompt = [1, 2, 3, 4]
    assert generate(ours, [prompt], 20, stop=set(), temperature=0)[0] == hf_greedy(hf_model, prompt, 20)


def test_save_pretrained_folder(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    check_same(from_pretrained(str(tmp_path)), hf_model)


def test_original_hub_layout(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)  # for config.json
    os.remove(tmp_path / "model.safetensors")
    state = {k.removeprefix("transformer."): v.clone() for k, v in hf_model.state_dict().items()
             if k != "lm_head.weight"}
    for i in range(hf_model.config.n_layer):  # the causal-mask buffers the original files carry
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
    torch.save(state, tmp_path / "pytorch_model.bin")
    check_same(from_pretrained(str(tmp_path)), hf_model)


def test_shape_mismatch_is_named(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    state = {k: v.clone() for k, v in hf_model.state_dict().items()}
    state["transformer.wpe.weight"] = torch.zeros(10, 48)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelError, match="wpe.weight has shape"):
        from_pretrained(str(tmp_path))


def test_unknown_name_is_a_clear_error():
    with pytest.raises(ModelError, match="neither a folder"):
        from_pretrained("no-such-model")
