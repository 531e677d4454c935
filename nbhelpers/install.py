"""Installing and checking the runtime's libraries: ``pip install -r requirements-gpu.txt`` once per
Colab/Kaggle runtime, and an import check of every library and nbhelpers module with versions."""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import subprocess
import sys
from pathlib import Path
from typing import Callable, Mapping, Sequence

from .config import REPO_ROOT

REQUIREMENTS_FILE = REPO_ROOT / "requirements-gpu.txt"  # Colab/Kaggle: the runtime set + DeepSpeed
INSTALL_MARKER_DIR = Path.home() / ".cache" / "chartrl"
# Modules the notebooks import, with their pip distribution where the names differ.
REQUIRED_MODULES = {
    "torch": "torch", "transformers": "transformers", "trl": "trl", "peft": "peft", "accelerate": "accelerate",
    "datasets": "datasets", "safetensors": "safetensors",
    "tensorboard": "tensorboard", "yaml": "pyyaml", "tqdm": "tqdm", "numpy": "numpy", "pandas": "pandas",
    "matplotlib": "matplotlib", "PIL": "pillow", "papermill": "papermill", "ipywidgets": "ipywidgets",
}
PACKAGE_MODULES = ("config", "registry", "platform", "models", "data", "rewards", "objectives", "trainer",
                   "training_callbacks", "training_setup", "training_run", "sync", "sampling", "passk", "plots",
                   "widgets", "monitor", "launch", "runtime", "drive", "params", "sampling_setup", "comparison",
                   "model_card", "provenance")


def install_command(requirements: Path = REQUIREMENTS_FILE) -> list[str]:
    return [sys.executable, "-m", "pip", "install", "-q", "-r", str(requirements)]


def install_requirements(platform_name: str, enabled: bool = True, requirements: Path = REQUIREMENTS_FILE,
                         marker_dir: Path = INSTALL_MARKER_DIR,
                         run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> bool:
    """``pip install -r requirements.txt`` on Colab/Kaggle, once per runtime and requirements file
    (a marker named by the file's hash remembers it); nothing locally or when not ``enabled``.
    True when pip ran."""
    if not enabled:
        print("install skipped (install = False)")
        return False
    if platform_name == "local":
        print("local machine: nothing installed (set up with `pip install -r requirements.txt -e .`)")
        return False
    digest = hashlib.sha256(Path(requirements).read_bytes()).hexdigest()[:16]
    marker = Path(marker_dir) / f"requirements-{digest}.installed"
    if marker.exists():
        print(f"{platform_name}: requirements already installed in this runtime")
        return False
    print(f"{platform_name}: installing {requirements} (a few minutes) ...", flush=True)
    result = run(install_command(requirements), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"pip install -r {requirements} failed (exit {result.returncode}):\n"
                           f"{(result.stdout + result.stderr)[-3000:]}")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(" ".join(install_command(requirements)) + "\n")
    print(f"{platform_name}: requirements installed. If pip replaced a package this runtime had already "
          "imported, restart the runtime and run the notebook again.")
    return True


def check_imports(modules: Mapping[str, str] = REQUIRED_MODULES,
                  package_modules: Sequence[str] = PACKAGE_MODULES) -> dict[str, str]:
    """Import every required library and nbhelpers module; print name and version; raise
    ImportError listing all that fail. Returns {module: version or 'ok'}."""
    found, failed = {}, {}
    for module, distribution in modules.items():
        try:
            importlib.import_module(module)
            found[module] = importlib.metadata.version(distribution)
        except Exception as error:  # an import can fail with any exception, not just ImportError
            failed[module] = f"{type(error).__name__}: {error}"
    for name in package_modules:
        try:
            importlib.import_module(f"nbhelpers.{name}")
            found[f"nbhelpers.{name}"] = "ok"
        except Exception as error:
            failed[f"nbhelpers.{name}"] = f"{type(error).__name__}: {error}"
    for name, version in found.items():
        print(f"  {name:24s} {version}")
    if failed:
        raise ImportError("could not import: " + "; ".join(f"{k} ({v})" for k, v in failed.items()))
    return found
