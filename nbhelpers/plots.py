"""Figures for Pass@k results and training logs.

Every function builds a `matplotlib.figure.Figure` directly (no pyplot, so no GUI backend and no
global figure list: safe headless, rendered with Agg on save) and returns it; `save_to` writes
a PNG or SVG chosen by the file extension. Pass@k values are fractions in [0, 1] shown on a
percent axis; k is on a log2 axis.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator, PercentFormatter

from .collapse import detect_collapse
from .passk import load_results

ResultsLike = Mapping | str | os.PathLike
SAVE_FORMATS = (".png", ".svg")
CI_ALPHA = 0.2
PLOT_KINDS = ("curves", "grid", "improvement", "bars")
TOTAL_REWARD_COLUMNS = ("reward", "mode/total_reward")  # TRL's, then the trainer's; same quantity


def save_figure(figure: Figure, path: str | os.PathLike) -> Path:
    """Write `figure` as PNG or SVG (by extension), creating the folder; returns the path."""
    path = Path(path)
    if path.suffix.lower() not in SAVE_FORMATS:
        raise ValueError(f"{path}: unsupported figure format {path.suffix!r}; use .png or .svg")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def _finish(figure: Figure, save_to) -> Figure:
    if save_to is not None:
        save_figure(figure, save_to)
    return figure


def labelled_results(results: Sequence[ResultsLike], labels: Sequence[str] | None = None) -> dict[str, dict]:
    """{label: results dict} from results dicts or results-file paths; labels default to each
    results' method name and must be unique."""
    loaded = [dict(r) if isinstance(r, Mapping) else load_results(r) for r in results]
    if not loaded:
        raise ValueError("no results to plot")
    labels = [r["method"] for r in loaded] if labels is None else list(labels)
    if len(labels) != len(loaded):
        raise ValueError(f"{len(labels)} labels for {len(loaded)} results")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels must be unique, got {labels}")
    return dict(zip(labels, loaded))


def passk_table(results: Mapping, label: str, dataset: str | None = None):
    """(ks, values, lows, highs) arrays of one results dict, overall (dataset None) or for one
    dataset of meta.per_dataset; values are fractions."""
    if dataset is None:
        table = results
    else:
        per_dataset = results.get("meta", {}).get("per_dataset", {})
        if dataset not in per_dataset:
            raise ValueError(f"{label}: no dataset {dataset!r} in meta.per_dataset "
                             f"(has {sorted(per_dataset)})")
        table = per_dataset[dataset]
    ks = np.array([int(k) for k in table["pass_at_k"]])
    order = np.argsort(ks)
    values = np.array(list(table["pass_at_k"].values()), dtype=float)
    intervals = np.array([table["ci95"][k] for k in table["pass_at_k"]], dtype=float).reshape(-1, 2)
    return ks[order], values[order], intervals[order, 0], intervals[order, 1]


def _log2_k_axis(ax, ks: Sequence[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(sorted(set(int(k) for k in ks))))
    ax.xaxis.set_major_formatter(lambda value, _: f"{value:g}")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("k (log2 scale)")


def _percent_limits(ax, low: float, high: float) -> None:
    pad = max(0.02, 0.05 * (high - low))
    ax.set_ylim(max(0.0, low - pad), min(1.0, high + pad))
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))


def passk_extremes(tables: Mapping[str, Mapping], dataset: str | None = None, show_ci: bool = True) -> tuple[float, float]:
    """Smallest and largest Pass@k (and interval ends with ``show_ci``) over every method and k: the
    range the curves and the bar chart share."""
    extremes = []
    for label, results in tables.items():
        _, values, lows, highs = passk_table(results, label, dataset)
        extremes += [values.min(), values.max()] + ([lows.min(), highs.max()] if show_ci else [])
    return min(extremes), max(extremes)


def _draw_curves(ax, tables: Mapping[str, Mapping], dataset, show_ci: bool, k_range) -> None:
    plotted_ks, extremes = [], []
    for label, results in tables.items():
        ks, values, lows, highs = passk_table(results, label, dataset)
        if k_range is not None:
            inside = (ks >= k_range[0]) & (ks <= k_range[1])
            ks, values, lows, highs = ks[inside], values[inside], lows[inside], highs[inside]
        if ks.size == 0:
            continue
        line, = ax.plot(ks, values, marker="o", markersize=3, label=label)
        extremes += [values.min(), values.max()]
        if show_ci:
            ax.fill_between(ks, lows, highs, color=line.get_color(), alpha=CI_ALPHA, linewidth=0)
            extremes += [lows.min(), highs.max()]
        plotted_ks += ks.tolist()
    if not plotted_ks:
        raise ValueError(f"no k inside the range {k_range}")
    _log2_k_axis(ax, plotted_ks)
    _percent_limits(ax, *((min(extremes), max(extremes)) if k_range is not None else
                          passk_extremes(tables, dataset, show_ci)))
    ax.set_ylabel("Pass@k")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


def plot_passk_curves(results: Sequence[ResultsLike], labels: Sequence[str] | None = None, *,
                      dataset: str | None = None, show_ci: bool = True,
                      k_range: tuple[int, int] | None = None, title: str | None = None,
                      save_to=None) -> Figure:
    """Pass@k against k (log2 axis) for several methods, one line each, with 95% bands.

    dataset: None for the overall table, else a name in meta.per_dataset; k_range: inclusive
    (k_min, k_max) to show.
    """
    tables = labelled_results(results, labels)
    figure = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = figure.add_subplot()
    _draw_curves(ax, tables, dataset, show_ci, k_range)
    ax.set_title(title or f"Pass@k ({dataset or 'all datasets'})")
    return _finish(figure, save_to)


def plot_passk_grid(results: Sequence[ResultsLike], labels: Sequence[str] | None = None, *,
                    show_ci: bool = True, save_to=None) -> Figure:
    """One Pass@k subplot per dataset (from meta.per_dataset) found in every method's results."""
    tables = labelled_results(results, labels)
    dataset_sets = [set(r.get("meta", {}).get("per_dataset", {})) for r in tables.values()]
    datasets = sorted(set.intersection(*dataset_sets))
    if not datasets:
        raise ValueError("the results share no dataset in meta.per_dataset")
    columns = min(3, len(datasets))
    rows = math.ceil(len(datasets) / columns)
    figure = Figure(figsize=(4.2 * columns, 3.4 * rows), layout="constrained")
    for index, dataset in enumerate(datasets, start=1):
        ax = figure.add_subplot(rows, columns, index)
        _draw_curves(ax, tables, dataset, show_ci, None)
        ax.set_title(dataset)
    return _finish(figure, save_to)


def plot_improvement(results: Sequence[ResultsLike], labels: Sequence[str] | None = None, *,
                     baseline: str | None = None, dataset: str | None = None, save_to=None) -> Figure:
    """Pass@k of each method minus the baseline's (default: the first), in percentage points,
    at the k both have; one line per non-baseline method, plus a zero line."""
    tables = labelled_results(results, labels)
    baseline = baseline or next(iter(tables))
    if baseline not in tables:
        raise ValueError(f"baseline {baseline!r} is not one of the labels {list(tables)}")
    base_ks, base_values, _, _ = passk_table(tables[baseline], baseline, dataset)
    base_by_k = dict(zip(base_ks.tolist(), base_values))
    figure = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = figure.add_subplot()
    plotted_ks = []
    for label, results_dict in tables.items():
        if label == baseline:
            continue
        ks, values, _, _ = passk_table(results_dict, label, dataset)
        shared = [i for i, k in enumerate(ks.tolist()) if k in base_by_k]
        ks = ks[shared]
        gain = (values[shared] - np.array([base_by_k[k] for k in ks.tolist()])) * 100
        ax.plot(ks, gain, marker="o", markersize=3, label=label)
        plotted_ks += ks.tolist()
    if not plotted_ks:
        raise ValueError("improvement needs at least one method besides the baseline, sharing its k")
    ax.axhline(0.0, color="black", linewidth=0.8)
    _log2_k_axis(ax, plotted_ks)
    ax.set_ylabel(f"Pass@k minus {baseline} (percentage points)")
    ax.set_title(f"Improvement over {baseline} ({dataset or 'all datasets'})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _finish(figure, save_to)


def plot_passk_bars(results: Sequence[ResultsLike], labels: Sequence[str] | None = None, *,
                    ks: Sequence[int] = (1, 8, 64), dataset: str | None = None,
                    show_ci: bool = True, save_to=None) -> Figure:
    """Grouped bars of Pass@k at the chosen k (one group per k, one bar per method), with 95%
    intervals as error bars."""
    tables = labelled_results(results, labels)
    figure = Figure(figsize=(max(5.0, 1.0 + 0.5 * len(ks) * len(tables)), 4.4), layout="constrained")
    ax = figure.add_subplot()
    width = 0.8 / len(tables)
    positions = np.arange(len(ks))
    for index, (label, results_dict) in enumerate(tables.items()):
        table_ks, values, lows, highs = passk_table(results_dict, label, dataset)
        missing = [k for k in ks if k not in table_ks]
        if missing:
            raise ValueError(f"{label}: no Pass@k for k={missing} (has k={table_ks.tolist()})")
        rows = [int(np.flatnonzero(table_ks == k)[0]) for k in ks]
        errors = np.vstack([values[rows] - lows[rows], highs[rows] - values[rows]]) if show_ci else None
        ax.bar(positions + (index - (len(tables) - 1) / 2) * width, values[rows], width,
               yerr=errors, capsize=3, label=label)
    ax.set_xticks(positions, [f"k={k}" for k in ks])
    _percent_limits(ax, *passk_extremes(tables, dataset, show_ci))  # the scale of the Pass@k curves
    ax.set_ylabel("Pass@k")
    ax.set_title(f"Pass@k at chosen k ({dataset or 'all datasets'})")
    ax.legend(fontsize="small")
    return _finish(figure, save_to)


# ---------------------------------------------------------------------------------------------
# Training curves


def training_panels(columns: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Default panels (title, columns) of a training log, those with at least one column present:
    loss, learning rate, gradient norm, mean total reward, per-reward means, and the mode
    statistics (accuracy, samples kept per step, cumulative empty steps)."""
    present = set(columns)
    total_reward = next((c for c in TOTAL_REWARD_COLUMNS if c in present), TOTAL_REWARD_COLUMNS[0])
    panels = [
        ("loss", ["loss"]),
        ("learning rate", ["learning_rate"]),
        ("gradient norm", ["grad_norm"]),
        ("mean total reward", [total_reward]),
        ("mean reward per function",
         sorted(c for c in present if c.startswith("rewards/") and c.endswith("/mean"))),
        ("accuracy", ["mode/accuracy"]),
        ("samples kept per step", ["mode/kept_positive", "mode/kept_negative"]),
        ("empty steps (cumulative)", ["mode/empty_steps"]),
    ]
    return [(title, [c for c in cols if c in present]) for title, cols in panels
            if any(c in present for c in cols)]


# y-axis label of each default panel (by title); a single-metric panel is labelled with its metric.
PANEL_YLABELS = {"loss": "loss", "learning rate": "learning rate", "gradient norm": "L2 norm",
                 "mean total reward": "weighted reward sum", "mean reward per function": "mean reward",
                 "accuracy": "fraction correct", "samples kept per step": "samples",
                 "empty steps (cumulative)": "steps"}


def _ylabel(panel_title: str, column: str) -> str:
    if panel_title in PANEL_YLABELS:
        return PANEL_YLABELS[panel_title]
    if column.startswith("rewards/"):
        return "mean reward"
    return "samples" if column.startswith("mode/kept_") else _short_name(column)


def _one_panel_per_column(panels: list[tuple[str, list[str]]]) -> list[tuple[str, list[str]]]:
    """Panels of several columns split into one panel per column (several runs share each panel)."""
    return [(f"{_short_name(column)}" if len(columns) > 1 else title, [column])
            for title, columns in panels for column in columns]


def _short_name(column: str) -> str:
    """`rewards/format_reward/mean` -> `format_reward`, `mode/kept_positive` -> `kept_positive`."""
    return column.removeprefix("rewards/").removesuffix("/mean").removeprefix("mode/")


def plot_training_curves(runs: pd.DataFrame | Mapping[str, pd.DataFrame], *,
                         metrics: Sequence[str] | None = None, smoothing: int = 1,
                         title: str | None = None, save_to=None) -> Figure:
    """Training metrics against the optimizer step for one run (a DataFrame with a `step` column, as
    `monitor.read_run` gives) or several ({label: DataFrame}).

    metrics: column names, one panel each; default: the panels of `training_panels` (with several
    runs, one panel per reward and per kept-sample count, so that the legend lists only the runs).
    smoothing: rolling-mean window in logged points (1 = raw). title: above all panels, e.g. the
    run's mode, model and seed. Legends never cover the curves: the runs' legend is above the panels,
    a panel's own legend (one run, several columns) right of it. A run's policy collapse
    (:func:`nbhelpers.collapse.detect_collapse`) is a dashed vertical line at its step in every panel.
    """
    runs = {"run": runs} if isinstance(runs, pd.DataFrame) else dict(runs)
    if not runs:
        raise ValueError("no runs to plot")
    if smoothing < 1:
        raise ValueError(f"smoothing must be at least 1 point, got {smoothing}")
    columns = sorted(set().union(*(frame.columns for frame in runs.values())))
    if metrics is None:
        panels = training_panels(columns)
        if not panels:
            raise ValueError(f"no known training metric in the logs (columns: {columns})")
    else:
        unknown = [m for m in metrics if m not in columns]
        if unknown:
            raise ValueError(f"metric(s) {unknown} not in the logs (columns: {columns})")
        panels = [(metric, [metric]) for metric in metrics]
    if len(runs) > 1:
        panels = _one_panel_per_column(panels)
    collapses = {label: detect_collapse(frame.to_dict("records")) for label, frame in runs.items()}
    n_columns = min(2, len(panels))
    n_rows = math.ceil(len(panels) / n_columns)
    figure = Figure(figsize=(6.4 * n_columns, 3.2 * n_rows), layout="constrained")
    if title:
        figure.suptitle(title)
    for index, (panel_title, panel_columns) in enumerate(panels, start=1):
        ax = figure.add_subplot(n_rows, n_columns, index)
        for label, frame in runs.items():
            for column in panel_columns:
                if column not in frame:
                    continue
                series = frame[["step", column]].dropna()
                values = series[column].rolling(smoothing, min_periods=1).mean()
                parts = ([label] if len(runs) > 1 else []) + ([_short_name(column)] if len(panel_columns) > 1 else [])
                name = ": ".join(parts) or label
                ax.plot(series["step"], values, label=name)
        for label, event in collapses.items():
            if event is not None:
                ax.axvline(event.step, color="tab:red", linestyle="--", linewidth=1,
                           label=f"_collapse {label} step {event.step}")  # "_": kept out of every legend
        ax.set_title(panel_title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(_ylabel(panel_title, panel_columns[0]))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if len(panel_columns) > 1:
            ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    if len(runs) > 1:  # one legend of the runs for all panels, above them
        handles = {line.get_label(): line for ax in figure.axes for line in ax.get_lines()
                   if not line.get_label().startswith("_")}
        figure.legend(list(handles.values()), list(handles), loc="outside upper center",
                      ncols=min(len(handles), 3), fontsize="small")
    return _finish(figure, save_to)


# ---------------------------------------------------------------------------------------------
# Command line


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `python -m nbhelpers plot`."""
    parser.add_argument("--results", nargs="+", required=True, type=Path, help="results files (JSON)")
    parser.add_argument("--labels", nargs="+", default=None, help="one label per results file (default: method names)")
    parser.add_argument("--out", required=True, type=Path, help="figure to write (.png or .svg)")
    parser.add_argument("--kind", choices=PLOT_KINDS, default="curves",
                        help=f"figure: {', '.join(PLOT_KINDS)} (default: curves)")
    parser.add_argument("--baseline", default=None,
                        help="label of the baseline for --kind improvement (default: the first)")
    parser.add_argument("--ks", nargs="+", type=int, default=[1, 8, 64], help="k values for --kind bars")


def run_from_cli(args: argparse.Namespace) -> int:
    """Draw the chosen figure kind from results files and save it to --out."""
    if args.kind == "curves":
        plot_passk_curves(args.results, args.labels, save_to=args.out)
    elif args.kind == "grid":
        plot_passk_grid(args.results, args.labels, save_to=args.out)
    elif args.kind == "improvement":
        plot_improvement(args.results, args.labels, baseline=args.baseline, save_to=args.out)
    else:
        plot_passk_bars(args.results, args.labels, ks=args.ks, save_to=args.out)
    print(f"wrote {args.out}")
    return 0
