"""The two entry points: unknown flags list the valid ones; missing checkpoints say what to run; bad
inputs end in one sentence and leave out/ as it was."""
import gzip
import json
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = __file__.rsplit("/tests/", 1)[0]


def run(*args, cwd=None):
    return subprocess.run([sys.executable, *args], cwd=cwd or ROOT, capture_output=True, text=True, timeout=120)


def test_unknown_flag_lists_valid_ones():
    out = run("train.py", "--stage", "sft", "--stepz=3")
    assert out.returncode == 2 and "unknown flag --stepz" in out.stderr and "--steps" in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_value_type_is_one_sentence():
    out = run("train.py", "--stage", "sft", "--steps=many")
    assert out.returncode == 2 and "--steps takes a int" in out.stderr.replace("an int", "a int")


def test_decode_without_checkpoint_says_train_first(tmp_path):
    out = run(f"{ROOT}/decode.py", "--prompt", "hi", f"--out_dir={tmp_path}", cwd=tmp_path)
    assert out.returncode == 2 and "run `python train.py` first" in out.stderr
    assert "Traceback" not in out.stderr


def test_prompt_longer_than_context_is_one_sentence(tmp_path):
    assert run("train.py", "--stage", "sft", f"--out_dir={tmp_path}", "--steps=1", "--n_layer=1", "--n_embd=32",
               "--block_size=64", "--batch_size=2", "--corpus_dialogues=100").returncode == 0
    out = run("decode.py", f"--out_dir={tmp_path}", "--prompt", "x" * 100)
    assert out.returncode == 2 and "context holds only 64" in out.stderr and "Traceback" not in out.stderr


def test_pipeline_reuses_every_finished_stage(tmp_path):
    flags = [f"--out_dir={tmp_path}", "--steps=2", "--n_layer=1", "--n_embd=32", "--corpus_dialogues=100",
             "--batch_size=4", "--eval_every=2", "--n_pairs=16", "--n_prompts=6", "--k=4", "--prompts_per_step=2",
             "--group=2", "--eval_prompts=2", "--eval_samples=2", "--max_new_tokens=12", "--device=cpu"]
    first = run("train.py", *flags)
    assert first.returncode == 0, first.stderr
    assert [f"[{s}] running" in first.stdout for s in ("sft", "reward", "calibrate", "ctrl")] == [True] * 4
    second = run("train.py", *flags)
    assert [f"[{s}] reusing" in second.stdout for s in ("sft", "reward", "calibrate", "ctrl")] == [True] * 4
    assert "BoN_4 inference-time win rate" in second.stdout  # the finished CTRL run's summary


def test_rain_without_a_prompt_decodes_the_demo_prompt_both_ways(tmp_path):
    assert run("train.py", "--stage", "sft", f"--out_dir={tmp_path}", "--steps=1", "--n_layer=1", "--n_embd=32",
               "--batch_size=2", "--corpus_dialogues=100").returncode == 0
    out = run("decode.py", f"--out_dir={tmp_path}", "--method", "rain", "--max_new_tokens=8", "--max_visits=4",
              "--min_new_visits=2")
    assert out.returncode == 0, out.stderr
    assert "demo prompt" in out.stdout and "vanilla (greedy):" in out.stdout and "RAIN:" in out.stdout


# --- bad inputs through the real CLIs: exit code 2, one sentence, no traceback, out/ untouched ---------

def _snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _edit_config(change):
    def edit(out):
        path = out / "sft" / "config.json"
        meta = json.loads(path.read_text())
        path.write_text(json.dumps(change(meta)))
    return edit


def _replace_by_link(path, target):
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    path.symlink_to(target)


def _poison_weights(path):
    weights = torch.load(path, weights_only=True)
    torch.save({key: torch.full_like(value, float("nan")) for key, value in weights.items()}, path)


def _init_folder(folder, safetensors_bytes, **sizes):
    """A GPT-2 folder for --init: a config.json with ``sizes`` and, if given, a model.safetensors."""
    folder.mkdir()
    config = {"vocab_size": 257, "n_positions": 64, "n_layer": 1, "n_head": 2, "n_embd": 32, **sizes}
    (folder / "config.json").write_text(json.dumps(config))
    if safetensors_bytes is not None:
        (folder / "model.safetensors").write_bytes(safetensors_bytes)


def _write(name, content: bytes):
    def write(out):
        (out.parent / name).write_bytes(content)
    return write


BAD_INPUTS = [  # (name, edit of the trained out/ or a file beside it, CLI arguments, words of the sentence)
    ("config.json a list", _edit_config(lambda m: [m]), ["decode.py", "--prompt=hi"], "is a JSON list, not an object"),
    ("config.json without model", _edit_config(lambda m: {k: v for k, v in m.items() if k != "model"}),
     ["decode.py", "--prompt=hi"], "'model' is missing"),
    ("config.json n_head 0", _edit_config(lambda m: {**m, "model": {**m["model"], "n_head": 0}}),
     ["decode.py", "--prompt=hi"], "'model.n_head' should be a positive integer"),
    ("config.json asks for 50 GB", _edit_config(lambda m: {**m, "model": {**m["model"], "n_embd": 65536, "n_layer": 48}}),
     ["decode.py", "--prompt=hi"], "more than the 2e+09 any GPT-2 has"),
    ("config.json GPT-2 vocabulary, bytes tokenizer", _edit_config(lambda m: {**m, "model": {**m["model"], "vocab_size": 50304}}),
     ["decode.py", "--prompt=hi"], "the bytes tokenizer knows only 257 ids"),
    ("config.json sizes unlike the weights", _edit_config(lambda m: {**m, "model": {**m["model"], "n_embd": 64}}),
     ["decode.py", "--prompt=hi"], "does not fit the model its config.json describes"),
    ("data is a folder", lambda out: (out.parent / "folder").mkdir(),
     ["train.py", "--stage=sft", "--data={dir}/folder", "--force"], "is a folder"),
    ("data not UTF-8", _write("bad.txt", b"fine line\n\xff\xfe broken\n"),
     ["train.py", "--stage=sft", "--data={dir}/bad.txt", "--force"], "bad.txt, line 2: not UTF-8 text"),
    ("data gzip cut short", _write("cut.jsonl.gz", gzip.compress(b'{"text": "hello"}\n')[:12]),
     ["train.py", "--stage=sft", "--data={dir}/cut.jsonl.gz", "--force"], "cannot be read"),
    ("one preference pair", _write("one.jsonl", b'{"chosen": "Human: a\\nAssistant: b", "rejected": "Human: a\\nAssistant: c"}\n'),
     ["train.py", "--stage=reward", "--data={dir}/one.jsonl", "--steps=1", "--force"], "holds one preference pair"),
    ("RAIN with no room", lambda out: None, ["decode.py", "--method=rain", "--prompt=" + "x" * 30],
     "RAIN needs room after it"),
    ("RAIN's judge beyond the context", lambda out: None, ["decode.py", "--method=rain", "--prompt=hi",
                                                           "--rollout_tokens=4"], "self-evaluation template"),
    # data files
    ("prompt file of blank lines", _write("blank.txt", b"\n  \n\n"),
     ["train.py", "--stage=calibrate", "--prompts={dir}/blank.txt"], "blank.txt holds no prompts"),
    ("prompt file with an empty prompt", _write("p.jsonl", b'{"prompt": "Human: a\\nAssistant:"}\n{"prompt": " "}\n'),
     ["train.py", "--stage=calibrate", "--prompts={dir}/p.jsonl"], "p.jsonl, line 2: expected a non-empty"),
    ("corpus of one document", _write("one.txt", b"a single document\n"),
     ["train.py", "--stage=sft", "--data={dir}/one.txt", "--force"], "holds 1 document; SFT holds out"),
    ("corpus of none", _write("none.txt", b"\n\n"), ["train.py", "--stage=sft", "--data={dir}/none.txt", "--force"],
     "none.txt holds no documents"),
    ("ctrl --eval_data missing", lambda out: None, ["train.py", "--stage=ctrl", "--eval_data={dir}/missing.txt"],
     "missing.txt does not exist"),
    ("ctrl --eval_data empty", _write("empty.txt", b""), ["train.py", "--stage=ctrl", "--eval_data={dir}/empty.txt"],
     "empty.txt holds no prompts"),
    # checkpoints
    ("config.json nested 100,000 deep", lambda out: (out / "sft" / "config.json").write_text("[" * 100_000 + "]" * 100_000),
     ["decode.py", "--prompt=hi"], "nested too deeply"),
    ("config.json a link to /dev/zero", lambda out: _replace_by_link(out / "sft" / "config.json", "/dev/zero"),
     ["decode.py", "--prompt=hi"], "not a regular file"),
    ("model.pt all nan", lambda out: _poison_weights(out / "sft" / "model.pt"), ["decode.py", "--prompt=hi"],
     "weights that are not finite"),
    ("--resume with another stage's state.pt", lambda out: torch.save({"optimizer": {"state": {}, "param_groups": []},
                                                                        "step": 1}, out / "sft" / "state.pt"),
     ["train.py", "--stage=sft", "--resume"], "is not this stage's resume state"),
    ("--init whose header lies", lambda out: _init_folder(out.parent / "init", b"\x40\x00\x00\x00\x00\x00\x00\x00{}"),
     ["train.py", "--stage=sft", "--init={dir}/init", "--tokenizer=bytes", "--force"], "could not be read as safetensors"),
    ("--init with a float size", lambda out: _init_folder(out.parent / "init", None, n_embd=64.0),
     ["train.py", "--stage=sft", "--init={dir}/init", "--tokenizer=bytes", "--force"], "'n_embd' should be a positive integer"),
    ("--init of 2**31 dimensions", lambda out: _init_folder(out.parent / "init", None, n_embd=2**31),
     ["train.py", "--stage=sft", "--init={dir}/init", "--tokenizer=bytes", "--force"], "more than the 2e+09 any GPT-2 has"),
    # filesystem
    ("out/sft a symbolic link loop", lambda out: _replace_by_link(out / "sft", "sft"),
     ["train.py", "--stage=sft", "--force"], "a symbolic link that leads nowhere"),
    ("--trace below a file", _write("afile", b"x"), ["decode.py", "--method=rain", "--trace={dir}/afile/trace.html"],
     "lies below"),
    # flags
    ("best-of-100,000,000", lambda out: None, ["decode.py", "--method=bon", "--n=100000000", "--prompt=hi"],
     "GiB free on cpu: ask for fewer samples"),
    ("RAIN --candidates 300", lambda out: None, ["decode.py", "--method=rain", "--prompt=hi", "--candidates=300"],
     "--candidates is 300, more than the model's vocabulary of 257"),
    ("RAIN --max_children 1000000", lambda out: None, ["decode.py", "--method=rain", "--prompt=hi", "--max_children=1000000"],
     "--max_children is 1000000, more than the model's vocabulary"),
    ("RAIN --set_lengths abc", lambda out: None, ["decode.py", "--method=rain", "--set_lengths=abc"],
     "--set_lengths takes comma-separated token-set lengths"),
    ("--temperature nan", lambda out: None, ["decode.py", "--method=sample", "--temperature=nan"],
     "--temperature must be a number, not nan"),
]


@pytest.fixture(scope="module")
def trained_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "out"
    result = run("train.py", "--stage", "sft", f"--out_dir={out}", "--steps=1", "--n_layer=1", "--n_embd=32",
                 "--block_size=64", "--batch_size=2", "--corpus_dialogues=100")
    assert result.returncode == 0, result.stderr
    result = run("train.py", "--stage", "reward", f"--out_dir={out}", "--steps=1", "--n_pairs=16", "--batch_size=2",
                 "--micro_batch=2")
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("name, edit, args, sentence", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_one_sentence_and_out_is_untouched(name, edit, args, sentence, trained_out, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained_out, out)
    edit(out)
    before = _snapshot(out)
    result = run(*[a.format(dir=tmp_path) for a in args], f"--out_dir={out}")
    assert result.returncode == 2, result.stderr
    assert sentence in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert _snapshot(out) == before


def test_a_reply_cut_at_the_context_limit_says_so(trained_out):
    long = run("decode.py", f"--out_dir={trained_out}", "--prompt=" + "x" * 40, "--max_new_tokens=100")
    assert long.returncode == 0 and "reached the model's context limit (64 tokens" in long.stdout
    short = run("decode.py", f"--out_dir={trained_out}", "--prompt=hi", "--max_new_tokens=5")
    assert short.returncode == 0 and "context limit" not in short.stdout



def test_eval_prints_as_many_examples_as_show_asks(tmp_path):
    assert run("train.py", "--stage", "sft", f"--out_dir={tmp_path}", "--steps=1", "--n_layer=1", "--n_embd=32",
               "--batch_size=2", "--corpus_dialogues=100").returncode == 0
    for show in (0, 2):
        result = run("decode.py", f"--out_dir={tmp_path}", "--eval", "--n_eval=2", f"--show={show}",
                     "--max_new_tokens=4")
        assert result.returncode == 0, result.stderr
        assert result.stdout.count("    -> ") == show and "6 held-out prompts" in result.stdout


def test_decoders_take_the_precision_flag(trained_out):
    for flag, name in (("true", "bf16"), ("false", "fp32")):
        result = run("decode.py", f"--out_dir={trained_out}", "--prompt=hi", "--max_new_tokens=4", f"--bf16={flag}")
        assert result.returncode == 0, result.stderr
        assert f"method: greedy, {name} on CPU" in result.stdout and "Assistant:" in result.stdout
    bad = run("decode.py", f"--out_dir={trained_out}", "--prompt=hi", "--bf16=maybe")
    assert bad.returncode == 2 and "--bf16 takes auto, true or false" in bad.stderr and "Traceback" not in bad.stderr


# --- the same families where the case needs its own command line --------------------------------------

def _refused(result, sentence):
    assert result.returncode == 2, result.stderr
    assert sentence in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_empty_or_unusable_out_dir_is_refused_before_any_work(tmp_path):
    _refused(run("train.py", "--stage=sft", "--out_dir="), "--out_dir needs a file or folder name")
    _refused(run("decode.py", "--prompt=hi", "--out_dir="), "--out_dir needs a file or folder name")
    (tmp_path / "afile").write_text("not a folder")
    _refused(run("train.py", "--stage=sft", f"--out_dir={tmp_path}/afile"), "which is a file, not a folder")
    _refused(run("train.py", f"--out_dir={tmp_path}/afile"), "which is a file, not a folder")  # the whole pipeline
    assert (tmp_path / "afile").read_text() == "not a folder"


def test_experiments_and_bench_refuse_an_output_they_could_not_write(trained_out, tmp_path):
    (tmp_path / "afile").write_text("x")
    _refused(run("-m", "minialign.lab", "bench", f"--out={tmp_path}/afile/bench.json"), "lies below")
    _refused(run("-m", "minialign.lab", "sft", f"--out_dir={tmp_path}/afile"), "is a file, not a folder")


def test_a_lock_holding_json_that_is_not_a_lock_is_taken_over(trained_out, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained_out, out)
    (out / ".lock").write_text("[1, 2]")
    result = run("train.py", "--stage=sft", f"--out_dir={out}", "--force", "--steps=1", "--n_layer=1", "--n_embd=32",
                 "--block_size=64", "--batch_size=2", "--corpus_dialogues=100")
    assert result.returncode == 0, result.stderr
    assert not (out / ".lock").exists()  # released at the end, as a lock of its own


def test_ctrl_c_says_what_was_kept_and_how_to_resume(tmp_path):
    import signal
    import time
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "train.py", "--stage=sft", f"--out_dir={out}", "--steps=100000",
                             "--eval_every=1", "--n_layer=1", "--n_embd=32", "--block_size=64", "--batch_size=2",
                             "--corpus_dialogues=100"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True,  # Ctrl-C's default action even where pytest runs as a background job (ignored)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (out / "sft" / "config.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    last = stderr.strip().splitlines()[-1]  # above it: the progress bar
    assert proc.returncode == 130 and "Traceback" not in stderr
    assert last.startswith("stopped by Ctrl-C in the sft stage; ") and "keeps its last checkpoint (step " in last
    assert "continue with `python train.py --stage sft --resume`" in last


def test_a_closed_output_pipe_ends_quietly(trained_out):
    proc = subprocess.Popen([sys.executable, "decode.py", f"--out_dir={trained_out}", "--eval", "--n_eval=1",
                             "--max_new_tokens=4"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # as `| head -0` would
    stderr = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert proc.returncode == 141 and stderr.strip() == "", stderr
