"""Policy collapse in a training log: the format reward falls far below its start, entropy goes to about 0, or
almost every completion runs to the length limit (issue 26, item 3; 8 of 20 study runs did all three within
about 20 steps).

:func:`detect_collapse` is a pure rule over logged points (one dict per logging step, TRL's key names). It looks
only after a warm-up of ``WARMUP_POINTS`` logged points, whose format-reward mean is the baseline, and fires
when one statistic stays past its threshold for ``WINDOW_POINTS`` consecutive logged points (so one noisy step
never fires):

* format reward (``rewards/format_reward/mean``, 0 to 2) below ``FORMAT_FRACTION`` (25%) of its warm-up mean
  (a warm-up mean of 0 has nothing to fall from: the reward is never below 0);
* entropy (``entropy``, TRL's mean per-token entropy in nats) below ``ENTROPY_FLOOR`` (0.05 nats);
* clipped ratio (``completions/clipped_ratio``, the fraction of completions cut at max_completion_length) above
  ``CLIPPED_CEILING`` (0.9).

Windows count logged points, not optimizer steps: with ``logging_steps: 10`` the window spans 30 steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

FORMAT_KEY = "rewards/format_reward/mean"
ENTROPY_KEY = "entropy"
CLIPPED_KEY = "completions/clipped_ratio"
WARMUP_POINTS = 5  # logged points whose format-reward mean is the baseline; no rule looks at them
WINDOW_POINTS = 3  # consecutive logged points a statistic must stay past its threshold
FORMAT_FRACTION = 0.25  # of the warm-up mean
ENTROPY_FLOOR = 0.05  # nats
CLIPPED_CEILING = 0.9  # fraction of completions


@dataclass(frozen=True)
class CollapseEvent:
    """The first logged step at which a collapse rule holds; ``value``: the statistic's mean over the window."""

    step: int
    statistic: str  # the logged key
    value: float
    threshold: float

    def message(self) -> str:
        """One line naming the step and the statistic."""
        what = {FORMAT_KEY: "format reward", ENTROPY_KEY: "entropy", CLIPPED_KEY: "clipped-completion ratio"}
        below = self.statistic != CLIPPED_KEY
        return (f"policy collapse at step {self.step}: {what[self.statistic]} ({self.statistic}) "
                f"{self.value:.3g} {'<' if below else '>'} {self.threshold:.3g} over the last {WINDOW_POINTS} "
                "logged steps")


def _values(history: Sequence[Mapping[str, Any]], key: str) -> list[tuple[int, float]]:
    """(step, value) of the logged points that hold a finite number under ``key``."""
    out = []
    for entry in history:
        value = entry.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
                and "step" in entry:
            out.append((int(entry["step"]), float(value)))
    return out


def _first_window(points: list[tuple[int, float]], past) -> tuple[int, float] | None:
    """(step, window mean) at the end of the first run of WINDOW_POINTS points after the warm-up that are all
    ``past`` their threshold."""
    for end in range(WARMUP_POINTS + WINDOW_POINTS - 1, len(points)):
        window = [value for _, value in points[end - WINDOW_POINTS + 1:end + 1]]
        if all(past(value) for value in window):
            return points[end][0], sum(window) / len(window)
    return None


def detect_collapse(history: Sequence[Mapping[str, Any]]) -> CollapseEvent | None:
    """The earliest collapse in a training log (``trainer.state.log_history`` or rows of ``monitor.read_run``:
    dicts with ``step`` and TRL's metric keys; missing or NaN values are skipped), or None."""
    events = []
    fmt = _values(history, FORMAT_KEY)
    if len(fmt) >= WARMUP_POINTS:
        limit = FORMAT_FRACTION * sum(value for _, value in fmt[:WARMUP_POINTS]) / WARMUP_POINTS
        hit = _first_window(fmt, lambda v: v < limit)
        if hit:
            events.append(CollapseEvent(hit[0], FORMAT_KEY, hit[1], limit))
    for key, threshold, past in ((ENTROPY_KEY, ENTROPY_FLOOR, lambda v: v < ENTROPY_FLOOR),
                                 (CLIPPED_KEY, CLIPPED_CEILING, lambda v: v > CLIPPED_CEILING)):
        hit = _first_window(_values(history, key), past)
        if hit:
            events.append(CollapseEvent(hit[0], key, hit[1], threshold))
    return min(events, key=lambda e: e.step) if events else None
