"""The experiments behind minialign's result tables: pi_ref's behaviour, best-of-N, the InfAlign comparison, and the
RAIN evaluation and ablation.

    python -m minialign.lab sft             # pi_ref greedy and sampled, its self-evaluation, help per task -> out/sft.md
    python -m minialign.lab infalign        # trained CTRL per transform at matched KL -> out/infalign.{csv,md,png}
    python -m minialign.lab infalign --reward gold  # the same on the gold reward -> out/infalign_gold.{csv,md,png}
    python -m minialign.lab paper-gain      # InfAlign's gain at the optimum for N = 2, 4, 8 beside the paper's -> out/paper_gain.md
    python -m minialign.lab paper-gain-trained  # the same gain with trained CTRL (the infalign study's) -> out/paper_gain_trained.md
    python -m minialign.lab ctrl-levers     # the default CTRL retrained one solver lever at a time -> out/ctrl_levers.md
    python -m minialign.lab won-levers      # the infalign study's exp(-4) run, one solver lever at a time -> out/won_levers.md
    python -m minialign.lab tilt            # the exact optimum of each transform -> out/tilt.{csv,md,png},
                                            #   out/tilt_reward_quality.md, out/tilt_trained.md (CTRL vs its optimum)
    python -m minialign.lab rain            # vanilla vs RAIN on held-out prompts -> out/rain.md
    python -m minialign.lab rain-ablation   # full RAIN, no similarity update, no dynamic addition, c = 0
    python -m minialign.lab rain-batch      # the batched search against the serial one -> out/rain_batch.md
    python -m minialign.lab rain-presets    # harmful and attacked prompts under the official hh and adv settings
    python -m minialign.lab rain-deviations # RAIN with the official rule where minialign departs from it -> out/rain_deviations.md
    python -m minialign.lab combined        # pi_ref and CTRL, each greedy / best-of-4 / RAIN -> out/combined.md
    python -m minialign.lab bon             # BoN_N / WoN_N of pi_ref by the reward model -> out/bon.md
    python -m minialign.lab judge-quality   # RAIN against judges of controlled accuracy -> out/judge_quality.{md,csv,png}
    python -m minialign.lab calibration-noise  # variance of r and C_hat the gold reward cannot see -> out/calibration_noise.md
    python -m minialign.lab bench           # training and decoding speed, RAIN's time (bench.py) -> out/bench.json

Each needs ``python train.py`` (sft, reward, calibrate; combined also ctrl) to have run first; flags are listed by --help.
"""
import random
from dataclasses import dataclass, replace

import torch

from .. import world
from ..checkpoint import atomic_write_text, check_writable, load_model, world_seed
from ..config import ConfigError, arg, build, check_known, named, parse_flags, usage
from ..calibrate import calibration_folder, load_calibration
from ..calibrated_reward import calibrated
from ..evaluate import self_eval_accuracy, world_rates
from ..fast.rain_eval import rain_markdown, rain_table
from ..rain import PRESETS, RainParams, with_preset
from ..reward_model import load_reward, score
from ..sampling import complete
from ..tokenizer import get_tokenizer
from ..training import decoding_dtype, pick_device
from .ctrl_levers import ctrl_levers
from .infalign_study import infalign_study
from .judge_quality import judge_quality
from .paper_gain import paper_gain
from .paper_gain_trained import trained_gains
from .rain_study import combined_table, rain_batch_agreement, rain_batch_markdown
from .tilt_study import exact_tilt
from .won_levers import won_levers
from .yardstick import ctrl_training_prompts


# ---------------------------------------------------------------------------------------------------
# SFT: what the reference policy does, and how well it judges its own replies.

def decodings_of_sft_tables(device, seeds) -> list[tuple[str, dict]]:
    """(label, ``complete``'s sampling arguments) of each row or column: greedy, then temperature 1 with
    a fresh generator per seed."""
    return [("greedy", dict(temperature=0.0))] + [
        (f"sampled, seed {s}", dict(temperature=1.0, generator=torch.Generator(device).manual_seed(s))) for s in seeds]


def sft_table(model, tokenizer, prompts: list[world.Prompt], seeds=(0, 1)) -> str:
    """Greedy and sampled (temperature 1, a row per seed) rates of pi_ref on held-out prompts, with the
    accuracy of its self-evaluation of those very replies against the gold rule (each label order,
    and both orders' probabilities averaged). The rows equal ``python decode.py --eval --checkpoint out/sft [--method sample --seed S]``."""
    device = model.lm_head.weight.device
    texts = [p.text for p in prompts]
    lines = ["| decoding | harm rate (harmful) | attack success (attacked) | help rate (benign) | well-formed "
             "| self-evaluation accuracy on these replies: orders AB / BA, combined |", "|---|---|---|---|---|---|"]
    for label, sampling in decodings_of_sft_tables(device, seeds):
        responses = complete(model, tokenizer, texts, **sampling)
        r = world_rates(prompts, responses)
        accuracy = self_eval_accuracy(model, tokenizer, prompts, responses)
        lines.append(f"| {label} | {r['harm_rate']:.3f} | {r['attack_success']:.3f} | {r['help_rate']:.3f} "
                     f"| {r['well_formed']:.3f} | {accuracy['order_ab']:.3f} / {accuracy['order_ba']:.3f}, "
                     f"{accuracy['combined']:.3f} |")
    return "\n".join(lines)


def task_table(model, tokenizer, world_seed: int, n: int = 100, seeds=(0, 1)) -> str:
    """pi_ref's help rate per benign task: on ``n`` held-out prompts of the task (subjects never asked in
    training, or a lookup's other phrasing) beside ``n`` training prompts, greedy and sampled, so that
    memorising the training subjects would show as a gap between the two."""
    device = model.lm_head.weight.device
    rng = random.Random(world_seed + 5)
    splits = {split: world.by_task(world.prompts(split, world_seed)) for split in ("test", "train")}
    decodings = decodings_of_sft_tables(device, seeds)
    lines = ["| task | prompts (held out / train) | " + " | ".join(f"{label}: held out / train" for label, _ in decodings)
             + " |", "|---|---|" + "---|" * len(decodings)]
    for task in world.TASKS:
        chosen = {split: rng.sample(groups[task], min(n, len(groups[task]))) for split, groups in splits.items()}
        cells = []
        for _, sampling in decodings:
            rates = [world_rates(ps, complete(model, tokenizer, [p.text for p in ps], **sampling))["help_rate"]
                     for ps in chosen.values()]
            cells.append(" / ".join(f"{r:.3f}" for r in rates))
        lines.append(f"| {task} | {len(chosen['test'])} / {len(chosen['train'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Best-of-N and worst-of-N of pi_ref, selected by the reward model, judged by the gold reward.

def bon_table(model, reward_model, tokenizer, prompts: list[world.Prompt], pool: int = 32,
              ns=(1, 2, 4, 8), groups: int = 4000, seed: int = 0) -> list[dict]:
    """For each N: the win rate of BoN_N(pi_ref) (picked by r) over plain pi_ref samples, judged by r
    (closed form N/(N+1) when nothing ties: selection and judge agree) and by the gold reward, and the
    harm rate of WoN_N(pi_ref) on harmful + attacked prompts (the attacker keeps the lowest-r of N).

    Per prompt, ``pool`` samples are drawn once; N-groups are resampled from that pool (with replacement)
    and compared against an independent pool of plain samples."""
    g = torch.Generator(model.lm_head.weight.device).manual_seed(seed)
    texts = [p.text for p in prompts for _ in range(2 * pool)]
    responses = complete(model, tokenizer, texts, 128, batch_size=256, temperature=1.0, generator=g)
    r_both = score(reward_model, tokenizer, texts, responses).view(len(prompts), 2, pool)  # picking pool, plain pool
    r = r_both[:, 0]  # (P, pool)
    gold = torch.tensor([world.gold_reward(t, y) for t, y in zip(texts, responses)]).view(len(prompts), 2, pool)
    harmful = torch.tensor([world.is_harmful(t, y) for t, y in zip(texts, responses)]).view(len(prompts), 2, pool)[:, 0]
    risky = torch.tensor([p.kind != "benign" for p in prompts])
    pick_gen = torch.Generator().manual_seed(seed)
    rows = []
    for n in ns:
        idx = torch.randint(pool, (len(prompts), groups, n), generator=pick_gen)  # (P, groups, N)
        r_groups = r.gather(1, idx.flatten(1)).view_as(idx)
        best = idx.gather(2, r_groups.argmax(2, keepdim=True)).squeeze(2)  # (P, groups)
        worst = idx.gather(2, r_groups.argmin(2, keepdim=True)).squeeze(2)
        plain = torch.randint(pool, (groups,), generator=pick_gen)  # independent plain samples
        picked, against = gold[:, 0].gather(1, best), gold[:, 1][:, plain]  # gold rewards of the two sides
        wins = (picked > against).double() + 0.5 * (picked == against).double()
        picked_r, against_r = r.gather(1, best), r_both[:, 1][:, plain]
        wins_r = (picked_r > against_r).double() + 0.5 * (picked_r == against_r).double()
        rows.append({"n": n, "bon_win_rate_r": float(wins_r.mean()),
                     "bon_se_r": float(wins_r.mean(1).std() / len(prompts) ** 0.5),
                     "bon_win_rate": float(wins.mean()), "bon_se": float(wins.mean(1).std() / len(prompts) ** 0.5),
                     "closed_form": n / (n + 1), "tie_share": float((picked == against).double().mean()),
                     "won_harm_rate": float(harmful.gather(1, worst)[risky].double().mean()),
                     "bon_harm_rate": float(harmful.gather(1, best)[risky].double().mean())})
    return rows


def bon_markdown(rows: list[dict]) -> str:
    lines = ["| N | closed form N/(N+1) | BoN_N (by r) vs pi_ref, judged by r | judged by gold | gold ties "
             "| harm rate of WoN_N | harm rate of BoN_N |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['n']} | {r['closed_form']:.3f} | {r['bon_win_rate_r']:.3f} ± {r['bon_se_r']:.3f} | "
              f"{r['bon_win_rate']:.3f} ± {r['bon_se']:.3f} | {r['tie_share']:.3f} | "
              f"{r['won_harm_rate']:.3f} | {r['bon_harm_rate']:.3f} |" for r in rows]
    return "\n".join(lines)


def within_judge_share(model, reward_model, tokenizer, out_dir: str, samples: int = 16, every: int = 4,
                       seed: int = 5) -> dict:
    """How much of the per-prompt variance of raw r and of C_hat lies among pi_ref samples that the gold
    reward scores the same (rounded to 0.1): signal the judge cannot see."""
    prompts, reference = load_calibration(calibration_folder(out_dir, "model"))
    rows = list(range(0, len(prompts), every))
    texts = [prompts[i] for i in rows for _ in range(samples)]
    responses = complete(model, tokenizer, texts, 128, batch_size=256, temperature=1.0,
                         generator=torch.Generator(model.lm_head.weight.device).manual_seed(seed))
    r = score(reward_model, tokenizer, texts, responses).view(len(rows), samples)  # (P, M)
    gold = torch.tensor([world.gold_reward(p, y) for p, y in zip(texts, responses)]).view_as(r).round(decimals=1)

    def share(x):
        within = sum(float(((x[i][gold[i] == g] - x[i][gold[i] == g].mean()) ** 2).sum())
                     for i in range(len(rows)) for g in gold[i].unique())
        return within / float(((x - x.mean(1, keepdim=True)) ** 2).sum())
    return {"prompts": len(rows), "samples": samples, "raw_r": share(r), "c_hat": share(calibrated(reference[rows], r))}


# ---------------------------------------------------------------------------------------------------

def noise_levels(text: str) -> str | None:
    """What is wrong with a ``judge_noise`` value (None if nothing): shares between 0 and 0.5."""
    try:
        return None if all(0 <= float(x) <= 0.5 for x in text.split(",")) else "takes shares between 0 and 0.5"
    except ValueError:
        return "takes comma-separated shares between 0 and 0.5, e.g. 0,0.15,0.3,0.45"


@dataclass
class ExperimentConfig:
    out_dir: str = arg("out", "checkpoints root (needs sft; infalign also reward and calibration)", form=named)
    n_eval: int = arg(32, "sft, rain, bon, ctrl-levers, paper-gain: held-out prompts per kind", at_least=1)
    batch: int = arg(16, "rain, rain-ablation, rain-batch, combined: prompts searched at once (1 = one after another)",
                     at_least=1)
    seed: int = arg(0, "sampling seed (the prompts come from the reference policy's world)")
    infalign_prompts: int = arg(12, "infalign, won-levers, paper-gain-trained: CTRL's training prompts, all in every "
                                    "step (so the RL reaches its optimum)", at_least=3)
    ctrl_steps: int = arg(40, "infalign, ctrl-levers, won-levers, paper-gain-trained: RL steps per run", at_least=1)
    seeds: int = arg(3, "infalign, paper-gain-trained: CTRL seeds per (transform, beta)", at_least=1)
    reward: str = arg("model", "infalign, paper-gain-trained: the reward CTRL trains on and BoN/WoN pick by: model (r, "
                               "the paper's setting) or gold (the world's gold reward, a perfect reward model; writes "
                               "infalign_gold.*, paper_gain_trained_gold.md)",
                      one_of=("model", "gold"))
    k: int = arg(32, "tilt, paper-gain: pi_ref samples per prompt (the sample support of the exact optimum)", at_least=2)
    calibration_k: int = arg(128, "infalign, won-levers, paper-gain-trained: pi_ref samples per training prompt in the "
                                  "study's calibration (K)", at_least=2)
    n: int = arg(4, "tilt, infalign, ctrl-levers, won-levers: N of best-of-N and worst-of-N", at_least=1)
    support_draws: int = arg(256, "tilt (its trained table), infalign, ctrl-levers, won-levers, paper-gain-trained: pi_ref draws "
                                  "per prompt "
                                  "whose distinct responses, with their exact probabilities, are the yardstick's pi_ref",
                             at_least=1)
    policy_samples: int = arg(128, "tilt (its trained table), infalign, ctrl-levers, won-levers, paper-gain-trained: samples per "
                                   "prompt of "
                                   "each trained policy", at_least=1)
    prompts: str = arg("test", "tilt: the support's prompts: held-out (test, n_eval per kind) or CTRL's own training "
                               "prompts (train, every other calibration prompt)", one_of=("test", "train"))
    judge_noise: str = arg("0,0.15,0.3,0.45", "judge-quality: shares of wrong self-evaluation verdicts in pi_ref's "
                                              "corpus, one pi_ref each", form=noise_levels)
    ctrl: str = arg("ctrl", "tilt: CTRL checkpoints under out_dir (comma-separated) to set beside their exact optima; '' = none")
    device: str = arg("auto", "auto, cpu or cuda")
    bf16: str = arg("auto", "the decoding policies in bf16: auto (where the device does bf16 natively), true or false")


def sft_experiment(cfg: ExperimentConfig, params: RainParams, models: "Loaded") -> str:
    table = sft_table(models.pi_ref, models.tokenizer, models.prompts)
    return table + "\n\n" + task_table(models.pi_ref, models.tokenizer, models.world_seed)


def bon_experiment(cfg: ExperimentConfig, params: RainParams, models: "Loaded") -> str:
    return bon_markdown(bon_table(models.pi_ref, models.reward(), models.tokenizer, models.prompts, seed=cfg.seed))


def calibration_noise_experiment(cfg: ExperimentConfig, params: RainParams, models: "Loaded") -> str:
    share = within_judge_share(models.pi_ref, models.reward(), models.tokenizer, cfg.out_dir)
    return ("| share of the per-prompt variance among samples gold scores the same | raw r | C_hat |\n|---|---|---|\n"
            f"| {share['prompts']} calibration prompts x {share['samples']} pi_ref samples | {share['raw_r']:.3f} "
            f"| {share['c_hat']:.3f} |")


def tilt_experiment(cfg: ExperimentConfig, params: RainParams, models: "Loaded") -> None:
    prompts = ctrl_training_prompts(cfg.out_dir) if cfg.prompts == "train" else models.prompts
    exact_tilt(models.pi_ref, models.reward(), models.tokenizer, prompts, cfg)


def paper_gain_experiment(cfg: ExperimentConfig, params: RainParams, models: "Loaded") -> str:
    return paper_gain(models.pi_ref, models.reward(), models.tokenizer, models.prompts, cfg)


def combined_experiment(cfg: ExperimentConfig, params: RainParams, models: "Loaded") -> str:
    ctrl = load_model(f"{cfg.out_dir}/ctrl")[0].to(models.device, models.dtype).eval()
    return combined_table({"pi_ref": models.pi_ref, "CTRL": ctrl}, models.reward(), models.tokenizer, models.prompts,
                          params, cfg.batch, seed=cfg.seed)


def rain_experiment(cfg: ExperimentConfig, params: RainParams, models: "Loaded") -> str:
    return rain_markdown(rain_table(models.pi_ref, models.tokenizer, models.prompts, params, seed=cfg.seed,
                                    batch=cfg.batch))


def rain_batch_experiment(cfg: ExperimentConfig, params: RainParams, models: "Loaded") -> str:
    return rain_batch_markdown(rain_batch_agreement(models.pi_ref, models.tokenizer, models.prompts, params, cfg.batch,
                                                    seed=cfg.seed))


def rain_ablation_experiment(cfg: ExperimentConfig, params: RainParams, models: "Loaded") -> str:
    """Full RAIN, then each variant removing one more part: the similarity update, dynamic addition, exploration."""
    attacked = [p for p in models.prompts if p.kind != "benign"]
    variants = [("full RAIN", params), ("no similarity update", replace(params, similarity=False)),
                ("no dynamic addition", replace(params, similarity=False, dynamic=False)),
                ("no exploration (c = 0)", replace(params, similarity=False, dynamic=False, c=0.0))]
    lines = ["| variant (each also removes those above) | harm rate | attack success rate | time, s |", "|---|---|---|---|"]
    for label, variant in variants:
        r = rain_table(models.pi_ref, models.tokenizer, attacked, variant, seed=cfg.seed, desc=label, batch=cfg.batch)["rain"]
        lines.append(f"| {label} | {r['harm_rate']:.3f} | {r['attack_success']:.3f} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def rain_presets_experiment(cfg: ExperimentConfig, params: RainParams, models: "Loaded") -> str:
    """Vanilla and RAIN on the harmful and attacked prompts under each official run's settings (``rain.PRESETS``)."""
    attacked = [p for p in models.prompts if p.kind != "benign"]
    lines = ["| settings | harm rate: vanilla / RAIN | attack success: vanilla / RAIN | self-evaluation accuracy "
             "| iterations per prompt | time, s |", "|---|---|---|---|---|---|"]
    for preset in PRESETS:
        result = rain_table(models.pi_ref, models.tokenizer, attacked, build(RainParams, with_preset({"preset": preset})),
                            seed=cfg.seed, desc=f"rain, {preset}", batch=cfg.batch)
        v, r = result["vanilla"], result["rain"]
        lines.append(f"| {preset} | {v['harm_rate']:.3f} / {r['harm_rate']:.3f} | {v['attack_success']:.3f} / "
                     f"{r['attack_success']:.3f} | {r['self_eval_accuracy']:.3f} | {r['iterations']:.1f} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def rain_deviations_experiment(cfg: ExperimentConfig, params: RainParams, models: "Loaded") -> str:
    """RAIN on every kind of held-out prompt with minialign's rule and with the official one, one flag at a
    time where they differ (``rain.py``'s table): the prior of a chain cut at a stop token, and at c = 0
    (the ablation's last row) the order that breaks the ties; beside each, how many answers ended at a
    committed end of text, where the official HH search goes on and adv/main.py stops, as here."""
    ablated = replace(params, similarity=False, dynamic=False, c=0.0)
    variants = [("minialign's defaults", params), ("a cut chain's prior over all its drawn tokens (official)",
                                                   replace(params, full_chain_prior=True)),
                ("c = 0 (the ablation), ties by probability order", ablated),
                ("c = 0 (the ablation), ties by token id (official)", replace(ablated, token_order=True))]
    lines = ["| rule | harm rate | attack success | help rate | answers ended by end of text | time, s |",
             "|---|---|---|---|---|---|"]
    for label, variant in variants:
        r = rain_table(models.pi_ref, models.tokenizer, models.prompts, variant, seed=cfg.seed, desc=label,
                       batch=cfg.batch)["rain"]
        lines.append(f"| {label} | {r['harm_rate']:.3f} | {r['attack_success']:.3f} | {r['help_rate']:.3f} | "
                     f"{r['ended_by_end_of_text']:.3f} | {r['seconds']:.1f} |")
    return "\n".join(lines)


class Loaded:
    """What the experiments on pi_ref share: the model on its device, its tokenizer, the held-out prompts
    of its world, and the reward model, loaded when first asked for."""

    def __init__(self, cfg: ExperimentConfig):
        self.out_dir = cfg.out_dir
        self.device = pick_device(cfg.device)
        self.dtype = decoding_dtype(cfg.bf16, self.device)
        self.pi_ref, meta = load_model(f"{cfg.out_dir}/sft")
        self.pi_ref.to(self.device, self.dtype).eval()
        self.tokenizer = get_tokenizer(meta["tokenizer"])
        self.world_seed = world_seed(cfg.out_dir)
        self.prompts = world.eval_prompts(cfg.n_eval, self.world_seed)  # cfg.seed only seeds the sampling

    def reward(self):
        return load_reward(f"{self.out_dir}/reward")[0].to(self.device).eval()


# name -> the function that runs it (a table it returns is written to <out_dir>/<name>.md); infalign, paper-gain-trained,
# judge-quality, ctrl-levers and won-levers train their own models from the checkpoints, so `main` runs them before
# loading pi_ref
EXPERIMENTS = {"sft": sft_experiment, "infalign": None, "paper-gain-trained": None, "judge-quality": None,
               "ctrl-levers": None, "won-levers": None,
               "tilt": tilt_experiment,
               "paper-gain": paper_gain_experiment, "rain": rain_experiment,
               "rain-ablation": rain_ablation_experiment, "rain-batch": rain_batch_experiment,
               "rain-presets": rain_presets_experiment, "rain-deviations": rain_deviations_experiment,
               "combined": combined_experiment, "bon": bon_experiment, "calibration-noise": calibration_noise_experiment}


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__ + "\n" + usage(ExperimentConfig, RainParams))
        return
    name = argv[0]
    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {name!r}; choose one of: {', '.join(EXPERIMENTS)}, or bench.")
    flags = with_preset(parse_flags(argv[1:]))  # RAIN's --preset hh|adv
    check_known(flags, ExperimentConfig, RainParams)
    cfg, params = build(ExperimentConfig, flags, strict=False), build(RainParams, flags, strict=False)
    check_writable(cfg.out_dir, "--out_dir", folder=True)  # where the tables go: checked before the work
    if name == "infalign":  # trains its own policies: nothing to load first
        infalign_study(cfg)
        return
    if name == "paper-gain-trained":  # the same, and writes its table itself (paper_gain_trained_gold.md on gold)
        print(trained_gains(cfg))
        return
    if name in ("judge-quality", "ctrl-levers", "won-levers"):  # train their own models: a pi_ref per noise, a CTRL per lever
        table = {"judge-quality": lambda: judge_quality(cfg, params), "ctrl-levers": lambda: ctrl_levers(cfg),
                 "won-levers": lambda: won_levers(cfg)}[name]()
        atomic_write_text(f"{cfg.out_dir}/{name.replace('-', '_')}.md", table + "\n")
        print(table)
        return
    table = EXPERIMENTS[name](cfg, params, Loaded(cfg))
    if table is not None:
        atomic_write_text(f"{cfg.out_dir}/{name.replace('-', '_')}.md", table + "\n")
        print(table)
