"""The rollout engine's one-time warnings and its environment switches (read at use, not at import)."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("nbhelpers.rollout")

FALLBACK_ENV = "CHARTRL_ROLLOUT_FALLBACK"  # plain: no Triton/compiled kernels; stock: no engine at all
FALLBACK_CHOICES = ("plain", "stock")
WEIGHTS_ENV = "CHARTRL_ROLLOUT_WEIGHTS"  # fused | adapters | modules (default: fused where memory allows)
WEIGHTS_CHOICES = ("fused", "adapters", "modules")

_warned_reasons: set[str] = set()


def warn_once(reason: str) -> None:
    """logging.warning once per distinct reason (per process)."""
    if reason not in _warned_reasons:
        _warned_reasons.add(reason)
        log.warning(reason)


def _choice(name: str, choices: tuple[str, ...]) -> str | None:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return None
    if value not in choices:
        raise ValueError(f"environment variable {name} must be one of {', '.join(choices)} (or unset), got '{value}'")
    return value


def forced_fallback() -> str | None:
    """None, 'plain' (engine without its Triton and compiled kernels) or 'stock' (stock generate), from the env."""
    return _choice(FALLBACK_ENV, FALLBACK_CHOICES)


def forced_weights_mode() -> str | None:
    """None or the decode-weights mode forced through the environment (see :mod:`.weights`)."""
    return _choice(WEIGHTS_ENV, WEIGHTS_CHOICES)
