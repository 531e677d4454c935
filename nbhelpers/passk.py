"""Pass@k from samples files: the unbiased estimator, the chance floor, tables with bootstrap intervals,
paired comparisons of two methods, compact samples files, and results files.

Samples file (JSON Lines, one problem a line; ``.jsonl``, ``.jsonl.gz`` or ``.jsonl.xz``):
  {"id", "dataset", "question", "answer", "completions": [str], "correct": [bool],
   "answers": [str | null], "meta": {"exact_match": bool, "reward_threshold": float, ...}}
``answers`` holds each completion's extracted answer (null: no closed <answer> block); without it the answers
are extracted from the completions. ``meta.exact_match`` (default false) and ``meta.reward_threshold``
(default 0.5) are how the sample's ``correct`` bit was decided (``rewards.is_correct``). A compact samples
file (`write_compact_samples`) keeps ``correct`` and ``answers`` of every problem but ``completions`` only
where ``meta.completions_kept`` is true.
Results file (JSON): {"method", "dataset", "n_problems", "n_samples", "pass_at_k": {"1": float, ...},
  "ci95": {"1": [lo, hi], ...}, "chance_floor": {"1": float, ...}, "chance_floor_ci95": {"1": [lo, hi], ...},
  "meta": {...}}, values as fractions in [0, 1]; the chance-floor keys are optional.

The chance floor is the Pass@k of a guesser that never sees the chart: for each problem it draws k of the
method's own completions to OTHER problems of the same dataset whose gold answer has the same `answer_type`
(yes/no, year, integer, decimal, text), with replacement, and scores their extracted answers against this
problem's gold answer with the correctness used for the method's own samples (`rewards.answer_correct`,
exact or relaxed, and the threshold). With p the fraction of those drawn completions that are correct
(`chance_rates`), the floor at k is the mean over problems of 1 - (1 - p)^k (`chance_floor_matrix`), with a
bootstrap interval over problems (`results_table`). A Pass@k near its floor says the method's answers carry
little information about the chart: a year within 5% of the gold year is correct under relaxed accuracy, and at
large k even guessing covers many questions.
"""

from __future__ import annotations

import argparse
import gzip
import json
import lzma
import numbers
import os
import re
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from .completion_parsing import extract_answer
from .errors import InputError
from .rewards import answer_correct, answer_number, normalised_answer

SAMPLES_FIELDS = ("id", "dataset", "question", "answer", "correct")  # and completions or answers (or both)
CI_LEVEL = 0.95
DEFAULT_REWARD_THRESHOLD = 0.5  # RunConfig's reward_threshold, for samples files that do not record theirs
ANSWER_TYPES = ("yes/no", "year", "integer", "decimal", "text")
YEAR_RANGE = (1800, 2100)  # inclusive: a four-digit integer answer in it is a year
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
    """One problem's outcome: n samples drawn, c of them correct; source is "file:line". From a samples
    file also: the gold answer (a list of several as a tuple), each sample's extracted answer (None: no
    answer block) and how correctness was decided (exact_match, threshold), which the chance floor needs."""

    dataset: str
    id: str
    n: int
    c: int
    source: str = ""
    gold: Any = None
    answers: tuple[str | None, ...] = ()
    exact_match: bool = False
    threshold: float = DEFAULT_REWARD_THRESHOLD

    @property
    def key(self) -> tuple[str, str]:
        return (self.dataset, self.id)


def _is_gold(value) -> bool:
    return value is None or isinstance(value, (str, numbers.Real))


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
    if "completions" not in record and "answers" not in record:
        raise InputError(f"{where}: missing field(s) completions (or answers, in a compact samples file)")
    correct = record["correct"]
    completions, answers = record.get("completions"), record.get("answers")
    if completions is not None and (not isinstance(completions, list)
                                    or not all(isinstance(x, str) for x in completions)):
        raise InputError(f"{where}: field 'completions' must be a list of strings")
    if answers is not None and (not isinstance(answers, list)
                                or not all(x is None or isinstance(x, str) for x in answers)):
        raise InputError(f"{where}: field 'answers' must be a list of strings or nulls")
    if not isinstance(correct, list):
        raise InputError(f"{where}: field 'correct' must be a list of booleans")
    not_bool = [i for i, x in enumerate(correct) if not isinstance(x, bool)]
    if not_bool:
        raise InputError(f"{where}: field 'correct' must hold booleans; item {not_bool[0]} is "
                         f"{correct[not_bool[0]]!r}")
    for name, values in (("completions", completions), ("answers", answers)):
        if values is not None and len(correct) != len(values):
            raise InputError(f"{where}: len(correct)={len(correct)} differs from len({name})={len(values)}")
    if not correct:
        raise InputError(f"{where}: problem {problem_id!r} has no samples")
    meta = record.get("meta", {})
    if not isinstance(meta, dict):
        raise InputError(f"{where}: field 'meta' must be an object")
    exact_match = meta.get("exact_match", False)
    if not isinstance(exact_match, bool):
        raise InputError(f"{where}: field 'meta.exact_match' must be true or false, got {exact_match!r}")
    threshold = meta.get("reward_threshold", DEFAULT_REWARD_THRESHOLD)
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise InputError(f"{where}: field 'meta.reward_threshold' must be a number, got {threshold!r}")
    gold = record["answer"]
    if not _is_gold(gold) and not (isinstance(gold, list) and all(map(_is_gold, gold))):
        raise InputError(f"{where}: field 'answer' must be a string, a number, null or a list of those, "
                         f"got {gold!r:.80}")
    if answers is None:
        answers = [extract_answer(text) for text in completions]
    return ProblemCounts(dataset, str(problem_id), len(correct), sum(correct), where,
                         tuple(gold) if isinstance(gold, list) else gold, tuple(answers), exact_match,
                         float(threshold))


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


def _open_for_writing(path: Path, handle):
    """A binary writer to ``handle`` compressing by the name's ending (.gz, .xz, else plain), reproducibly."""
    if path.name.endswith(".gz"):
        return gzip.GzipFile(filename="", mode="wb", fileobj=handle, mtime=0)
    if path.name.endswith(".xz"):
        return lzma.LZMAFile(handle, "wb", preset=9)
    return handle


def compact_keep_rows(n_problems: int, keep: int) -> list[int]:
    """The rows (file order) whose completion texts a compact file keeps: ``keep`` of them spread evenly
    from the first to the last (all when keep >= n_problems, none when keep is 0)."""
    _check_integer("keep", keep)
    if keep >= n_problems:
        return list(range(n_problems))
    if keep <= 1:
        return [0] * keep
    return [i * (n_problems - 1) // (keep - 1) for i in range(keep)]  # steps of at least 1: distinct


def write_compact_samples(path: str | os.PathLike, samples: str | os.PathLike | Sequence[str | os.PathLike], *,
                          keep: int = 8) -> Path:
    """Write a compact copy of samples file(s) to ``path`` (compressed by its ending: .jsonl.xz, .jsonl.gz or
    .jsonl) and return it. Every problem keeps its fields, ``correct`` and ``answers`` (extracted from the
    completions where the file has none), so Pass@k and the chance floor come out the same; the completion
    texts are kept for ``keep`` problems spread over the file (`compact_keep_rows`), with
    ``meta.completions_kept`` true there and false elsewhere. Written atomically (temp file, then rename);
    the same input gives the same bytes. InputError names the file and line of a bad record."""
    path = Path(path)
    paths = [samples] if isinstance(samples, (str, os.PathLike)) else list(samples)
    records = []
    for source in paths:
        for where, line in samples_lines(source):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(f"{where}: not valid JSON: {error.msg} at column {error.colno}") from None
            problem = _problem_from_record(record, where)
            records.append({**record, "answers": list(problem.answers)})
    if not records:
        raise InputError(f"{', '.join(map(str, paths))}: the samples file holds no problems")
    kept = set(compact_keep_rows(len(records), keep))
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("wb", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                         delete=False)
    try:
        with handle, _open_for_writing(path, handle) as out:
            for row, record in enumerate(records):
                compact = {key: value for key, value in record.items() if key != "completions" or row in kept}
                if "completions" not in record:  # already compact: only a row that has its texts keeps them
                    kept.discard(row)
                compact["meta"] = {**record.get("meta", {}), "completions_kept": row in kept}
                out.write((json.dumps(compact, ensure_ascii=False) + "\n").encode("utf-8"))
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return path


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


# ---------------------------------------------------------------------------------------------
# The chance floor


def answer_type(gold) -> str:
    """The type of a gold answer, one of ANSWER_TYPES: "yes/no"; "year" (four digits in YEAR_RANGE);
    "integer" (digits, optionally signed or grouped by thousands: "1,234"); "decimal" (any other number
    `rewards.answer_number` reads: "2.5", "40%", "1e3"); "text" (anything else). Compared as
    `rewards.normalised_answer` gives it; a list of several gold answers has its first one's type."""
    if isinstance(gold, (list, tuple)):
        return answer_type(gold[0]) if gold else "text"
    text = normalised_answer(gold)
    if text in ("yes", "no"):
        return "yes/no"
    if answer_number(text) is None:
        return "text"
    if not _INTEGER_TEXT.fullmatch(text):
        return "decimal"
    if len(text) == 4 and YEAR_RANGE[0] <= int(text) <= YEAR_RANGE[1]:
        return "year"
    return "integer"


_INTEGER_TEXT = re.compile(r"[+-]?(?:\d+|\d{1,3}(?:,\d{3})+)")


def _gold_key(problem: ProblemCounts) -> tuple:
    return (problem.gold, problem.exact_match, problem.threshold)


def _is_right(answer: str | None, problem: ProblemCounts) -> bool:
    """Whether an extracted answer is correct for ``problem`` by the correctness bit of sampling
    (`rewards.is_correct`: its accuracy, 1 or 0, is at least the threshold)."""
    return float(answer_correct(answer, problem.gold, problem.exact_match)) >= problem.threshold


def chance_rates(problems: Sequence[ProblemCounts]) -> tuple[np.ndarray, dict]:
    """Per problem (in order), the fraction p in [0, 1] of the completions to the OTHER problems of its
    dataset and `answer_type` whose extracted answers are correct for this problem's gold answer: a
    chart-blind guesser's chance of being right with one draw. A completion without an answer counts as
    wrong; a problem with no other problem of its type gets p = 0. Also a dict for the results' metadata:
    problems per type, problems without donors, and own_agreement, the fraction of problems whose correct
    count the same scoring reproduces from their own answers (1.0 when the file is consistent).
    ValueError when a problem has no extracted answers (a hand-made ProblemCounts)."""
    for problem in problems:
        if len(problem.answers) != problem.n:
            raise ValueError(f"{problem.source or problem.key}: problem {problem.dataset}/{problem.id} has "
                             f"{len(problem.answers)} extracted answers for n = {problem.n} samples; the chance "
                             f"floor needs each sample's answer (read the problems from a samples file)")
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for row, problem in enumerate(problems):
        groups[(problem.dataset, answer_type(problem.gold))].append(row)
    rates = np.zeros(len(problems))
    without_donors, agreeing = 0, 0
    for rows in groups.values():
        own = [Counter(problems[row].answers) for row in rows]
        pooled = sum(own, Counter())
        pool_size = sum(problems[row].n for row in rows)
        pooled_hits: dict[tuple, int] = {}
        for row, counts in zip(rows, own):
            problem = problems[row]
            key = _gold_key(problem)
            if key not in pooled_hits:
                pooled_hits[key] = sum(count for answer, count in pooled.items() if _is_right(answer, problem))
            own_hits = sum(count for answer, count in counts.items() if _is_right(answer, problem))
            agreeing += int(own_hits == problem.c)
            if pool_size == problem.n:
                without_donors += 1
                continue
            rates[row] = (pooled_hits[key] - own_hits) / (pool_size - problem.n)
    types = Counter(answer_type(problem.gold) for problem in problems)
    meta = {"types": {name: types[name] for name in ANSWER_TYPES if types[name]},
            "without_donors": without_donors,
            "own_agreement": agreeing / len(problems) if problems else 1.0}
    return rates, meta


def chance_floor_matrix(rates, ks: Sequence[int]) -> np.ndarray:
    """Matrix (problems x ks) of 1 - (1 - p)^k: the chance of at least one correct answer in k draws with
    replacement, for each problem's rate p in [0, 1]."""
    rates = np.asarray(rates, dtype=np.float64)
    if rates.size and (rates.min() < 0 or rates.max() > 1):
        raise ValueError(f"rates must lie in [0, 1], got {rates.min()} .. {rates.max()}")
    for k in ks:
        _check_integer("k", k)
    return 1.0 - (1.0 - rates[:, None]) ** np.asarray(ks, dtype=np.float64)[None, :]


# ---------------------------------------------------------------------------------------------
# Results


def results_table(values: np.ndarray, ks: Sequence[int], n_samples: int, bootstrap: int, seed: int,
                  floor: np.ndarray | None = None) -> dict:
    """The table keys of a results file (n_problems, n_samples, pass_at_k, ci95) from per-problem Pass@k
    ``values`` (problems x ks), plus chance_floor and chance_floor_ci95 from the per-problem matrix ``floor``
    (chance_floor_matrix) when given; intervals by `bootstrap_mean_ci` with ``seed``."""
    table = {"n_problems": int(values.shape[0]), "n_samples": int(n_samples)}
    table["pass_at_k"], table["ci95"] = _means_with_intervals(values, ks, bootstrap, seed)
    if floor is not None:
        table["chance_floor"], table["chance_floor_ci95"] = _means_with_intervals(floor, ks, bootstrap, seed)
    return table


def _means_with_intervals(values: np.ndarray, ks: Sequence[int], bootstrap: int, seed: int) -> tuple[dict, dict]:
    """({k: mean over problems}, {k: [low, high]}) of a problems x ks matrix, by `bootstrap_mean_ci`."""
    low, high = bootstrap_mean_ci(values, bootstrap=bootstrap, seed=seed)
    return ({str(k): float(v) for k, v in zip(ks, values.mean(axis=0))},
            {str(k): [float(lo), float(hi)] for k, lo, hi in zip(ks, low, high)})


CHANCE_FLOOR_METHOD = ("mean over problems of 1 - (1 - p)^k; p: the fraction of the completions to other "
                       "problems of the same dataset and answer type whose extracted answers are correct for "
                       "this problem's gold answer (the samples' own correctness rule)")


def chance_floor_meta(problems: Sequence[ProblemCounts], bootstrap: int, seed: int) -> tuple[np.ndarray, dict]:
    """(rates, the results' meta.chance_floor) of a problem set: `chance_rates` and how they were made."""
    rates, details = chance_rates(problems)
    return rates, {"method": CHANCE_FLOOR_METHOD, **details,
                   "bootstrap": {"resamples": bootstrap, "seed": seed, "level": CI_LEVEL}}


def passk_results(problems: Sequence[ProblemCounts], method: str, *, bootstrap: int = 1000,
                  seed: int = 0, allow_mixed_n: bool = False,
                  source_samples: Iterable[str | os.PathLike] = (), ks: Sequence[int] | None = None) -> dict:
    """Results dict (the results-file format) for one method: Pass@k with 95% bootstrap
    intervals overall and per dataset (meta.per_dataset), at ``ks`` (None: 1, 2, 4, ..., n), and the chance
    floor beside it (when every problem has its extracted answers, as problems read from samples files do; else
    meta.chance_floor says why not). n_samples is the smallest n."""
    ks, mixed_n = _check_problem_set(problems, allow_mixed_n, ks)
    values = per_problem_pass_at_k(problems, ks)
    floor = None
    if all(len(problem.answers) == problem.n for problem in problems):
        rates, floor_meta = chance_floor_meta(problems, bootstrap, seed)
        floor = chance_floor_matrix(rates, ks)
    else:
        floor_meta = {"not_computed": "problems without extracted answers"}
    rows_by_dataset: dict[str, list[int]] = defaultdict(list)
    for row, problem in enumerate(problems):
        rows_by_dataset[problem.dataset].append(row)
    per_dataset = {
        name: results_table(values[rows], ks, min(problems[r].n for r in rows), bootstrap, seed,
                            None if floor is None else floor[rows])
        for name, rows in sorted(rows_by_dataset.items())}
    meta = {
        "per_dataset": per_dataset,
        "source_samples": [str(path) for path in source_samples],
        "bootstrap": {"resamples": bootstrap, "seed": seed, "level": CI_LEVEL},
        "k_values": ks,
        "chance_floor": floor_meta,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if mixed_n:
        meta["mixed_n"] = mixed_n
    return {
        "method": method,
        "dataset": next(iter(per_dataset)) if len(per_dataset) == 1 else "all",
        **results_table(values, ks, min(p.n for p in problems), bootstrap, seed, floor),
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
    _validate_values(table, source, prefix, "pass_at_k", "ci95")
    if "chance_floor" in table or "chance_floor_ci95" in table:
        _validate_values(table, source, prefix, "chance_floor", "chance_floor_ci95")
        if set(table["chance_floor"]) != set(table["pass_at_k"]):
            _fail(source, f"{prefix}chance_floor", "must have the same k as pass_at_k")


def _validate_values(table: Mapping, source, prefix: str, values_key: str, ci_key: str) -> None:
    """``table[values_key]`` is {k: fraction} and ``table[ci_key]`` {k: [lo, hi]} with the same k."""
    values, ci = table.get(values_key), table.get(ci_key)
    if not isinstance(values, dict) or not values:
        _fail(source, prefix + values_key, "expected a non-empty object {k: fraction}")
    if not isinstance(ci, dict):
        _fail(source, prefix + ci_key, "expected an object {k: [lo, hi]}")
    for k, value in values.items():
        if not (isinstance(k, str) and k.isdigit() and int(k) >= 1):
            _fail(source, f"{prefix}{values_key}.{k}", "k must be a positive integer")
        if not _is_number(value) or not 0.0 <= value <= 1.0:
            _fail(source, f"{prefix}{values_key}.{k}", f"expected a fraction in [0, 1], got {value!r}")
        interval = ci.get(k)
        if (not isinstance(interval, list) or len(interval) != 2 or not all(map(_is_number, interval))
                or not 0.0 <= interval[0] <= interval[1] <= 1.0):
            _fail(source, f"{prefix}{ci_key}.{k}", f"expected [lo, hi] with 0 <= lo <= hi <= 1, got {interval!r}")
    extra = sorted(set(ci) - set(values))
    if extra:
        _fail(source, f"{prefix}{ci_key}.{extra[0]}", f"has no matching {values_key} entry")


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
    """Plain-text Pass@k table (percent, with 95% intervals), overall then per dataset; the chance floor
    (with its interval) in two more columns where the results have it."""
    def block(title: str, table: Mapping) -> list[str]:
        floor = table.get("chance_floor")
        lines = [f"{title}: {table['n_problems']} problems, n = {table['n_samples']}",
                 f"{'k':>7}  {'pass@k':>8}  {'95% interval':<18}" + ("  chance floor  95% interval" if floor else "")]
        for k, value in table["pass_at_k"].items():
            low, high = table["ci95"][k]
            line = f"{k:>7}  {value:>8.2%}  {f'[{low:.2%}, {high:.2%}]':<18}"
            if floor:
                floor_low, floor_high = table["chance_floor_ci95"][k]
                line += f"  {floor[k]:>12.2%}  [{floor_low:.2%}, {floor_high:.2%}]"
            lines.append(line.rstrip())
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
