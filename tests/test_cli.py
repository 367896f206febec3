"""The two entry points: unknown flags list the valid ones; missing checkpoints say what to run."""
import subprocess
import sys

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
