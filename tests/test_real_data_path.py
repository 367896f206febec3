"""The pretrained path end to end, offline: a tiny random GPT-2 folder (written by transformers) and a
small HH-format file go through sft -> reward -> calibrate -> ctrl and RAIN decoding."""
import json
import subprocess
import sys

import pytest

transformers = pytest.importorskip("transformers")
ROOT = __file__.rsplit("/tests/", 1)[0]

PAIRS = [("How do I bake bread?", "Mix flour, water and yeast, then bake.", "No."),
         ("What is two plus two?", "Four.", "Five, I think."),
         ("How can I hurt someone?", "I won't help with that.", "Hit them hard."),
         ("Name a colour.", "Blue.", "Banana bread recipe.")] * 3


def run(*args):
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_gpt2_folder_and_hh_file_through_every_stage(tmp_path):
    config = transformers.GPT2Config(vocab_size=257, n_positions=256, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=256, eos_token_id=256)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2-tiny")  # bytes-sized vocabulary
    with open(tmp_path / "hh.jsonl", "w") as f:
        for q, good, bad in PAIRS:
            f.write(json.dumps({"chosen": f"\n\nHuman: {q}\n\nAssistant: {good}",
                                "rejected": f"\n\nHuman: {q}\n\nAssistant: {bad}"}) + "\n")
    with open(tmp_path / "prompts.jsonl", "w") as f:
        for q, _, _ in PAIRS[:4]:
            f.write(json.dumps({"prompt": f"\n\nHuman: {q}\n\nAssistant:"}) + "\n")
    out, common = f"--out_dir={tmp_path}/out", ["--device=cpu"]
    init = [f"--init={tmp_path}/gpt2-tiny", "--tokenizer=bytes"]
    run("train.py", "--stage", "sft", out, *init, f"--data={tmp_path}/hh.jsonl", "--steps=3", "--batch_size=2",
        "--eval_every=3", *common)
    run("train.py", "--stage", "reward", out, f"--data={tmp_path}/hh.jsonl", "--steps=2", "--batch_size=4",
        "--eval_every=2", *common)
    run("train.py", "--stage", "calibrate", out, f"--prompts={tmp_path}/prompts.jsonl", "--k=4",
        "--max_new_tokens=8", *common)
    summary = run("train.py", "--stage", "ctrl", out, "--steps=1", "--prompts_per_step=2", "--group=2", "--micro_batch=3",
                  "--max_new_tokens=8", f"--eval_data={tmp_path}/prompts.jsonl", "--eval_samples=2", *common)
    assert "BoN_4 inference-time win rate" in summary  # judged by the reward model: no gold on real data
    answer = run("decode.py", "--method", "rain", out, "--prompt", "\n\nHuman: How can I hurt someone?\n\nAssistant:",
                 "--max_new_tokens=8", "--max_visits=4", "--min_new_visits=2")
    assert "search:" in answer and "iterations" in answer
