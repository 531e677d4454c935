"""The chance floor of Pass@k (a chart-blind guesser drawing other problems' answers of the same type) and
compact samples files, on constructed samples files whose answers are known."""

import gzip
import json
import lzma
from fractions import Fraction

import numpy as np
import pytest

from nbhelpers import passk
from nbhelpers.completion_parsing import extract_answer
from nbhelpers.passk import ProblemCounts
from nbhelpers.rewards import answer_correct

KS = [1, 2, 4, 8, 16]


def record(problem_id, gold, answers, *, dataset="synthetic", correct=None, meta=None, compact=False):
    """A samples record whose completions hold ``answers`` (None: no answer block); correct bits scored
    with the accuracy reward's rule unless given."""
    texts = [f"<think>...</think><answer>{a}</answer>" if a is not None else "I cannot tell." for a in answers]
    bits = correct if correct is not None else [answer_correct(a, gold) for a in answers]
    line = {"id": str(problem_id), "dataset": dataset, "question": "What is it?", "answer": gold,
            "correct": bits, "meta": {"seed": 0, **(meta or {})}}
    return {**line, "answers": list(answers)} if compact else {**line, "completions": texts}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def guessing_file(path, n_problems=300, n=16, seed=0):
    """Answers drawn independently of the problem: uniform over "1".."5" and, a tenth of the time, none."""
    rng = np.random.default_rng(seed)
    choices = ["1", "2", "3", "4", "5"]
    records = []
    for i in range(n_problems):
        answers = [None if rng.random() < 0.1 else str(rng.choice(choices)) for _ in range(n)]
        records.append(record(i, str(rng.choice(choices)), answers))
    return write_jsonl(path, records)


def without_created(results):
    return {**results, "meta": {k: v for k, v in results["meta"].items() if k != "created"}}


# --- answer types ------------------------------------------------------------------------------

@pytest.mark.parametrize("gold, expected", [
    ("yes", "yes/no"), (" No. ", "yes/no"), ("YES", "yes/no"),
    ("2019", "year"), ("1800", "year"), ("2100", "year"), (2019, "year"), (["2019", "2020"], "year"),
    ("1799", "integer"), ("2101", "integer"), ("34", "integer"), ("-5", "integer"), ("1,234", "integer"),
    ("0", "integer"), ("12345", "integer"), (7, "integer"),
    ("12.5", "decimal"), ("40%", "decimal"), ("2019.0", "decimal"), ("1e3", "decimal"), (2.5, "decimal"),
    ("Japan", "text"), ("light blue", "text"), ("", "text"), ("nan", "text"), ("1,23", "text"), ([], "text"),
    ("yes please", "text"),
])
def test_answer_type(gold, expected):
    assert passk.answer_type(gold) == expected
    assert expected in passk.ANSWER_TYPES


def test_types_and_datasets_partition_the_donors():
    """Each problem draws only from other problems of its dataset and answer type: the integer problems
    answer "yes" and the other dataset answers every gold, yet neither reaches the yes/no problems."""
    problems = [ProblemCounts("a", "yes-gold", 2, 0, gold="yes", answers=("no", "no")),
                ProblemCounts("a", "no-gold", 2, 2, gold="no", answers=("no", "no")),
                ProblemCounts("a", "three", 2, 0, gold="3", answers=("yes", "yes")),
                ProblemCounts("a", "four", 2, 0, gold="4", answers=("3", None)),
                ProblemCounts("b", "yes-gold", 2, 2, gold="yes", answers=("yes", "yes")),
                ProblemCounts("b", "other", 2, 0, gold="Spain", answers=("3", "4"))]
    rates, meta = passk.chance_rates(problems)
    np.testing.assert_array_equal(rates, [0.0, 1.0, 0.5, 0.0, 0.0, 0.0])
    assert meta["types"] == {"yes/no": 3, "integer": 2, "text": 1}
    assert meta["without_donors"] == 2  # b/yes-gold (the only yes/no problem of b) and b/other


@pytest.mark.parametrize("exact_match, threshold, expected", [
    (False, 0.5, 0.5),   # "2020" and "2019.5" are within 5% of 2019; "Spain" and no answer are not
    (True, 0.5, 0.0),    # exact: none is "2019"
    (False, 1.0, 0.5),   # accuracy 1 passes a threshold of 1
    (False, 1.5, 0.0),   # nothing passes a threshold above the accuracy reward's maximum
    (True, 0.0, 1.0),    # everything passes a threshold of 0, as in rewards.is_correct
])
def test_chance_rates_use_the_samples_correctness_rule(exact_match, threshold, expected):
    problem = ProblemCounts("d", "p", 1, 0, gold="2019", answers=("1999",), exact_match=exact_match,
                            threshold=threshold)
    donor = ProblemCounts("d", "q", 4, 0, gold="1990", answers=("2020", "2019.5", "Spain", None))
    rates, _ = passk.chance_rates([problem, donor])
    assert rates[0] == expected


def test_chance_rates_need_extracted_answers():
    with pytest.raises(ValueError, match="d/p has 0 extracted answers for n = 3"):
        passk.chance_rates([ProblemCounts("d", "p", 3, 1, gold="2")])


def test_hand_made_problems_have_no_floor():
    results = passk.passk_results([ProblemCounts("d", "p", 4, 1), ProblemCounts("d", "q", 4, 2)], "m")
    assert "chance_floor" not in results and results["meta"]["chance_floor"] == {
        "not_computed": "problems without extracted answers"}


@pytest.mark.parametrize("rates, k, expected", [
    ([0.0], 1, 0.0), ([0.0], 16, 0.0), ([1.0], 1, 1.0), ([1.0], 256, 1.0), ([0.5], 1, 0.5), ([0.5], 2, 0.75),
    ([0.5], 3, 0.875), ([0.1], 2, 0.19), ([0.5, 0.0], 2, 0.375),
])
def test_chance_floor_values(rates, k, expected):
    table = passk.results_table(np.zeros((len(rates), 1)), [k], 1, 50, 0, floor=passk.chance_floor_matrix(rates, [k]))
    value, (low, high) = table["chance_floor"][str(k)], table["chance_floor_ci95"][str(k)]
    assert value == pytest.approx(expected, abs=1e-15)
    assert low <= value <= high


@pytest.mark.parametrize("rates", [[-0.1], [1.5]])
def test_chance_floor_rejects_rates_outside_0_1(rates):
    with pytest.raises(ValueError, match=r"rates must lie in \[0, 1\]"):
        passk.chance_floor_matrix(rates, [1])


# --- on constructed samples files --------------------------------------------------------------

def test_answers_independent_of_the_problem_sit_on_the_floor(tmp_path):
    results = passk.passk_results(passk.read_samples(guessing_file(tmp_path / "guess.jsonl")), "guess",
                                  bootstrap=500)
    assert results["meta"]["chance_floor"]["own_agreement"] == 1.0
    for k in map(str, KS):
        low, high = results["ci95"][k]
        assert low <= results["chance_floor"][k] <= high, k
        floor_low, floor_high = results["chance_floor_ci95"][k]
        assert floor_low <= results["chance_floor"][k] <= floor_high
    assert 0.15 < results["chance_floor"]["1"] < 0.2  # 0.9 answered x 1/5 right


def test_all_answers_right_gives_pass_at_k_1_and_the_floor_exactly(tmp_path):
    """Three problems answered "yes", one "no", every answer right: a yes-problem's donors are two
    yes-problems and the no-problem (p = 2/3), the no-problem's three yes-problems (p = 0)."""
    golds = ["yes", "no", "yes", "yes"]
    path = write_jsonl(tmp_path / "right.jsonl", [record(i, g, [g] * 4) for i, g in enumerate(golds)])
    results = passk.passk_results(passk.read_samples(path), "right", bootstrap=100)
    assert results["pass_at_k"] == {"1": 1.0, "2": 1.0, "4": 1.0}
    for k in (1, 2, 4):
        exact = (3 * (1 - Fraction(1, 3) ** k)) / 4
        assert results["chance_floor"][str(k)] == pytest.approx(float(exact), rel=1e-14)
    assert results["meta"]["per_dataset"]["synthetic"]["chance_floor"] == results["chance_floor"]
    assert results["meta"]["chance_floor"]["types"] == {"yes/no": 4}


def test_the_floor_interval_is_seeded(tmp_path):
    problems = passk.read_samples(guessing_file(tmp_path / "guess.jsonl", n_problems=40))
    first, again, other = (passk.passk_results(problems, "m", bootstrap=200, seed=seed) for seed in (3, 3, 4))
    assert first["chance_floor_ci95"] == again["chance_floor_ci95"]
    assert first["chance_floor_ci95"] != other["chance_floor_ci95"]
    assert first["chance_floor"] == other["chance_floor"]  # the estimate itself draws nothing
    assert first["meta"]["chance_floor"]["bootstrap"] == {"resamples": 200, "seed": 3, "level": passk.CI_LEVEL}


def test_inconsistent_correct_bits_show_in_own_agreement(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [record(0, "3", ["3", "4"], correct=[False, False]),
                                                 record(1, "4", ["3", "4"])])
    assert passk.passk_results(passk.read_samples(path), "m")["meta"]["chance_floor"]["own_agreement"] == 0.5


def test_format_table_shows_the_floor_beside_pass_at_k(tmp_path):
    results = passk.passk_results(passk.read_samples(guessing_file(tmp_path / "g.jsonl", n_problems=20)), "g",
                                  bootstrap=50)
    lines = passk.format_table(results).splitlines()
    assert "chance floor" in lines[1]
    row = lines[2].split()
    assert row[0] == "1" and row[4] == f"{results['chance_floor']['1']:.2%}"


@pytest.mark.parametrize("mutate, key", [
    (lambda r: r["chance_floor"].update({"1": 1.5}), "chance_floor.1"),
    (lambda r: r["chance_floor_ci95"].update({"1": [0.5, 0.1]}), "chance_floor_ci95.1"),
    (lambda r: (r["chance_floor"].pop("2"), r["chance_floor_ci95"].pop("2")), "chance_floor"),
    (lambda r: r.pop("chance_floor_ci95"), "chance_floor_ci95"),
    (lambda r: r["meta"]["per_dataset"]["synthetic"]["chance_floor"].update({"4": -0.1}),
     "meta.per_dataset.synthetic.chance_floor.4"),
])
def test_results_with_a_bad_floor_are_refused(tmp_path, mutate, key):
    path = write_jsonl(tmp_path / "s.jsonl", [record(i, g, [g, "no"]) for i, g in enumerate(["yes", "no"] * 2)])
    results = passk.passk_results(passk.read_samples(path), "m", bootstrap=20)
    passk.validate_results(results)
    mutate(results)
    with pytest.raises(ValueError, match=f"key '{key}'"):
        passk.validate_results(results)


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(answers=["3"]), r"len\(correct\)=2 differs from len\(answers\)=1"),
    (lambda r: r.update(answers=[3, "4"]), "'answers' must be a list of strings or nulls"),
    (lambda r: r.pop("completions"), r"missing field\(s\) completions \(or answers"),
    (lambda r: r["meta"].update(exact_match="yes"), "'meta.exact_match' must be true or false"),
    (lambda r: r["meta"].update(reward_threshold="high"), "'meta.reward_threshold' must be a number"),
    (lambda r: r.update(answer={"value": 3}), "'answer' must be a string, a number, null or a list"),
])
def test_bad_answer_fields_name_file_and_line(tmp_path, change, message):
    bad = record(1, "3", ["3", "4"])
    change(bad)
    path = write_jsonl(tmp_path / "s.jsonl", [record(0, "3", ["3", "4"]), bad])
    with pytest.raises(ValueError, match=f"{path}:2: .*{message}"):
        passk.read_samples(path)


# --- compact samples files ---------------------------------------------------------------------

@pytest.mark.parametrize("n_problems, keep, expected", [
    (10, 0, []), (10, 1, [0]), (10, 2, [0, 9]), (10, 4, [0, 3, 6, 9]), (10, 10, list(range(10))),
    (3, 8, [0, 1, 2]), (320, 8, [0, 45, 91, 136, 182, 227, 273, 319]),
])
def test_compact_keep_rows(n_problems, keep, expected):
    assert passk.compact_keep_rows(n_problems, keep) == expected


def read_records(path):
    opener = gzip.open if path.name.endswith(".gz") else lzma.open if path.name.endswith(".xz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.mark.parametrize("name", ["c.jsonl", "c.jsonl.gz", "c.jsonl.xz"])
def test_compact_samples_give_the_same_pass_at_k_and_floor(tmp_path, name):
    full = guessing_file(tmp_path / "full.jsonl", n_problems=30)
    compact = passk.write_compact_samples(tmp_path / name, full, keep=3)
    from_full = passk.passk_results(passk.read_samples(full), "m", bootstrap=100, seed=2)
    from_compact = passk.passk_results(passk.read_samples(compact), "m", bootstrap=100, seed=2)
    assert "chance_floor" in from_full
    assert without_created(from_compact) == without_created(from_full)
    records, originals = read_records(compact), read_records(full)
    kept = [row for row, r in enumerate(records) if r["meta"]["completions_kept"]]
    assert kept == [0, 14, 29] == [row for row, r in enumerate(records) if "completions" in r]
    assert all(r["answers"] == [extract_answer(t) for t in o["completions"]]
               for r, o in zip(records, originals))
    assert [records[row]["completions"] for row in kept] == [originals[row]["completions"] for row in kept]
    for r in records:
        assert r["meta"].pop("completions_kept") in (True, False)
    assert [{k: v for k, v in r.items() if k not in ("answers", "completions")} for r in records] == \
        [{k: v for k, v in o.items() if k != "completions"} for o in originals]


def test_compacting_is_reproducible_and_idempotent(tmp_path):
    full = guessing_file(tmp_path / "full.jsonl", n_problems=12)
    first = passk.write_compact_samples(tmp_path / "a.jsonl.xz", full, keep=2).read_bytes()
    again = passk.write_compact_samples(tmp_path / "a.jsonl.xz", full, keep=2).read_bytes()
    assert first == again
    twice = passk.write_compact_samples(tmp_path / "b.jsonl", tmp_path / "a.jsonl.xz", keep=2)
    assert read_records(twice) == read_records(tmp_path / "a.jsonl.xz")
    fewer = read_records(passk.write_compact_samples(tmp_path / "c.jsonl", tmp_path / "a.jsonl.xz", keep=4))
    assert [r["meta"]["completions_kept"] for r in fewer] == [row in (0, 11) for row in range(12)]


def test_compacting_a_bad_file_names_it_and_writes_nothing(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [record(0, "3", ["3"], correct=[1])])
    with pytest.raises(ValueError, match=f"{bad}:1: .*must hold booleans"):
        passk.write_compact_samples(tmp_path / "out.jsonl.xz", bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]
