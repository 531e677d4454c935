"""Interactive explorers over `plots`: Pass@k curves and training curves (ipywidgets).

An explorer re-renders its figure into an `ipywidgets.Output` whenever a control changes;
`explorer.figure` is the current Figure and the controls are attributes, so tests and scripts
can drive it without a browser (`explorer.methods.value = ("NSR",)`). Displayed in a notebook
(the explorer as a cell's last expression) it shows its controls where a live frontend is
available (`live=True`), else the same figures as static images; `static_dir` saves those
images as PNG files. Every control has a stable description and a CSS class
(`chartrl-...`) for browser tests.
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path
from typing import Mapping, Sequence

import ipywidgets as widgets
import pandas as pd
import traitlets
from matplotlib.figure import Figure

from .monitor import read_run, run_labels
from .plots import (ResultsLike, labelled_results, passk_table, plot_passk_curves,
                    plot_training_curves, save_figure)

NOT_METRICS = ("step", "epoch")
MAX_SMOOTHING = 50


def frontend_available() -> bool:
    """True inside an IPython kernel (which can carry widget comms). A kernel run headless
    (papermill, nbconvert) has no frontend and cannot be told apart: pass live=False there."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def _png_output(figure: Figure) -> dict:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return {"output_type": "display_data", "metadata": {},
            "data": {"image/png": base64.b64encode(buffer.getvalue()).decode("ascii"),
                     "text/plain": "<Figure>"}}


# Dropdown value meaning "no filter" (ipywidgets shows a None value as an empty selection).
ALL = "__all__"


def _chosen(value: str) -> str | None:
    return None if value == ALL else value


class CheckboxGroup(widgets.VBox):
    """A titled column of checkboxes, one per option; `value` is the tuple of ticked options
    (in option order), settable from code. CSS: `css_class` on the group, `css_class`-item on
    each checkbox."""

    value = traitlets.Tuple()

    def __init__(self, options: Sequence[str], value: Sequence[str], *, description: str, css_class: str):
        self.options = tuple(options)
        self.description = description
        self.checkboxes = tuple(
            widgets.Checkbox(value=option in value, description=option, indent=False).add_class(f"{css_class}-item")
            for option in self.options)
        super().__init__([widgets.Label(description), *self.checkboxes])
        self.add_class(css_class)
        self._syncing = False
        self.value = tuple(value)
        for box in self.checkboxes:
            box.observe(self._read_boxes, names="value")
        self.observe(self._tick_boxes, names="value")

    @traitlets.validate("value")
    def _validate_value(self, proposal):
        unknown = [option for option in proposal.value if option not in self.options]
        if unknown:
            raise traitlets.TraitError(f"{self.description}: unknown option(s) {unknown}; options are {self.options}")
        return tuple(option for option in self.options if option in proposal.value)

    def _tick_boxes(self, change) -> None:
        self._syncing = True
        try:
            for option, box in zip(self.options, self.checkboxes):
                box.value = option in change.new
        finally:
            self._syncing = False

    def _read_boxes(self, _change) -> None:
        if not self._syncing:
            self.value = tuple(option for option, box in zip(self.options, self.checkboxes) if box.value)


class _Explorer:
    """Shared behaviour: render on change into `output`, static views, notebook display."""

    nothing_selected = "Select at least one item."

    def _setup(self, controls: Sequence[widgets.Widget], layout: widgets.Widget, css_class: str,
               static_dir, live: bool | None) -> None:
        self.output = widgets.Output().add_class(f"{css_class}-output")
        self.widget = widgets.VBox([layout, self.output]).add_class(css_class)
        self.figure: Figure | None = None
        for control in controls:
            control.observe(lambda _change: self.render(), names="value")
        self.render()
        self.live = frontend_available() if live is None else live
        self.static_figures: dict[str, Figure] = (
            {} if self.live and static_dir is None else self._static_views())
        self.static_paths = ([save_figure(figure, Path(static_dir) / f"{name}.png")
                              for name, figure in self.static_figures.items()] if static_dir else [])

    def _current_figure(self) -> Figure | None:
        raise NotImplementedError

    def _static_views(self) -> dict[str, Figure]:
        raise NotImplementedError

    def render(self) -> Figure | None:
        """Redraw from the controls' values into `output`; returns (and keeps) the Figure."""
        try:
            self.figure = self._current_figure()
            message = self.nothing_selected
        except ValueError as error:  # a combination of choices with nothing to draw
            self.figure, message = None, str(error)
        self.output.outputs = (
            (_png_output(self.figure),) if self.figure is not None else
            ({"output_type": "stream", "name": "stdout", "text": message + "\n"},))
        return self.figure

    def _ipython_display_(self) -> None:
        from IPython.display import Image, display

        if self.live:
            display(self.widget)
            return
        for figure in self.static_figures.values():
            display(Image(data=base64.b64decode(_png_output(figure)["data"]["image/png"])))


class PassKExplorer(_Explorer):
    """Pass@k curves of several methods: method checkboxes, dataset dropdown, k range slider,
    interval toggle, chance-floor toggle (dashed lines, where the results have a floor). `results`:
    results dicts or results-file paths; labels default to methods."""

    nothing_selected = "Select at least one method."

    def __init__(self, results: Sequence[ResultsLike], labels: Sequence[str] | None = None, *,
                 static_dir: str | os.PathLike | None = None, live: bool | None = None):
        self.results = labelled_results(results, labels)
        shared = set.intersection(*(set(r.get("meta", {}).get("per_dataset", {})) for r in self.results.values()))
        self.datasets = sorted(shared)
        ks = sorted(set().union(*(passk_table(r, label)[0].tolist() for label, r in self.results.items())))
        self.methods = CheckboxGroup(list(self.results), list(self.results), description="Methods",
                                     css_class="chartrl-method-select")
        self.dataset = widgets.Dropdown(options=[("all datasets", ALL)] + [(d, d) for d in self.datasets],
                                        value=ALL, description="Dataset").add_class("chartrl-dataset-select")
        self.k_range = widgets.SelectionRangeSlider(options=[(str(k), k) for k in ks], index=(0, len(ks) - 1),
                                                    description="k range").add_class("chartrl-k-range")
        self.show_ci = widgets.Checkbox(value=True, description="Show 95% intervals").add_class("chartrl-ci-toggle")
        self.show_floor = widgets.Checkbox(value=True, description="Show chance floor").add_class(
            "chartrl-floor-toggle")
        controls = [self.dataset, self.k_range, self.show_ci, self.show_floor]
        layout = widgets.HBox([self.methods, widgets.VBox(controls)])
        self._setup([self.methods, *controls], layout, "chartrl-passk-explorer", static_dir, live)

    def _current_figure(self) -> Figure | None:
        if not self.methods.value:
            return None
        chosen = [self.results[label] for label in self.methods.value]
        return plot_passk_curves(chosen, list(self.methods.value), dataset=_chosen(self.dataset.value),
                                 show_ci=self.show_ci.value, k_range=self.k_range.value,
                                 show_floor=self.show_floor.value)

    def _static_views(self) -> dict[str, Figure]:
        """All methods, full k range, with intervals and chance floors: overall (the figure 30_passk saves as
        passk_curves.png, so saving both writes one file) and per shared dataset."""
        views = {"passk_curves": plot_passk_curves(list(self.results.values()), list(self.results))}
        for dataset in self.datasets:
            views[f"passk_{dataset}"] = plot_passk_curves(list(self.results.values()), list(self.results),
                                                          dataset=dataset)
        return views


class TrainingExplorer(_Explorer):
    """Training curves of several runs: run checkboxes, metric dropdown ("overview" = the
    default panels), smoothing window slider (rolling mean over logged points).
    `runs`: {label: read_run frame} or run folders (labels default to folder names)."""

    nothing_selected = "Select at least one run."

    def __init__(self, runs: Mapping[str, pd.DataFrame] | Sequence[str | os.PathLike],
                 labels: Sequence[str] | None = None, *, static_dir: str | os.PathLike | None = None,
                 live: bool | None = None):
        self.frames = (dict(runs) if isinstance(runs, Mapping) else
                       {label: read_run(run) for label, run in zip(run_labels(runs, labels), runs)})
        if not self.frames:
            raise ValueError("no runs to explore")
        metrics = sorted(set().union(*(frame.columns for frame in self.frames.values())) - set(NOT_METRICS))
        self.runs = CheckboxGroup(list(self.frames), list(self.frames), description="Runs",
                                  css_class="chartrl-run-select")
        self.metric = widgets.Dropdown(options=[("overview", ALL)] + [(m, m) for m in metrics], value=ALL,
                                       description="Metric").add_class("chartrl-metric-select")
        self.smoothing = widgets.IntSlider(value=1, min=1, max=MAX_SMOOTHING,
                                           description="Smoothing").add_class("chartrl-smoothing")
        layout = widgets.HBox([self.runs, widgets.VBox([self.metric, self.smoothing])])
        self._setup([self.runs, self.metric, self.smoothing], layout, "chartrl-training-explorer",
                    static_dir, live)

    def _current_figure(self) -> Figure | None:
        if not self.runs.value:
            return None
        return plot_training_curves({label: self.frames[label] for label in self.runs.value},
                                    metrics=None if self.metric.value == ALL else [self.metric.value],
                                    smoothing=self.smoothing.value)

    def _static_views(self) -> dict[str, Figure]:
        """All runs, default panels, unsmoothed."""
        return {"training_curves": plot_training_curves(self.frames)}


# The names notebooks call.
passk_explorer = PassKExplorer
training_explorer = TrainingExplorer
