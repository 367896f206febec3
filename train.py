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

from minialign.config import ConfigError, build, main_guard, parse_flags, usage
from minialign.sft import SFTConfig, train_sft

STAGES = {  # name -> (config class, run function)
    "sft": (SFTConfig, train_sft),
}


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
        if os.path.exists(os.path.join(cfg.out_dir, name, "config.json")) and not force and not cfg.resume:
            print(f"[{name}] reusing {cfg.out_dir}/{name} (pass --force to retrain)")
            continue
        print(f"[{name}] training")
        run(cfg)


if __name__ == "__main__":
    main_guard(lambda: main(sys.argv[1:]))
