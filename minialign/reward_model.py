"""The reward model r(x, y): a GPT trunk with a scalar head, and how every stage reads it.

Read-out convention (one for training, calibration, RL and evaluation): the text
``prompt + " " + response`` is followed by one end-of-text token, and the reward is the head applied
to the trunk's final hidden state *at that token*. Batches are right-padded, and the read-out index
is each row's own end-of-text position, never a padding position (a known pitfall in RLHF code).

Scoring is decoder-side (best-of-N and worst-of-N decoding, ``best_of_n``; calibration, RL rewards);
training it is a stage (``reward.py``).
"""
import zlib

import torch
import torch.nn as nn

from . import world
from .checkpoint import load_meta, load_weights
from .config import ConfigError
from .data import right_pad
from .model import GPT, GPTConfig, check_cache_fits
from .sampling import complete
from .tokenizer import Tokenizer
from .training import autocast


def reward_text(prompt: str, response: str) -> str:
    """The scored text: the prompt, one space, the response without surrounding whitespace."""
    return f"{prompt} {response.strip()}"


class RewardModel(nn.Module):
    """GPT trunk + linear head on the hidden state at the appended end-of-text token."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.trunk = GPT(config)
        self.head = nn.Linear(config.n_embd, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Rewards (B,) for right-padded ids (B, T) whose row b ends with end-of-text at lengths[b] - 1."""
        h = self.trunk.hidden(ids)  # (B, T, C)
        last = h[torch.arange(ids.size(0), device=ids.device), lengths - 1]  # (B, C) at each row's EOT
        return self.head(last).squeeze(-1).float()


def encode_batch(tokenizer: Tokenizer, prompts: list[str], responses: list[str], block_size: int,
                 device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) ids of ``reward_text`` + end-of-text, and each row's length (B,).

    A text longer than the context keeps its last ``block_size`` tokens (the response end matters most).
    """
    rows = [(tokenizer.encode(reward_text(p, r)) + [tokenizer.eot])[-block_size:] for p, r in zip(prompts, responses)]
    return right_pad(rows, tokenizer.eot, device)


@torch.no_grad()
def score(model: RewardModel, tokenizer: Tokenizer, prompts: list[str], responses: list[str],
          batch_size: int = 32, bf16: bool = False) -> torch.Tensor:
    """Rewards (N,) for N (prompt, response) pairs, in batches of texts of similar length (less padding)."""
    device = model.head.weight.device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
    rewards = torch.empty(len(prompts))
    for i in range(0, len(order), batch_size):
        batch = order[i: i + batch_size]
        ids, lengths = encode_batch(tokenizer, [prompts[j] for j in batch], [responses[j] for j in batch],
                                    model.trunk.config.block_size, device)
        with autocast(device, bf16):
            rewards[batch] = model(ids, lengths).float().cpu()
    return rewards


@torch.no_grad()
def best_of_n(model: GPT, reward_model, tokenizer: Tokenizer, prompts: list[str], n: int, worst: bool = False,
              max_new_tokens: int = 128, batch_size: int = 256, **sampling) -> tuple[list[str], torch.Tensor]:
    """Best-of-N (or worst-of-N) decoding: N responses per prompt, keep the highest (lowest) reward.

    The N samples of a prompt are drawn in one batch (several prompts per batch). Returns the picked
    response per prompt and all rewards (P, N). Worst-of-N is the attacker's view in InfAlign: a
    jailbreaker samples N times and keeps the most harmful answer.
    """
    rows = max(n, batch_size // n * n)  # rows decoded together: whole groups of N
    longest = max(len(tokenizer.encode(p)) for p in prompts)
    weight = model.lm_head.weight  # the N samples' cache must fit before N copies of every prompt are made
    check_cache_fits(model.config, min(rows, n * len(prompts)), min(model.config.block_size, longest + max_new_tokens),
                     weight.device, weight.dtype)
    expanded = [p for p in prompts for _ in range(n)]
    responses = complete(model, tokenizer, expanded, max_new_tokens, batch_size=rows, **sampling)
    rewards = score(reward_model, tokenizer, expanded, responses).view(len(prompts), n)
    picks = (rewards.argmin(1) if worst else rewards.argmax(1)).tolist()
    return [responses[i * n + j] for i, j in enumerate(picks)], rewards


def load_reward(folder: str) -> tuple[RewardModel, dict]:
    """A reward model and its meta from a checkpoint folder written by the reward stage."""
    meta = load_meta(folder, "python train.py --stage reward", model=True)
    model = RewardModel(GPTConfig(**meta["model"]))
    load_weights(folder, model)
    return model, meta


# what calibration and CTRL optimise: the trained r, the world's gold reward, or r with a per-prompt scale
REWARDS = ("model", "gold", "scaled")
PROMPT_SCALE = 1.0  # "scaled": r times exp(PROMPT_SCALE * z_x), z_x ~ N(0, 1) per prompt


def prompt_scale(prompts: list[str]) -> torch.Tensor:
    """exp(PROMPT_SCALE * z_x) per prompt (B,), float64, z_x ~ N(0, 1) drawn from a generator seeded by
    the prompt's text: the same prompt gets the same scale in every stage, process and experiment."""
    z = [torch.randn(1, generator=torch.Generator().manual_seed(zlib.crc32(p.encode())), dtype=torch.float64)
         for p in prompts]
    return torch.exp(PROMPT_SCALE * torch.cat(z))


def reward_function(kind: str, out_dir: str, device, tokenizer: Tokenizer):
    """(prompts, responses) -> rewards (B,) on the CPU: the reward model of ``out_dir/reward`` (``model``);
    the world's gold reward (``gold``: a perfect reward model, for experiments on what the RL can
    reach when the reward is one the policy can learn; world prompts only); or the reward model times a
    per-prompt scale (``scaled``: a reward model whose scale differs between prompts, InfAlign's reason
    to calibrate: C_hat, and so every calibrated transform, is unchanged by it, raw RLHF is not)."""
    if kind == "gold":
        def gold(prompts: list[str], responses: list[str]) -> torch.Tensor:
            try:
                return torch.tensor([world.gold_reward(p, y) for p, y in zip(prompts, responses)])
            except ValueError as err:
                raise ConfigError(f"--reward gold grades the world's prompts only ({err}).") from None
        return gold
    model = load_reward(f"{out_dir}/reward")[0].to(device).eval().requires_grad_(False)
    if kind == "scaled":
        return lambda prompts, responses: score(model, tokenizer, prompts, responses) * prompt_scale(prompts).float()
    return lambda prompts, responses: score(model, tokenizer, prompts, responses)
