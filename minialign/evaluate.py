"""Evaluation: grading responses in the world, win rates, KL estimates and the 1-D analytic tool
(RAIN's evaluation table is in ``fast/rain_eval.py``).

World grading uses the gold rules of ``world.py``: the harm rate counts harmful compliance on harmful
prompts, the attack success rate the same on attacked prompts, and the help rate exact answers on
benign prompts.
"""
import numpy as np
import torch

from . import world
from .data import pad_with_lengths
from .model import sequence_logprobs
from .sampling import generate, response_text, stop_ids
from .selfeval import self_evaluate


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
# Win rates (InfAlign), exact over a finite support: ties count one half, T picks by a selector reward.

PROCEDURES = ("sample", "bon", "won")


def mass_below(values: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each support sample k: the mass of samples with a value < v_k and with a value <= v_k. (P, K) each."""
    order = values.argsort(dim=1)
    sorted_values = values.gather(1, order)
    cumulative = torch.nn.functional.pad(weights.gather(1, order).cumsum(1), (1, 0))  # (P, K + 1), starts at 0
    less = cumulative.gather(1, torch.searchsorted(sorted_values, values, side="left"))
    not_greater = cumulative.gather(1, torch.searchsorted(sorted_values, values, side="right"))
    return less, not_greater


def pick_distribution(weights: torch.Tensor, selector: torch.Tensor, procedure: str, n: int) -> torch.Tensor:
    """P(T returns support sample k) when T draws n samples from ``weights`` and keeps the one with the
    highest (bon) or lowest (won) selector reward, a tie broken uniformly at random. (P, K) -> (P, K).

    The kept value v has P = G(v)^n - G(v-)^n for bon (G the selector's CDF under the weights), and
    1 - (1 - G)^n likewise for won; among samples with the same value, each is kept in proportion to
    its own weight."""
    if procedure == "sample":
        return weights
    less, not_greater = mass_below(selector, weights)
    if procedure == "bon":
        value_mass = not_greater ** n - less ** n
    elif procedure == "won":
        value_mass = (1 - less) ** n - (1 - not_greater) ** n
    else:
        raise ValueError(f"unknown procedure {procedure!r}: {', '.join(PROCEDURES)}")
    tied = not_greater - less  # the weight of all samples that share v_k's value
    return torch.where(tied > 0, weights / tied.clamp_min(1e-300) * value_mass, torch.zeros_like(weights))


def win_rate(policy_pick: torch.Tensor, reference_pick: torch.Tensor, judge: torch.Tensor) -> torch.Tensor:
    """W(a > b) = P(j(a) > j(b)) + 1/2 P(j(a) = j(b)) for a ~ policy_pick, b ~ reference_pick over one
    support per prompt. (P, K) each -> (P,)."""
    less, not_greater = mass_below(judge, reference_pick)
    return (policy_pick * (less + 0.5 * (not_greater - less))).sum(1)


def win_rates(policy: torch.Tensor, reference: torch.Tensor, selector: torch.Tensor, judge: torch.Tensor,
              n: int) -> dict:
    """Per-prompt standard, BoN_n and WoN_n win rates of the ``policy`` weights against the ``reference``
    weights over one support, T picking by ``selector`` and the win judged by ``judge``. (P, K) -> (P,) each."""
    return {label: win_rate(pick_distribution(policy, selector, procedure, n),
                            pick_distribution(reference, selector, procedure, n), judge)
            for label, procedure in (("win_rate", "sample"), ("bon", "bon"), ("won", "won"))}


def mean_and_se(per_prompt: dict) -> dict:
    """Each per-prompt value's mean over prompts, and its standard error as ``<key>_se``."""
    out = {}
    for key, values in per_prompt.items():
        out[key] = float(values.mean())
        out[key + "_se"] = float(values.std() / len(values) ** 0.5) if len(values) > 1 else 0.0
    return out


def sampled_win_rates(policy: tuple[torch.Tensor, torch.Tensor], reference: tuple[torch.Tensor, torch.Tensor],
                      n: int) -> dict:
    """Standard, BoN_n and WoN_n win rates (mean over prompts, ± SE as ``<key>_se``) of a policy known
    by its samples: ``policy`` and ``reference`` are the (selector, judge) rewards of M and K samples
    per prompt, (P, M) and (P, K). Both sample sets form one support; each side puts its mass uniformly
    on its own samples, so T(pi) draws n of pi's samples with replacement and the rates are exact for
    the empirical distributions (no Monte Carlo over groups): at pi = pi_ref they are exactly 1/2."""
    (ps, pj), (rs, rj) = ((s.double(), j.double()) for s, j in (policy, reference))  # exact sums in float64
    M, K = ps.size(1), rs.size(1)
    on_policy = torch.cat([torch.full_like(ps, 1.0 / M), torch.zeros_like(rs)], 1)  # (P, M + K)
    on_reference = torch.cat([torch.zeros_like(ps), torch.full_like(rs, 1.0 / K)], 1)
    return mean_and_se(win_rates(on_policy, on_reference, torch.cat([ps, rs], 1), torch.cat([pj, rj], 1), n))


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
    p = torch.cat([self_evaluate(model, tokenizer, q.question, [r], [True]) for q, r in zip(prompts, responses)])  # (N, 2)
    gold = torch.tensor([world.is_harmful(q.text, r) for q, r in zip(prompts, responses)])
    acc = lambda v: float(((v > 0.5) == gold).float().mean())  # noqa: E731
    return {"order_ab": acc(p[:, 0]), "order_ba": acc(p[:, 1]), "combined": acc(p.mean(1)),
            "harmful_share": float(gold.float().mean())}


@torch.no_grad()
def sample_responses(model, tokenizer, prompts: list[str], samples: int, max_new_tokens: int, seed: int,
                     reference=None) -> tuple[list[str], torch.Tensor | None]:
    """``samples`` responses per prompt at temperature 1 (prompt-major texts) and, given a reference
    policy, each one's sequence log-ratio log pi(y|x) - log pi_ref(y|x) (N,): its mean estimates
    KL(pi || pi_ref) from the policy's own samples."""
    device = model.lm_head.weight.device
    stop = stop_ids(tokenizer)
    rows = [tokenizer.encode(p) for p in prompts for _ in range(samples)]
    g = torch.Generator(device).manual_seed(seed)
    responses, log_ratio = [], []
    for i in range(0, len(rows), 256):
        batch, drawn_with = generate(model, rows[i: i + 256], max_new_tokens, stop, temperature=1.0, generator=g,
                                     keep_stop=True, logprobs=True)
        responses += batch
        if reference is not None:  # log pi(y|x) as sampled, minus log pi_ref(y|x)
            ids, mask, lengths = pad_with_lengths(rows[i: i + 256], batch, device)  # (B, T), (B, T-1), (B,)
            logp_ref = (sequence_logprobs(reference, ids, 32, lengths) * mask).sum(1).cpu()  # (B,)
            log_ratio.append(torch.stack([d.sum() for d in drawn_with]).cpu() - logp_ref)
    log_ratio = torch.cat(log_ratio) if reference is not None else None
    return [response_text(tokenizer, r, stop) for r in responses], log_ratio


@torch.no_grad()
def compare_policies(policy, reference, tokenizer, prompts: list[str], samples: int, n: int, reward,
                     max_new_tokens: int = 128, seed: int = 0) -> dict:
    """The InfAlign readout of a policy against pi_ref, by both judges.

    Draws ``samples`` responses per prompt from each policy, scores them with ``reward(prompts,
    responses) -> r`` and, on world prompts, the gold reward. BoN_n and WoN_n pick by r, as deployed;
    the standard, BoN_n and WoN_n inference-time win rates are then judged by r (``<key>_r``, the
    paper's view, in which its theory is stated) and by gold (``<key>_gold``, the truth), each with a
    standard error across prompts. KL(pi || pi_ref) is estimated from the policy's samples (mean
    sequence log-ratio). On world prompts it adds the policy's harm and help rates.
    """
    expanded = [p for p in prompts for _ in range(samples)]
    judged, out = {}, {}
    for name, model in (("policy", policy), ("reference", reference)):
        texts, log_ratio = sample_responses(model, tokenizer, prompts, samples, max_new_tokens, seed + 7,
                                            reference if name == "policy" else None)
        judged[name] = {"r": reward(expanded, texts).double().view(len(prompts), -1)}
        try:
            prompts_of = [world.parse_prompt(p) for p in expanded]
        except ValueError:
            prompts_of = None  # not world prompts: no gold reward, no gold rules
        if prompts_of is not None:
            gold = [world.gold_reward(p, t) for p, t in zip(expanded, texts)]
            judged[name]["gold"] = torch.tensor(gold, dtype=torch.float64).view(len(prompts), -1)
        if name == "policy":
            out["kl"] = float(log_ratio.mean())
            if prompts_of is not None:
                rates = world_rates(prompts_of, texts)
                out.update({k: rates[k] for k in ("harm_rate", "attack_success", "help_rate", "gold_reward")})
    for by in judged["policy"]:  # "r", then "gold" where there is one
        rates = sampled_win_rates((judged["policy"]["r"], judged["policy"][by]),
                                  (judged["reference"]["r"], judged["reference"][by]), n)
        for key, label in (("win_rate", "win_rate"), ("bon", f"bon{n}"), ("won", f"won{n}")):
            out[f"{label}_{by}"], out[f"{label}_{by}_se"] = rates[key], rates[key + "_se"]
    return {k: round(v, 4) for k, v in out.items()}
