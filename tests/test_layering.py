"""Arrows point down: a decoder never loads a training stage (DESIGN.md, layout)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = {"minialign.sft", "minialign.reward", "minialign.calibrate", "minialign.ctrl", "minialign.experiments",
          "minialign.distributed"}


def loaded_after(code: str) -> set[str]:
    probe = code + "\nimport json, sys; print(json.dumps(sorted(m for m in sys.modules if m.startswith('minialign'))))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("code", [
    "import minialign.rain",
    "import runpy, sys, contextlib, io\nsys.argv = ['decode.py', '--help']\n"
    "with contextlib.redirect_stdout(io.StringIO()):\n    runpy.run_path('decode.py', run_name='__main__')",
])
def test_decoders_load_no_training_stage(code):
    loaded = loaded_after(code)
    assert "minialign.rain" in loaded
    assert not loaded & STAGES, sorted(loaded & STAGES)


def test_the_check_can_fail():
    assert loaded_after("import minialign.ctrl") & STAGES
