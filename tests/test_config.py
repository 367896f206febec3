"""Flags are checked where they are declared: every entry point refuses a bad value with one sentence
naming the flag, before any work starts."""
import importlib.util
import os

import pytest
import torch

from minialign.lab import experiments
from minialign.config import ConfigError, arg, build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def entry_point(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


TRAIN, DECODE, EXPERIMENTS = entry_point("train"), entry_point("decode"), experiments.main
SFT = ["--stage", "sft"]
BAD = [  # entry point, arguments, the sentence's key words
    (TRAIN, SFT + ["--batch_size", "0"], "--batch_size must be at least 1, not 0"),
    (TRAIN, SFT + ["--steps=-5"], "--steps must be at least 1, not -5"),
    (TRAIN, SFT + ["--lr", "0"], "--lr must be above 0, not 0.0"),
    (TRAIN, SFT + ["--lr", "nan"], "--lr must be above 0, not nan"),
    (TRAIN, SFT + ["--eval_every", "0"], "--eval_every must be at least 1"),
    (TRAIN, SFT + ["--n_layer", "0"], "--n_layer must be at least 1"),
    (TRAIN, SFT + ["--tokenizer", "utf8"], "--tokenizer takes one of auto, bytes, gpt2, not 'utf8'"),
    (TRAIN, ["--stage", "reward", "--label_temperature", "0"], "--label_temperature must be above 0"),
    (TRAIN, ["--stage", "calibrate", "--k", "0"], "--k must be at least 1"),
    (TRAIN, ["--stage", "ctrl", "--group", "1"], "--group must be at least 2"),
    (TRAIN, ["--stage", "ctrl", "--transform", "sqrt"], "--transform takes one of raw, identity, log, exp"),
    (TRAIN, ["--stage", "ctrl", "--beta", "-1"], "--beta must be above 0"),
    (TRAIN, ["--stage"], "--stage needs a value"),
    (TRAIN, ["--force=maybe"], "--force takes true or false, not 'maybe'"),
    (TRAIN, ["--steps", "0"], "--steps must be at least 1"),  # the whole pipeline checks every stage's flags
    (DECODE, ["--top_p", "0"], "--top_p must be above 0"),
    (DECODE, ["--top_p", "1.5"], "--top_p must be at most 1"),
    (DECODE, ["--temperature", "-1"], "--temperature must be at least 0"),
    (DECODE, ["--top_k", "-5"], "--top_k must be at least 0"),
    (DECODE, ["--method", "bon", "--n", "0"], "--n must be at least 1"),
    (DECODE, ["--eval", "--n_eval", "0"], "--n_eval must be at least 1"),
    (DECODE, ["--method", "beam"], "--method takes one of greedy, sample, bon, won, rain, not 'beam'"),
    (DECODE, ["--method", "rain", "--c", "-1"], "--c must be at least 0"),
    (DECODE, ["--method", "rain", "--root_mix", "2"], "--root_mix must be at most 1"),
    (DECODE, ["--method", "rain", "--score", "vote"], "--score takes one of hard, soft"),
    (EXPERIMENTS, ["tilt", "--k", "1"], "--k must be at least 2"),
    (EXPERIMENTS, ["bon", "--n_eval", "0"], "--n_eval must be at least 1"),
]


@pytest.mark.parametrize("main,argv,sentence", BAD, ids=[" ".join(a) for _, a, _ in BAD])
def test_bad_flag_is_one_sentence_before_any_work(main, argv, sentence, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing to find here: a check that ran late would fail differently
    with pytest.raises(ConfigError) as err:
        main(argv)
    assert sentence in str(err.value)
    assert not os.listdir(tmp_path)  # nothing was written


def test_devices_are_checked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="--device takes auto, cpu, cuda or cuda:N, not 'tpu'"):
        TRAIN(SFT + ["--device", "tpu", "--corpus_dialogues", "20"])
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--device cuda: this machine has 0 CUDA device"):
            TRAIN(SFT + ["--device", "cuda", "--corpus_dialogues", "20"])


def test_heads_must_divide_the_embedding(tmp_path):
    with pytest.raises(ConfigError, match=r"--n_embd \(128\) must be a multiple of --n_head \(3\)"):
        TRAIN(SFT + [f"--out_dir={tmp_path}", "--n_head", "3", "--corpus_dialogues", "20"])


def test_bounds_accept_their_edges():
    from dataclasses import dataclass

    @dataclass
    class Probe:
        p: float = arg(0.5, "a probability", above=0, at_most=1)
        k: int = arg(1, "a count", at_least=0)
        mode: str = arg("a", "a choice", one_of=("a", "b"))
    assert build(Probe, {"p": "1", "k": "0", "mode": "b"}) == Probe(1.0, 0, "b")
    for flags in ({"p": "0"}, {"k": "-1"}, {"mode": "c"}):
        with pytest.raises(ConfigError):
            build(Probe, flags)


def test_a_finished_stage_is_replaced_only_with_force(tmp_path):
    small = [f"--out_dir={tmp_path}", "--steps=1", "--n_layer=1", "--n_embd=32", "--block_size=64",
             "--batch_size=2", "--corpus_dialogues=20"]
    TRAIN(SFT + small)
    with pytest.raises(ConfigError, match=r"sft already holds a trained sft stage \(step 1\); pass --force "
                                          r"to replace it, or --resume to continue it"):
        TRAIN(SFT + small[:1] + ["--steps=3"])
    TRAIN(SFT + small + ["--resume"])  # continuing (with the same flags) is allowed
    TRAIN(SFT + small + ["--force"])  # and so is replacing, when asked
    from minialign.checkpoint import load_meta
    assert load_meta(f"{tmp_path}/sft")["step"] == 1


def test_resume_alone_continues_a_run_with_its_own_flags(tmp_path):
    from minialign.checkpoint import load_meta
    TRAIN(SFT + [f"--out_dir={tmp_path}", "--steps=3", "--stop_at=1", "--n_layer=1", "--n_embd=32",
                 "--block_size=64", "--batch_size=2", "--corpus_dialogues=20", "--eval_every=1"])
    TRAIN(SFT + [f"--out_dir={tmp_path}", "--resume"])  # no other flag: the saved ones, not the defaults
    meta = load_meta(f"{tmp_path}/sft")
    assert meta["step"] == 3 and meta["model"]["n_embd"] == 32 and meta["config"]["stop_at"] == 0
    with pytest.raises(ConfigError, match="--n_embd is 64 but .* was trained with 32"):
        TRAIN(SFT + [f"--out_dir={tmp_path}", "--resume", "--n_embd=64"])  # a given flag that changes the run


def test_train_refuses_an_out_dir_another_run_holds(tmp_path):
    import json
    import socket
    with open(tmp_path / ".lock", "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "command": "python train.py"}, f)
    from minialign.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="another run is writing to"):
        TRAIN(SFT + [f"--out_dir={tmp_path}", "--steps=1", "--corpus_dialogues=20"])
    assert sorted(os.listdir(tmp_path)) == [".lock"]
