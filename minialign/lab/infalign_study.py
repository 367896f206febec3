"""InfAlign with trained CTRL policies at matched KL (``python -m minialign.lab infalign``).

InfAlign's claim is about optima: at equal KL the optimum of exp(+t) has the best BoN_N win rate, the
optimum of exp(-t) the best WoN_N, and the calibrated transforms beat raw RLHF. ``tilt_study``
computes those optima exactly; this experiment asks whether *trained* policies show the same. It
trains where the RL can reach its optimum: on the default budget each of 192 prompts is visited about
three times and CTRL stops well below its optimum (``tilt``'s trained table); on a few prompts, every
one of them in every step, it comes closer. So:

1. A workspace ``<out_dir>/infalign`` whose ``sft`` and ``reward`` link to the pipeline's own, with r
   calibrated on ``--infalign_prompts`` training prompts (``--calibration_k`` pi_ref samples each). "raw,
   scaled" is raw RLHF on r times a per-prompt scale (``--reward scaled``), InfAlign's reason to
   calibrate: the calibrated transforms are unchanged by such a scale, so only raw is trained on it.
2. The yardstick (``yardstick.py``): pi_ref exact on the distinct responses of independent draws per
   training prompt, and each transform's optimum of the very reward its runs train on (C_hat against
   the study's calibration). For each transform, the betas whose optimum has KL ``GRID_KLS``.
3. CTRL at each (transform, beta) and seed, all prompts in every step. Each policy is then sampled
   (``--policy_samples`` per prompt): its KL and win rates against pi_ref, picked by r and judged by r
   (the paper's view) and by gold, beside the exact optimum at the KL it reached (the distance table),
   and its KL on each kind of prompt beside the optimum's (a calibrated optimum spends the same KL on
   every prompt, whatever r's scale there).
4. Matched KL: per transform and seed, the gap to the optimum interpolated linearly in KL between the
   grid's two runs to ``MATCHED_KL``, added to the optimum's rate there; mean ± standard error across
   every seed.
5. InfAlign's comparisons (``GAINS``): each transform's rate minus its baseline's at ``MATCHED_KL``, the
   same reading per prompt, with the standard error of the per-prompt differences (the transforms are
   trained and read on the same prompts), trained beside the exact optima's.

``--reward gold`` runs the same study on the world's gold reward in r's place (a perfect reward model:
CTRL trains on it, BoN/WoN pick by it, and the paper's judge is then gold itself), writing
``<out_dir>/infalign_gold.*``: whether the RL reaches the calibrated optima when the reward's order is
one the policy can learn. "raw, scaled" is left out there (its scale is r's).

A run whose checkpoint already holds its last step with the same config is not trained again: the
experiment resumes where it stopped.
"""
import math
import os
import time
from dataclasses import asdict

import torch

from .. import tilt, world
from ..calibrate import CalibrateConfig, calibration_folder, load_calibration, run_calibration
from ..checkpoint import CheckpointError, atomic_write_text, load_meta, load_model, pyplot, save_figure, write_csv
from ..ctrl import CTRLConfig, train_ctrl
from ..evaluate import mean_and_se
from ..reward_model import load_reward
from ..tokenizer import get_tokenizer
from ..training import pick_device
from .yardstick import (calibration_of, exact_support, selector_of, trained_against_optimum, training_phi,
                        transform_label)

T = 4.0  # exp(+t) aims at best-of-N, exp(-t) at worst-of-N
COMPARED = (("raw", 0.0), ("raw, scaled", 0.0), ("identity", 0.0), ("log", 0.0), ("exp", T), ("exp", -T))
GRID_KLS = (0.2, 0.5)  # each transform is trained at the two betas whose exact optimum has these KLs
MATCHED_KL = 0.35      # where the transforms are compared: between the grid's KLs
RATES = ("win_rate", "bon", "won")
JUDGES = ("r", "gold")
# where a point spends its KL (mean over each kind's prompts) and its mass in the support's bottom tenth
SPREAD = tuple(f"kl_{kind}" for kind in world.KIND_MIX) + ("bottom", "bottom_worst")
# InfAlign's claims at matched KL, (rate, transform, baseline): the identity transform is the standard win
# rate's optimum; exp(+t) and exp(-t) beat raw RLHF and the best-of-N distillation baseline (log) at BoN_N, WoN_N
GAINS = (("win_rate", "identity", "raw"), ("bon", transform_label("exp", T), "raw"), ("bon", transform_label("exp", T), "log"),
         ("won", transform_label("exp", -T), "raw"), ("won", transform_label("exp", -T), "log"))


def compared(reward: str) -> list[tuple[str, float]]:
    """The transforms of a study on ``reward`` (model or gold): every one of ``COMPARED`` on r; on gold
    all but "raw, scaled", which scales r."""
    return [c for c in COMPARED if reward == "model" or c[0] != "raw, scaled"]


def workspace(out_dir: str) -> str:
    """``<out_dir>/infalign``, its ``sft`` and ``reward`` linked to the pipeline's checkpoints (no copies,
    and a retrained pi_ref or r is seen at once)."""
    folder = f"{out_dir}/infalign"
    os.makedirs(folder, exist_ok=True)
    for stage in ("sft", "reward"):
        load_meta(f"{out_dir}/{stage}", f"python train.py --stage {stage}")  # one sentence if it is missing
        if not os.path.lexists(f"{folder}/{stage}"):
            os.symlink(os.path.join("..", stage), f"{folder}/{stage}")
    return folder


def finished(folder: str, config) -> bool:
    """Whether ``folder`` holds a finished run of exactly this config: a calibration, or a CTRL run at
    its last step (an unfinished one is trained again from the start). A flag the run's checkpoint does
    not name was added after it was trained, so the run had that flag's default. The device it ran on is
    not part of what it is (a run trained on a GPU is reused on a CPU)."""
    try:
        meta = load_meta(folder)
    except CheckpointError:
        return False
    steps = getattr(config, "steps", None)  # a calibration has no steps
    saved = {**asdict(type(config)()), **meta["config"], "device": config.device}
    return saved == asdict(config) and (steps is None or meta.get("step") == steps)


def training_prompts(folder: str, cfg) -> list[world.Prompt]:
    """The study's reward (``cfg.reward``: r, or gold) calibrated on ``cfg.infalign_prompts`` training
    prompts of the world (computed once), and r with a per-prompt scale on the same prompts when "raw,
    scaled" is compared."""
    for reward in (cfg.reward,) + (("scaled",) if ("raw, scaled", 0.0) in compared(cfg.reward) else ()):
        calibration = CalibrateConfig(out_dir=folder, reward=reward, n_prompts=cfg.infalign_prompts, k=cfg.calibration_k,
                                      seed=cfg.seed, device=cfg.device)
        if not finished(calibration_folder(folder, reward), calibration):
            run_calibration(calibration)
    return [world.parse_prompt(p) for p in load_calibration(calibration_folder(folder, cfg.reward))[0]]


def trains_on(transform: str, t: float, reward: str) -> dict:
    """What the study's runs of a transform train on, as a CTRL config's fields: "raw, scaled" is raw RLHF
    on r with a per-prompt scale (``--reward scaled``)."""
    scaled = transform == "raw, scaled"
    return {"transform": "raw" if scaled else transform, "t": t, "reward": "scaled" if scaled else reward}


def run_config(folder: str, transform: str, t: float, beta: float, grid_kl: float, seed: int, prompts: int,
               cfg) -> CTRLConfig:
    """One CTRL run of the study on ``cfg.reward``: every prompt in every step, no held-out evaluation of
    its own. "raw, scaled" is raw RLHF on r with a per-prompt scale (``--reward scaled``)."""
    scaled = transform == "raw, scaled"
    name = (f"{'gold_' if cfg.reward == 'gold' else ''}{'raw_scaled' if scaled else transform}"
            f"{f'{t:+g}' if transform == 'exp' else ''}_kl{grid_kl:g}_s{seed}")
    return CTRLConfig(out_dir=folder, **trains_on(transform, t, cfg.reward), beta=beta, steps=cfg.ctrl_steps,
                      prompts_per_step=prompts, eval_prompts=0, seed=seed, name=name, device=cfg.device)


def interpolate(kls: list[float], values: list, at: float):
    """The value at KL ``at`` on the line through two (KL, value) points (beyond them: the same line); a
    value may be a number or a tensor of per-prompt values, interpolated elementwise."""
    (k0, v0), (k1, v1) = sorted(zip(kls, values), key=lambda point: point[0])
    if k1 - k0 < 1e-9:
        return (v0 + v1) / 2
    return v0 + (v1 - v0) * (at - k0) / (k1 - k0)


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error across seeds (``evaluate.mean_and_se`` on one list)."""
    summary = mean_and_se({"x": torch.tensor(values, dtype=torch.float64)})
    return summary["x"], summary["x_se"]


def matched_rows(trained: list[dict], optima: dict, seeds: list[int]) -> list[dict]:
    """Per transform (each label of ``optima``, in its order): each rate at MATCHED_KL, as the exact
    optimum's there (``optima[label]``) plus the trained policy's gap to the optimum at the KL it reached,
    interpolated in KL per seed between the grid's two runs and averaged over every seed (± SE across
    seeds). The gap, not the rate, is interpolated: a rate bends with KL, the gap to the curve much less,
    and a run that lands far from MATCHED_KL stays usable."""
    rows = []
    for label in optima:
        per_seed = [[r for r in trained if r["transform"] == label and r["seed"] == s] for s in seeds]
        row = {"transform": label, "kl": MATCHED_KL}
        for judge in JUDGES:
            for key in RATES:
                column = f"{key}_{judge}"
                gaps = [interpolate([p["kl"] for p in pts], [p[column] - p[column + "_at_kl"] for p in pts], MATCHED_KL)
                        for pts in per_seed]
                gap, row[column + "_se"] = mean_se(gaps)
                row[column], row[column + "_optimum"] = optima[label][column] + gap, optima[label][column]
        rows.append(row)
    return rows


def gain_rows(trained: list[dict], gaps: dict, optima: dict, seeds: list[int], gains=None) -> list[dict]:
    """InfAlign's comparisons at MATCHED_KL, on the same prompts: per (rate, transform, baseline) of
    ``gains`` (default ``GAINS``) and judge, the transform's rate minus the baseline's, trained and at the
    exact optimum. Each side is read as in ``matched_rows`` but per prompt: the optimum's rate plus the prompt's gap
    (``gaps[(label, grid_kl, seed)][column]``, (P,)) interpolated in KL between the seed's two runs and
    averaged over the seeds; the difference's standard error is across prompts (paired: a prompt's own
    difficulty, shared by both transforms, cancels)."""
    def matched_gap(label: str, column: str) -> torch.Tensor:  # (P,)
        per_seed = []
        for seed in seeds:
            runs = [r for r in trained if r["transform"] == label and r["seed"] == seed]
            per_seed.append(interpolate([r["kl"] for r in runs], [gaps[(label, r["grid_kl"], seed)][column] for r in runs],
                                        MATCHED_KL))
        return torch.stack(per_seed).mean(0)

    rows = []
    for key, label, baseline in (g for g in gains or GAINS if g[1] in optima and g[2] in optima):  # the transforms compared
        row = {"rate": key, "transform": label, "baseline": baseline}
        for judge in JUDGES:
            column = f"{key}_{judge}"
            at_optimum = optima[label][column] - optima[baseline][column]
            summary = mean_and_se({"gain": at_optimum + matched_gap(label, column) - matched_gap(baseline, column)})
            row[column], row[column + "_se"], row[column + "_optimum"] = summary["gain"], summary["gain_se"], at_optimum
        rows.append(row)
    return rows


def distance_rows(trained: list[dict]) -> list[dict]:
    """Per (transform, beta): the KL reached and each rate, trained and its gap to the exact optimum at
    the KL each seed reached, mean ± SE across seeds."""
    order = [transform_label(transform, t) for transform, t in COMPARED]
    rows = []
    points = {(r["transform"], r["grid_kl"], r["beta"]) for r in trained}
    for point in sorted(points, key=lambda p: (order.index(p[0]), p[1])):
        runs = [r for r in trained if (r["transform"], r["grid_kl"], r["beta"]) == point]
        row = {"transform": point[0], "grid_kl": point[1], "beta": point[2], "seeds": len(runs)}
        row["kl"], row["kl_se"] = mean_se([r["kl"] for r in runs])
        # where the KL and the bottom tenth's mass go: trained, and the optimum at the same mean KL
        for column in SPREAD:
            row[column] = sum(r[column] for r in runs) / len(runs)
            row[f"{column}_at_kl"] = sum(r[f"{column}_at_kl"] for r in runs) / len(runs)
        for judge in JUDGES:
            for key in RATES:
                column = f"{key}_{judge}"
                row[column], row[column + "_se"] = mean_se([r[column] for r in runs])
                gaps = [r[column] - r[column + "_at_kl"] for r in runs]
                row[column + "_gap"], row[column + "_gap_se"] = mean_se(gaps)
        rows.append(row)
    return rows


def markdown(matched: list[dict], gains: list[dict], distances: list[dict], n: int, seeds: int, prompts: int,
             minutes: float, selector: str = "r") -> str:
    """The study's tables; ``selector`` ("r" or "gold") is what CTRL trained on and BoN/WoN picked by."""
    cell = lambda row, key: f"{row[key]:.3f} ± {row[key + '_se']:.3f}"  # noqa: E731
    names = {"win_rate": "win rate", "bon": f"BoN_{n}", "won": f"WoN_{n}"}
    lines = [f"Trained CTRL at matched KL {MATCHED_KL:g} ({seeds} seeds, {prompts} training prompts, trained on and "
             f"picked by {selector}; "
             "each rate: the exact optimum's at that KL plus each seed's gap to it interpolated in KL, mean ± SE across "
             "the seeds (the exact optimum at that KL)):",
             "", "| transform | " + " | ".join(f"{names[k]} ({j})" for j in JUDGES for k in RATES) + " |",
             "|---|" + "---|" * (len(JUDGES) * len(RATES))]
    for row in matched:
        lines.append(f"| {row['transform']} | " + " | ".join(
            f"{cell(row, f'{k}_{j}')} ({row[f'{k}_{j}_optimum']:.3f})" for j in JUDGES for k in RATES) + " |")
    lines += ["", f"InfAlign's comparisons at matched KL {MATCHED_KL:g}: the transform's rate minus the baseline's, trained "
              "(each side as above, per prompt), ± the standard error of the per-prompt differences (paired), and "
              "at the exact optimum:", "", "| rate | transform - baseline | " + " | ".join(
                  f"by {j}: trained | optimum" for j in JUDGES) + " |", "|---|---|" + "---|---|" * len(JUDGES)]
    for row in gains:
        columns = [f"{row['rate']}_{judge}" for judge in JUDGES]
        lines.append(f"| {names[row['rate']]} | {row['transform']} - {row['baseline']} | " + " | ".join(
            f"{row[c]:+.3f} ± {row[c + '_se']:.3f} | {row[c + '_optimum']:+.3f}" for c in columns) + " |")
    lines += ["", "Each trained point against the exact optimum at the KL it reached (gap = trained - optimum, "
              f"mean ± SE across seeds), judged by {selector}:", "",
              "| transform | optimum's KL at beta | beta | KL reached | " + " | ".join(
                  f"{names[k]} ({selector}) | gap" for k in RATES) + " |", "|---|---|---|---|" + "---|---|" * len(RATES)]
    for row in distances:
        lines.append(f"| {row['transform']} | {row['grid_kl']:g} | {row['beta']:.4g} | {cell(row, 'kl')} | " + " | ".join(
            f"{cell(row, f'{k}_{selector}')} | {row[f'{k}_{selector}_gap']:+.3f} ± {row[f'{k}_{selector}_gap_se']:.3f}"
            for k in RATES) + " |")
    lines += ["", "Where each point spends its KL: the mean KL over each kind's prompts; and its share of responses in "
              f"the support's bottom tenth by {selector} (WoN's picks; pi_ref: a tenth or more), mean over prompts and on "
              "the prompt with the most; trained (the optimum at the same mean KL), mean across seeds:", "",
              "| transform | optimum's KL at beta | " + " | ".join(f"KL, {kind}" for kind in world.KIND_MIX)
              + " | bottom tenth, mean | bottom tenth, worst prompt |", "|---|---|" + "---|" * len(SPREAD)]
    for row in distances:
        lines.append(f"| {row['transform']} | {row['grid_kl']:g} | " + " | ".join(
            f"{row[c]:.2f} ({row[f'{c}_at_kl']:.2f})" for c in SPREAD) + " |")
    lines += ["", f"Wall time: {minutes:.1f} min."]
    return "\n".join(lines)


def plot(support: dict, phis: dict, distances: list[dict], n: int, path: str, reward: str = "model",
         kls=tuple(0.02 * i for i in range(1, 41))) -> None:
    """BoN_n and WoN_n picked and judged by the study's reward (r, or gold) against KL: each
    transform's exact optimum (of its ``phis[label]`` on the support) as a line, its trained points
    (mean ± SE across seeds, both axes) as markers of the same colour."""
    plt = pyplot()
    if plt is None:
        return
    s = selector_of(reward)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for transform, t in compared(reward):
        label, colour = transform_label(transform, t), f"C{COMPARED.index((transform, t))}"  # one colour per transform
        phi, ref = phis[label], support["reference"]
        curve = [tilt.readout(phi, inverse_beta, support[s], support[s], n, ref) for inverse_beta in
                 (tilt.inverse_beta_at_kl(phi, k, ref) for k in kls) if inverse_beta != math.inf]
        points = [row for row in distances if row["transform"] == label]
        for ax, key in zip(axes, ("bon", "won")):
            ax.plot([c["kl"] for c in curve], [c[key] for c in curve], color=colour, label=f"{label}: exact optimum")
            ax.errorbar([p["kl"] for p in points], [p[f"{key}_{s}"] for p in points], xerr=[p["kl_se"] for p in points],
                        yerr=[p[f"{key}_{s}_se"] for p in points], fmt="o", color=colour, capsize=3)
    for ax, title in zip(axes, (f"best-of-{n}", f"worst-of-{n}")):
        ax.axvline(MATCHED_KL, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("KL(pi || pi_ref), nats")
        ax.set_ylabel(f"{title} win rate vs pi_ref (picked and judged by {s})")
        ax.set_title(f"{title}: exact optima (lines), trained CTRL (points, mean ± SE over seeds)", fontsize=10)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def study_setup(cfg) -> tuple:
    """What the study's runs and their yardstick share (``cfg``: ``experiments.ExperimentConfig``): the
    workspace folder, its training prompts, the device, pi_ref and r on it, the tokenizer, and pi_ref exact
    on the distinct responses of independent draws (``exact_support``; seed + 1, not the calibration's)."""
    folder = workspace(cfg.out_dir)
    prompts = training_prompts(folder, cfg)
    device = pick_device(cfg.device)
    reference, meta = load_model(f"{folder}/sft")
    reference.to(device).eval()
    reward_model = load_reward(f"{folder}/reward")[0].to(device).eval()
    tokenizer = get_tokenizer(meta["tokenizer"])
    support = exact_support(reference, reward_model, tokenizer, prompts, cfg.support_draws, cfg.seed + 1)
    return folder, prompts, device, reference, reward_model, tokenizer, support


def transform_runs(setup: tuple, cfg, transform: str, t: float, n: int) -> tuple[dict, list[dict], dict, torch.Tensor]:
    """One transform of the study, read at BoN_n and WoN_n (``setup``: ``study_setup``'s): the exact optimum
    of the reward its runs train on, at MATCHED_KL, each rate by each judge; and its run at each grid beta
    and seed (``cfg.seeds``), trained where not finished, set beside the optimum at the KL it reached.
    Returns the optimum's rates, the runs' rows (``distance_rows``), their per-prompt gaps (``gain_rows``)
    and Phi on the support (P, M)."""
    folder, prompts, device, reference, reward_model, tokenizer, support = setup
    selector, ref, label = selector_of(cfg.reward), support["reference"], transform_label(transform, t)
    own = trains_on(transform, t, cfg.reward)
    calibration = calibration_of(folder, own, prompts)
    phi = training_phi(own, support, calibration)  # the optimum of the reward the runs train on
    inverse_beta = tilt.inverse_beta_at_kl(phi, MATCHED_KL, ref)  # the optimum at the matched KL, read by each judge
    optimum = {}
    for judge in JUDGES:
        exact = tilt.readout(phi, inverse_beta, support[selector], support[judge], n, ref)
        optimum.update({f"{key}_{judge}": exact[key] for key in RATES})
    trained, gaps = [], {}
    for grid_kl in GRID_KLS:
        beta = 1 / tilt.inverse_beta_at_kl(phi, grid_kl, ref)
        for seed in range(cfg.seeds):
            ctrl = run_config(folder, transform, t, beta, grid_kl, seed, len(prompts), cfg)
            print(f"[infalign] {label}, beta {beta:.4g} (optimum's KL {grid_kl:g}), seed {seed}, N = {n}")
            if not finished(f"{folder}/{ctrl.name}", ctrl):
                train_ctrl(ctrl)
            policy = load_model(f"{folder}/{ctrl.name}")[0].to(device).eval()
            point, _, at_kl = trained_against_optimum(policy, reference, reward_model, tokenizer, prompts, support,
                                                      asdict(ctrl), n, cfg.policy_samples, cfg.seed, calibration)
            columns = [f"{key}_{judge}" for key in RATES for judge in JUDGES] + list(SPREAD)
            trained.append({"transform": label, "grid_kl": grid_kl, "beta": beta, "seed": seed, "kl": point["kl"],
                            **{c: point[c] for c in columns}, **{f"{c}_at_kl": at_kl[c] for c in columns}})
            gaps[(label, grid_kl, seed)] = {  # (P,) each: the per-prompt gaps that gain_rows pairs
                f"{key}_{judge}": torch.tensor(at_kl[f"{key}_{judge}_gaps"], dtype=torch.float64)
                for key in RATES for judge in JUDGES}
            print(f"[infalign]   KL {point['kl']:.3f}; by {selector}, trained (optimum at that KL): " + ", ".join(
                f"{key} {point[f'{key}_{selector}']:.3f} ({at_kl[f'{key}_{selector}']:.3f})" for key in RATES))
    return optimum, trained, gaps, phi


def infalign_study(cfg) -> list[dict]:
    """The ``infalign`` experiment (``cfg``: ``experiments.ExperimentConfig``): <out_dir>/infalign.{csv,md,png}
    (``infalign_gold`` on ``--reward gold``) and each run's checkpoint under <out_dir>/infalign."""
    started = time.time()
    setup = study_setup(cfg)
    prompts, support = setup[1], setup[-1]
    seeds = list(range(cfg.seeds))
    trained, optima, phis, gaps = [], {}, {}, {}
    for transform, t in compared(cfg.reward):
        label = transform_label(transform, t)
        optima[label], runs, run_gaps, phis[label] = transform_runs(setup, cfg, transform, t, cfg.n)
        trained += runs
        gaps.update(run_gaps)
    name = f"{cfg.out_dir}/infalign{'_gold' if cfg.reward == 'gold' else ''}"
    write_csv(trained, f"{name}.csv")
    distances = distance_rows(trained)
    table = markdown(matched_rows(trained, optima, seeds), gain_rows(trained, gaps, optima, seeds), distances, cfg.n,
                     len(seeds), len(prompts), (time.time() - started) / 60, selector_of(cfg.reward))
    atomic_write_text(f"{name}.md", table + "\n")
    print(table)
    plot(support, phis, distances, cfg.n, f"{name}.png", cfg.reward)
    return trained
