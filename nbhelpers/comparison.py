"""Several methods' Pass@k side by side, for 30_passk: loading samples or results files, the tables,
the baseline, paired comparisons and the improvement plot."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence


@dataclass
class Methods:
    """Several methods' Pass@k results (results-file dicts) with their labels, and per-problem
    counts where they came from samples files (needed for paired comparisons)."""

    labels: list[str]
    results: list[dict]
    problems: dict[str, list] = field(default_factory=dict)


def load_methods(samples_files: Sequence[str] | None = None, results_files: Sequence[str] | None = None,
                 labels: Sequence[str] | None = None, *, bootstrap: int = 1000, seed: int = 0,
                 results_dir: str | os.PathLike | None = None, ks: Sequence[int] | None = None) -> Methods:
    """Pass@k of each samples file (computed at ``ks``, None: 1, 2, 4, ..., n, and written to
    ``results_dir/<label>.json`` when given) or each results file (as computed); labels default to the files'
    method names (samples: the file stems)."""
    from . import passk

    if bool(samples_files) == bool(results_files):
        raise ValueError("set exactly one of samples_files (JSON Lines) or results_files (JSON)")
    files = list(samples_files or results_files)
    if labels is not None and len(labels) != len(files):
        raise ValueError(f"{len(labels)} labels for {len(files)} files")
    if results_files:
        results = [passk.load_results(f) for f in files]
        methods = Methods(list(labels) if labels else [r["method"] for r in results], results)
    else:
        methods = Methods(list(labels) if labels else [Path(f).stem for f in files], [])
        for label, path in zip(methods.labels, files):
            problems = passk.read_samples(path)
            results = passk.passk_results(problems, label, bootstrap=bootstrap, seed=seed, source_samples=[path],
                                          ks=ks)
            if results_dir is not None:
                passk.write_results(results, Path(results_dir) / f"{label}.json")
            methods.results.append(results)
            methods.problems[label] = problems
    if len(set(methods.labels)) != len(methods.labels):
        raise ValueError(f"method labels must be unique, got {methods.labels}; set labels")
    print(f"{len(files)} methods: " + ", ".join(f"{label} ({r['n_problems']} problems, n = {r['n_samples']})"
                                                for label, r in zip(methods.labels, methods.results)))
    return methods


def passk_frame(methods: Methods):
    """Pass@k in percent, one row per method and one column per k (pandas DataFrame), each method's
    chance floor (where its results have one) in a row ``<label> chance floor`` below it."""
    import pandas as pd

    rows = {}
    for label, results in zip(methods.labels, methods.results):
        rows[label] = {int(k): 100 * v for k, v in results["pass_at_k"].items()}
        if "chance_floor" in results:
            rows[f"{label} chance floor"] = {int(k): 100 * v for k, v in results["chance_floor"].items()}
    frame = pd.DataFrame(rows).T
    frame = frame[sorted(frame.columns)]
    frame.columns = [f"pass@{k}" for k in frame.columns]
    return frame.round(2)


def passk_tables(methods: Methods) -> str:
    """Each method's Pass@k table with 95% intervals (overall, then per dataset), as text."""
    from .passk import format_table

    return "\n\n".join(format_table(r) for r in methods.results)


def bar_ks(methods: Methods, ks: Sequence[int] | None = None) -> list[int]:
    """The k of the bar chart: given, else 1, a middle power of two and the largest k all methods have."""
    if ks:
        return list(ks)
    shared = sorted(set.intersection(*(set(int(k) for k in r["pass_at_k"]) for r in methods.results)))
    if not shared:
        raise ValueError("the methods share no k value")
    return sorted({shared[0], shared[len(shared) // 2], shared[-1]})


def baseline_label(methods: Methods, baseline: str | None) -> str:
    """The baseline for improvements and paired comparisons: given (must be a label), else 'grpo' if
    present, else the first method."""
    if baseline is not None:
        if baseline not in methods.labels:
            raise ValueError(f"baseline {baseline!r} is not one of the methods {methods.labels}")
        return baseline
    return "grpo" if "grpo" in methods.labels else methods.labels[0]


def paired_comparisons(methods: Methods, baseline: str, *, bootstrap: int = 1000, seed: int = 0,
                       ks: Sequence[int] | None = None) -> str:
    """Each method minus the baseline on the same problems (paired bootstrap) at ``ks`` (None: 1, 2, 4, ..., n),
    as text; needs samples."""
    from . import passk

    if not methods.problems:
        return "paired comparisons need samples files (results files hold no per-problem counts)"
    blocks = [passk.format_comparison(passk.compare_methods(
        methods.problems[label], methods.problems[baseline], method_a=label, method_b=baseline,
        bootstrap=bootstrap, seed=seed, ks=ks)) for label in methods.labels if label != baseline]
    return "\n\n".join(blocks) or f"only the baseline {baseline!r}: nothing to compare"


def plot_improvement(methods: Methods, baseline: str, save_to: str | os.PathLike | None = None, *,
                     bootstrap: int = 1000, seed: int = 0):
    """Each method's Pass@k minus the baseline's (plots.plot_improvement) with the paired 95% bands of
    `passk.compare_methods` shaded (from samples files; results files give bare lines, said in a note);
    None, with a note, when the baseline is the only method."""
    from . import passk
    from .plots import plot_improvement as plot

    if len(methods.labels) < 2:
        print(f"only {baseline!r}: no other method to compare")
        return None
    comparisons = None
    if methods.problems:
        comparisons = {label: passk.compare_methods(methods.problems[label], methods.problems[baseline],
                                                    method_a=label, method_b=baseline, bootstrap=bootstrap,
                                                    seed=seed)
                       for label in methods.labels if label != baseline}
    else:
        print("no paired bands: they need samples files (results files hold no per-problem counts)")
    return plot(methods.results, methods.labels, baseline=baseline, comparisons=comparisons, save_to=save_to)


def figure_path(folder: str | os.PathLike | None, name: str) -> Path | None:
    """``folder/name``, or None (do not save) when no folder is set."""
    return None if folder is None else Path(folder) / name
