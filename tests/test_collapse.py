"""Policy-collapse detection (issue 26, item 3): the rule, the one-line warning during training, the monitor
summary and the training-curve marker."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from nbhelpers import monitor, plots
from nbhelpers.collapse import (CLIPPED_KEY, ENTROPY_KEY, FORMAT_KEY, CollapseEvent, detect_collapse)
from nbhelpers.training_callbacks import CollapseWarningCallback

HEALTHY = {FORMAT_KEY: 1.6, ENTROPY_KEY: 0.8, CLIPPED_KEY: 0.1}


def history(steps: int = 12, **series) -> list[dict]:
    """Healthy logged points at steps 1..steps; ``series``: per key (FORMAT/ENTROPY/CLIPPED given by short name)
    a {step: value} of overrides (None: the key is not logged at that step)."""
    keys = {"fmt": FORMAT_KEY, "entropy": ENTROPY_KEY, "clipped": CLIPPED_KEY}
    points = []
    for step in range(1, steps + 1):
        entry = {"step": step, "loss": 0.1, **HEALTHY}
        for short, values in series.items():
            if step in values:
                entry[keys[short]] = values[step]
                if values[step] is None:
                    del entry[keys[short]]
        points.append(entry)
    return points


def since(first: int, value: float, last: int = 12) -> dict:
    return {step: value for step in range(first, last + 1)}


@pytest.mark.parametrize("log, expected", [
    (history(), None),  # healthy
    (history(fmt=since(8, 0.2)), (10, FORMAT_KEY)),  # 0.2 < 25% of 1.6 from step 8: three points end at 10
    (history(fmt=since(8, 0.45)), None),  # 0.45 > 0.4: a fall, not a collapse
    (history(fmt={9: 0.0}), None),  # one noisy step
    (history(fmt={8: 0.0, 9: 0.0, 10: 1.6, 11: 0.0}), None),  # never three in a row
    (history(fmt={**since(1, 0.0)}), None),  # nothing to fall from (a model that never had the format)
    (history(fmt=since(3, 0.0)), (8, FORMAT_KEY)),  # the warm-up mean is the baseline; rules look after it
    (history(entropy=since(9, 0.01)), (11, ENTROPY_KEY)),
    (history(entropy=since(9, 0.06)), None),  # above 0.05 nats
    (history(entropy=since(1, 0.01)), (8, ENTROPY_KEY)),  # not before the warm-up ends (5 points + 3)
    (history(clipped=since(6, 0.95)), (8, CLIPPED_KEY)),
    (history(clipped=since(6, 0.9)), None),  # the ceiling itself is not above it
    (history(fmt=since(8, 0.0), clipped=since(6, 1.0)), (8, CLIPPED_KEY)),  # the earliest rule wins
    (history(fmt=since(8, 0.0), entropy=since(8, 0.0)), (10, FORMAT_KEY)),  # a tie: format first
    (history(fmt={**since(6, None, 10), 11: 0.1, 12: 0.1}), None),  # two points after the warm-up
    (history(steps=14, fmt={**since(6, None, 8), **since(9, 0.1, 14)}), (11, FORMAT_KEY)),  # gaps are skipped
    (history(entropy={10: float("nan"), 11: 0.0, 12: 0.0}), None),  # NaN is not a value
    ([], None),
])
def test_detect_collapse(log, expected):
    event = detect_collapse(log)
    assert (None if event is None else (event.step, event.statistic)) == expected


def test_the_warning_line_names_the_step_and_the_statistic():
    event = detect_collapse(history(fmt=since(8, 0.2)))
    assert event == CollapseEvent(10, FORMAT_KEY, pytest.approx(0.2), pytest.approx(0.4))
    assert event.message() == ("policy collapse at step 10: format reward (rewards/format_reward/mean) 0.2 < 0.4 "
                               "over the last 3 logged steps")
    assert "clipped-completion ratio (completions/clipped_ratio) 0.95 > 0.9" in \
        detect_collapse(history(clipped=since(6, 0.95))).message()


def test_the_callback_warns_once_per_run(caplog):
    callback = CollapseWarningCallback()
    state = SimpleNamespace(is_world_process_zero=True, log_history=[])
    with caplog.at_level(logging.WARNING, logger="nbhelpers.training_callbacks"):
        for entry in history(steps=14, entropy=since(6, 0.0, 14)):
            state.log_history.append(entry)
            callback.on_log(None, state, None, logs=entry)
    lines = [r.getMessage() for r in caplog.records if "policy collapse" in r.getMessage()]
    assert lines == ["policy collapse at step 8: entropy (entropy) 0 < 0.05 over the last 3 logged steps"]


def _write_run(folder, log):
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": log[-1]["step"], "log_history": log}))
    return folder


def test_monitor_reports_the_collapse_step(tmp_path):
    collapsed = monitor.summarize_run(monitor.read_run(_write_run(tmp_path / "a", history(clipped=since(6, 1.0)))))
    assert collapsed.collapse_step == 8
    assert "collapse: policy collapse at step 8: clipped-completion ratio" in monitor.format_summary(collapsed)
    healthy = monitor.summarize_run(monitor.read_run(_write_run(tmp_path / "b", history())))
    assert healthy.collapse_step is None and "collapse: none detected" in monitor.format_summary(healthy)


def test_training_curves_mark_the_collapse_step():
    collapsed = pd.DataFrame(history(fmt=since(8, 0.2)))
    figure = plots.plot_training_curves(collapsed)
    for ax in figure.axes:
        marks = [line for line in ax.get_lines() if line.get_label().startswith("_collapse")]
        assert len(marks) == 1 and list(marks[0].get_xdata()) == [10, 10]
    runs = {"ok": pd.DataFrame(history()), "bad": collapsed}
    figure = plots.plot_training_curves(runs, metrics=["loss"])
    assert [text.get_text() for text in figure.legends[0].get_texts()] == ["ok", "bad"]  # the mark is no run
    assert sum(line.get_label().startswith("_collapse") for line in figure.axes[0].get_lines()) == 1
    assert not any(line.get_label().startswith("_collapse")
                   for ax in plots.plot_training_curves(pd.DataFrame(history())).axes for line in ax.get_lines())
    np.testing.assert_allclose(figure.axes[0].get_lines()[0].get_ydata(), np.full(12, 0.1))
