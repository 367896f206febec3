"""Generated junk against every loader of user files and checkpoints: each input is either read (a valid
file) or refused in one sentence with exit code 2 (``config.main_guard``), never a traceback, and the
checkpoint folder it was read from is unchanged."""
import gzip
import json
import random

import pytest
import torch

from minialign.calibrate import load_calibration
from minialign.checkpoint import load_model, save
from minialign.config import main_guard
from minialign.data import load_documents, load_pairs, load_prompts
from minialign.model import GPT, GPTConfig

SEEDS = range(100)  # inputs per family: 100 x 6 data variants + 100 x 5 checkpoint variants
PAIR = {"chosen": "Human: hi\nAssistant: hello", "rejected": "Human: hi\nAssistant: go away"}


def junk_json(rng: random.Random, depth: int = 0):
    """A random JSON value: wrong types, empty and odd strings, and now and then deep nesting."""
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rng.choice([None, True, 0, -1, 1.5, float(2**31), ""])
    if kind == 1:
        return "".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(rng.randrange(12)))
    if kind == 2:
        return rng.choice(["prompt", "text", "chosen", "Human: x\nAssistant:", "Assistant: y"])
    if kind == 3:
        return "[" * 50_000 + "]" * 50_000  # deep nesting as text, parsed by the loader itself
    if kind == 4:
        return rng.randrange(-10, 10**10)
    if kind == 5:
        return [junk_json(rng, depth + 1) for _ in range(rng.randrange(3))]
    keys = ["prompt", "text", "chosen", "rejected", "stage", "config", "model", "tokenizer", "step", "n_embd"]
    return {rng.choice(keys): junk_json(rng, depth + 1) for _ in range(rng.randrange(4))}


def junk_bytes(rng: random.Random, valid: bytes) -> bytes:
    """Random bytes, a truncation of a valid file, a valid file with bytes flipped, or lines of junk JSON."""
    kind = rng.randrange(4)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(200)))
    if kind == 1:
        return valid[: rng.randrange(len(valid) + 1)]
    if kind == 2:
        data = bytearray(valid)
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    return "\n".join(json.dumps(junk_json(rng)) if rng.random() < 0.8 else "[" * 40_000
                     for _ in range(rng.randrange(1, 4))).encode("utf-8", "surrogatepass")


def outcome(capsys, load) -> str:
    """'read' for a valid input, 'refused' for one sentence and exit 2; anything else fails the test."""
    try:
        value = main_guard(load)
    except SystemExit as stop:
        err = capsys.readouterr().err
        assert stop.code == 2, err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        return "refused"
    assert value is not None
    return "read"


LOADERS = [("prompts.txt", load_prompts, b"Human: a\nAssistant:\nHuman: b\nAssistant:\n"),
           ("prompts.jsonl", load_prompts, b'{"prompt": "Human: a\\nAssistant:"}\n'),
           ("docs.txt", load_documents, b"one document\n\nanother one\n"),
           ("docs.jsonl", load_documents, b'{"text": "a"}\n{"text": "b"}\n'),
           ("pairs.jsonl", load_pairs, (json.dumps(PAIR) + "\n" + json.dumps(PAIR) + "\n").encode()),
           ("pairs.jsonl.gz", load_pairs, gzip.compress((json.dumps(PAIR) + "\n").encode()))]


@pytest.mark.parametrize("name, load, valid", LOADERS, ids=[name for name, _, _ in LOADERS])
def test_data_loaders_read_or_refuse_generated_junk(name, load, valid, tmp_path, capsys):
    outcomes = []
    for seed in SEEDS:
        rng = random.Random(f"{name}-{seed}")
        data = junk_bytes(rng, gzip.decompress(valid) if name.endswith(".gz") else valid)
        path = tmp_path / name
        path.write_bytes(gzip.compress(data) if name.endswith(".gz") and seed % 2 else data)
        outcomes.append(outcome(capsys, lambda: load(str(path))))
    assert "refused" in outcomes  # the junk reached the checks


@pytest.fixture(scope="module")
def checkpoint_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "sft"
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=257, block_size=16, n_layer=1, n_head=1, n_embd=8))
    save(str(folder), model, {"stage": "sft", "model": {"vocab_size": 257, "block_size": 16, "n_layer": 1,
                                                          "n_head": 1, "n_embd": 8},
                              "tokenizer": "bytes", "config": {}, "step": 1, "metrics": {}})
    return {name: (folder / name).read_bytes() for name in ("config.json", "model.pt")}


@pytest.mark.parametrize("target", ["config.json", "model.pt", "both", "config.json as junk JSON", "calibration"])
def test_the_checkpoint_loaders_read_or_refuse_generated_junk(target, checkpoint_files, tmp_path, capsys):
    outcomes = []
    for seed in SEEDS:
        rng = random.Random(f"{target}-{seed}")
        folder = tmp_path / f"case{seed}" / "sft"
        folder.mkdir(parents=True)
        for name, valid in checkpoint_files.items():
            (folder / name).write_bytes(junk_bytes(rng, valid) if target in (name, "both") else valid)
        if target == "config.json as junk JSON":
            meta = json.loads(checkpoint_files["config.json"])
            meta[rng.choice(list(meta))] = junk_json(rng)
            (folder / "config.json").write_text(json.dumps(meta))
        if target == "calibration":
            (folder / "prompts.json").write_bytes(junk_bytes(rng, b'["Human: a\\nAssistant:"]'))
            (folder / "rewards.pt").write_bytes(junk_bytes(rng, checkpoint_files["model.pt"]))
        before = {p.name: p.read_bytes() for p in folder.iterdir()}
        load = (lambda: load_calibration(str(folder))) if target == "calibration" else (lambda: load_model(str(folder)))
        outcomes.append(outcome(capsys, load))
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing written, nothing moved
    assert "refused" in outcomes
