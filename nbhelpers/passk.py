"""Pass@k from samples files: the unbiased estimator, tables with bootstrap intervals, paired
comparisons of two methods, and results files.

Samples file (JSON Lines, one problem a line):
  {"id", "dataset", "question", "answer", "completions": [str], "correct": [bool], "meta": {...}}
Results file (JSON): {"method", "dataset", "n_problems", "n_samples", "pass_at_k": {"1": float, ...},
  "ci95": {"1": [lo, hi], ...}, "meta": {...}}, values as fractions in [0, 1].
"""

from __future__ import annotations

import argparse
import gzip
import json
import lzma
import numbers
import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np

from .errors import InputError

SAMPLES_FIELDS = ("id", "dataset", "question", "answer", "completions", "correct")
CI_LEVEL = 0.95
_MAX_LISTED = 10  # problems named in one error message


# ---------------------------------------------------------------------------------------------
# The estimator


def _check_integer(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be non-negative, got {value}")


def pass_at_k_array(n: int, c, k: int) -> np.ndarray:
    """Pass@k for one (n, k) and an array of correct counts c (same shape out), in [0, 1].

    Unbiased estimator 1 - C(n-c, k) / C(n, k) (Chen et al. 2021) in its product form
    1 - prod(1 - k / arange(n-c+1, n+1)); the product is accumulated in log space
    (log1p, cumulative sum, expm1) so that small values keep full relative precision.
    Raises ValueError if k < 1, k > n, any c > n, or any value is negative.
    """
    _check_integer("n", n)
    _check_integer("k", k)
    counts = np.asarray(c)
    if counts.size and not np.issubdtype(counts.dtype, np.integer):
        raise ValueError(f"c must hold integers, got dtype {counts.dtype}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if k > n:
        raise ValueError(f"k={k} is larger than the number of samples n={n}")
    if counts.size and counts.min() < 0:
        raise ValueError(f"c must be non-negative, got {counts.min()}")
    if counts.size and counts.max() > n:
        raise ValueError(f"c={counts.max()} is larger than the number of samples n={n}")
    # log_ratio[j] = sum of log(1 - k/i) over the j largest i in n, n-1, ..., k+1.
    log_terms = np.log1p(-k / np.arange(n, k, -1, dtype=np.float64))
    log_ratio = np.concatenate(([0.0], np.cumsum(log_terms)))
    values = np.ones(counts.shape, dtype=np.float64)  # n - c < k: every k-subset holds a correct one
    computable = counts <= n - k
    values[computable] = -np.expm1(log_ratio[counts[computable]])
    return values


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability in [0, 1] that at least one of k samples drawn without replacement from n
    samples, c of them correct, is correct. Exact to ~1e-12 relative for n up to 10**5 and beyond.
    Raises ValueError if k < 1, k > n, c > n or any value is negative."""
    _check_integer("c", c)
    return float(pass_at_k_array(n, np.array([c]), k)[0])


def k_values(n: int) -> list[int]:
    """The k evaluated for n samples: 1, 2, 4, ... up to n, plus n itself if not a power of two."""
    _check_integer("n", n)
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    ks = [2**e for e in range(int(n).bit_length())]
    return ks if ks[-1] == n else ks + [n]


def selected_k_values(n: int, ks: Sequence[int] | None = None) -> list[int]:
    """The k evaluated for up to n samples: ``ks`` (the ``passk_ks`` key; sorted, duplicates dropped) when given,
    else :func:`k_values`. Raises ValueError naming the k that are not integers in [1, n]."""
    if not ks:
        return k_values(n)
    bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= n]
    if bad:
        raise ValueError(f"k values {bad} are not integers in [1, n = {n}]")
    return sorted(set(int(k) for k in ks))


# ---------------------------------------------------------------------------------------------
# Samples files


@dataclass(frozen=True)
class ProblemCounts:
    """One problem's outcome: n samples drawn, c of them correct; source is "file:line"."""

    dataset: str
    id: str
    n: int
    c: int
    source: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.dataset, self.id)


def _problem_from_record(record, where: str) -> ProblemCounts:
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [name for name in SAMPLES_FIELDS if name not in record]
    if missing:
        raise InputError(f"{where}: missing field(s) {', '.join(missing)}")
    problem_id, dataset = record["id"], record["dataset"]
    if isinstance(problem_id, bool) or not isinstance(problem_id, (str, int)):
        raise InputError(f"{where}: field 'id' must be a string or an integer, got {problem_id!r}")
    if not isinstance(dataset, str) or not dataset:
        raise InputError(f"{where}: field 'dataset' must be a non-empty string, got {dataset!r}")
    completions, correct = record["completions"], record["correct"]
    if not isinstance(completions, list) or not all(isinstance(x, str) for x in completions):
        raise InputError(f"{where}: field 'completions' must be a list of strings")
    if not isinstance(correct, list):
        raise InputError(f"{where}: field 'correct' must be a list of booleans")
    not_bool = [i for i, x in enumerate(correct) if not isinstance(x, bool)]
    if not_bool:
        raise InputError(f"{where}: field 'correct' must hold booleans; item {not_bool[0]} is "
                         f"{correct[not_bool[0]]!r}")
    if len(correct) != len(completions):
        raise InputError(f"{where}: len(correct)={len(correct)} differs from "
                         f"len(completions)={len(completions)}")
    if not correct:
        raise InputError(f"{where}: problem {problem_id!r} has no samples")
    if "meta" in record and not isinstance(record["meta"], dict):
        raise InputError(f"{where}: field 'meta' must be an object")
    return ProblemCounts(dataset, str(problem_id), len(correct), sum(correct), where)


def samples_lines(path: str | os.PathLike) -> Iterator[tuple[str, str]]:
    """("<file>:<line>", text) of each non-empty line of a samples file, text with its newline.
    InputError naming the file (a folder) or the file and line (bytes that are not UTF-8)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a samples file (JSON Lines)")
    opener = gzip.open if path.name.endswith(".gz") else lzma.open if path.name.endswith(".xz") else open
    with opener(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise InputError(f"{path}:{number}: not UTF-8 text (byte {error.start + 1} of the line)") from None
            if line.strip():
                yield f"{path}:{number}", line


def read_samples(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[ProblemCounts]:
    """Read one or more samples files (``.jsonl``, or compressed ``.jsonl.gz`` / ``.jsonl.xz``) into per-problem
    counts, in file order.

    Raises InputError naming the file and line for a bad JSON line, a missing field, a
    non-boolean `correct`, len(correct) != len(completions), or a truncated last line.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    problems: list[ProblemCounts] = []
    for path in paths:
        count_before = len(problems)
        for where, line in samples_lines(path):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                if not line.endswith("\n"):  # only the last line can lack its newline
                    raise InputError(
                        f"{where}: the last line is truncated (no newline at the end and not valid "
                        f"JSON), so the sampling run stopped mid-write; rerun sampling on this file "
                        f"to repair it (it drops the partial line and resumes), or call "
                        f"nbhelpers.sampling.repair_samples_file on it") from None
                raise InputError(f"{where}: not valid JSON: {error.msg} at column {error.colno}") from None
            problems.append(_problem_from_record(record, where))
        if len(problems) == count_before:
            raise InputError(f"{path}: the samples file holds no problems")
    return problems


def check_resumable_samples(path: str | os.PathLike) -> None:
    """Before sampling resumes ``path`` (when it exists): every complete line is a samples record. A
    last line without its newline is left alone (sampling cuts it). InputError naming file and line."""
    if not Path(path).exists():
        return
    for where, line in samples_lines(path):
        if not line.endswith("\n"):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{where}: not valid JSON: {error.msg} at column {error.colno}; this samples "
                             f"file cannot be resumed (fix the line or choose another file)") from None
        _problem_from_record(record, where)


def _check_problem_set(problems: Sequence[ProblemCounts], allow_mixed_n: bool,
                       ks: Sequence[int] | None = None) -> tuple[list[int], dict]:
    """Check a problem set (no duplicates; one n unless allowed); return the k values (``ks``, else 1, 2, 4, ...,
    n; :func:`selected_k_values`) and, for mixed n, what was dropped."""
    if not problems:
        raise ValueError("no problems to evaluate")
    first_seen: dict[tuple[str, str], ProblemCounts] = {}
    for problem in problems:
        if problem.key in first_seen:
            raise ValueError(f"{problem.source}: problem {problem.dataset}/{problem.id} appears twice "
                             f"(first at {first_seen[problem.key].source})")
        first_seen[problem.key] = problem
    ns = sorted({problem.n for problem in problems})
    all_ks = selected_k_values(ns[-1], ks)
    if len(ns) == 1:
        return all_ks, {}
    if not allow_mixed_n:
        reference, other = problems[0], next(p for p in problems if p.n != problems[0].n)
        raise ValueError(f"{other.source}: problem {other.dataset}/{other.id} has n={other.n} samples "
                         f"but {reference.source} has n={reference.n}; problems with different n "
                         f"need allow_mixed_n=True (--allow-mixed-n)")
    kept = [k for k in all_ks if k <= ns[0]]
    if not kept:
        raise ValueError(f"no k value of {all_ks} is at most the smallest n = {ns[0]}")
    return kept, {"n_values": ns, "dropped_k": [k for k in all_ks if k > ns[0]]}


# ---------------------------------------------------------------------------------------------
# Tables and intervals


def per_problem_pass_at_k(problems: Sequence[ProblemCounts], ks: Sequence[int]) -> np.ndarray:
    """Matrix (problems x ks) of each problem's Pass@k, each with its own n."""
    values = np.empty((len(problems), len(ks)))
    rows_by_n: dict[int, list[int]] = defaultdict(list)
    for row, problem in enumerate(problems):
        rows_by_n[problem.n].append(row)
    for n, rows in rows_by_n.items():
        counts = np.array([problems[row].c for row in rows])
        for column, k in enumerate(ks):
            values[rows, column] = pass_at_k_array(n, counts, k)
    return values


def bootstrap_mean_ci(values: np.ndarray, *, bootstrap: int = 1000, seed: int = 0,
                      level: float = CI_LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of the column means of `values` (problems x columns),
    resampling problems (rows) with replacement `bootstrap` times; seeded, deterministic.

    The interval is widened to contain the mean itself, which rounding can otherwise put a
    hair outside when all resamples agree.
    """
    _check_integer("bootstrap", bootstrap)
    if bootstrap < 1:
        raise ValueError(f"bootstrap must be at least 1 resample, got {bootstrap}")
    values = np.asarray(values, dtype=np.float64)
    n_rows = values.shape[0]
    if n_rows == 0:
        raise ValueError("bootstrap needs at least one problem")
    rng = np.random.default_rng(seed)
    # A resample is a row of multiplicities (multinomial); blocks bound memory to ~8e6 counts.
    block = max(1, 8_000_000 // n_rows)
    uniform = np.full(n_rows, 1.0 / n_rows)
    means = np.concatenate([
        rng.multinomial(n_rows, uniform, size=min(block, bootstrap - start)) @ values / n_rows
        for start in range(0, bootstrap, block)])
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail], axis=0)
    estimate = values.mean(axis=0)
    return np.minimum(low, estimate), np.maximum(high, estimate)


def _table(values: np.ndarray, ks: Sequence[int], n_samples: int, bootstrap: int, seed: int) -> dict:
    low, high = bootstrap_mean_ci(values, bootstrap=bootstrap, seed=seed)
    estimate = values.mean(axis=0)
    return {
        "n_problems": int(values.shape[0]),
        "n_samples": int(n_samples),
        "pass_at_k": {str(k): float(v) for k, v in zip(ks, estimate)},
        "ci95": {str(k): [float(lo), float(hi)] for k, lo, hi in zip(ks, low, high)},
    }


def passk_results(problems: Sequence[ProblemCounts], method: str, *, bootstrap: int = 1000,
                  seed: int = 0, allow_mixed_n: bool = False,
                  source_samples: Iterable[str | os.PathLike] = (), ks: Sequence[int] | None = None) -> dict:
    """Results dict (the results-file format) for one method: Pass@k with 95% bootstrap
    intervals overall and per dataset (meta.per_dataset), at ``ks`` (None: 1, 2, 4, ..., n). n_samples is the
    smallest n."""
    ks, mixed_n = _check_problem_set(problems, allow_mixed_n, ks)
    values = per_problem_pass_at_k(problems, ks)
    rows_by_dataset: dict[str, list[int]] = defaultdict(list)
    for row, problem in enumerate(problems):
        rows_by_dataset[problem.dataset].append(row)
    per_dataset = {
        name: _table(values[rows], ks, min(problems[r].n for r in rows), bootstrap, seed)
        for name, rows in sorted(rows_by_dataset.items())}
    meta = {
        "per_dataset": per_dataset,
        "source_samples": [str(path) for path in source_samples],
        "bootstrap": {"resamples": bootstrap, "seed": seed, "level": CI_LEVEL},
        "k_values": ks,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if mixed_n:
        meta["mixed_n"] = mixed_n
    return {
        "method": method,
        "dataset": next(iter(per_dataset)) if len(per_dataset) == 1 else "all",
        **_table(values, ks, min(p.n for p in problems), bootstrap, seed),
        "meta": meta,
    }


def compare_methods(problems_a: Sequence[ProblemCounts], problems_b: Sequence[ProblemCounts], *,
                    method_a: str = "A", method_b: str = "B", bootstrap: int = 1000, seed: int = 0,
                    allow_mixed_n: bool = False, ks: Sequence[int] | None = None) -> dict:
    """Paired comparison on the same problems (matched by (dataset, id)): Pass@k of A minus B
    per k (fractions in [-1, 1]) with a paired-bootstrap 95% interval, at the k both support (of ``ks``,
    None: 1, 2, 4, ..., n)."""
    ks_a, _ = _check_problem_set(problems_a, allow_mixed_n, ks)
    ks_b, _ = _check_problem_set(problems_b, allow_mixed_n, ks)
    by_key_b = {problem.key: problem for problem in problems_b}
    keys_a = {problem.key for problem in problems_a}
    only_a = sorted(keys_a - by_key_b.keys())
    only_b = sorted(by_key_b.keys() - keys_a)
    if only_a or only_b:
        def listed(keys):
            names = ", ".join(f"{d}/{i}" for d, i in keys[:_MAX_LISTED])
            return names + (f", ... ({len(keys)} in all)" if len(keys) > _MAX_LISTED else "")
        raise ValueError(f"{method_a} and {method_b} were not sampled on the same problems: "
                         f"only in {method_a}: [{listed(only_a)}]; only in {method_b}: [{listed(only_b)}]")
    ks = [k for k in ks_a if k in ks_b]
    aligned_b = [by_key_b[problem.key] for problem in problems_a]
    difference = per_problem_pass_at_k(problems_a, ks) - per_problem_pass_at_k(aligned_b, ks)
    low, high = bootstrap_mean_ci(difference, bootstrap=bootstrap, seed=seed)
    return {
        "method_a": method_a,
        "method_b": method_b,
        "n_problems": len(problems_a),
        "difference": {str(k): float(v) for k, v in zip(ks, difference.mean(axis=0))},
        "ci95": {str(k): [float(lo), float(hi)] for k, lo, hi in zip(ks, low, high)},
        "bootstrap": {"resamples": bootstrap, "seed": seed, "level": CI_LEVEL},
    }


# ---------------------------------------------------------------------------------------------
# Results files


def _fail(source, key: str, problem: str) -> None:
    raise ValueError(f"{source}: key '{key}': {problem}")


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(value)


def _validate_table(table, source, prefix: str) -> None:
    if not isinstance(table, dict):
        _fail(source, prefix.rstrip(".") or "(top level)", "expected an object")
    for name in ("n_problems", "n_samples"):
        value = table.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            _fail(source, prefix + name, f"expected a positive integer, got {value!r}")
    passk, ci = table.get("pass_at_k"), table.get("ci95")
    if not isinstance(passk, dict) or not passk:
        _fail(source, prefix + "pass_at_k", "expected a non-empty object {k: fraction}")
    if not isinstance(ci, dict):
        _fail(source, prefix + "ci95", "expected an object {k: [lo, hi]}")
    for k, value in passk.items():
        if not (isinstance(k, str) and k.isdigit() and int(k) >= 1):
            _fail(source, f"{prefix}pass_at_k.{k}", "k must be a positive integer")
        if not _is_number(value) or not 0.0 <= value <= 1.0:
            _fail(source, f"{prefix}pass_at_k.{k}", f"expected a fraction in [0, 1], got {value!r}")
        interval = ci.get(k)
        if (not isinstance(interval, list) or len(interval) != 2 or not all(map(_is_number, interval))
                or not 0.0 <= interval[0] <= interval[1] <= 1.0):
            _fail(source, f"{prefix}ci95.{k}", f"expected [lo, hi] with 0 <= lo <= hi <= 1, got {interval!r}")
    extra = sorted(set(ci) - set(passk))
    if extra:
        _fail(source, f"{prefix}ci95.{extra[0]}", "has no matching pass_at_k entry")


def validate_results(results, source="results") -> None:
    """Raise ValueError naming `source` and the key when `results` breaks the results format."""
    if not isinstance(results, dict):
        raise ValueError(f"{source}: expected a JSON object at the top level")
    for name in ("method", "dataset"):
        if not isinstance(results.get(name), str) or not results[name]:
            _fail(source, name, f"expected a non-empty string, got {results.get(name)!r}")
    _validate_table(results, source, "")
    meta = results.get("meta")
    if not isinstance(meta, dict):
        _fail(source, "meta", "expected an object")
    per_dataset = meta.get("per_dataset", {})
    if not isinstance(per_dataset, dict):
        _fail(source, "meta.per_dataset", "expected an object {dataset: table}")
    for name, table in per_dataset.items():
        _validate_table(table, source, f"meta.per_dataset.{name}.")


def write_results(results: Mapping, path: str | os.PathLike) -> Path:
    """Validate and write a results file atomically (temp file + os.replace); returns the path."""
    path = Path(path)
    validate_results(results, source=path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent,
                                         prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            json.dump(results, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return path


def load_results(path: str | os.PathLike) -> dict:
    """Read and validate a results file; ValueError names the file and the offending key."""
    with open(path, encoding="utf-8") as handle:
        try:
            results = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON: {error.msg} at line {error.lineno} "
                             f"column {error.colno}") from error
    validate_results(results, source=path)
    return results


# ---------------------------------------------------------------------------------------------
# Text tables and the command line


def format_table(results: Mapping) -> str:
    """Plain-text Pass@k table (percent, with 95% intervals), overall then per dataset."""
    def block(title: str, table: Mapping) -> list[str]:
        lines = [f"{title}: {table['n_problems']} problems, n = {table['n_samples']}",
                 f"{'k':>7}  {'pass@k':>8}  95% interval"]
        for k, value in table["pass_at_k"].items():
            low, high = table["ci95"][k]
            lines.append(f"{k:>7}  {value:>8.2%}  [{low:.2%}, {high:.2%}]")
        return lines

    lines = block(f"{results['method']} ({results['dataset']})", results)
    per_dataset = results["meta"].get("per_dataset", {})
    if len(per_dataset) > 1:
        for name, table in per_dataset.items():
            lines += [""] + block(f"{results['method']} ({name})", table)
    return "\n".join(lines)


def format_comparison(comparison: Mapping) -> str:
    """Plain-text paired comparison (percentage points, with 95% intervals)."""
    lines = [f"{comparison['method_a']} - {comparison['method_b']} (paired, "
             f"{comparison['n_problems']} problems), percentage points",
             f"{'k':>7}  {'diff':>8}  95% interval"]
    for k, value in comparison["difference"].items():
        low, high = comparison["ci95"][k]
        lines.append(f"{k:>7}  {value * 100:>+8.2f}  [{low * 100:+.2f}, {high * 100:+.2f}]")
    return "\n".join(lines)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `python -m nbhelpers passk`."""
    parser.add_argument("--samples", nargs="+", required=True, type=Path, metavar="S",
                        help="samples file(s) (JSON Lines) of one method")
    parser.add_argument("--out", required=True, type=Path, metavar="R", help="results file to write (JSON)")
    parser.add_argument("--method-name", default=None,
                        help="method name in the results (default: the first samples file's stem)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--allow-mixed-n", action="store_true",
                        help="accept problems with different numbers of samples (k above the smallest n is dropped)")
    parser.add_argument("--compare", nargs="+", type=Path, default=None, metavar="OTHER_SAMPLES",
                        help="samples file(s) of another method on the same problems: paired difference")
    parser.add_argument("--ks", nargs="+", type=int, default=None, metavar="K",
                        help="the k values (the passk_ks key; default: 1, 2, 4, ... up to n, and n)")


def run_from_cli(args: argparse.Namespace) -> int:
    """Compute Pass@k for --samples, write --out, print the table (and a paired comparison)."""
    method = args.method_name or args.samples[0].stem
    problems = read_samples(args.samples)
    results = passk_results(problems, method, bootstrap=args.bootstrap, seed=args.seed,
                            allow_mixed_n=args.allow_mixed_n, source_samples=args.samples, ks=args.ks)
    if args.compare:
        comparison = compare_methods(problems, read_samples(args.compare), method_a=method,
                                     method_b=args.compare[0].stem, bootstrap=args.bootstrap,
                                     seed=args.seed, allow_mixed_n=args.allow_mixed_n, ks=args.ks)
        comparison["source_samples_b"] = [str(path) for path in args.compare]
        results["meta"]["comparison"] = comparison
    write_results(results, args.out)
    print(format_table(results))
    if args.compare:
        print()
        print(format_comparison(results["meta"]["comparison"]))
    print(f"\nwrote {args.out}")
    return 0
