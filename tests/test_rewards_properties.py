"""Property-based tests: every reward takes any completion and any gold columns without raising,
returning finite values inside its documented range, fast even on megabyte completions."""

from __future__ import annotations

import json
import math
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbhelpers.rewards import REWARD_MAXIMA, REWARD_NAMES, RewardSettings, build_reward_funcs, relaxed_correctness

GOLD_TABLE = {"columns": ["Year", "Sales"], "rows": [["2019", "12"], ["2020", "15"]]}
STEPS = ["Read the 2020 bar.", "It reaches fifteen.", "So the answer is 15."]
REASONING = "\n".join(f"<step-{k}>: {step}" for k, step in enumerate(STEPS, start=1))
PERFECT = (
    f"<think>\n<type>bar</type>\n<table>{json.dumps(GOLD_TABLE)}</table>\n"
    + "".join(f"<step-{k}>: {step}\n" for k, step in enumerate(STEPS, start=1))
    + "</think>\n<answer>15</answer>"
)
GOLD_COLUMNS = {"answer": ["15"], "chart_type": ["bar"], "table": [GOLD_TABLE], "reasoning": [REASONING]}
FENCED = PERFECT.replace("<table>", "<table>```json\n").replace("</table>", "\n```</table>")

FRAGMENTS = [
    "<think>", "</think>", "<type>", "</type>", "<table>", "</table>", "<answer>", "</answer>",
    "<step-1>:", "<step-2>", "</step-1>", "<step-", "<step- 99 >:", "<think><think>", "</answer></answer>",
    "```json", "```", "{", "}", "[", "]", '"columns"', '"rows"', ": ", ", ", '"', "\\",
    "NaN", "Infinity", "-Infinity", "nan", "inf", "-inf", "1e999", "-1e-999", "9" * 400, "-0", "0", "0%",
    "1,234", "12%", "%", "15", "-5", "15.", "$5", "15 million", "yes", "No", "bar", "stacked bar",
    "\n", " ", "\t", "\r\n", "\u0000", "\ufeff", "\u202e", "\U0001F600", "\u0661\u0662", "é", "ß", "\ud7ff",
]

fragment_text = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=12)), max_size=40).map("".join)


@st.composite
def mutated_text(draw):
    """A well-formed completion with a few random edits: insertions, deletions, duplications, cuts."""
    text = draw(st.sampled_from([PERFECT, FENCED, PERFECT.replace("\n", ""), PERFECT + PERFECT]))
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        start = draw(st.integers(min_value=0, max_value=len(text)))
        end = draw(st.integers(min_value=start, max_value=min(len(text), start + 40)))
        operation = draw(st.sampled_from(["insert", "delete", "duplicate", "truncate", "replace"]))
        if operation == "insert":
            text = text[:start] + draw(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=8))) + text[start:]
        elif operation == "delete":
            text = text[:start] + text[end:]
        elif operation == "duplicate":
            text = text[:end] + text[start:end] + text[end:]
        elif operation == "truncate":
            text = text[:start]
        else:
            text = text[:start] + draw(st.sampled_from(FRAGMENTS)) + text[end:]
    return text


def as_completion(text_strategy):
    """A completion as a string, in TRL's chat form, or as junk a reward must survive."""
    return st.one_of(
        text_strategy,
        text_strategy.map(lambda text: [{"role": "assistant", "content": text}]),
        text_strategy.map(lambda text: [{"role": "assistant", "content": [{"type": "text", "text": text}]}]),
        st.sampled_from([None, 42, 1.5, [], [{"role": "assistant", "content": None}], [{"content": 7}], ["x"]]),
    )


answers = st.one_of(
    st.none(),
    st.sampled_from(["15", "-5", "0", "12%", "yes", "1,234", "nan", "inf", "1e308", "-1e308", "9" * 400, ""]),
    st.text(max_size=12),
    st.lists(st.text(max_size=5), max_size=3),
)
chart_types = st.one_of(st.none(), st.sampled_from(["bar", "Stacked Bar", ""]), st.text(max_size=8), st.integers())
cells = st.one_of(st.text(max_size=6), st.sampled_from(["nan", "-0", "1e999", "12%"]), st.integers(), st.none())
tables = st.one_of(
    st.none(),
    st.just(GOLD_TABLE),
    st.fixed_dictionaries(
        {
            "columns": st.lists(st.text(max_size=6), max_size=4),
            "rows": st.lists(st.lists(cells, max_size=4), max_size=4),
        }
    ),
    st.sampled_from([{"columns": "Year"}, {"rows": [["1"]]}, {"columns": [], "rows": [None, "x"]}, [], "table"]),
)
references = st.one_of(st.none(), st.just(REASONING), fragment_text, st.integers())

REWARDS = build_reward_funcs(RewardSettings(embedding_model=None))


def assert_all_rewards_in_range(completions, columns):
    for reward in REWARDS:
        values = reward(prompts=["p"] * len(completions), completions=completions, **columns)
        assert len(values) == len(completions), reward.__name__
        for value in values:
            assert isinstance(value, float), reward.__name__
            assert math.isfinite(value), reward.__name__
            assert 0.0 <= value <= REWARD_MAXIMA[reward.__name__], (reward.__name__, value)


@st.composite
def batches(draw, text_strategy):
    """Completions with one row of gold columns each (columns sometimes absent or too short)."""
    completions = draw(st.lists(as_completion(text_strategy), min_size=1, max_size=3))
    size = len(completions)
    columns = {
        "answer": draw(st.lists(answers, min_size=size, max_size=size)),
        "chart_type": draw(st.lists(chart_types, min_size=size, max_size=size)),
        "table": draw(st.lists(tables, min_size=size, max_size=size)),
        "reasoning": draw(st.lists(references, min_size=size, max_size=size)),
    }
    dropped = draw(st.sets(st.sampled_from(sorted(columns)), max_size=2))
    return completions, {name: values[: size - 1] if name in dropped else values for name, values in columns.items()}


BOUNDED = settings(
    max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


@BOUNDED
@given(batches(fragment_text))
def test_random_completions_score_in_range(batch):
    assert_all_rewards_in_range(*batch)


@settings(BOUNDED, max_examples=700)
@given(batches(mutated_text()))
def test_mutated_completions_score_in_range(batch):
    assert_all_rewards_in_range(*batch)


MEGABYTE = 1_000_000


@settings(BOUNDED, max_examples=8)
@given(st.sampled_from(FRAGMENTS + [PERFECT, "word "]), st.sampled_from(["", PERFECT, "<think>", "<answer>"]))
def test_megabyte_completions_score_in_range(fragment, suffix):
    text = fragment * (MEGABYTE // len(fragment)) + suffix
    assert_all_rewards_in_range([text], GOLD_COLUMNS)


MEGABYTE_CASES = {
    "huge but well formed": PERFECT.replace("<step-1>: ", "<step-1>: " + "word " * (MEGABYTE // 5))
    .replace("<answer>15", "<answer>" + "9" * 1000),
    "unclosed openings": "<table>" * (MEGABYTE // 7),
    "closings only": "</think></answer>" * (MEGABYTE // 17),
    "step markers without digits": ("<step-" + " " * 60) * (MEGABYTE // 66),
    "deeply nested JSON table": "<table>" + "[" * (MEGABYTE // 2) + "]" * (MEGABYTE // 2) + "</table>",
    "repeated blocks": PERFECT * (MEGABYTE // len(PERFECT)),
    "one long word": "<think><step-1>: " + "x" * MEGABYTE + "</think><answer>" + "1," * 1000 + "</answer>",
}


@pytest.mark.parametrize("text", list(MEGABYTE_CASES.values()), ids=list(MEGABYTE_CASES))
def test_megabyte_completion_is_scored_by_all_rewards_in_under_a_second(text):
    assert len(text) >= 0.9 * MEGABYTE
    columns = GOLD_COLUMNS
    started = time.perf_counter()
    results = {reward.__name__: reward(completions=[text], **columns) for reward in REWARDS}
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0, f"{elapsed:.2f} s"
    assert set(results) == set(REWARD_NAMES)
    assert all(0.0 <= values[0] <= REWARD_MAXIMA[name] for name, values in results.items())


numbers_as_text = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.sampled_from(["", ".", "%", "1,234", "-0", "1e999", "nan"]),
    st.text(max_size=8),
)


@settings(BOUNDED, max_examples=500)
@given(numbers_as_text, numbers_as_text)
def test_relaxed_correctness_is_total_and_reflexive(prediction, target):
    assert isinstance(relaxed_correctness(prediction, target), bool)
    assert relaxed_correctness(target, target) is True
