"""Figures for Pass@k results and training logs.

Every function builds a `matplotlib.figure.Figure` directly (no pyplot, so no GUI backend and no
global figure list: safe headless, rendered with Agg on save) and returns it; `save_to` writes
a PNG or SVG chosen by the file extension. Pass@k values are fractions in [0, 1] shown on a
percent axis; k is on a log2 axis. A mode has one colour in every figure (MODE_COLOURS, found in labels
such as "psr", "PSR", "psr-s1" or "psr (seeds 0, 1)"); several labels of one mode (seeds) differ by line
style. A method's chance floor (passk: a chart-blind guesser's Pass@k) is a dashed line of its colour.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator, PercentFormatter

from .collapse import detect_collapse
from .passk import load_results

ResultsLike = Mapping | str | os.PathLike
SAVE_FORMATS = (".png", ".svg")
CI_ALPHA = 0.2
PLOT_KINDS = ("curves", "grid", "improvement", "bars")
TOTAL_REWARD_COLUMNS = ("reward", "mode/total_reward")  # TRL's, then the trainer's; same quantity

MODE_COLOURS = {"base": "black", "grpo": "tab:blue", "psr": "tab:orange", "nsr": "tab:green",
                "w-reinforce": "tab:purple", "passk": "tab:brown"}
"""The colour of each mode (and of the base model) in every figure. Red is left to the collapse marks."""
OTHER_COLOURS = ("tab:cyan", "tab:olive", "tab:pink", "tab:gray", "gold", "navy", "lime", "teal")
"""Colours of labels that name no mode, in order of appearance (then again from the start)."""
SEED_STYLES = ("-", "-.", ":", (0, (5, 1, 1, 1, 1, 1)))
"""Line styles of the labels of one mode in order of appearance (seeds); dashed ("--") is the floor's."""
FLOOR_STYLE = "--"
_MODE_LABEL = re.compile(rf"({'|'.join(map(re.escape, MODE_COLOURS))})(?:$|[\s_(]|-s\d)")


def label_mode(label: str) -> str | None:
    """The mode a label names (a key of MODE_COLOURS), case-insensitively: the label is the mode, or the
    mode followed by a space, "_", "(" or a seed suffix "-s<digit>"; else None."""
    match = _MODE_LABEL.match(label.lower())
    return match.group(1) if match else None


def label_colours(labels: Sequence[str]) -> dict[str, str]:
    """{label: colour}: MODE_COLOURS for a label naming a mode, else the next of OTHER_COLOURS."""
    colours, others = {}, 0
    for label in labels:
        mode = label_mode(label)
        if mode is None:
            colours[label] = OTHER_COLOURS[others % len(OTHER_COLOURS)]
            others += 1
        else:
            colours[label] = MODE_COLOURS[mode]
    return colours


def label_styles(labels: Sequence[str]) -> dict[str, object]:
    """{label: line style}: the labels sharing a colour (seeds of one mode) take SEED_STYLES in turn."""
    colours, seen, styles = label_colours(labels), {}, {}
    for label in labels:
        index = seen.get(colours[label], 0)
        seen[colours[label]] = index + 1
        styles[label] = SEED_STYLES[index % len(SEED_STYLES)]
    return styles


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


def passk_table_source(results: Mapping, label: str, dataset: str) -> Mapping:
    """The table of one dataset in meta.per_dataset; ValueError naming the label when it has none."""
    per_dataset = results.get("meta", {}).get("per_dataset", {})
    if dataset not in per_dataset:
        raise ValueError(f"{label}: no dataset {dataset!r} in meta.per_dataset (has {sorted(per_dataset)})")
    return per_dataset[dataset]


def passk_table(results: Mapping, label: str, dataset: str | None = None):
    """(ks, values, lows, highs) arrays of one results dict, overall (dataset None) or for one
    dataset of meta.per_dataset; values are fractions."""
    table = results if dataset is None else passk_table_source(results, label, dataset)
    ks = np.array([int(k) for k in table["pass_at_k"]])
    order = np.argsort(ks)
    values = np.array(list(table["pass_at_k"].values()), dtype=float)
    intervals = np.array([table["ci95"][k] for k in table["pass_at_k"]], dtype=float).reshape(-1, 2)
    return ks[order], values[order], intervals[order, 0], intervals[order, 1]


def floor_table(results: Mapping, label: str, dataset: str | None = None):
    """(ks, floor values, lows, highs) of one results dict's chance floor, as `passk_table`, or None
    when the results have no chance floor (results files written before it)."""
    table = results if dataset is None else passk_table_source(results, label, dataset)
    if "chance_floor" not in table:
        return None
    ks = np.array([int(k) for k in table["chance_floor"]])
    order = np.argsort(ks)
    values = np.array(list(table["chance_floor"].values()), dtype=float)
    intervals = np.array([table["chance_floor_ci95"][k] for k in table["chance_floor"]], dtype=float).reshape(-1, 2)
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


def passk_extremes(tables: Mapping[str, Mapping], dataset: str | None = None, show_ci: bool = True,
                   show_floor: bool = False) -> tuple[float, float]:
    """Smallest and largest Pass@k (and interval ends with ``show_ci``, chance floors with ``show_floor``)
    over every method and k: the range the curves and the bar chart share."""
    extremes = []
    for label, results in tables.items():
        _, values, lows, highs = passk_table(results, label, dataset)
        extremes += [values.min(), values.max()] + ([lows.min(), highs.max()] if show_ci else [])
        floor = floor_table(results, label, dataset) if show_floor else None
        if floor is not None:
            extremes += [floor[1].min(), floor[1].max()]
    return min(extremes), max(extremes)


def _inside(table, k_range):
    """A (ks, values, lows, highs) table cut to the inclusive k range (None: all)."""
    if k_range is None:
        return table
    ks = table[0]
    inside = (ks >= k_range[0]) & (ks <= k_range[1])
    return tuple(column[inside] for column in table)


def _draw_curves(ax, tables: Mapping[str, Mapping], dataset, show_ci: bool, k_range, show_floor: bool) -> None:
    plotted_ks, extremes, floors = [], [], 0
    colours, styles = label_colours(list(tables)), label_styles(list(tables))
    for label, results in tables.items():
        ks, values, lows, highs = _inside(passk_table(results, label, dataset), k_range)
        if ks.size == 0:
            continue
        ax.plot(ks, values, marker="o", markersize=3, label=label, color=colours[label], linestyle=styles[label])
        extremes += [values.min(), values.max()]
        if show_ci:
            ax.fill_between(ks, lows, highs, color=colours[label], alpha=CI_ALPHA, linewidth=0)
            extremes += [lows.min(), highs.max()]
        floor = floor_table(results, label, dataset) if show_floor else None
        if floor is not None:
            floor_ks, floor_values, _, _ = _inside(floor, k_range)
            ax.plot(floor_ks, floor_values, color=colours[label], linestyle=FLOOR_STYLE, linewidth=1,
                    label=f"_{label} chance floor", gid=f"chance-floor:{label}")
            extremes += [floor_values.min(), floor_values.max()]
            floors += 1
        plotted_ks += ks.tolist()
    if not plotted_ks:
        raise ValueError(f"no k inside the range {k_range}")
    _log2_k_axis(ax, plotted_ks)
    _percent_limits(ax, *((min(extremes), max(extremes)) if k_range is not None else
                          passk_extremes(tables, dataset, show_ci, show_floor)))
    ax.set_ylabel("Pass@k")
    ax.grid(True, alpha=0.3)
    handles, names = ax.get_legend_handles_labels()
    if floors:  # one legend entry for all floors: each is dashed in its method's colour
        handles.append(Line2D([], [], color="grey", linestyle=FLOOR_STYLE, linewidth=1))
        names.append("chance floor (dashed)")
    ax.legend(handles, names, fontsize="small")


def plot_passk_curves(results: Sequence[ResultsLike], labels: Sequence[str] | None = None, *,
                      dataset: str | None = None, show_ci: bool = True,
                      k_range: tuple[int, int] | None = None, title: str | None = None,
                      show_floor: bool = True, save_to=None) -> Figure:
    """Pass@k against k (log2 axis) for several methods, one line each, with 95% bands, and each
    method's chance floor as a dashed line of its colour (``show_floor``, where the results have one).

    dataset: None for the overall table, else a name in meta.per_dataset; k_range: inclusive
    (k_min, k_max) to show.
    """
    tables = labelled_results(results, labels)
    figure = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = figure.add_subplot()
    _draw_curves(ax, tables, dataset, show_ci, k_range, show_floor)
    ax.set_title(title or f"Pass@k ({dataset or 'all datasets'})")
    return _finish(figure, save_to)


def plot_passk_grid(results: Sequence[ResultsLike], labels: Sequence[str] | None = None, *,
                    show_ci: bool = True, show_floor: bool = True, save_to=None) -> Figure:
    """One Pass@k subplot per dataset (from meta.per_dataset) found in every method's results, as
    `plot_passk_curves`."""
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
        _draw_curves(ax, tables, dataset, show_ci, None, show_floor)
        ax.set_title(dataset)
    return _finish(figure, save_to)


def plot_improvement(results: Sequence[ResultsLike], labels: Sequence[str] | None = None, *,
                     baseline: str | None = None, dataset: str | None = None,
                     comparisons: Mapping[str, Mapping] | None = None, save_to=None) -> Figure:
    """Pass@k of each method minus the baseline's (default: the first), in percentage points,
    at the k both have; one line per non-baseline method, plus a zero line.

    comparisons: {label: paired comparison of that method against the baseline} in the format of
    `passk.compare_methods` (difference and ci95 per k, fractions); the lines are then their differences
    with the paired 95% intervals shaded around them. Needed for every non-baseline label; overall only
    (no ``dataset``).
    """
    tables = labelled_results(results, labels)
    baseline = baseline or next(iter(tables))
    if baseline not in tables:
        raise ValueError(f"baseline {baseline!r} is not one of the labels {list(tables)}")
    if comparisons is not None:
        if dataset is not None:
            raise ValueError("paired comparisons are overall: leave dataset None when comparisons are given")
        missing = [label for label in tables if label != baseline and label not in comparisons]
        if missing:
            raise ValueError(f"no paired comparison against {baseline!r} for {missing}")
    base_ks, base_values, _, _ = passk_table(tables[baseline], baseline, dataset)
    base_by_k = dict(zip(base_ks.tolist(), base_values))
    colours, styles = label_colours(list(tables)), label_styles(list(tables))
    figure = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = figure.add_subplot()
    plotted_ks = []
    for label, results_dict in tables.items():
        if label == baseline:
            continue
        if comparisons is not None:
            comparison = comparisons[label]
            ks = np.array(sorted(int(k) for k in comparison["difference"]))
            gain = np.array([comparison["difference"][str(k)] for k in ks]) * 100
            band = np.array([comparison["ci95"][str(k)] for k in ks], dtype=float).reshape(-1, 2) * 100
            ax.fill_between(ks, band[:, 0], band[:, 1], color=colours[label], alpha=CI_ALPHA, linewidth=0)
        else:
            ks, values, _, _ = passk_table(results_dict, label, dataset)
            shared = [i for i, k in enumerate(ks.tolist()) if k in base_by_k]
            ks = ks[shared]
            gain = (values[shared] - np.array([base_by_k[k] for k in ks.tolist()])) * 100
        ax.plot(ks, gain, marker="o", markersize=3, label=label, color=colours[label], linestyle=styles[label])
        plotted_ks += ks.tolist()
    if not plotted_ks:
        raise ValueError("improvement needs at least one method besides the baseline, sharing its k")
    ax.axhline(0.0, color="black", linewidth=0.8)
    _log2_k_axis(ax, plotted_ks)
    ax.set_ylabel(f"Pass@k minus {baseline} (percentage points" +
                  (", paired 95% bands)" if comparisons is not None else ")"))
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
    colours = label_colours(list(tables))
    for index, (label, results_dict) in enumerate(tables.items()):
        table_ks, values, lows, highs = passk_table(results_dict, label, dataset)
        missing = [k for k in ks if k not in table_ks]
        if missing:
            raise ValueError(f"{label}: no Pass@k for k={missing} (has k={table_ks.tolist()})")
        rows = [int(np.flatnonzero(table_ks == k)[0]) for k in ks]
        errors = np.vstack([values[rows] - lows[rows], highs[rows] - values[rows]]) if show_ci else None
        ax.bar(positions + (index - (len(tables) - 1) / 2) * width, values[rows], width,
               yerr=errors, capsize=3, label=label, color=colours[label])
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
    colours, styles = label_colours(list(runs)), label_styles(list(runs))
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
                ax.plot(series["step"], values, label=name, **(
                    {"color": colours[label], "linestyle": styles[label]} if len(runs) > 1 else {}))
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
