"""What training prints: one readable line per logging step, no raw log dicts, no warnings caused by
chartrl's own arguments, the summary once; and TensorBoard gets numbers only."""

from __future__ import annotations

import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
from transformers.trainer_callback import TrainerControl, TrainerState

from nbhelpers.config import load_config, resolve_parameter_file
from nbhelpers.training_callbacks import StepLineCallback, TensorBoardNumbers, format_log_line
from nbhelpers.training_setup import grpo_config
from fast_presets import TINY


LOGS = {"loss": 0.01234, "reward": 1.853, "mode/accuracy": 0.25, "mode/kept_positive": 0.0,
        "mode/kept_negative": 3.5, "mode/empty_step": 0.0, "clip_ratio/low_min": None}


@pytest.mark.parametrize("mode, step, logs, per_step, expected", [
    ("nsr", 10, LOGS, 2.1,
     "NSR [step 10/40] loss 0.01234 | reward 1.85 | accuracy 25% | kept 0 correct + 3.5 incorrect per batch | "
     "0% empty steps | 2.10 s/step, ETA 0:01:03"),
    ("psr", 40, {"loss": 0.0, "mode/empty_step": 1.0}, 0.5, "PSR [step 40/40] loss 0 | 100% empty steps | "
                                                            "0.50 s/step, ETA 0:00:00"),
    ("grpo", 1, {}, 3600.0, "GRPO [step 1/40] 3600.00 s/step, ETA 39:00:00"),
])
def test_format_log_line(mode, step, logs, per_step, expected):
    assert format_log_line(mode, step, 40, logs, per_step) == expected


def test_step_line_prints_once_per_step_and_not_the_final_summary(capsys):
    callback = StepLineCallback("nsr")
    state = TrainerState(global_step=0, max_steps=2)
    args, control = SimpleNamespace(), TrainerControl()
    callback.on_train_begin(args, state, control)
    for step, logs in [(1, LOGS), (2, LOGS), (2, LOGS), (2, {"train_runtime": 1.0, "train_loss": 0.0})]:
        state.global_step = step
        callback.on_log(args, state, control, logs=logs)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Training: steps 0 -> 2"
    assert [line.split(" loss")[0] for line in lines[1:]] == ["NSR [step 1/2]", "NSR [step 2/2]"]


def test_tensorboard_gets_no_none_values(monkeypatch):
    from transformers.integrations import integration_utils

    complaints = []
    monkeypatch.setattr(integration_utils.logger, "warning", lambda message, *a: complaints.append(message))
    written = []
    writer = SimpleNamespace(add_scalar=lambda key, value, step: written.append(key), add_text=lambda *a: None,
                             flush=lambda: None)
    callback = TensorBoardNumbers(tb_writer=writer)
    state = TrainerState(global_step=1, is_world_process_zero=True)
    callback.on_log(SimpleNamespace(), state, TrainerControl(), logs={"loss": 0.5, "clip_ratio/low_min": None})
    assert written == ["train/loss"]
    assert complaints == []  # transformers complains about (and drops) a None


def test_grpo_config_raises_no_deprecation_warning(tmp_path):
    cfg = load_config([resolve_parameter_file("smoke"), TINY], {"gradient_checkpointing": True})
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        args = grpo_config(cfg, tmp_path, "fp32", use_cpu=True, deepspeed_file=None)
    assert args.activation_checkpointing is True


@pytest.mark.parametrize("warmup_ratio,steps,warmup_steps", [(0.0, 100, 0), (0.1, 100, 10), (0.25, 10, 3),
                                                         (0.5, 3, 2)])
def test_warmup_ratio_is_a_fraction_of_the_optimizer_steps(tmp_path, warmup_ratio, steps, warmup_steps):
    """warmup_ratio reaches transformers as the fraction of all steps spent warming up (ceil), not as steps."""
    args = grpo_config(load_config([resolve_parameter_file("smoke"), TINY], {"warmup_ratio": warmup_ratio}),
                       tmp_path, "fp32", use_cpu=True, deepspeed_file=None)
    assert args.get_warmup_steps(steps) == warmup_steps


@pytest.mark.slow
def test_cli_training_output_is_quiet_and_readable(tmp_path):
    out = subprocess.run([sys.executable, "-m", "nbhelpers", "train", "--preset", "smoke", "--params", str(TINY),
                          "--params", "psr", "--platform", "local-cpu", "--set", f"output_root={tmp_path}"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout + out.stderr
    for unwanted in ("{'loss'", "attempting to log a value of \"None\"", "`gradient_checkpointing` is deprecated",
                     "`is_gradient_checkpointing` is deprecated", "Could not find a config file"):
        assert unwanted not in text, unwanted
    for step in (1, 2):
        assert text.count(f"PSR [step {step}/2] loss") == 1, text
    assert text.count("logged steps: 2") == 1  # the summary, once
