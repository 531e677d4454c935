"""Explorers built and driven without a browser: changing a control re-renders the figure."""

import json

import numpy as np
import pandas as pd
import pytest
import traitlets

from nbhelpers import passk, widgets
from nbhelpers.passk import ProblemCounts

N = 8


def method_results(method, counts_chartqa, counts_plotqa):
    problems = ([ProblemCounts("ChartQA", str(i), N, c) for i, c in enumerate(counts_chartqa)]
                + [ProblemCounts("PlotQA", str(i), N, c) for i, c in enumerate(counts_plotqa)])
    return passk.passk_results(problems, method, bootstrap=50)


@pytest.fixture(scope="module")
def results():
    return [method_results("GRPO", [1, 2, 0, 4], [0, 0, 1, 3]),
            method_results("NSR", [0, 3, 1, 1], [2, 0, 0, 1]),
            method_results("PSR", [4, 4, 0, 0], [1, 1, 1, 1])]


def line_labels(explorer):
    return [line.get_label() for line in explorer.figure.axes[0].get_lines()]


def test_passk_explorer_rerenders_when_methods_change(results):
    explorer = widgets.passk_explorer(results, live=False)
    assert line_labels(explorer) == ["GRPO", "NSR", "PSR"]
    first_figure = explorer.figure
    explorer.methods.value = ("PSR", "GRPO")
    assert explorer.figure is not first_figure
    assert line_labels(explorer) == ["GRPO", "PSR"]  # option order kept
    assert [box.value for box in explorer.methods.checkboxes] == [True, False, True]
    explorer.methods.checkboxes[0].value = False  # unticking a box, as a user would
    assert explorer.methods.value == ("PSR",)
    assert line_labels(explorer) == ["PSR"]
    output, = explorer.output.outputs
    assert output["data"]["image/png"]  # the figure shown in the Output widget


def test_passk_explorer_with_nothing_selected_says_so(results):
    explorer = widgets.passk_explorer(results, live=False)
    explorer.methods.value = ()
    assert explorer.figure is None
    assert explorer.output.outputs[0]["text"] == "Select at least one method.\n"
    with pytest.raises(traitlets.TraitError, match="unknown option"):
        explorer.methods.value = ("RLOO",)


def test_passk_explorer_dataset_k_range_and_intervals(results):
    explorer = widgets.passk_explorer(results, live=False)
    assert [label for label, _ in explorer.dataset.options] == ["all datasets", "ChartQA", "PlotQA"]
    overall = explorer.figure.axes[0].get_lines()[0].get_ydata()
    explorer.dataset.value = "PlotQA"
    plotqa = explorer.figure.axes[0].get_lines()[0].get_ydata()
    expected = results[0]["meta"]["per_dataset"]["PlotQA"]["pass_at_k"]
    np.testing.assert_allclose(plotqa, [expected[k] for k in ("1", "2", "4", "8")])
    assert not np.allclose(plotqa, overall)
    assert explorer.figure.axes[0].get_title() == "Pass@k (PlotQA)"

    assert explorer.k_range.value == (1, 8)
    explorer.k_range.value = (2, 4)
    np.testing.assert_array_equal(explorer.figure.axes[0].get_lines()[0].get_xdata(), [2, 4])

    assert len(explorer.figure.axes[0].collections) == 3
    explorer.show_ci.value = False
    assert len(explorer.figure.axes[0].collections) == 0


def test_passk_explorer_controls_are_locatable_in_a_browser(results):
    explorer = widgets.passk_explorer(results, live=False)
    assert "chartrl-passk-explorer" in explorer.widget._dom_classes
    assert "chartrl-method-select" in explorer.methods._dom_classes
    assert all("chartrl-method-select-item" in box._dom_classes for box in explorer.methods.checkboxes)
    assert [box.description for box in explorer.methods.checkboxes] == ["GRPO", "NSR", "PSR"]
    assert explorer.methods.description == "Methods"
    assert (explorer.dataset.description, explorer.k_range.description, explorer.show_ci.description,
            explorer.show_floor.description) == ("Dataset", "k range", "Show 95% intervals", "Show chance floor")
    for control, css in ((explorer.dataset, "chartrl-dataset-select"), (explorer.k_range, "chartrl-k-range"),
                         (explorer.show_ci, "chartrl-ci-toggle"), (explorer.show_floor, "chartrl-floor-toggle"),
                         (explorer.output, "chartrl-passk-explorer-output")):
        assert css in control._dom_classes


def test_passk_explorer_floor_toggle():
    def floored(method, right):
        problems = [ProblemCounts("ChartQA", str(i), N, right, gold=str(i % 3),
                                  answers=(str(i % 3),) * right + ("9",) * (N - right)) for i in range(6)]
        return passk.passk_results(problems, method, bootstrap=20)

    explorer = widgets.passk_explorer([floored("grpo", 2), floored("psr", 5)], live=False)

    def floors():
        return [line.get_gid() for line in explorer.figure.axes[0].get_lines()
                if (line.get_gid() or "").startswith("chance-floor:")]

    assert explorer.show_floor.value is True
    assert floors() == ["chance-floor:grpo", "chance-floor:psr"]
    explorer.show_floor.value = False
    assert floors() == []
    explorer.show_floor.value = True
    explorer.methods.value = ("psr",)
    assert floors() == ["chance-floor:psr"]


def test_passk_explorer_static_images(tmp_path, results):
    assert widgets.frontend_available() is False  # pytest runs outside a kernel
    explorer = widgets.passk_explorer(results, static_dir=tmp_path / "static")
    assert explorer.live is False
    assert sorted(p.name for p in explorer.static_paths) == ["passk_ChartQA.png", "passk_PlotQA.png", "passk_curves.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in explorer.static_paths)
    assert [line.get_label() for line in explorer.static_figures["passk_curves"].axes[0].get_lines()] == [
        "GRPO", "NSR", "PSR"]


def test_live_explorer_without_static_dir_draws_no_static_images(results):
    explorer = widgets.passk_explorer(results, live=True)
    assert explorer.static_figures == {} and explorer.static_paths == []


def training_log(scale):
    steps = np.arange(1, 13)
    return pd.DataFrame({"step": steps, "loss": scale * (1 + np.sin(steps)), "reward": scale * steps / 12.0,
                         "learning_rate": np.full(12, 1e-5), "epoch": steps / 12})


def test_training_explorer_runs_metric_and_smoothing(tmp_path):
    explorer = widgets.training_explorer({"grpo": training_log(1.0), "nsr": training_log(2.0)},
                                         static_dir=tmp_path, live=False)
    assert [ax.get_title() for ax in explorer.figure.axes] == ["loss", "learning rate", "mean total reward"]
    assert [label for label, _ in explorer.metric.options] == ["overview", "learning_rate", "loss", "reward"]
    explorer.metric.value = "loss"
    ax, = explorer.figure.axes
    assert [line.get_label() for line in ax.get_lines()] == ["grpo", "nsr"]
    raw = ax.get_lines()[0].get_ydata()
    explorer.smoothing.value = 4
    smoothed = explorer.figure.axes[0].get_lines()[0].get_ydata()
    np.testing.assert_allclose(smoothed, pd.Series(raw).rolling(4, min_periods=1).mean())
    explorer.runs.value = ("nsr",)
    assert len(explorer.figure.axes[0].get_lines()) == 1
    np.testing.assert_allclose(explorer.figure.axes[0].get_lines()[0].get_ydata()[:1], [2 * (1 + np.sin(1))])
    assert "chartrl-run-select" in explorer.runs._dom_classes
    assert "chartrl-metric-select" in explorer.metric._dom_classes
    assert explorer.smoothing.description == "Smoothing"
    assert [p.name for p in explorer.static_paths] == ["training_curves.png"]


def test_training_explorer_reads_run_folders(tmp_path):
    for name, scale in (("a", 1.0), ("b", 3.0)):
        (tmp_path / name).mkdir()
        history = [{"step": s, "loss": scale / s, "learning_rate": 1e-5} for s in range(1, 6)]
        (tmp_path / name / "trainer_state.json").write_text(json.dumps({"global_step": 5, "log_history": history}))
    explorer = widgets.training_explorer([tmp_path / "a", tmp_path / "b"], live=False)
    assert list(explorer.frames) == ["a", "b"]
    assert [line.get_label() for line in explorer.figure.axes[0].get_lines()] == ["a", "b"]
    explorer.runs.value = ()
    assert explorer.figure is None and explorer.output.outputs[0]["text"] == "Select at least one run.\n"
