"""RAIN experiments on the world: the batched search against the serial one, and CTRL and RAIN together.

    python -m minialign.lab rain-batch        # rain_batch_agreement -> out/rain_batch.md
    python -m minialign.lab combined          # combined_table: CTRL and RAIN together -> out/combined.md
"""
import copy
import time

import torch

from .. import world
from ..evaluate import world_rates
from ..fast.rain_batch import prompt_generator, rain_decode_batch
from ..fast.rain_eval import RATE_ROWS, SEARCH_STATS, judge_accuracy
from ..rain import RainParams, rain_decode
from ..reward_model import best_of_n
from ..sampling import complete


def rain_batch_agreement(model, tokenizer, prompts: list[world.Prompt], params: RainParams, batch: int,
                         max_new_tokens: int = 128, seed: int = 0) -> dict:
    """The batched search against the serial one on the same prompts, prompt i with the same generator
    in both: how many answers and search statistics match, the rates and wall times of each, and for
    every prompt whose answer differs, whether the difference is floating-point batching: the batched
    run is repeated in float64 and each such prompt searched alone in float64; if those two agree, the
    float32 difference came from rounding, not from the search."""
    pairs = [(p.text, p.question) for p in prompts]
    runs = {}
    for b in (1, batch):
        start = time.time()
        runs[b] = (rain_decode_batch(model, tokenizer, pairs, params, max_new_tokens, seed, b, desc=f"batch {b}"),
                   time.time() - start)
    (serial, serial_s), (batched, batched_s) = runs[1], runs[batch]
    differ = [i for i, (a, b) in enumerate(zip(serial, batched)) if a[0] != b[0]]
    same_stats = sum(all(a[1][k] == b[1][k] for k in SEARCH_STATS) for a, b in zip(serial, batched))
    vanish = []
    if differ:
        wide = copy.deepcopy(model).double()
        batched64 = rain_decode_batch(wide, tokenizer, pairs, params, max_new_tokens, seed, batch, desc="batch, float64")
        for i in differ:
            alone64 = rain_decode(wide, tokenizer, *pairs[i], params, max_new_tokens, prompt_generator(seed, i))
            vanish.append(alone64[0] == batched64[i][0])
    return {"prompts": len(prompts), "batch": batch, "same_answers": len(prompts) - len(differ),
            "same_stats": same_stats, "differ": differ, "vanish_in_float64": sum(vanish),
            "serial": dict(world_rates(prompts, [a for a, _ in serial]), seconds=serial_s),
            "batched": dict(world_rates(prompts, [a for a, _ in batched]), seconds=batched_s)}


def rain_batch_markdown(result: dict) -> str:
    s, b, n = result["serial"], result["batched"], result["prompts"]
    lines = [f"| | serial (one prompt at a time) | batched ({result['batch']} at a time) |", "|---|---|---|"]
    lines += [f"| {label} | {s[key]:.3f} | {b[key]:.3f} |" for label, key in RATE_ROWS]
    lines += [f"| same answer as serial | | {result['same_answers']} / {n} |",
              f"| same search statistics as serial | | {result['same_stats']} / {n} |",
              f"| answers that differ, and agree when both run in float64 | | {result['vanish_in_float64']} / "
              f"{len(result['differ'])} |",
              f"| wall time, s | {s['seconds']:.1f} | {b['seconds']:.1f} ({s['seconds'] / b['seconds']:.2f}x faster) |"]
    return "\n".join(lines)


def combined_table(policies: dict, reward_model, tokenizer, prompts: list[world.Prompt], params: RainParams,
                   batch: int = 16, reference_samples: int = 8, seed: int = 0) -> str:
    """Both papers together: each policy (name -> model; the first is pi_ref) decoded greedy, best-of-4
    by the reward model r, and with RAIN (the policy judging its own text). Per decoding: the gold
    rules' rates, the gold win rate against ``reference_samples`` samples of pi_ref per prompt (ties
    1/2; ± its standard error over prompts), RAIN's self-evaluation accuracy, and time per prompt."""
    texts = [p.text for p in prompts]
    pi_ref = next(iter(policies.values()))
    device = pi_ref.lm_head.weight.device
    repeated = [t for t in texts for _ in range(reference_samples)]
    samples = complete(pi_ref, tokenizer, repeated, batch_size=256, temperature=1.0,
                       generator=torch.Generator(device).manual_seed(seed + 1))
    reference = torch.tensor([world.gold_reward(t, y) for t, y in zip(repeated, samples)]).view(len(texts), -1)  # (P, S)
    lines = ["| policy | decoding | harm rate (harmful) | attack success (attacked) | help rate (benign) "
             "| gold win rate vs pi_ref samples | self-evaluation accuracy | ms per prompt |", "|---|---|---|---|---|---|---|---|"]
    for name, model in policies.items():
        decoders = {
            "greedy": lambda: (complete(model, tokenizer, texts, temperature=0.0), None),
            "best-of-4 by r": lambda: (best_of_n(model, reward_model, tokenizer, texts, 4, temperature=1.0,
                                                 generator=torch.Generator(device).manual_seed(seed))[0], None),
            "RAIN": lambda: rain_answers(model, tokenizer, prompts, params, batch, seed),
        }
        for label, decode_all in decoders.items():
            start = time.time()
            answers, accuracy = decode_all()
            ms = 1000 * (time.time() - start) / len(prompts)
            gold = torch.tensor([world.gold_reward(t, a) for t, a in zip(texts, answers)])[:, None]  # (P, 1)
            wins = ((gold > reference).float() + 0.5 * (gold == reference).float()).mean(1)  # (P,)
            r = world_rates(prompts, answers)
            lines.append(f"| {name} | {label} | {r['harm_rate']:.3f} | {r['attack_success']:.3f} | {r['help_rate']:.3f} "
                         f"| {wins.mean():.3f} ± {wins.std() / len(wins) ** 0.5:.3f} | "
                         f"{'' if accuracy is None else f'{accuracy:.3f}'} | {ms:.0f} |")
    return "\n".join(lines)


def rain_answers(model, tokenizer, prompts: list[world.Prompt], params: RainParams, batch: int,
                 seed: int) -> tuple[list[str], float]:
    """RAIN's answers to world prompts, searched ``batch`` at a time, and its self-evaluation accuracy."""
    results = rain_decode_batch(model, tokenizer, [(p.text, p.question) for p in prompts], params, seed=seed, batch=batch)
    return [answer for answer, _ in results], judge_accuracy(prompts, results)
