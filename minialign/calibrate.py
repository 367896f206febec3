"""Stage 3, calibration (the "C" in CTRL): K reference rewards per training prompt, sorted and cached.

InfAlign's calibrated reward C_hat(x, y) is y's win rate against pi_ref's samples for the same prompt
(``calibrated_reward.calibrated``). It needs, per prompt, the rewards of K reference responses: this
stage samples them once from pi_ref, scores them with r, sorts them and caches them in
``out/calibration`` (``rewards.pt`` and the prompts), so CTRL computes C_hat with two ``searchsorted``
calls per step and never samples pi_ref again.
"""
import json
import os
import random
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from . import world
from .checkpoint import CheckpointError, load_model, newest_copy, world_seed, write_folder
from .config import arg, named
from .data import load_prompts
from .distributed import setup, wait_for_rank0
from .reward_model import REWARDS, reward_function
from .sampling import complete
from .tokenizer import get_tokenizer
from .training import pick_device


@dataclass
class CalibrateConfig:
    out_dir: str = arg("out", "checkpoints root (reads sft and reward, writes <out_dir>/calibration)", form=named)
    reward: str = arg("model", "the reward calibrated: model (out/reward), gold (the world's; writes "
                               "<out_dir>/calibration_gold) or scaled (out/reward times a per-prompt scale; "
                               "<out_dir>/calibration_scaled)", one_of=REWARDS)
    prompts: str = arg("", "prompt file (.jsonl with a prompt field, or one per line); '' = world train prompts")
    n_prompts: int = arg(192, "training prompts to calibrate (and later train CTRL on)", at_least=3)
    k: int = arg(32, "reference samples per prompt (K)", at_least=1)
    temperature: float = arg(1.0, "sampling temperature of pi_ref", above=0)
    max_new_tokens: int = arg(128, "longest reference response", at_least=1)
    seed: int = arg(0, "seed of the prompt subset and the reference samples")
    device: str = arg("auto", "auto, cpu or cuda")


def training_prompts(cfg: CalibrateConfig) -> list[str]:
    """The CTRL training prompts: a file's, or a seeded subset of the world's train prompts with as many
    of each kind, benign ones spread over the tasks."""
    if cfg.prompts:
        return load_prompts(cfg.prompts)[: cfg.n_prompts]
    rng = random.Random(cfg.seed)
    train = world.prompts("train", world_seed(cfg.out_dir))
    return [p.text for kind in world.KIND_MIX
            for p in world.spread_over_tasks([p for p in train if p.kind == kind], cfg.n_prompts // 3, rng)]


def calibration_folder(out_dir: str, reward: str) -> str:
    """Where the calibration of the reward model (``model``), of the gold reward (``gold``) or of the
    per-prompt scaled reward model (``scaled``) lives."""
    return f"{out_dir}/calibration" + ("" if reward == "model" else f"_{reward}")


def load_calibration(folder: str) -> tuple[list[str], torch.Tensor]:
    """(prompts, sorted reference rewards (P, K)) from a calibration folder."""
    folder = newest_copy(folder) or folder  # after a crash mid-swap, the newest complete copy
    try:
        with open(os.path.join(folder, "prompts.json")) as f:
            prompts = json.load(f)
        rewards = torch.load(os.path.join(folder, "rewards.pt"), weights_only=True)
    except Exception as err:  # missing, truncated, not JSON, not a tensor file (a pickle error is none of the above)
        raise CheckpointError(f"no usable calibration in {folder} ({type(err).__name__}): "
                              "run `python train.py --stage calibrate --force` to write it again.") from None
    if not (isinstance(prompts, list) and isinstance(rewards, torch.Tensor) and rewards.dim() == 2
            and rewards.size(0) == len(prompts)):
        raise CheckpointError(f"the calibration in {folder} does not match its prompts (one row of rewards per "
                              "prompt): run `python train.py --stage calibrate --force` to write it again.")
    return prompts, rewards


def run_calibration(cfg: CalibrateConfig) -> dict:
    """Sample K responses per prompt from pi_ref, score them with r, cache the sorted rewards.

    Under torchrun rank 0 does the sampling (a short job next to training, and one generator stream
    gives the same cache as a single process) while the other ranks wait for the files."""
    d = setup(pick_device(cfg.device))
    if not d.is_main:
        wait_for_rank0(d)  # released once rank 0 has written the calibration
        return {}
    device = d.device
    prompts = training_prompts(cfg)  # first: a bad prompt file stops the stage before anything loads
    policy, meta = load_model(f"{cfg.out_dir}/sft")
    policy.to(device).eval()
    tokenizer = get_tokenizer(meta["tokenizer"])
    reward = reward_function(cfg.reward, cfg.out_dir, device, tokenizer)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    rewards = torch.empty(len(prompts), cfg.k)
    per_batch = max(1, 256 // cfg.k)  # prompts per batch: about 256 sequences decoded together
    for i in tqdm(range(0, len(prompts), per_batch), desc="calibrate", dynamic_ncols=True):
        group = [p for p in prompts[i: i + per_batch] for _ in range(cfg.k)]
        responses = complete(policy, tokenizer, group, cfg.max_new_tokens, batch_size=len(group),
                             temperature=cfg.temperature, generator=generator)
        rewards[i: i + per_batch] = reward(group, responses).view(-1, cfg.k)
    summary = {"prompts": len(prompts), "k": cfg.k, "reward_mean": round(float(rewards.mean()), 4),
               "reward_std": round(float(rewards.std()), 4)}

    def write(tmp: str) -> None:  # the three files appear together, or not at all
        torch.save(rewards.sort(dim=1).values, os.path.join(tmp, "rewards.pt"))
        with open(os.path.join(tmp, "prompts.json"), "w") as f:
            json.dump(prompts, f)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({"stage": "calibrate", "config": asdict(cfg), "precision": "fp32", "metrics": summary}, f, indent=2)
    write_folder(calibration_folder(cfg.out_dir, cfg.reward), write)
    print(f"calibration: {summary}")
    wait_for_rank0(d)
    return summary
