"""The folder swap: a crash at any point leaves a loadable checkpoint, readers find the newest complete
copy by themselves, and the next write puts it back in place and clears what crashes left."""
import json
import os
import socket
import stat
import subprocess
import sys

import pytest
import torch

from minialign.checkpoint import CheckpointError, OutLock, load_meta, load_weights, newest_copy, save, write_folder


def checkpoint(folder, step):
    save(str(folder), torch.nn.Linear(2, 2, bias=False).requires_grad_(False).apply(
        lambda m: torch.nn.init.constant_(m.weight, float(step))), {"stage": "sft", "config": {}, "step": step})


KILL_BETWEEN_RENAMES = """
import os, sys, torch
from minialign.checkpoint import save
real_replace = os.replace
def replace(src, dst):
    real_replace(src, dst)
    if os.path.basename(dst).startswith(".sft-old-"):
        os._exit(9)  # kill -9 right after the old folder moved aside, before the new one moved in
os.replace = replace
save(sys.argv[1], torch.nn.Linear(2, 2, bias=False).requires_grad_(False).apply(
    lambda m: torch.nn.init.constant_(m.weight, 2.0)), {"stage": "sft", "config": {}, "step": 2})
"""


def test_a_kill_between_the_renames_leaves_the_newest_copy_loadable(tmp_path):
    folder = tmp_path / "sft"
    checkpoint(folder, 1)
    assert subprocess.run([sys.executable, "-c", KILL_BETWEEN_RENAMES, str(folder)]).returncode == 9
    assert not folder.exists()  # the window the swap leaves open
    assert load_meta(str(folder))["step"] == 2  # readers find the newer of the two complete copies
    model = torch.nn.Linear(2, 2, bias=False)
    load_weights(str(folder), model)
    assert float(model.weight.detach()[0, 0]) == 2.0
    assert not folder.exists()  # reading moved nothing
    checkpoint(folder, 3)  # the next write settles the folder and clears every leftover
    assert load_meta(str(folder))["step"] == 3 and os.listdir(tmp_path) == ["sft"]


def test_ctrl_c_between_the_renames_puts_the_old_checkpoint_back(tmp_path, monkeypatch):
    folder = tmp_path / "sft"
    checkpoint(folder, 1)
    real_replace = os.replace

    def replace(src, dst):
        real_replace(src, dst)
        if os.path.basename(dst).startswith(".sft-old-"):
            raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        checkpoint(folder, 2)
    monkeypatch.undo()
    assert load_meta(str(folder))["step"] == 1 and os.listdir(tmp_path) == ["sft"]


def test_an_interrupted_write_is_cleared_and_the_old_checkpoint_kept(tmp_path):
    folder = tmp_path / "calibration"
    checkpoint(folder, 1)

    def dies_half_way(tmp):
        with open(os.path.join(tmp, "rewards.pt"), "w") as f:
            f.write("half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        write_folder(str(folder), dies_half_way)
    assert newest_copy(str(folder)) == str(folder) and load_meta(str(folder))["step"] == 1
    os.mkdir(tmp_path / ".calibration-tmp-stale")  # as a kill -9 during a write leaves it (no config.json)
    assert newest_copy(str(folder)) == str(folder)  # an incomplete copy is never read
    checkpoint(folder, 2)
    assert sorted(os.listdir(tmp_path)) == ["calibration"]


def test_checkpoint_folders_are_ordinary_folders(tmp_path):
    old = os.umask(0o022)
    try:
        checkpoint(tmp_path / "reward", 1)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "reward").st_mode) == 0o755  # not mkdtemp's 0700
    with open(tmp_path / "reward" / "config.json") as f:
        assert json.load(f)["step"] == 1


def lock_file(out_dir, pid, command="python train.py --stage sft"):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, ".lock"), "w") as f:
        json.dump({"pid": pid, "host": socket.gethostname(), "command": command}, f)


def test_a_second_run_into_the_same_out_stops_naming_the_first(tmp_path):
    lock_file(tmp_path, os.getpid(), "python train.py --stage reward")  # a live process holds it
    with pytest.raises(CheckpointError, match=rf"another run is writing to {tmp_path}: pid {os.getpid()} on .*"
                                              r"`python train.py --stage reward`"):
        with OutLock(str(tmp_path)):
            pass
    assert os.path.exists(tmp_path / ".lock")  # the holder's lock is left alone


def test_a_dead_runs_lock_is_taken_over_and_released(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_file(tmp_path, dead.pid)
    with OutLock(str(tmp_path)):
        with open(tmp_path / ".lock") as f:
            assert json.load(f)["pid"] == os.getpid()
    assert not os.path.exists(tmp_path / ".lock")
    with pytest.raises(RuntimeError), OutLock(str(tmp_path)):
        raise RuntimeError("a stage failed")
    assert not os.path.exists(tmp_path / ".lock")  # released on failure too
