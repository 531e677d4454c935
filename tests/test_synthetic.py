"""Tests of the synthetic chart generator and its registry entry."""

from __future__ import annotations

import io
import re

import pytest
from matplotlib.figure import Figure

from nbhelpers import data
from nbhelpers.completion_parsing import extract_answer, matches_output_format, reference_steps
from nbhelpers.synthetic import SYNTHETIC_CHART_TYPES, make_synthetic_examples


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def oracle(question: str, table: dict) -> tuple[str, str]:
    """(question kind, answer recomputed from the table alone, independently of the generator)."""
    values = {row[0]: int(row[1]) for row in table["rows"]}
    if m := re.fullmatch(r"What is the \w+ for (.+)\?", question):
        return "value", str(values[m.group(1)])
    if m := re.fullmatch(r"Which \w+ has the (highest|lowest) \w+\?", question):
        pick = max if m.group(1) == "highest" else min
        return m.group(1), pick(values, key=values.get)
    if m := re.fullmatch(r"What is the difference in \w+ between (.+) and (.+)\?", question):
        return "difference", str(abs(values[m.group(1)] - values[m.group(2)]))
    if re.fullmatch(r"What is the total \w+ over all \w+ values shown\?", question):
        return "sum", str(sum(values.values()))
    raise AssertionError(f"unknown question template: {question}")


@pytest.fixture(scope="module")
def examples():
    return make_synthetic_examples(24, seed=7)


def test_same_seed_gives_identical_bytes_and_answers(examples):
    again = make_synthetic_examples(24, seed=7)
    assert [png(e["image"]) for e in examples] == [png(e["image"]) for e in again]
    assert [{k: v for k, v in e.items() if k != "image"} for e in examples] == \
        [{k: v for k, v in e.items() if k != "image"} for e in again]
    other = make_synthetic_examples(24, seed=8)
    assert [e["question"] for e in other] != [e["question"] for e in examples]


def test_examples_do_not_depend_on_n_and_splits_differ(examples):
    prefix = make_synthetic_examples(5, seed=7)
    assert [png(e["image"]) for e in prefix] == [png(e["image"]) for e in examples[:5]]
    test_split = make_synthetic_examples(5, seed=7, split="test")
    assert {e["id"] for e in test_split}.isdisjoint(e["id"] for e in examples)
    assert [e["table"] for e in test_split] != [e["table"] for e in examples[:5]]


def test_answers_match_the_tables(examples):
    kinds = set()
    for example in examples:
        kind, answer = oracle(example["question"], example["table"])
        assert example["answer"] == answer, example["id"]
        kinds.add(kind)
    assert kinds == {"value", "highest", "lowest", "difference", "sum"}


def test_schema_tables_and_reasoning(examples):
    for k, example in enumerate(examples):
        assert set(example) == set(data.EXAMPLE_KEYS)
        assert example["id"] == f"synthetic-train-7-{k}" and example["dataset"] == "synthetic"
        table = example["table"]
        assert len(table["columns"]) == 2 and 3 <= len(table["rows"]) <= 6
        assert all(isinstance(cell, str) for row in table["rows"] for cell in row)
        lines = example["reasoning"].split("\n")
        assert 2 <= len(lines) <= 3
        assert [line.split(":")[0] for line in lines] == [f"<step-{i}>" for i in range(1, len(lines) + 1)]
        words = sum(len(step.split()) for step in reference_steps(example["reasoning"]))
        assert 20 <= words <= 60, example["reasoning"]


@pytest.mark.parametrize("chart_type", SYNTHETIC_CHART_TYPES)
def test_every_chart_type_renders(chart_type):
    [example] = make_synthetic_examples(1, seed=3, image_size=(96, 80), chart_types=(chart_type,))
    image = example["image"]
    assert example["chart_type"] == chart_type
    assert image.mode == "RGB" and image.size == (96, 80)
    assert len(image.getcolors(96 * 80)) > 10  # more than a blank canvas: marks, text, antialiasing


def test_chart_types_cycle(examples):
    assert [e["chart_type"] for e in examples[:8]] == list(SYNTHETIC_CHART_TYPES) * 2


def test_all_charts_of_a_call_share_one_figure(monkeypatch):
    """Drawing stays cheap by reusing one Agg figure per call (no figure per chart, no pyplot)."""
    from nbhelpers import synthetic

    made = []

    def counting_figure(*args, **kwargs):
        made.append(args)
        return Figure(*args, **kwargs)

    monkeypatch.setattr(synthetic, "Figure", counting_figure)
    examples = make_synthetic_examples(8, seed=1)
    assert len(examples) == 8 and len(made) == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"n": -1}, "n must be"),
    ({"n": 1, "image_size": (20, 112)}, "28 x 28"),
    ({"n": 1, "chart_types": ("bar", "radar")}, "chart_types"),
    ({"n": 1, "chart_types": ()}, "chart_types"),
    ({"n": 1, "split": "val"}, "split"),
])
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_synthetic_examples(**kwargs)


def test_perfect_completions_parse_back(examples):
    for example in examples:
        completion = data.perfect_completion(example)
        assert matches_output_format(completion), completion
        assert extract_answer(completion) == example["answer"]


def test_registry_loads_synthetic_with_default_size_and_options():
    default = data.load_examples("synthetic", seed=2)
    assert len(default) == 64
    small = data.load_examples("synthetic", subset_size=3, seed=2, image_size=(64, 48), chart_types=("pie",))
    assert [e["id"] for e in small] == [e["id"] for e in default][:3]
    assert [(e["chart_type"], e["image"].size, e["image"].mode) for e in small] == [("pie", (64, 48), "RGB")] * 3
    generated = make_synthetic_examples(3, seed=2, image_size=(64, 48), chart_types=("pie",))
    assert [e["image"].tobytes() for e in small] == [e["image"].tobytes() for e in generated]
    assert data.load_examples("synthetic", split="test", subset_size=1, seed=2)[0]["id"] == "synthetic-test-2-0"


def test_start_offsets_and_text_only_examples_match_the_full_stream():
    full = make_synthetic_examples(6, seed=3, split="pretrain")
    tail = make_synthetic_examples(2, seed=3, split="pretrain", start=4)
    assert [e["id"] for e in tail] == [e["id"] for e in full[4:]]
    assert [e["image"].tobytes() for e in tail] == [e["image"].tobytes() for e in full[4:]]
    text_only = make_synthetic_examples(6, seed=3, split="pretrain", draw=False)
    assert all(e["image"] is None for e in text_only)
    keys = ("question", "answer", "table", "reasoning", "chart_type")
    assert [[e[k] for k in keys] for e in text_only] == [[e[k] for k in keys] for e in full]
    assert {e["id"] for e in full}.isdisjoint(e["id"] for e in make_synthetic_examples(6, seed=3, split="train"))
