"""RAIN evaluated on the world's held-out prompts against vanilla decoding, many searches at once.

    python decode.py --method rain --eval             # rain_table, as markdown
    python -m minialign.lab rain                      # the same table -> out/rain.md

Rates come from the world's gold rules (``world.is_harmful``, ``world.is_helpful``); RAIN's
self-evaluation accuracy is its judge's verdict on every text it judged, against the same rule. The
searches run ``batch`` at a time through ``rain_batch`` (batch 1: one after another, the same answers).
"""
import time

from .. import world
from ..evaluate import world_rates
from ..rain import RainParams
from ..sampling import generate, generate_uncached, stop_ids
from .rain_batch import rain_decode_batch

SEARCH_STATS = ("iterations", "rewinds", "nodes", "additions", "sibling_pairs", "similar_pairs", "ended_by_end_of_text")
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
    ``traces``: one trace recorder per prompt (``lab.rain_trace.SearchTrace``), or None."""
    vanilla, v_time, u_time = [], 0.0, 0.0
    stop = stop_ids(tokenizer)
    for p in prompts:
        text, seconds = vanilla_decode(model, tokenizer, p.text, max_new_tokens)
        vanilla.append(text)
        v_time += seconds
        start = time.time()  # the official baseline: greedy without a KV cache
        generate_uncached(model, [tokenizer.encode(p.text)], max_new_tokens, stop)
        u_time += time.time() - start
    start = time.time()
    results = rain_decode_batch(model, tokenizer, [(p.text, p.question) for p in prompts], params, max_new_tokens,
                                seed, batch, traces, desc)
    r_time = time.time() - start
    answers = [answer for answer, _ in results]
    totals = {key: sum(stats[key] for _, stats in results) for key in SEARCH_STATS}
    return {"vanilla": dict(world_rates(prompts, vanilla), seconds=v_time, uncached_seconds=u_time),
            "rain": dict(world_rates(prompts, answers), seconds=r_time, self_eval_accuracy=judge_accuracy(prompts, results),
                         similar_share=totals["similar_pairs"] / max(1, totals["sibling_pairs"]), batch=batch,
                         **{k: v / len(prompts) for k, v in totals.items()}),
            "time_ratio": r_time / v_time, "time_ratio_uncached": r_time / u_time, "answers": answers}


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
              f"| answers ended by a committed end of text (HH's search would go on) | | {r['ended_by_end_of_text']:.3f} |",
              f"| wall time, s | {v['seconds']:.1f} (uncached: {v['uncached_seconds']:.1f}) | {r['seconds']:.1f} |",
              f"| time ratio RAIN / vanilla with KV cache | | {result['time_ratio']:.1f}x |",
              f"| time ratio RAIN / vanilla without KV cache (the paper's baseline) | | {result['time_ratio_uncached']:.1f}x |"]
    return "\n".join(lines)
