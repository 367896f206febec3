"""What every training stage shares: device and precision, the optimizer and its schedule, what a
checkpoint holds for ``--resume``, logging.

Kept deliberately small: each stage (``sft.py``, ``reward.py``, ``ctrl.py``) writes its own loop top
to bottom (set up, restore ``TrainingState``, step, log, save) and calls these helpers for the parts
that are the same everywhere.
"""
import contextlib
import dataclasses
import functools
import json
import math
import os
import time

import torch

from .checkpoint import load_meta, save
from .config import ConfigError

# oneDNN instruction sets (values of ONEDNN_MAX_CPU_ISA) below which it has no bf16 matmul kernels
# and emulates bf16 in fp32, many times slower than plain fp32
NO_BF16_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI")


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` is CUDA when present, else CPU; ``cpu``, ``cuda`` or ``cuda:N`` where it exists."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device takes auto, cpu, cuda or cuda:N, not {name!r}.")
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                          "use --device cpu (or auto).")
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively: AVX512_BF16 or AMX, not masked by oneDNN's ISA cap.

    Without them oneDNN emulates bf16 and a bf16 step is many times slower than fp32. Setting
    ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`` makes a bf16 CPU behave like an AVX2-only one
    (its bf16 matmuls fall back to emulation), and this function then says False.
    """
    hardware = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    isa_cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    aten = torch.backends.cpu.get_cpu_capability()  # the vector ISA ATen's own kernels dispatch to
    return hardware and isa_cap not in NO_BF16_ISAS and aten not in ("DEFAULT", "NO AVX", "AVX2")


BF16_GAIN = 1.2  # on a CPU, auto takes bf16 only when its matmuls run at least this much faster than fp32


@functools.cache
def cpu_matmul_speeds(size: int = 512) -> tuple[float, float]:
    """GFLOP/s of a size x size matmul in fp32 and in bf16 on this CPU, the best of three timings of
    each, measured once per process (about 0.1 s).

    The instruction set alone does not say which is faster: two CPUs with the same AVX512_BF16 flag can
    run bf16 matmuls faster or slower than fp32, so ``auto`` times both instead of reading flags."""
    speeds = []
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
        a @ b  # warm-up: the first call picks and prepares the kernel
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(10):
                a @ b
            best = min(best, (time.perf_counter() - start) / 10)
        speeds.append(2 * size ** 3 / best / 1e9)
    return speeds[0], speeds[1]


def cpu_bf16_pays() -> bool:
    """Native bf16 (``cpu_has_native_bf16``) whose matmuls measure at least ``BF16_GAIN`` x fp32's speed."""
    if not cpu_has_native_bf16():
        return False  # emulated bf16 is always far slower: nothing to measure
    fp32, bf16 = cpu_matmul_speeds()
    return bf16 >= BF16_GAIN * fp32


def resolve_bf16(setting: str, device: torch.device) -> bool:
    """The ``--bf16`` flag (auto | true | false) -> whether to autocast to bf16 on ``device``.

    ``auto`` takes bf16 on a CUDA GPU with bf16, and on a CPU with native bf16 where a bf16 matmul
    measures faster than fp32 (``cpu_bf16_pays``); fp32 elsewhere, where bf16 would be emulated or slower."""
    value = str(setting).lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    if value != "auto":
        raise ConfigError(f"--bf16 takes auto, true or false, not {setting!r}.")
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_bf16_pays()


def decoding_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The decoders' ``--bf16`` flag (decode.py, the experiments, the bench's RAIN timing) -> the dtype of
    the decoding model's weights and KV cache, by the same rule as training (``resolve_bf16``). Decoding
    keeps no fp32 master weights, so bf16 here is a cast of the weights rather than autocast."""
    return torch.bfloat16 if resolve_bf16(setting, device) else torch.float32


def precision_name(bf16: bool) -> str:
    return "bf16" if bf16 else "fp32"


def describe_device(device: torch.device) -> str:
    """The device in words: a GPU's name, or the CPU's vector ISA (what decides bf16 speed) and threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    native = "no native bf16"
    if cpu_has_native_bf16():
        fp32, bf16 = cpu_matmul_speeds()
        native = f"native bf16 (matmul {bf16:.0f} GFLOP/s against {fp32:.0f} in fp32)"
    return f"CPU {torch.backends.cpu.get_cpu_capability()}, {native}, {torch.get_num_threads()} threads"


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on the given device (the loss is still computed in fp32 by the callers)."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device):
    """AdamW with weight decay on matrices only (not on biases, LayerNorms); fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")


class TrainingState:
    """What a stage saves beside its weights so that ``--resume`` continues exactly: the optimizer, the
    random generators (by name, as ``state.pt`` stores them) and the step count."""

    def __init__(self, optimizer: torch.optim.Optimizer, generators: dict[str, torch.Generator],
                 state: dict | None = None, source: str = "state.pt"):
        self.optimizer, self.generators, self.step = optimizer, generators, 0
        if state is None:
            return
        try:  # resuming: the saved state replaces the fresh one
            optimizer.load_state_dict(state["optimizer"])
            for name, generator in generators.items():
                generator.set_state(state[name])
            self.step = int(state["step"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:  # another stage's or a damaged state
            raise ConfigError(f"{source} is not this stage's resume state ({type(err).__name__}: "
                              f"{' '.join(str(err).split())[:100]}); start over with --force.") from None

    def save(self, folder: str, model: torch.nn.Module, meta: dict) -> None:
        """The weights, ``meta`` (``config.json``) and this state, written atomically (``checkpoint.save``)."""
        generators = {name: generator.get_state() for name, generator in self.generators.items()}
        save(folder, model, meta, {"optimizer": self.optimizer.state_dict(), **generators, "step": self.step})


RESUME_FREE = ("resume", "stop_at", "eval_every", "save_every", "device", "bf16", "out_dir")


def resumed_config(cfg, folder: str, given) -> object:
    """``cfg`` for ``--resume``: every flag not ``given`` on the command line takes the value the run in
    ``folder`` was started with, so ``--resume`` alone continues any run; given flags are then held
    to ``check_resume``."""
    saved = load_meta(folder)["config"]
    fields = {f.name for f in dataclasses.fields(cfg)}
    return dataclasses.replace(cfg, **{key: value for key, value in saved.items()
                                       if key in fields and key not in given and key not in RESUME_FREE})


def check_resume(folder: str, cfg, free: tuple[str, ...] = ()) -> None:
    """``--resume`` continues a run exactly, so it refuses any flag that would change the run's
    schedule, data or model: everything but when it stops and saves, the device, the precision and
    the stage's own ``free`` flags."""
    saved = load_meta(folder)["config"]
    for key, value in dataclasses.asdict(cfg).items():
        if key not in RESUME_FREE + free and key in saved and saved[key] != value:
            raise ConfigError(f"--{key} is {value!r} but {folder} was trained with {saved[key]!r}; --resume continues "
                              f"a run with its own flags (drop --{key}, or start over with --force).")


class TrainingError(ConfigError):
    """A run that cannot go on (a non-finite gradient), reported like a bad flag with the flag most
    likely at fault, because one usually is: a learning rate far too high."""


def clip_gradients(parameters, where: str, hint: str) -> float:
    """Clip the gradient norm to 1, as every stage does, and stop before a non-finite gradient (or loss:
    its gradient is not finite either) reaches the weights: the optimizer step and any checkpoint after
    it never happen, so every checkpoint on disk stays finite."""
    norm = float(torch.nn.utils.clip_grad_norm_(parameters, 1.0))
    if not math.isfinite(norm):
        raise TrainingError(f"{where}: the gradient is {norm}, so training stopped before this step changed "
                            f"the weights (the last checkpoint is untouched); {hint}.")
    return norm


def cosine_lr(step: int, total: int, lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay to ``min_ratio * lr`` at ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def announce_precision(stage: str, bf16: bool, device: torch.device, log: "MetricsLog", step: int) -> None:
    """Print the stage's precision and device (rank 0) and record them in its metrics log."""
    log.write(step=step, precision=precision_name(bf16), device=describe_device(device))
    if log.enabled:
        print(f"{stage}: {precision_name(bf16)} on {describe_device(device)}")


class MetricsLog:
    """Append-only JSONL of metrics (``out/logs/<stage>.jsonl``), one object per line, with wall time."""

    def __init__(self, path: str, enabled: bool = True):
        self.path, self.enabled, self.start = path, enabled, time.time()
        if enabled:
            os.makedirs(os.path.dirname(path), exist_ok=True)

    def write(self, **metrics) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": round(time.time() - self.start, 2), **metrics}) + "\n")
