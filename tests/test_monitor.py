"""Run folders (trainer_state.json and/or TensorBoard events) to tables, summaries, comparisons."""

import argparse
import json

import numpy as np
import pandas as pd
import pytest
from torch.utils.tensorboard import SummaryWriter

from nbhelpers import monitor

STEPS = np.arange(1, 31)
CONVERGING_LOSS = 0.5 + 1.0 / STEPS          # flat at the end: CV over the last 6 points ~ 0.004
FALLING_LOSS = 2.0 - 0.06 * STEPS            # still falling fast at the end
RISING_REWARD = 1.0 + 0.05 * STEPS


def log_entry(step, loss, reward):
    return {"epoch": step / 30, "step": int(step), "loss": float(loss), "learning_rate": 1e-5 * (1 - step / 30),
            "grad_norm": 0.4, "reward": float(reward), "reward_std": 0.1,
            "rewards/accuracy_reward/mean": float(reward) / 4, "mode/kept_positive": 3, "mode/kept_negative": 1,
            "mode/empty_step": float(step % 10 == 0)}


def write_trainer_state(folder, steps=STEPS, loss=CONVERGING_LOSS, reward=RISING_REWARD, runtime=123.0):
    history = [log_entry(s, l, r) for s, l, r in zip(steps, loss, reward)]
    if runtime is not None:
        history.append({"epoch": 1.0, "step": int(steps[-1]), "total_flos": 0.0, "train_loss": float(np.mean(loss)),
                        "train_runtime": runtime, "train_samples_per_second": 2.0, "train_steps_per_second": 0.25})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "trainer_state.json"
    path.write_text(json.dumps({"global_step": int(steps[-1]), "max_steps": 30, "log_history": history}))
    return path


def write_events(logs_dir, scalars, walltime=1000.0):
    """scalars: {tag: [(step, value), ...]}, written by one SummaryWriter at a fixed wall time."""
    writer = SummaryWriter(str(logs_dir))
    for tag, points in scalars.items():
        for step, value in points:
            writer.add_scalar(tag, value, step, walltime=walltime + step)
    writer.close()


def tb_scalars(loss=CONVERGING_LOSS, steps=STEPS):
    return {"train/loss": list(zip(steps, loss)), "train/learning_rate": [(s, 1e-5) for s in steps],
            "train/reward": list(zip(steps, RISING_REWARD)),
            "train/rewards/format_reward/mean": [(s, 1.5) for s in steps],
            "eval/loss": [(10, 0.9)], "train/train_runtime": [(int(steps[-1]), 77.0)]}


def test_trainer_state_only(tmp_path):
    write_trainer_state(tmp_path / "run")
    frame = monitor.read_run(tmp_path / "run")
    assert len(frame) == 30 and frame["step"].tolist() == STEPS.tolist()
    assert frame["step"].dtype == np.int64
    assert {"loss", "learning_rate", "grad_norm", "reward", "rewards/accuracy_reward/mean",
            "mode/kept_positive", "mode/empty_steps", "epoch"} <= set(frame.columns)
    assert "train_runtime" not in frame.columns  # the final totals are not a row
    np.testing.assert_allclose(frame["loss"], CONVERGING_LOSS)
    np.testing.assert_array_equal(frame["mode/empty_steps"], STEPS // 10)  # steps 10, 20, 30 were empty
    assert frame.attrs["train_summary"]["train_runtime"] == 123.0
    assert frame.attrs["sources"] == [str(tmp_path / "run" / "trainer_state.json")]


@pytest.mark.parametrize("steps, fractions, expected", [
    ([1, 2, 3], [0.0, 1.0, 1.0], [0.0, 1.0, 2.0]),                            # logging every step
    ([5, 10, 15], [0.2, 0.0, 0.6], [1.0, 1.0, 4.0]),                          # every 5 steps: fractions
    ([2, 3, 4], [1.0, np.nan, 1.0], [2.0, np.nan, 4.0]),                      # a row without the metric
    ([3], [np.nan], [np.nan]),
])
def test_cumulative_empty_steps(steps, fractions, expected):
    total = monitor.cumulative_empty_steps(pd.Series(steps), pd.Series(fractions, dtype=float))
    np.testing.assert_allclose(total.to_numpy(), expected)


def test_entries_of_one_step_are_merged(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "trainer_state.json").write_text(json.dumps({"global_step": 2, "log_history": [
        {"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 2, "eval_loss": 0.7}]}))
    frame = monitor.read_run(run)
    assert list(frame.columns) == ["step", "eval_loss", "loss"]
    assert frame["step"].tolist() == [1, 2] and frame["loss"].tolist() == [1.0, 0.5]
    assert np.isnan(frame["eval_loss"].iloc[0]) and frame["eval_loss"].iloc[1] == 0.7


def test_newest_checkpoint_state_is_used(tmp_path):
    run = tmp_path / "run"
    write_trainer_state(run / "checkpoint-2", steps=STEPS[:2], loss=CONVERGING_LOSS[:2], runtime=None)
    write_trainer_state(run / "checkpoint-10", steps=STEPS[:10], loss=CONVERGING_LOSS[:10], runtime=None)
    (run / "checkpoint-11-tmp").mkdir()
    path, state = monitor.newest_trainer_state(run)
    assert path == run / "checkpoint-10" / "trainer_state.json" and state["global_step"] == 10
    assert len(monitor.read_run(run)) == 10
    write_trainer_state(run, steps=STEPS[:10], loss=CONVERGING_LOSS[:10])  # same step: top level wins
    assert monitor.newest_trainer_state(run)[0] == run / "trainer_state.json"


def test_tensorboard_only(tmp_path):
    write_events(tmp_path / "run" / "logs", tb_scalars())
    frame = monitor.read_run(tmp_path / "run")
    assert frame["step"].tolist() == STEPS.tolist()
    assert {"loss", "learning_rate", "reward", "rewards/format_reward/mean", "eval_loss"} <= set(frame.columns)
    np.testing.assert_allclose(frame["loss"], CONVERGING_LOSS, rtol=1e-6)  # stored as float32
    assert frame.loc[frame["step"] == 10, "eval_loss"].item() == pytest.approx(0.9)
    assert "train_runtime" not in frame.columns
    assert frame.attrs["train_summary"] == {"train_runtime": 77.0}


def test_resumed_tensorboard_logs_keep_the_latest_values(tmp_path):
    logs = tmp_path / "run" / "logs"
    write_events(logs / "first", {"train/loss": [(s, 1.0) for s in range(1, 6)]}, walltime=1000)
    write_events(logs / "second", {"train/loss": [(s, 2.0) for s in range(4, 9)]}, walltime=2000)
    frame = monitor.read_run(tmp_path / "run")
    assert frame["step"].tolist() == list(range(1, 9))
    assert frame["loss"].tolist() == [1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0]


def test_both_sources_merge_with_trainer_state_winning(tmp_path):
    run = tmp_path / "run"
    write_trainer_state(run)
    scalars = tb_scalars(loss=CONVERGING_LOSS + 5, steps=np.arange(1, 33))
    scalars["train/mode/total_reward"] = [(s, 4.0) for s in range(1, 33)]
    write_events(run / "logs", scalars)
    frame = monitor.read_run(run)
    assert frame["step"].tolist() == list(range(1, 33))  # TensorBoard adds steps 31 and 32
    np.testing.assert_allclose(frame["loss"][:30], CONVERGING_LOSS)  # trainer_state values win
    assert frame["mode/total_reward"].notna().all()  # a TensorBoard-only metric fills in
    assert frame["mode/kept_positive"][:30].eq(3).all() and frame["mode/kept_positive"][30:].isna().all()
    assert frame.attrs["train_summary"]["train_runtime"] == 123.0
    assert len(frame.attrs["sources"]) == 2


@pytest.mark.parametrize("content, message", [
    (None, "no training logs: neither trainer_state.json"),
    ("{broken", "trainer_state.json: not valid JSON"),
    ('{"global_step": 1}', "key 'log_history'"),
    ('{"log_history": [{"loss": 1.0}]}', r"key 'log_history\[0\]': expected a dict with a numeric 'step'"),
])
def test_unreadable_runs_are_named(tmp_path, content, message):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "trainer_state.json").write_text(content)
    with pytest.raises(ValueError, match=f"{run}.*{message}"):
        monitor.read_run(run)


def test_missing_run_folder_is_named(tmp_path):
    with pytest.raises(ValueError, match="run folder not found"):
        monitor.read_run(tmp_path / "nope")


@pytest.mark.parametrize("loss, verdict", [
    (CONVERGING_LOSS, "converging"),
    (FALLING_LOSS, "still changing"),
    (np.where(STEPS % 2 == 0, 0.01, -0.01), "still changing"),  # mean ~ 0: spread dominates
    (CONVERGING_LOSS[:9], "too few steps"),
    ([], "too few steps"),
])
def test_convergence_verdict(loss, verdict):
    assert monitor.convergence_verdict(loss)[0] == verdict


def test_convergence_threshold_and_window_are_parameters():
    verdict, cv = monitor.convergence_verdict(FALLING_LOSS)
    assert cv == pytest.approx(np.std(FALLING_LOSS[-6:]) / np.mean(FALLING_LOSS[-6:]))
    assert monitor.convergence_verdict(FALLING_LOSS, cv_threshold=cv)[0] == "converging"
    assert monitor.convergence_verdict(FALLING_LOSS, min_points=31)[0] == "too few steps"


@pytest.mark.parametrize("steps, reward, trend", [
    ([1, 2, 3, 4], [1.0, 1.2, 1.1, 1.5], "rising"),
    ([1, 2, 3, 4], [3.0, 2.0, 2.5, 1.0], "falling"),
    ([1, 2, 3, 4], [2.0, 2.0, 2.0, 2.0], "flat"),
    ([1, 2, 3], [2.0, np.nan, np.nan], "unknown"),
])
def test_reward_trend(steps, reward, trend):
    assert monitor.reward_trend(steps, reward)[0] == trend


def test_summary_text(tmp_path):
    write_trainer_state(tmp_path / "run")
    summary = monitor.summarize_run(monitor.read_run(tmp_path / "run"), "nsr")
    assert (summary.logged_steps, summary.last_step) == (30, 30)
    assert (summary.verdict, summary.reward_trend) == ("converging", "rising")
    assert summary.final_loss == pytest.approx(CONVERGING_LOSS[-1])
    assert summary.loss_first_window == pytest.approx(CONVERGING_LOSS[:6].mean())
    assert summary.loss_change == pytest.approx(CONVERGING_LOSS[-6:].mean() - CONVERGING_LOSS[:6].mean())
    assert summary.reward_metric == "reward" and summary.reward_slope_per_step == pytest.approx(0.05)
    path = monitor.write_summary(summary, tmp_path / "out" / "nsr")
    text = path.read_text()
    assert path.name == "summary.txt"
    for expected in ("run: nsr", "logged steps: 30 (last step 30)", f"final loss: {CONVERGING_LOSS[-1]:.4g}",
                     "final learning rate: 0", "training time: 0h 02m 03s (123 s)",
                     "convergence: converging (coefficient of variation",
                     "reward trend: rising (slope +0.05 per step of 'reward')"):
        assert expected in text


def test_summary_of_a_sparse_log(tmp_path):
    write_trainer_state(tmp_path / "run", steps=STEPS[:4], loss=FALLING_LOSS[:4], reward=[1.0] * 4, runtime=None)
    frame = monitor.read_run(tmp_path / "run").drop(columns=["reward"])
    summary = monitor.summarize_run(frame, "short")
    text = monitor.format_summary(summary)
    assert summary.verdict == "too few steps" and summary.loss_cv_last_window is None
    assert "training time: unknown (no train_runtime logged)" in text
    assert "reward trend: unknown (no total reward logged)" in text


def test_compare_runs_table(tmp_path):
    write_trainer_state(tmp_path / "a")
    write_trainer_state(tmp_path / "b", loss=FALLING_LOSS, reward=RISING_REWARD[::-1])
    summaries = [monitor.summarize_run(monitor.read_run(tmp_path / name), name) for name in ("a", "b")]
    table = monitor.compare_runs(summaries)
    assert table["label"].tolist() == ["a", "b"]
    assert table["verdict"].tolist() == ["converging", "still changing"]
    assert table["reward_trend"].tolist() == ["rising", "falling"]


def test_monitor_cli_writes_summaries_comparison_and_curves(tmp_path, capsys):
    write_trainer_state(tmp_path / "runs" / "grpo")
    write_events(tmp_path / "runs" / "nsr" / "logs", tb_scalars(loss=FALLING_LOSS))
    parser = argparse.ArgumentParser()
    monitor.add_cli_arguments(parser)
    out = tmp_path / "report"
    args = parser.parse_args(["--runs", str(tmp_path / "runs" / "grpo"), str(tmp_path / "runs" / "nsr"),
                              "--labels", "GRPO", "NSR", "--out", str(out)])
    assert monitor.run_from_cli(args) == 0
    assert "convergence: converging" in (out / "GRPO" / "summary.txt").read_text()
    assert "convergence: still changing" in (out / "NSR" / "summary.txt").read_text()
    for png in (out / "GRPO" / "training_curves.png", out / "NSR" / "training_curves.png", out / "training_curves.png"):
        assert png.read_bytes()[:4] == b"\x89PNG"
    table = pd.read_csv(out / "comparison.csv")
    assert table["label"].tolist() == ["GRPO", "NSR"]
    assert table["run_dir"].tolist() == [str(tmp_path / "runs" / "grpo"), str(tmp_path / "runs" / "nsr")]
    assert table["train_runtime_s"].tolist() == [123.0, 77.0]
    assert "GRPO" in capsys.readouterr().out


@pytest.mark.parametrize("runs, labels, message", [
    (["x/run", "y/run"], None, "run labels must be unique"),
    (["x/a", "y/b"], ["a"], "1 labels for 2 runs"),
    (["x/a"], ["a/b"], "usable as folder names"),
])
def test_run_labels_are_checked(runs, labels, message):
    with pytest.raises(ValueError, match=message):
        monitor.run_labels(runs, labels)


def test_training_curves_of_a_run_are_titled_with_mode_model_and_seed(tmp_path):
    from nbhelpers.config import load_config, save_resolved_config

    run = tmp_path / "run"
    write_trainer_state(run)
    save_resolved_config(load_config(overrides={"mode": "nsr", "seed": 3}), run)
    figure = monitor.training_curves(run)
    assert figure.get_suptitle() == "nsr, tiny-pretrained, seed 3"
    assert (run / "training_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_run_title_falls_back_to_the_folder_name(tmp_path):
    write_trainer_state(tmp_path / "my-run")
    assert monitor.run_title(tmp_path / "my-run") == "my-run"
