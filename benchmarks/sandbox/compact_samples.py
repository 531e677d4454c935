"""Compact the study's full samples files and check that every number of results/ comes out the same.

    PYTHONPATH=$PWD python benchmarks/sandbox/compact_samples.py            # compact and check
    PYTHONPATH=$PWD python benchmarks/sandbox/compact_samples.py --delete   # ... then delete the full files

Full samples files ``samples/<part>.jsonl.xz`` (published by study.py before it published compact ones) become
``samples/<part>.compact.jsonl.xz`` (``nbhelpers.passk.write_compact_samples``: every problem's correct bits and
extracted answers, the completion texts of COMPLETIONS_KEPT problems). The check, before anything is deleted:
each compact file reads back to the same problems as its full file (counts, gold answers, extracted answers, the
correctness rule), and report.py's numbers recomputed from the compact files (every Pass@k, chance floor,
interval and paired difference of results/) equal those in results/ exactly. Exit 1, deleting nothing, when any
differs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import numbers
import sys
from pathlib import Path
from typing import Iterator, Sequence

SANDBOX = Path(__file__).resolve().parent
sys.path[:0] = [str(SANDBOX.parents[1]), str(SANDBOX)]

from nbhelpers import passk  # noqa: E402
from report import collect, results_files  # noqa: E402
from study_settings import COMPLETIONS_KEPT, DEFAULT_SETTINGS, SettingsError, load_settings  # noqa: E402

IGNORED_KEYS = ("source_samples",)  # the samples files' names, which compacting changes


def full_samples_path(compact: Path) -> Path:
    """samples/<part>.jsonl.xz beside samples/<part>.compact.jsonl.xz."""
    return compact.with_name(compact.name.replace(".compact.jsonl.xz", ".jsonl.xz"))


def same_problems(full: Path, compact: Path) -> list[str]:
    """Where the problems read from the two files differ (the line each was read from aside); [] if nowhere."""
    def read(path):
        return [dataclasses.replace(problem, source="") for problem in passk.read_samples(path)]

    a, b = read(full), read(compact)
    if len(a) != len(b):
        return [f"{compact}: {len(b)} problems, {full}: {len(a)}"]
    return [f"{compact}: problem {x.dataset}/{x.id} differs from {full}" for x, y in zip(a, b) if x != y]


def leaves(tree, path: str = "") -> Iterator[tuple[str, object]]:
    """(key path, value) of every leaf of a JSON tree, the IGNORED_KEYS left out."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key not in IGNORED_KEYS:
                yield from leaves(value, f"{path}.{key}" if path else str(key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from leaves(value, f"{path}[{index}]")
    else:
        yield path, tree


def compare_results(recomputed: dict[str, dict], folder: Path) -> tuple[int, list[str]]:
    """(numbers compared, differences) between recomputed results files and those in ``folder``, exactly."""
    compared, differences = 0, []
    for name, content in recomputed.items():
        path = folder / name
        if not path.is_file():
            differences.append(f"{path}: missing")
            continue
        expected = dict(leaves(json.loads(path.read_text())))
        got = dict(leaves(json.loads(json.dumps(content))))  # as written: tuples become lists
        for key in sorted(expected.keys() | got.keys()):
            if expected.get(key) != got.get(key):
                differences.append(f"{path}: {key}: {expected.get(key)!r} in the file, {got.get(key)!r} recomputed")
            elif isinstance(got[key], numbers.Real) and not isinstance(got[key], bool):
                compared += 1
    return compared, differences


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", type=Path, default=DEFAULT_SETTINGS, help="study settings (YAML)")
    parser.add_argument("--delete", action="store_true", help="delete the full samples files when every check holds")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.settings)
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    pairs = [(full_samples_path(settings.samples_path(p)), settings.samples_path(p)) for p in settings.parts()]
    pairs = [(full, compact) for full, compact in pairs if full.is_file()]
    if not pairs:
        print("no full samples files to compact")
        return 0
    problems = []
    for full, compact in pairs:
        passk.write_compact_samples(compact, full, keep=COMPLETIONS_KEPT)
        problems += same_problems(full, compact)
        print(f"{full.name}: {full.stat().st_size / 2**20:.2f} MiB -> {compact.name}: "
              f"{compact.stat().st_size / 2**20:.2f} MiB")
    compared, differences = compare_results(results_files(collect(settings)), settings.root / "results")
    for line in problems + differences:
        print(line)
    if problems or differences:
        print(f"error: {len(problems)} problem(s) and {len(differences)} number(s) differ; nothing deleted",
              file=sys.stderr)
        return 1
    print(f"the same problems from every compact file; all {compared} numbers of results/ reproduced exactly "
          f"from the compact files")
    if args.delete:
        for full, _ in pairs:
            full.unlink()
        print(f"deleted {len(pairs)} full samples files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
