"""torch DDP on CPU (gloo): two ranks end with identical parameters, equal to one process on the same
global batch; and the whole pipeline runs under two ranks."""
import os
import shutil
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from minialign.calibrate import CalibrateConfig, run_calibration
from minialign.checkpoint import load_model
from minialign.ctrl import CTRLConfig, train_ctrl
from minialign.reward import RewardConfig, train_reward
from minialign.sft import SFTConfig, train_sft

CFG = dict(n_layer=1, n_head=2, n_embd=32, block_size=64, batch_size=8, corpus_dialogues=200, eval_every=100,
           lr=1e-3, warmup=2, steps=4, bf16=False, device="cpu")


def join(rank: int, port: int) -> None:
    """What torchrun does for a rank: the environment that ``distributed.setup`` reads."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)


def worker(rank: int, port: int, out: str) -> None:
    join(rank, port)
    model, _ = train_sft(SFTConfig(out_dir=out, **CFG))
    torch.save(model.state_dict(), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_match_one_process(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    single, _ = train_sft(SFTConfig(out_dir=str(tmp_path / "single"), **CFG))
    r0 = torch.load(tmp_path / "ddp/rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "ddp/rank1.pt", weights_only=True)
    start = train_sft(SFTConfig(out_dir=str(tmp_path / "zero"), **{**CFG, "steps": 1, "lr": 0.0}))[0].state_dict()
    for key, value in single.state_dict().items():
        assert torch.equal(r0[key], r1[key]), key  # the ranks agree exactly
        torch.testing.assert_close(r0[key], value, rtol=1e-4, atol=1e-5)  # and match one process
    assert any(not torch.equal(start[k], v) for k, v in r0.items())  # training moved the weights


CALIBRATE = dict(n_prompts=6, k=4, max_new_tokens=12, device="cpu")


def pipeline_worker(rank: int, port: int, out: str) -> None:
    join(rank, port)
    train_sft(SFTConfig(out_dir=out, **{**CFG, "block_size": 256, "steps": 2}))
    train_reward(RewardConfig(out_dir=out, n_pairs=16, steps=2, batch_size=4, eval_every=2, device="cpu"))
    run_calibration(CalibrateConfig(out_dir=out, **CALIBRATE))
    policy, _ = train_ctrl(CTRLConfig(out_dir=out, prompts_per_step=4, group=2, micro_batch=2, max_new_tokens=12,
                                      steps=2, eval_prompts=2, eval_samples=2, device="cpu"))
    torch.save(policy.state_dict(), f"{out}/ctrl_rank{rank}.pt")
    dist.destroy_process_group()


def test_pipeline_under_two_ranks(tmp_path):
    """sft -> reward -> calibrate -> ctrl as ``torchrun --nproc_per_node=2 train.py`` runs it: the
    calibration (rank 0 samples, rank 1 waits) equals a single process's, and the CTRL ranks, which
    draw different rollouts, stay identical because DDP averages their gradients."""
    out = tmp_path / "ddp"
    mp.spawn(pipeline_worker, args=(free_port(), str(out)), nprocs=2, join=True)
    single = tmp_path / "single"
    for stage in ("sft", "reward"):
        shutil.copytree(out / stage, single / stage)
    run_calibration(CalibrateConfig(out_dir=str(single), **CALIBRATE))
    assert torch.equal(torch.load(out / "calibration/rewards.pt", weights_only=True),
                       torch.load(single / "calibration/rewards.pt", weights_only=True))
    r0 = torch.load(out / "ctrl_rank0.pt", weights_only=True)
    r1 = torch.load(out / "ctrl_rank1.pt", weights_only=True)
    reference = load_model(str(out / "sft"))[0].state_dict()
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    assert any(not torch.equal(r0[k], reference[k]) for k in r0)  # RL moved the policy
