"""Checkpoints: atomic save, safe load (``weights_only=True``), and what resume needs.

A checkpoint is one folder per stage (``out/sft``, ``out/reward``, ...):

- ``model.pt``: the plain state dict of the unwrapped, uncompiled model;
- ``config.json``: the model config, the stage config, the tokenizer's name, the step and metrics;
- ``state.pt``: what ``--resume`` needs (optimizer state, random generator state, step).

The folder is written next to its final place and renamed into it, so a crash never leaves a
half-written checkpoint under the final name; the previous checkpoint stays readable until the swap.
"""
import json
import os
import shutil
import tempfile

import torch

from .model import GPT, GPTConfig


class CheckpointError(RuntimeError):
    """A checkpoint that is missing or unreadable, with a sentence saying what to do."""


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_folder(folder: str, write) -> None:
    """Replace ``folder`` atomically: ``write(tmp)`` fills a temporary folder beside it, which is then
    renamed into place (the old folder, if any, is moved aside first and deleted last)."""
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(folder)}-tmp-")
    try:
        write(tmp)
        old = None
        if os.path.exists(folder):
            old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(folder)}-old-")
            os.rmdir(old)
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save(folder: str, model: torch.nn.Module, meta: dict, state: dict | None = None) -> None:
    """Write model weights, ``meta`` (as config.json) and the optional resume ``state`` atomically."""
    def write(tmp: str) -> None:
        torch.save(model.state_dict(), os.path.join(tmp, "model.pt"))
        if state is not None:
            torch.save(state, os.path.join(tmp, "state.pt"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(meta, f, indent=2)
    write_folder(folder, write)


def _torch_load(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(err).__name__}); "
                              "delete its folder and run that stage again.") from None


def load_meta(folder: str, hint: str = "python train.py") -> dict:
    """The config.json of a checkpoint folder; a missing one says which command creates it."""
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint in {folder}: run `{hint}` first.")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); delete the folder and run the stage again.") from None


def load_weights(folder: str, module: torch.nn.Module) -> None:
    """Load ``folder/model.pt`` into ``module``, checking every key and shape."""
    path = os.path.join(folder, "model.pt")
    state = _torch_load(path)
    try:
        module.load_state_dict(state)
    except (RuntimeError, AttributeError) as err:
        raise CheckpointError(f"{path} does not fit the model its config.json describes ({str(err)[:200]}).") from None


def load_model(folder: str, hint: str = "python train.py --stage sft") -> tuple[GPT, dict]:
    """A language model and its meta from a checkpoint folder written by ``save``."""
    meta = load_meta(folder, hint)
    model = GPT(GPTConfig(**meta["model"]))
    load_weights(folder, model)
    return model, meta


def world_seed(out_dir: str) -> int:
    """The seed of the world the reference policy was trained in (``<out_dir>/sft``): later stages and
    evaluations must draw their world prompts from the same world, or held-out prompts could be seen."""
    return int(load_meta(f"{out_dir}/sft", "python train.py --stage sft")["config"].get("seed", 0))


def load_state(folder: str) -> dict:
    """The resume state (optimizer, generator, step) of a checkpoint folder."""
    path = os.path.join(folder, "state.pt")
    if not os.path.exists(path):
        raise CheckpointError(f"{folder} has no state.pt to resume from; run the stage without --resume.")
    return _torch_load(path)
