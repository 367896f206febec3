"""Arrows point down (DESIGN.md, layout): what each module may load, checked in a fresh interpreter.

The core (``minialign/*.py``) never loads the lab (experiments, studies, benchmarks, the trace viewer)
or the fast machinery (batched searches, CUDA graphs); the maths of RAIN's rules and of CTRL's reward
are leaves; the world is a text generator that knows nothing of RAIN; a decoder loads no training stage.
"""
import fnmatch
import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = sorted("minialign." + os.path.basename(f)[:-3] for f in glob.glob(os.path.join(ROOT, "minialign", "*.py")))
STAGES = ["minialign.sft", "minialign.reward", "minialign.calibrate", "minialign.ctrl", "minialign.distributed"]
RAIN = ["minialign.rain", "minialign.rain_*"]
OUTSIDE_THE_CORE = ["minialign.lab*", "minialign.fast*"]
EVERYTHING_ELSE = ["minialign.*"]  # a leaf loads no other module of minialign

# module -> the patterns of modules it must not load (on top of the lab and fast for every core module)
MUST_NOT_LOAD = {
    "minialign.rain_tree": EVERYTHING_ELSE,
    "minialign.calibrated_reward": EVERYTHING_ELSE,
    "minialign.model": EVERYTHING_ELSE,
    "minialign.gpt2": RAIN + STAGES + ["minialign.world", "minialign.sampling"],
    "minialign.tasks": EVERYTHING_ELSE,
    "minialign.tokenizer": EVERYTHING_ELSE,
    "minialign.world": RAIN + STAGES + ["minialign.sampling", "minialign.reward_model"],
    "minialign.selfeval": RAIN + STAGES,
    "minialign.rain": STAGES + ["minialign.reward_model", "minialign.evaluate", "minialign.world"],
    "minialign.tilt": STAGES + RAIN,
    "minialign.calibrate": ["minialign.ctrl"] + RAIN,
    "minialign.ctrl": RAIN,
    "minialign.sampling": STAGES + RAIN,
    "minialign.evaluate": STAGES + RAIN,
}


def loaded_after(code: str) -> set[str]:
    probe = code + "\nimport json, sys; print(json.dumps(sorted(m for m in sys.modules if m.startswith('minialign'))))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def breaking(loaded: set[str], module: str, patterns: list[str]) -> list[str]:
    return sorted(m for m in loaded if m != module and any(fnmatch.fnmatch(m, p) for p in patterns))


@pytest.mark.parametrize("module", CORE)
def test_each_core_module_loads_only_what_its_layer_allows(module):
    assert breaking(loaded_after(f"import {module}"), module, OUTSIDE_THE_CORE + MUST_NOT_LOAD.get(module, [])) == []


def test_decode_loads_no_training_stage_and_the_lab_only_for_a_trace():
    code = ("import runpy, sys, contextlib, io\nsys.argv = ['decode.py', '--help']\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    runpy.run_path('decode.py', run_name='__main__')")
    loaded = loaded_after(code)
    assert "minialign.rain" in loaded
    assert breaking(loaded, "", STAGES + ["minialign.lab*"]) == []
    with open(os.path.join(ROOT, "decode.py")) as f:
        lab_imports = [line.strip() for line in f if "minialign.lab" in line and "import" in line]
    assert lab_imports == ["from minialign.lab.rain_trace import SearchTrace, write_trace"]  # under `if cfg.trace:`


def test_the_table_names_real_modules_and_the_check_can_fail():
    assert set(MUST_NOT_LOAD) <= set(CORE)
    assert breaking(loaded_after("import minialign.ctrl"), "minialign.ctrl", ["minialign.sampling"])  # ctrl samples
    assert breaking(loaded_after("import minialign.lab.experiments"), "", OUTSIDE_THE_CORE)
