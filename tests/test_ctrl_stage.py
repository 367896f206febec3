"""The CTRL stage on tiny world checkpoints: it runs after sft -> reward -> calibrate, and resuming
from a checkpoint gives the parameters of an uninterrupted run."""
import torch

from minialign.calibrate import CalibrateConfig, run_calibration
from minialign.checkpoint import load_model
from minialign.ctrl import CTRLConfig, train_ctrl
from minialign.reward import RewardConfig, train_reward
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
