"""The notebooks (stored clean, a parameters cell, short calls explained by markdown, parameters
listed by papermill), the notebook helpers they call (runtime, install, drive, params, sampling_setup, comparison, launch), and headless runs: 00_setup, a bad
parameter stopping 10_train in its configuration step, and the accelerate launch path. 10_train,
20_generate and 30_passk run for all four modes in tests/test_batch.py."""

from __future__ import annotations

import importlib.metadata
import io
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

import nbtools
from nbhelpers import comparison, drive, install, launch, params, runtime, sampling_setup
from nbhelpers.config import FIELDS, REPO_ROOT, ConfigError, load_config
from nbhelpers.platform import GPUInfo, PlatformInfo, detect_platform
from nbhelpers.sync import write_manifest
from fast_presets import TINY

SAMPLING_KEYS = {"eval_dataset", "eval_split", "n_samples", "max_problems", "sample_temperature", "sample_top_p",
                 "sample_max_new_tokens", "sample_chunk_size", "passk_ks", "bootstrap", "eval_max_pixels"}
FILE_PARAMETERS = {"mode", "preset", "platform", "params_files"}
MAX_CALL_CELL_LINES = 6


# ------------------------------------------------------------------------------------------ stored notebooks
@pytest.fixture(scope="module", params=nbtools.NOTEBOOK_NAMES)
def stored(request):
    return request.param, nbtools.read_notebook(request.param)


def test_stored_without_outputs_and_for_the_python3_kernel(stored):
    name, notebook = stored
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code, name
    assert all(c.outputs == [] and c.execution_count is None for c in code), f"{name} has outputs"
    assert notebook.metadata.kernelspec.name == "python3"
    assert notebook.metadata.language_info.name == "python"


def test_parameters_cell_is_the_first_code_cell(stored):
    name, notebook = stored
    first_code = next(c for c in notebook.cells if c.cell_type == "code")
    assert nbtools.parameters_cell(notebook) is first_code, name


def test_every_code_cell_is_a_short_call_after_a_markdown_explanation(stored):
    name, notebook = stored
    parameters = nbtools.parameters_cell(notebook)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        assert index > 0 and notebook.cells[index - 1].cell_type == "markdown", f"{name} cell {index}"
        assert notebook.cells[index - 1].source.strip(), f"{name} cell {index - 1} is an empty markdown cell"
        if cell is parameters:
            continue
        lines = cell.source.splitlines()
        assert len(lines) <= MAX_CALL_CELL_LINES, f"{name} cell {index}: {len(lines)} lines"
        assert not any(line.lstrip().startswith(("def ", "class ", "for ", "while ")) for line in lines), \
            f"{name} cell {index} holds logic"


def test_get_code_cell_is_the_same_in_every_notebook():
    heads = set()
    for name in nbtools.NOTEBOOK_NAMES:
        cells = [c.source for c in nbtools.read_notebook(name).cells if "find_spec" in c.source]
        assert len(cells) == 1, name
        heads.add(cells[0].split("from nbhelpers import")[0])
    assert len(heads) == 1
    assert "git clone" in heads.pop()


def test_train_parameters_are_every_training_key():
    names = nbtools.parameter_names(nbtools.read_notebook("10_train"))
    assert len(names) == len(set(names))
    assert set(names) == FILE_PARAMETERS | (set(FIELDS) - SAMPLING_KEYS - {"mode"})


def test_generate_parameters_are_configuration_keys_or_sampling_inputs():
    names = set(nbtools.parameter_names(nbtools.read_notebook("20_generate")))
    extra = names - set(FIELDS) - FILE_PARAMETERS
    assert extra == {"checkpoint", "method", "samples_path"}
    assert SAMPLING_KEYS - {"passk_ks", "bootstrap"} <= names


@pytest.mark.parametrize("name", nbtools.NOTEBOOK_NAMES)
def test_papermill_help_lists_every_parameter(name):
    result = subprocess.run([sys.executable, "-m", "papermill", "--help-notebook",
                             str(nbtools.NOTEBOOKS_DIR / f"{name}.ipynb")],
                            capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    text = result.stdout + result.stderr
    assert result.returncode == 0, text
    assert "Unable to parse" not in text
    listed = {line.split(":")[0].strip() for line in result.stdout.splitlines() if line.startswith("  ")
              and ":" in line and not line.startswith("   ")}
    names = nbtools.parameter_names(nbtools.read_notebook(name))
    assert names and set(names) <= listed, set(names) - listed


# ------------------------------------------------------------------------------------------ params: configuration
def test_notebook_config_applies_mode_preset_platform_then_parameters():
    cfg = params.notebook_config("nsr", "smoke", "local-cpu", subset_size=4, learning_rate=None)
    assert (cfg.mode, cfg.vlm_name, cfg.dtype, cfg.subset_size) == ("nsr", "tiny-pretrained", "fp32", 4)
    assert cfg.learning_rate == 0.002  # None keeps the preset's value
    assert cfg._sources["subset_size"] == params.PARAMETER_SOURCE
    assert cfg._sources["mode"].endswith("modes/nsr.yaml")
    assert cfg._sources["dtype"].endswith("platforms/local-cpu.yaml")


def test_notebook_config_extra_files_apply_after_the_platform_file(tmp_path):
    extra = tmp_path / "mine.yaml"
    extra.write_text("dtype: bf16\nseed: 7\n")
    cfg = params.notebook_config("grpo", "smoke", "local-cpu", params_files=str(extra), seed=9)
    assert (cfg.dtype, cfg.seed) == ("bf16", 9)


def test_notebook_config_detects_the_platform_when_none_is_given():
    files = params.parameter_files("grpo", "smoke", None)
    assert files[-1].parent.name == "platforms"
    assert files[-1].stem in ("local-cpu", "colab-a100", "kaggle-2xt4")


BAD_PARAMETERS = [  # notebook_config arguments, words the ConfigError must contain
    ({"mode": "grpoo"}, ["'mode'", "grpoo", "grpo, nsr, passk, psr, w-reinforce"]),
    ({"mode": 3}, ["'mode'", "int"]),
    ({"preset": "huge"}, ["'preset'", "huge", "smoke"]),
    ({"platform": "tpu"}, ["'platform'", "tpu", "local-cpu"]),
    ({"learning_rat": 0.1}, ["notebook parameter", "unknown key 'learning_rat'", "learning_rate"]),
    ({"subset_size": "many"}, ["notebook parameter", "'subset_size'", "expects int"]),
    ({"lambda_psr": 2.0}, ["notebook parameter", "'lambda_psr'", "(0, 1]"]),
    ({"mode": "passk", "passk_k": 4}, ["notebook parameter", "'passk_k'", "below num_generations = 4"]),
]


@pytest.mark.parametrize("arguments,words", BAD_PARAMETERS)
def test_notebook_config_errors_name_the_key(arguments, words):
    arguments = {"mode": "grpo", "preset": "smoke", "platform": "local-cpu", **arguments}
    with pytest.raises(ConfigError) as info:
        params.notebook_config(**arguments)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_notebook_parameters_are_the_plain_globals():
    namespace = {"mode": "psr", "subset_size": 4, "_hidden": 1, "params": params, "Path": Path,
                 "helper": lambda: None, "checkpoint": "run", "exit": print}
    assert params.notebook_parameters(namespace) == {"mode": "psr", "subset_size": 4, "checkpoint": "run"}
    assert params.notebook_parameters(namespace, exclude=["checkpoint"]) == {"mode": "psr", "subset_size": 4}


@pytest.mark.parametrize("dataset,subset,expected", [
    ("synthetic", 8, "2 steps in total"),  # smoke caps at max_steps 2
    ("chart-rvr-train", None, "34194 problems"),
    ("chart-rvr-train", 100, "100 problems"),
    ("chartqa", None, "known once the data loads"),
])
def test_training_estimate(dataset, subset, expected):
    cfg = load_config([], {"dataset_name": dataset, "subset_size": subset,
                           "max_steps": 2 if dataset == "synthetic" else -1})
    assert expected in params.training_estimate(cfg)


# ------------------------------------------------------------------------------------------ runtime, install, drive
@pytest.mark.parametrize("gpus,preset", [
    ([], "smoke"),
    ([GPUInfo("small", 8.0, (8, 6))], "smoke"),
    ([GPUInfo("Tesla T4", 14.6, (7, 5)), GPUInfo("Tesla T4", 14.6, (7, 5))], "poc"),
    ([GPUInfo("NVIDIA A100-SXM4-40GB", 39.4, (8, 0))], "poc"),
])
def test_recommended_preset(gpus, preset):
    platform = PlatformInfo("local", gpus)
    assert runtime.recommend_preset(platform) == preset
    assert f'preset = "{preset}"' in runtime.recommendation(platform)


def test_environment_report_names_memory_and_dtype():
    report = runtime.environment_report(PlatformInfo("kaggle", [GPUInfo("Tesla T4", 14.6, (7, 5))]))
    assert "fp16" in report and "Tesla T4" in report and "RAM:" in report and "/kaggle/working" in report


class FakePip:
    def __init__(self, returncode=0):
        self.returncode, self.calls = returncode, []

    def __call__(self, command, **kwargs):
        self.calls.append(command)
        return subprocess.CompletedProcess(command, self.returncode, "out", "pip error text")


def test_install_requirements_runs_pip_once_per_runtime_on_colab(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("pyyaml==6.0.3\n")
    pip = FakePip()
    assert install.install_requirements("colab", requirements=requirements, marker_dir=tmp_path / "m", run=pip)
    assert not install.install_requirements("colab", requirements=requirements, marker_dir=tmp_path / "m", run=pip)
    assert pip.calls == [[sys.executable, "-m", "pip", "install", "-q", "-r", str(requirements)]]
    requirements.write_text("pyyaml==6.0.3\ntqdm==4.70.1\n")  # a changed file installs again
    assert install.install_requirements("kaggle", requirements=requirements, marker_dir=tmp_path / "m", run=pip)


@pytest.mark.parametrize("platform,enabled", [("local", True), ("colab", False)])
def test_install_requirements_does_nothing_locally_or_when_disabled(tmp_path, platform, enabled):
    pip = FakePip()
    assert not install.install_requirements(platform, enabled, marker_dir=tmp_path, run=pip)
    assert pip.calls == []


def test_install_requirements_failure_shows_pip_output(tmp_path):
    with pytest.raises(RuntimeError, match="pip error text"):
        install.install_requirements("kaggle", marker_dir=tmp_path, run=FakePip(returncode=1))
    assert not list(tmp_path.iterdir())  # no marker: the next run tries again


def test_mount_drive_locally_mounts_nothing(capsys):
    assert drive.mount_drive(PlatformInfo("local")) is None
    assert "./runs" in capsys.readouterr().out


def test_check_imports_names_every_failure():
    with pytest.raises(ImportError) as info:
        install.check_imports({"yaml": "pyyaml", "no_such_module_xyz": "nothing"}, package_modules=("config", "nope"))
    assert "no_such_module_xyz" in str(info.value) and "nbhelpers.nope" in str(info.value)
    assert install.check_imports({"yaml": "pyyaml"}, package_modules=("config",)) == {
        "yaml": importlib.metadata.version("pyyaml"), "nbhelpers.config": "ok"}


# ------------------------------------------------------------------------------------------ sampling_setup
@pytest.fixture
def smoke_cfg(tmp_path):
    return params.notebook_config("psr", "smoke", "local-cpu", output_root=str(tmp_path / "runs"))


def test_checkpoint_none_is_the_base_model(smoke_cfg, tmp_path):
    plan = sampling_setup.sampling_plan(smoke_cfg, None)
    assert (plan.checkpoint, plan.method) == (None, "base")
    assert plan.samples_path == Path("samples/base_synthetic_n32.jsonl")


def test_checkpoint_run_is_the_final_model_of_the_trained_run(smoke_cfg):
    with pytest.raises(FileNotFoundError, match="psr_tiny-pretrained_synthetic_n16_s42"):
        sampling_setup.resolve_checkpoint(smoke_cfg, "run")
    (smoke_cfg.run_dir() / "final").mkdir(parents=True)
    plan = sampling_setup.sampling_plan(smoke_cfg, "run", samples_path="s.jsonl")
    assert plan.checkpoint == str(smoke_cfg.run_dir() / "final")
    assert (plan.method, plan.samples_path) == ("psr", Path("s.jsonl"))


def test_checkpoint_of_an_unfinished_run_is_its_newest_complete_checkpoint(smoke_cfg):
    run = smoke_cfg.run_dir()
    for step in (1, 2, 3):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        (run / f"checkpoint-{step}" / "adapter_model.safetensors").write_bytes(b"x" * step)
    write_manifest(run / "checkpoint-1")
    write_manifest(run / "checkpoint-2")  # checkpoint-3 has no manifest: incomplete
    assert sampling_setup.resolve_checkpoint(smoke_cfg, str(run)) == str(run / "checkpoint-2")
    assert sampling_setup.resolve_checkpoint(smoke_cfg, str(run / "checkpoint-1")) == str(run / "checkpoint-1")


# ------------------------------------------------------------------------------------------ comparison: Pass@k
@pytest.fixture
def two_methods(tmp_path):
    return [str(nbtools.write_samples(tmp_path / f"{m}.jsonl", m, share, seed=i))
            for i, (m, share) in enumerate([("nsr", 0.3), ("grpo", 0.6)])]


def test_load_methods_from_samples_writes_results_and_keeps_problems(two_methods, tmp_path):
    from nbhelpers.passk import load_results

    methods = comparison.load_methods(two_methods, bootstrap=50, results_dir=tmp_path / "results")
    assert methods.labels == ["nsr", "grpo"]
    assert load_results(tmp_path / "results" / "grpo.json")["pass_at_k"] == methods.results[1]["pass_at_k"]
    assert set(methods.problems) == {"nsr", "grpo"}
    frame = comparison.passk_frame(methods)
    assert list(frame.columns) == ["pass@1", "pass@2", "pass@4", "pass@8"]
    assert list(frame.index) == ["nsr", "nsr chance floor", "grpo", "grpo chance floor"]
    assert frame.loc["grpo", "pass@1"] > frame.loc["nsr", "pass@1"]  # 60% vs 30% correct samples
    assert frame.loc["grpo chance floor", "pass@8"] == round(100 * methods.results[1]["chance_floor"]["8"], 2)
    assert comparison.baseline_label(methods, None) == "grpo"
    assert "nsr - grpo (paired, 6 problems)" in comparison.paired_comparisons(methods, "grpo", bootstrap=50)
    assert "grpo (synthetic)" in comparison.passk_tables(methods)


def test_method_labels_must_be_unique(two_methods):
    with pytest.raises(ValueError, match="unique"):
        comparison.load_methods(two_methods, labels=["same", "same"], bootstrap=10)


def test_load_methods_from_results_has_no_paired_comparison(two_methods, tmp_path):
    comparison.load_methods(two_methods, labels=["a", "b"], bootstrap=20, results_dir=tmp_path)
    methods = comparison.load_methods(results_files=[tmp_path / "a.json", tmp_path / "b.json"])
    assert methods.labels == ["a", "b"] and methods.problems == {}
    assert "need samples files" in comparison.paired_comparisons(methods, "a")


@pytest.mark.parametrize("arguments,message", [
    ({}, "exactly one of"),
    ({"samples_files": ["a"], "results_files": ["b"]}, "exactly one of"),
    ({"samples_files": ["a", "b"], "labels": ["x"]}, "1 labels for 2 files"),
])
def test_load_methods_rejects_ambiguous_inputs(arguments, message):
    with pytest.raises(ValueError, match=message):
        comparison.load_methods(**arguments)


@pytest.mark.parametrize("ks,given,expected", [
    (["1", "2", "4", "8"], None, [1, 4, 8]),
    (["1", "2", "4", "8", "16", "32", "64", "128", "256"], None, [1, 16, 256]),
    (["1"], None, [1]),
    (["1", "2", "4", "8"], [2, 8], [2, 8]),
])
def test_bar_ks(ks, given, expected):
    methods = comparison.Methods(["a"], [{"pass_at_k": {k: 0.5 for k in ks}}])
    assert comparison.bar_ks(methods, given) == expected


def test_baseline_must_be_a_method():
    methods = comparison.Methods(["psr", "nsr"], [{}, {}])
    assert comparison.baseline_label(methods, None) == "psr"
    with pytest.raises(ValueError, match="'grpo' is not one of"):
        comparison.baseline_label(methods, "grpo")


def test_improvement_needs_a_second_method(two_methods, tmp_path):
    methods = comparison.load_methods(two_methods, bootstrap=10)
    figure = comparison.plot_improvement(methods, "grpo", save_to=tmp_path / "improvement.png")
    assert [line.get_label() for line in figure.axes[0].get_lines()][0] == "nsr"
    assert len(figure.axes[0].collections) == 1  # the paired 95% band of nsr - grpo
    assert (tmp_path / "improvement.png").stat().st_size > 0
    alone = comparison.Methods(methods.labels[:1], methods.results[:1])
    assert comparison.plot_improvement(alone, "nsr") is None
    from_results = comparison.Methods(methods.labels, methods.results)  # no per-problem counts: bare lines
    assert len(comparison.plot_improvement(from_results, "grpo").axes[0].collections) == 0


def test_figure_path():
    assert comparison.figure_path(None, "a.png") is None
    assert comparison.figure_path("figs", "a.png") == Path("figs/a.png")


# ------------------------------------------------------------------------------------------ launch
@pytest.mark.parametrize("processes,deepspeed,config_file", [
    (2, "zero3", "zero3-2gpu.yaml"), (2, None, "multi-gpu.yaml"), (1, "zero3", "zero3-1gpu.yaml"),
    (1, "none", "single.yaml"),
])
def test_launch_command(processes, deepspeed, config_file):
    command = launch.launch_command("run/launch-params.yaml", processes, deepspeed)
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert Path(command[command.index("--config_file") + 1]).name == config_file
    assert command[command.index("--num_processes") + 1] == str(processes)
    assert command[-5:] == ["-m", "nbhelpers", "train", "--params", "run/launch-params.yaml"]


def test_launch_params_reproduce_the_configuration(tmp_path):
    cfg = params.notebook_config("w-reinforce", "smoke", "kaggle-2xt4", lambda_psr=0.3,
                                  output_root=str(tmp_path))
    path = launch.write_launch_params(cfg, tmp_path / "run")
    assert load_config([path]).to_dict() == cfg.to_dict()


def test_launch_env_puts_the_repository_first():
    env = launch.launch_env({"PYTHONPATH": "/elsewhere"})
    assert env["PYTHONPATH"].split(":") == [str(REPO_ROOT), "/elsewhere"]
    assert launch.launch_env({})["PYTHONPATH"] == str(REPO_ROOT)


def test_run_streaming_copies_output_as_it_comes_and_returns_the_code(tmp_path):
    script = "import sys, time\nprint('first', flush=True)\nsys.stderr.write('progress 50%\\r'); sys.stderr.flush()\n" \
             "print('second', flush=True)\nsys.exit(3)"
    out = io.StringIO()
    code = launch.run_streaming([sys.executable, "-c", script], log_path=tmp_path / "launch.log", out=out)
    assert code == 3
    assert out.getvalue() == "first\nprogress 50%\rsecond\n"
    assert (tmp_path / "launch.log").read_bytes().decode() == out.getvalue()


def test_launch_training_raises_with_the_log_on_failure(smoke_cfg, capsys):
    calls = []

    def fake_run(command, log_path, env):
        calls.append((command, log_path))
        return 0 if len(calls) == 1 else 1

    assert launch.launch_training(smoke_cfg, run=fake_run) == smoke_cfg.run_dir()
    assert "accelerate.commands.launch" in capsys.readouterr().out
    assert calls[0][1] == smoke_cfg.run_dir() / launch.LAUNCH_LOG
    with pytest.raises(launch.LaunchError, match="code 1.*launch.log"):
        launch.launch_training(smoke_cfg, run=fake_run)


def test_train_runs_in_process_on_one_device(smoke_cfg, monkeypatch):
    import nbhelpers.training_run

    monkeypatch.setattr(nbhelpers.training_run, "train", lambda cfg: ("in-process", cfg.mode))
    monkeypatch.setattr(launch, "launch_training", lambda cfg: ("launched", cfg.mode))
    assert launch.train(smoke_cfg) == ("in-process", "psr")
    smoke_cfg.num_processes = 2
    assert launch.train(smoke_cfg) == ("launched", "psr")


# ------------------------------------------------------------------------------------------ headless runs
@pytest.mark.slow
@pytest.mark.parametrize("parameter,value,words", [
    ("mode", "grpoo", ["'mode'", "grpoo"]),
    ("learning_rat", 0.1, ["unknown key 'learning_rat'"]),
    ("subset_size", "many", ["'subset_size'", "expects int"]),
])
def test_bad_parameter_stops_train_notebook_in_its_configuration_step(tmp_path, parameter, value, words):
    from papermill.exceptions import PapermillExecutionError

    runs = tmp_path / "runs"
    output = tmp_path / "10_train.ipynb"
    with pytest.raises(PapermillExecutionError) as info:
        nbtools.execute("10_train", output, {"mode": "grpo", "preset": "smoke", "platform": "local-cpu",
                                             "output_root": str(runs), parameter: value})
    assert info.value.ename == "ConfigError"
    for word in words:
        assert word in info.value.evalue
    executed = nbtools.executed_code_cells(nbformat.read(output, as_version=4))
    assert "notebook_config" in executed[-1].source  # the configuration cell failed, nothing after it ran
    assert not runs.exists()


@pytest.mark.slow
def test_setup_notebook_runs_locally(tmp_path):
    notebook = nbtools.execute("00_setup", tmp_path / "00_setup.ipynb", {})
    text = nbtools.output_text(notebook)
    assert "local machine: nothing installed" in text
    assert f'platform = "{detect_platform().recommended_platform_file}"' in text
    assert "nbhelpers.trainer" in text and "torch" in text


@pytest.mark.slow
def test_launch_training_through_accelerate_on_cpu(tmp_path):
    cfg = params.notebook_config("nsr", "smoke", "local-cpu", params_files=str(TINY),
                                  output_root=str(tmp_path / "runs"))
    out = io.StringIO()
    run_dir = launch.launch_training(cfg, run=lambda command, **kw: launch.run_streaming(command, out=out, **kw))
    assert (run_dir / "final" / "adapter_config.json").is_file()
    state = json.loads((run_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert f"run folder: {run_dir}" in out.getvalue()  # printed by the launched `python -m nbhelpers train`
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["config"] == cfg.to_dict()
    assert (run_dir / launch.LAUNCH_LOG).read_bytes().decode() == out.getvalue()
