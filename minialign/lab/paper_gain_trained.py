"""InfAlign's gain at its size with trained CTRL policies (``python -m minialign.lab paper-gain-trained``).

``paper-gain`` measures the inference-aware transform's gain over raw RLHF and over log (best-of-N
distillation) at the exact optimum, for N = 2, 4 and 8; the paper's figures are for trained policies.
This experiment trains them, on the infalign study's workspace and solver (``infalign_study.py``: its
training prompts, calibration, yardstick and grid of betas), so that trained and optimal gains are read
on the same prompts at the same KL. For each N:

1. t_N by the 1-D tool (``paper_gain.best_t``) at the study's matched KL: exp(+t_N) for BoN_N, exp(-t_N)
   for WoN_N;
2. CTRL on exp(+t_N), exp(-t_N), raw and log at the two betas whose optima have the study's grid KLs,
   per seed (``--seeds``); a run the study or an earlier N already trained (same name and config) is
   reused;
3. each policy read against the exact optimum at the KL it reached, at BoN_N and WoN_N
   (``infalign_study.transform_runs``), and InfAlign's four comparisons at the matched KL
   (``infalign_study.gain_rows``): exp(+t_N) - raw and - log at BoN_N, exp(-t_N) - raw and - log at
   WoN_N, trained (± the standard error of the per-prompt differences) and at the optimum.

On ``--reward gold`` CTRL trains on gold and BoN/WoN pick by it (a perfect reward model). The tables go to
``<out_dir>/paper_gain_trained.md`` (``paper_gain_trained_gold.md``).
"""
import time

from ..checkpoint import atomic_write_text
from .infalign_study import GRID_KLS, JUDGES, MATCHED_KL, gain_rows, study_setup, transform_runs
from .paper_gain import NS, PAPER, best_t
from .yardstick import selector_of, transform_label

PROCEDURES = (("bon", 1), ("won", -1))  # (rate, the sign of t_N): exp(+t_N) aims at best-of-N, exp(-t_N) at worst-of-N


def trained_gains(cfg) -> str:
    """Train and read the transforms of every N in ``NS`` (``cfg``: ``experiments.ExperimentConfig``); the
    gains table (one row per procedure and N) and each run's KL and gap to its optimum, as markdown."""
    started = time.time()
    setup = study_setup(cfg)
    prompts, selector, seeds = setup[1], selector_of(cfg.reward), list(range(cfg.seeds))
    gain_lines = ["| procedure | N | t_N | " + " | ".join(f"gain over {b} by {j}: trained (optimum)"
                                                        for j in JUDGES for b in ("raw", "log")) + " | paper |",
                  "|---|---|---|" + "---|" * (2 * len(JUDGES) + 1)]
    run_lines = [f"| N | transform | optimum's KL at beta | seed | KL reached | BoN_N ({selector}): trained (gap) "
                 f"| WoN_N ({selector}): trained (gap) |", "|---|---|---|---|---|---|---|"]
    for n in NS:
        t = {key: best_t(n, MATCHED_KL, sign) for key, sign in PROCEDURES}  # t_N of each procedure
        transforms = [("raw", 0.0), ("log", 0.0), ("exp", t["bon"]), ("exp", t["won"])]
        optima, trained, gaps = {}, [], {}
        for transform, t_of in transforms:
            label = transform_label(transform, t_of)
            optima[label], runs, run_gaps, _ = transform_runs(setup, cfg, transform, t_of, n)
            trained += runs
            gaps.update(run_gaps)
            run_lines += [f"| {n} | {label} | {r['grid_kl']:g} | {r['seed']} | {r['kl']:.3f} | " + " | ".join(
                f"{r[f'{key}_{selector}']:.3f} ({r[f'{key}_{selector}'] - r[f'{key}_{selector}_at_kl']:+.3f})"
                for key, _ in PROCEDURES) + " |" for r in runs]
        compared = [(key, transform_label("exp", t[key]), baseline) for key, _ in PROCEDURES for baseline in ("raw", "log")]
        rows = gain_rows(trained, gaps, optima, seeds, gains=compared)  # bon - raw, bon - log, won - raw, won - log
        for key, _ in PROCEDURES:
            cells = [f"{100 * row[f'{key}_{j}']:+.1f} ± {100 * row[f'{key}_{j}_se']:.1f} "
                     f"({100 * row[f'{key}_{j}_optimum']:+.1f})" for j in JUDGES for row in rows if row["rate"] == key]
            gain_lines.append(f"| {'best' if key == 'bon' else 'worst'}-of-N | {n} | {t[key]:+g} | "
                              + " | ".join(cells) + f" | {PAPER[key]} |")
    minutes = (time.time() - started) / 60
    lines = [f"InfAlign's gain with trained CTRL at matched KL {MATCHED_KL:g} (trained on and picked by {selector}; "
             f"{len(prompts)} training prompts, {len(seeds)} seed(s); t_N by the 1-D tool at that KL): exp(+t_N) at "
             "BoN_N and exp(-t_N) at WoN_N minus raw RLHF and minus log, in points of win rate (x 100), trained ± the "
             "paired standard error over prompts (the exact optimum's gain at the same KL):", "", *gain_lines, "",
             f"Each run at the betas whose optima have KL {', '.join(f'{k:g}' for k in GRID_KLS)}: the KL it reached "
             "and its rates, with the gap to the exact optimum at that KL:", "", *run_lines, "",
             f"Wall time: {minutes:.1f} min."]
    table = "\n".join(lines)
    atomic_write_text(f"{cfg.out_dir}/paper_gain_trained{'_gold' if cfg.reward == 'gold' else ''}.md", table + "\n")
    return table
