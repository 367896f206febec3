"""Train minialign's stages: sft -> reward -> calibrate -> ctrl.

    python train.py                     # every stage on the embedded world, reusing finished ones
    python train.py --stage sft         # one stage; its flags are its config's fields
    python train.py --stage sft --stop_at=200     # then `python train.py --stage sft --resume` goes on
    python train.py --help              # every stage's flags with defaults

Each stage writes out/<stage>/ and finds its inputs there. With no --stage, a stage whose checkpoint
exists is reused unless --force is given; a flag applies to every stage that has it. With --stage, a
stage whose checkpoint exists is refused unless --force replaces it or --resume continues it, with
the flags it was started with (a flag that would change the run is refused).
"""
import contextlib
import os
import sys

import torch

from minialign.calibrate import CalibrateConfig, calibration_folder, run_calibration
from minialign.checkpoint import OutLock, check_writable, load_meta, newest_copy
from minialign.config import ConfigError, build, check_known, convert, main_guard, parse_flags, usage
from minialign.ctrl import CTRLConfig, ctrl_folder, print_summary, train_ctrl
from minialign.reward import RewardConfig, train_reward
from minialign.sft import SFTConfig, train_sft
from minialign.training import resumed_config

STAGES = {  # name -> (config class, run function), in pipeline order
    "sft": (SFTConfig, train_sft),
    "reward": (RewardConfig, train_reward),
    "calibrate": (CalibrateConfig, run_calibration),
    "ctrl": (CTRLConfig, train_ctrl),
}
OUT_OF_MEMORY = {  # stage -> the flag that lowers its memory peak
    "sft": "a smaller --batch_size",
    "reward": "a smaller --micro_batch",
    "calibrate": "a smaller --k or --max_new_tokens",
    "ctrl": "a smaller --micro_batch (e.g. 16) or --prompts_per_step",
}


def stage_folder(name: str, cfg) -> str:
    """Where a stage writes: out/<stage>/, out/calibration[_gold|_scaled]/ for calibrate, --name's folder for ctrl."""
    if name == "calibrate":
        return calibration_folder(cfg.out_dir, cfg.reward)
    return ctrl_folder(cfg) if name == "ctrl" else os.path.join(cfg.out_dir, name)


def finished(folder: str) -> bool:
    """Whether a stage's checkpoint is there (or a complete copy a crash left beside it)."""
    return newest_copy(folder) is not None


def run_lock(out_dir: str):
    """The checkpoints root's lock (``checkpoint.OutLock``); under torchrun rank 0 holds it for the run."""
    return OutLock(out_dir) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext()


def run_stage(name: str, run, cfg) -> None:
    """Run one stage; running out of device memory is said in one sentence with the flag to lower, and
    Ctrl-C in one line saying what was kept and how to go on."""
    try:
        run(cfg)
    except torch.OutOfMemoryError:
        raise ConfigError(f"the {name} stage ran out of memory on {cfg.device}; pass {OUT_OF_MEMORY[name]}.") from None
    except KeyboardInterrupt:
        folder = stage_folder(name, cfg)
        if not finished(folder):
            raise KeyboardInterrupt(f"stopped by Ctrl-C in the {name} stage; no checkpoint of it was written yet.") from None
        go_on = f": continue with `python train.py --stage {name} --resume`" if hasattr(cfg, "resume") else ""
        raise KeyboardInterrupt(f"stopped by Ctrl-C in the {name} stage; {folder} keeps its last checkpoint "
                                f"(step {load_meta(folder).get('step', '?')}){go_on}.") from None


def main(argv: list[str]) -> None:
    if "-h" in argv or "--help" in argv:
        print(__doc__ + "\n" + usage(*(cls for cls, _ in STAGES.values())))
        return
    flags = parse_flags(argv)
    if "stage" in flags and flags["stage"] is None:
        raise ConfigError(f"--stage needs a value: one of {', '.join(STAGES)} (or leave it out for every stage).")
    stage = flags.pop("stage", "all")
    force = flags.pop("force", "false")
    force = True if force is None else convert("force", bool, force)  # --force alone, or --force=true
    if stage != "all":
        if stage not in STAGES:
            raise ConfigError(f"unknown --stage {stage!r}; choose one of: {', '.join(STAGES)}, or omit it for all.")
        cls, run = STAGES[stage]
        cfg = build(cls, flags)
        folder = stage_folder(stage, cfg)
        check_writable(folder, f"the {stage} stage's folder", folder=True)
        with run_lock(cfg.out_dir):
            if getattr(cfg, "resume", False) and finished(folder):
                cfg = resumed_config(cfg, folder, flags)
            if finished(folder) and not force and not getattr(cfg, "resume", False):
                step = load_meta(folder).get("step", "?")
                raise ConfigError(f"{folder} already holds a trained {stage} stage (step {step}); pass --force to "
                                  "replace it" + (", or --resume to continue it." if hasattr(cfg, "resume") else "."))
            run_stage(stage, run, cfg)
        return
    check_known(flags, *(cls for cls, _ in STAGES.values()))
    configs = {name: build(cls, flags, strict=False) for name, (cls, _) in STAGES.items()}  # every flag checked first
    for name, cfg in configs.items():
        check_writable(stage_folder(name, cfg), f"the {name} stage's folder", folder=True)
    say = print if os.environ.get("RANK", "0") == "0" else lambda *_: None  # under torchrun: rank 0 speaks
    with run_lock(configs["sft"].out_dir):
        for name, (_, run) in STAGES.items():
            cfg = configs[name]
            folder = stage_folder(name, cfg)
            if getattr(cfg, "resume", False) and finished(folder):
                cfg = resumed_config(cfg, folder, flags)
            if finished(folder) and not force and not getattr(cfg, "resume", False):
                say(f"[{name}] reusing {folder} (pass --force to retrain)")
                if name == "ctrl" and say is print:
                    print_summary(load_meta(folder)["metrics"], cfg.eval_n)
                continue
            say(f"[{name}] running")
            run_stage(name, run, cfg)


if __name__ == "__main__":
    main_guard(lambda: main(sys.argv[1:]))
