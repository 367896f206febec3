"""torch DDP on CPU (gloo): two ranks end with identical parameters, equal to one process on the same
global batch."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from minialign.sft import SFTConfig, train_sft

CFG = dict(n_layer=1, n_head=2, n_embd=32, block_size=64, batch_size=8, corpus_dialogues=200, eval_every=100,
           lr=1e-3, warmup=2, steps=4, bf16=False, device="cpu")


def worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
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
