"""GPT-2 weights (the Hugging Face layout) loaded into minialign's GPT: a hub name, downloaded once,
or a local folder in either the ``save_pretrained`` or the original hub layout.

The folder's config.json gets the checks a checkpoint's does (``model.config_defects``) before any
weight is allocated, the weights must match GPT-2's names and shapes key by key, and non-finite
weights are refused.
"""
import os
import urllib.request

import torch

from .checkpoint import read_json
from .model import GPT, GPTConfig, ModelError, all_finite, config_defects

HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
HUB_URL = "https://huggingface.co/{name}/resolve/main/{file}"
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _download_hub_model(name: str, cache_dir: str) -> str:
    """Fetch config.json and model.safetensors of a hub GPT-2 once into ``cache_dir/name``; return the folder."""
    folder = os.path.join(cache_dir, name)
    os.makedirs(folder, exist_ok=True)
    for file in ("config.json", "model.safetensors"):
        target = os.path.join(folder, file)
        if os.path.exists(target):
            continue
        try:
            urllib.request.urlretrieve(HUB_URL.format(name=name, file=file), target + ".part")
        except OSError as err:
            raise ModelError(f"Could not download {name} ({err}); offline, pass the path of a local GPT-2 "
                             "folder (config.json + model.safetensors or pytorch_model.bin) instead.") from None
        os.replace(target + ".part", target)  # only a complete file ever carries the final name
    return folder


def _read_state_dict(folder: str) -> dict:
    st_path, bin_path = os.path.join(folder, "model.safetensors"), os.path.join(folder, "pytorch_model.bin")
    if os.path.exists(st_path):
        from safetensors.torch import load_file
        try:
            return load_file(st_path)
        except Exception as err:  # a header that lies about its tensors, a file cut short
            raise ModelError(f"{st_path} could not be read as safetensors ({' '.join(str(err).split())[:160]}).") from None
    if os.path.exists(bin_path):
        try:
            return torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ModelError(f"{bin_path} could not be read as a weights-only torch file ({err}).") from None
    raise ModelError(f"{folder} has neither model.safetensors nor pytorch_model.bin.")


def from_pretrained(path_or_name: str, cache_dir: str = "~/.cache/minialign") -> GPT:
    """A GPT with GPT-2 weights from a local Hugging Face folder or a hub name (downloaded once)."""
    folder = path_or_name
    if not os.path.isdir(folder):
        if path_or_name not in HUB_NAMES:
            raise ModelError(f"{path_or_name!r} is neither a folder nor one of {', '.join(HUB_NAMES)}.")
        folder = _download_hub_model(path_or_name, os.path.expanduser(cache_dir))
    config_path = os.path.join(folder, "config.json")
    hf = read_json(config_path, ModelError)
    if not isinstance(hf, dict):
        raise ModelError(f"{config_path} is a JSON {type(hf).__name__}, not a GPT-2 config object.")
    sizes = {"vocab_size": hf.get("vocab_size"), "block_size": hf.get("n_positions"), "n_layer": hf.get("n_layer"),
             "n_head": hf.get("n_head"), "n_embd": hf.get("n_embd")}
    defects = config_defects(sizes)
    if defects:
        raise ModelError(f"{config_path} is not a usable GPT-2 config (block_size is its n_positions): "
                         + " ".join(defects))
    model = GPT(GPTConfig(**sizes))
    ours = model.state_dict()
    theirs = {}
    for key, tensor in _read_state_dict(folder).items():
        key = key.removeprefix("transformer.")
        if key.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight":
            continue  # causal-mask buffers of the hub files; the head is tied to wte
        key = key if key.startswith("lm_head") else "transformer." + key
        if key.endswith(CONV1D):
            tensor = tensor.t()  # GPT-2's Conv1D stores (in, out); nn.Linear wants (out, in)
        theirs[key] = tensor
    expected = set(ours) - {"lm_head.weight"}
    if set(theirs) != expected:
        missing, extra = sorted(expected - set(theirs)), sorted(set(theirs) - expected)
        raise ModelError(f"{folder}: weights do not match GPT-2 (missing {missing[:5]}, unexpected {extra[:5]}).")
    for key, tensor in theirs.items():
        if tensor.shape != ours[key].shape:
            raise ModelError(f"{folder}: {key} has shape {tuple(tensor.shape)}, expected {tuple(ours[key].shape)}.")
    with torch.no_grad():
        for key, tensor in theirs.items():
            ours[key].copy_(tensor.to(torch.float32))
    if not all_finite(model):
        raise ModelError(f"{folder}: its weights are not all finite (nan or inf); use another checkpoint.")
    return model
