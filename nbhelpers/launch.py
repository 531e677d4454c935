"""Training from a notebook on one or several devices.

One process trains in the notebook's own kernel (:func:`nbhelpers.training_run.train`). Several
processes (Kaggle's two T4s) need ``accelerate launch``: the resolved configuration is written to
``<run>/launch-params.yaml`` and ``accelerate launch --config_file <shipped config> --num_processes N
-m nbhelpers train --params <run>/launch-params.yaml`` runs as a subprocess whose output is streamed
line by line into the notebook (or console) and kept in ``<run>/launch.log``.
"""

from __future__ import annotations

import io
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Mapping, Sequence, TextIO

import yaml

from .config import REPO_ROOT, RunConfig
from .platform import accelerate_config_path, resolve_deepspeed
from .provenance import check_run_identity

LAUNCH_PARAMS = "launch-params.yaml"
LAUNCH_LOG = "launch.log"
STOP_GRACE_S = 30  # seconds a stopped launch gets to exit after SIGTERM before SIGKILL


class LaunchError(RuntimeError):
    """``accelerate launch`` exited with a non-zero code; the message names the code and the log."""


def launch_command(params_file: str | os.PathLike, num_processes: int, deepspeed: str | None) -> list[str]:
    """``accelerate launch`` (run with this interpreter) of ``python -m nbhelpers train`` with the
    shipped accelerate config for ``num_processes`` and a resolved ``deepspeed`` (None/none or zero3)."""
    return [sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(accelerate_config_path(num_processes, deepspeed)),
            "--num_processes", str(num_processes),
            "-m", "nbhelpers", "train", "--params", str(params_file)]


def write_launch_params(cfg: RunConfig, folder: str | os.PathLike) -> Path:
    """Every key of ``cfg`` as a parameters file the launched ``train`` reads back unchanged."""
    path = Path(folder) / LAUNCH_PARAMS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# The notebook's resolved configuration, written by nbhelpers.launch for `accelerate launch`\n"
                    "# (the notebook printed where each value came from).\n"
                    + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path


def launch_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of the launched processes: ``base`` (default os.environ) with the repository
    first on PYTHONPATH, so ``-m nbhelpers`` imports this checkout even where it is not pip-installed."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_streaming(command: Sequence[str], log_path: str | os.PathLike | None = None,
                  env: Mapping[str, str] | None = None, out: TextIO | None = None) -> int:
    """Run ``command``, copying its stdout and stderr to ``out`` (default sys.stdout) line by line as
    they arrive (carriage returns kept, so progress bars redraw in place) and to ``log_path``.
    Stopping the caller (KeyboardInterrupt) terminates the whole process group. Returns the exit code."""
    out = sys.stdout if out is None else out
    log = open(log_path, "a", encoding="utf-8") if log_path is not None else None
    process = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env=None if env is None else dict(env), start_new_session=True)
    try:
        for line in io.TextIOWrapper(process.stdout, encoding="utf-8", errors="replace", newline=""):
            out.write(line)
            out.flush()
            if log is not None:
                log.write(line)
                log.flush()
        return process.wait()
    except KeyboardInterrupt:
        _stop(process)
        raise
    finally:
        if log is not None:
            log.close()


def _stop(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def launch_training(cfg: RunConfig, run: Callable[..., int] = run_streaming) -> Path:
    """Train ``cfg`` with ``accelerate launch`` over ``cfg.num_processes`` processes; returns the run
    folder. Raises LaunchError when the launch fails (the log stays in the run folder)."""
    check_run_identity(cfg)  # a refused run writes nothing into an earlier run's folder
    run_dir = cfg.run_dir()
    params = write_launch_params(cfg, run_dir)
    deepspeed, why = resolve_deepspeed(cfg.deepspeed, cfg.finetune)
    command = launch_command(params, cfg.num_processes, deepspeed)
    log_path = run_dir / LAUNCH_LOG
    print(why, flush=True)
    print("$ " + shlex.join(command), flush=True)
    code = run(command, log_path=log_path, env=launch_env())
    if code != 0:
        raise LaunchError(f"accelerate launch exited with code {code}; its full output is in {log_path}")
    return run_dir


def train(cfg: RunConfig) -> Path:
    """Train in this process on one device, through ``accelerate launch`` on several; returns the run folder."""
    if cfg.num_processes > 1:
        return launch_training(cfg)
    from .training_run import train as train_in_process  # torch and TRL: only when training in this process

    return train_in_process(cfg)
