"""Training logs of run folders as tables, text summaries and comparisons.

A run folder holds the Hugging Face Trainer's `trainer_state.json` (at its top, or in
`checkpoint-N/`) and/or TensorBoard event files under `logs/`. Both are read into one
DataFrame, one row per logged step: column `step` plus metric columns named as in
`log_history` (`loss`, `learning_rate`, `grad_norm`, `reward`, `rewards/<name>/mean`,
`mode/...`); TensorBoard tags `train/<name>` map to `<name>` and `eval/<name>` to `eval_<name>`.
`mode/empty_steps` (empty steps so far) is derived from the logged `mode/empty_step` fractions, so it
counts across resumed sessions.
End-of-training totals (`train_runtime`, ...) go to `frame.attrs["train_summary"]`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from .collapse import detect_collapse
from .plots import TOTAL_REWARD_COLUMNS, plot_training_curves

TRAIN_SUMMARY_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second",
                      "total_flos", "train_loss")
EVENT_FILE_PATTERN = "events.out.tfevents.*"
WINDOW_FRACTION = 0.2
CV_THRESHOLD = 0.05
MIN_POINTS = 10
FLAT_CHANGE = 1e-9


# ---------------------------------------------------------------------------------------------
# Reading


def newest_trainer_state(run_dir: str | os.PathLike) -> tuple[Path, dict] | None:
    """(path, parsed JSON) of the newest trainer_state.json of a run: at `<run>/` or in
    `<run>/checkpoint-N/`, the one with the highest `global_step` (ties: the top-level file,
    then the highest N); None if there is none."""
    run_dir = Path(run_dir)
    candidates = [(math.inf, run_dir / "trainer_state.json")]
    for folder in run_dir.glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", folder.name)
        if match:
            candidates.append((int(match.group(1)), folder / "trainer_state.json"))
    newest = None
    for order, path in candidates:
        if not path.is_file():
            continue
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON: {error.msg} at line {error.lineno}") from error
        if not isinstance(state, dict) or not isinstance(state.get("log_history"), list):
            raise ValueError(f"{path}: key 'log_history': expected a list of log dicts")
        rank = (state.get("global_step") or 0, order)
        if newest is None or rank > newest[0]:
            newest = (rank, path, state)
    return None if newest is None else (newest[1], newest[2])


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _empty_log() -> pd.DataFrame:
    frame = pd.DataFrame({"step": pd.Series(dtype="int64")})
    frame.attrs["train_summary"] = {}
    return frame


def trainer_state_frame(state: Mapping, source: str | os.PathLike = "trainer_state.json") -> pd.DataFrame:
    """One row per logged step from a trainer state's `log_history` (entries of one step
    merged); the final entry holding `train_runtime` goes to attrs["train_summary"]."""
    rows, summary = [], {}
    for index, entry in enumerate(state["log_history"]):
        if not isinstance(entry, dict) or not _is_number(entry.get("step")):
            raise ValueError(f"{source}: key 'log_history[{index}]': expected a dict with a numeric 'step'")
        numbers = {key: value for key, value in entry.items() if _is_number(value)}
        if "train_runtime" in entry:
            summary.update({k: v for k, v in numbers.items() if k in TRAIN_SUMMARY_KEYS})
        else:
            rows.append(numbers)
    frame = pd.DataFrame(rows).groupby("step", as_index=False).first() if rows else _empty_log()
    frame.attrs["train_summary"] = summary
    return frame


def _metric_name(tag: str) -> str:
    if tag.startswith("train/"):
        return tag.removeprefix("train/")
    if tag.startswith("eval/"):
        return "eval_" + tag.removeprefix("eval/")
    return tag


def event_files(logs_dir: str | os.PathLike) -> list[Path]:
    """TensorBoard event files anywhere under `logs_dir` (none if it does not exist)."""
    return sorted(Path(logs_dir).rglob(EVENT_FILE_PATTERN))


def tensorboard_frame(logs_dir: str | os.PathLike) -> pd.DataFrame:
    """One row per step from the scalars of every event file under `logs_dir`; where files
    overlap (a resumed run) the value written last wins. Totals go to attrs["train_summary"]."""
    from tensorboard.backend.event_processing import event_accumulator

    records = []
    for path in event_files(logs_dir):
        accumulator = event_accumulator.EventAccumulator(
            str(path), size_guidance={event_accumulator.SCALARS: 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            records += [(_metric_name(tag), e.step, e.wall_time, e.value) for e in accumulator.Scalars(tag)]
    if not records:
        return _empty_log()
    long = (pd.DataFrame(records, columns=["metric", "step", "wall_time", "value"])
            .sort_values("wall_time", kind="stable")
            .drop_duplicates(["metric", "step"], keep="last"))
    wide = long.pivot(index="step", columns="metric", values="value")
    totals = [key for key in TRAIN_SUMMARY_KEYS if key in wide]
    summary = {key: float(wide[key].dropna().iloc[-1]) for key in totals}
    frame = wide.drop(columns=totals).dropna(how="all").reset_index()
    frame.columns.name = None
    frame.attrs["train_summary"] = summary
    return frame


def read_run(run_dir: str | os.PathLike) -> pd.DataFrame:
    """A run's training log: trainer_state.json and TensorBoard scalars merged by step
    (trainer_state values win where both have one); either source alone is enough.

    attrs: "train_summary" (end-of-training totals), "sources" (files read).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir}: run folder not found")
    frames, sources = [], []
    state = newest_trainer_state(run_dir)
    if state is not None:
        frames.append(trainer_state_frame(state[1], state[0]))
        sources.append(str(state[0]))
    if event_files(run_dir / "logs"):
        frames.append(tensorboard_frame(run_dir / "logs"))
        sources.append(str(run_dir / "logs"))
    if not frames:
        raise ValueError(f"{run_dir}: no training logs: neither trainer_state.json (in the run folder or "
                         f"a checkpoint-N folder) nor TensorBoard event files under logs/")
    merged = frames[0].set_index("step")
    summary = dict(frames[0].attrs["train_summary"])
    for frame in frames[1:]:
        merged = merged.combine_first(frame.set_index("step"))
        summary = {**frame.attrs["train_summary"], **summary}
    merged = merged.sort_index().reset_index()
    merged["step"] = merged["step"].astype("int64")
    if "mode/empty_step" in merged:
        merged["mode/empty_steps"] = cumulative_empty_steps(merged["step"], merged["mode/empty_step"])
    merged = merged[["step"] + sorted(c for c in merged.columns if c != "step")]
    merged.attrs = {"train_summary": summary, "sources": sources}
    return merged


def cumulative_empty_steps(steps: pd.Series, empty_fraction: pd.Series) -> pd.Series:
    """Empty steps so far at each logged step, from ``mode/empty_step``: the fraction (0..1) of the steps
    since the previous logged value that kept no sample. Rows without a value stay NaN."""
    logged = empty_fraction.notna()
    window = steps[logged].diff().fillna(steps[logged])  # the first value covers steps 1..step
    total = (empty_fraction[logged] * window).cumsum()
    return total.reindex(steps.index)


# ---------------------------------------------------------------------------------------------
# Summaries


def _window_size(n_points: int, window_fraction: float) -> int:
    """Points in a first/last window: `window_fraction` of them, at least 3 (at most all)."""
    return min(n_points, max(3, math.ceil(window_fraction * n_points)))


def convergence_verdict(loss: Sequence[float], *, window_fraction: float = WINDOW_FRACTION,
                        cv_threshold: float = CV_THRESHOLD, min_points: int = MIN_POINTS) -> tuple[str, float | None]:
    """("converging" | "still changing" | "too few steps", coefficient of variation).

    The coefficient of variation is std / |mean| of the loss over the last `window_fraction`
    of logged points (at least 3); "converging" when it is at most `cv_threshold`. A loss
    that hovers around zero (as policy-gradient losses can) reads as "still changing".
    """
    values = np.asarray(loss, dtype=float)
    values = values[np.isfinite(values)]
    if values.size < min_points:
        return "too few steps", None
    window = values[-_window_size(values.size, window_fraction):]
    mean = abs(window.mean())
    cv = float(window.std() / mean) if mean > 0 else math.inf
    return ("converging" if cv <= cv_threshold else "still changing"), cv


def reward_trend(steps: Sequence[float], reward: Sequence[float]) -> tuple[str, float | None]:
    """("rising" | "falling" | "flat" | "unknown", least-squares slope per step) of a reward."""
    steps, reward = np.asarray(steps, dtype=float), np.asarray(reward, dtype=float)
    finite = np.isfinite(reward)
    steps, reward = steps[finite], reward[finite]
    if np.unique(steps).size < 2:
        return "unknown", None
    slope = float(np.polyfit(steps, reward, 1)[0])
    change = slope * (steps.max() - steps.min())
    return ("flat" if abs(change) <= FLAT_CHANGE else "rising" if change > 0 else "falling"), slope


@dataclass
class RunSummary:
    """Key facts of one run's training log; None where the log lacks the metric."""

    label: str
    logged_steps: int
    last_step: int | None
    final_loss: float | None
    loss_first_window: float | None
    loss_last_window: float | None
    loss_change: float | None
    final_learning_rate: float | None
    train_runtime_s: float | None
    loss_cv_last_window: float | None
    verdict: str
    reward_metric: str | None
    reward_slope_per_step: float | None
    reward_trend: str
    collapse_step: int | None = None  # first step of a policy collapse (nbhelpers.collapse), None: none found
    collapse: str | None = None  # its one-line description


def _last(frame: pd.DataFrame, column: str) -> float | None:
    values = frame[column].dropna() if column in frame else ()
    return float(values.iloc[-1]) if len(values) else None


def summarize_run(frame: pd.DataFrame, label: str = "run", *, window_fraction: float = WINDOW_FRACTION,
                  cv_threshold: float = CV_THRESHOLD, min_points: int = MIN_POINTS) -> RunSummary:
    """Summary of a `read_run` frame: steps, loss first/last window (each `window_fraction` of
    the logged loss points), final learning rate, training time, convergence verdict, reward trend."""
    loss = frame["loss"].dropna().to_numpy(dtype=float) if "loss" in frame else np.array([])
    window = _window_size(loss.size, window_fraction)
    first_window = float(loss[:window].mean()) if loss.size else None
    last_window = float(loss[-window:].mean()) if loss.size else None
    verdict, cv = convergence_verdict(loss, window_fraction=window_fraction,
                                      cv_threshold=cv_threshold, min_points=min_points)
    reward_metric = next((c for c in TOTAL_REWARD_COLUMNS if c in frame and frame[c].notna().any()), None)
    trend, slope = (reward_trend(frame["step"], frame[reward_metric]) if reward_metric
                    else ("unknown", None))
    collapse = detect_collapse(frame.to_dict("records"))
    return RunSummary(
        label=label,
        logged_steps=int(len(frame)),
        last_step=int(frame["step"].max()) if len(frame) else None,
        final_loss=float(loss[-1]) if loss.size else None,
        loss_first_window=first_window,
        loss_last_window=last_window,
        loss_change=None if loss.size == 0 else last_window - first_window,
        final_learning_rate=_last(frame, "learning_rate"),
        train_runtime_s=frame.attrs.get("train_summary", {}).get("train_runtime"),
        loss_cv_last_window=cv,
        verdict=verdict,
        reward_metric=reward_metric,
        reward_slope_per_step=slope,
        reward_trend=trend,
        collapse_step=None if collapse is None else collapse.step,
        collapse=None if collapse is None else collapse.message(),
    )


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s ({seconds:.0f} s)"


def _number(value: float | None, spec: str = ".4g") -> str:
    return "n/a" if value is None else format(value, spec)


def format_summary(summary: RunSummary, window_fraction: float = WINDOW_FRACTION,
                   cv_threshold: float = CV_THRESHOLD) -> str:
    """The text of summary.txt."""
    share = f"{window_fraction:.0%}"
    time = ("unknown (no train_runtime logged)" if summary.train_runtime_s is None
            else _duration(summary.train_runtime_s))
    cv = ("" if summary.loss_cv_last_window is None else
          f" (coefficient of variation of the loss over the last {share} of logged steps: "
          f"{summary.loss_cv_last_window:.3g}, threshold {cv_threshold:g})")
    reward = ("unknown (no total reward logged)" if summary.reward_metric is None else
              f"{summary.reward_trend} (slope {_number(summary.reward_slope_per_step, '+.3g')} per step "
              f"of '{summary.reward_metric}')")
    return "\n".join([
        f"run: {summary.label}",
        f"logged steps: {summary.logged_steps} (last step {_number(summary.last_step, 'd')})",
        f"final loss: {_number(summary.final_loss)}",
        f"loss, mean of first {share} -> last {share}: {_number(summary.loss_first_window)} -> "
        f"{_number(summary.loss_last_window)} (change {_number(summary.loss_change, '+.4g')})",
        f"final learning rate: {_number(summary.final_learning_rate, '.3g')}",
        f"training time: {time}",
        f"convergence: {summary.verdict}{cv}",
        f"reward trend: {reward}",
        f"collapse: {summary.collapse or 'none detected'}",
    ]) + "\n"


def write_summary(summary: RunSummary, out_dir: str | os.PathLike) -> Path:
    """Write `<out_dir>/summary.txt`; returns its path."""
    path = Path(out_dir) / "summary.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_summary(summary), encoding="utf-8")
    return path


def compare_runs(summaries: Sequence[RunSummary]) -> pd.DataFrame:
    """One row per run with the RunSummary fields as columns."""
    return pd.DataFrame([asdict(summary) for summary in summaries])


def run_labels(runs: Sequence[str | os.PathLike], labels: Sequence[str] | None = None) -> list[str]:
    """Labels for run folders: given ones or the folder names; unique, usable as folder names."""
    labels = [Path(run).name for run in runs] if labels is None else list(labels)
    if len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
    if len(set(labels)) != len(labels):
        raise ValueError(f"run labels must be unique, got {labels}; pass --labels")
    bad = [label for label in labels if not label or "/" in label or "\\" in label or label in (".", "..")]
    if bad:
        raise ValueError(f"run labels must be usable as folder names, got {bad}")
    return labels


def run_title(run_dir: str | os.PathLike) -> str:
    """"<mode>, <model>, seed <seed>" from the run's config.yaml; the folder name where there is none."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    try:
        config = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("config", {})
        return f"{config['mode']}, {Path(str(config['vlm_name'])).name}, seed {config['seed']}"
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError, KeyError):
        return Path(run_dir).name


def training_curves(run_dir: str | os.PathLike):
    """The run's training curves, titled with its mode, model and seed, also written to
    ``training_curves.png`` in the run folder (training itself prints and writes the summary)."""
    run_dir = Path(run_dir)
    return plot_training_curves(read_run(run_dir), title=run_title(run_dir),
                                save_to=run_dir / "training_curves.png")


# ---------------------------------------------------------------------------------------------
# Command line


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `python -m nbhelpers monitor`."""
    parser.add_argument("--runs", nargs="+", required=True, type=Path, help="run folders")
    parser.add_argument("--labels", nargs="+", default=None, help="one label per run (default: folder names)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")


def run_from_cli(args: argparse.Namespace) -> int:
    """Write <out>/<label>/summary.txt and training_curves.png per run, <out>/comparison.csv,
    and <out>/training_curves.png with all runs; print the comparison."""
    labels = run_labels(args.runs, args.labels)
    frames = {label: read_run(run) for label, run in zip(labels, args.runs)}
    summaries = [summarize_run(frame, label) for label, frame in frames.items()]
    for summary, run in zip(summaries, args.runs):
        write_summary(summary, args.out / summary.label)
        plot_training_curves(frames[summary.label], title=run_title(run),
                             save_to=args.out / summary.label / "training_curves.png")
    comparison = compare_runs(summaries)
    comparison.insert(1, "run_dir", [str(run) for run in args.runs])
    comparison.to_csv(args.out / "comparison.csv", index=False)
    plot_training_curves(frames, save_to=args.out / "training_curves.png")
    with pd.option_context("display.width", 200, "display.max_columns", None):
        print(comparison.to_string(index=False))
    print(f"\nwrote {args.out}")
    return 0
