"""What a training run prints and logs besides TRL's own: one console line per logging step, a warning when
the policy collapses, TensorBoard without None values, and the terminal progress bar without its raw log dict."""

from __future__ import annotations

import logging
import time
from typing import Any

from tqdm import tqdm
from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import ProgressCallback

from .collapse import detect_collapse
from .trainer import NONFINITE_KEY

log = logging.getLogger(__name__)


def format_log_line(mode: str, step: int, max_steps: int, logs: dict[str, Any], seconds_per_step: float) -> str:
    """One console line per logging step, e.g. ``NSR [step 10/40] loss 0.012 | reward 1.85 | accuracy 25% |
    kept 0 correct + 3.5 incorrect per batch | 0% empty steps | 2.10 s/step, ETA 0:01:03``. Rewards and
    kept counts are means over the logging window; missing values are left out."""
    parts = []
    if "loss" in logs:
        parts.append(f"loss {logs['loss']:.4g}")
    if "reward" in logs:
        parts.append(f"reward {logs['reward']:.2f}")
    if "mode/accuracy" in logs:
        parts.append(f"accuracy {logs['mode/accuracy']:.0%}")
    if "mode/kept_positive" in logs and "mode/kept_negative" in logs:
        parts.append(f"kept {logs['mode/kept_positive']:.3g} correct + {logs['mode/kept_negative']:.3g} incorrect "
                     "per batch")
    if "mode/empty_step" in logs:
        parts.append(f"{logs['mode/empty_step']:.0%} empty steps")
    if logs.get(NONFINITE_KEY):
        parts.append(f"{logs[NONFINITE_KEY]:.0f} non-finite steps skipped")
    remaining = max(max_steps - step, 0) * seconds_per_step
    parts.append(f"{seconds_per_step:.2f} s/step, ETA {_hms(remaining)}")
    return f"{mode.upper()} [step {step}/{max_steps}] " + " | ".join(parts)


class StepLineCallback(TrainerCallback):
    """Prints the step range before training and :func:`format_log_line` at each logging step (once per
    step: the end-of-training summary log at the same step prints nothing)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.start: float | None = None
        self.start_step = 0
        self.printed_step: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.start_step = time.monotonic(), state.global_step
        if state.is_world_process_zero:
            print(f"Training: steps {state.global_step} -> {state.max_steps}", flush=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        done = state.global_step - self.start_step
        if not state.is_world_process_zero or self.start is None or done <= 0 \
                or state.global_step == self.printed_step or "train_runtime" in (logs or {}):
            return
        self.printed_step = state.global_step
        per_step = (time.monotonic() - self.start) / done
        line = format_log_line(self.mode, state.global_step, state.max_steps, logs or {}, per_step)
        tqdm.write(line)  # above a running terminal bar instead of through it


class CollapseWarningCallback(TrainerCallback):
    """Prints one warning line, once per training session, when :func:`nbhelpers.collapse.detect_collapse` finds a
    policy collapse in the log history (naming the step and the statistic)."""

    def __init__(self) -> None:
        self.warned = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.warned or not state.is_world_process_zero:
            return
        event = detect_collapse(state.log_history)
        if event is not None:
            self.warned = True
            log.warning("%s", event.message())


class TensorBoardNumbers(TensorBoardCallback):
    """TensorBoard logging without the values TRL logs as None (a metric with no valid value in the
    window, such as clip_ratio/low_min of a psr step with no kept token), which a scalar cannot hold."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        numbers = {key: value for key, value in (logs or {}).items() if value is not None}
        return super().on_log(args, state, control, logs=numbers, **kwargs)


class QuietProgressCallback(ProgressCallback):
    """transformers' terminal progress bar without its raw log dict (StepLineCallback prints a readable line)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return None


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


__all__ = ["CollapseWarningCallback", "QuietProgressCallback", "StepLineCallback", "TensorBoardNumbers",
           "format_log_line"]
