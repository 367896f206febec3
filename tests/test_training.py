"""Precision by device: ``--bf16 auto`` takes bf16 only where the device runs it natively and faster."""
import json
import os
import subprocess
import sys

import pytest
import torch

from minialign.config import ConfigError
from minialign.sft import SFTConfig, train_sft
from minialign import training
from minialign.training import cpu_matmul_speeds, resolve_bf16

CPU = torch.device("cpu")


def fake_cpu(monkeypatch, capability: str, avx512_bf16: bool, amx: bool = False, isa_cap: str | None = None,
             speeds: tuple[float, float] = (300.0, 450.0)):
    """A CPU with the given vector ISA, bf16 instructions, oneDNN cap and measured (fp32, bf16) GFLOP/s."""
    monkeypatch.setattr(training, "cpu_matmul_speeds", lambda: speeds)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    if isa_cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa_cap)


@pytest.mark.parametrize("capability, avx512_bf16, amx, isa_cap, expected", [
    ("AVX2", False, False, None, False),           # an AVX2-only CPU (e.g. AMD EPYC Zen 2/3): emulated bf16
    ("AVX512", False, False, None, False),         # AVX-512 without its bf16 extension (Skylake-SP)
    ("AVX512", True, False, None, True),           # AVX512_BF16 (Cooper Lake, Zen 4)
    ("AVX512", False, True, None, True),           # AMX tiles (Sapphire Rapids)
    ("AVX512", True, False, "AVX2", False),        # oneDNN capped below bf16: its matmuls emulate bf16
    ("AVX512", True, False, "avx512_core_bf16", True),
    ("AVX2", True, False, None, False),            # ATen dispatch capped at AVX2 (ATEN_CPU_CAPABILITY=avx2)
])
def test_auto_follows_the_cpu(monkeypatch, capability, avx512_bf16, amx, isa_cap, expected):
    fake_cpu(monkeypatch, capability, avx512_bf16, amx, isa_cap)
    assert resolve_bf16("auto", CPU) is expected
    assert resolve_bf16("true", CPU) is True and resolve_bf16("False", CPU) is False  # explicit wins


@pytest.mark.parametrize("speeds, expected", [((300.0, 450.0), True), ((306.0, 166.0), False), ((300.0, 330.0), False)])
def test_auto_takes_native_bf16_only_where_it_measures_faster(monkeypatch, speeds, expected):
    fake_cpu(monkeypatch, "AVX512", True, speeds=speeds)  # the last: 1.1x, below the 1.2x it needs
    assert resolve_bf16("auto", CPU) is expected
    assert ("native bf16 (matmul" in training.describe_device(CPU)) and f"{speeds[1]:.0f} GFLOP/s" in training.describe_device(CPU)


def test_matmul_speeds_are_measured_once():
    first = cpu_matmul_speeds()
    assert all(s > 0.1 for s in first) and cpu_matmul_speeds() is first  # cached: one measurement per process


def test_auto_on_cuda_asks_the_gpu(monkeypatch):
    for supported in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: supported)
        assert resolve_bf16("auto", torch.device("cuda")) is supported


def test_bad_value_is_one_sentence():
    with pytest.raises(ConfigError, match="--bf16 takes auto, true or false"):
        resolve_bf16("maybe", CPU)


def test_the_emulation_recipe_turns_auto_to_fp32():
    """The environment that emulates a CPU without bf16 kernels (to time that path) makes any CPU resolve to fp32."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    code = "import torch; from minialign.training import resolve_bf16; print(resolve_bf16('auto', torch.device('cpu')))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_sft_records_the_precision(tmp_path, monkeypatch):
    fake_cpu(monkeypatch, "AVX2", False)
    train_sft(SFTConfig(out_dir=str(tmp_path), steps=1, n_layer=1, n_head=2, n_embd=32, block_size=32,
                        batch_size=2, corpus_dialogues=50, device="cpu"))
    assert json.load(open(tmp_path / "sft/config.json"))["precision"] == "fp32"
    first = json.loads(open(tmp_path / "logs/sft.jsonl").readline())
    assert first["precision"] == "fp32" and "AVX2" in first["device"]
