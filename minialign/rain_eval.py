"""RAIN evaluated on the world's held-out prompts: against vanilla decoding, and batched against serial.

    python decode.py --method rain --eval             # rain_table, as markdown
    python -m minialign.experiments rain              # the same table -> out/rain.md
    python -m minialign.experiments rain-batch        # rain_batch_agreement -> out/rain_batch.md
    python -m minialign.experiments combined          # combined_table: CTRL and RAIN together -> out/combined.md

Rates come from the world's gold rules (``world.is_harmful``, ``world.is_helpful``); RAIN's
self-evaluation accuracy is its judge's verdict on every text it judged, against the same rule.
"""
import copy
import time

import torch

from . import world
from .evaluate import world_rates
from .rain import RainParams, rain_decode
from .rain_batch import prompt_generator, rain_decode_batch
from .rain_trace import SearchTrace
from .sampling import best_of_n, complete, generate, generate_uncached, stop_ids

SEARCH_STATS = ("iterations", "rewinds", "nodes", "additions", "sibling_pairs", "similar_pairs")
RATE_ROWS = [("harm rate (harmful prompts)", "harm_rate"), ("attack success rate (attacked prompts)", "attack_success"),
             ("help rate (benign prompts)", "help_rate"), ("well-formed responses", "well_formed")]  # (label, key)


def vanilla_decode(model, tokenizer, prompt: str, max_new_tokens: int) -> tuple[str, float]:
    """Greedy KV-cached decoding of one prompt (the baseline RAIN is timed against)."""
    start = time.time()
    out = generate(model, [tokenizer.encode(prompt)], max_new_tokens, stop_ids(tokenizer), temperature=0.0)[0]
    return tokenizer.decode(out).strip(), time.time() - start


def rain_table(model, tokenizer, prompts: list[world.Prompt], params: RainParams, max_new_tokens: int = 128,
               seed: int = 0, desc: str = "rain", traces: list | None = None, batch: int = 16) -> dict:
    """Harm, attack success and help rates of vanilla and RAIN, RAIN's self-evaluation accuracy on every
    text it judged (against the gold rule), search statistics, wall times and their ratio. RAIN searches
    ``batch`` prompts at a time (1: one after another), prompt i with ``prompt_generator(seed, i)``.
    With a list ``traces``, each search's trace record (``rain_trace.SearchTrace``) is appended to it."""
    vanilla, v_time, u_time = [], 0.0, 0.0
    stop = stop_ids(tokenizer)
    for p in prompts:
        text, seconds = vanilla_decode(model, tokenizer, p.text, max_new_tokens)
        vanilla.append(text)
        v_time += seconds
        start = time.time()  # the official baseline: greedy without a KV cache
        generate_uncached(model, [tokenizer.encode(p.text)], max_new_tokens, stop)
        u_time += time.time() - start
    searches = [SearchTrace() for _ in prompts] if traces is not None else None
    start = time.time()
    results = rain_decode_batch(model, tokenizer, [(p.text, p.question) for p in prompts], params, max_new_tokens,
                                seed, batch, searches, desc)
    r_time = time.time() - start
    answers = [answer for answer, _ in results]
    if traces is not None:
        traces += [trace.finish(answer) for trace, answer in zip(searches, answers)]
    totals = {key: sum(stats[key] for _, stats in results) for key in SEARCH_STATS}
    return {"vanilla": dict(world_rates(prompts, vanilla), seconds=v_time, uncached_seconds=u_time),
            "rain": dict(world_rates(prompts, answers), seconds=r_time, self_eval_accuracy=judge_accuracy(prompts, results),
                         similar_share=totals["similar_pairs"] / max(1, totals["sibling_pairs"]), batch=batch,
                         **{k: v / len(prompts) for k, v in totals.items()}),
            "time_ratio": r_time / v_time, "time_ratio_uncached": r_time / u_time}


def judge_accuracy(prompts: list[world.Prompt], results: list[tuple[str, dict]]) -> float:
    """How often RAIN's self-evaluation agreed with the gold rule, over every text each search judged
    and both label orders."""
    verdicts = [bool(p_harmful[order] > 0.5) == world.is_harmful(p.text, text)
                for p, (_, stats) in zip(prompts, results)
                for (text, _), (_, p_harmful) in stats["judged"].items() for order in (0, 1)]
    return sum(verdicts) / len(verdicts)


def rain_markdown(result: dict) -> str:
    v, r = result["vanilla"], result["rain"]
    lines = ["| | vanilla (greedy, KV cache) | RAIN |", "|---|---|---|"]
    lines += [f"| {label} | {v[key]:.3f} | {r[key]:.3f} |" for label, key in RATE_ROWS]
    lines += [f"| self-evaluation accuracy (texts RAIN judged) | | {r['self_eval_accuracy']:.3f} |",
              f"| search per prompt: iterations / rewinds / nodes / dynamic additions | | {r['iterations']:.1f} / "
              f"{r['rewinds']:.1f} / {r['nodes']:.1f} / {r['additions']:.1f} |",
              f"| sibling pairs similar enough to share a score (Eq. 2) | | {r['similar_share']:.3f} |",
              f"| wall time, s | {v['seconds']:.1f} (uncached: {v['uncached_seconds']:.1f}) | {r['seconds']:.1f} |",
              f"| time ratio RAIN / vanilla with KV cache | | {result['time_ratio']:.1f}x |",
              f"| time ratio RAIN / vanilla without KV cache (the paper's baseline) | | {result['time_ratio_uncached']:.1f}x |"]
    return "\n".join(lines)


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
        for label, decode in decoders.items():
            start = time.time()
            answers, accuracy = decode()
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
