"""A notebook's parameters turned into a validated RunConfig exactly as the command line does: the
mode, preset and platform files, then every parameter that is not None; and the size of the run."""

from __future__ import annotations

import os
import types
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .config import REPO_ROOT, ConfigError, RunConfig, estimate_training_steps, load_config, \
    resolve_parameter_file
from .platform import detect_platform
from .registry import check_names

PARAMETER_SOURCE = "notebook parameter"
# Rows of training sets whose size is known without loading them (subset_size None: all of them).
TRAINING_SET_ROWS = {"chart-rvr-train": 34194}


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


def _named_file(kind: str, name: Any, source: str) -> Path:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{source} expects the name of a file in parameters/{kind}/, "
                          f"got {name!r} ({type(name).__name__})")
    return resolve_parameter_file(name, kind, source)


def parameter_files(mode: str | None = None, preset: str | None = None, platform: str | None = None,
                    params_files: str | Sequence[str] | None = None, *, flags: bool = False) -> list[Path]:
    """modes/<mode>.yaml, presets/<preset>.yaml, platforms/<platform>.yaml (None: this machine's
    recommended platform file), then the extra files, in the order they apply. Errors name the
    notebook parameter, or with ``flags`` the command-line flag (--preset ...)."""
    def named(kind: str, key: str, name: Any) -> list[Path]:
        return [] if name is None else [_named_file(kind, name, f"--{key}" if flags else f"{PARAMETER_SOURCE} '{key}'")]

    files = named("modes", "mode", mode) + named("presets", "preset", preset)  # checked before the GPU probe
    platform = platform if platform is not None else detect_platform().recommended_platform_file
    files += named("platforms", "platform", platform)
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
    check_names(cfg)
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
