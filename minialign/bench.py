"""Benchmarks: training throughput and MFU, decoding speed, and the RAIN / vanilla time ratio.

    python -m minialign.bench                    # world-default shapes on this machine
    python -m minialign.bench --gpt2=true        # also GPT-2 124M shapes (B=16, T=1024 on a GPU)

Every speed is printed next to a baseline measured in the same run (cached vs uncached decoding,
minialign vs transformers' ``generate`` with the same weights when transformers is installed, RAIN vs
vanilla); absolute figures come with the device name, and MFU uses the device's peak bf16 dense
FLOP/s looked up by name (none for a CPU). Results also go to ``out/bench.json``.
"""
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from . import world
from .checkpoint import atomic_write_text, load_model, world_seed
from .config import arg, build, main_guard, parse_flags, usage
from .experiments import rain_table
from .model import GPT, GPTConfig
from .rain import RainParams
from .sampling import generate, generate_uncached
from .tokenizer import get_tokenizer
from .training import autocast, make_optimizer, pick_device

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}
WORLD = GPTConfig()
GPT2_124M = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)


@dataclass
class BenchConfig:
    gpt2: bool = arg(False, "also benchmark GPT-2 124M shapes")
    train_steps: int = arg(10, "timed training steps (after 3 warm-up steps)")
    decode_tokens: int = arg(64, "tokens decoded per row (256 for the GPT-2 figures on a GPU)")
    compile: bool = arg(False, "torch.compile the training model")
    out_dir: str = arg("out", "checkpoints root: with a trained sft model, RAIN is timed too")
    rain_prompts: int = arg(4, "held-out prompts per kind for the RAIN / vanilla ratio")
    out: str = arg("out/bench.json", "where to write the results")
    device: str = arg("auto", "auto, cpu or cuda")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"


def peak_flops(device: torch.device) -> float | None:
    name = device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_throughput(config: GPTConfig, batch: int, seq: int, cfg: BenchConfig, device) -> dict:
    """Tokens/s of full training steps (forward, backward, AdamW) in bf16 autocast, and MFU."""
    torch.manual_seed(0)
    model = GPT(config).to(device)
    step_model = torch.compile(model) if cfg.compile else model
    optimizer = make_optimizer(model, 3e-4, 0.1, device)
    x = torch.randint(config.vocab_size, (batch, seq + 1), device=device)

    def step():
        with autocast(device, True):
            logits = step_model(x[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    for _ in range(3):
        step()
    sync(device)
    start = time.time()
    for _ in range(cfg.train_steps):
        step()
    sync(device)
    seconds = (time.time() - start) / cfg.train_steps
    n = model.num_params() - config.block_size * config.n_embd  # non-embedding-position parameters
    flops_per_token = 6 * n + 12 * config.n_layer * config.n_embd * seq  # nanoGPT's estimate (PaLM appendix B)
    tokens_per_s = batch * seq / seconds
    peak = peak_flops(device)
    return {"batch": batch, "seq": seq, "tokens_per_s": round(tokens_per_s), "step_s": round(seconds, 4),
            "mfu": round(flops_per_token * tokens_per_s / peak, 4) if peak else None}


@torch.no_grad()
def decode_speed(config: GPTConfig, batch: int, tokens: int, device) -> dict:
    """Greedy decoding tokens/s: cached (minialign), uncached (reference), and transformers' generate
    with the same weights when transformers is installed."""
    torch.manual_seed(0)
    model = GPT(config).to(device).eval()
    prompt = torch.randint(config.vocab_size, (8,)).tolist()
    result = {"batch": batch, "tokens": tokens}
    sync(device)
    start = time.time()
    ours = generate(model, [prompt] * batch, tokens, stop=set(), temperature=0.0)
    sync(device)
    result["cached_tokens_per_s"] = round(batch * tokens / (time.time() - start), 1)
    if batch == 1:
        start = time.time()
        generate_uncached(model, prompt, tokens, stop=set())
        sync(device)
        result["uncached_tokens_per_s"] = round(tokens / (time.time() - start), 1)
        result["cached_vs_uncached"] = round(result["cached_tokens_per_s"] / result["uncached_tokens_per_s"], 2)
    try:
        import transformers
    except ImportError:
        return result
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, bos_token_id=config.vocab_size - 1,
        eos_token_id=config.vocab_size - 1)).to(device).eval()
    state = {k: (v.t() if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) else v)
             for k, v in model.state_dict().items()}  # nn.Linear (out, in) -> GPT-2 Conv1D (in, out)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith(".attn.bias") for k in missing), (missing, unexpected)
    ids = torch.tensor([prompt] * batch, device=device)
    sync(device)
    start = time.time()
    theirs = hf.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, use_cache=True,
                         pad_token_id=0, attention_mask=torch.ones_like(ids))
    sync(device)
    result["transformers_tokens_per_s"] = round(batch * tokens / (time.time() - start), 1)
    result["same_tokens_as_transformers"] = theirs[0, len(prompt):].tolist() == ours[0]
    result["minialign_vs_transformers"] = round(result["cached_tokens_per_s"] / result["transformers_tokens_per_s"], 2)
    return result


def rain_ratio(cfg: BenchConfig, device) -> dict:
    """RAIN against greedy KV-cached decoding, one prompt at a time, on the trained world model."""
    model, meta = load_model(os.path.join(cfg.out_dir, "sft"))
    prompts = world.eval_prompts(cfg.rain_prompts, world_seed(cfg.out_dir))
    result = rain_table(model.to(device).eval(), get_tokenizer(meta["tokenizer"]), prompts, RainParams())
    return {"prompts": len(prompts), "vanilla_s": round(result["vanilla"]["seconds"], 2),
            "rain_s": round(result["rain"]["seconds"], 2), "ratio": round(result["time_ratio"], 2),
            "ratio_vs_uncached": round(result["time_ratio_uncached"], 2)}


def main(argv: list[str]) -> None:
    if "-h" in argv or "--help" in argv:
        print(__doc__ + "\n" + usage(BenchConfig))
        return
    cfg = build(BenchConfig, parse_flags(argv))
    device = pick_device(cfg.device)
    report = {"device": device_name(device), "torch": torch.__version__, "config": asdict(cfg)}
    report["train_world"] = train_throughput(WORLD, 16, WORLD.block_size, cfg, device)
    report["decode_world"] = [decode_speed(WORLD, b, cfg.decode_tokens, device) for b in (1, 64)]
    if os.path.exists(os.path.join(cfg.out_dir, "sft", "config.json")):
        report["rain_vs_vanilla"] = rain_ratio(cfg, device)
    if cfg.gpt2:
        on_gpu = device.type == "cuda"
        report["train_gpt2"] = train_throughput(GPT2_124M, 16 if on_gpu else 2, 1024 if on_gpu else 256, cfg, device)
        report["decode_gpt2"] = [decode_speed(GPT2_124M, b, cfg.decode_tokens, device) for b in (1, 64)]
    atomic_write_text(cfg.out, json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main_guard(lambda: main(sys.argv[1:]))
