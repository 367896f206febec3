"""Data parallelism with torch DDP: ``torchrun --nproc_per_node=N train.py ...``.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; ``setup`` then joins the process group (NCCL on GPU,
gloo on CPU) and pins each rank to its GPU. A plain ``python train.py`` sees no such variables and
runs as a single process with no launcher and no process group.

How the stages use it: every rank draws the same *global* batch from the same seeded generator and
keeps its own rows (``shard``); DDP averages gradients across ranks, and each rank normalises its loss
by the global batch's weight, so N processes take exactly the step one process takes on the whole
batch. Rank 0 alone writes checkpoints, logs and progress bars.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: torch.device) -> Dist:
    """Join the torchrun process group if there is one; otherwise a single process on ``device``."""
    if "RANK" not in os.environ:
        return Dist(device=device)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return Dist(rank, world_size, device)


def wrap(model: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """The model DDP-wrapped when running distributed (gradients averaged across ranks), else as is."""
    if not d.enabled:
        return model
    ids = [d.device.index] if d.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def wait_for_rank0(d: Dist) -> None:
    """A barrier at the end of a stage: no rank goes on to the next stage (which reads this stage's
    checkpoint) before rank 0 has written it."""
    if d.enabled:
        dist.barrier()


def shard(rows, d: Dist):
    """This rank's share of a global batch (tensor rows or a list): rows rank, rank + N, ..."""
    return rows[d.rank::d.world_size]
