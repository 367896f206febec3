"""The exact tilted optimum on an empirical support: what CTRL should reach, computed without RL.

RLHF with reward R has the optimum pi*(y|x) ∝ pi_ref(y|x) exp(R(x, y) / beta) (InfAlign, and the
spec's "exact finite check"). Take K samples of pi_ref for a prompt as its support, each of mass 1/K:
the optimum is then a softmax over those samples, and every quantity InfAlign compares is a finite
sum, exact, with no sampling noise:

    weights  w_k = softmax_k(Phi(C_hat_k) / beta)                       (P, K)
    KL       sum_k w_k log(K w_k)
    win rate W(T(pi) > T(pi_ref)) with T = sample, BoN_N or WoN_N applied to both sides, ties 1/2.

Two rewards play separate parts, and InfAlign's theorem is about them being the same one:

- the *selector* s: the reward the policy is aligned to (its C_hat, transformed) and the one BoN_N /
  WoN_N pick by;
- the *judge* j: the reward the win rate is measured with.

The paper's view is (r, r): the reward model selects and judges. (gold, gold) is the same theory with
a perfect reward model, and (r, gold) is a deployment graded by the truth. ``python -m
minialign.lab tilt`` tabulates all three.

C_hat is each sample's quantile among the support itself (``calibrated_reward.transformed_reward`` against the support's
own sorted rewards): the calibration of the empirical pi_ref, never exactly 0 with ties counted half.

A support may also carry its own pi_ref weights (``reference``, (P, K), each row summing to 1; 0 on
padding): a prompt's *distinct* responses with their exact probabilities under pi_ref
(``lab/tilt_study.exact_support``). The optimum is then w ∝ reference * exp(Phi / beta) and the KL
sum_k w_k log(w_k / reference_k); uniform weights 1/K give the sample support above.
"""
import math

import torch

from .calibrated_reward import transformed_reward
from .evaluate import mean_and_se, win_rates


def transformed(transform: str, t: float, selector: torch.Tensor) -> torch.Tensor:
    """Phi(C_hat) of each support sample (P, K), C_hat taken against the support itself; raw = s."""
    s = selector.double()
    return transformed_reward(transform, t, s, s.sort(dim=1).values).double()


def uniform(phi: torch.Tensor) -> torch.Tensor:
    """pi_ref on a sample support: 1/K on each of the K samples. (P, K) -> (P, K)."""
    return torch.full_like(phi, 1.0 / phi.size(1))


def tilt(phi: torch.Tensor, inverse_beta: float, reference: torch.Tensor | None = None) -> torch.Tensor:
    """The RLHF optimum on the support: w ∝ reference * exp(Phi / beta), per prompt, with pi_ref's
    ``reference`` weights (default: uniform). (P, K) -> (P, K). At beta = 0 (``inverse_beta`` infinite)
    its limit: pi_ref restricted to each prompt's highest Phi among the responses it can give."""
    reference = uniform(phi) if reference is None else reference
    if math.isinf(inverse_beta):
        possible = reference > 0
        best = phi.masked_fill(~possible, -math.inf).max(dim=1, keepdim=True).values
        top = reference * ((phi == best) & possible)
        return top / top.sum(dim=1, keepdim=True)
    return torch.softmax(reference.log() + phi * inverse_beta, dim=1)  # log 0 = -inf: padding keeps no mass


def kl_to_reference(weights: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
    """KL(pi || pi_ref) per prompt between weights over one support: (P, K) (and pi_ref's, default
    uniform) -> (P,)."""
    reference = uniform(weights) if reference is None else reference
    return (torch.xlogy(weights, weights) - torch.xlogy(weights, reference)).sum(1)  # 0 log 0 = 0


def per_prompt(phi: torch.Tensor, inverse_beta: float, selector: torch.Tensor, judge: torch.Tensor, n: int,
               reference: torch.Tensor | None = None) -> dict:
    """KL and the standard, BoN_n and WoN_n win rates of the tilted policy against pi_ref (``reference``,
    default uniform), per prompt: (P,) each."""
    reference = uniform(phi) if reference is None else reference
    w = tilt(phi, inverse_beta, reference)
    return {"kl": kl_to_reference(w, reference), **win_rates(w, reference, selector, judge, n)}


def readout(phi: torch.Tensor, inverse_beta: float, selector: torch.Tensor, judge: torch.Tensor, n: int,
            reference: torch.Tensor | None = None) -> dict:
    """Mean over prompts of ``per_prompt``'s KL and win rates, each with its standard error across
    prompts (``<key>_se``)."""
    return mean_and_se(per_prompt(phi, inverse_beta, selector, judge, n, reference))


def inverse_beta_at_kl(phi: torch.Tensor, target: float, reference: torch.Tensor | None = None, low: float = 1e-4,
                       high: float = 1e6) -> float:
    """The 1/beta whose optimum has mean KL ``target``: bisection on log(1/beta), since the KL of a
    tilt grows monotonically with 1/beta. Infinite (math.inf) past the largest KL the support allows.
    The bracket's low end is ``low`` over the widest prompt's spread of Phi: exp(t u) spans e^t, so a
    large t needs a 1/beta far below ``low`` for the same KL."""
    low = low / max(1.0, float((phi.max(1).values - phi.min(1).values).max()))
    mean_kl = lambda lam: float(kl_to_reference(tilt(phi, lam, reference), reference).mean())  # noqa: E731
    if mean_kl(high) < target:
        return math.inf
    for _ in range(80):
        middle = math.sqrt(low * high)
        low, high = (middle, high) if mean_kl(middle) < target else (low, middle)
    return math.sqrt(low * high)
