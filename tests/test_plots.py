"""Figures checked through their Figure objects (no golden images)."""

import argparse

import numpy as np
import pandas as pd
import pytest
from matplotlib.ticker import PercentFormatter

from nbhelpers import passk, plots
from nbhelpers.passk import ProblemCounts

N = 16
KS = [1, 2, 4, 8, 16]
METHODS = {"GRPO": 0.35, "PSR": 0.45, "NSR": 0.3}


def method_results(method, rate, seed):
    rng = np.random.default_rng(seed)
    problems = [ProblemCounts(dataset, str(i), N, int(rng.binomial(N, min(1.0, rate * (0.5 + i % 3) / 1.5))))
                for dataset in ("ChartQA", "PlotQA") for i in range(12)]
    return passk.passk_results(problems, method, bootstrap=100)


@pytest.fixture(scope="module")
def results():
    return [method_results(method, rate, seed) for seed, (method, rate) in enumerate(METHODS.items())]


def legend_labels(ax):
    return [text.get_text() for text in ax.get_legend().get_texts()]


def test_curves_lines_axes_and_labels(results):
    figure = plots.plot_passk_curves(results)
    ax, = figure.axes
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == list(METHODS)
    assert legend_labels(ax) == list(METHODS)
    assert ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 2
    assert "log2" in ax.get_xlabel()
    assert list(ax.get_xticks()) == KS
    assert isinstance(ax.yaxis.get_major_formatter(), PercentFormatter)
    for line, result in zip(lines, results):
        np.testing.assert_array_equal(line.get_xdata(), KS)
        np.testing.assert_allclose(line.get_ydata(), [result["pass_at_k"][str(k)] for k in KS])
    low, high = ax.get_ylim()
    all_lows = [result["ci95"][str(k)][0] for result in results for k in KS]
    all_highs = [result["ci95"][str(k)][1] for result in results for k in KS]
    assert 0 <= low <= min(all_lows) and max(all_highs) <= high <= 1
    assert len(ax.collections) == 3  # one 95% band per method
    assert ax.get_title() == "Pass@k (all datasets)"


def test_curves_without_intervals_dataset_and_k_range(results):
    figure = plots.plot_passk_curves(results, ["a", "b", "c"], dataset="PlotQA", show_ci=False, k_range=(2, 8))
    ax, = figure.axes
    assert len(ax.collections) == 0
    assert [line.get_label() for line in ax.get_lines()] == ["a", "b", "c"]
    first = ax.get_lines()[0]
    np.testing.assert_array_equal(first.get_xdata(), [2, 4, 8])
    plotqa = results[0]["meta"]["per_dataset"]["PlotQA"]["pass_at_k"]
    np.testing.assert_allclose(first.get_ydata(), [plotqa[k] for k in ("2", "4", "8")])
    assert ax.get_title() == "Pass@k (PlotQA)"


def test_curves_read_results_files(tmp_path, results):
    paths = [passk.write_results(r, tmp_path / f"{r['method']}.json") for r in results]
    ax, = plots.plot_passk_curves(paths).axes
    assert legend_labels(ax) == list(METHODS)


@pytest.mark.parametrize("labels, dataset, message", [
    (["a", "b"], None, "2 labels for 3 results"),
    (["a", "a", "b"], None, "labels must be unique"),
    (None, "ChartBench", "GRPO: no dataset 'ChartBench'"),
])
def test_curves_reject_bad_labels_and_datasets(results, labels, dataset, message):
    with pytest.raises(ValueError, match=message):
        plots.plot_passk_curves(results, labels, dataset=dataset)


def test_grid_has_one_subplot_per_dataset(results):
    figure = plots.plot_passk_grid(results)
    assert [ax.get_title() for ax in figure.axes] == ["ChartQA", "PlotQA"]
    for ax in figure.axes:
        assert len(ax.get_lines()) == 3
        assert ax.xaxis.get_transform().base == 2
    chartqa_grpo = figure.axes[0].get_lines()[0].get_ydata()
    expected = results[0]["meta"]["per_dataset"]["ChartQA"]["pass_at_k"]
    np.testing.assert_allclose(chartqa_grpo, [expected[str(k)] for k in KS])


def test_improvement_in_percentage_points_over_the_baseline(results):
    figure = plots.plot_improvement(results, baseline="PSR")
    ax, = figure.axes
    handles, labels = ax.get_legend_handles_labels()
    assert labels == ["GRPO", "NSR"]
    base = results[1]["pass_at_k"]
    np.testing.assert_allclose(handles[1].get_ydata(),
                               [(results[2]["pass_at_k"][str(k)] - base[str(k)]) * 100 for k in KS])
    assert any(np.all(np.asarray(line.get_ydata()) == 0) for line in ax.get_lines())  # the zero line
    assert "percentage points" in ax.get_ylabel() and "PSR" in ax.get_ylabel()
    assert ax.get_xscale() == "log"
    assert plots.plot_improvement(results).axes[0].get_legend_handles_labels()[1] == ["PSR", "NSR"]
    with pytest.raises(ValueError, match="baseline 'base' is not one of the labels"):
        plots.plot_improvement(results, baseline="base")


def test_bars_at_chosen_k(results):
    figure = plots.plot_passk_bars(results, ks=(1, 4, 16))
    ax, = figure.axes
    bars = ax.patches
    assert len(bars) == 9
    heights = [bar.get_height() for bar in bars]
    expected = [r["pass_at_k"][str(k)] for r in results for k in (1, 4, 16)]
    np.testing.assert_allclose(heights, expected)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["k=1", "k=4", "k=16"]
    assert ax.get_ylim() == plots.plot_passk_curves(results).axes[0].get_ylim()  # the curves' scale
    assert ax.get_ylim() != (0.0, 1.0)
    assert legend_labels(ax) == list(METHODS)
    with pytest.raises(ValueError, match=r"GRPO: no Pass@k for k=\[64\]"):
        plots.plot_passk_bars(results, ks=(1, 64))


@pytest.mark.parametrize("suffix, signature", [(".png", b"\x89PNG"), (".svg", b"<svg")])
def test_every_figure_saves_png_and_svg(tmp_path, results, suffix, signature):
    frame = pd.DataFrame({"step": [1, 2, 3], "loss": [1.0, 0.8, 0.7]})
    draws = {
        "curves": lambda path: plots.plot_passk_curves(results, save_to=path),
        "grid": lambda path: plots.plot_passk_grid(results, save_to=path),
        "improvement": lambda path: plots.plot_improvement(results, save_to=path),
        "bars": lambda path: plots.plot_passk_bars(results, ks=(1, 2), save_to=path),
        "training": lambda path: plots.plot_training_curves(frame, save_to=path),
    }
    for name, draw in draws.items():
        path = tmp_path / "figs" / f"{name}{suffix}"
        draw(path)
        assert signature in path.read_bytes()[:400], name


def test_unsupported_figure_format_is_rejected(tmp_path, results):
    with pytest.raises(ValueError, match="unsupported figure format '.jpg'"):
        plots.plot_passk_curves(results, save_to=tmp_path / "f.jpg")


def training_log(scale=1.0):
    steps = np.arange(1, 21)
    return pd.DataFrame({
        "step": steps, "loss": scale / steps, "learning_rate": 1e-5 * (1 - steps / 20),
        "grad_norm": np.full(20, 0.5), "reward": 2 + steps * 0.1 * scale,
        "rewards/format_reward/mean": np.full(20, 1.5), "rewards/accuracy_reward/mean": steps / 20,
        "mode/kept_positive": steps % 4, "mode/kept_negative": 4 - steps % 4, "mode/empty_steps": steps // 10,
        "mode/total_reward": 2 + steps * 0.1 * scale, "mode/accuracy": steps / 20, "epoch": steps / 20,
    })


def test_training_curves_default_panels_for_one_run():
    figure = plots.plot_training_curves(training_log())
    titles = [ax.get_title() for ax in figure.axes]
    assert titles == ["loss", "learning rate", "gradient norm", "mean total reward", "mean reward per function",
                      "accuracy", "samples kept per step", "empty steps (cumulative)"]
    assert [line.get_label() for line in figure.axes[3].get_lines()] == ["run"]  # `reward`, not its twin
    per_reward = figure.axes[4]
    assert legend_labels(per_reward) == ["accuracy_reward", "format_reward"]
    assert [line.get_label() for line in figure.axes[6].get_lines()] == ["kept_positive", "kept_negative"]
    np.testing.assert_allclose(figure.axes[0].get_lines()[0].get_ydata(), 1 / np.arange(1, 21))
    assert all(ax.get_xlabel() == "optimizer step" for ax in figure.axes)
    assert all(ax.get_ylabel() for ax in figure.axes)


def test_training_curves_are_titled_with_integer_step_ticks():
    log = training_log().iloc[:3]  # three steps: matplotlib alone would tick at 1.25, 1.5, ...
    figure = plots.plot_training_curves(log, title="nsr, tiny-random, seed 3")
    assert figure.get_suptitle() == "nsr, tiny-random, seed 3"
    figure.canvas.draw()
    for ax in figure.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_training_curves_compare_runs_and_smooth():
    runs = {"grpo": training_log(), "nsr": training_log(2.0).drop(columns=["mode/kept_positive", "mode/kept_negative"])}
    figure = plots.plot_training_curves(runs, metrics=["loss", "reward"], smoothing=3)
    assert [ax.get_title() for ax in figure.axes] == ["loss", "reward"]
    loss_ax = figure.axes[0]
    assert loss_ax.get_legend() is None  # one legend of the runs above the panels, none over a curve
    assert [text.get_text() for text in figure.legends[0].get_texts()] == ["grpo", "nsr"]
    expected = pd.Series(2.0 / np.arange(1, 21)).rolling(3, min_periods=1).mean()
    np.testing.assert_allclose(loss_ax.get_lines()[1].get_ydata(), expected)
    overview = plots.plot_training_curves(runs)  # several runs: one panel per reward and per kept count
    titles = [ax.get_title() for ax in overview.axes]
    assert titles[4:6] == ["accuracy_reward", "format_reward"] and "kept_positive" in titles
    kept_ax = overview.axes[titles.index("kept_positive")]
    assert [line.get_label() for line in kept_ax.get_lines()] == ["grpo"]
    assert all(ax.get_legend() is None for ax in overview.axes)


def test_training_curves_fall_back_to_the_trainers_total_reward():
    log = training_log().drop(columns=["reward"])
    log["mode/total_reward"] = 7.0
    reward_ax = plots.plot_training_curves(log).axes[3]
    assert reward_ax.get_title() == "mean total reward"
    np.testing.assert_array_equal(reward_ax.get_lines()[0].get_ydata(), np.full(20, 7.0))


@pytest.mark.parametrize("kwargs, message", [
    ({"metrics": ["kl"]}, r"metric\(s\) \['kl'\] not in the logs"),
    ({"smoothing": 0}, "smoothing must be at least 1"),
])
def test_training_curves_reject_bad_requests(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plots.plot_training_curves(training_log(), **kwargs)


def test_training_curves_need_a_known_metric():
    with pytest.raises(ValueError, match="no known training metric"):
        plots.plot_training_curves(pd.DataFrame({"step": [1], "epoch": [0.1]}))


@pytest.mark.parametrize("kind, extra", [
    ("curves", []), ("grid", []), ("improvement", ["--baseline", "B"]), ("bars", ["--ks", "1", "8"]),
])
def test_plot_cli_every_kind(tmp_path, results, kind, extra):
    paths = [passk.write_results(r, tmp_path / f"{r['method']}.json") for r in results]
    parser = argparse.ArgumentParser()
    plots.add_cli_arguments(parser)
    out = tmp_path / f"{kind}.svg"
    args = parser.parse_args(["--results", *map(str, paths), "--labels", "A", "B", "C", "--out", str(out),
                              "--kind", kind, *extra])
    assert plots.run_from_cli(args) == 0
    assert b"<svg" in out.read_bytes()[:400]


# --- one colour per mode, the chance floor, paired bands ----------------------------------------------

MODES = ["base", "grpo", "psr", "nsr", "w-reinforce", "passk"]


def guessing_problems(rate_of_right, seed, n_problems=30):
    """Problems with gold answers "0".."4" whose answers are right with probability ``rate_of_right`` and
    otherwise a uniform guess, so that every method has a chance floor."""
    rng = np.random.default_rng(seed)
    problems = []
    for i in range(n_problems):
        gold = str(i % 5)
        answers = tuple(gold if rng.random() < rate_of_right else str(rng.integers(5)) for _ in range(N))
        problems.append(ProblemCounts("synthetic", str(i), N, answers.count(gold), gold=gold, answers=answers))
    return problems


@pytest.fixture(scope="module")
def mode_problems():
    return {mode: guessing_problems(0.1 * index, index) for index, mode in enumerate(MODES)}


@pytest.fixture(scope="module")
def mode_results(mode_problems):
    return {mode: passk.passk_results(problems, mode, bootstrap=50) for mode, problems in mode_problems.items()}


@pytest.mark.parametrize("label, mode", [
    ("psr", "psr"), ("PSR", "psr"), ("psr-s1", "psr"), ("grpo (seeds 0, 1, 2)", "grpo"), ("base", "base"),
    ("w-reinforce-s2", "w-reinforce"), ("nsr_synthetic_n256", "nsr"), ("passk", "passk"),
    ("psrx", None), ("baseline", None), ("a", None), ("grpo-sx", None), ("my psr", None),
])
def test_label_mode(label, mode):
    assert plots.label_mode(label) == mode


def test_label_colours_and_styles():
    labels = ["grpo-s0", "grpo-s1", "psr-s0", "mine", "theirs", "grpo-s2"]
    assert plots.label_colours(labels) == {"grpo-s0": "tab:blue", "grpo-s1": "tab:blue", "psr-s0": "tab:orange",
                                           "mine": plots.OTHER_COLOURS[0], "theirs": plots.OTHER_COLOURS[1],
                                           "grpo-s2": "tab:blue"}
    assert plots.label_styles(labels) == {"grpo-s0": "-", "grpo-s1": "-.", "psr-s0": "-", "mine": "-",
                                          "theirs": "-", "grpo-s2": ":"}
    assert set(plots.MODE_COLOURS) == set(MODES)
    assert len(set(plots.MODE_COLOURS.values()) | set(plots.OTHER_COLOURS)) == \
        len(plots.MODE_COLOURS) + len(plots.OTHER_COLOURS)  # no two share a colour


def line_colours(ax):
    from matplotlib.colors import to_hex

    return {line.get_label(): to_hex(line.get_color()) for line in ax.get_lines()
            if not line.get_label().startswith("_")}


def test_every_figure_gives_a_mode_its_colour(mode_problems, mode_results):
    """psr was orange in the curves and blue in the improvement plot; now a mode has one colour."""
    from matplotlib.colors import to_hex

    expected = {mode: to_hex(colour) for mode, colour in plots.MODE_COLOURS.items()}
    everything, results = list(mode_results.values()), list(mode_results)
    comparisons = {mode: passk.compare_methods(mode_problems[mode], mode_problems["grpo"], bootstrap=20)
                   for mode in MODES if mode != "grpo"}
    figures = {
        "curves": plots.plot_passk_curves(everything, results),
        "some curves": plots.plot_passk_curves(everything[2:], results[2:]),
        "improvement over base": plots.plot_improvement(everything, results, baseline="base"),
        "improvement over grpo": plots.plot_improvement(everything, results, baseline="grpo", comparisons=comparisons),
        "training": plots.plot_training_curves({mode: training_log() for mode in reversed(MODES)}, metrics=["loss"]),
    }
    for name, figure in figures.items():
        colours = line_colours(figure.axes[0])
        assert colours and all(colours[label] == expected[label] for label in colours), name
    bars = plots.plot_passk_bars(everything[3:], results[3:], ks=(1, 4)).axes[0].patches
    assert [to_hex(bar.get_facecolor()) for bar in bars] == [expected[m] for m in results[3:] for _ in (1, 4)]
    seeds = plots.plot_passk_curves([mode_results["psr"]] * 2, ["psr-s0", "psr-s1"], show_ci=False).axes[0]
    assert set(line_colours(seeds).values()) == {expected["psr"]}
    assert [line.get_linestyle() for line in seeds.get_lines()[::2]] == ["-", "-."]


def floor_lines(ax):
    return {line.get_gid().split(":", 1)[1]: line for line in ax.get_lines()
            if (line.get_gid() or "").startswith("chance-floor:")}


def test_curves_draw_each_floor_dashed_in_its_colour(mode_results):
    ax, = plots.plot_passk_curves(list(mode_results.values()), list(mode_results)).axes
    floors = floor_lines(ax)
    assert list(floors) == MODES
    curves = line_colours(ax)
    from matplotlib.colors import to_hex
    for mode, line in floors.items():
        assert line.get_linestyle() == "--" and to_hex(line.get_color()) == curves[mode]
        np.testing.assert_allclose(line.get_ydata(), [mode_results[mode]["chance_floor"][str(k)] for k in KS])
    assert legend_labels(ax) == MODES + ["chance floor (dashed)"]
    low, _ = ax.get_ylim()
    assert low <= min(min(r["chance_floor"].values()) for r in mode_results.values())
    assert floor_lines(plots.plot_passk_curves(list(mode_results.values()), show_floor=False).axes[0]) == {}
    cut = floor_lines(plots.plot_passk_curves([mode_results["psr"]], k_range=(2, 8)).axes[0])["psr"]
    np.testing.assert_array_equal(cut.get_xdata(), [2, 4, 8])


def test_results_without_a_floor_draw_none(results):
    ax, = plots.plot_passk_curves(results).axes
    assert floor_lines(ax) == {} and "chance floor (dashed)" not in legend_labels(ax)


def test_improvement_shades_the_paired_band(mode_problems, mode_results):
    others = ["psr", "nsr"]
    comparisons = {mode: passk.compare_methods(mode_problems[mode], mode_problems["grpo"], bootstrap=50)
                   for mode in others}
    chosen = [mode_results[m] for m in ["grpo", *others]]
    ax, = plots.plot_improvement(chosen, baseline="grpo", comparisons=comparisons).axes
    assert len(ax.collections) == 2 and "paired 95% bands" in ax.get_ylabel()
    for mode, band, line in zip(others, ax.collections, ax.get_lines()):
        difference, ci = comparisons[mode]["difference"], comparisons[mode]["ci95"]
        np.testing.assert_allclose(line.get_ydata(), [difference[str(k)] * 100 for k in KS])
        y = band.get_paths()[0].vertices[:, 1]
        np.testing.assert_allclose([y.min(), y.max()], [min(ci[str(k)][0] for k in KS) * 100,
                                                        max(ci[str(k)][1] for k in KS) * 100])
    assert len(plots.plot_improvement(chosen, baseline="grpo").axes[0].collections) == 0  # no pairs: bare lines
    with pytest.raises(ValueError, match=r"no paired comparison against 'grpo' for \['nsr'\]"):
        plots.plot_improvement(chosen, baseline="grpo", comparisons={"psr": comparisons["psr"]})
    with pytest.raises(ValueError, match="paired comparisons are overall"):
        plots.plot_improvement(chosen, baseline="grpo", comparisons=comparisons, dataset="synthetic")
