"""The reward CTRL optimises: the calibrated reward C_hat and its transforms Phi (InfAlign).

InfAlign's calibrated reward is the win rate of y against a reference sample:

    C(x, y) = P_{z ~ pi_ref}[r(x, z) < r(x, y)] + 0.5 * P[r(x, z) = r(x, y)].

It is estimated once, offline, from K reference responses per training prompt: their rewards are
sorted and cached (``out/calibration``), and ``C_hat`` counts with two ``searchsorted`` calls:

    C_hat(x, y) = (#{k: r_k < r} + 0.5 * #{k: r_k = r}) / K.

C_hat lies in [0, 1], averages exactly 1/2 over the reference samples themselves, and is unchanged by
any strictly increasing transform of r (even one per prompt): only the order of rewards matters.
``smoothed`` adds half a pseudo-sample on each side, (count + 0.5) / (K + 1), so the log and
negative-exponent transforms never see exactly 0 or 1.

CTRL then trains on Phi(C_hat) for one of the transforms (InfAlign section 4; ``transformed_reward``):

    raw       R = r(x, y)                      standard RLHF (the baseline; not calibrated)
    identity  R = C_hat                        calibrated RLHF: optimal for the standard win rate
    log       R = log C_hat                    with beta = 1/(N-1) its optimum is BoN_N of pi_ref
    exp       R = sign(t) * exp(t * C_hat)     t > 0 aims at best-of-N, t < 0 at worst-of-N

This file is pure arithmetic on reward tensors, shared by the CTRL stage and the exact optimum (``tilt``).
"""
import torch


def calibrated(sorted_rewards: torch.Tensor, rewards: torch.Tensor, smoothed: bool = False) -> torch.Tensor:
    """C_hat for rewards (B, M) against each row's sorted reference rewards (B, K): values (B, M)."""
    less = torch.searchsorted(sorted_rewards, rewards, side="left").float()  # #{k: r_k < r}
    not_greater = torch.searchsorted(sorted_rewards, rewards, side="right").float()  # #{k: r_k <= r}
    count = less + 0.5 * (not_greater - less)  # ties count one half
    K = sorted_rewards.size(-1)
    return (count + 0.5) / (K + 1) if smoothed else count / K


TRANSFORMS = ("raw", "identity", "log", "exp")


def transformed_reward(transform: str, t: float, raw: torch.Tensor, sorted_reference: torch.Tensor) -> torch.Tensor:
    """R = Phi(C_hat) for rewards raw (P, G) against each prompt's sorted reference rewards (P, K).

    The log and negative-exponent transforms use the smoothed C_hat, never exactly 0 or 1.
    """
    if transform == "raw":
        return raw
    smoothed = transform == "log" or (transform == "exp" and t < 0)
    return transform_calibrated(transform, t, calibrated(sorted_reference, raw, smoothed=smoothed))  # (P, G)


def transform_calibrated(transform: str, t: float, u: torch.Tensor) -> torch.Tensor:
    """Phi(u) of calibrated rewards u in (0, 1] for the calibrated transforms (identity, log, exp)."""
    if transform == "identity":
        return u
    if transform == "log":
        return torch.log(u)
    if transform == "exp":
        return torch.sign(torch.tensor(t)) * torch.exp(t * u)  # InfAlign: Phi_t(u) = sign(t) e^{t u}
    raise ValueError(f"unknown reward transform {transform!r}; choose one of: {', '.join(TRANSFORMS)}.")
