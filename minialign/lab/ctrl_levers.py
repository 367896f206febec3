"""What each lever of CTRL's RL solver buys (``python -m minialign.lab ctrl-levers``).

``python train.py``'s CTRL (exp(+4), beta 20, 40 steps of 16 prompts x G = 8 samples, two PPO epochs)
ends below the exact optimum of its own objective. This experiment retrains it with one lever changed
at a time and sets each policy beside the exact optimum at the KL it reached (``yardstick.
trained_against_optimum``: the optimum pi_ref exp(Phi(C_hat) / beta) of CTRL's own calibrated reward on
each prompt's exact pi_ref support), judged by r, everything in fp32. It does so twice: on held-out
prompts (what ``python train.py`` reports) and on the prompts CTRL trained on (every other calibration
prompt), where the policy need not generalise: the difference between the two gaps is generalisation,
the training prompts' gap is the solver's. The levers:

- the KL estimator: the sampled (k1) one in the reward instead of the analytic one, and k1 per token to
  go (``--kl sampled [--kl_to_go]``); the KL column says how much of each policy's KL lies off pi_ref's
  support (responses pi_ref almost never writes);
- one PPO epoch instead of two (a second pass over the same samples);
- G = 16 samples per prompt (twice the samples per step), with one PPO epoch;
- twice the prompts per step at half the samples each (32 x G = 4: more distinct prompts, the same cost);
- twice the learning rate, constant or decayed to a tenth (``--lr_decay``); twice the steps (does the RL
  plateau?);
- the offline warm start (``--warm_samples``): the optimum's log-ratio fitted on pi_ref's samples, then
  the RL, at the learning rate where the fit does not diverge (at 1e-4 its error grows); and with G = 16
  and one PPO epoch (do the two best levers add up?).

Each run is a CTRL checkpoint ``<out_dir>/levers_<name>`` (reused when finished with the same config),
its evaluation ``levers_<name>/against_optimum.json`` (reused for the same run and settings); the table
goes to ``<out_dir>/ctrl_levers.md``.
"""
import json
import os
from dataclasses import asdict

from .. import world
from ..checkpoint import atomic_write_text, load_model, world_seed
from ..ctrl import CTRLConfig, train_ctrl
from ..reward_model import load_reward
from ..tokenizer import get_tokenizer
from ..training import pick_device
from .infalign_study import finished
from .yardstick import calibration_of, ctrl_training_prompts, exact_support, trained_against_optimum

LEVERS = (  # (name, what changes, CTRL flags)
    ("default", "python train.py's CTRL (the analytic KL)", {}),
    ("k1", "the sampled (k1) KL", {"kl": "sampled"}),
    ("k1_kl_to_go", "the sampled (k1) KL, per token to go", {"kl": "sampled", "kl_to_go": True}),
    ("one_epoch", "1 PPO epoch", {"ppo_epochs": 1}),
    ("g16", "G = 16, 1 PPO epoch", {"group": 16, "ppo_epochs": 1}),
    ("p32_g4", "32 prompts per step, G = 4", {"prompts_per_step": 32, "group": 4}),
    ("lr2", "lr 2e-4", {"lr": 2e-4}),
    ("lr2_decay", "lr 2e-4 decaying to 2e-5 (cosine)", {"lr": 2e-4, "lr_decay": True}),
    ("twice", "twice the steps", {"steps_factor": 2}),
    ("warm", "warm start (16 samples per prompt, 2 passes), lr 3e-5", {"warm_samples": 16, "lr": 3e-5}),
    ("warm_g16", "warm start, lr 3e-5, G = 16, 1 PPO epoch", {"warm_samples": 16, "lr": 3e-5, "group": 16,
                                                            "ppo_epochs": 1}),
)


def gap_cells(trained: dict, optimum: dict) -> list[str]:
    """The trained policy's KL (the part spent off pi_ref's support), and its standard, BoN and WoN win
    rates by r, each with its paired gap to the optimum at the KL it reached ± SE over prompts."""
    return [f"{trained['kl']:.3f} ({trained['kl_off_support']:.3f})"] + [
        f"{trained[f'{key}_r']:.3f} ({optimum[f'{key}_r_gap']:+.3f} ± {optimum[f'{key}_r_gap_se']:.3f})"
        for key in ("win_rate", "bon", "won")]


def training_seconds(out_dir: str, ctrl: CTRLConfig) -> float:
    """The wall time of the run that made the checkpoint: the last line of its metrics log at the run's
    last step (the log is appended to; a run stopped before the end, which saved no checkpoint, wrote
    only earlier steps; a resumed run counts from its resumption)."""
    with open(f"{out_dir}/logs/{ctrl.name}.jsonl") as f:
        lines = [json.loads(line) for line in f]
    return [line for line in lines if line.get("step") == ctrl.steps][-1]["time"]


def cached_evaluation(folder: str, settings: dict, evaluate, device) -> dict:
    """``evaluate(policy)`` of the CTRL checkpoint in ``folder``, kept in ``folder/against_optimum.json``
    and read back while the evaluation's ``settings`` are the same (a retrained run removes it first)."""
    path = f"{folder}/against_optimum.json"
    if os.path.exists(path):
        with open(path) as f:
            cached = json.load(f)
        if cached["settings"] == settings:
            return cached["rows"]
    rows = evaluate(load_model(folder)[0].to(device).eval())
    atomic_write_text(path, json.dumps({"settings": settings, "rows": rows}))
    return rows


def retrain(folder: str, ctrl: CTRLConfig, label: str) -> None:
    """Train the lever's run unless ``folder`` holds it finished with the same config; a new run's old
    evaluation is stale, so it goes first."""
    if not finished(folder, ctrl):
        print(f"[levers] {label}")
        if os.path.exists(f"{folder}/against_optimum.json"):
            os.remove(f"{folder}/against_optimum.json")
        train_ctrl(ctrl)


def ctrl_levers(cfg) -> str:
    """Train each of ``LEVERS`` (``cfg``: ``experiments.ExperimentConfig``) and tabulate it against its
    optimum on ``cfg.n_eval`` held-out prompts per kind and on CTRL's own training prompts."""
    device = pick_device(cfg.device)
    reference, meta = load_model(f"{cfg.out_dir}/sft", "python train.py")
    reference.to(device).eval()  # fp32 (not --bf16): the KL estimate compares two models' log-probabilities
    reward_model = load_reward(f"{cfg.out_dir}/reward")[0].to(device).eval()
    tokenizer = get_tokenizer(meta["tokenizer"])
    prompt_sets = {"held out": world.eval_prompts(cfg.n_eval, world_seed(cfg.out_dir)),
                   "training": ctrl_training_prompts(cfg.out_dir)}
    supports = {}  # drawn when a lever is first evaluated
    settings = {"n_eval": cfg.n_eval, "support_draws": cfg.support_draws, "policy_samples": cfg.policy_samples,
                "n": cfg.n, "seed": cfg.seed}

    def against_optimum(folder: str, ctrl: CTRLConfig) -> dict:
        """For each prompt set: the trained policy's row and the optimum's at its KL (``trained_against_optimum``)."""
        def evaluate(policy) -> dict:
            rows = {}
            for name, prompts in prompt_sets.items():
                if name not in supports:
                    supports[name] = exact_support(reference, reward_model, tokenizer, prompts, cfg.support_draws, cfg.seed)
                trained, _, optimum = trained_against_optimum(policy, reference, reward_model, tokenizer, prompts,
                                                              supports[name], asdict(ctrl), cfg.n, cfg.policy_samples,
                                                              cfg.seed, calibration_of(cfg.out_dir, asdict(ctrl), prompts))
                rows[name] = [trained, optimum]
            return rows
        return cached_evaluation(folder, settings, evaluate, device)

    default = CTRLConfig()
    held_out, training = (len(p) for p in prompt_sets.values())
    lines = [f"CTRL {default.transform}({default.t:+g}), beta {default.beta:g}, {cfg.ctrl_steps} steps, one lever at a time, "
             f"against the exact optimum at the KL it reached ({held_out} held-out prompts, and {training} of CTRL's "
             f"training prompts; pi_ref exact on the distinct responses of {cfg.support_draws} draws per prompt, "
             f"{cfg.policy_samples} samples of each policy, selected and judged by r; KL (of it, off pi_ref's support); "
             "rate (gap = trained - optimum, ± paired SE over prompts)):", "",
             f"| lever | KL (off support) | win rate (gap) | BoN_{cfg.n} (gap) | WoN_{cfg.n} (gap) | bottom tenth (optimum) "
             f"| training prompts: KL (off support) | win rate (gap) | BoN_{cfg.n} (gap) | WoN_{cfg.n} (gap) | train seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, label, flags in LEVERS:
        flags = dict(flags)
        steps = cfg.ctrl_steps * flags.pop("steps_factor", 1)
        ctrl = CTRLConfig(out_dir=cfg.out_dir, name=f"levers_{name}", eval_prompts=0, steps=steps, device=cfg.device,
                          **flags)
        folder = f"{cfg.out_dir}/{ctrl.name}"
        retrain(folder, ctrl, label)
        rows = against_optimum(folder, ctrl)
        (trained, optimum), (trained_on_own, optimum_on_own) = rows["held out"], rows["training"]
        cells = [*gap_cells(trained, optimum), f"{trained['bottom']:.3f} ({optimum['bottom']:.3f})",
                 *gap_cells(trained_on_own, optimum_on_own)]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {training_seconds(cfg.out_dir, ctrl):.0f} |")
        print(lines[-1])
    table = "\n".join(lines)
    atomic_write_text(f"{cfg.out_dir}/ctrl_levers.md", table + "\n")
    return table
