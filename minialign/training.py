"""What every training stage shares: device and precision, the optimizer and its schedule, logging.

Kept deliberately small: each stage (``sft.py``, ``reward.py``, ``ctrl.py``) writes its own loop top
to bottom and calls these helpers for the parts that are the same everywhere.
"""
import contextlib
import json
import math
import os
import time

import torch


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` is CUDA when present, else CPU; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on the given device (the loss is still computed in fp32 by the callers)."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device):
    """AdamW with weight decay on matrices only (not on biases, LayerNorms); fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def cosine_lr(step: int, total: int, lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay to ``min_ratio * lr`` at ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class MetricsLog:
    """Append-only JSONL of metrics (``out/logs/<stage>.jsonl``), one object per line, with wall time."""

    def __init__(self, path: str, enabled: bool = True):
        self.path, self.enabled, self.start = path, enabled, time.time()
        if enabled:
            os.makedirs(os.path.dirname(path), exist_ok=True)

    def write(self, **metrics) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": round(time.time() - self.start, 2), **metrics}) + "\n")
