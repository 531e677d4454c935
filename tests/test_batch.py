"""``python -m nbhelpers batch``: the README's main job, run once end to end on the smoke preset
(tiny-pretrained; 10_train and 20_generate for all four modes, then 30_passk, with papermill on the CPU),
with per-mode checks reading its outputs; and the batch's bookkeeping with a stand-in executor."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import nbformat
import pytest
import yaml

import nbtools
from nbhelpers import batch, cli
from nbhelpers.config import MODES, REPO_ROOT, ConfigError, load_config, resolve_parameter_file
from nbhelpers.passk import load_results

BATCH_TIMEOUT_S = 900
SMOKE = load_config([resolve_parameter_file("smoke", "presets")])
SMOKE_PROBLEMS, SMOKE_SAMPLES, SMOKE_STEPS = SMOKE.max_problems, SMOKE.n_samples, SMOKE.max_steps


# ------------------------------------------------------------------------------------------ the real batch, once
@pytest.fixture(scope="module")
def smoke_batch(tmp_path_factory):
    """(completed process, batch folder) of the four-mode smoke batch on local-cpu."""
    folder = tmp_path_factory.mktemp("batch") / "smoke"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "nbhelpers", "batch", "--preset", "smoke", "--modes", *MODES,
                             "--platform", "local-cpu", "--out", str(folder)],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=BATCH_TIMEOUT_S)
    (folder.parent / "batch.log").write_text(result.stdout + result.stderr)
    return result, folder


def smoke_run_dir(folder: Path, mode: str) -> Path:
    """The run folder the batch trains for ``mode`` (its name carries the training fingerprint)."""
    return batch.check_configs("smoke", [mode], "local-cpu", {"output_root": str(folder / "runs")})[mode].run_dir()


def _executed(folder: Path, name: str) -> nbformat.NotebookNode:
    return nbformat.read(folder / "notebooks" / f"{name}.ipynb", as_version=4)


@pytest.mark.slow
def test_batch_runs_every_notebook_and_exits_zero(smoke_batch):
    result, folder = smoke_batch
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    assert "all notebooks ran" in result.stdout
    report = json.loads((folder / "batch.json").read_text())
    assert [(s["notebook"], s["mode"]) for s in report["steps"]] == \
        [(n, m) for m in MODES for n in (batch.TRAIN, batch.GENERATE)] + [(batch.PASSK, None)]
    assert {s["status"] for s in report["steps"]} == {"ok"}


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_mode_was_trained_through_the_notebook(smoke_batch, mode):
    _, folder = smoke_batch
    notebook = _executed(folder, f"10_train_{mode}")
    assert notebook.metadata.papermill.parameters["mode"] == mode
    assert notebook.metadata.kernelspec.name == batch.KERNEL_NAME
    assert not [o for c in notebook.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert nbtools.image_outputs(notebook) >= 1  # the training curves
    run = smoke_run_dir(folder, mode)
    assert yaml.safe_load((run / "config.yaml").read_text())["config"]["mode"] == mode
    assert (run / "final" / "adapter_config.json").is_file()
    assert (run / "training_curves.png").stat().st_size > 0
    assert f"logged steps: {SMOKE_STEPS}" in (run / "summary.txt").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_mode_was_sampled_from_its_trained_model(smoke_batch, mode):
    _, folder = smoke_batch
    records = [json.loads(line) for line in (folder / "samples" / f"{mode}.jsonl").read_text().splitlines()]
    assert len(records) == SMOKE_PROBLEMS
    assert all(len(r["completions"]) == len(r["correct"]) == SMOKE_SAMPLES for r in records)
    assert {r["meta"]["method"] for r in records} == {mode}
    assert {Path(r["meta"]["checkpoint"]) for r in records} == {smoke_run_dir(folder, mode) / "final"}
    assert f"pass@{SMOKE_SAMPLES}" in nbtools.output_text(_executed(folder, f"20_generate_{mode}"))


@pytest.mark.slow
@pytest.mark.parametrize("notebook", ["10_train_grpo", "20_generate_grpo"])
def test_saved_notebooks_hold_no_widget_progress_bar(smoke_batch, notebook):
    """A widget bar is saved as its first state ("0%"); text bars and HTML tables keep their last one."""
    _, folder = smoke_batch
    outputs = [o for c in _executed(folder, notebook).cells for o in c.get("outputs", [])]
    assert not any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_mode_has_passk_results(smoke_batch, mode):
    _, folder = smoke_batch
    results = load_results(folder / "results" / f"{mode}.json")
    assert (results["method"], results["n_problems"], results["n_samples"]) == (mode, SMOKE_PROBLEMS, SMOKE_SAMPLES)
    assert list(results["pass_at_k"]) == ["1", "2", "4", "8", "16", "32"]


@pytest.mark.slow
def test_passk_notebook_compares_all_modes_against_grpo(smoke_batch):
    _, folder = smoke_batch
    notebook = _executed(folder, batch.PASSK)
    text = nbtools.output_text(notebook)
    for mode in MODES[1:]:
        assert f"{mode} - grpo (paired, {SMOKE_PROBLEMS} problems)" in text
    assert nbtools.image_outputs(notebook) >= 4  # curves, improvement, bars, the explorer's static view
    for figure in ("passk_curves.png", "improvement.png", "bars.png"):
        assert (folder / "figures" / figure).stat().st_size > 0, figure
    assert not (folder / "figures" / "passk_all.png").exists()  # the explorer's overall view is passk_curves.png


@pytest.mark.slow
def test_real_default_earns_rewards_and_the_modes_pass_at_k_differ(smoke_batch):
    """The README's promise for tiny-pretrained: non-zero rewards while training, four different curves."""
    _, folder = smoke_batch
    logs = {mode: [h for h in json.loads((smoke_run_dir(folder, mode) / "trainer_state.json").read_text())
                   ["log_history"] if "reward" in h] for mode in MODES}
    assert all(len(steps) == SMOKE_STEPS and min(h["reward"] for h in steps) > 0 for steps in logs.values()), logs
    assert any(h["rewards/accuracy_reward/mean"] > 0 for steps in logs.values() for h in steps), logs
    curves = {mode: tuple(load_results(folder / "results" / f"{mode}.json")["pass_at_k"].values()) for mode in MODES}
    assert all(curve[-1] > 0 for curve in curves.values()), curves
    assert len(set(curves.values())) == len(MODES), curves


# ------------------------------------------------------------------------------------------ bookkeeping
class FakeExecutor:
    """Stands in for papermill: records calls; fails the (notebook, mode) pairs it is given."""

    def __init__(self, failing=()):
        self.failing, self.calls = set(failing), []

    def __call__(self, notebook, output, parameters):
        self.calls.append((notebook, dict(parameters)))
        if (notebook, parameters.get("mode")) in self.failing:
            raise RuntimeError(f"{notebook} failed for {parameters.get('mode')}\nsecond line")


def test_failed_mode_is_reported_and_the_others_go_on(tmp_path):
    executor = FakeExecutor(failing={(batch.TRAIN, "psr"), (batch.GENERATE, "nsr")})
    report = batch.run_batch("smoke", list(MODES), "local-cpu", tmp_path / "b", execute=executor)
    status = {(s.notebook, s.mode): s.status for s in report.steps}
    assert status[(batch.TRAIN, "psr")] == "failed" and status[(batch.GENERATE, "psr")] == "skipped"
    assert status[(batch.GENERATE, "nsr")] == "failed"
    assert status[(batch.TRAIN, "w-reinforce")] == status[(batch.GENERATE, "w-reinforce")] == "ok"
    assert report.exit_code == 1
    passk_parameters = executor.calls[-1][1]
    assert executor.calls[-1][0] == batch.PASSK
    assert passk_parameters["labels"] == ["grpo", "w-reinforce", "passk"]
    assert passk_parameters["samples_files"] == [str(tmp_path / "b" / "samples" / f"{m}.jsonl")
                                                 for m in ("grpo", "w-reinforce", "passk")]
    assert passk_parameters["live_widgets"] is False and passk_parameters["bootstrap"] == 200
    text = batch.format_report(report)
    assert "FAILED (2)" in text and "RuntimeError: 10_train failed for psr" in text and "second line" not in text
    saved = json.loads((tmp_path / "b" / "batch.json").read_text())
    assert [s["status"] for s in saved["steps"]] == [s.status for s in report.steps]


def test_notebook_parameters_of_a_batch(tmp_path):
    executor = FakeExecutor()
    report = batch.run_batch("smoke", ["nsr"], None, tmp_path, overrides={"seed": 3}, execute=executor)
    (train, train_parameters), (generate, generate_parameters), (passk, _) = executor.calls
    assert (train, generate, passk) == (batch.TRAIN, batch.GENERATE, batch.PASSK)
    assert train_parameters == {"mode": "nsr", "preset": "smoke", "output_root": str(tmp_path / "runs"), "seed": 3}
    assert generate_parameters == {**train_parameters, "checkpoint": "run",
                                   "samples_path": str(tmp_path / "samples" / "nsr.jsonl")}
    assert report.exit_code == 0


def test_the_comparison_gets_the_configured_k_values(tmp_path):
    executor = FakeExecutor()
    batch.run_batch("smoke", ["nsr"], None, tmp_path, overrides={"passk_ks": [1, 8]}, execute=executor)
    (passk, passk_parameters) = executor.calls[-1]
    assert passk == batch.PASSK and passk_parameters["passk_ks"] == [1, 8]


def test_bad_override_stops_the_batch_before_any_notebook(tmp_path):
    executor = FakeExecutor()
    with pytest.raises(ConfigError, match="--set: unknown key 'learning_rat'"):
        batch.run_batch("smoke", list(MODES), "local-cpu", tmp_path, overrides={"learning_rat": 1},
                        execute=executor)
    assert executor.calls == [] and not (tmp_path / "notebooks").exists()


def test_cli_exit_codes_for_bad_input(tmp_path, capsys):
    assert cli.main(["batch", "--preset", "smoke", "--out", str(tmp_path), "--set", "seed=abc"]) == 2
    assert "'seed'" in capsys.readouterr().err
    assert cli.main(["batch", "--preset", "smoke", "--modes", "nsr", "nsr", "--out", str(tmp_path)]) == 2
    assert "distinct" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["batch", "--preset", "smoke", "--modes", "ppo"])


def test_default_batch_folder():
    folder = batch.batch_folder("smoke", now=datetime(2026, 1, 2, 3, 4, 5))
    assert folder == (Path.cwd() / "batches" / "smoke-20260102-030405")
    assert batch.batch_folder("smoke", "elsewhere") == Path.cwd() / "elsewhere"


def test_missing_kernel_says_how_to_install_it():
    with pytest.raises(batch.BatchError, match="ipykernel install --user"):
        batch.check_kernel("no-such-kernel-xyz")
    batch.check_kernel()  # the fixed kernel of every batch exists


# ------------------------------------------------------------------------------------------ rerunning some modes
class SamplingExecutor(FakeExecutor):
    """Also writes what the notebooks would: a samples line per sampled mode, and from 30_passk one results
    file per label and figures that list the labels they compare."""

    def __call__(self, notebook, output, parameters):
        super().__call__(notebook, output, parameters)
        if notebook == batch.GENERATE:
            Path(parameters["samples_path"]).write_text(json.dumps({"mode": parameters["mode"]}) + "\n")
        if notebook == batch.PASSK:
            for name in ("passk_curves.png", "improvement.png", "bars.png"):
                (Path(parameters["figures_dir"]) / name).write_text(" ".join(parameters["labels"]))
            for label in parameters["labels"]:
                (Path(parameters["results_dir"]) / f"{label}.json").write_text(label)


def folder_digest(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_rerunning_one_mode_keeps_the_comparison_of_all(tmp_path):
    folder = tmp_path / "b"
    first = batch.run_batch("smoke", ["grpo", "psr", "nsr"], "local-cpu", folder,
                            execute=SamplingExecutor(failing={(batch.GENERATE, "nsr")}))
    assert first.exit_code == 1
    assert (folder / "figures" / "improvement.png").read_text() == "grpo psr"
    executor = SamplingExecutor()
    again = batch.run_batch("smoke", ["nsr"], "local-cpu", folder, execute=executor)
    assert [(n, p.get("mode")) for n, p in executor.calls] == [(batch.TRAIN, "nsr"), (batch.GENERATE, "nsr"),
                                                              (batch.PASSK, None)]
    passk_parameters = executor.calls[-1][1]
    assert passk_parameters["labels"] == ["grpo", "psr", "nsr"]
    assert passk_parameters["samples_files"] == [str(folder / "samples" / f"{m}.jsonl") for m in ("grpo", "psr", "nsr")]
    for name in ("passk_curves.png", "improvement.png", "bars.png"):
        assert (folder / "figures" / name).read_text() == "grpo psr nsr", name
    assert sorted(p.name for p in (folder / "results").iterdir()) == ["grpo.json", "nsr.json", "psr.json"]
    saved = json.loads((folder / "batch.json").read_text())
    assert saved["modes"] == ["grpo", "psr", "nsr"] and again.exit_code == 0
    assert [(s["notebook"], s["mode"], s["status"]) for s in saved["steps"]] == \
        [(n, m, "ok") for m in ("grpo", "psr", "nsr") for n in (batch.TRAIN, batch.GENERATE)] + \
        [(batch.PASSK, None, "ok")]
    assert not list(folder.glob(".*-new"))


def test_a_rerun_mode_that_fails_again_is_left_out_of_the_comparison(tmp_path):
    folder = tmp_path / "b"
    batch.run_batch("smoke", ["grpo", "nsr"], "local-cpu", folder, execute=SamplingExecutor())
    executor = SamplingExecutor(failing={(batch.GENERATE, "nsr")})
    report = batch.run_batch("smoke", ["nsr"], "local-cpu", folder, execute=executor)
    assert executor.calls[-1][1]["labels"] == ["grpo"]  # nsr's file may hold a partial new sampling
    assert report.exit_code == 1


def test_a_failed_comparison_keeps_the_old_figures_and_results(tmp_path):
    folder = tmp_path / "b"
    batch.run_batch("smoke", ["grpo", "nsr"], "local-cpu", folder, execute=SamplingExecutor())
    before = {name: folder_digest(folder / name) for name in ("figures", "results")}
    report = batch.run_batch("smoke", ["nsr"], "local-cpu", folder,
                             execute=SamplingExecutor(failing={(batch.PASSK, None)}))
    assert report.exit_code == 1
    assert {name: folder_digest(folder / name) for name in ("figures", "results")} == before
    assert not list(folder.glob(".*-new"))


@pytest.mark.parametrize("preset,platform,overrides,named", [
    ("poc", "local-cpu", {}, "preset 'smoke' -> 'poc'"),
    ("smoke", "colab-a100", {}, "platform 'local-cpu' -> 'colab-a100'"),
    ("smoke", "local-cpu", {"seed": 3}, "overrides {} -> {'seed': 3}"),
])
def test_rerun_with_other_settings_is_refused_and_changes_nothing(tmp_path, capsys, preset, platform, overrides,
                                                                  named):
    folder = tmp_path / "b"
    batch.run_batch("smoke", ["grpo", "nsr"], "local-cpu", folder, execute=SamplingExecutor())
    before = folder_digest(folder)
    executor = SamplingExecutor()
    with pytest.raises(batch.BatchError, match=re.escape(named)):
        batch.run_batch(preset, ["nsr"], platform, folder, overrides=overrides, execute=executor)
    assert executor.calls == [] and folder_digest(folder) == before
    args = ["batch", "--preset", preset, "--modes", "nsr", "--platform", platform, "--out", str(folder)]
    assert cli.main(args + [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err and "Traceback" not in err
    assert folder_digest(folder) == before
