"""Notebook-session helpers: what the notebooks call around the real work.

Setting up a runtime (work from the repository, install the requirements on Colab/Kaggle, mount
Google Drive, report GPUs / memory / dtype, recommend a platform file and preset, check imports),
turning a notebook's parameters into a validated :class:`~nbhelpers.config.RunConfig` exactly as
the CLI does, and the small glue steps of the notebooks (which checkpoint to sample from, where the
samples go, Pass@k of several methods, the end-of-training report). Steps that act (install, mount,
load) print what they did in a line or two.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from .config import REPO_ROOT, ConfigError, RunConfig, estimate_training_steps, load_config, \
    resolve_parameter_file
from .platform import PlatformInfo, detect_platform

PARAMETER_SOURCE = "notebook parameter"
REQUIREMENTS_FILE = REPO_ROOT / "requirements-gpu.txt"  # Colab/Kaggle: requirements.txt + DeepSpeed
INSTALL_MARKER_DIR = Path.home() / ".cache" / "chartrl"
DRIVE_MOUNT_POINT = "/content/drive"
# The 3B model needs about 10 GiB for a LoRA step (benchmarks: 9.2 GB peak); below that only smoke runs.
MIN_GPU_GIB_FOR_3B = 12.0
# Rows of training sets whose size is known without loading them (subset_size None: all of them).
TRAINING_SET_ROWS = {"chart-rvr-train": 34194}
# Modules the notebooks import, with their pip distribution where the names differ.
REQUIRED_MODULES = {
    "torch": "torch", "transformers": "transformers", "trl": "trl", "peft": "peft", "accelerate": "accelerate",
    "datasets": "datasets", "safetensors": "safetensors",
    "tensorboard": "tensorboard", "yaml": "pyyaml", "tqdm": "tqdm", "numpy": "numpy", "pandas": "pandas",
    "matplotlib": "matplotlib", "PIL": "pillow", "papermill": "papermill", "ipywidgets": "ipywidgets",
}
PACKAGE_MODULES = ("config", "platform", "models", "data", "rewards", "objectives", "trainer", "sync",
                   "sampling", "passk", "plots", "widgets", "monitor", "launch")


# ------------------------------------------------------------------------------------------ runtime
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
        print("local machine: nothing installed (set up with `pip install -r requirements.txt` and "
              "`pip install -e .`)")
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


def mount_drive(platform: PlatformInfo, enabled: bool = True) -> Path | None:
    """Mount Google Drive on Colab and create the persistent folder; say where checkpoints persist
    elsewhere. Returns the persistent folder, or None where there is none (local: ./runs only; Colab
    without ``enabled``: set persistent_root = "none" in 10_train then)."""
    if platform.name == "colab" and not enabled:
        print("Google Drive not mounted (use_drive = False): checkpoints stay on the VM; set "
              "persistent_root = \"none\" in 10_train")
        return None
    if platform.name == "colab":
        from google.colab import drive  # type: ignore[import-not-found]

        drive.mount(DRIVE_MOUNT_POINT)
        root = Path(platform.persistent_root)
        root.mkdir(parents=True, exist_ok=True)
        print(f"Google Drive mounted: checkpoints are copied to {root} and a rerun resumes from there")
        return root
    if platform.name == "kaggle":
        root = Path(platform.persistent_root)
        root.mkdir(parents=True, exist_ok=True)
        print(f"Kaggle: checkpoints are copied to {root}; it is kept with the notebook's output when you "
              "'Save Version' (Save & Run All), and a rerun resumes from there")
        return root
    print("local: runs stay in ./runs (nothing to mount)")
    return None


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
    why = ("no GPU with enough memory for the 3B model: smoke runs the whole pipeline on a tiny random "
           "model and synthetic charts" if preset == "smoke" else
           "poc trains the 3B model on 100 problems to check the pipeline; then move on to ultra-fast "
           "(1K problems), fast (10K), moderate or safe (34K) and paper (34K, 4 epochs); 10_train prints "
           "the number of steps of each before it starts")
    return (f'set in 10_train and 20_generate: platform = "{platform.recommended_platform_file}", '
            f'preset = "{preset}"\n({why})')


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


# ------------------------------------------------------------------------------------------ configuration
def notebook_parameters(namespace: Mapping[str, Any], exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The notebook's parameter variables from ``globals()``: every public name that is not a module,
    function or class and not IPython's own (In, Out, ...), minus ``exclude``. An unknown parameter
    injected by papermill is therefore passed on, and the configuration rejects it by name."""
    hidden = set()
    shell = namespace.get("get_ipython")
    if callable(shell) and shell() is not None:
        hidden = set(shell().user_ns_hidden)
    skip = set(exclude) | hidden
    return {name: value for name, value in namespace.items()
            if not name.startswith("_") and name not in skip
            and not isinstance(value, (types.ModuleType, type)) and not callable(value)}


def _named_file(kind: str, key: str, name: Any) -> Path:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{PARAMETER_SOURCE} '{key}' expects the name of a file in parameters/{kind}/, "
                          f"got {name!r} ({type(name).__name__})")
    try:
        return resolve_parameter_file(name, kind)
    except ConfigError as error:
        raise ConfigError(f"{PARAMETER_SOURCE} '{key}': {error}") from None


def parameter_files(mode: str | None = None, preset: str | None = None, platform: str | None = None,
                    params_files: str | Sequence[str] | None = None) -> list[Path]:
    """modes/<mode>.yaml, presets/<preset>.yaml, platforms/<platform>.yaml (None: this machine's
    recommended platform file), then the extra files, in the order they apply."""
    platform = platform if platform is not None else detect_platform().recommended_platform_file
    files = [_named_file(kind, key, name) for kind, key, name in
             (("modes", "mode", mode), ("presets", "preset", preset), ("platforms", "platform", platform))
             if name is not None]
    extra = [params_files] if isinstance(params_files, (str, os.PathLike)) else list(params_files or [])
    return files + [resolve_parameter_file(f) for f in extra]


def notebook_config(mode: str | None = None, preset: str | None = None, platform: str | None = None,
                    params_files: str | Sequence[str] | None = None, **overrides: Any) -> RunConfig:
    """The run configuration of a notebook, resolved like the CLI: the parameter files (see
    :func:`parameter_files`), then every override that is not None. Raises ConfigError naming
    the key (and the file or 'notebook parameter' that set it)."""
    files = parameter_files(mode, preset, platform, params_files)
    cfg = load_config(files, {k: v for k, v in overrides.items() if v is not None},
                      override_source=PARAMETER_SOURCE)
    print("parameter files: " + ", ".join(str(f.relative_to(REPO_ROOT)) if f.is_relative_to(REPO_ROOT)
                                          else str(f) for f in files))
    return cfg


def training_estimate(cfg: RunConfig) -> str:
    """Optimizer steps of a training run (config.estimate_training_steps), when the number of
    training problems is known before loading the data."""
    from .data import get_spec

    rows = TRAINING_SET_ROWS.get(cfg.dataset_name)
    problems = cfg.subset_size or get_spec(cfg.dataset_name).default_subset_size or rows
    if problems is None:
        return (f"{cfg.dataset_name}: the number of problems is known once the data loads; training prints "
                "the estimate then")
    if rows is not None:
        problems = min(problems, rows)
    estimate = estimate_training_steps(cfg, problems)
    return (f"{estimate}\non {cfg.num_processes} process(es); training prints an ETA from measured step times "
            f"at every log (every {cfg.logging_steps} steps)")


# ------------------------------------------------------------------------------------------ sampling
def resolve_checkpoint(cfg: RunConfig, checkpoint: str | None) -> str | None:
    """What to sample from: None -> the base model ``cfg.vlm_name``; "run" -> the run these parameters
    train (``<output_root>/<run name>``); a run folder -> its ``final`` model, else its newest complete
    checkpoint; any other folder -> itself. Raises FileNotFoundError naming the folder."""
    from .sync import find_resume_checkpoint

    if checkpoint is None:
        return None
    folder = cfg.run_dir() if checkpoint == "run" else Path(checkpoint)
    if not folder.is_dir():
        hint = " (train it with 10_train using the same parameters, or set checkpoint = None for the base " \
               "model)" if checkpoint == "run" else ""
        raise FileNotFoundError(f"checkpoint folder not found: {folder}{hint}")
    if (folder / "final").is_dir():
        return str(folder / "final")
    if any(folder.glob("checkpoint-*")):
        newest = find_resume_checkpoint(folder)
        if newest is None:
            raise FileNotFoundError(f"{folder}: no complete checkpoint-N folder to sample from")
        return str(newest)
    return str(folder)


@dataclass
class SamplingPlan:
    """What 20_generate samples: from ``checkpoint`` (None: the base model), stored as ``method``,
    into ``samples_path``."""

    checkpoint: str | None
    method: str
    samples_path: Path


def sampling_plan(cfg: RunConfig, checkpoint: str | None, method: str | None = None,
                  samples_path: str | os.PathLike | None = None) -> SamplingPlan:
    """Resolve the checkpoint (see :func:`resolve_checkpoint`); the method label defaults to the mode
    for a trained checkpoint and to 'base' for the base model; the samples file defaults to
    ``<persistent store or .>/samples/<method>_<dataset>_n<n>.jsonl`` (on Colab/Kaggle it survives
    the VM like the checkpoints, so a rerun resumes it)."""
    from .trainer import persistent_store

    source = resolve_checkpoint(cfg, checkpoint)
    method = method or (cfg.mode if source is not None else "base")
    if samples_path is None:
        store = persistent_store(cfg)
        root = store.parent if store is not None else Path(".")
        samples_path = root / "samples" / f"{method}_{cfg.eval_dataset}_n{cfg.n_samples}.jsonl"
    plan = SamplingPlan(source, method, Path(samples_path))
    resumed = " (resumed: finished problems are kept)" if plan.samples_path.exists() else ""
    print(f"sampling n = {cfg.n_samples} per problem of {cfg.eval_dataset} "
          f"(max_problems {cfg.max_problems}) from {source or cfg.vlm_name + ' (base model)'} as "
          f"'{method}' into {plan.samples_path}{resumed}")
    return plan


# ------------------------------------------------------------------------------------------ Pass@k
@dataclass
class Methods:
    """Several methods' Pass@k results (results-file dicts) with their labels, and per-problem
    counts where they came from samples files (needed for paired comparisons)."""

    labels: list[str]
    results: list[dict]
    problems: dict[str, list] = field(default_factory=dict)


def load_methods(samples_files: Sequence[str] | None = None, results_files: Sequence[str] | None = None,
                 labels: Sequence[str] | None = None, *, bootstrap: int = 1000, seed: int = 0,
                 results_dir: str | os.PathLike | None = None) -> Methods:
    """Pass@k of each samples file (computed, and written to ``results_dir/<label>.json`` when given)
    or each results file; labels default to the files' method names (samples: the file stems)."""
    from . import passk

    if bool(samples_files) == bool(results_files):
        raise ValueError("set exactly one of samples_files (JSON Lines) or results_files (JSON)")
    files = list(samples_files or results_files)
    if labels is not None and len(labels) != len(files):
        raise ValueError(f"{len(labels)} labels for {len(files)} files")
    if results_files:
        results = [passk.load_results(f) for f in files]
        methods = Methods(list(labels) if labels else [r["method"] for r in results], results)
    else:
        methods = Methods(list(labels) if labels else [Path(f).stem for f in files], [])
        for label, path in zip(methods.labels, files):
            problems = passk.read_samples(path)
            results = passk.passk_results(problems, label, bootstrap=bootstrap, seed=seed, source_samples=[path])
            if results_dir is not None:
                passk.write_results(results, Path(results_dir) / f"{label}.json")
            methods.results.append(results)
            methods.problems[label] = problems
    if len(set(methods.labels)) != len(methods.labels):
        raise ValueError(f"method labels must be unique, got {methods.labels}; set labels")
    print(f"{len(files)} methods: " + ", ".join(f"{label} ({r['n_problems']} problems, n = {r['n_samples']})"
                                                for label, r in zip(methods.labels, methods.results)))
    return methods


def passk_frame(methods: Methods):
    """Pass@k in percent, one row per method and one column per k (pandas DataFrame)."""
    import pandas as pd

    frame = pd.DataFrame({label: {int(k): 100 * v for k, v in r["pass_at_k"].items()}
                          for label, r in zip(methods.labels, methods.results)}).T
    frame = frame[sorted(frame.columns)]
    frame.columns = [f"pass@{k}" for k in frame.columns]
    return frame.round(2)


def passk_tables(methods: Methods) -> str:
    """Each method's Pass@k table with 95% intervals (overall, then per dataset), as text."""
    from .passk import format_table

    return "\n\n".join(format_table(r) for r in methods.results)


def bar_ks(methods: Methods, ks: Sequence[int] | None = None) -> list[int]:
    """The k of the bar chart: given, else 1, a middle power of two and the largest k all methods have."""
    if ks:
        return list(ks)
    shared = sorted(set.intersection(*(set(int(k) for k in r["pass_at_k"]) for r in methods.results)))
    if not shared:
        raise ValueError("the methods share no k value")
    return sorted({shared[0], shared[len(shared) // 2], shared[-1]})


def baseline_label(methods: Methods, baseline: str | None) -> str:
    """The baseline for improvements and paired comparisons: given (must be a label), else 'grpo' if
    present, else the first method."""
    if baseline is not None:
        if baseline not in methods.labels:
            raise ValueError(f"baseline {baseline!r} is not one of the methods {methods.labels}")
        return baseline
    return "grpo" if "grpo" in methods.labels else methods.labels[0]


def paired_comparisons(methods: Methods, baseline: str, *, bootstrap: int = 1000, seed: int = 0) -> str:
    """Each method minus the baseline on the same problems (paired bootstrap), as text; needs samples."""
    from . import passk

    if not methods.problems:
        return "paired comparisons need samples files (results files hold no per-problem counts)"
    blocks = [passk.format_comparison(passk.compare_methods(
        methods.problems[label], methods.problems[baseline], method_a=label, method_b=baseline,
        bootstrap=bootstrap, seed=seed)) for label in methods.labels if label != baseline]
    return "\n\n".join(blocks) or f"only the baseline {baseline!r}: nothing to compare"


def plot_improvement(methods: Methods, baseline: str, save_to: str | os.PathLike | None = None):
    """Each method's Pass@k minus the baseline's (plots.plot_improvement); None, with a note, when the
    baseline is the only method."""
    from .plots import plot_improvement as plot

    if len(methods.labels) < 2:
        print(f"only {baseline!r}: no other method to compare")
        return None
    return plot(methods.results, methods.labels, baseline=baseline, save_to=save_to)


def figure_path(folder: str | os.PathLike | None, name: str) -> Path | None:
    """``folder/name``, or None (do not save) when no folder is set."""
    return None if folder is None else Path(folder) / name


# ------------------------------------------------------------------------------------------ training report
def training_report(run_dir: str | os.PathLike):
    """Print the run summary, write ``summary.txt`` and ``training_curves.png`` into the run folder,
    and return the curves figure."""
    from .monitor import format_summary, read_run, summarize_run, write_summary
    from .plots import plot_training_curves

    run_dir = Path(run_dir)
    frame = read_run(run_dir)
    summary = summarize_run(frame, run_dir.name)
    print(format_summary(summary))
    write_summary(summary, run_dir)
    return plot_training_curves(frame, save_to=run_dir / "training_curves.png")
