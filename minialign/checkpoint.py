"""Checkpoints: atomic save, safe load (``weights_only=True``), and what resume needs.

A checkpoint is one folder per stage (``out/sft``, ``out/reward``, ...):

- ``model.pt``: the plain state dict of the unwrapped, uncompiled model;
- ``config.json``: the model config, the stage config, the tokenizer's name, the step and metrics;
- ``state.pt``: what ``--resume`` needs (optimizer state, random generator state, step).

The folder is written next to its final place and renamed into it, so a crash never leaves a
half-written checkpoint under the final name; the previous checkpoint stays readable until the swap.
"""
import csv
import io
import json
import os
import shutil
import socket
import sys
import tempfile

import torch

from .model import GPT, GPT_SIZES, GPTConfig, all_finite, config_defects
from .tokenizer import VOCAB_SIZES, pairing_defect


class CheckpointError(RuntimeError):
    """A checkpoint that is missing or unreadable, with a sentence saying what to do."""


MAX_JSON_BYTES = 16 * 2**20  # a config.json is a few hundred bytes; anything this large is not one


def read_json(path: str, error: type[Exception]):
    """The JSON value of a small file, or ``error`` with one sentence: missing, not a regular file (a
    device, a folder), too large, not JSON, nested too deep."""
    if not os.path.isfile(path):
        raise error(f"{path} is missing or not a regular file.")
    if os.path.getsize(path) > MAX_JSON_BYTES:
        raise error(f"{path} is {os.path.getsize(path) / 2**20:.0f} MiB, too large for a config file.")
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as err:  # ValueError covers bad JSON and bad UTF-8
        reason = "nested too deeply" if isinstance(err, RecursionError) else " ".join(str(err).split())[:120]
        raise error(f"{path} is not valid JSON ({reason}).") from None


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_csv(rows: list[dict], path: str) -> None:
    """A table of results (one dict per row) as CSV, written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def pyplot():
    """matplotlib.pyplot without a display, or None (with a note) when the plot extra is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[plot]'): skipping the figure.")
        return None
    return plt


def save_figure(fig, path: str) -> None:
    """A matplotlib figure as PNG, written atomically."""
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    os.replace(path + ".tmp.png", path)  # atomic: a reader never sees half a figure
    print(f"wrote {path}")


def _leftovers(folder: str) -> list[str]:
    """The temporary copies a writer keeps beside ``folder`` (``.NAME-tmp-*``, ``.NAME-old-*``)."""
    parent, name = os.path.split(os.path.abspath(folder))
    if not os.path.isdir(parent):
        return []
    return [os.path.join(parent, n) for n in os.listdir(parent)
            if n.startswith((f".{name}-tmp-", f".{name}-old-"))]


def newest_copy(folder: str) -> str | None:
    """Where the newest complete copy of a checkpoint folder is: the folder itself, or, when a crash
    came between the two renames of a swap, the copy beside it that is newest. Complete means its
    config.json is there: every writer writes that file last."""
    done = lambda path: os.path.exists(os.path.join(path, "config.json"))  # noqa: E731
    if done(folder):
        return folder
    copies = [path for path in _leftovers(folder) if done(path)]
    return max(copies, key=lambda path: os.path.getmtime(os.path.join(path, "config.json"))) if copies else None


def _settle(folder: str) -> None:
    """Before writing: finish a swap a crash interrupted (the newest complete copy takes the folder's
    place) and delete what crashes left beside it. Only a writer does this; readers just read from
    ``newest_copy``, so they never move a folder under a running writer."""
    newest = newest_copy(folder)
    if newest is not None and newest != folder:
        os.replace(newest, folder)
    for path in _leftovers(folder):
        shutil.rmtree(path, ignore_errors=True)


def write_folder(folder: str, write) -> None:
    """Replace ``folder`` atomically: ``write(tmp)`` fills a temporary folder beside it, which is then
    renamed into place (the old folder, if any, is moved aside first and deleted last). A crash
    between the two renames leaves both complete copies beside the folder's place: readers find the
    newer one (``newest_copy``) and the next write puts it back in place."""
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    _settle(folder)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(folder)}-tmp-")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private (0700); a checkpoint is an ordinary folder
    old = None
    try:
        write(tmp)
        if os.path.exists(folder):
            old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(folder)}-old-")
            os.rmdir(old)
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old:
            shutil.rmtree(old)
    except BaseException:  # an error or Ctrl-C (a kill -9 runs nothing: readers then use newest_copy)
        if old and os.path.exists(old) and not os.path.exists(folder):
            os.replace(old, folder)  # interrupted between the renames: the old checkpoint goes back
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_writable(path: str, what: str, folder: bool = False) -> None:
    """Refuse, before any work, a ``path`` that could not be written later: empty, a dangling or looping
    symbolic link, below a file, a file where a ``folder`` is meant, or in a folder this process may not
    write to. ``what`` names it (a flag) in the sentence."""
    if not path.strip():
        raise CheckpointError(f"{what} is empty; give a file or folder name.")
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"{what} {path} is a file, not a folder.")
    if os.path.islink(path) and not os.path.exists(path):
        raise CheckpointError(f"{what} {path} is a symbolic link that leads nowhere (or to itself); remove it.")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):  # the nearest part of the path that exists
        existing = os.path.dirname(existing)
    if existing != os.path.abspath(path) and not os.path.isdir(existing):
        raise CheckpointError(f"{what} {path} lies below {existing}, which is a file, not a folder.")
    parent = existing if os.path.isdir(existing) else os.path.dirname(existing)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"{what} {path}: {parent} is not writable by this user; choose another place.")


class OutLock:
    """One training run per checkpoints root: ``out/.lock`` holds the running process's id, host and
    command. A second run stops with one sentence naming the first; a lock whose process has died (on
    this host) is taken over. Used as ``with OutLock(out_dir): ...``."""

    def __init__(self, out_dir: str):
        self.path = os.path.join(out_dir, ".lock")
        self.mine = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)}

    def __enter__(self) -> "OutLock":
        out_dir = os.path.dirname(self.path) or "."
        check_writable(out_dir, "--out_dir", folder=True)
        os.makedirs(out_dir, exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except PermissionError:
                raise CheckpointError(f"--out_dir {out_dir} is not writable by this user; choose another place.") from None
            except FileExistsError:
                holder = self._holder()
                if holder is not None and self._alive(holder):
                    raise CheckpointError(
                        f"another run is writing to {os.path.dirname(self.path)}: pid {holder['pid']} on "
                        f"{holder['host']} (`{holder['command']}`); wait for it to finish, or stop it.")
                os.remove(self.path)  # left by a run that died: take it over
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.mine, f)
            return self

    def __exit__(self, *exc) -> None:
        if self._holder() == self.mine:
            os.remove(self.path)

    def _holder(self) -> dict | None:
        try:
            with open(self.path) as f:
                holder = json.load(f)
        except (OSError, ValueError):
            return None  # half-written or unreadable: nobody can be holding it
        if not (isinstance(holder, dict) and type(holder.get("pid")) is int and {"host", "command"} <= set(holder)):
            return None  # not a lock this class wrote
        return holder

    def _alive(self, holder: dict) -> bool:
        if holder.get("host") != self.mine["host"]:
            return True  # another machine's process cannot be checked from here
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # someone else's live process
        return True


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


def load_meta(folder: str, hint: str = "python train.py", model: bool = False) -> dict:
    """The config.json of a checkpoint folder; a missing one says which command creates it, a malformed
    one (``model``: one that must also describe a model) lists its defects."""
    found = newest_copy(folder)
    if found is None:
        raise CheckpointError(f"no checkpoint in {folder}: run `{hint}` first.")
    path = os.path.join(found, "config.json")
    try:
        meta = read_json(path, CheckpointError)
    except CheckpointError as err:
        raise CheckpointError(f"{err} Delete the folder and run the stage again.") from None
    defects = meta_defects(meta, model)
    if defects:
        raise CheckpointError(f"{path}: " + " ".join(defects) + " Delete the folder and run the stage again.")
    return meta


def meta_defects(meta, model: bool = False) -> list[str]:
    """One sentence per defect of a config.json, checked before anything is allocated: the fields every
    stage reads and their types; with ``model``, also the model's fields and a size that is positive,
    consistent and bounded."""
    if not isinstance(meta, dict):
        return [f"is a JSON {type(meta).__name__}, not an object."]
    expected = {"stage": str, "config": dict} | ({"step": int, "tokenizer": str, "model": dict} if model else {})
    defects = [f"{key!r} is missing." if key not in meta else f"{key!r} should be a {kind.__name__}."
               for key, kind in expected.items() if not isinstance(meta.get(key), kind)]
    if isinstance(meta.get("tokenizer"), str) and meta["tokenizer"] not in VOCAB_SIZES:
        defects.append(f"'tokenizer' is {meta['tokenizer']!r}, not 'bytes' or 'gpt2'.")
    shape = meta.get("model")
    if not model or not isinstance(shape, dict):
        return defects
    defects += [f"'model' has an unknown field {key!r}." for key in shape if key not in GPT_SIZES]
    shape_defects = config_defects({key: shape.get(key) for key in GPT_SIZES}, "model.")
    if not shape_defects and isinstance(meta.get("tokenizer"), str) and meta["tokenizer"] in VOCAB_SIZES:
        name = meta["tokenizer"]
        defect = pairing_defect(name, VOCAB_SIZES[name], shape["vocab_size"])
        defects += [f"'model.vocab_size' and 'tokenizer': {defect}."] if defect else []
    return defects + shape_defects


def load_weights(folder: str, module: torch.nn.Module) -> None:
    """Load ``folder/model.pt`` into ``module``, checking every key and shape."""
    path = os.path.join(newest_copy(folder) or folder, "model.pt")
    state = _torch_load(path)
    try:
        module.load_state_dict(state)
    except (RuntimeError, AttributeError) as err:
        raise CheckpointError(f"{path} does not fit the model its config.json describes ({' '.join(str(err).split())[:200]}).") from None
    if not all_finite(module):
        raise CheckpointError(f"{path} holds weights that are not finite (nan or inf), which no finished run writes: "
                              "delete its folder and run that stage again.")


def load_model(folder: str, hint: str = "python train.py --stage sft") -> tuple[GPT, dict]:
    """A language model and its meta from a checkpoint folder written by ``save``."""
    meta = load_meta(folder, hint, model=True)
    model = GPT(GPTConfig(**meta["model"]))
    load_weights(folder, model)
    return model, meta


def world_seed(out_dir: str) -> int:
    """The seed of the world the reference policy was trained in (``<out_dir>/sft``): later stages and
    evaluations must draw their world prompts from the same world, or held-out prompts could be seen."""
    return int(load_meta(f"{out_dir}/sft", "python train.py --stage sft")["config"].get("seed", 0))


def load_state(folder: str) -> dict:
    """The resume state (optimizer, generator, step) of a checkpoint folder."""
    path = os.path.join(newest_copy(folder) or folder, "state.pt")
    if not os.path.exists(path):
        raise CheckpointError(f"{folder} has no state.pt to resume from; run the stage without --resume.")
    return _torch_load(path)
