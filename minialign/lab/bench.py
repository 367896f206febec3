"""Benchmarks: training throughput and MFU, decoding speed, and RAIN's time (serial, batched, vanilla).

    python -m minialign.lab bench                # world-default shapes on this machine
    python -m minialign.lab bench --gpt2=true    # also GPT-2 124M shapes (B=16, T=1024 on a GPU)

Training is timed in fp32 and in bf16 autocast side by side, with the precision ``--bf16 auto`` picks
on this device: on a CPU without native bf16, bf16 is emulated and many times slower than fp32.

Every speed is printed next to a baseline measured in the same run (cached vs uncached decoding,
minialign vs transformers' ``generate`` with the same weights when transformers is installed, RAIN vs
vanilla); absolute figures come with the device name, and MFU uses the device's peak bf16 dense
FLOP/s looked up by name (none for a CPU). Each section (training, decoding, RAIN) is printed and
written to ``out/bench.json`` as soon as it is measured, so a run cut short keeps what it measured.
"""
import json
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .. import world
from ..checkpoint import atomic_write_text, check_writable, load_model, newest_copy, world_seed
from ..config import arg, build, named, parse_flags, usage
from ..fast.graphs import GraphDecoder
from ..model import GPT, GPTConfig
from ..rain import RainParams
from ..fast.rain_batch import rain_decode_batch
from ..fast.rain_eval import rain_table
from ..sampling import complete, generate, generate_uncached
from ..tokenizer import get_tokenizer
from ..training import autocast, decoding_dtype, describe_device, make_optimizer, pick_device, precision_name, resolve_bf16

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}
WORLD = GPTConfig()
PROMPT_LEN = 8  # tokens of the (random) prompt every decoding benchmark continues
# GPT-2 124M with the vocabulary padded from 50257 to 50304 (a multiple of 64, friendlier to tensor
# cores), as in nanoGPT, whose 460k tokens/s on an H100 is the anchor this shape is compared with.
GPT2_124M = GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768)


@dataclass
class BenchConfig:
    gpt2: bool = arg(False, "also benchmark GPT-2 124M shapes")
    train_steps: int = arg(10, "timed training steps (after 3 warm-up steps)", at_least=1)
    decode_tokens: int = arg(0, "tokens decoded per row; 0 = 256 on a GPU, 64 on a CPU", at_least=0)
    compile: bool = arg(False, "torch.compile the training model")
    out_dir: str = arg("out", "checkpoints root: with a trained sft model, RAIN is timed too", form=named)
    rain_prompts: int = arg(32, "held-out prompts per kind for the RAIN timings (0: no RAIN timing)", at_least=0)
    rain_batch: int = arg(16, "RAIN searches run at once in the batched timing", at_least=1)
    bf16: str = arg("auto", "the RAIN timing's decoding in bf16: auto (where the device does bf16 natively), true or false",
                    one_of=("auto", "true", "false"))
    out: str = arg("out/bench.json", "where to write the results", form=named)
    device: str = arg("auto", "auto, cpu or cuda")


def peak_flops(device: torch.device) -> float | None:
    name = describe_device(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_throughput(config: GPTConfig, batch: int, seq: int, cfg: BenchConfig, device, bf16: bool) -> dict:
    """Tokens/s of full training steps (forward, backward, AdamW) in fp32 or bf16 autocast, and MFU
    (against the device's peak bf16 FLOP/s, so given for bf16 only)."""
    torch.manual_seed(0)
    model = GPT(config).to(device)
    step_model = torch.compile(model) if cfg.compile else model
    optimizer = make_optimizer(model, 3e-4, 0.1, device)
    x = torch.randint(config.vocab_size, (batch, seq + 1), device=device)

    def step():
        with autocast(device, bf16):
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
    peak = peak_flops(device) if bf16 else None
    return {"precision": precision_name(bf16), "batch": batch, "seq": seq, "tokens_per_s": round(tokens_per_s),
            "step_s": round(seconds, 4), "mfu": round(flops_per_token * tokens_per_s / peak, 4) if peak else None}


def timed(run, tokens: int, device) -> float:
    """Seconds for ``run(tokens)``, after an untimed 8-token call that pays the one-off costs (CUDA
    context, cuBLAS handles, kernel choice, transformers' set-up)."""
    run(8)
    sync(device)
    start = time.time()
    run(tokens)
    sync(device)
    return time.time() - start


def transformers_twin(model: GPT):
    """transformers' GPT2LMHeadModel holding exactly ``model``'s weights (None without transformers)."""
    try:
        import transformers
    except ImportError:
        return None
    c = model.config
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        bos_token_id=c.vocab_size - 1, eos_token_id=c.vocab_size - 1))
    state = {k: (v.t() if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) else v)
             for k, v in model.state_dict().items()}  # nn.Linear (out, in) -> GPT-2 Conv1D (in, out)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith(".attn.bias") for k in missing), (missing, unexpected)
    return hf.to(model.lm_head.weight.device).eval()


@torch.no_grad()
def decode_speed(config: GPTConfig, batch: int, tokens: int, device) -> dict:
    """Greedy decoding tokens/s of one random model with ``batch`` rows of ``tokens`` new tokens each:
    KV-cached (minialign), uncached (the reference), the CUDA-graph decoder (on a GPU),
    and transformers' ``generate`` with its KV cache and the same weights (when installed). Every
    decoder runs without stop tokens, so all produce exactly ``tokens`` tokens per row."""
    torch.manual_seed(0)
    model = GPT(config).to(device).eval()
    prompt = torch.randint(config.vocab_size, (PROMPT_LEN,)).tolist()
    prompts = [prompt] * batch
    result = {"batch": batch, "tokens": tokens}
    outputs = {}

    def measure(name: str, run) -> None:
        def keep(n):
            outputs[name] = run(n)
        result[f"{name}_tokens_per_s"] = round(batch * tokens / timed(keep, tokens, device), 1)

    measure("cached", lambda n: generate(model, prompts, n, stop=set(), temperature=0.0))
    measure("uncached", lambda n: generate_uncached(model, prompts, n, stop=set()))
    if device.type == "cuda":
        graphed = GraphDecoder(model, batch, len(prompt) + tokens)
        measure("cuda_graph", lambda n: graphed.generate(prompts, n, stop=set(), temperature=0.0))
    hf = transformers_twin(model)
    if hf is not None:
        ids = torch.tensor(prompts, device=device)
        measure("transformers", lambda n: hf.generate(
            ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0,
            attention_mask=torch.ones_like(ids))[:, len(prompt):].tolist())
    result["same_tokens"] = all(out == outputs["cached"] for out in outputs.values())
    for ours in ("cached", "cuda_graph"):
        for baseline in ("uncached", "transformers"):
            if f"{ours}_tokens_per_s" in result and f"{baseline}_tokens_per_s" in result:
                ratio = result[f"{ours}_tokens_per_s"] / result[f"{baseline}_tokens_per_s"]
                result[f"{ours}_vs_{baseline}"] = round(ratio, 2)
    return result


def rain_ratio(cfg: BenchConfig, device) -> dict:
    """RAIN on the held-out prompts, serial (one search at a time) and batched, against greedy
    KV-cached decoding of one prompt at a time and of all the prompts as one batch."""
    model, meta = load_model(os.path.join(cfg.out_dir, "sft"))
    dtype = decoding_dtype(cfg.bf16, device)
    model, tokenizer = model.to(device, dtype).eval(), get_tokenizer(meta["tokenizer"])
    prompts = world.eval_prompts(cfg.rain_prompts, world_seed(cfg.out_dir))
    serial = rain_table(model, tokenizer, prompts, RainParams(), batch=1, desc="rain, serial")
    start = time.time()
    rain_decode_batch(model, tokenizer, [(p.text, p.question) for p in prompts], RainParams(), batch=cfg.rain_batch,
                      desc=f"rain, batch {cfg.rain_batch}")
    batched_s = time.time() - start
    start = time.time()
    complete(model, tokenizer, [p.text for p in prompts], 128, temperature=0.0)
    vanilla_batched_s = time.time() - start
    vanilla_s = serial["vanilla"]["seconds"]
    return {"prompts": len(prompts), "batch": cfg.rain_batch, "precision": precision_name(dtype == torch.bfloat16),
            "vanilla_s": round(vanilla_s, 2),
            "vanilla_uncached_s": round(serial["vanilla"]["uncached_seconds"], 2),
            "vanilla_batched_s": round(vanilla_batched_s, 2), "rain_serial_s": round(serial["rain"]["seconds"], 2),
            "rain_batched_s": round(batched_s, 2), "batched_speedup": round(serial["rain"]["seconds"] / batched_s, 2),
            "ratio": round(serial["time_ratio"], 2), "ratio_vs_uncached": round(serial["time_ratio_uncached"], 2),
            "batched_ratio": round(batched_s / vanilla_s, 2),
            "batched_ratio_vs_batched": round(batched_s / vanilla_batched_s, 2)}


def header_lines(report: dict) -> list[str]:
    return [f"device: {report['device']}, torch {report['torch']}",
            f"--bf16 auto picks {report['auto_precision']} here", ""]


def training_lines(report: dict) -> list[str]:
    lines = [f"{'training':12s} {'precision':>9s} {'batch x seq':>12s} {'tokens/s':>10s} {'MFU':>6s}"]
    for name in ("world", "gpt2"):
        for t in report.get(f"train_{name}", []):
            mfu = "-" if t["mfu"] is None else f"{t['mfu']:.1%}"
            lines.append(f"{name:12s} {t['precision']:>9s} {t['batch']:>5d} x {t['seq']:<5d} "
                         f"{t['tokens_per_s']:>10,d} {mfu:>6s}")
    fp32, bf16 = report["train_world"]
    return lines + [f"(world training, bf16 / fp32 speed: {bf16['tokens_per_s'] / fp32['tokens_per_s']:.2f}x)"]


def decoding_lines(report: dict) -> list[str]:
    methods = ("cached", "uncached", "cuda_graph", "transformers")
    ratios = ("cached_vs_uncached", "cached_vs_transformers", "cuda_graph_vs_transformers")
    lines = ["", f"{'decoding':12s} {'batch':>5s} {'tokens':>6s} " + " ".join(f"{m:>12s}" for m in methods)
             + "   " + "  ".join(ratios)]
    for name in ("world", "gpt2"):
        for d in report.get(f"decode_{name}", []):
            speeds = " ".join(f"{d.get(m + '_tokens_per_s', '-'):>12}" for m in methods)
            lines.append(f"{name:12s} {d['batch']:>5d} {d['tokens']:>6d} {speeds}   "
                         + "  ".join(f"{d.get(r, '-'):>{len(r)}}" for r in ratios))
    return lines + ["(decoding in tokens/s; every decoder produced the same tokens: "
                    + str(all(d["same_tokens"] for k in ("decode_world", "decode_gpt2") for d in report.get(k, []))) + ")"]


def rain_lines(report: dict) -> list[str]:
    if "rain_vs_vanilla" not in report:
        why = ("--rain_prompts 0" if report["config"]["rain_prompts"] == 0 else
               f"no trained model in {report['config']['out_dir']}/sft (run `python train.py --stage sft` first)")
        return [f"\nRAIN / vanilla time: not measured, {why}"]
    r = report["rain_vs_vanilla"]
    return [f"\nRAIN ({r['precision']}) on {r['prompts']} held-out prompts: serial {r['rain_serial_s']} s, {r['batch']} at a time "
            f"{r['rain_batched_s']} s ({r['batched_speedup']}x faster, the same answers up to rounding)",
            f"vanilla greedy: {r['vanilla_s']} s one prompt at a time with a KV cache, {r['vanilla_uncached_s']} s "
            f"without, {r['vanilla_batched_s']} s all prompts as one batch",
            f"RAIN / vanilla time: serial {r['ratio']}x against KV-cached greedy ({r['ratio_vs_uncached']}x against "
            f"uncached); batched {r['batched_ratio']}x against KV-cached greedy per prompt, "
            f"{r['batched_ratio_vs_batched']}x against batched greedy"]


def main(argv: list[str]) -> None:
    if "-h" in argv or "--help" in argv:
        print(__doc__ + "\n" + usage(BenchConfig))
        return
    cfg = build(BenchConfig, parse_flags(argv))
    check_writable(cfg.out, "--out")  # before the measurements, not after them
    device = pick_device(cfg.device)
    on_gpu = device.type == "cuda"
    tokens = cfg.decode_tokens or (256 if on_gpu else 64)
    auto = resolve_bf16("auto", device)
    report = {"device": describe_device(device), "torch": torch.__version__, "config": asdict(cfg),
              "auto_precision": precision_name(auto)}

    def section(lines: list[str]) -> None:
        """Each section is printed and saved as soon as it is measured: a run cut short keeps what it did."""
        print("\n".join(lines), flush=True)
        atomic_write_text(cfg.out, json.dumps(report, indent=2))

    section(header_lines(report))
    report["train_world"] = [train_throughput(WORLD, 16, WORLD.block_size, cfg, device, bf16) for bf16 in (False, True)]
    if cfg.gpt2:
        report["train_gpt2"] = [train_throughput(GPT2_124M, 16 if on_gpu else 2, 1024 if on_gpu else 256, cfg, device,
                                                 auto)]
    section(training_lines(report))
    world_tokens = min(tokens, WORLD.block_size - PROMPT_LEN)
    report["decode_world"] = [decode_speed(WORLD, b, world_tokens, device) for b in (1, 64)]
    if cfg.gpt2:
        report["decode_gpt2"] = [decode_speed(GPT2_124M, b, tokens, device) for b in (1, 64)]
    section(decoding_lines(report))
    if cfg.rain_prompts and newest_copy(os.path.join(cfg.out_dir, "sft")) is not None:
        report["rain_vs_vanilla"] = rain_ratio(cfg, device)
    section(rain_lines(report))
    print(f"\n(all figures: {cfg.out})")

