"""Stage 1, SFT: train the reference policy pi_ref with next-token prediction.

The default corpus is the embedded world's unaligned mixture (``world.corpus``): dialogues in every
response style plus self-evaluation documents. ``--data`` trains on a text or JSONL corpus instead,
and ``--init gpt2`` (or a local GPT-2 folder) starts from pretrained weights instead of random ones.
Batches are random rows of whole documents (``data.pack_rows``), each document seen from position 0
and only by itself, as prompts are at inference; 5% of the documents are held out for the loss.

Resume is exact: the checkpoint holds the optimizer and the data generator's state, so N steps, a
stop, and N more steps give the same parameters as 2N steps in one go.
"""
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import world
from .checkpoint import load_model, load_state
from .config import ConfigError, arg, named
from .data import DataError, load_documents, pack_rows, random_rows
from .distributed import setup, shard, wait_for_rank0, wrap
from .gpt2 import from_pretrained
from .model import GPT, GPTConfig
from .tokenizer import check_pairing, get_tokenizer
from .training import (MetricsLog, TrainingState, announce_precision, autocast, check_resume, clip_gradients, cosine_lr,
                       make_optimizer, pick_device, precision_name, resolve_bf16, set_lr)


@dataclass
class SFTConfig:
    out_dir: str = arg("out", "folder for every stage's checkpoint (this stage writes <out_dir>/sft)", form=named)
    init: str = arg("", "start from: '' random weights, 'gpt2' (hub) or a local GPT-2 folder")
    data: str = arg("", "training corpus (.txt split at blank lines, or .jsonl with a text field); '' = the world")
    tokenizer: str = arg("auto", "tokenizer: bytes (offline), gpt2, or auto (gpt2 with --init, else bytes)", one_of=("auto", "bytes", "gpt2"))
    n_layer: int = arg(4, "transformer blocks (random init only)", at_least=1)
    n_head: int = arg(4, "attention heads (random init only)", at_least=1)
    n_embd: int = arg(128, "embedding width (random init only)", at_least=1)
    block_size: int = arg(256, "context length in tokens (random init only)", at_least=2)
    batch_size: int = arg(16, "sequences per optimizer step", at_least=1)
    steps: int = arg(1500, "optimizer steps", at_least=1)
    lr: float = arg(6e-3, "peak learning rate (cosine schedule)", above=0)
    warmup: int = arg(50, "linear warm-up steps", at_least=0)
    weight_decay: float = arg(0.1, "AdamW weight decay on matrices", at_least=0)
    answer_weight: float = arg(3.0, "loss weight of an answer: the self-evaluation verdict letter, a world task's answer", at_least=0)
    corpus_dialogues: int = arg(20000, "world dialogues in the corpus", at_least=20)
    judge_noise: float = arg(0.0, "share of the world's self-evaluation documents given the wrong verdict (a worse "
                                  "judge, the same dialogues)", at_least=0, at_most=1)
    seed: int = arg(0, "seed of the world, the model init and the data order")
    eval_every: int = arg(250, "steps between held-out loss evaluations and checkpoints", at_least=1)
    stop_at: int = arg(0, "stop (with a checkpoint) after this step, e.g. to time-box a run; 0 = run all steps", at_least=0)
    resume: bool = arg(False, "continue from <out_dir>/sft/state.pt")
    device: str = arg("auto", "auto, cpu or cuda")
    bf16: str = arg("auto", "bf16 autocast: auto (where the device does bf16 natively), true or false")
    compile: bool = arg(False, "torch.compile the training forward (the checkpoint stays the plain model)")


def build_model(cfg: SFTConfig, vocab_size: int) -> GPT:
    if cfg.init:
        return from_pretrained(cfg.init)
    if cfg.n_embd % cfg.n_head:
        raise ConfigError(f"--n_embd ({cfg.n_embd}) must be a multiple of --n_head ({cfg.n_head}): "
                          "each head takes an equal slice of the embedding.")
    torch.manual_seed(cfg.seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer,
                         n_head=cfg.n_head, n_embd=cfg.n_embd))


def lm_loss(model: GPT, x, y, w, documents, device, bf16: bool,
            total_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted next-token cross-entropy of packed rows, divided by ``total_weight`` (default: the
    weights of this batch)."""
    with autocast(device, bf16):
        logits = model(x, documents=documents)  # (B, T, V)
    nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")  # (B*T,)
    return (nll * w.flatten()).sum() / (w.sum() if total_weight is None else total_weight)


@torch.no_grad()
def heldout_loss(model, rows, cfg, device, bf16: bool, batches: int = 8) -> float:
    g = torch.Generator().manual_seed(1234)  # the same rows at every evaluation
    model.eval()
    losses = [lm_loss(model, *(t.to(device) for t in random_rows(*rows, cfg.batch_size, g)), device, bf16)
              for _ in range(batches)]
    model.train()
    return float(torch.stack(losses).mean())


def sft_model(cfg: SFTConfig, folder: str, vocab_size: int) -> tuple[GPT, dict | None]:
    """The model to train and, with ``--resume``, the saved training state (None for a fresh run)."""
    if cfg.resume:
        check_resume(folder, cfg)
        return load_model(folder)[0], load_state(folder)
    return build_model(cfg, vocab_size), None


def train_sft(cfg: SFTConfig) -> tuple[GPT, dict]:
    """Run the SFT stage (one process, or one rank under torchrun); returns the model and final metrics."""
    d = setup(pick_device(cfg.device))
    device, bf16 = d.device, resolve_bf16(cfg.bf16, d.device)
    tokenizer = get_tokenizer(cfg.tokenizer if cfg.tokenizer != "auto" else "gpt2" if cfg.init else "bytes")
    folder = f"{cfg.out_dir}/sft"
    docs = load_documents(cfg.data) if cfg.data else world.corpus(cfg.corpus_dialogues, cfg.seed, judge_noise=cfg.judge_noise)
    if len(docs) < 2:
        raise DataError(f"{cfg.data} holds {len(docs)} document; SFT holds out one in twenty (at least one) to "
                        "measure its held-out loss, so it needs at least 2.")
    n_val = max(1, len(docs) // 20)  # held-out documents for the loss
    model, state = sft_model(cfg, folder, tokenizer.vocab_size)
    check_pairing(tokenizer, model.config.vocab_size, cfg.init or folder)
    row_len = model.config.block_size + 1  # inputs and targets of block_size tokens
    train_rows = pack_rows(docs[n_val:], tokenizer, row_len, cfg.answer_weight)  # (tokens, weights, documents)
    val_rows = pack_rows(docs[:n_val], tokenizer, row_len, cfg.answer_weight)
    model.to(device).train()
    ddp = torch.compile(wrap(model, d)) if cfg.compile else wrap(model, d)
    run = TrainingState(make_optimizer(model, cfg.lr, cfg.weight_decay, device),
                        {"generator": torch.Generator().manual_seed(cfg.seed)}, state, f"{folder}/state.pt")  # data order
    log = MetricsLog(f"{cfg.out_dir}/logs/sft.jsonl", enabled=d.is_main)
    announce_precision("sft", bf16, device, log, run.step)
    last = cfg.stop_at if 0 < cfg.stop_at < cfg.steps else cfg.steps
    metrics = {}
    # a context manager: the progress bar is closed on an error too, so the error's sentence starts a line
    with tqdm(total=last, initial=run.step, desc="sft", dynamic_ncols=True, disable=not d.is_main) as bar:
        while run.step < last:
            set_lr(run.optimizer, cosine_lr(run.step, cfg.steps, cfg.lr, cfg.warmup))
            batch = [t.to(device) for t in random_rows(*train_rows, cfg.batch_size, run.generators["generator"])]
            # this rank's rows; scaled so that DDP's gradient average is the gradient of the global mean
            loss = lm_loss(ddp, *(shard(t, d) for t in batch), device, bf16, batch[2].sum() / d.world_size)
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip_gradients(model.parameters(), f"sft step {run.step + 1}", f"try a lower --lr (now {cfg.lr:g})")
            run.optimizer.step()
            run.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if run.step % cfg.eval_every == 0 or run.step == last:
                metrics = {"step": run.step, "train_loss": round(loss.item(), 4),
                           "heldout_loss": round(heldout_loss(model, val_rows, cfg, device, bf16), 4)}
                log.write(**metrics)
                if d.is_main:
                    bar.write(f"step {run.step}: train loss {metrics['train_loss']:.3f}, "
                              f"held-out loss {metrics['heldout_loss']:.3f}")
                    run.save(folder, model, {"stage": "sft", "model": asdict(model.config), "tokenizer": tokenizer.name,
                                             "config": asdict(cfg), "precision": precision_name(bf16), "step": run.step,
                                             "metrics": metrics})
    wait_for_rank0(d)
    return model, metrics
