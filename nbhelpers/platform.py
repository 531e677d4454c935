"""Where we run: Colab, Kaggle or local; which GPUs; which dtype; which accelerate/DeepSpeed config."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from .config import RunConfig

LAUNCH_CONFIG_DIR = Path(__file__).resolve().parent / "launch_configs"
# Kaggle: the store is a folder of its own in /kaggle/working (kept by Save Version and by the Files
# persistence setting), apart from the code clone /kaggle/working/chartrl; the platform file puts the local
# run folders in /kaggle/temp, which counts against no output quota and is not kept.
PERSISTENT_ROOTS = {"colab": "/content/drive/MyDrive/chartrl", "kaggle": "/kaggle/working/chartrl-runs",
                    "local": None}
PLATFORM_FILES = {"colab": "colab-a100", "kaggle": "kaggle-2xt4", "local": "local-cpu"}


@dataclass
class GPUInfo:
    name: str
    memory_gb: float  # total device memory, GiB
    capability: tuple[int, int]

    @property
    def supports_bf16(self) -> bool:
        return self.capability >= (8, 0)  # Ampere and newer; the T4 (7.5) has no bf16


@dataclass
class PlatformInfo:
    """What the code can rely on here. ``dtype`` is the training dtype name (bf16, fp16 or fp32)."""

    name: str  # colab | kaggle | local
    gpus: list[GPUInfo] = field(default_factory=list)

    @property
    def dtype(self) -> str:
        if not self.gpus:
            return "fp32"
        return "bf16" if all(g.supports_bf16 for g in self.gpus) else "fp16"

    @property
    def persistent_root(self) -> str | None:
        return PERSISTENT_ROOTS[self.name]

    @property
    def recommended_platform_file(self) -> str:
        if self.name == "local" and self.gpus:
            return "colab-a100" if self.gpus[0].supports_bf16 else "kaggle-2xt4"
        return PLATFORM_FILES[self.name]

    def report(self) -> str:
        lines = [f"platform: {self.name}   training dtype: {self.dtype}   "
                 f"persistent store: {self.persistent_root or './runs (local only)'}"]
        if not self.gpus:
            lines.append("GPUs: none (CPU only; use the smoke preset)")
        for i, g in enumerate(self.gpus):
            lines.append(f"GPU {i}: {g.name}, {g.memory_gb:.1f} GiB, compute {g.capability[0]}.{g.capability[1]}, "
                         f"bf16 {'yes' if g.supports_bf16 else 'no'}")
        lines.append(f"recommended: --params parameters/platforms/{self.recommended_platform_file}.yaml")
        return "\n".join(lines)


def detect_platform_name(environ: Mapping[str, str] | None = None, colab_importable: bool | None = None) -> str:
    """colab when ``google.colab`` imports or COLAB_* variables are set; kaggle when KAGGLE_KERNEL_RUN_TYPE is set."""
    env = os.environ if environ is None else environ
    if colab_importable is None:
        colab_importable = importlib.util.find_spec("google") is not None and \
            importlib.util.find_spec("google.colab") is not None
    if colab_importable or any(k.startswith("COLAB_") for k in env):
        return "colab"
    if "KAGGLE_KERNEL_RUN_TYPE" in env:
        return "kaggle"
    return "local"


def persistent_store(cfg: RunConfig) -> Path | None:
    """The run's folder in the persistent store: ``<persistent_root>/<run name>``, ``persistent_root`` auto being
    this platform's store (:data:`PERSISTENT_ROOTS`); None when persistence is off."""
    root = cfg.persistent_root
    if root in (None, "none", ""):
        return None
    if root == "auto":
        root = PERSISTENT_ROOTS[detect_platform_name()]
        if root is None:
            return None
    return Path(root) / cfg.resolved_run_name()


def detect_gpus() -> list[GPUInfo]:
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        gpus.append(GPUInfo(props.name, props.total_memory / 2**30, (props.major, props.minor)))
    return gpus


def detect_platform(environ: Mapping[str, str] | None = None, gpus: list[GPUInfo] | None = None,
                    colab_importable: bool | None = None) -> PlatformInfo:
    return PlatformInfo(detect_platform_name(environ, colab_importable),
                        detect_gpus() if gpus is None else gpus)


def resolve_dtype(requested: str, platform: PlatformInfo) -> str:
    """``auto`` -> the platform's dtype; bf16 on a GPU without bf16 is refused with the reason."""
    if requested == "auto":
        return platform.dtype
    if requested == "bf16" and platform.gpus and not all(g.supports_bf16 for g in platform.gpus):
        raise ValueError(f"dtype bf16 is not supported by {platform.gpus[0].name}; use fp16")
    if requested in ("bf16", "fp16") and not platform.gpus:
        return "fp32" if requested == "fp16" else requested
    return requested


def resolve_deepspeed(requested: str | None, finetune: str) -> tuple[str, str]:
    """(``none`` or ``zero3``, why) for the ``deepspeed`` key; ``auto`` picks by ``finetune``.

    LoRA: no DeepSpeed. The base model fits one GPU (3B in fp16: 7.5 GB), so several GPUs run plain data
    parallel (only the adapter gradients are all-reduced) and each runs the fast rollout engine, which cannot
    run on ZeRO-3-partitioned weights. Full fine-tuning: ZeRO-3, which partitions weights, gradients and
    optimizer state over the GPUs.
    """
    if requested in (None, "none"):
        return "none", "deepspeed: none (plain data parallel on several GPUs)"
    if requested == "zero3":
        return "zero3", "deepspeed: zero3 (set explicitly)"
    if requested != "auto":
        raise ValueError(f"deepspeed must be none, zero3 or auto, got {requested!r}")
    if finetune == "full":
        return "zero3", "deepspeed: auto -> zero3 (full fine-tuning: weights, gradients and optimizer state " \
                        "partitioned over the GPUs; training uses TRL's generation)"
    return "none", "deepspeed: auto -> none (LoRA: plain data parallel, the whole base model and the fast " \
                   "rollout engine on each GPU)"


def accelerate_config_path(num_processes: int, deepspeed: str | None) -> Path:
    """The shipped accelerate config for N processes and a resolved ``deepspeed`` (none: one process or plain
    multi-GPU data parallel; zero3: DeepSpeed ZeRO-3)."""
    if deepspeed in (None, "none"):
        name = "single.yaml" if num_processes == 1 else "multi-gpu.yaml"
    else:
        name = f"zero3-{min(num_processes, 2)}gpu.yaml"
    return LAUNCH_CONFIG_DIR / name


def deepspeed_config_path() -> Path:
    return LAUNCH_CONFIG_DIR / "ds_zero3.json"
