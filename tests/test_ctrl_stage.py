"""The CTRL stage on tiny world checkpoints: it runs after sft -> reward -> calibrate, and resuming
from a checkpoint gives the parameters of an uninterrupted run."""
import os

import pytest
import torch

from minialign import experiments, world
from minialign.calibrate import CalibrateConfig, load_calibration, run_calibration
from minialign.config import ConfigError
from minialign.checkpoint import load_model
from minialign.ctrl import CTRLConfig, train_ctrl
from minialign.reward import RewardConfig, train_reward
from minialign.reward_model import reward_function
from minialign.sft import SFTConfig, train_sft

TINY = dict(device="cpu")
RL = dict(prompts_per_step=2, group=2, max_new_tokens=12, eval_prompts=2, eval_samples=2, steps=4, save_every=2)


def test_ctrl_resume_matches_an_uninterrupted_run(tmp_path):
    out = str(tmp_path)
    train_sft(SFTConfig(out_dir=out, n_layer=1, n_head=2, n_embd=32, block_size=256, batch_size=2, steps=2,
                        corpus_dialogues=100, eval_every=2, **TINY))
    train_reward(RewardConfig(out_dir=out, n_pairs=16, steps=2, batch_size=4, eval_every=2, **TINY))
    run_calibration(CalibrateConfig(out_dir=out, n_prompts=6, k=4, max_new_tokens=12, **TINY))
    summary = train_ctrl(CTRLConfig(out_dir=out, name="full", **RL, **TINY))[1]
    assert {"kl", "bon4_r", "won4_r", "bon4_gold", "won4_gold", "harm_rate", "help_rate"} <= set(summary)
    first = CTRLConfig(out_dir=out, name="split", **{**RL, "steps": 2}, **TINY)
    train_ctrl(first)
    train_ctrl(CTRLConfig(out_dir=out, name="split", resume=True, **RL, **TINY))
    a, b = load_model(f"{out}/full")[0].state_dict(), load_model(f"{out}/split")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ref = load_model(f"{out}/sft")[0].state_dict()
    assert not all(torch.equal(a[k], ref[k]) for k in a)  # RL moved the policy
    # the tilt experiment end to end on these checkpoints: tables, plot, and the trained policy beside its optima
    experiments.main(["tilt", f"--out_dir={out}", "--n_eval=1", "--k=4", "--ctrl=full,split", "--device=cpu"])
    for name in ("tilt.md", "tilt.csv", "tilt_reward_quality.md", "tilt_trained.md"):
        assert os.path.getsize(f"{out}/{name}") > 0
    trained = open(f"{out}/tilt_trained.md").read()
    assert trained.count("| trained |") == 2 and trained.count("optimum at beta 20") == 2
    # r := gold, a perfect reward model: its own calibration, and CTRL judged by the reward it was trained on
    run_calibration(CalibrateConfig(out_dir=out, reward="gold", n_prompts=6, k=4, max_new_tokens=12, **TINY))
    assert load_calibration(f"{out}/calibration_gold")[0] == load_calibration(f"{out}/calibration")[0]
    gold = train_ctrl(CTRLConfig(out_dir=out, name="gold", reward="gold", **RL, **TINY))[1]
    assert all(gold[f"{key}_r"] == gold[f"{key}_gold"] for key in ("win_rate", "bon4", "won4"))
    assert all(summary[f"{key}_r"] != summary[f"{key}_gold"] for key in ("win_rate",))  # r is not gold
    experiments.main(["tilt", f"--out_dir={out}", "--n_eval=1", "--k=4", "--ctrl=gold", "--device=cpu"])
    assert "trained on gold, against its exact optima (selected by gold)" in open(f"{out}/tilt_trained.md").read()


def test_the_gold_reward_function_is_the_worlds_gold_reward():
    prompt = world.eval_prompts(1, 0)[0].text
    replies = ["Happy to help. It is green.", "I can't help with that.", "zzz"]
    assert reward_function("gold", "unused", "cpu", None)([prompt] * 3, replies).tolist() == pytest.approx(
        [world.gold_reward(prompt, y) for y in replies])
    with pytest.raises(ConfigError, match="--reward gold grades the world's prompts only"):
        reward_function("gold", "unused", "cpu", None)(["Human: not a world question\nAssistant:"], ["x"])


def test_infalign_sweep_runs_and_tabulates_both_judges(tmp_path, monkeypatch):
    out = str(tmp_path)
    train_sft(SFTConfig(out_dir=out, n_layer=1, n_head=2, n_embd=32, block_size=256, batch_size=2, steps=2,
                        corpus_dialogues=100, eval_every=2, **TINY))
    train_reward(RewardConfig(out_dir=out, n_pairs=16, steps=2, batch_size=4, eval_every=2, **TINY))
    run_calibration(CalibrateConfig(out_dir=out, n_prompts=6, k=4, max_new_tokens=12, **TINY))
    monkeypatch.setattr(experiments, "SWEEP", {("exp", 4.0): (20.0,)})
    rows = experiments.infalign_sweep(experiments.ExperimentConfig(out_dir=out, ctrl_steps=1, eval_prompts=1,
                                                                  eval_samples=2, device="cpu"))
    assert len(rows) == 1 and {"bon4_r", "bon4_gold", "kl"} <= set(rows[0])
    assert "| exp(+4) | 20 |" in open(f"{out}/infalign.md").read()
