"""The training path every platform file takes (issue 26, item 4): rollout engine, dtypes, DeepSpeed, processes,
resolved before any model loads; and ``train --dry-run``, which prints it and exits."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nbhelpers import rollout
from nbhelpers.config import REPO_ROOT, ConfigError, load_config, parameter_names, resolve_parameter_file
from nbhelpers.platform import GPUInfo, PlatformInfo, resolve_training_path

A100 = GPUInfo("NVIDIA A100-SXM4-40GB", 39.4, (8, 0))
T4 = GPUInfo("Tesla T4", 14.7, (7, 5))
# The machine each platform file is written for.
MACHINES = {"colab-a100": PlatformInfo("colab", [A100]), "kaggle-2xt4": PlatformInfo("kaggle", [T4, T4]),
            "local-cpu": PlatformInfo("local", [])}
FIELDS = ("processes", "dtype", "weights_dtype", "master_dtype", "deepspeed", "offload", "engine")
PATHS = {  # (platform file, finetune): the path's FIELDS, with the deepspeed package installed on GPU machines
    ("colab-a100", "lora"): (1, "bf16", "bf16", "fp32", "none", "none", "fast"),
    ("colab-a100", "full"): (1, "bf16", "bf16", "fp32", "zero3", "cpu", "stock"),
    ("kaggle-2xt4", "lora"): (2, "fp16", "fp16", "fp32", "none", "none", "fast"),
    ("kaggle-2xt4", "full"): (2, "fp16", "fp16", "fp32", "zero3", "none", "stock"),
    ("local-cpu", "lora"): (1, "fp32", "fp32", "fp32", "none", "none", "fast"),
    ("local-cpu", "full"): (1, "fp32", "fp32", "fp32", "none", "none", "fast"),
}


def platform_config(name: str, **overrides):
    return load_config([resolve_parameter_file(name, "platforms")], overrides)


@pytest.fixture(autouse=True)
def no_forced_fallback(monkeypatch):
    for name in (rollout.FALLBACK_ENV, "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)


def test_every_platform_file_is_in_the_table():
    assert {name for name, _ in PATHS} == set(parameter_names("platforms")) == set(MACHINES)


@pytest.mark.parametrize("name, finetune", list(PATHS))
def test_the_path_of_each_platform_file(name, finetune):
    path = resolve_training_path(platform_config(name, finetune=finetune), MACHINES[name], deepspeed_installed=True)
    assert tuple(getattr(path, field) for field in FIELDS) == PATHS[name, finetune]
    line = path.line()
    assert "\n" not in line and line.startswith("Training path: ")
    assert ("fast engine" in line) == (path.engine == "fast") and ("ZeRO-3" in line) == (path.deepspeed == "zero3")
    assert f"{path.processes} process" in line and path.dtype in line
    if path.engine != "fast":
        assert "needs the full weights" in line


@pytest.mark.parametrize("overrides, installed, expected", [
    # full fine-tuning without DeepSpeed: fp32 masters under bf16 autocast, the engine on bf16 copies
    ({"finetune": "full", "deepspeed": "none"}, True, ("fp32", "fp32", "none", "fast")),
    ({"finetune": "full"}, False, ("fp32", "fp32", "none", "fast")),  # zero3 resolved, no deepspeed package
    ({"finetune": "lora", "deepspeed": "zero3"}, True, ("bf16", "fp32", "zero3", "stock")),
    ({"finetune": "lora", "rollout_engine": "stock"}, True, ("bf16", "fp32", "none", "stock")),
])
def test_the_path_follows_the_keys_and_the_machine(overrides, installed, expected):
    path = resolve_training_path(platform_config("colab-a100", **overrides), MACHINES["colab-a100"], installed)
    assert (path.weights_dtype, path.master_dtype, path.deepspeed, path.engine) == expected
    if not installed:
        assert "not installed" in path.line() and "fp32 master weights" in path.line()
    if path.weights_dtype != path.dtype:
        assert "on bf16 copies of the weights" in path.line()


def test_a_forced_stock_fallback_turns_the_engine_off_with_its_reason(monkeypatch):
    monkeypatch.setenv(rollout.FALLBACK_ENV, "stock")
    path = resolve_training_path(platform_config("local-cpu"), MACHINES["local-cpu"])
    assert path.engine == "stock" and "forces stock generation" in path.line()


@pytest.mark.parametrize("name, overrides, key", [
    ("colab-a100", {"finetune": "full", "rollout_engine": "fast"}, "rollout_engine"),  # ZeRO-3 partitions weights
    ("kaggle-2xt4", {"dtype": "bf16"}, "dtype"),  # the T4 has no bf16
])
def test_a_path_that_cannot_run_is_a_config_error_naming_the_key(name, overrides, key):
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        resolve_training_path(platform_config(name, **overrides), MACHINES[name], deepspeed_installed=True)


# ------------------------------------------------------------------------------------------ train --dry-run
RUNNER = ("import sys\nfrom nbhelpers.cli import main\ncode = main(sys.argv[1:])\n"
          "print('imported:', [m for m in ('transformers', 'trl', 'peft') if m in sys.modules])\nsys.exit(code)\n")


def test_dry_run_prints_the_path_configuration_and_estimate_and_loads_nothing(tmp_path):
    arguments = ["train", "--dry-run", "--preset", "smoke", "--platform", "colab-a100", "--set", "finetune=full",
                 "--set", "vlm_name=qwen2-5-3b", "--set", f"output_root={tmp_path / 'runs'}"]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env.pop(rollout.FALLBACK_ENV, None)
    out = subprocess.run([sys.executable, "-c", RUNNER, *arguments], capture_output=True, text=True, cwd=tmp_path,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    cfg = load_config([resolve_parameter_file("smoke", "presets"), resolve_parameter_file("colab-a100", "platforms")],
                      ["finetune=full", "vlm_name=qwen2-5-3b", f"output_root={tmp_path / 'runs'}"])
    lines = out.stdout.splitlines()
    assert lines[0] == resolve_training_path(cfg).line()  # this machine's path, as training prints it
    assert "Resolved configuration" in lines[1] and any('"full"' in line for line in lines)
    assert any(line.startswith("Estimate: 16 problems") and "8 steps in total" in line for line in lines)
    assert lines[-1] == "imported: []"  # no model library, so no model
    assert not (tmp_path / "runs").exists()
