"""Stage 2: train the reward model r(x, y) (``reward_model.py``) by Bradley-Terry.

Bradley-Terry: P(chosen > rejected) = sigmoid(r(chosen) - r(rejected)); the loss is its negative log.
On the world, the labels are themselves drawn by Bradley-Terry on the gold reward with a temperature,
so no reward model can exceed the *label-noise ceiling* E[max(p, 1 - p)], which is reported beside
the held-out accuracy.
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import world
from .checkpoint import load_meta, load_model, load_state, world_seed
from .config import arg, named
from .data import DataError, load_pairs, split_transcript
from .distributed import setup, shard, wait_for_rank0, wrap
from .gpt2 import from_pretrained
from .model import row_chunks
from .reward_model import RewardModel, encode_batch, load_reward, score
from .tokenizer import check_pairing, get_tokenizer
from .training import (MetricsLog, TrainingState, announce_precision, autocast, check_resume, clip_gradients, cosine_lr,
                       make_optimizer, pick_device, precision_name, resolve_bf16, set_lr)


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected), averaged over the batch."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def label_noise_ceiling(prompts, a, b, temperature: float) -> float:
    """The best accuracy any model can reach on Bradley-Terry labels: mean of max(p, 1 - p)."""
    total = 0.0
    for p, x, y in zip(prompts, a, b):
        q = 1 / (1 + math.exp(-(world.gold_reward(p, x) - world.gold_reward(p, y)) / temperature))
        total += max(q, 1 - q)
    return total / len(prompts)


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Rank correlation (average ranks for ties)."""
    def ranks(v):
        order = v.argsort()
        r = torch.empty_like(v, dtype=torch.float64)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for value in v.unique():  # ties share their mean rank
            tied = v == value
            r[tied] = r[tied].mean()
        return r
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


@dataclass
class RewardConfig:
    out_dir: str = arg("out", "checkpoints root (reads <out_dir>/sft, writes <out_dir>/reward)", form=named)
    init: str = arg("", "trunk from: '' = <out_dir>/sft, 'gpt2' or a local GPT-2 folder")
    tokenizer: str = arg("auto", "with --init: the tokenizer (auto = gpt2); otherwise the sft checkpoint's", one_of=("auto", "bytes", "gpt2"))
    data: str = arg("", "HH-format JSONL of preference pairs; '' = world pairs")
    n_pairs: int = arg(8000, "world training pairs", at_least=2)
    label_temperature: float = arg(0.25, "Bradley-Terry temperature of the world's labels", above=0)
    same_style: float = arg(0.0, "share of world training pairs whose two responses share one style (their label "
                                 "rests on the gold reward's small within-style terms)", at_least=0, at_most=1)
    steps: int = arg(150, "optimizer steps (on the world, held-out accuracy is flat from about step 150)", at_least=1)
    batch_size: int = arg(32, "pairs per step", at_least=1)
    micro_batch: int = arg(8, "pairs per forward/backward, pairs of similar length together (gradients add up "
                              "to the whole batch's step; 0 = the whole batch at once)", at_least=0)
    lr: float = arg(1e-3, "peak learning rate", above=0)
    warmup: int = arg(20, "warm-up steps", at_least=0)
    weight_decay: float = arg(0.0, "AdamW weight decay", at_least=0)
    eval_every: int = arg(100, "steps between held-out evaluations and checkpoints", at_least=1)
    seed: int = arg(0, "seed of the batch order")
    resume: bool = arg(False, "continue from <out_dir>/reward/state.pt")
    device: str = arg("auto", "auto, cpu or cuda")
    bf16: str = arg("auto", "bf16 autocast: auto (where the device does bf16 natively), true or false")


def bradley_terry_step(model, ids: torch.Tensor, lengths: torch.Tensor, micro_batch: int, scale: float) -> float:
    """Backward of ``scale`` x the Bradley-Terry loss of b pairs, whose 2b right-padded rows are
    chosen then rejected, accumulated over micro-batches of pairs sorted by length, each cut to its
    longest row (less padding; 20% less time per step on the 2-core CPU). Returns the loss."""
    b = ids.size(0) // 2
    order = torch.maximum(lengths[:b], lengths[b:]).argsort()  # pairs, shortest first
    total = 0.0
    for chunk in row_chunks(b, micro_batch):
        pairs = order[chunk]
        rows = torch.cat([pairs, pairs + b])  # the chunk's chosen rows, then its rejected rows
        r = model(ids[rows, : int(lengths[rows].max())], lengths[rows])
        loss = bradley_terry_loss(r[: len(pairs)], r[len(pairs):]) * (len(pairs) / b) * scale
        loss.backward()
        total += loss.item()
    return total


def evaluate_reward(model, tokenizer, pairs, cfg, bf16: bool) -> dict:
    """Held-out pairwise accuracy (ties count half) and, on the world, ceiling and rank correlation."""
    prompts, chosen, rejected = zip(*pairs)
    rc = score(model, tokenizer, list(prompts), list(chosen), bf16=bf16)
    rr = score(model, tokenizer, list(prompts), list(rejected), bf16=bf16)
    metrics = {"accuracy": float(((rc > rr).float() + 0.5 * (rc == rr).float()).mean())}
    if not cfg.data:
        metrics["ceiling"] = label_noise_ceiling(prompts, chosen, rejected, cfg.label_temperature)
        gold = torch.tensor([world.gold_reward(p, r) for p, r in zip(prompts + prompts, chosen + rejected)])
        metrics["spearman_gold"] = spearman(torch.cat([rc, rr]), gold)
    return {k: round(v, 4) for k, v in metrics.items()}


def world_pair_tuples(rows: list[dict]) -> list[tuple[str, str, str]]:
    """HH-format rows -> (prompt, chosen, rejected), as ``data.load_pairs`` returns them."""
    return [(*split_transcript(r["chosen"]), split_transcript(r["rejected"])[1]) for r in rows]


def preference_data(cfg: RewardConfig) -> tuple[list, list]:
    """(train, held-out) pairs as (prompt, chosen, rejected): ``--data``'s, a tenth held out, or the
    world's (its train prompts for training, 1,000 pairs on held-out prompts for the accuracy)."""
    if cfg.data:
        pairs = load_pairs(cfg.data)
        if len(pairs) < 2:
            raise DataError(f"{cfg.data} holds one preference pair; the reward stage needs at least two "
                            "(a tenth, at least one, is held out to measure accuracy).")
        n_test = max(1, len(pairs) // 10)
        return pairs[n_test:], pairs[:n_test]
    seed = world_seed(cfg.out_dir)  # the reference policy's world
    train = world.preference_pairs(cfg.n_pairs, seed, cfg.label_temperature, same_style=cfg.same_style)
    test = world.preference_pairs(1000, seed, cfg.label_temperature, split="test")
    return world_pair_tuples(train), world_pair_tuples(test)


def reward_model_to_train(cfg: RewardConfig, folder: str) -> tuple[RewardModel, dict | None, object]:
    """The reward model to train, with ``--resume`` its saved training state (None for a fresh run), and
    the tokenizer: a fresh r starts from pi_ref's trunk (``out/sft``) or from ``--init``'s weights."""
    if cfg.resume:
        check_resume(folder, cfg)
        return load_reward(folder)[0], load_state(folder), get_tokenizer(load_meta(folder)["tokenizer"])
    if cfg.init:
        trunk, tokenizer = from_pretrained(cfg.init), get_tokenizer("gpt2" if cfg.tokenizer == "auto" else cfg.tokenizer)
        check_pairing(tokenizer, trunk.config.vocab_size, cfg.init)
    else:
        trunk, sft_meta = load_model(f"{cfg.out_dir}/sft")
        tokenizer = get_tokenizer(sft_meta["tokenizer"])
    model = RewardModel(trunk.config)
    model.trunk.load_state_dict(trunk.state_dict())
    return model, None, tokenizer


def train_reward(cfg: RewardConfig) -> dict:
    """Train r by Bradley-Terry (one process, or one rank under torchrun); returns held-out metrics."""
    d = setup(pick_device(cfg.device))
    device, bf16 = d.device, resolve_bf16(cfg.bf16, d.device)
    folder = f"{cfg.out_dir}/reward"
    train_pairs, test_pairs = preference_data(cfg)
    model, state, tokenizer = reward_model_to_train(cfg, folder)
    model.to(device).train()
    ddp = wrap(model, d)
    run = TrainingState(make_optimizer(model, cfg.lr, cfg.weight_decay, device),
                        {"generator": torch.Generator().manual_seed(cfg.seed)}, state, f"{folder}/state.pt")  # pair order
    metrics = {}
    log = MetricsLog(f"{cfg.out_dir}/logs/reward.jsonl", enabled=d.is_main)
    announce_precision("reward", bf16, device, log, run.step)
    # a context manager: the progress bar is closed on an error too, so the error's sentence starts a line
    with tqdm(total=cfg.steps, initial=run.step, desc="reward", dynamic_ncols=True, disable=not d.is_main) as bar:
        while run.step < cfg.steps:
            set_lr(run.optimizer, cosine_lr(run.step, cfg.steps, cfg.lr, cfg.warmup))
            picks = torch.randint(len(train_pairs), (cfg.batch_size,), generator=run.generators["generator"])
            prompts, chosen, rejected = zip(*shard([train_pairs[i] for i in picks], d))  # this rank's pairs
            ids, lengths = encode_batch(tokenizer, list(prompts + prompts), list(chosen + rejected),
                                        model.trunk.config.block_size, device)
            run.optimizer.zero_grad(set_to_none=True)
            with autocast(device, bf16):  # rows: chosen then rejected; DDP's average -> the global batch's mean
                loss = bradley_terry_step(ddp, ids, lengths, cfg.micro_batch, len(prompts) * d.world_size / cfg.batch_size)
            clip_gradients(model.parameters(), f"reward step {run.step + 1}", f"try a lower --lr (now {cfg.lr:g})")
            run.optimizer.step()
            run.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if (run.step % cfg.eval_every == 0 or run.step == cfg.steps) and d.is_main:
                model.eval()
                metrics = {"step": run.step, "loss": round(loss, 4),
                           **evaluate_reward(model, tokenizer, test_pairs, cfg, bf16)}
                model.train()
                log.write(**metrics)
                bar.write(f"reward step {run.step}: " + ", ".join(f"{k} {v}" for k, v in metrics.items() if k != "step"))
                run.save(folder, model, {"stage": "reward", "model": asdict(model.trunk.config), "tokenizer": tokenizer.name,
                                         "config": asdict(cfg), "precision": precision_name(bf16), "step": run.step,
                                         "metrics": metrics})
    wait_for_rank0(d)
    return metrics
