"""The SFT stage: exact resume, atomic checkpoints, clear errors for bad input."""
import json
import os

import pytest
import torch

from minialign.checkpoint import CheckpointError, load_model
from minialign.data import DataError, load_pairs
from minialign.config import ConfigError
from minialign.sft import SFTConfig, train_sft
from minialign.training import TrainingError

SMALL = dict(n_layer=1, n_head=2, n_embd=32, block_size=64, batch_size=4, corpus_dialogues=200,
             eval_every=100, lr=1e-3, warmup=2)


def params(folder):
    return load_model(folder)[0].state_dict()


def test_resume_is_bit_identical(tmp_path):
    train_sft(SFTConfig(out_dir=str(tmp_path / "a"), steps=6, **SMALL))
    train_sft(SFTConfig(out_dir=str(tmp_path / "b"), steps=6, stop_at=3, **SMALL))
    assert json.load(open(tmp_path / "b/sft/config.json"))["step"] == 3
    train_sft(SFTConfig(out_dir=str(tmp_path / "b"), steps=6, resume=True, **SMALL))
    a, b = params(tmp_path / "a/sft"), params(tmp_path / "b/sft")
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = params(tmp_path / "a/sft")
    train_sft(SFTConfig(out_dir=str(tmp_path / "c"), steps=6, seed=1, **SMALL))
    assert not all(torch.equal(c[k], v) for k, v in params(tmp_path / "c/sft").items())  # the check can fail


def test_corrupt_checkpoint_is_one_sentence(tmp_path):
    train_sft(SFTConfig(out_dir=str(tmp_path), steps=1, **SMALL))
    with open(tmp_path / "sft/model.pt", "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="model.pt is not a readable checkpoint"):
        load_model(str(tmp_path / "sft"))


def test_missing_checkpoint_says_what_to_run(tmp_path):
    with pytest.raises(CheckpointError, match="run `python train.py"):
        load_model(str(tmp_path / "sft"))


def test_broken_jsonl_line_is_named(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"chosen": "Human: a\\nAssistant: b", "rejected": "Human: a\\nAssistant: c"}\n{"chosen": \n')
    with pytest.raises(DataError, match=r"pairs.jsonl, line 2"):
        load_pairs(str(path))


def test_failed_save_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    train_sft(SFTConfig(out_dir=str(tmp_path), steps=2, **SMALL))
    before = params(tmp_path / "sft")

    def broken_dump(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(json, "dump", broken_dump)
    with pytest.raises(OSError):
        train_sft(SFTConfig(out_dir=str(tmp_path), steps=4, **SMALL))
    after = params(tmp_path / "sft")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".sft")]  # no temp folders left behind


def test_non_finite_gradient_stops_before_the_weights_or_checkpoint_change(tmp_path):
    train_sft(SFTConfig(out_dir=str(tmp_path), steps=2, **SMALL))
    before = params(tmp_path / "sft")
    with pytest.raises(TrainingError, match=r"sft step \d+: the gradient is (nan|inf).*--lr \(now 1e\+12\)"):
        train_sft(SFTConfig(out_dir=str(tmp_path), steps=8, **{**SMALL, "lr": 1e12}))
    after = params(tmp_path / "sft")
    assert all(torch.equal(before[k], after[k]) for k in before)  # the diverged run never saved
    with pytest.raises(TrainingError):  # checkpoints at every step: each one written is finite
        train_sft(SFTConfig(out_dir=str(tmp_path), steps=8, **{**SMALL, "lr": 1e12, "eval_every": 1}))
    assert all(torch.isfinite(v).all() for v in params(tmp_path / "sft").values())


def test_resume_refuses_flags_that_change_the_run(tmp_path):
    train_sft(SFTConfig(out_dir=str(tmp_path), steps=6, stop_at=2, **SMALL))
    for change, sentence in ((dict(steps=9), "--steps is 9 but"), (dict(n_embd=64), "--n_embd is 64 but"),
                             (dict(lr=5e-3), "--lr is 0.005 but")):
        with pytest.raises(ConfigError, match=sentence + ".*trained with"):
            train_sft(SFTConfig(out_dir=str(tmp_path), resume=True, **{"steps": 6, **SMALL, **change}))
    train_sft(SFTConfig(out_dir=str(tmp_path), steps=6, stop_at=4, resume=True, **{**SMALL, "eval_every": 1}))
    assert load_model(str(tmp_path / "sft"))[1]["step"] == 4  # when it stops and saves may change
