"""InfAlign at the exact optimum, as an experiment (``python -m minialign.lab tilt``).

``tilt.py`` computes the optimum pi* ∝ pi_ref exp(Phi(C_hat) / beta) on a finite support; this file
uses it on the world: K samples of pi_ref per prompt as the support, every transform at matched KL
under three (selector, judge) views, rewards of controlled quality (how good must r be?), and trained
CTRL checkpoints beside their own optima (``yardstick.py``). It writes ``out/tilt.{csv,md,png}``,
``out/tilt_reward_quality.md`` and ``out/tilt_trained.md``.
"""
import torch

from .. import tilt, world
from ..checkpoint import atomic_write_text, load_model, pyplot, save_figure, write_csv
from ..reward_model import prompt_scale, score
from ..sampling import complete
from .yardstick import calibration_of, exact_support, trained_against_optimum, trained_markdown, transform_label

TILT_TRANSFORMS = (("raw", 0.0), ("raw, scaled", 0.0), ("identity", 0.0), ("log", 0.0), ("exp", 2.0), ("exp", 4.0), ("exp", 8.0),
                   ("exp", -2.0), ("exp", -4.0), ("exp", -8.0))
TILT_VIEWS = (("r", "r"), ("gold", "gold"), ("r", "gold"))  # (selector, judge); (r, r) is the paper's
TILT_KLS = (0.25, 0.5, 1.0)


def tilt_support(model, reward_model, tokenizer, prompts: list[world.Prompt], k: int, seed: int) -> dict:
    """K samples of pi_ref per prompt with their reward-model and gold rewards, (P, K) each, and each
    prompt's scale for "raw, scaled" (P, 1)."""
    g = torch.Generator(model.lm_head.weight.device).manual_seed(seed)
    texts = [p.text for p in prompts for _ in range(k)]
    responses = complete(model, tokenizer, texts, 128, batch_size=256, temperature=1.0, generator=g)
    r = score(reward_model, tokenizer, texts, responses).double().view(len(prompts), k)
    gold = torch.tensor([world.gold_reward(t, y) for t, y in zip(texts, responses)], dtype=torch.float64)
    styles = [world.graded_style(t, y) for t, y in zip(texts, responses)]
    return {"r": r, "gold": gold.view_as(r), "styles": [styles[i: i + k] for i in range(0, len(styles), k)],
            "scale": prompt_scale([p.text for p in prompts])[:, None]}


def phi_of(transform: str, t: float, selector: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Phi(C_hat) of a transform (P, K); "raw, scaled" is the raw reward seen with each prompt's ``scale``
    (P, 1), as ``--reward scaled`` trains on it (InfAlign's reason to calibrate: a per-prompt offset
    cancels in each prompt's softmax, a scale does not, and every calibrated transform is unchanged by both)."""
    if transform != "raw, scaled":
        return tilt.transformed(transform, t, selector)
    return selector * scale  # (P, K)


def tilt_rows(support: dict, n: int, kls=TILT_KLS) -> list[dict]:
    """For each view, transform and KL: the exact optimum's win rates (mean ± SE over prompts)."""
    rows = []
    for selector, judge in TILT_VIEWS:
        s, j = support[selector], support[judge]
        for transform, t in TILT_TRANSFORMS:
            phi = phi_of(transform, t, s, support["scale"])
            for kl in kls:
                inverse_beta = tilt.inverse_beta_at_kl(phi, kl)
                rows.append({"selector": selector, "judge": judge, "transform": transform, "t": t,
                             "target_kl": kl, "beta": 1 / inverse_beta, **tilt.readout(phi, inverse_beta, s, j, n)})
    return rows


def tilt_markdown(rows: list[dict], n: int) -> str:
    """One table per view: BoN_n and WoN_n win rates at each KL, the standard win rate at the middle KL."""
    kls = sorted({r["target_kl"] for r in rows})
    out = []
    for selector, judge in TILT_VIEWS:
        view = [r for r in rows if (r["selector"], r["judge"]) == (selector, judge)]
        out += [f"**selected by {selector}, judged by {judge}**", "",
                "| transform | " + " | ".join(f"BoN_{n} @ KL {k:g}" for k in kls) + " | "
                + " | ".join(f"WoN_{n} @ KL {k:g}" for k in kls) + f" | win rate @ KL {kls[len(kls) // 2]:g} |",
                "|---|" + "---|" * (2 * len(kls) + 1)]
        for transform, t in TILT_TRANSFORMS:
            cells = {r["target_kl"]: r for r in view if (r["transform"], r["t"]) == (transform, t)}
            fmt = lambda key, k: f"{cells[k][key]:.3f} ± {cells[k][key + '_se']:.3f}"  # noqa: E731
            out.append(f"| {transform_label(transform, t)} | " + " | ".join(fmt("bon", k) for k in kls) + " | "
                       + " | ".join(fmt("won", k) for k in kls) + f" | {fmt('win_rate', kls[len(kls) // 2])} |")
        out.append("")
    return "\n".join(out)


def plot_tilt(support: dict, n: int, path: str, kls=tuple(0.02 * i for i in range(1, 76))) -> None:
    """BoN_n and WoN_n win rate against KL for every view, the exact optima as curves."""
    plt = pyplot()
    if plt is None:
        return
    shown = [("raw", 0.0), ("raw, scaled", 0.0), ("identity", 0.0), ("log", 0.0), ("exp", 4.0), ("exp", 8.0), ("exp", -4.0), ("exp", -8.0)]
    fig, axes = plt.subplots(2, len(TILT_VIEWS), figsize=(14, 8), sharex=True)
    for col, (selector, judge) in enumerate(TILT_VIEWS):
        s, j = support[selector], support[judge]
        for transform, t in shown:
            phi = phi_of(transform, t, s, support["scale"])
            points = [tilt.readout(phi, inverse_beta, s, j, n) for inverse_beta in (tilt.inverse_beta_at_kl(phi, k) for k in kls)
                      if inverse_beta != float("inf")]
            for row, key in enumerate(("bon", "won")):
                axes[row, col].plot([p["kl"] for p in points], [p[key] for p in points],
                                    label=transform_label(transform, t), ls="--" if t < 0 else "-")
        for row, key in enumerate((f"best-of-{n}", f"worst-of-{n}")):
            ax = axes[row, col]
            ax.axhline(0.5, color="grey", lw=0.8, ls=":")
            ax.set_title(f"{key}: selected by {selector}, judged by {judge}", fontsize=10)
            ax.set_xlabel("KL(pi* || pi_ref), nats")
            ax.set_ylabel(f"{key} win rate vs pi_ref")
            ax.legend(fontsize=7)
    fig.suptitle("Exact optimum pi* ∝ pi_ref exp(Phi(C_hat) / beta) on K samples of pi_ref per held-out prompt")
    save_figure(fig, path)


def style_agreement(selector: torch.Tensor, gold: torch.Tensor, styles: list[list[str]]) -> dict:
    """How often a reward orders a pair of one prompt's samples as gold does, among pairs gold does not
    tie: pairs of one graded style (within) and of two different styles (between)."""
    counts = {"within": [0, 0], "between": [0, 0]}
    for s, g, st in zip(selector.tolist(), gold.tolist(), styles):
        for a in range(len(s)):
            for b in range(a):
                if g[a] != g[b]:
                    tally = counts["within" if st[a] == st[b] else "between"]
                    tally[0] += 0.5 if s[a] == s[b] else float((s[a] > s[b]) == (g[a] > g[b]))  # a tie: half
                    tally[1] += 1
    return {key: agree / max(1, total) for key, (agree, total) in counts.items()}


def noisy_gold(gold: torch.Tensor, styles: list[list[str]], within: float, between: float, seed: int) -> torch.Tensor:
    """A reward model of known quality: gold + within * eps (one draw per sample, so it reorders samples
    of one style) + between * eta (one draw per prompt and style, shared by the style's samples, so it
    reorders styles and leaves each style's inner order intact)."""
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(gold.shape, generator=g, dtype=torch.float64)
    shift = torch.tensor([[{name: i for i, name in enumerate(sorted(set(row)))}[x] for x in row] for row in styles])
    eta = torch.randn(gold.size(0), int(shift.max()) + 1, generator=g, dtype=torch.float64).gather(1, shift)
    return gold + within * eps + between * eta


QUALITY_GRID = [(0.0, 0.0), (0.01, 0.0), (0.02, 0.0), (0.05, 0.0), (0.1, 0.0), (0.2, 0.0), (0.5, 0.0),
                (0.0, 0.2), (0.0, 0.5), (0.0, 1.0), (0.5, 1.0)]  # (within, between) noise on gold


def quality_row(label: str, selector: torch.Tensor, support: dict, n: int, kl: float) -> dict:
    """One selecting reward: its agreement with gold, and the gold-judged BoN_n / WoN_n at KL ``kl`` of
    the raw, identity and exp(+-4) optima it selects."""
    row = {"reward": label, **style_agreement(selector, support["gold"], support["styles"])}
    for transform, t in (("raw", 0.0), ("identity", 0.0), ("exp", 4.0), ("exp", -4.0)):
        phi = tilt.transformed(transform, t, selector)
        exact = tilt.readout(phi, tilt.inverse_beta_at_kl(phi, kl), selector, support["gold"], n)
        row[f"bon_{transform_label(transform, t)}"] = exact["bon"]
        row[f"won_{transform_label(transform, t)}"] = exact["won"]
    return row


def reward_quality_rows(support: dict, n: int, kl: float = 0.5, seeds=(0, 1, 2)) -> list[dict]:
    """``quality_row`` for the trained r, and for gold plus each ``QUALITY_GRID`` noise (averaged over
    the noise ``seeds``)."""
    rows = [quality_row("trained r", support["r"], support, n, kl)]
    for within, between in QUALITY_GRID:
        draws = [quality_row("", noisy_gold(support["gold"], support["styles"], within, between, seed), support, n, kl)
                 for seed in seeds]
        rows.append({key: sum(d[key] for d in draws) / len(draws) for key in draws[0] if key != "reward"}
                    | {"reward": f"gold + noise ({within:g} within, {between:g} between)"})
    return rows


def reward_quality_markdown(rows: list[dict], n: int, kl: float = 0.5) -> str:
    lines = [f"| selecting reward | agreement with gold, within style | between styles | BoN_{n}: raw | identity "
             f"| exp(+4) | exp(+4) - raw | WoN_{n}: raw | identity | exp(-4) | exp(-4) - raw |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['reward']} | {r['within']:.3f} | {r['between']:.3f} | {r['bon_raw']:.3f} | "
                     f"{r['bon_identity']:.3f} | {r['bon_exp(+4)']:.3f} | {r['bon_exp(+4)'] - r['bon_raw']:+.3f} | "
                     f"{r['won_raw']:.3f} | {r['won_identity']:.3f} | {r['won_exp(-4)']:.3f} | "
                     f"{r['won_exp(-4)'] - r['won_raw']:+.3f} |")
    return f"Exact optima at KL {kl:g}, judged by gold:\n\n" + "\n".join(lines)


def exact_tilt(model, reward_model, tokenizer, prompts: list[world.Prompt], cfg) -> list[dict]:
    """The ``tilt`` experiment (``cfg``: ``experiments.ExperimentConfig``): out/tilt.{csv,md,png},
    out/tilt_reward_quality.md and, for each ``cfg.ctrl`` checkpoint, out/tilt_trained.md."""
    support = tilt_support(model, reward_model, tokenizer, prompts, cfg.k, cfg.seed)
    rows = tilt_rows(support, cfg.n)
    write_csv(rows, f"{cfg.out_dir}/tilt.csv")
    table = tilt_markdown(rows, cfg.n)
    atomic_write_text(f"{cfg.out_dir}/tilt.md", table + "\n")
    print(table)
    plot_tilt(support, cfg.n, f"{cfg.out_dir}/tilt.png")
    quality = reward_quality_markdown(reward_quality_rows(support, cfg.n), cfg.n)
    atomic_write_text(f"{cfg.out_dir}/tilt_reward_quality.md", quality + "\n")
    print(quality)
    tables, exact = [], None
    for name in filter(None, cfg.ctrl.split(",")):
        policy, meta = load_model(f"{cfg.out_dir}/{name}", "python train.py --stage ctrl, or pass --ctrl ''")
        policy.to(model.lm_head.weight.device).eval()
        exact = exact or exact_support(model, reward_model, tokenizer, prompts, cfg.support_draws, cfg.seed)
        trained = trained_against_optimum(policy, model, reward_model, tokenizer, prompts, exact, meta["config"], cfg.n,
                                          cfg.policy_samples, cfg.seed, calibration_of(cfg.out_dir, meta["config"], prompts))
        tables.append(trained_markdown(trained, meta["config"], cfg.n))
    if tables:
        atomic_write_text(f"{cfg.out_dir}/tilt_trained.md", "\n\n".join(tables) + "\n")
        print("\n\n".join(tables))
    return rows
