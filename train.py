"""Train minialign's stages: sft -> reward -> calibrate -> ctrl.

    python train.py                     # every stage on the embedded world, reusing finished ones
    python train.py --stage sft         # one stage; its flags are its config's fields
    python train.py --stage sft --steps=200 --resume
    python train.py --help              # every stage's flags with defaults

Each stage writes out/<stage>/ and finds its inputs there. With no --stage, a stage whose checkpoint
exists is reused unless --force is given; a flag applies to every stage that has it.
"""
import os
import sys

from minialign.calibrate import CalibrateConfig, run_calibration
from minialign.checkpoint import load_meta
from minialign.config import ConfigError, build, main_guard, parse_flags, usage
from minialign.ctrl import CTRLConfig, ctrl_folder, train_ctrl
from minialign.reward import RewardConfig, train_reward
from minialign.sft import SFTConfig, train_sft

STAGES = {  # name -> (config class, run function), in pipeline order
    "sft": (SFTConfig, train_sft),
    "reward": (RewardConfig, train_reward),
    "calibrate": (CalibrateConfig, run_calibration),
    "ctrl": (CTRLConfig, train_ctrl),
}


def print_summary(metrics: dict, n: int) -> None:
    """The CTRL policy against pi_ref, judged by the world's gold reward."""
    print("\nCTRL policy vs pi_ref on held-out world prompts (gold reward):")
    rows = [("standard win rate", "win_rate"), (f"BoN_{n} inference-time win rate", f"bon{n}"),
            (f"WoN_{n} inference-time win rate", f"won{n}")]
    for label, key in rows:
        print(f"  {label:32s} {metrics[key]:.3f} ± {metrics[key + '_se']:.3f}")
    for label, key in (("KL(pi || pi_ref), nats", "kl"), ("harm rate (harmful prompts)", "harm_rate"),
                       ("attack success (attacked prompts)", "attack_success"), ("help rate (benign prompts)", "help_rate")):
        print(f"  {label:32s} {metrics[key]:.3f}")


def main(argv: list[str]) -> None:
    if "-h" in argv or "--help" in argv:
        print(__doc__ + "\n" + usage(*(cls for cls, _ in STAGES.values())))
        return
    flags = parse_flags(argv)
    stage = flags.pop("stage", None) or "all"
    force = "force" in flags and flags.pop("force") in (None, "true", "1")
    if stage != "all":
        if stage not in STAGES:
            raise ConfigError(f"unknown --stage {stage!r}; choose one of: {', '.join(STAGES)}, or omit it for all.")
        cls, run = STAGES[stage]
        run(build(cls, flags))
        return
    known = {name for cls, _ in STAGES.values() for name in cls.__dataclass_fields__}
    unknown = sorted(set(flags) - known)
    if unknown:
        raise ConfigError(f"unknown flag --{unknown[0]}; valid flags: " + ", ".join("--" + k for k in sorted(known)) + ".")
    for name, (cls, run) in STAGES.items():
        cfg = build(cls, flags, strict=False)
        folder = ctrl_folder(cfg) if name == "ctrl" else os.path.join(cfg.out_dir, name)
        if os.path.exists(os.path.join(folder, "config.json")) and not force and not getattr(cfg, "resume", False):
            print(f"[{name}] reusing {folder} (pass --force to retrain)")
            continue
        print(f"[{name}] running")
        run(cfg)
    print_summary(load_meta(folder)["metrics"], cfg.eval_n)  # folder and cfg are the ctrl stage's here


if __name__ == "__main__":
    main_guard(lambda: main(sys.argv[1:]))
