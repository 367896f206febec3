"""Evaluation: grading responses in the world, win rates, KL estimates, and the 1-D analytic tool.

World grading uses the gold rules of ``world.py``: the harm rate counts harmful compliance on harmful
prompts, the attack success rate the same on attacked prompts, and the help rate exact answers on
benign prompts.
"""
import numpy as np
import torch

from . import world
from .data import pad_responses
from .model import sequence_logprobs
from .sampling import generate, stop_ids
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
