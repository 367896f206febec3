"""Evaluation: grading responses in the world, win rates, KL estimates, the 1-D analytic tool, and
RAIN against vanilla decoding.

World grading uses the gold rules of ``world.py``: the harm rate counts harmful compliance on harmful
prompts, the attack success rate the same on attacked prompts, and the help rate exact answers on
benign prompts.
"""
import time

import numpy as np
import torch
from tqdm import tqdm

from . import world
from .data import pad_responses
from .model import sequence_logprobs
from .rain import RainParams, rain_decode
from .rain_trace import SearchTrace
from .sampling import generate, generate_uncached, stop_ids
from .selfeval import judge


def world_rates(prompts: list[world.Prompt], responses: list[str]) -> dict:
    """Harm rate, attack success rate, help rate, well-formed share and mean gold reward."""
    def rate(kind, rule):
        graded = [rule(p.text, r) for p, r in zip(prompts, responses) if p.kind == kind]
        return sum(graded) / len(graded) if graded else float("nan")
    return {
        "harm_rate": rate("harmful", world.is_harmful),
        "attack_success": rate("attacked", world.is_harmful),
        "help_rate": rate("benign", world.is_helpful),
        "well_formed": sum(map(world.is_well_formed, responses)) / len(responses),
        "gold_reward": sum(world.gold_reward(p.text, r) for p, r in zip(prompts, responses)) / len(responses),
    }


# ---------------------------------------------------------------------------------------------------
# Win rates (InfAlign): ties count one half.

def win_rate(a: torch.Tensor, b: torch.Tensor) -> float:
    """W(a > b) over all pairs of two samples of rewards: P(a > b) + 0.5 * P(a = b)."""
    a, b = a.flatten()[:, None], b.flatten()[None, :]
    return float(((a > b).double() + 0.5 * (a == b).double()).mean())


def transformed_cdf(values: torch.Tensor, samples: torch.Tensor, procedure: str, n: int) -> torch.Tensor:
    """CDF at ``values`` of the reward picked by ``procedure`` from n draws of the empirical distribution
    of ``samples``: plain sampling F, best-of-n F^n, worst-of-n 1 - (1 - F)^n."""
    F = torch.searchsorted(samples.sort().values, values, side="right").double() / len(samples)
    if procedure == "sample":
        return F
    if procedure == "bon":
        return F ** n
    if procedure == "won":
        return 1 - (1 - F) ** n
    raise ValueError(f"unknown procedure {procedure!r}: sample, bon or won")


def inference_time_win_rate(policy: torch.Tensor, reference: torch.Tensor, procedure: str = "sample",
                            n: int = 1) -> tuple[float, float]:
    """Mean over prompts of W(T(pi) > T(pi_ref) | x), and its standard error across prompts.

    ``policy`` and ``reference`` are rewards (P, M) of M samples per prompt. T(pi) draws n samples with
    replacement from each prompt's empirical distribution (exact, no Monte Carlo over groups), so at
    pi = pi_ref the win rate is exactly 1/2.
    """
    rates = []
    for x, z in zip(policy, reference):
        support = torch.cat([x, z]).unique()  # sorted
        below = torch.cat([support.new_tensor([float("-inf")]), support[:-1]])
        Gx, Gz = transformed_cdf(support, x, procedure, n), transformed_cdf(support, z, procedure, n)
        px = Gx - transformed_cdf(below, x, procedure, n)  # P(T(pi) picks reward v), v over the support
        Gz_below = transformed_cdf(below, z, procedure, n)
        rates.append(float((px * (Gz_below + 0.5 * (Gz - Gz_below))).sum()))
    r = torch.tensor(rates, dtype=torch.float64)
    return float(r.mean()), float(r.std() / len(r) ** 0.5) if len(r) > 1 else 0.0


# ---------------------------------------------------------------------------------------------------
# The 1-D analytic tool (InfAlign): for pi ∝ pi_ref exp(Phi(C) / beta) with continuous rewards, the
# calibrated reward u = C(x, y) has density f(u) = exp(Phi(u) / beta) / Z on [0, 1] for every prompt.

def analytic(phi, beta: float, n: int = 4, grid: int = 200_000) -> dict:
    """KL, standard win rate, BoN_n and WoN_n inference-time win rates of the tilted policy (midpoint rule)."""
    u = (np.arange(grid) + 0.5) / grid
    du = 1.0 / grid
    log_f = phi(u) / beta
    log_f = log_f - log_f.max()
    f = np.exp(log_f)
    f /= f.sum() * du  # density on [0, 1]
    F = np.cumsum(f) * du - 0.5 * f * du  # CDF at the midpoints
    return {
        "kl": float(np.sum(f * np.log(np.maximum(f, 1e-300))) * du),
        "win_rate": float(np.sum(u * f) * du),
        "bon": float(np.sum(n * F ** (n - 1) * f * u ** n) * du),
        "won": float(np.sum(n * (1 - F) ** (n - 1) * f * (1 - (1 - u) ** n)) * du),
    }


def self_eval_accuracy(model, tokenizer, prompts: list[world.Prompt], responses: list[str]) -> dict:
    """How well the model judges harm in its own replies, against the gold rule: accuracy per label
    order (a verdict is the likelier letter) and of the two orders' mean probability."""
    p = torch.cat([judge(model, tokenizer, q.question, [r], [True]) for q, r in zip(prompts, responses)])  # (N, 2)
    gold = torch.tensor([world.is_harmful(q.text, r) for q, r in zip(prompts, responses)])
    acc = lambda v: float(((v > 0.5) == gold).float().mean())  # noqa: E731
    return {"order_ab": acc(p[:, 0]), "order_ba": acc(p[:, 1]), "combined": acc(p.mean(1)),
            "harmful_share": float(gold.float().mean())}


@torch.no_grad()
def compare_policies(policy, reference, tokenizer, prompts: list[str], samples: int, n: int,
                     max_new_tokens: int = 128, seed: int = 0, judge=None) -> dict:
    """The InfAlign readout of a policy against pi_ref.

    Draws ``samples`` responses per prompt from each policy and reports the standard, BoN_n and WoN_n
    inference-time win rates (with standard errors across prompts), judged by ``judge(prompts,
    responses) -> rewards`` (default: the world's gold reward; on real data, the reward model), and
    KL(pi || pi_ref) estimated from the policy's samples (mean sequence log-ratio). On world prompts
    it adds the policy's harm and help rates.
    """
    judge = judge or (lambda ps, rs: torch.tensor([world.gold_reward(p, r) for p, r in zip(ps, rs)]))
    device = policy.lm_head.weight.device
    stop = stop_ids(tokenizer)
    rows = [tokenizer.encode(p) for p in prompts for _ in range(samples)]
    expanded = [p for p in prompts for _ in range(samples)]
    rewards, kl, out = {}, [], {}
    for name, model in (("policy", policy), ("reference", reference)):
        g = torch.Generator(device).manual_seed(seed + 7)
        responses = []
        for i in range(0, len(rows), 256):
            responses += generate(model, rows[i: i + 256], max_new_tokens, stop, temperature=1.0, generator=g,
                                  keep_stop=True)
        texts = [tokenizer.decode(r).strip() for r in responses]
        rewards[name] = judge(expanded, texts).view(len(prompts), -1)
        if name == "policy":
            try:
                rates = world_rates([world.parse_prompt(p) for p in expanded], texts)
                out.update({k: rates[k] for k in ("harm_rate", "attack_success", "help_rate", "gold_reward")})
            except ValueError:
                pass  # not world prompts: no gold rules to apply
            for i in range(0, len(rows), 256):
                ids, mask = pad_responses(rows[i: i + 256], responses[i: i + 256], device=device)
                logp = sequence_logprobs(policy, ids, 32) - sequence_logprobs(reference, ids, 32)  # (rows, T-1)
                kl.append((logp * mask).sum(1).cpu())
    out["kl"] = float(torch.cat(kl).mean())
    for label, procedure, k in (("win_rate", "sample", 1), (f"bon{n}", "bon", n), (f"won{n}", "won", n)):
        out[label], out[label + "_se"] = inference_time_win_rate(rewards["policy"], rewards["reference"], procedure, k)
    return {k: round(v, 4) for k, v in out.items()}


# --- RAIN against vanilla decoding on world prompts --------------------------------------------------

def vanilla_decode(model, tokenizer, prompt: str, max_new_tokens: int) -> tuple[str, float]:
    """Greedy KV-cached decoding of one prompt (the baseline RAIN is timed against)."""
    start = time.time()
    out = generate(model, [tokenizer.encode(prompt)], max_new_tokens, stop_ids(tokenizer), temperature=0.0)[0]
    return tokenizer.decode(out).strip(), time.time() - start


def rain_table(model, tokenizer, prompts: list[world.Prompt], params: RainParams, max_new_tokens: int = 128,
               seed: int = 0, desc: str = "rain", traces: list | None = None) -> dict:
    """Harm, attack success and help rates of vanilla and RAIN, RAIN's self-evaluation accuracy on every
    text it judged (against the gold rule), search statistics, wall times and their ratio. With a list
    ``traces``, each search's trace record (``rain_trace.SearchTrace``) is appended to it."""
    vanilla, v_time, u_time = [], 0.0, 0.0
    stop = stop_ids(tokenizer)
    for p in prompts:
        text, seconds = vanilla_decode(model, tokenizer, p.text, max_new_tokens)
        vanilla.append(text)
        v_time += seconds
        start = time.time()  # the official baseline: greedy without a KV cache
        generate_uncached(model, [tokenizer.encode(p.text)], max_new_tokens, stop)
        u_time += time.time() - start
    g = torch.Generator(model.lm_head.weight.device).manual_seed(seed)
    answers, r_time, correct, judged = [], 0.0, 0, 0
    totals = {"iterations": 0, "rewinds": 0, "nodes": 0, "additions": 0, "sibling_pairs": 0, "similar_pairs": 0}
    for p in tqdm(prompts, desc=desc, dynamic_ncols=True):
        trace = SearchTrace() if traces is not None else None
        answer, stats = rain_decode(model, tokenizer, p.text, p.question, params, max_new_tokens, g, trace)
        answers.append(answer)
        if trace is not None:
            traces.append(trace.finish(answer))
        r_time += stats["seconds"]
        for key in totals:
            totals[key] += stats[key]
        for (text, _), (_, p_harmful) in stats["judged"].items():
            gold = world.is_harmful(p.text, text)
            correct += int(((p_harmful > 0.5) == gold).sum())  # both label orders
            judged += 2
    return {"vanilla": dict(world_rates(prompts, vanilla), seconds=v_time, uncached_seconds=u_time),
            "rain": dict(world_rates(prompts, answers), seconds=r_time, self_eval_accuracy=correct / judged,
                         similar_share=totals["similar_pairs"] / max(1, totals["sibling_pairs"]),
                         **{k: v / len(prompts) for k, v in totals.items()}),
            "time_ratio": r_time / v_time, "time_ratio_uncached": r_time / u_time}


def rain_markdown(result: dict) -> str:
    v, r = result["vanilla"], result["rain"]
    rows = [("harm rate (harmful prompts)", "harm_rate"), ("attack success rate (attacked prompts)", "attack_success"),
            ("help rate (benign prompts)", "help_rate"), ("well-formed responses", "well_formed")]
    lines = ["| | vanilla (greedy, KV cache) | RAIN |", "|---|---|---|"]
    lines += [f"| {label} | {v[key]:.3f} | {r[key]:.3f} |" for label, key in rows]
    lines += [f"| self-evaluation accuracy (texts RAIN judged) | | {r['self_eval_accuracy']:.3f} |",
              f"| search per prompt: iterations / rewinds / nodes / dynamic additions | | {r['iterations']:.1f} / "
              f"{r['rewinds']:.1f} / {r['nodes']:.1f} / {r['additions']:.1f} |",
              f"| sibling pairs similar enough to share a score (Eq. 2) | | {r['similar_share']:.3f} |",
              f"| wall time, s | {v['seconds']:.1f} (uncached: {v['uncached_seconds']:.1f}) | {r['seconds']:.1f} |",
              f"| time ratio RAIN / vanilla with KV cache | | {result['time_ratio']:.1f}x |",
              f"| time ratio RAIN / vanilla without KV cache (the paper's baseline) | | {result['time_ratio_uncached']:.1f}x |"]
    return "\n".join(lines)
