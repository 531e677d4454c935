"""Does the paper's pattern hold? Explicit rules over Pass@k estimates and paired differences.

Zhu et al. 2025 (arXiv 2506.01347) report, on MATH: PSR best or near best at k = 1 but worst at large k; NSR
near GRPO at k = 1 and best or tied at large k; W-REINFORCE best or near best overall. Here each phrase is a rule:

* near(a, b, k): the paired difference a - b at k is within ``near_pp`` percentage points, or its 95% interval
  contains 0 (the data cannot tell them apart). "Tied" means near.
* best or near best(m, k): m has the highest Pass@k at k, or is near the mode that has it.
* worst(m, k): m has the lowest Pass@k at k and is not near the next lowest (clearly below every other mode).
* large k: the largest k evaluated; "overall": at every k evaluated.

The pattern holds when all five claims hold; otherwise it does not, and the failing claims say why.
Inputs: ``estimates[mode][k]`` (fractions) and ``pairs[(a, b)][k] = (difference, low, high)`` (fractions, a - b
with its 95% interval) for at least one order of every pair of modes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

PATTERN_MODES = ("grpo", "psr", "nsr", "w-reinforce")
Interval = tuple[float, float, float]


@dataclass(frozen=True)
class Claim:
    """One rule of the pattern: its statement, whether it holds (None: cannot be judged) and the numbers."""

    statement: str
    holds: bool | None
    evidence: str


def paired(pairs: Mapping[tuple[str, str], Mapping[int, Interval]], a: str, b: str, k: int) -> Interval:
    """(a - b, low, high) at k, from either order of the pair."""
    if (a, b) in pairs:
        return tuple(pairs[(a, b)][k])
    difference, low, high = pairs[(b, a)][k]
    return (-difference, -high, -low)


def near(interval: Interval, near_pp: float) -> bool:
    """A paired difference within near_pp percentage points, or one whose 95% interval contains 0."""
    difference, low, high = interval
    return abs(difference) * 100 <= near_pp or low <= 0.0 <= high


def _pp(interval: Interval) -> str:
    difference, low, high = (value * 100 + 0.0 for value in interval)  # + 0.0: no "-0.0"
    return f"{difference:+.1f} pp [{low:+.1f}, {high:+.1f}]"


def best_or_near_best(estimates, pairs, mode: str, k: int, near_pp: float) -> tuple[bool, str]:
    """True when ``mode`` has the highest Pass@k at k (ties included) or is near the mode that has it."""
    best = max(estimates, key=lambda m: (estimates[m][k], m == mode))
    if best == mode:
        return True, f"{mode} is best at k = {k} ({estimates[mode][k]:.1%})"
    interval = paired(pairs, mode, best, k)
    verb = "is near" if near(interval, near_pp) else "is below"
    return near(interval, near_pp), f"{mode} {verb} the best, {best}, at k = {k}: {_pp(interval)}"


def worst(estimates, pairs, mode: str, k: int, near_pp: float) -> tuple[bool, str]:
    """True when ``mode`` has the lowest Pass@k at k (ties included) and is not near the next lowest."""
    others = [m for m in estimates if m != mode]
    next_lowest = min(others, key=lambda m: estimates[m][k])
    if estimates[mode][k] > estimates[next_lowest][k]:
        return False, (f"{mode} is not lowest at k = {k} ({estimates[mode][k]:.1%}; lowest: {next_lowest}, "
                       f"{estimates[next_lowest][k]:.1%})")
    interval = paired(pairs, mode, next_lowest, k)
    if near(interval, near_pp):
        return False, f"{mode} is lowest at k = {k} but near {next_lowest}: {_pp(interval)}"
    return True, f"{mode} is lowest at k = {k}, clearly below the next lowest, {next_lowest}: {_pp(interval)}"


def pattern_claims(estimates: Mapping[str, Mapping[int, float]],
                   pairs: Mapping[tuple[str, str], Mapping[int, Interval]],
                   ks: Sequence[int], near_pp: float) -> list[Claim]:
    """The five claims of the paper's pattern, judged on these numbers (None where a mode is missing)."""
    ks = sorted(ks)
    small, large = ks[0], ks[-1]
    statements = [f"PSR is best or near best at k = {small}", f"PSR is worst at k = {large}",
                  f"NSR is near GRPO at k = {small}", f"NSR is best or tied at k = {large}",
                  f"W-REINFORCE is best or near best at every k ({small} to {large})"]
    missing = [m for m in PATTERN_MODES if m not in estimates]
    if missing:
        return [Claim(s, None, f"cannot be judged yet: no results for {', '.join(missing)}") for s in statements]
    estimates = {m: estimates[m] for m in PATTERN_MODES}
    claims = [Claim(statements[0], *best_or_near_best(estimates, pairs, "psr", small, near_pp)),
              Claim(statements[1], *worst(estimates, pairs, "psr", large, near_pp))]
    nsr_grpo = paired(pairs, "nsr", "grpo", small)
    claims.append(Claim(statements[2], near(nsr_grpo, near_pp), f"nsr - grpo at k = {small}: {_pp(nsr_grpo)}"))
    claims.append(Claim(statements[3], *best_or_near_best(estimates, pairs, "nsr", large, near_pp)))
    per_k = [best_or_near_best(estimates, pairs, "w-reinforce", k, near_pp) for k in ks]
    failing = [text for ok, text in per_k if not ok]
    claims.append(Claim(statements[4], not failing,
                        "; ".join(failing) if failing else f"best or near best at all {len(ks)} k"))
    return claims


def pattern_verdict(claims: Sequence[Claim]) -> str:
    """One sentence: holds, does not hold (naming the failing claims), or cannot be judged."""
    if any(c.holds is None for c in claims):
        return f"The paper's pattern {claims[0].evidence}."
    failed = [c.statement for c in claims if not c.holds]
    if not failed:
        return f"The paper's pattern holds here: all {len(claims)} claims hold."
    return (f"The paper's pattern does not hold here: {len(claims) - len(failed)} of {len(claims)} claims hold; "
            f"not: {'; '.join(failed)}.")
