"""Where we run: Colab, Kaggle or local; which GPUs; which dtype; which accelerate/DeepSpeed config."""

from __future__ import annotations

import importlib.util
import json
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


def zero3_unavailable_reason(on_gpu: bool, installed: bool | None = None,
                             environ: Mapping[str, str] | None = None) -> str | None:
    """Why DeepSpeed ZeRO-3, resolved for a run, cannot run here (None: it can). It runs under ``accelerate launch``
    with a DeepSpeed config (ACCELERATE_USE_DEEPSPEED=true), or in-process on a GPU with the ``deepspeed`` package
    installed (``installed``: None looks it up)."""
    env = os.environ if environ is None else environ
    if env.get("ACCELERATE_USE_DEEPSPEED") == "true":
        return None
    if not on_gpu:
        return "no GPU here"
    if not (importlib.util.find_spec("deepspeed") is not None if installed is None else installed):
        return "the deepspeed package is not installed"
    return None


def weights_dtype(dtype: str, finetune: str, deepspeed: str) -> str:
    """The dtype a run loads and keeps its weights in, for compute dtype ``dtype`` (bf16, fp16 or fp32).

    Full fine-tuning without DeepSpeed in bf16/fp16: fp32 master weights, computed under autocast (the Trainer's
    mixed precision), since an optimizer updating bf16 weights rounds away every update below half a bf16 step
    (98.5% of the weights unchanged after 2 steps at lr 1e-6). Otherwise ``dtype``: LoRA freezes the base weights
    (PEFT keeps the adapters in fp32) and DeepSpeed keeps fp32 masters in its optimizer."""
    if finetune == "full" and deepspeed == "none" and dtype in ("bf16", "fp16"):
        return "fp32"
    return dtype


@dataclass(frozen=True)
class TrainingPath:
    """How a run trains, resolved from its configuration and this machine before any model loads."""

    finetune: str  # lora | full
    processes: int
    on_gpu: bool
    dtype: str  # compute dtype: bf16, fp16 or fp32
    weights_dtype: str  # dtype the model's weights are loaded and kept in (see weights_dtype)
    master_dtype: str  # dtype of the weights the optimizer updates (DeepSpeed's or PEFT's copy where they keep one)
    deepspeed: str  # none | zero3, as it runs here
    deepspeed_why: str  # how the deepspeed key resolved (resolve_deepspeed)
    deepspeed_off: str  # why a resolved zero3 does not run here ('' when it does, or was not resolved)
    offload: str  # where ZeRO-3 keeps the optimizer state: cpu or none (the in-process ds_zero3.json's setting)
    engine: str  # rollouts: fast | stock | vllm
    engine_why: str  # why the fast engine does not run ('' when it does)

    def line(self) -> str:
        """One human line, e.g. ``Training path: full fine-tuning, 1 process on GPU, bf16 compute under autocast
        over fp32 master weights, no DeepSpeed; rollouts: fast engine on bf16 copies of the weights``."""
        where = f"{self.processes} process{'es' if self.processes > 1 else ''} on {'GPU' if self.on_gpu else 'CPU'}"
        ds = f"DeepSpeed ZeRO-3{' (optimizer state on the CPU)' if self.offload == 'cpu' else ''}" \
            if self.deepspeed == "zero3" else \
            f"no DeepSpeed (zero3 resolved, but {self.deepspeed_off})" if self.deepspeed_off else "no DeepSpeed"
        if self.finetune == "lora":
            precision = f"{self.dtype} compute, base weights {self.weights_dtype} (frozen), LoRA adapters " \
                        f"{self.master_dtype}" + (" masters in DeepSpeed" if self.deepspeed == "zero3" else "")
        elif self.deepspeed == "zero3":
            precision = f"{self.dtype} compute and weights, {self.master_dtype} masters in DeepSpeed's optimizer"
        elif self.weights_dtype != self.dtype:
            precision = f"{self.dtype} compute under autocast over {self.weights_dtype} master weights"
        else:
            precision = f"{self.dtype} weights and compute"
        if self.engine == "fast":
            rollouts = "fast engine" + (f" on {self.dtype} copies of the weights"
                                        if self.weights_dtype != self.dtype and self.finetune == "full" else "")
        elif self.engine == "vllm":
            rollouts = "vLLM"
        else:
            rollouts = f"TRL's generate ({self.engine_why})"
        return f"Training path: {'LoRA' if self.finetune == 'lora' else 'full fine-tuning'}, {where}, {precision}, " \
               f"{ds}; rollouts: {rollouts}"


def resolve_training_path(cfg, platform: PlatformInfo | None = None,
                          deepspeed_installed: bool | None = None) -> TrainingPath:
    """The :class:`TrainingPath` of RunConfig ``cfg`` on ``platform`` (None: this machine), from the resolvers the
    run itself uses: :func:`resolve_dtype`, :func:`resolve_deepspeed` with :func:`zero3_unavailable_reason`,
    :func:`weights_dtype` and the rollout engine's :func:`nbhelpers.rollout.dispatch.engine_choice`. A reason the
    engine cannot run that only the loaded model shows (a model class it does not support) is said when it loads.
    ConfigError naming the key when ``dtype`` or ``rollout_engine`` cannot run here."""
    from .config import ConfigError
    from .rollout.dispatch import engine_choice
    from .rollout.engine import PARTITIONED_REASON, forced_off_reason

    platform = detect_platform() if platform is None else platform
    sources = getattr(cfg, "_sources", {})
    try:
        dtype = resolve_dtype(cfg.dtype, platform)
    except ValueError as error:
        raise ConfigError(f"{sources.get('dtype', 'default')}: key 'dtype': {error}") from None
    deepspeed, deepspeed_why = resolve_deepspeed(cfg.deepspeed, cfg.finetune)
    deepspeed_off = zero3_unavailable_reason(bool(platform.gpus), deepspeed_installed) if deepspeed == "zero3" \
        else None
    deepspeed = "none" if deepspeed_off else deepspeed
    loaded = weights_dtype(dtype, cfg.finetune, deepspeed)
    reason = forced_off_reason() or (PARTITIONED_REASON if deepspeed == "zero3" else None)
    try:
        engine = engine_choice(cfg.rollout_engine, reason)
    except RuntimeError as error:
        raise ConfigError(f"{sources.get('rollout_engine', 'default')}: key 'rollout_engine': {error}") from None
    engine_why = "" if engine == "fast" else reason or f"rollout_engine: {cfg.rollout_engine}"
    # the optimizer updates: DeepSpeed's fp32 partitions, PEFT's fp32 adapters, or the model's own weights
    offload = zero3_optimizer_offload(cfg.num_processes) if deepspeed == "zero3" else "none"
    master = loaded if cfg.finetune == "full" and deepspeed == "none" else "fp32"
    return TrainingPath(finetune=cfg.finetune, processes=cfg.num_processes, on_gpu=bool(platform.gpus), dtype=dtype,
                        weights_dtype=loaded, master_dtype=master, deepspeed=deepspeed, deepspeed_why=deepspeed_why,
                        deepspeed_off=deepspeed_off or "", offload=offload, engine=engine, engine_why=engine_why)


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


def zero3_optimizer_offload(num_processes: int) -> str:
    """Where ZeRO-3 keeps the optimizer state (cpu or none): one process trains in-process with
    :func:`deepspeed_config_path`, several under ``accelerate launch`` with :func:`accelerate_config_path`."""
    import yaml

    if num_processes == 1:
        zero = json.loads(deepspeed_config_path().read_text())["zero_optimization"]
        return zero.get("offload_optimizer", {}).get("device", "none")
    launch = yaml.safe_load(accelerate_config_path(num_processes, "zero3").read_text())
    return launch["deepspeed_config"].get("offload_optimizer_device", "none")
