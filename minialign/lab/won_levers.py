"""What each solver lever buys against the infalign study's worst-of-N gap (``python -m minialign.lab won-levers``).

The study's (``infalign_study.py``) largest gap is at WoN_4 for the worst-of-N transforms: exp(-4) at
the beta whose optimum has KL 0.5 ends 0.08-0.09 below its optimum at the KL it reached, while its BoN_4
is within 0.03. This experiment retrains that run (the study's seed 0: its workspace, training prompts,
calibration and beta) with one solver lever at a time and sets each policy beside the same exact
optimum (``yardstick.trained_against_optimum`` on the study's support), judged by r, and reads where the
policy puts its mass: its exact probability of each support response, summed over pi_ref's bottom quarter
by r (what a worst-of-N finds). The levers: more Adam steps on the same samples (PPO epochs, a larger
learning rate), more samples per step (G) or more steps, and the offline warm start (``ctrl.warm_start``).

Each run is a CTRL checkpoint ``<out_dir>/infalign/won_<name>`` ("study" is the study's own run,
reused when it is finished), its evaluation ``against_optimum.json`` beside it; the table goes to
``<out_dir>/won_levers.md``.
"""
from dataclasses import asdict, replace

from .. import tilt
from ..config import ConfigError
from .ctrl_levers import cached_evaluation, gap_cells, retrain, training_seconds
from .infalign_study import run_config, study_setup, trains_on
from .yardstick import (calibration_of, exact_calibrated, support_logprobs, trained_against_optimum, training_phi,
                        transform_label)

CELL = ("exp", -4.0, 0.5)  # (transform, t, the optimum's KL at the run's beta): the study's largest WoN_4 gap
LOW = 0.25  # pi_ref's bottom quarter by r (exact C below it): the responses a worst-of-4 of pi_ref picks from
LEVERS = (  # (name, what changes, CTRL flags; "steps_factor" multiplies the study's steps, "steps" replaces them)
    ("study", "the study's solver: G = 8, 2 PPO epochs, lr 1e-4", {}),
    ("ppo4", "4 PPO epochs", {"ppo_epochs": 4}),
    ("lr2", "lr 2e-4", {"lr": 2e-4}),
    ("g32_1ep", "G = 32, 1 PPO epoch", {"group": 32, "ppo_epochs": 1}),
    ("g16_lr2", "G = 16, lr 2e-4", {"group": 16, "lr": 2e-4}),
    ("g32_lr2", "G = 32, lr 2e-4", {"group": 32, "lr": 2e-4}),
    ("g32_lr4", "G = 32, lr 4e-4", {"group": 32, "lr": 4e-4}),
    ("steps2", "twice the steps", {"steps_factor": 2}),
    ("steps4", "four times the steps", {"steps_factor": 4}),
    ("warm", "warm start (64 pi_ref samples per prompt, 3 passes), lr 3e-5", {"warm_samples": 64, "warm_epochs": 3,
                                                                              "lr": 3e-5}),
    ("warm10", "warm start (64 samples, 10 passes at lr 3e-5), then the study's RL", {"warm_samples": 64, "warm_epochs": 10,
                                                                                     "warm_lr": 3e-5}),
    ("warm10_alone", "that warm start alone (one RL step after it)", {"warm_samples": 64, "warm_epochs": 10, "warm_lr": 3e-5,
                                                                    "steps": 1}),
)


def won_levers(cfg) -> str:
    """Train each of ``LEVERS`` on the study's ``CELL`` (``cfg``: ``experiments.ExperimentConfig``, as for
    ``infalign``) and tabulate each policy against the exact optimum at the KL it reached."""
    if cfg.reward != "model":
        raise ConfigError("won-levers retrains the infalign study's run on r: drop --reward (the gold study's runs are "
                          "not its subject).")
    folder, prompts, device, reference, reward_model, tokenizer, support = study_setup(cfg)  # the study's own
    transform, t, grid_kl = CELL
    own = trains_on(transform, t, cfg.reward)
    calibration = calibration_of(folder, own, prompts)
    ref = support["reference"]
    phi = training_phi(own, support, calibration)  # (P, M) the reward the runs train on
    low = (exact_calibrated(support["r"], ref) < LOW) & (ref > 0)  # (P, M) pi_ref's bottom quarter
    beta = 1 / tilt.inverse_beta_at_kl(phi, grid_kl, ref)
    study = run_config(folder, transform, t, beta, grid_kl, 0, len(prompts), cfg)
    settings = {"support_draws": cfg.support_draws, "policy_samples": cfg.policy_samples, "n": cfg.n, "seed": cfg.seed,
                "low": LOW}
    lines = [f"CTRL {transform_label(transform, t)} at beta {beta:.4g} (its optimum's KL {grid_kl:g}; seed 0, "
             f"{len(prompts)} training prompts, all in every step) with one solver lever at a time, against the exact "
             f"optimum at the KL it reached (pi_ref exact on the distinct responses of {cfg.support_draws} draws per "
             f"prompt, {cfg.policy_samples} samples of each policy, selected and judged by r; KL (of it, off pi_ref's "
             "support); rate (gap = trained - optimum, ± paired SE over prompts); the share of its samples in pi_ref's "
             "bottom tenth by r, mean over prompts and the worst prompt's; its exact probability of pi_ref's support "
             f"and of the support's bottom quarter by r (C < {LOW:g}), mean over prompts; (the optimum's)):", "",
             f"| lever | RL samples per prompt | KL (off support) | win rate (gap) | BoN_{cfg.n} (gap) | WoN_{cfg.n} (gap) "
             "| bottom tenth (optimum) | worst prompt (optimum) | on the support | bottom quarter (optimum) | train seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, label, flags in LEVERS:
        flags = dict(flags)
        factor = flags.pop("steps_factor", 1)
        steps = flags.pop("steps", cfg.ctrl_steps * factor)
        ctrl = replace(study, steps=steps, **flags, **({} if name == "study" else {"name": f"won_{name}"}))
        run = f"{folder}/{ctrl.name}"
        retrain(run, ctrl, label)

        def evaluate(policy) -> list[dict]:
            trained, _, optimum = trained_against_optimum(policy, reference, reward_model, tokenizer, prompts, support,
                                                          asdict(ctrl), cfg.n, cfg.policy_samples, cfg.seed, calibration)
            # the policy's exact probability of each support response: its mass on pi_ref's support and in its
            # bottom quarter, beside the optimum's at the KL the policy reached
            mass = support_logprobs(policy, tokenizer, prompts, support["responses"]).exp()  # (P, M)
            at_kl = tilt.tilt(phi, tilt.inverse_beta_at_kl(phi, trained["kl"], ref), ref)  # (P, M)
            trained["on_support"] = float(mass.sum(1).mean())
            trained["low"], optimum["low"] = float((mass * low).sum(1).mean()), float((at_kl * low).sum(1).mean())
            return [trained, optimum]

        trained, optimum = cached_evaluation(run, settings, evaluate, device)
        cells = [f"{ctrl.steps * ctrl.group}", *gap_cells(trained, optimum),
                 f"{trained['bottom']:.3f} ({optimum['bottom']:.3f})",
                 f"{trained['bottom_worst']:.2f} ({optimum['bottom_worst']:.2f})", f"{trained['on_support']:.3f}",
                 f"{trained['low']:.3f} ({optimum['low']:.3f})"]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {training_seconds(folder, ctrl):.0f} |")
        print(lines[-1])
    return "\n".join(lines)
