"""What each lever of CTRL's RL solver buys (``python -m minialign.lab ctrl-levers``).

``python train.py``'s CTRL (exp(+4), beta 20, 40 steps of 16 prompts x G = 8 samples, two PPO epochs)
ends below the exact optimum of its own objective. This experiment retrains it with one lever changed
at a time and sets each policy beside the exact optimum at the KL it reached (``tilt_study.
trained_against_optimum``: the optimum pi_ref exp(Phi(C_hat) / beta) on a support of ``--k`` pi_ref
samples per held-out prompt, read off exactly), judged by r, everything in fp32:

- one PPO epoch instead of two (a second pass over the same samples);
- G = 16 samples per prompt (twice the samples per step), with one PPO epoch;
- the same with twice the learning rate;
- the KL to go per token (``--kl_to_go``): each token penalised by the KL of the tokens from it on;
- the offline warm start (``--warm_samples``): the optimum's log-ratio fitted on pi_ref's samples, then
  the RL, at the learning rate where the fit does not diverge (at 1e-4 its error grows); and with the
  KL to go.

Each run is a CTRL checkpoint ``<out_dir>/levers_<name>`` (reused when finished with the same config);
the table goes to ``<out_dir>/ctrl_levers.md``.
"""
import time
from dataclasses import asdict

from .. import world
from ..checkpoint import atomic_write_text, load_model, world_seed
from ..ctrl import CTRLConfig, train_ctrl
from ..reward_model import load_reward
from ..tokenizer import get_tokenizer
from ..training import pick_device
from .infalign_study import finished
from .tilt_study import tilt_support, trained_against_optimum

LEVERS = (  # (name, what changes, CTRL flags)
    ("default", "python train.py's CTRL", {}),
    ("one_epoch", "1 PPO epoch", {"ppo_epochs": 1}),
    ("g16", "G = 16, 1 PPO epoch", {"group": 16, "ppo_epochs": 1}),
    ("g16_lr2", "G = 16, 1 PPO epoch, lr 2e-4", {"group": 16, "ppo_epochs": 1, "lr": 2e-4}),
    ("kl_to_go", "KL to go per token", {"kl_to_go": True}),
    ("warm", "warm start (16 samples per prompt, 2 passes), lr 3e-5", {"warm_samples": 16, "lr": 3e-5}),
    ("warm_kl_to_go", "warm start and KL to go, lr 3e-5", {"warm_samples": 16, "lr": 3e-5, "kl_to_go": True}),
)


def ctrl_levers(cfg) -> str:
    """Train each of ``LEVERS`` (``cfg``: ``experiments.ExperimentConfig``) and tabulate it against its
    optimum on ``cfg.n_eval`` held-out prompts per kind."""
    device = pick_device(cfg.device)
    reference, meta = load_model(f"{cfg.out_dir}/sft", "python train.py")
    reference.to(device).eval()  # fp32 (not --bf16): the KL estimate compares two models' log-probabilities
    reward_model = load_reward(f"{cfg.out_dir}/reward")[0].to(device).eval()
    tokenizer = get_tokenizer(meta["tokenizer"])
    prompts = world.eval_prompts(cfg.n_eval, world_seed(cfg.out_dir))
    support = tilt_support(reference, reward_model, tokenizer, prompts, cfg.k, cfg.seed)
    default = CTRLConfig()
    lines = [f"CTRL {default.transform}({default.t:+g}), beta {default.beta:g}, {cfg.ctrl_steps} steps, one lever at a time, against the exact optimum at the KL "
             f"it reached ({len(prompts)} held-out prompts, a support of {cfg.k} pi_ref samples each, selected and "
             "judged by r; gap = trained - optimum, ± SE over prompts of the trained rate):", "",
             "| lever | KL | win rate (gap) | BoN_4 (gap) | WoN_4 (gap) | bottom tenth (optimum) | train seconds |",
             "|---|---|---|---|---|---|---|"]
    for name, label, flags in LEVERS:
        ctrl = CTRLConfig(out_dir=cfg.out_dir, name=f"levers_{name}", eval_prompts=0, steps=cfg.ctrl_steps,
                          device=cfg.device, **flags)
        seconds = "reused"
        if not finished(f"{cfg.out_dir}/{ctrl.name}", ctrl):
            print(f"[ctrl-levers] {label}")
            started = time.time()
            train_ctrl(ctrl)
            seconds = f"{time.time() - started:.0f}"
        policy = load_model(f"{cfg.out_dir}/{ctrl.name}")[0].to(device).eval()
        trained, _, optimum = trained_against_optimum(policy, reference, reward_model, tokenizer, prompts, support,
                                                      asdict(ctrl), cfg.n, cfg.seed)
        cells = [f"{trained[f'{key}_r']:.3f} ± {trained[f'{key}_r_se']:.3f} ({trained[f'{key}_r'] - optimum[f'{key}_r']:+.3f})"
                 for key in ("win_rate", "bon", "won")]
        lines.append(f"| {label} | {trained['kl']:.3f} | " + " | ".join(cells)
                     + f" | {trained['bottom']:.3f} ({optimum['bottom']:.3f}) | {seconds} |")
        print(lines[-1])
    table = "\n".join(lines)
    atomic_write_text(f"{cfg.out_dir}/ctrl_levers.md", table + "\n")
    return table
