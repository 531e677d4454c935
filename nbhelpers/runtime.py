"""The machine a notebook runs on: every notebook's first step, and the report and recommendation of
00_setup (GPUs, memory, dtype, which platform file and preset to use)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .config import REPO_ROOT
from .install import install_requirements
from .platform import PlatformInfo, detect_platform

# The 3B model needs about 10 GiB for a LoRA step (benchmarks: 9.2 GB peak); below that only smoke runs.
MIN_GPU_GIB_FOR_3B = 12.0


def prepare() -> None:
    """Every notebook's first step: work from the repository root when started in ``notebooks/``,
    install the requirements on Colab/Kaggle (once per runtime), show figures inline, turn on
    Colab's widget manager; prints the platform in one line."""
    if Path.cwd().resolve() == (REPO_ROOT / "notebooks").resolve():
        os.chdir(REPO_ROOT)
    platform = detect_platform()
    install_requirements(platform.name)
    _show_figures_inline()
    if platform.name == "colab":
        from google.colab import output  # type: ignore[import-not-found]

        output.enable_custom_widget_manager()
    gpus = ", ".join(g.name for g in platform.gpus) or "none"
    print(f"platform: {platform.name}   GPUs: {gpus}   dtype: {platform.dtype}   working folder: {Path.cwd()}")


def _show_figures_inline() -> None:
    """Let a bare matplotlib Figure (nbhelpers.plots builds them without pyplot) render as PNG."""
    try:
        from IPython import get_ipython
        from IPython.core.pylabtools import select_figure_formats
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None:
        select_figure_formats(shell, {"png"})


def memory_gib() -> float:
    """Total RAM of this machine in GiB."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def recommend_preset(platform: PlatformInfo) -> str:
    """smoke without a GPU big enough for the 3B model, else poc (check the pipeline on the real
    model before the longer presets ultra-fast, fast, moderate, safe, paper)."""
    gpu_gib = sum(g.memory_gb for g in platform.gpus)
    return "poc" if gpu_gib >= MIN_GPU_GIB_FOR_3B else "smoke"


def environment_report(platform: PlatformInfo) -> str:
    """Platform, GPUs, training dtype, persistent store, CPU cores, memory and free disk."""
    disk = shutil.disk_usage(Path.cwd())
    return (f"{platform.report()}\nCPU cores: {os.cpu_count()}   RAM: {memory_gib():.1f} GiB   "
            f"free disk here: {disk.free / 2**30:.1f} GiB")


def recommendation(platform: PlatformInfo) -> str:
    """The platform file and preset to set in 10_train and 20_generate, and why."""
    preset = recommend_preset(platform)
    why = ("no GPU with enough memory for the 3B model: smoke runs the whole pipeline on a tiny "
           "pretrained chart model and synthetic charts" if preset == "smoke" else
           "poc trains the 3B model on 100 problems to check the pipeline; then move on to ultra-fast "
           "(1K problems), fast (10K), moderate or safe (34K) and paper (34K, 4 epochs); 10_train prints "
           "the number of steps of each before it starts")
    return (f'set in 10_train and 20_generate: platform = "{platform.recommended_platform_file}", '
            f'preset = "{preset}"\n({why})')
