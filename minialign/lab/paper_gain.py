"""InfAlign's headline gain at the exact optimum, beside the paper's figures (``python -m minialign.lab paper-gain``).

The paper reports what its transform gains in inference-time win rate over alignment that ignores the
inference procedure: +8-12% (best-of-N, Anthropic HH helpfulness) and +4-9% (worst-of-N, harmlessness)
in its first version's abstract, "up to 3-8%" in the ICML version's. The abstracts do not say whether
these are points of win rate or relative gains; this table reads them as points. For N = 2, 4 and 8:

1. t_N from the 1-D tool (``evaluate.analytic``, continuous rewards, no data): the exponent of
   exp(t u) whose optimum has the highest BoN_N win rate at the table's KL, over ``T_GRID`` (and -t_N,
   over the negated grid, for WoN_N), each transform's beta found by bisection to that KL;
2. on K pi_ref samples per held-out prompt (``tilt_study.tilt_support``), the exact optima
   pi_ref exp(Phi(C_hat) / beta) of exp(+-t_N), raw RLHF and log (the best-of-N distillation baseline),
   each at the beta that gives it the table's KL, r selecting and judging (the paper's view) and gold
   selecting and judging (a perfect reward model);
3. the gains exp(+t_N) - raw and exp(+t_N) - log at BoN_N, exp(-t_N) - raw and - log at WoN_N, each ±
   the standard error of its per-prompt differences (the transforms are compared on the same prompts).

These are optima: what CTRL reaches when its solver converges (``ctrl-levers`` and ``infalign`` measure
how far trained policies stay from them; ``paper-gain-trained`` trains this table's transforms). The table goes to ``<out_dir>/paper_gain.md``.
"""
import numpy as np

from .. import tilt
from ..evaluate import analytic
from .tilt_study import phi_of, tilt_support

NS = (2, 4, 8)
KLS = (0.5, 1.0)  # the matched KLs; 1.0 is about BoN_4's own KL (log 4 - 3/4 = 0.64) and below BoN_8's (1.20)
T_GRID = tuple(float(t) for t in range(1, 41))  # the win rates are flat near their best t: a step of 1 is enough
PAPER = {"bon": "+8-12 (v1), up to 3-8 (ICML)", "won": "+4-9 (v1), up to 3-8 (ICML)"}


def beta_at_kl(phi, kl: float, n: int) -> float:
    """The beta whose continuous optimum of ``phi`` has KL ``kl`` (bisection on log beta: the KL falls
    as beta grows), bracketed around the transform's own scale (exp(40 u) reaches 2e17)."""
    scale = float(np.abs(phi(np.array([1e-3, 1.0]))).max())  # log(u) is -inf at 0
    low, high = 1e-6 * scale, 1e6 * scale
    for _ in range(50):
        middle = (low * high) ** 0.5
        low, high = (middle, high) if analytic(phi, middle, n, grid=20_000)["kl"] > kl else (low, middle)
    return (low * high) ** 0.5


def best_t(n: int, kl: float, sign: int) -> float:
    """t_N: the exponent in ``T_GRID`` (times ``sign``) whose continuous exp(t u) optimum at KL ``kl`` has the
    highest BoN_n (sign +1) or WoN_n (sign -1) win rate, by the 1-D tool."""
    key = "bon" if sign > 0 else "won"

    def rate(t: float) -> float:
        phi = lambda u: np.sign(t) * np.exp(t * u)  # noqa: E731  (the exp transform, spec: Phi_t(u) = sign(t) exp(t u))
        return analytic(phi, beta_at_kl(phi, kl, n), n, grid=20_000)[key]
    return max((sign * t for t in T_GRID), key=rate)


def gain_rows(support: dict, ns=NS, kls=KLS) -> list[dict]:
    """For each procedure (bon, won), N and KL: t_N and, per view, the gains of exp(t_N) over raw and
    over log at the exact optimum, with paired standard errors over prompts."""
    rows = []
    for key, sign in (("bon", 1), ("won", -1)):
        for n in ns:
            for kl in kls:
                t = best_t(n, kl, sign)
                row = {"procedure": key, "n": n, "kl": kl, "t": t}
                for view in ("r", "gold"):
                    s = support[view]
                    rates = {}
                    for transform, t_of in (("exp", t), ("raw", 0.0), ("log", 0.0)):
                        phi = phi_of(transform, t_of, s, support["scale"])
                        rates[transform] = tilt.per_prompt(phi, tilt.inverse_beta_at_kl(phi, kl), s, s, n)[key]  # (P,)
                    row[f"{view}_exp"] = float(rates["exp"].mean())
                    for baseline in ("raw", "log"):
                        diff = rates["exp"] - rates[baseline]  # (P,) paired: the same prompts
                        row[f"{view}_over_{baseline}"] = float(diff.mean())
                        row[f"{view}_over_{baseline}_se"] = float(diff.std() / len(diff) ** 0.5)
                rows.append(row)
    return rows


def gain_markdown(rows: list[dict], prompts: int, k: int) -> str:
    """One table per procedure: the gains in points of win rate (x 100) beside the paper's."""
    out = [f"Exact optima on {prompts} held-out prompts, a support of {k} pi_ref samples each; gains in points "
           "of inference-time win rate (x 100), ± paired standard error over prompts; t_N by the 1-D tool:", ""]
    for key, title in (("bon", "best-of-N (the transform exp(+t_N))"), ("won", "worst-of-N (the transform exp(-t_N))")):
        out += [f"**{title}**", "",
                "| N | KL | t_N | r: win rate | gain over raw | gain over log | gold: win rate | gain over raw "
                "| gain over log | paper |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["procedure"] == key):
            cells = []
            for view in ("r", "gold"):
                cells.append(f"{r[f'{view}_exp']:.3f}")
                cells += [f"{100 * r[f'{view}_over_{b}']:+.1f} ± {100 * r[f'{view}_over_{b}_se']:.1f}" for b in ("raw", "log")]
            edge = " (the grid's edge)" if abs(r["t"]) == max(T_GRID) else ""
            out.append(f"| {r['n']} | {r['kl']:g} | {r['t']:+g}{edge} | " + " | ".join(cells) + f" | {PAPER[key]} |")
        out.append("")
    return "\n".join(out)


def paper_gain(model, reward_model, tokenizer, prompts, cfg) -> str:
    """The experiment (``cfg``: ``experiments.ExperimentConfig``): the support, the gains, the table."""
    support = tilt_support(model, reward_model, tokenizer, prompts, cfg.k, cfg.seed)
    return gain_markdown(gain_rows(support), len(prompts), cfg.k)
