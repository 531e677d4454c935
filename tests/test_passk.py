"""Pass@k estimator, samples reading, tables with bootstrap intervals, paired comparison,
results files, and the samples -> passk -> plot command-line path."""

import argparse
import json
import re
from fractions import Fraction
from math import comb

import numpy as np
import pytest

from nbhelpers import passk, plots
from nbhelpers.passk import ProblemCounts


def exact_pass_at_k(n, c, k):
    return 1 - Fraction(comb(n - c, k), comb(n, k))  # comb is 0 when k > n - c


def samples_record(problem_id, dataset, correct):
    return {"id": problem_id, "dataset": dataset, "question": "What is the tallest bar?", "answer": "15",
            "completions": [f"<answer>{i}</answer>" for i in range(len(correct))], "correct": correct,
            "meta": {"seed": 0}}


def write_samples(path, records, final_newline=True):
    """Write records (dicts, or raw strings written as they are) as JSON Lines."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + ("\n" if final_newline else ""), encoding="utf-8")
    return path


def make_problems(counts, n, dataset="ChartQA", start=0):
    return [ProblemCounts(dataset, str(start + i), n, c) for i, c in enumerate(counts)]


# --- the estimator -----------------------------------------------------------------------------

@pytest.mark.parametrize("n, c, k", [
    (1, 0, 1), (1, 1, 1), (2, 1, 1), (2, 1, 2), (10, 3, 1), (10, 3, 5), (10, 3, 7), (10, 3, 8),
    (256, 0, 1), (256, 1, 1), (256, 1, 256), (256, 5, 16), (256, 128, 2), (256, 250, 4),
    (256, 3, 253), (256, 3, 254), (256, 255, 256),
    (100000, 1, 1), (100000, 1, 99999), (100000, 10, 1000), (100000, 500, 128),
    (100000, 99000, 2), (100000, 7, 65536), (100000, 50000, 3), (100000, 2, 50000),
])
def test_pass_at_k_matches_closed_form(n, c, k):
    exact = exact_pass_at_k(n, c, k)
    value = passk.pass_at_k(n, c, k)
    assert isinstance(value, float)
    if exact == 0:
        assert value == 0.0
    else:
        assert abs(Fraction(value) - exact) / exact < Fraction(1, 10**9)


@pytest.mark.parametrize("k", [1, 5, 32, 63, 64])
def test_pass_at_k_array_matches_closed_form_for_every_c(k):
    n = 64
    values = passk.pass_at_k_array(n, np.arange(n + 1), k)
    expected = np.array([float(exact_pass_at_k(n, c, k)) for c in range(n + 1)])
    np.testing.assert_allclose(values, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("n, c, k, message", [
    (10, 3, 0, "k must be at least 1"),
    (10, 3, -1, "non-negative"),
    (10, 3, 11, "larger than the number of samples"),
    (10, 11, 1, "larger than the number of samples"),
    (10, -1, 1, "non-negative"),
    (-1, 0, 1, "non-negative"),
    (0, 0, 1, "larger than the number of samples"),
    (10, 3.0, 1, "must be an integer"),
    (10, True, 1, "must be an integer"),
    (10.5, 3, 1, "must be an integer"),
])
def test_pass_at_k_rejects_invalid_input(n, c, k, message):
    with pytest.raises(ValueError, match=message):
        passk.pass_at_k(n, c, k)


@pytest.mark.parametrize("counts, message", [
    ([0, 11], "larger than the number of samples"),
    ([-2, 1], "non-negative"),
    ([0.5, 1.0], "must hold integers"),
])
def test_pass_at_k_array_rejects_invalid_counts(counts, message):
    with pytest.raises(ValueError, match=message):
        passk.pass_at_k_array(10, np.array(counts), 2)


@pytest.mark.parametrize("n, expected", [
    (1, [1]), (2, [1, 2]), (3, [1, 2, 3]), (8, [1, 2, 4, 8]), (10, [1, 2, 4, 8, 10]),
    (256, [1, 2, 4, 8, 16, 32, 64, 128, 256]), (300, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]),
])
def test_k_values_are_powers_of_two_then_n(n, expected):
    assert passk.k_values(n) == expected


@pytest.mark.parametrize("n, ks, expected", [
    (256, None, [1, 2, 4, 8, 16, 32, 64, 128, 256]), (10, None, [1, 2, 4, 8, 10]), (16, [8, 1, 8], [1, 8]),
    (16, [16], [16]), (16, [], [1, 2, 4, 8, 16]),
])
def test_selected_k_values_are_passk_ks_else_the_powers_of_two(n, ks, expected):
    assert passk.selected_k_values(n, ks) == expected


@pytest.mark.parametrize("ks, bad", [([1, 17], "[17]"), ([0, 2], "[0]"), ([2.5], "[2.5]"), ([True], "[True]")])
def test_selected_k_values_name_the_k_outside_1_to_n(ks, bad):
    with pytest.raises(ValueError, match=re.escape(f"k values {bad} are not integers in [1, n = 16]")):
        passk.selected_k_values(16, ks)


def test_results_and_comparisons_at_the_configured_k(tmp_path):
    problems = make_problems([1, 3, 0, 8], 8)
    results = passk.passk_results(problems, "A", bootstrap=20, ks=[4, 1])
    assert list(results["pass_at_k"]) == ["1", "4"] and results["meta"]["k_values"] == [1, 4]
    assert results["pass_at_k"]["4"] == pytest.approx(np.mean([passk.pass_at_k(8, p.c, 4) for p in problems]))
    comparison = passk.compare_methods(problems, make_problems([0, 0, 0, 8], 8), bootstrap=20, ks=[2])
    assert list(comparison["difference"]) == ["2"]
    with pytest.raises(ValueError, match=re.escape("k values [16] are not integers in [1, n = 8]")):
        passk.passk_results(problems, "A", bootstrap=20, ks=[16])


# --- reading samples files ---------------------------------------------------------------------

GOOD = samples_record(1, "ChartQA", [True, False, False])


@pytest.mark.parametrize("records, final_newline, line, message", [
    ([GOOD, "{not json", GOOD], True, 2, "not valid JSON"),
    ([GOOD, GOOD, '{"id": 3, "dataset": "Char'], False, 3, "last line is truncated .* rerun sampling"),
    ([GOOD, '{"id": 3, "dataset": "Char'], True, 2, "not valid JSON"),
    ([{k: v for k, v in GOOD.items() if k != "correct"}], True, 1, r"missing field\(s\) correct"),
    ([GOOD, {**GOOD, "id": 2, "correct": [True, False]}], True, 2,
     r"len\(correct\)=2 differs from len\(completions\)=3"),
    ([{**GOOD, "correct": [1, 0, 0]}], True, 1, "must hold booleans; item 0 is 1"),
    ([{**GOOD, "correct": "yes"}], True, 1, "must be a list of booleans"),
    ([{**GOOD, "completions": "x"}], True, 1, "must be a list of strings"),
    ([{**GOOD, "completions": [], "correct": []}], True, 1, "has no samples"),
    ([{**GOOD, "dataset": ""}], True, 1, "'dataset' must be a non-empty string"),
    ([{**GOOD, "id": None}], True, 1, "'id' must be a string or an integer"),
    (["[1, 2]"], True, 1, "expected a JSON object"),
])
def test_read_samples_names_file_and_line_of_bad_input(tmp_path, records, final_newline, line, message):
    path = write_samples(tmp_path / "samples.jsonl", records, final_newline)
    with pytest.raises(ValueError, match=f"{path}:{line}: .*{message}"):
        passk.read_samples(path)


def test_read_samples_counts_correct_and_skips_blank_lines(tmp_path):
    path = write_samples(tmp_path / "s.jsonl", [
        samples_record(7, "ChartQA", [True, False, True, True]), "",
        samples_record("q8", "PlotQA", [False] * 4)], final_newline=False)
    problems = passk.read_samples(path)
    assert [(p.dataset, p.id, p.n, p.c) for p in problems] == [("ChartQA", "7", 4, 3), ("PlotQA", "q8", 4, 0)]
    assert problems[1].source == f"{path}:3"


def test_read_samples_rejects_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match="holds no problems"):
        passk.read_samples(path)


def test_mixed_n_is_an_error_naming_the_line_unless_allowed(tmp_path):
    first = write_samples(tmp_path / "a.jsonl", [samples_record(i, "ChartQA", [True] + [False] * 7) for i in range(3)])
    second = write_samples(tmp_path / "b.jsonl", [samples_record(i, "PlotQA", [True, False, False, True, False])
                                                  for i in range(3)])
    problems = passk.read_samples([first, second])
    with pytest.raises(ValueError, match=f"{second}:1: problem PlotQA/0 has n=5 .* {first}:1 has n=8; .*allow_mixed_n"):
        passk.passk_results(problems, "NSR")
    results = passk.passk_results(problems, "NSR", bootstrap=50, allow_mixed_n=True)
    assert list(results["pass_at_k"]) == ["1", "2", "4"]
    assert results["meta"]["mixed_n"] == {"n_values": [5, 8], "dropped_k": [8]}
    assert results["n_samples"] == 5
    # each problem uses its own n: ChartQA 1 of 8 correct, PlotQA 2 of 5
    expected_k2 = (3 * passk.pass_at_k(8, 1, 2) + 3 * passk.pass_at_k(5, 2, 2)) / 6
    assert results["pass_at_k"]["2"] == pytest.approx(expected_k2, rel=1e-12)


def test_duplicate_problems_are_an_error_naming_both_lines(tmp_path):
    path = write_samples(tmp_path / "dup.jsonl", [GOOD, samples_record(2, "ChartQA", [True] * 3), GOOD])
    with pytest.raises(ValueError, match=f"{path}:3: problem ChartQA/1 appears twice \\(first at {path}:1\\)"):
        passk.passk_results(passk.read_samples(path), "GRPO")


# --- tables and intervals ----------------------------------------------------------------------

def test_results_table_overall_and_per_dataset():
    problems = make_problems([0, 4, 8], 8, "ChartQA") + make_problems([2, 2], 8, "PlotQA", start=10)
    results = passk.passk_results(problems, "PSR", bootstrap=200, seed=3, source_samples=["s.jsonl"])
    assert (results["method"], results["dataset"], results["n_problems"], results["n_samples"]) == ("PSR", "all", 5, 8)
    for k in (1, 2, 4, 8):
        expected = np.mean([passk.pass_at_k(8, p.c, k) for p in problems])
        assert results["pass_at_k"][str(k)] == pytest.approx(expected, rel=1e-12)
    plotqa = results["meta"]["per_dataset"]["PlotQA"]
    assert plotqa["n_problems"] == 2
    assert plotqa["pass_at_k"]["1"] == pytest.approx(0.25)
    assert results["meta"]["source_samples"] == ["s.jsonl"]
    assert results["meta"]["bootstrap"] == {"resamples": 200, "seed": 3, "level": 0.95}
    assert results["meta"]["k_values"] == [1, 2, 4, 8]
    assert results["meta"]["created"].endswith("+00:00")
    passk.validate_results(results)


def test_single_dataset_results_name_it():
    results = passk.passk_results(make_problems([1, 2], 4, "EvoChart"), "GRPO", bootstrap=20)
    assert results["dataset"] == "EvoChart"
    assert list(results["meta"]["per_dataset"]) == ["EvoChart"]


def random_problems(count, n=16, seed=0):
    rng = np.random.default_rng(seed)
    return make_problems(rng.binomial(n, rng.uniform(0, 0.6, size=count)).tolist(), n)


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    problems = random_problems(60)
    first = passk.passk_results(problems, "A", bootstrap=300, seed=7)
    again = passk.passk_results(problems, "A", bootstrap=300, seed=7)
    other_seed = passk.passk_results(problems, "A", bootstrap=300, seed=8)
    assert first["ci95"] == again["ci95"]
    assert first["ci95"] != other_seed["ci95"]
    for k, value in first["pass_at_k"].items():
        low, high = first["ci95"][k]
        assert low <= value <= high
        if k != "16":
            assert low < high


def test_bootstrap_interval_shrinks_with_more_problems():
    def width(count):
        results = passk.passk_results(random_problems(count, seed=1), "A", bootstrap=400)
        return np.array([high - low for low, high in results["ci95"].values()])

    small, large = width(20), width(2000)
    assert np.all(large[:-1] < small[:-1] / 4)  # ~ 1/sqrt(100) of the width; k = n is 0/1 per problem


def test_bootstrap_of_identical_values_is_a_point():
    values = np.full((7, 2), 0.3)
    low, high = passk.bootstrap_mean_ci(values, bootstrap=50)
    np.testing.assert_allclose(np.vstack([low, high]), 0.3, rtol=0, atol=1e-15)
    assert np.all(low <= values.mean(axis=0)) and np.all(values.mean(axis=0) <= high)


@pytest.mark.parametrize("resamples", [0, -5, 2.5])
def test_bootstrap_rejects_invalid_resample_count(resamples):
    with pytest.raises(ValueError, match="bootstrap"):
        passk.bootstrap_mean_ci(np.ones((3, 1)), bootstrap=resamples)


def test_paired_comparison_sign_and_interval():
    n = 16
    base_counts = [0] * 20 + [3] * 20
    better_counts = [4] * 20 + [3] * 20  # better on the first half, equal on the rest
    better, base = make_problems(better_counts, n), make_problems(base_counts, n)[::-1]  # order must not matter
    comparison = passk.compare_methods(better, base, method_a="NSR", method_b="PSR", bootstrap=500)
    assert (comparison["method_a"], comparison["method_b"], comparison["n_problems"]) == ("NSR", "PSR", 40)
    for k in passk.k_values(n):
        difference = comparison["difference"][str(k)]
        assert difference == pytest.approx(0.5 * passk.pass_at_k(n, 4, k), rel=1e-12)
        low, high = comparison["ci95"][str(k)]
        assert 0 < low <= difference <= high
    swapped = passk.compare_methods(base, better, bootstrap=500)
    assert swapped["difference"]["1"] == pytest.approx(-comparison["difference"]["1"])
    assert swapped["ci95"]["1"][1] < 0


def test_paired_comparison_names_problems_missing_from_either_side():
    a = make_problems([1, 2, 3], 8)
    b = make_problems([1, 2], 8) + [ProblemCounts("PlotQA", "9", 8, 1)]
    with pytest.raises(ValueError, match=r"only in A: \[ChartQA/2\]; only in B: \[PlotQA/9\]"):
        passk.compare_methods(a, b)


def test_paired_comparison_uses_k_both_methods_have():
    comparison = passk.compare_methods(make_problems([1, 2], 8), make_problems([1, 1], 4), bootstrap=20)
    assert list(comparison["difference"]) == ["1", "2", "4"]


# --- results files -----------------------------------------------------------------------------

@pytest.fixture
def results():
    problems = make_problems([1, 5], 8, "ChartQA") + make_problems([0, 8], 8, "PlotQA", start=5)
    return passk.passk_results(problems, "W-REINFORCE", bootstrap=50)


def test_results_round_trip_atomically(tmp_path, results):
    path = passk.write_results(results, tmp_path / "sub" / "wr.json")
    assert passk.load_results(path) == results
    assert [p.name for p in path.parent.iterdir()] == ["wr.json"]  # no temp file left behind


def test_invalid_results_do_not_replace_an_existing_file(tmp_path, results):
    path = passk.write_results(results, tmp_path / "r.json")
    before = path.read_text()
    broken = {**results, "pass_at_k": {**results["pass_at_k"], "1": 2.0}}
    with pytest.raises(ValueError, match="pass_at_k.1"):
        passk.write_results(broken, path)
    assert path.read_text() == before
    assert len(list(tmp_path.iterdir())) == 1


def _set(path, value):
    def mutate(results):
        *parents, last = path
        target = results
        for key in parents:
            target = target[key]
        if value is KeyError:
            del target[last]
        else:
            target[last] = value
    return mutate


@pytest.mark.parametrize("mutate, key", [
    (_set(["method"], KeyError), "method"),
    (_set(["dataset"], 3), "dataset"),
    (_set(["n_problems"], 0), "n_problems"),
    (_set(["n_samples"], "8"), "n_samples"),
    (_set(["pass_at_k", "1"], 1.5), "pass_at_k.1"),
    (_set(["pass_at_k", "0"], 0.5), "pass_at_k.0"),
    (_set(["pass_at_k"], {}), "pass_at_k"),
    (_set(["ci95", "2"], [0.6, 0.4]), "ci95.2"),
    (_set(["ci95", "4"], KeyError), "ci95.4"),
    (_set(["ci95", "16"], [0.1, 0.2]), "ci95.16"),
    (_set(["meta"], KeyError), "meta"),
    (_set(["meta", "per_dataset", "PlotQA", "pass_at_k", "1"], -0.1), "meta.per_dataset.PlotQA.pass_at_k.1"),
    (_set(["meta", "per_dataset", "ChartQA", "n_samples"], None), "meta.per_dataset.ChartQA.n_samples"),
])
def test_load_results_names_file_and_key(tmp_path, results, mutate, key):
    mutate(results)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(results))
    with pytest.raises(ValueError, match=f"{path}: key '{key}'"):
        passk.load_results(path)


def test_load_results_rejects_invalid_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"method": "A",')
    with pytest.raises(ValueError, match=f"{path}: not valid JSON"):
        passk.load_results(path)


def test_format_table_lists_every_k_overall_and_per_dataset(results):
    text = passk.format_table(results)
    assert text.startswith("W-REINFORCE (all): 4 problems, n = 8")
    assert "W-REINFORCE (PlotQA): 2 problems, n = 8" in text
    one = results["pass_at_k"]["1"]
    assert f"{one:.2%}" in text
    assert len([line for line in text.splitlines() if line.strip().startswith("8 ")]) == 3


# --- command line: samples -> passk -> plot ----------------------------------------------------

def parse(module, argv):
    parser = argparse.ArgumentParser()
    module.add_cli_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def test_cli_samples_to_passk_to_plot_for_two_methods(tmp_path, capsys):
    rng = np.random.default_rng(0)
    paths = {}
    for method, rate in (("grpo", 0.5), ("nsr", 0.3)):
        records = [samples_record(i, dataset, (rng.random(8) < rate * (1 + i % 2)).tolist())
                   for dataset in ("ChartQA", "PlotQA") for i in range(6)]
        paths[method] = write_samples(tmp_path / f"{method}.jsonl", records)
    results_paths = {m: tmp_path / "results" / f"{m}.json" for m in paths}
    assert passk.run_from_cli(parse(passk, ["--samples", paths["grpo"], "--out", results_paths["grpo"],
                                            "--method-name", "GRPO", "--bootstrap", 100])) == 0
    assert passk.run_from_cli(parse(passk, ["--samples", paths["nsr"], "--out", results_paths["nsr"],
                                            "--bootstrap", 100, "--seed", 1, "--compare", paths["grpo"]])) == 0
    printed = capsys.readouterr().out
    assert "GRPO (all): 12 problems, n = 8" in printed
    assert "nsr - grpo (paired, 12 problems)" in printed
    grpo, nsr = (passk.load_results(results_paths[m]) for m in ("grpo", "nsr"))
    assert (grpo["method"], nsr["method"]) == ("GRPO", "nsr")
    assert list(grpo["pass_at_k"]) == ["1", "2", "4", "8"]
    assert nsr["meta"]["bootstrap"]["seed"] == 1
    assert nsr["meta"]["source_samples"] == [str(paths["nsr"])]
    assert nsr["meta"]["comparison"]["difference"]["1"] == pytest.approx(
        nsr["pass_at_k"]["1"] - grpo["pass_at_k"]["1"], abs=1e-12)

    assert passk.run_from_cli(parse(passk, ["--samples", paths["nsr"], "--out", tmp_path / "ks.json", "--bootstrap", 20,
                                            "--ks", 8, 2, "--compare", paths["grpo"]])) == 0
    at_ks = passk.load_results(tmp_path / "ks.json")
    assert list(at_ks["pass_at_k"]) == ["2", "8"] and list(at_ks["meta"]["comparison"]["difference"]) == ["2", "8"]

    figure_path = tmp_path / "figures" / "passk.png"
    assert plots.run_from_cli(parse(plots, ["--results", results_paths["grpo"], results_paths["nsr"],
                                            "--labels", "GRPO", "NSR", "--out", figure_path])) == 0
    assert figure_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_reports_a_truncated_samples_file(tmp_path):
    path = write_samples(tmp_path / "s.jsonl", [GOOD, '{"id": 2'], final_newline=False)
    with pytest.raises(ValueError, match=f"{path}:2: the last line is truncated"):
        passk.run_from_cli(parse(passk, ["--samples", path, "--out", tmp_path / "r.json"]))
    assert not (tmp_path / "r.json").exists()


def test_cli_mixed_n_needs_the_flag(tmp_path):
    path = write_samples(tmp_path / "s.jsonl", [GOOD, samples_record(2, "ChartQA", [True, False])])
    with pytest.raises(ValueError, match="--allow-mixed-n"):
        passk.run_from_cli(parse(passk, ["--samples", path, "--out", tmp_path / "r.json"]))
    assert passk.run_from_cli(parse(passk, ["--samples", path, "--out", tmp_path / "r.json",
                                            "--allow-mixed-n", "--bootstrap", 10])) == 0
    assert passk.load_results(tmp_path / "r.json")["meta"]["mixed_n"]["dropped_k"] == [3]
