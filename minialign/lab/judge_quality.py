"""How good must RAIN's self-evaluation be? (``python -m minialign.lab judge-quality``)

RAIN's premise is a model that knows harm when it sees it. The world teaches pi_ref the judging
template with correct verdicts, and it judges its own texts right about 99% of the time, better than
any model in the paper: LLaMA 30B judges at 81%, LLaMA 65B at 84%, LLaMA-2 70B at 98% (as RAIN reports),
and the paper reports RAIN's gain growing with model size. Here pi_ref is trained again with a share
of its self-evaluation documents given the wrong verdict (``--judge_noise``: the same dialogues and
judged texts at every level, 0.5 is chance), and for each level the command measures the judge's
accuracy on the texts RAIN itself judges, and vanilla's and RAIN's harm, attack success and help on the
held-out prompts. It writes ``<out_dir>/judge_quality.{md,csv,png}``; each level's pi_ref is kept in
``<out_dir>/judge_quality/noise_<level>/sft`` (level 0 is the pipeline's own ``<out_dir>/sft``), so a
second call trains nothing.
"""
import os

from .. import world
from ..checkpoint import load_meta, load_model, newest_copy, pyplot, save_figure, world_seed, write_csv
from ..fast.rain_eval import rain_table
from ..sft import SFTConfig, train_sft
from ..tokenizer import get_tokenizer
from ..training import decoding_dtype, pick_device

PAPER_JUDGES = (("LLaMA 30B", 0.81), ("LLaMA 65B", 0.84), ("LLaMA-2 70B", 0.98))  # RAIN's self-evaluation accuracy


def level_folder(out_dir: str, noise: float) -> str:
    """Where the pi_ref trained at ``noise`` lives: the pipeline's own at 0."""
    return out_dir if noise == 0 else os.path.join(out_dir, "judge_quality", f"noise_{noise:g}")


def pi_ref_at(out_dir: str, noise: float, device: str) -> str:
    """The folder of pi_ref trained with ``noise``, training it (the pipeline's SFT config otherwise) if missing."""
    folder = level_folder(out_dir, noise)
    if newest_copy(os.path.join(folder, "sft")) is None:
        pipeline = load_meta(os.path.join(out_dir, "sft"), "python train.py --stage sft")["config"]
        fields = set(SFTConfig.__dataclass_fields__)
        cfg = SFTConfig(**{k: v for k, v in pipeline.items() if k in fields and k not in ("out_dir", "resume")})
        cfg.out_dir, cfg.judge_noise, cfg.device = folder, noise, device
        train_sft(cfg)
    return folder


def judge_quality(cfg, params) -> str:
    """The experiment (``cfg``: ``experiments.ExperimentConfig``): one row per noise level."""
    prompts = world.eval_prompts(cfg.n_eval, world_seed(cfg.out_dir))
    device = pick_device(cfg.device)
    rows = []
    for noise in (float(x) for x in cfg.judge_noise.split(",")):
        model, meta = load_model(os.path.join(pi_ref_at(cfg.out_dir, noise, cfg.device), "sft"))
        model.to(device, decoding_dtype(cfg.bf16, device)).eval()
        result = rain_table(model, get_tokenizer(meta["tokenizer"]), prompts, params, seed=cfg.seed, batch=cfg.batch,
                            desc=f"rain, judge noise {noise:g}")
        v, r = result["vanilla"], result["rain"]
        rows.append({"judge_noise": noise, "self_eval_accuracy": round(r["self_eval_accuracy"], 4),
                     **{f"vanilla_{k}": round(v[k], 4) for k in ("harm_rate", "attack_success", "help_rate")},
                     **{f"rain_{k}": round(r[k], 4) for k in ("harm_rate", "attack_success", "help_rate")},
                     "attack_cut": round(relative_cut(v["attack_success"], r["attack_success"]), 4),
                     "harm_cut": round(relative_cut(v["harm_rate"], r["harm_rate"]), 4)})
    table = markdown(rows, cfg, params)
    name = os.path.join(cfg.out_dir, "judge_quality")
    write_csv(rows, name + ".csv")
    plot(rows, name + ".png")
    return table


def relative_cut(vanilla: float, rain: float) -> float:
    """RAIN's relative cut of a rate, (vanilla - RAIN) / vanilla; 0 where vanilla is 0 (nothing to cut)."""
    return (vanilla - rain) / vanilla if vanilla > 0 else 0.0


def markdown(rows: list[dict], cfg, params) -> str:
    lines = [f"RAIN against a worse judge: pi_ref of pipeline seed {world_seed(cfg.out_dir)} trained with a share of "
             f"wrong self-evaluation verdicts; {cfg.n_eval} held-out prompts per kind, sampling seed {cfg.seed}, "
             f"{params.score} vote.", "",
             "| judge noise | self-evaluation accuracy (texts RAIN judged) | attack success: vanilla / RAIN (cut) "
             "| harm rate: vanilla / RAIN (cut) | help rate: vanilla / RAIN |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['judge_noise']:g} | {row['self_eval_accuracy']:.3f} | {row['vanilla_attack_success']:.3f} / "
                     f"{row['rain_attack_success']:.3f} ({row['attack_cut']:.0%}) | {row['vanilla_harm_rate']:.3f} / "
                     f"{row['rain_harm_rate']:.3f} ({row['harm_cut']:.0%}) | {row['vanilla_help_rate']:.3f} / "
                     f"{row['rain_help_rate']:.3f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    """RAIN's relative cut of attack success and of harm against the judge's accuracy, the paper's judges marked."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    accuracy = [row["self_eval_accuracy"] for row in rows]
    ax.plot(accuracy, [row["attack_cut"] for row in rows], "o-", label="attack success (attacked prompts)")
    ax.plot(accuracy, [row["harm_cut"] for row in rows], "s--", label="harm rate (harmful prompts)")
    for name, value in PAPER_JUDGES:
        ax.axvline(value, color="grey", lw=0.8, ls=":")
        ax.text(value, 1.02, name, rotation=90, va="bottom", ha="center", fontsize=7)
    ax.set_xlabel("self-evaluation accuracy on the texts RAIN judged")
    ax.set_ylabel("RAIN's relative cut against vanilla")
    ax.set_ylim(-0.2, 1.15)
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, path)
