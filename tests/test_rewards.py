"""Table-driven tests of the Chart-RVR rewards, the relaxed-accuracy metric and their parsing."""

from __future__ import annotations

import json
import pickle
import sys
import types
import zlib

import numpy as np
import pytest

from nbhelpers import rewards
from nbhelpers.completion_parsing import (
    completion_text,
    extract_answer,
    extract_table,
    reasoning_steps,
    reference_steps,
    strip_code_fence,
)
from nbhelpers.rewards import (
    REWARD_FUNCS,
    REWARD_MAXIMA,
    REWARD_NAMES,
    RewardSettings,
    accuracy_reward,
    build_reward_funcs,
    cell_accuracy,
    chart_type_reward,
    count_reward,
    format_reward,
    is_correct,
    length_think_reward,
    lexical_similarity,
    load_sentence_encoder,
    process_style_reward,
    relaxed_correctness,
    reward_weights,
    score_completions,
    table_style_reward,
    total_reward,
)

GOLD_TABLE = {"columns": ["Year", "Sales"], "rows": [["2019", "12"], ["2020", "15"]]}
GOLD_STEPS = [
    "Locate the bars of the chart and read the year under each of them.",
    "The bar for 2019 reaches twelve on the sales axis.",
    "The bar for 2020 reaches fifteen on the sales axis.",
    "The question asks for the sales value of the year 2020.",
    "So we take the height of the 2020 bar.",
    "That height is fifteen, which is the answer.",
]
GOLD_REASONING = "\n".join(f"<step-{k}>: {step}" for k, step in enumerate(GOLD_STEPS, start=1))
GOLD = {"answer": "15", "chart_type": "bar", "table": GOLD_TABLE, "reasoning": GOLD_REASONING}
GOLD_COLUMNS2 = {name: [value] * 2 for name, value in GOLD.items()}


def build_completion(
    chart_type: str = "bar",
    table_text: str | None = None,
    steps: list[str] = GOLD_STEPS,
    answer: str = "15",
) -> str:
    """A completion in the Chart-RVR shape; defaults make it perfect for GOLD."""
    table_text = json.dumps(GOLD_TABLE) if table_text is None else table_text
    step_lines = "".join(f"<step-{k}>: {step}\n" for k, step in enumerate(steps, start=1))
    return (
        f"<think>\n<type>{chart_type}</type>\n<table>{table_text}</table>\n{step_lines}</think>\n"
        f"<answer>{answer}</answer>"
    )


PERFECT = build_completion()


def call(reward, completions, **overrides):
    """Call a reward as TRL does, with the gold columns of GOLD repeated per completion."""
    columns = {name: [value] * len(completions) for name, value in GOLD.items()}
    columns.update(overrides)
    return reward(prompts=["q"] * len(completions), completions=completions, completion_ids=None, **columns)


# --------------------------------------------------------------------------- relaxed_correctness

RELAXED_CASES = [
    # (prediction, target, expected verdict, why)
    ("15", "15", True, "same number"),
    ("15.7", "15", True, "4.7% off"),
    ("15.8", "15", False, "5.3% off"),
    ("105", "100", True, "exactly 5% off is inside"),
    ("95", "100", True, "exactly 5% below is inside"),
    ("15.0", "15", True, "same value, other spelling"),
    (" 15. ", "15", True, "whitespace and one trailing period stripped"),
    ("Yes", "yes", True, "yes/no: case-insensitive"),
    ("yes.", "Yes", True, "yes/no: trailing period"),
    ("No", "Yes", False, "yes/no: wrong"),
    ("yes, it is", "Yes", False, "yes/no: extra words"),
    ("Asia..", "Asia", False, "only one trailing period is stripped"),
    ("12%", "0.12", True, "percentages: trailing % divides by 100"),
    ("50%", "0.5", True, "percentages: half"),
    ("12.3%", "12%", True, "percentages: both sides"),
    ("12%", "12", False, "percentages: 0.12 against 12, as in pix2struct"),
    ("12", "12%", False, "percentages: 12 against 0.12"),
    ("-5.1", "-5", True, "negative target: 2% off"),
    ("-4.8", "-5", True, "negative target: 4% off"),
    ("-5.3", "-5", False, "negative target: 6% off"),
    ("5", "-5", False, "negative target: wrong sign"),
    ("-100", "-5", False, "negative target: the original's missing abs() accepted this"),
    ("0", "0", True, "zero target: equal"),
    ("0.0", "0", True, "zero target: exact numeric equality"),
    ("0%", "0", True, "zero target: zero percent"),
    ("0.001", "0", False, "zero target: no relative tolerance"),
    ("zero", "0", False, "zero target: word against number"),
    ("1,234", "1234", True, "thousands separators in the prediction"),
    ("1,234.5", "1234.5", True, "thousands separators with decimals"),
    ("12,345,678", "12345678", True, "several thousands groups"),
    ("1234", "1,234", True, "thousands separators in the target"),
    ("1,23", "123", False, "not a thousands grouping"),
    ("1, 234", "1234", False, "comma-space is a list, not a number"),
    ("15 million", "15", False, "trailing units are not stripped"),
    ("15", "15 million", False, "trailing units in the target"),
    ("15 million", "15 Million", True, "unit texts compare as strings"),
    ("$5", "5", False, "currency symbols are not stripped"),
    ("nan", "nan", True, "nan compares as a string"),
    ("nan", "5", False, "nan is not a number"),
    ("inf", "1e999", False, "non-finite values compare as strings"),
    ("Inf", "inf", True, "inf compares as a string"),
    ("", "", True, "empty strings match"),
    ("", "15", False, "empty prediction"),
]


@pytest.mark.parametrize(("prediction", "target", "expected", "why"), RELAXED_CASES)
def test_relaxed_correctness(prediction, target, expected, why):
    assert relaxed_correctness(prediction, target) is expected, why


@pytest.mark.parametrize(
    ("prediction", "target", "max_relative_change", "expected"),
    [("110", "100", 0.1, True), ("111", "100", 0.1, False), ("100.5", "100", 0.0, False), ("100", "100", 0.0, True)],
)
def test_relaxed_correctness_tolerance_is_configurable(prediction, target, max_relative_change, expected):
    assert relaxed_correctness(prediction, target, max_relative_change=max_relative_change) is expected


@pytest.mark.parametrize(("text", "expected"), [
    (" 2019. ", "2019"), ("Apples", "apples"), ("5..", "5."), ("a.b", "a.b"), (" . ", ""), (12, "12"),
    ("Yes .", "yes"),
])
def test_normalised_answer(text, expected):
    assert rewards.normalised_answer(text) == expected


@pytest.mark.parametrize(("predicted", "gold", "exact_match", "expected"), [
    ("15", "15", False, True),
    (None, "15", False, False),                   # no <answer> block
    ("15", None, False, False),                   # no gold answer
    ("15.7", "15", False, True),                  # within the relative tolerance
    ("15.8", "15", False, False),
    ("15.7", "15", True, False),                  # exact: no tolerance
    ("Yes.", "yes", True, True),
    ("twelve", ["12", "twelve"], False, True),    # any of several gold answers
    ("13", ["12", "twelve"], False, False),
    ("12", 12, False, True),                      # a numeric gold answer
])
def test_answer_correct(predicted, gold, exact_match, expected):
    assert rewards.answer_correct(predicted, gold, exact_match) is expected
    completion = "" if predicted is None else f"<answer>{predicted}</answer>"
    assert rewards.accuracy_score(completion, gold, exact_match) == float(expected)  # the reward calls it


def test_relative_tolerance_is_the_accuracy_rewards():
    gold, tolerance = 200.0, rewards.RELATIVE_TOLERANCE
    assert rewards.answer_correct(str(gold * (1 + tolerance)), str(gold))
    assert not rewards.answer_correct(str(gold * (1 + tolerance) + 0.01), str(gold))


def test_regression_relative_error_uses_abs_of_target():
    """The original divided by the signed target: any prediction passed against a negative target."""
    original_verdict = abs(1000.0 - (-5.0)) / (-5.0) <= 0.05
    assert original_verdict is True
    assert relaxed_correctness("1000", "-5") is False
    assert relaxed_correctness("-5.2", "-5") is True


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("plain", "plain"),
        ([{"role": "assistant", "content": "chat"}], "chat"),
        ([{"role": "assistant", "content": [{"type": "text", "text": "part"}]}], "part"),
        ([{"role": "user", "content": "not mine"}, {"role": "assistant", "content": "mine"}], "mine"),
        ({"role": "assistant", "content": "single message"}, "single message"),
        (None, ""),
        (42, ""),
        ([{"role": "assistant", "content": None}], ""),
        (["not a message"], ""),
    ],
)
def test_completion_text(completion, expected):
    assert completion_text(completion) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<answer>15</answer>", "15"),
        ("<answer> 15 \n</answer>", "15"),
        ("<answer>3</answer> no wait <answer>15</answer>", "15"),
        ("<answer>15</answer> then <answer>unclosed", "15"),
        ("<answer><answer>7</answer>", "7"),
        ("<answer>15", None),
        ("15</answer>", None),
        ("no tags", None),
    ],
)
def test_extract_answer_last_closed_block_wins(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('```json\n{"a": 1}\n```', '{"a": 1}'),
        ('```JSON {"a": 1}```', '{"a": 1}'),
        ('```\n{"a": 1}\n```', '{"a": 1}'),
        ('  {"a": 1}  ', '{"a": 1}'),
        ('```json\n{"a": 1}', '{"a": 1}'),
    ],
)
def test_strip_code_fence(raw, expected):
    assert strip_code_fence(raw) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('<table>{"columns": ["a"], "rows": [[1, 2.5]]}</table>', {"columns": ["a"], "rows": [["1", "2.5"]]}),
        ('<table>```json\n{"columns": []}\n```</table>', {"columns": []}),
        ('<table>{"x": NaN}</table>', {"x": "NaN"}),
        ("<table>[1, 2]</table>", None),
        ("<table>{broken</table>", None),
        ("<table>" + "[" * 100_000 + "</table>", None),
        ("no table", None),
    ],
)
def test_extract_table(text, expected):
    assert extract_table(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (PERFECT, GOLD_STEPS),
        ("<think><step-1>: a b</step-1><step-2>c</think>", ["a b", "c"]),
        ("<think>intro <step-1>: a <table>{\"t\": 1}</table> b</think>", ["a  b"]),
        ("<step-1>: outside think", ["outside think"]),
        ("<think><step-1>:</think>", []),
        ("<think>no steps</think>", []),
    ],
)
def test_reasoning_steps(text, expected):
    assert reasoning_steps(text) == expected


@pytest.mark.parametrize(
    ("reasoning", "expected"),
    [(GOLD_REASONING, GOLD_STEPS), ("  plain reasoning  ", ["plain reasoning"]), ("   ", []), (None, []), (3, [])],
)
def test_reference_steps(reasoning, expected):
    assert reference_steps(reasoning) == expected


# --------------------------------------------------------------------------- format_reward

FORMAT_CASES = [
    ("perfect", PERFECT, 2.0),
    ("surrounding whitespace", "\n  " + PERFECT + "\n\n", 2.0),
    ("no newlines between blocks", PERFECT.replace("\n", ""), 2.0),
    ("chat form", [{"role": "assistant", "content": PERFECT}], 2.0),
    ("table need not be valid JSON here", build_completion(table_text="{broken"), 2.0),
    ("one step is enough", build_completion(steps=["only step"]), 2.0),
    ("no think block", PERFECT.replace("<think>", "").replace("</think>", ""), 0.0),
    ("no steps", build_completion(steps=[]), 0.0),
    ("step marker without colon", PERFECT.replace("<step-2>:", "<step-2>"), 0.0),
    ("empty step text", build_completion(steps=["a", ""]), 0.0),
    ("prose before the first step", PERFECT.replace("<step-1>", "Let me think. <step-1>"), 0.0),
    ("text after the answer", PERFECT + " Hope this helps", 0.0),
    ("text between think and answer", PERFECT.replace("</think>\n", "</think> so \n"), 0.0),
    ("text before the type", PERFECT.replace("<think>\n", "<think>\nchart: "), 0.0),
    ("two answers", PERFECT + "<answer>15</answer>", 0.0),
    ("empty answer", build_completion(answer=" "), 0.0),
    ("empty type", build_completion(chart_type=""), 0.0),
    (
        "type after table",
        PERFECT.replace("<type>bar</type>\n", "").replace("</table>", "</table><type>bar</type>"),
        0.0,
    ),
    ("answer inside think", PERFECT.replace("</think>\n<answer>15</answer>", "<answer>15</answer></think>"), 0.0),
    ("unclosed answer", PERFECT[: -len("</answer>")], 0.0),
    ("empty", "", 0.0),
    ("None", None, 0.0),
]


@pytest.mark.parametrize(("case", "completion", "expected"), FORMAT_CASES, ids=[row[0] for row in FORMAT_CASES])
def test_format_reward(case, completion, expected):
    assert format_reward(completions=[completion]) == [expected]


# --------------------------------------------------------------------------- accuracy_reward

ACCURACY_CASES = [
    ("perfect", PERFECT, "15", 1.0),
    ("within 5%", build_completion(answer="15.5"), "15", 1.0),
    ("outside 5%", build_completion(answer="16"), "15", 0.0),
    ("text answer, other case", build_completion(answer="Yes."), "yes", 1.0),
    ("last answer wins (right)", "<answer>3</answer> no: <answer>15</answer>", "15", 1.0),
    ("last answer wins (wrong)", "<answer>15</answer> no: <answer>3</answer>", "15", 0.0),
    ("answer without the rest of the format", "<answer>15</answer>", "15", 1.0),
    ("no answer block", "<think>15</think>", "15", 0.0),
    ("unclosed answer", "<answer>15", "15", 0.0),
    ("gold answer missing", PERFECT, None, 0.0),
    ("gold answer as a list", PERFECT, ["15"], 1.0),
    ("chat form", [{"role": "assistant", "content": PERFECT}], "15", 1.0),
]


@pytest.mark.parametrize(
    ("case", "completion", "gold", "expected"), ACCURACY_CASES, ids=[row[0] for row in ACCURACY_CASES]
)
def test_accuracy_reward(case, completion, gold, expected):
    assert call(accuracy_reward, [completion], answer=[gold]) == [expected]


def test_accuracy_reward_without_answer_column_scores_zero():
    assert accuracy_reward(completions=[PERFECT, PERFECT]) == [0.0, 0.0]


def test_accuracy_reward_pads_a_short_column_with_missing_golds():
    assert accuracy_reward(completions=[PERFECT, PERFECT], answer=["15"]) == [1.0, 0.0]


# --------------------------------------------------------------------------- length_think_reward

LENGTH_CASES = [
    ("six steps in the window", PERFECT, 2.5),
    ("eight steps: the step bonus is capped", build_completion(steps=GOLD_STEPS + ["one more", "and more"]), 2.5),
    ("two steps in the window", build_completion(steps=GOLD_STEPS[:2]), 1.5),
    ("two steps below the window", build_completion(steps=["a b", "c d"]), 0.5),
    ("one step above the window", build_completion(steps=[" ".join(["w"] * 301)]), 0.25),
    ("exactly the window's upper bound", build_completion(steps=[" ".join(["w"] * 300)]), 1.25),
    ("exactly the window's lower bound", build_completion(steps=[" ".join(["w"] * 20)]), 1.25),
    ("no steps", build_completion(steps=[]), 0.0),
    ("empty steps do not count", "<think><step-1>: <step-2>: </think>", 0.0),
    ("nothing", "", 0.0),
]


@pytest.mark.parametrize(("case", "completion", "expected"), LENGTH_CASES, ids=[row[0] for row in LENGTH_CASES])
def test_length_think_reward(case, completion, expected):
    assert length_think_reward(completions=[completion]) == [expected]


@pytest.mark.parametrize(
    ("table_words", "steps", "expected"),
    [
        (50, ["two words", "three more words", "and four more words", "then five more words here"], 1.0),
        (400, GOLD_STEPS[:4], 2.0),
    ],
    ids=["table would lift short steps into the window", "table would push good steps out of the window"],
)
def test_regression_length_window_ignores_the_table_and_the_type(table_words, steps, expected):
    """The original measured the whole think block, table included; only step words count here."""
    table = json.dumps({"columns": ["x"], "rows": [[" ".join(["cell"] * table_words)]]})
    completion = build_completion(table_text=table, chart_type="stacked bar chart", steps=steps)
    step_words = sum(len(step.split()) for step in steps)
    think_words = len(completion.split("</think>")[0].split())
    low, high = rewards.LENGTH_WINDOW_WORDS
    assert (low <= step_words <= high) != (low <= think_words <= high)
    assert length_think_reward(completions=[completion]) == [expected]


def test_length_window_is_configurable():
    settings = RewardSettings(length_window_words=(1, 5))
    reward = dict(zip(REWARD_NAMES, build_reward_funcs(settings)))["length_think_reward"]
    assert reward(completions=[build_completion(steps=["a b", "c d"]), PERFECT]) == [1.5, 1.5]


# --------------------------------------------------------------------------- count_reward

COUNT_CASES = [
    ("perfect", PERFECT, 2.0),
    ("order is not checked", "<answer>1</answer><table>t</table><type>bar</type><think>x</think>", 2.0),
    ("missing table", PERFECT.replace("<table>", "").replace("</table>", ""), 0.0),
    ("think twice", PERFECT + "<think></think>", 0.0),
    ("unclosed answer", PERFECT[: -len("</answer>")], 0.0),
    ("extra closing type", PERFECT + "</type>", 0.0),
    ("empty", "", 0.0),
]


@pytest.mark.parametrize(("case", "completion", "expected"), COUNT_CASES, ids=[row[0] for row in COUNT_CASES])
def test_count_reward(case, completion, expected):
    assert count_reward(completions=[completion]) == [expected]


# --------------------------------------------------------------------------- chart_type_reward

CHART_TYPE_CASES = [
    ("exact", PERFECT, "bar", 1.0),
    ("case and spaces", build_completion(chart_type=" Stacked  Bar "), "stacked bar", 1.0),
    ("wrong type", build_completion(chart_type="line"), "bar", 0.0),
    ("last type wins", "<type>line</type><type>bar</type>", "bar", 1.0),
    ("no type block", "<think>bar</think>", "bar", 0.0),
    ("gold missing", PERFECT, None, 0.0),
]


@pytest.mark.parametrize(
    ("case", "completion", "gold", "expected"), CHART_TYPE_CASES, ids=[row[0] for row in CHART_TYPE_CASES]
)
def test_chart_type_reward(case, completion, gold, expected):
    assert call(chart_type_reward, [completion], chart_type=[gold]) == [expected]


# --------------------------------------------------------------------------- table_style_reward


def table_completion(table) -> str:
    return build_completion(table_text=table if isinstance(table, str) else json.dumps(table))


GOLD_ROWS = GOLD_TABLE["rows"]
TABLE_CASES = [
    ("perfect", PERFECT, GOLD_TABLE, 1.75),
    ("fenced JSON", table_completion("```json\n" + json.dumps(GOLD_TABLE) + "\n```"), GOLD_TABLE, 1.75),
    ("JSON numbers", table_completion(dict(GOLD_TABLE, rows=[[2019, 12], [2020, 15.2]])), GOLD_TABLE, 1.75),
    ("headers in other case", table_completion({"columns": ["year", " SALES"], "rows": GOLD_ROWS}), GOLD_TABLE, 1.75),
    ("half the headers", table_completion({"columns": ["Year", "Profit"], "rows": GOLD_ROWS}), GOLD_TABLE, 1.5),
    ("half the cells", table_completion(dict(GOLD_TABLE, rows=[["2019", "9"], ["X", "15"]])), GOLD_TABLE, 1.5),
    ("one row missing", table_completion({"columns": ["Year", "Sales"], "rows": [["2019", "12"]]}), GOLD_TABLE, 1.5),
    ("extra key", table_completion({**GOLD_TABLE, "title": "t"}), GOLD_TABLE, 1.5),
    ("other keys", table_completion({"header": ["Year"], "data": [["2019"]]}), GOLD_TABLE, 0.5),
    ("rows not lists", table_completion({"columns": ["Year", "Sales"], "rows": "2019 12"}), GOLD_TABLE, 1.25),
    ("JSON list", table_completion("[1, 2]"), GOLD_TABLE, 0.0),
    ("broken JSON", table_completion('{"columns": ["Year"'), GOLD_TABLE, 0.0),
    ("no table block", "<answer>15</answer>", GOLD_TABLE, 0.0),
    ("gold table missing", PERFECT, None, 0.75),
    ("gold table malformed", PERFECT, {"columns": "Year"}, 0.75),
]


@pytest.mark.parametrize(("case", "completion", "gold", "expected"), TABLE_CASES, ids=[row[0] for row in TABLE_CASES])
def test_table_style_reward(case, completion, gold, expected):
    assert call(table_style_reward, [completion], table=[gold]) == [pytest.approx(expected)]


def test_regression_broken_table_does_not_inherit_the_previous_one():
    """The original kept the last parsed table when parsing failed."""
    broken = table_completion('{"columns": ["Year", "Sales"], "rows": [["2019", "12"]')
    assert call(table_style_reward, [PERFECT, broken, PERFECT, "no table"]) == [1.75, 0.0, 1.75, 0.0]


@pytest.mark.parametrize(
    ("predicted_rows", "expected"),
    [
        (GOLD_TABLE["rows"], 1.0),
        (GOLD_TABLE["rows"] * 10, 1.0),
        ([["2019", "12", "extra"], ["2020", "15", "extra"]], 1.0),
        ([["2019", "12"]], 0.5),
        ([["2019"]], 0.25),
        ([["12", "2019"], ["15", "2020"]], 0.0),
        ([], 0.0),
        ([None, ["2020", "15"]], 0.5),
        ([[{"nested": 1}, "12"]], 0.25),
    ],
)
def test_regression_cell_accuracy_is_normalised_to_the_gold_table(predicted_rows, expected):
    """The original added 0.5/len(predicted rows) per matching cell, reaching 1.0 from one row."""
    assert cell_accuracy({"rows": predicted_rows}, GOLD_TABLE["rows"]) == pytest.approx(expected)


def test_regression_one_perfect_row_does_not_score_more_than_its_share():
    one_row = table_completion({"columns": ["Year", "Sales"], "rows": [["2019", "12"]]})
    (score,) = call(table_style_reward, [one_row])
    assert score == pytest.approx(0.5 + 0.25 + 0.5 + 0.5 * 0.5)


# --------------------------------------------------------------------------- process_style_reward


class BagOfWordsEncoder:
    """A small deterministic stand-in for a sentence encoder: hashed word counts."""

    def __init__(self, dimensions: int = 512):
        self.dimensions = dimensions
        self.calls = 0

    def encode(self, sentences):
        self.calls += 1
        vectors = np.zeros((len(sentences), self.dimensions))
        for row, sentence in enumerate(sentences):
            for word in sentence.lower().split():
                vectors[row, zlib.crc32(word.encode()) % self.dimensions] += 1.0
        return vectors


class OppositeEncoder:
    """Encodes predictions and references (alternating) as opposite vectors."""

    def encode(self, sentences):
        return np.array([[1.0, 0.0] if index % 2 == 0 else [-1.0, 0.0] for index in range(len(sentences))])


class FailingEncoder:
    def encode(self, sentences):
        raise RuntimeError("out of memory")


def process_reward(encoder=None):
    return dict(zip(REWARD_NAMES, build_reward_funcs(RewardSettings(embedding_model=None), encoder)))[
        "process_style_reward"
    ]


PROCESS_FALLBACK_CASES = [
    ("steps equal the reference", PERFECT, GOLD_REASONING, 1.0),
    ("other case and spacing", build_completion(steps=[s.upper() + "  " for s in GOLD_STEPS]), GOLD_REASONING, 1.0),
    ("plain reference equal to the step", build_completion(steps=["read the bar"]), "read the bar", 1.0),
    ("nothing in common", build_completion(steps=["alpha beta"]), "gamma delta", 0.0),
    ("half the words", build_completion(steps=["read the bar"]), "read the line", pytest.approx(2 / 3)),
    ("repeating the reference", build_completion(steps=["read the bar"] * 10), "read the bar", pytest.approx(6 / 33)),
    ("no steps", "<think>read the bar</think>", "read the bar", 0.0),
    ("reference missing", PERFECT, None, 0.0),
    ("reference empty", PERFECT, "   ", 0.0),
]


@pytest.mark.parametrize(
    ("case", "completion", "reference", "expected"),
    PROCESS_FALLBACK_CASES,
    ids=[row[0] for row in PROCESS_FALLBACK_CASES],
)
def test_process_style_reward_lexical_fallback(case, completion, reference, expected):
    assert call(process_reward(), [completion], reasoning=[reference]) == [expected]


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("a b c", "a b c", 1.0),
        ("A, b!", "a b", 1.0),
        ("a b", "c d", 0.0),
        ("a a b", "a b", 0.8),
        ("", "a", 0.0),
        ("", "", 0.0),
    ],
)
def test_lexical_similarity(prediction, reference, expected):
    assert lexical_similarity(prediction, reference) == pytest.approx(expected)


def test_process_style_reward_with_an_injected_encoder():
    encoder = BagOfWordsEncoder()
    completions = [PERFECT, build_completion(steps=["alpha beta"]), build_completion(steps=["read the bar"])]
    references = [GOLD_REASONING, "gamma delta", "read the line"]
    scores = call(process_reward(encoder), completions, reasoning=references)
    assert scores[0] == 1.0
    assert scores[1] == pytest.approx(0.5)  # orthogonal embeddings: cos 0
    assert scores[2] == pytest.approx((1 + 2 / 3) / 2)  # two of three words shared: cos 2/3
    assert encoder.calls == 1  # the batch is encoded in one call


def test_process_style_reward_opposite_embeddings_score_zero():
    assert call(process_reward(OppositeEncoder()), [build_completion(steps=["x"])], reasoning=["y"]) == [0.0]


@pytest.mark.parametrize("vector", [[0.0, 0.0], [float("nan"), 1.0], [float("inf"), 1.0]])
def test_process_style_reward_degenerate_embeddings_score_one_half(vector):
    class ConstantEncoder:
        def encode(self, sentences):
            return np.array([vector] * len(sentences))

    assert call(process_reward(ConstantEncoder()), [build_completion(steps=["x"])], reasoning=["y"]) == [0.5]


def test_process_style_reward_falls_back_when_encoding_fails(caplog, monkeypatch):
    monkeypatch.setattr(rewards, "_already_logged", set())
    reward = process_reward(FailingEncoder())
    completion = build_completion(steps=["read the bar"])
    with caplog.at_level("WARNING", logger="nbhelpers.rewards"):
        assert call(reward, [completion], reasoning=["read the line"]) == [pytest.approx(2 / 3)]
        assert call(reward, [completion], reasoning=["read the line"]) == [pytest.approx(2 / 3)]
    assert sum("encoding failed" in record.getMessage() for record in caplog.records) == 1


def test_load_sentence_encoder_without_sentence_transformers(monkeypatch, caplog):
    load_sentence_encoder.cache_clear()
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    try:
        with caplog.at_level("INFO", logger="nbhelpers.rewards"):
            assert load_sentence_encoder("some/model") is None
            assert load_sentence_encoder("some/model") is None
            assert load_sentence_encoder(None) is None
    finally:
        load_sentence_encoder.cache_clear()
    messages = [record.getMessage() for record in caplog.records]
    assert sum("not installed" in message for message in messages) == 1
    assert sum("no embedding model configured" in message for message in messages) == 1


def test_load_sentence_encoder_loads_local_files_only_and_once(monkeypatch):
    constructed = []

    class FakeSentenceTransformer:
        def __init__(self, name, **kwargs):
            constructed.append((name, kwargs))
            if name == "missing/model":
                raise OSError("not in the local cache")

        def encode(self, sentences):
            return np.ones((len(sentences), 3))

    fake_module = types.SimpleNamespace(SentenceTransformer=FakeSentenceTransformer)
    monkeypatch.setitem(sys.modules, "sentence_transformers", fake_module)
    load_sentence_encoder.cache_clear()
    try:
        first = load_sentence_encoder("local/model")
        assert first is load_sentence_encoder("local/model")
        assert load_sentence_encoder("missing/model") is None
    finally:
        load_sentence_encoder.cache_clear()
    assert constructed == [("local/model", {"local_files_only": True}), ("missing/model", {"local_files_only": True})]


# --------------------------------------------------------------------------- the whole set


def test_perfect_completion_earns_every_maximum():
    scores = score_completions([PERFECT, [{"role": "assistant", "content": PERFECT}]], **GOLD_COLUMNS2)
    assert scores == {name: [REWARD_MAXIMA[name]] * 2 for name in REWARD_NAMES}


def test_perfect_completion_built_from_other_gold_earns_every_maximum():
    table = {"columns": ["Country", "Share (%)", "Rank"], "rows": [["France", "12.5", "2"], ["Chile", "-3", "1"]]}
    steps = [
        "Find the row of Chile in the table drawn from the chart.",
        "Its share is minus three percent according to the second column.",
        "So the answer is -3 without the percent sign.",
    ]
    reasoning = "\n".join(f"<step-{k}>: {s}" for k, s in enumerate(steps, start=1))
    completion = build_completion(chart_type="Stacked Bar", table_text=json.dumps(table), steps=steps, answer="-3")
    columns = {"answer": ["-3"], "chart_type": ["stacked bar"], "table": [table], "reasoning": [reasoning]}
    scores = score_completions([completion], **columns)
    maxima = dict(REWARD_MAXIMA, length_think_reward=1.0 + 0.25 * len(steps))
    assert scores == {name: [maxima[name]] for name in REWARD_NAMES}


def test_reward_funcs_are_named_and_ordered_for_trl():
    expected = [
        "format_reward",
        "accuracy_reward",
        "length_think_reward",
        "count_reward",
        "chart_type_reward",
        "table_style_reward",
        "process_style_reward",
    ]
    assert [f.__name__ for f in REWARD_FUNCS] == expected == list(REWARD_NAMES) == list(REWARD_MAXIMA)
    assert [f.__name__ for f in build_reward_funcs(RewardSettings())] == expected
    assert REWARD_FUNCS == [
        format_reward,
        accuracy_reward,
        length_think_reward,
        count_reward,
        chart_type_reward,
        table_style_reward,
        process_style_reward,
    ]
    restored = pickle.loads(pickle.dumps(REWARD_FUNCS))
    assert [f.__name__ for f in restored] == expected
    assert restored[0](completions=[PERFECT]) == [2.0]


def test_rewards_accept_trl_keyword_arguments():
    extras = {"trainer_state": None, "log_extra": print, "log_metric": print, "image": [None] * 2, "query": ["q"] * 2}
    completions, columns = [PERFECT, "junk"], {**GOLD_COLUMNS2, **extras}
    for reward in REWARD_FUNCS:
        values = reward(prompts=["p"] * 2, completions=completions, completion_ids=[[1], [2]], **columns)
        assert len(values) == 2 and values[0] == REWARD_MAXIMA[reward.__name__] and values[1] == 0.0



def test_rewards_of_an_empty_batch():
    assert all(reward(completions=[]) == [] for reward in REWARD_FUNCS)


def test_missing_gold_column_is_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(rewards, "_already_logged", set())
    with caplog.at_level("WARNING", logger="nbhelpers.rewards"):
        for _ in range(3):
            assert call(table_style_reward, [PERFECT], table=[None]) == [0.75]
    assert sum("'table'" in record.getMessage() for record in caplog.records) == 1


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ({}, [1.0] * 7),
        ({"format_reward": 0.5, "process_style_reward": 2}, [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0]),
        ({"accuracy_reward": 0}, [1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ],
)
def test_reward_weights(weights, expected):
    assert reward_weights(RewardSettings(weights=weights)) == expected


def test_default_reward_weights():
    assert reward_weights() == [1.0] * 7


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": {"formatreward": 1.0}}, "formatreward"),
        ({"weights": {"format_reward": float("nan")}}, "format_reward"),
        ({"weights": {"format_reward": "2"}}, "format_reward"),
        ({"length_window_words": (30, 10)}, "length_window_words"),
        ({"length_window_words": (-1, 10)}, "length_window_words"),
        ({"length_window_words": (1.5, 10)}, "length_window_words"),
        ({"length_window_words": (1,)}, "length_window_words"),
    ],
)
def test_reward_settings_reject_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RewardSettings(**kwargs)


def test_total_reward_is_the_weighted_sum():
    weights = {"format_reward": 2.0, "accuracy_reward": 3.0, "length_think_reward": 0.0}
    settings = RewardSettings(weights=weights, embedding_model=None)
    completions = [PERFECT, build_completion(answer="99")]
    totals = total_reward(completions, settings=settings, **GOLD_COLUMNS2)
    rest = sum(REWARD_MAXIMA[name] for name in REWARD_NAMES[3:])
    assert totals == [pytest.approx(2 * 2.0 + 3 * 1.0 + rest), pytest.approx(2 * 2.0 + rest)]


def test_verbose_prints_console_lines(capsys):
    quiet = build_reward_funcs(RewardSettings(embedding_model=None))
    for reward in quiet:
        call(reward, [PERFECT, "junk"])
    assert capsys.readouterr().out == ""
    loud = build_reward_funcs(RewardSettings(embedding_model=None, verbose=True))
    for reward in loud:
        call(reward, [PERFECT, "junk"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Format rewards: [2.0, 0.0]"
    assert lines[1] == "Rewards Accuracy: [1.0, 0.0]"
    assert len(lines) == 7


# --------------------------------------------------------------------------- correctness


@pytest.mark.parametrize(
    ("completion", "answer", "threshold", "expected"),
    [
        (PERFECT, "15", 0.5, True),
        (build_completion(answer="15.5"), "15", 0.5, True),
        (build_completion(answer="20"), "15", 0.5, False),
        ("no answer", "15", 0.5, False),
        ([{"role": "assistant", "content": "<answer>15</answer>"}], "15", 0.5, True),
        (PERFECT, "15", 1.5, False),
        (PERFECT, None, 0.5, False),
    ],
)
def test_is_correct(completion, answer, threshold, expected):
    assert is_correct(completion, answer, threshold) is expected


@pytest.mark.parametrize(
    ("prediction", "answer", "relaxed", "exact"),
    [
        ("2020", "2019", True, False),        # a year one off is within 5%: only exact match catches it
        ("2019", "2019", True, True),
        (" 2019. ", "2019", True, True),      # whitespace and one trailing period never count
        ("Apples", "apples", True, True),     # case never counts
        ("2019.0", "2019", True, False),      # exact means the same text
        ("15.5", "15", True, False),
        ("1,234", "1234", True, False),
    ],
)
def test_exact_match_drops_the_numeric_tolerance(prediction, answer, relaxed, exact):
    completion = build_completion(answer=prediction)
    assert is_correct(completion, answer) is relaxed
    assert is_correct(completion, answer, exact_match=True) is exact


def test_is_correct_agrees_with_accuracy_reward():
    completions = [PERFECT, build_completion(answer="16"), "<answer>15.2</answer>", "15"]
    accuracies = accuracy_reward(completions=completions, answer=["15"] * 4)
    assert [is_correct(c, "15") for c in completions] == [a >= 0.5 for a in accuracies] == [True, False, True, False]
