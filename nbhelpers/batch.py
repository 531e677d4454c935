"""``python -m nbhelpers batch``: each mode through 10_train and 20_generate with papermill, then
30_passk over all of them, everything in one batch folder.

    <out>/notebooks/10_train_<mode>.ipynb, 20_generate_<mode>.ipynb, 30_passk.ipynb   executed copies
    <out>/runs/<run name>/      training runs (checkpoints, config, summary, training curves)
    <out>/samples/<mode>.jsonl  samples;  <out>/results/<mode>.json  Pass@k results
    <out>/figures/*.png         Pass@k figures;  <out>/batch.json  what ran, what failed and why

A failed mode does not stop the others; it is reported at the end and the exit code is 1. Every
mode's configuration is checked before the first notebook starts. Rerunning with the same ``--out``
resumes: training continues from the newest checkpoints and sampling from the finished problems.
Rerunning only some modes (``--modes nsr``, e.g. after nsr failed) keeps the others: 30_passk compares
every mode whose samples the folder holds and ``batch.json`` keeps the other modes' steps. A rerun with
another preset, platform or ``--set`` than the folder's is refused before anything changes. The
figures and results are replaced only when 30_passk succeeds.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .config import MODES, REPO_ROOT, RunConfig, load_config, parameter_names, parse_overrides

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
KERNEL_NAME = "python3"
TRAIN, GENERATE, PASSK = "10_train", "20_generate", "30_passk"


class BatchError(RuntimeError):
    """The batch cannot start (no Jupyter kernel, a bad mode list); the message says what to do."""


@dataclass
class Step:
    """One notebook execution: which notebook, for which mode (None for 30_passk), where the executed
    copy is, how it went (ok, failed, skipped), the error's first line, and seconds taken."""

    notebook: str
    mode: str | None
    output: str
    status: str = "pending"
    error: str | None = None
    seconds: float = 0.0


@dataclass
class BatchReport:
    """What a batch folder holds: its preset, platform and ``--set`` overrides, the modes it covers, and
    every notebook run (a rerun of some modes keeps the other modes' steps)."""

    folder: str
    preset: str
    modes: list[str]
    platform: str | None
    steps: list[Step] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> list[Step]:
        return [s for s in self.steps if s.status == "failed"]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def batch_folder(preset: str, out: str | Path | None = None, now: datetime | None = None) -> Path:
    """``out``, or ``batches/<preset>-<YYYYmmdd-HHMMSS>``; absolute, because the notebooks run in the
    repository root."""
    folder = Path(out) if out is not None else Path("batches") / \
        f"{Path(preset).stem}-{(now or datetime.now()):%Y%m%d-%H%M%S}"
    return folder.resolve()


def check_kernel(name: str = KERNEL_NAME) -> None:
    """Raise BatchError when Jupyter has no kernel ``name``, saying how to install it."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(name)
    except NoSuchKernel:
        raise BatchError(f"no Jupyter kernel named '{name}'; install it with "
                         f"`{sys.executable} -m ipykernel install --user`") from None


def execute_notebook(notebook: str, output: Path, parameters: Mapping[str, Any]) -> None:
    """Run ``notebooks/<notebook>.ipynb`` with papermill (kernel python3, working folder the repository
    root), streaming cell output to the log and saving the executed copy at ``output`` after every
    cell. Raises papermill's exception when a cell fails."""
    import papermill

    papermill.execute_notebook(str(NOTEBOOKS_DIR / f"{notebook}.ipynb"), str(output), parameters=dict(parameters),
                               kernel_name=KERNEL_NAME, cwd=str(REPO_ROOT), log_output=True, progress_bar=False)


def check_configs(preset: str, modes: Sequence[str], platform: str | None,
                  overrides: Mapping[str, Any]) -> dict[str, RunConfig]:
    """Each mode's configuration, resolved as 10_train resolves it; ConfigError names the bad key."""
    from .params import parameter_files
    from .registry import check_names

    if not modes:
        raise BatchError("no modes given")
    unknown = [m for m in modes if m not in MODES]
    if unknown or len(set(modes)) != len(modes):
        raise BatchError(f"--modes must be distinct names out of {', '.join(MODES)}; got {' '.join(modes)}")
    configs = {mode: load_config(parameter_files(mode, preset, platform, flags=True), dict(overrides),
                                 override_source="--set") for mode in modes}
    for cfg in configs.values():
        check_names(cfg)
    return configs


def previous_report(folder: Path, preset: str, platform: str | None,
                    overrides: Mapping[str, Any]) -> BatchReport | None:
    """The report of an earlier batch in ``folder`` (None when there is none). Raises BatchError when it ran
    with another preset, platform or overrides: its samples would not compare with this batch's."""
    path = folder / "batch.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        report = BatchReport(**{**data, "steps": [Step(**step) for step in data["steps"]]})
    except (ValueError, TypeError, KeyError) as error:
        raise BatchError(f"{path}: not a batch report ({error}); use another --out") from None
    asked = {"preset": preset, "platform": platform, "overrides": dict(overrides)}
    held = {"preset": report.preset, "platform": report.platform, "overrides": report.overrides}
    differing = [f"{key} {held[key]!r} -> {asked[key]!r}" for key in asked if held[key] != asked[key]]
    if differing:
        raise BatchError(f"{folder} holds a batch run with other settings ({', '.join(differing)}); rerun it "
                         "with the same --preset, --platform and --set, or use another --out")
    return report


def _modes_with_samples(previous: BatchReport | None, rerun: Sequence[str], samples: Mapping[str, str],
                        folder: Path) -> dict[str, str]:
    """Samples files of the modes sampled now, plus those of earlier modes not rerun now whose generation
    succeeded; in the order of MODES."""
    found = dict(samples)
    for step in previous.steps if previous else []:
        path = folder / "samples" / f"{step.mode}.jsonl"
        if step.notebook == GENERATE and step.status == "ok" and step.mode not in rerun and path.is_file():
            found[step.mode] = str(path)
    return {mode: found[mode] for mode in MODES if mode in found}


def _error_line(error: BaseException) -> str:
    ename, evalue = getattr(error, "ename", None), getattr(error, "evalue", None)
    text = f"{ename}: {evalue}" if ename else f"{type(error).__name__}: {error}"
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


def _run_step(step: Step, parameters: Mapping[str, Any], execute: Callable[..., None]) -> bool:
    label = f"{step.notebook}" + (f" [{step.mode}]" if step.mode else "")
    print(f"=== {label}: running -> {step.output}", flush=True)
    started = time.monotonic()
    try:
        execute(step.notebook, Path(step.output), parameters)
        step.status = "ok"
    except Exception as error:  # a failed notebook is reported and the batch goes on
        step.status, step.error = "failed", _error_line(error)
    step.seconds = round(time.monotonic() - started, 1)
    print(f"=== {label}: {step.status} in {step.seconds:.0f} s" + (f" ({step.error})" if step.error else ""),
          flush=True)
    return step.status == "ok"


def run_batch(preset: str, modes: Sequence[str], platform: str | None = None, out: str | Path | None = None,
              overrides: Mapping[str, Any] | None = None,
              execute: Callable[..., None] = execute_notebook) -> BatchReport:
    """Train and sample every mode, then compare them; returns the report (also in ``batch.json``)."""
    folder = batch_folder(preset, out)
    requested_overrides = dict(overrides or {})
    overrides = {"output_root": str(folder / "runs"), **requested_overrides}
    configs = check_configs(preset, modes, platform, overrides)
    previous = previous_report(folder, preset, platform, requested_overrides)
    if execute is execute_notebook:
        check_kernel()
    for name in ("notebooks", "samples", "results", "figures"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    report = BatchReport(str(folder), preset, list(modes), platform, overrides=requested_overrides)
    common = {"preset": preset, **({"platform": platform} if platform is not None else {}), **overrides}
    samples = {}
    for mode in modes:
        train = Step(TRAIN, mode, str(folder / "notebooks" / f"{TRAIN}_{mode}.ipynb"))
        generate = Step(GENERATE, mode, str(folder / "notebooks" / f"{GENERATE}_{mode}.ipynb"))
        report.steps += [train, generate]
        if not _run_step(train, {"mode": mode, **common}, execute):
            generate.status = "skipped"
            continue
        samples_path = folder / "samples" / f"{mode}.jsonl"
        if _run_step(generate, {"mode": mode, **common, "checkpoint": "run", "samples_path": str(samples_path)},
                     execute):
            samples[mode] = str(samples_path)
    kept = [s for s in (previous.steps if previous else []) if s.mode is not None and s.mode not in modes]
    report.steps = sorted(kept + report.steps, key=lambda s: MODES.index(s.mode))
    report.modes = [m for m in MODES if any(s.mode == m for s in report.steps)]
    compared = _modes_with_samples(previous, modes, samples, folder)
    passk = Step(PASSK, None, str(folder / "notebooks" / f"{PASSK}.ipynb"))
    report.steps.append(passk)
    if compared:
        fresh = {name: folder / f".{name}-new" for name in ("results", "figures")}
        for path in fresh.values():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir()
        first = configs[next(iter(samples))] if samples else next(iter(configs.values()))
        if _run_step(passk, {"samples_files": list(compared.values()), "labels": list(compared),
                             "bootstrap": first.bootstrap, "passk_ks": first.passk_ks,
                             "results_dir": str(fresh["results"]),
                             "figures_dir": str(fresh["figures"]), "live_widgets": False}, execute):
            from .sync import replace_folder  # imports transformers: kept out of the CLI's error path

            for name, path in fresh.items():
                replace_folder(path, folder / name)
        else:
            for path in fresh.values():
                shutil.rmtree(path, ignore_errors=True)
    else:
        passk.status = "skipped"
    (folder / "batch.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


def format_report(report: BatchReport) -> str:
    """The end-of-batch table: one line per notebook run, then the failures."""
    lines = [f"batch {report.folder} (preset {report.preset}, platform {report.platform or 'detected'})"]
    for step in report.steps:
        lines.append(f"  {step.notebook:12s} {step.mode or 'all modes':12s} {step.status:8s} "
                     f"{step.seconds:7.0f} s  {Path(step.output).name}")
    if report.failed:
        lines.append(f"FAILED ({len(report.failed)}): the executed notebooks show the failing cell")
        lines += [f"  {s.notebook} {s.mode or ''}: {s.error}" for s in report.failed]
    else:
        lines.append("all notebooks ran")
    return "\n".join(lines)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m nbhelpers batch``."""
    parser.add_argument("--preset", required=True,
                        help=f"preset: {', '.join(parameter_names('presets'))}, or a YAML file")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, metavar="MODE",
                        help=f"modes to train and sample, in order (default: {' '.join(MODES)})")
    parser.add_argument("--platform", default=None,
                        help=f"platform file: {', '.join(parameter_names('platforms'))}, or a YAML file "
                             "(default: detected)")
    parser.add_argument("--out", default=None, type=Path,
                        help="batch folder (default: batches/<preset>-<timestamp>); an existing one is resumed")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="configuration override passed to every notebook; repeatable")


def run_from_cli(args: argparse.Namespace) -> int:
    """Run the batch, print the report; exit code 1 if any notebook failed."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    papermill_log = logging.getLogger("papermill")
    papermill_log.addHandler(handler)
    papermill_log.setLevel(logging.INFO)
    try:
        report = run_batch(args.preset, args.modes, args.platform, args.out, parse_overrides(args.set))
    except BatchError as error:
        print(f"batch: {error}", file=sys.stderr)
        return 2
    finally:
        papermill_log.removeHandler(handler)
    print(format_report(report))
    return report.exit_code


__all__ = ["BatchError", "BatchReport", "Step", "batch_folder", "check_configs", "check_kernel", "execute_notebook",
           "format_report", "previous_report", "run_batch"]
