"""The seven Chart-RVR rewards and the relaxed-accuracy metric of ChartQA.

Every reward is called as TRL calls reward functions,
`f(completions=[...], answer=[...], chart_type=[...], table=[...], reasoning=[...], **other)`,
and returns one finite float per completion, never raising (a completion that cannot be read
scores 0). A completion is a string or TRL's chat form `[{"role": "assistant", "content": str}]`.

| reward               | range     | value                                                         |
|----------------------|-----------|---------------------------------------------------------------|
| format_reward        | {0, 2}    | 2 if the completion has the whole output shape                |
| accuracy_reward      | {0, 1}    | 1 if relaxed_correctness(<answer> text, gold answer)          |
| length_think_reward  | [0, 2.5]  | 1 if step words lie in the window, + min(0.25 x steps, 1.5)   |
| count_reward         | {0, 2}    | 2 if think/type/table/answer each open and close exactly once |
| chart_type_reward    | {0, 1}    | 1 if <type> equals the gold chart type (case-insensitive)     |
| table_style_reward   | [0, 1.75] | 0.5 JSON + 0.25 keys + 0.5 header recall + 0.5 cell accuracy  |
| process_style_reward | [0, 1]    | similarity of the steps to the reference reasoning            |

Rewards needing a gold column (answer, chart_type, table, reasoning) score 0 for rows where
it is None or absent, and say so once in the log. Weights are applied by TRL
(`GRPOConfig(reward_weights=reward_weights(settings))`). Each reward is one `Reward` record in
`REWARDS` (name, maximum, console label, gold column, scorer); `REWARD_NAMES`, `REWARD_MAXIMA`,
`MAX_TOTAL_REWARD` and the configuration's reward names derive from it.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from .completion_parsing import (
    completion_text,
    extract_answer,
    extract_chart_type,
    extract_table,
    matches_output_format,
    reasoning_steps,
    reference_steps,
    tag_counts,
)

logger = logging.getLogger(__name__)

DEFAULT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
"""The sentence encoder of the original Chart-RVR code; used only if already on local disk."""

LENGTH_WINDOW_WORDS = (20, 300)
"""Default inclusive window, in words of the step texts, that earns length_think_reward its 1.0.

20 words rules out one-line "reasoning"; 300 words leaves room for six detailed steps while
penalising rambling. (The original used 70..250 characters of the whole think block, table
included, i.e. about 12..45 words, which a table alone could fill.)"""

STEP_BONUS, STEP_BONUS_CAP = 0.25, 1.5

_already_logged: set[str] = set()


def _log_once(key: str, message: str, level: int = logging.WARNING) -> None:
    """Log `message` the first time `key` is seen in this process."""
    if key not in _already_logged:
        _already_logged.add(key)
        logger.log(level, message)


# --------------------------------------------------------------------------- relaxed accuracy

_THOUSANDS_GROUPED = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")


RELATIVE_TOLERANCE = 0.05
"""Largest relative difference |p - t| / |t| (a fraction) at which a numeric answer is still correct."""


def normalised_answer(text: Any) -> str:
    """An answer as correctness compares it: surrounding whitespace and one trailing period removed,
    lower-cased (`str()` of a non-string first)."""
    stripped = (text if isinstance(text, str) else str(text)).strip()
    return (stripped[:-1].rstrip() if stripped.endswith(".") else stripped).lower()


def answer_number(text: str) -> float | None:
    """The finite number `text` denotes, or None.

    `float()` syntax; a trailing `%` divides by 100; commas are dropped only when they group
    the integer digits by thousands ("1,234.5", not "1,23" or "1, 2"). Non-finite values
    ("nan", "inf", "1e999") are not numbers here, so they compare as strings.
    """
    body, scale = (text[:-1], 100.0) if text.endswith("%") else (text, 1.0)
    body = body.strip()
    if _THOUSANDS_GROUPED.fullmatch(body):
        body = body.replace(",", "")
    try:
        value = float(body) / scale
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def relaxed_correctness(prediction: str, target: str, max_relative_change: float = RELATIVE_TOLERANCE) -> bool:
    """The ChartQA relaxed-accuracy verdict (pix2struct semantics).

    Both strings are compared as `normalised_answer` gives them. If both are numbers
    (a trailing `%` divides by 100) and the target is non-zero, correct when
    |p - t| / |t| <= max_relative_change; with a zero target, correct when p == 0 exactly;
    otherwise a case-insensitive exact string match decides.

    Normalisation beyond pix2struct, chosen because it cannot turn a wrong answer right:
    thousands separators are dropped from numbers ("1,234" == "1234"), and nan/inf texts
    compare as strings instead of as (never-equal) floats. Deliberately NOT normalised, as
    in pix2struct: units and currency ("15 million" != "15", "$5" != "5"), and a percent
    against a bare number of the same digits ("12%" is 0.12, so != "12" but == "0.12").
    """
    prediction_text, target_text = normalised_answer(prediction), normalised_answer(target)
    predicted, expected = answer_number(prediction_text), answer_number(target_text)
    if predicted is not None and expected is not None:
        if expected != 0:
            return abs(predicted - expected) / abs(expected) <= max_relative_change
        if predicted == 0:
            return True
    return prediction_text == target_text


# --------------------------------------------------------------------------- per-completion scores


def format_score(text: str) -> float:
    """2.0 if the whole completion has the output shape (`matches_output_format`), else 0."""
    return 2.0 if matches_output_format(text) else 0.0


def exact_correctness(prediction: str, target: str) -> bool:
    """Case-insensitive equality after removing surrounding whitespace and one trailing period: no
    numeric tolerance. ChartQA-Pro's rule for answers its `Year` column flags ("2019" != "2020")."""
    return normalised_answer(prediction) == normalised_answer(target)


def answer_correct(predicted: str | None, gold: Any, exact_match: bool = False) -> bool:
    """Whether an extracted answer is correct: relaxed-correct against the gold answer (exactly equal
    with ``exact_match``). A None answer (no closed `<answer>` block) or a None gold answer: False.
    A gold answer given as a list of strings (HF ChartQA's `label`) accepts any of them."""
    if predicted is None or gold is None:
        return False
    golds = gold if isinstance(gold, (list, tuple)) else [gold]
    verdict = exact_correctness if exact_match else relaxed_correctness
    return any(verdict(predicted, str(one)) for one in golds)


def accuracy_score(text: str, gold_answer: Any, exact_match: bool = False) -> float:
    """1.0 if the last `<answer>` text is `answer_correct` against the gold answer, else 0."""
    return 1.0 if answer_correct(extract_answer(text), gold_answer, exact_match) else 0.0


def length_think_score(text: str, window_words: tuple[int, int] = LENGTH_WINDOW_WORDS) -> float:
    """Reasoning-length reward in [0, 2.5].

    1.0 when the words of the `<step-k>` texts (whitespace-separated, summed over steps; the
    type tag and the JSON table never count) lie inside `window_words` (inclusive), plus
    0.25 per non-empty step, that step bonus capped at 1.5 (six steps). "Up to 1.5" caps
    the step bonus, not the total: this follows the original Chart-RVR code,
    `reward += min(0.25*len(steps), 1.5)` after the window's +1.0 (sanchit97/chartrl,
    grpo_utils.py, commit 12034602), so the maximum is 2.5. Unlike the original, steps are
    counted (not the pieces of a split, which counted one too many) and the window counts
    step words, not the characters of the whole think block.
    """
    steps = reasoning_steps(text)
    words = sum(len(step.split()) for step in steps)
    low, high = window_words
    in_window = 1.0 if low <= words <= high else 0.0
    return in_window + min(STEP_BONUS * len(steps), STEP_BONUS_CAP)


def count_score(text: str) -> float:
    """2.0 if each of think/type/table/answer opens and closes exactly once, else 0."""
    return 2.0 if all(count == 1 for count in tag_counts(text).values()) else 0.0


def _normalised_label(text: str) -> str:
    """Case-folded, with runs of whitespace collapsed to one space."""
    return " ".join(text.split()).casefold()


def chart_type_score(text: str, gold_chart_type: Any) -> float:
    """1.0 if the last `<type>` text equals the gold chart type ignoring case and spacing, else 0."""
    predicted = extract_chart_type(text)
    if predicted is None or not isinstance(gold_chart_type, str):
        return 0.0
    return 1.0 if _normalised_label(predicted) == _normalised_label(gold_chart_type) else 0.0


def _gold_table(table: Any) -> tuple[list[str], list[list[str]]] | None:
    """Gold columns and rows as strings, or None when the gold table is missing or malformed."""
    if not isinstance(table, dict):
        return None
    columns, rows = table.get("columns"), table.get("rows")
    if not isinstance(columns, (list, tuple)) or not isinstance(rows, (list, tuple)):
        return None
    if not all(isinstance(row, (list, tuple)) for row in rows):
        return None
    return [str(column) for column in columns], [[str(cell) for cell in row] for row in rows]


def header_recall(predicted: dict, gold_columns: Sequence[str]) -> float:
    """Fraction in [0, 1] of gold columns present among the predicted ones.

    Compared case-insensitively with whitespace collapsed; no gold columns: 0.
    """
    columns = predicted.get("columns")
    if not gold_columns or not isinstance(columns, (list, tuple)):
        return 0.0
    present = {_normalised_label(column) for column in columns if isinstance(column, str)}
    return sum(_normalised_label(column) in present for column in gold_columns) / len(gold_columns)


def cell_accuracy(predicted: dict, gold_rows: Sequence[Sequence[str]]) -> float:
    """Matched gold cells / number of gold cells, in [0, 1].

    Cells are aligned by row and column position and compared with `relaxed_correctness`;
    a missing or non-scalar predicted cell does not match. No gold cells: 0.
    """
    total = sum(len(row) for row in gold_rows)
    rows = predicted.get("rows")
    if total == 0 or not isinstance(rows, (list, tuple)):
        return 0.0
    matched = 0
    for row_index, gold_row in enumerate(gold_rows):
        row = rows[row_index] if row_index < len(rows) else None
        if not isinstance(row, (list, tuple)):
            continue
        for column_index, gold_cell in enumerate(gold_row[: len(row)]):
            cell = row[column_index]
            if isinstance(cell, (str, int, float)) and relaxed_correctness(str(cell), gold_cell):
                matched += 1
    return matched / total


def table_style_score(text: str, gold_table: Any) -> float:
    """Table reward in [0, 1.75] for the last `<table>` block of this completion only.

    0.5 if it parses as a JSON object (code fences allowed), +0.25 if its keys are exactly
    {"columns", "rows"}, +0.5 x `header_recall`, +0.5 x `cell_accuracy`. A table that does
    not parse scores 0. A missing or malformed gold table makes the two gold components 0.
    """
    predicted = extract_table(text)
    if predicted is None:
        return 0.0
    score = 0.5 + (0.25 if set(predicted) == {"columns", "rows"} else 0.0)
    gold = _gold_table(gold_table)
    if gold is None and gold_table is not None:
        _log_once(
            "malformed_gold_table",
            f"table_style_reward: malformed gold table {gold_table!r:.200}; its gold components score 0.",
        )
    if gold is not None:
        gold_columns, gold_rows = gold
        score += 0.5 * header_recall(predicted, gold_columns) + 0.5 * cell_accuracy(predicted, gold_rows)
    return score


# --------------------------------------------------------------------------- process similarity


class SentenceEncoder(Protocol):
    """Anything with sentence-transformers' `encode`: texts in, one vector per text out."""

    def encode(self, sentences: list[str]) -> Any: ...


@functools.lru_cache(maxsize=None)
def load_sentence_encoder(model_name: str | None) -> SentenceEncoder | None:
    """The sentence-transformers model `model_name` from local files only, loaded once, or None.

    Never downloads. None (and one logged line saying the lexical fallback is used) when the
    name is None, sentence-transformers is not installed, or the model is not on local disk.
    """
    if model_name is None:
        logger.info("process_style_reward: no embedding model configured; using lexical similarity.")
        return None
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        logger.warning(
            "process_style_reward: sentence-transformers is not installed; using lexical similarity "
            "(word-multiset F1) instead of embeddings of %s.",
            model_name,
        )
        return None
    try:
        return SentenceTransformer(model_name, local_files_only=True)
    except Exception as error:  # any loading failure means: not usable offline
        logger.warning(
            "process_style_reward: embedding model %s is not available locally (%s); using lexical "
            "similarity (word-multiset F1).",
            model_name,
            error,
        )
        return None


_WORD = re.compile(r"\w+")


def lexical_similarity(prediction: str, reference: str) -> float:
    """Word-multiset F1 in [0, 1] of two texts (SQuAD-style token F1).

    Words are runs of `\\w` characters, case-folded; overlap = sum over words of the smaller
    count; F1 of overlap/|prediction words| and overlap/|reference words|. Same multiset of
    words: 1.0; nothing in common or an empty text: 0.0. Unlike a cosine of count vectors,
    repeating the reference many times does not score 1. Deterministic, needs no model.
    """
    predicted_counts = Counter(_WORD.findall(prediction.casefold()))
    reference_counts = Counter(_WORD.findall(reference.casefold()))
    overlap = sum((predicted_counts & reference_counts).values())
    if overlap == 0:
        return 0.0
    return 2.0 * overlap / (predicted_counts.total() + reference_counts.total())


def embedding_similarities(pairs: Sequence[tuple[str, str]], encoder: SentenceEncoder) -> list[float]:
    """(1 + cos) / 2 in [0, 1] of the embeddings of each (prediction, reference) pair.

    All texts are encoded in one call. A zero or non-finite embedding gives 0.5 (cos 0).
    """
    texts = [text for pair in pairs for text in pair]
    vectors = np.asarray(encoder.encode(texts), dtype=np.float64).reshape(len(texts), -1)
    predicted, reference = vectors[0::2], vectors[1::2]
    norms = np.linalg.norm(predicted, axis=1) * np.linalg.norm(reference, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        cosines = np.sum(predicted * reference, axis=1) / norms
    cosines = np.where(np.isfinite(cosines), cosines, 0.0)
    return [float(np.clip((1.0 + cosine) / 2.0, 0.0, 1.0)) for cosine in cosines]


def process_style_scores(
    texts: Sequence[str], references: Sequence[Any], encoder: SentenceEncoder | None
) -> list[float]:
    """Similarity in [0, 1] of each completion's steps to its reference reasoning.

    The steps (joined by newlines) are compared with the reference's steps (its `<step-k>`
    texts, or its whole text). No steps, or a None/empty reference: 0. Identical step texts
    (ignoring case and spacing): 1.0. Otherwise (1 + cos) / 2 of the encoder's embeddings,
    or, without an encoder or if encoding fails, `lexical_similarity`. Note the scales
    differ: unrelated texts score about 0.5 with embeddings and 0.0 lexically.
    """
    scores = [0.0] * len(texts)
    pending: list[tuple[int, str, str]] = []
    for index, (text, reference) in enumerate(zip(texts, references)):
        try:
            predicted_steps = "\n".join(reasoning_steps(text))
            expected_steps = "\n".join(reference_steps(reference))
            if not predicted_steps or not expected_steps:
                continue
            if _normalised_label(predicted_steps) == _normalised_label(expected_steps):
                scores[index] = 1.0
            else:
                pending.append((index, predicted_steps, expected_steps))
        except Exception as error:
            _log_once(f"process_style:{type(error).__name__}", f"process_style_reward scored 0 after {error!r}")
    if not pending:
        return scores
    pairs = [(predicted, expected) for _, predicted, expected in pending]
    similarities = None
    if encoder is not None:
        try:
            similarities = embedding_similarities(pairs, encoder)
        except Exception as error:
            _log_once(
                f"encoder:{type(error).__name__}",
                f"process_style_reward: encoding failed ({error!r}); using lexical similarity.",
            )
    if similarities is None:
        similarities = [lexical_similarity(predicted, expected) for predicted, expected in pairs]
    for (index, _, _), similarity in zip(pending, similarities):
        scores[index] = similarity
    return scores


# --------------------------------------------------------------------------- settings and TRL functions


@dataclass
class RewardSettings:
    """Weights and knobs of the Chart-RVR rewards.

    weights: reward name -> weight; names left out weigh 1.0. length_window_words: inclusive
    (low, high) bounds in step words for length_think_reward. embedding_model: the
    sentence-transformers model for process_style_reward, loaded from local files only
    (None: lexical similarity). verbose: print each batch's rewards to the console.
    """

    weights: dict[str, float] = field(default_factory=dict)
    length_window_words: tuple[int, int] = LENGTH_WINDOW_WORDS
    embedding_model: str | None = DEFAULT_EMBEDDING_MODEL
    verbose: bool = False

    def __post_init__(self) -> None:
        unknown = sorted(set(self.weights) - set(REWARD_NAMES))
        if unknown:
            raise ValueError(
                f"RewardSettings.weights: unknown reward name(s) {unknown}; expected names from {list(REWARD_NAMES)}"
            )
        weights = {}
        for name in REWARD_NAMES:
            weight = self.weights.get(name, 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"RewardSettings.weights[{name!r}] must be a finite number, got {weight!r}")
            weights[name] = float(weight)
        self.weights = weights
        window = tuple(self.length_window_words)
        if len(window) != 2 or not all(isinstance(bound, int) and not isinstance(bound, bool) for bound in window):
            raise ValueError(
                f"RewardSettings.length_window_words must be two integers (low, high), got {self.length_window_words!r}"
            )
        if not 0 <= window[0] <= window[1]:
            raise ValueError(
                f"RewardSettings.length_window_words must satisfy 0 <= low <= high, got {self.length_window_words!r}"
            )
        self.length_window_words = window


def _column(values: Any, size: int) -> list[Any]:
    """A dataset column as a list of `size` entries, None where absent."""
    if not isinstance(values, (list, tuple)):
        return [None] * size
    return list(values[:size]) + [None] * (size - len(values))


def _finite_in_range(value: float, maximum: float) -> float:
    """`value` clipped to [0, maximum]; a non-finite value becomes 0."""
    return min(max(float(value), 0.0), maximum) if math.isfinite(value) else 0.0


class RewardFunction:
    """One Chart-RVR reward in TRL's reward-function form; `__name__` is the reward name.

    Call as `f(completions=[...], **dataset_columns) -> list[float]`. Picklable: holds only
    its name, its settings and an optional injected encoder.
    """

    def __init__(self, name: str, settings: RewardSettings | None = None, encoder: SentenceEncoder | None = None):
        if name not in REWARDS:
            raise ValueError(f"unknown reward name {name!r}; expected one of {list(REWARD_NAMES)}")
        self.__name__ = self.__qualname__ = name
        self.settings = settings if settings is not None else RewardSettings()
        self.encoder = encoder

    def __repr__(self) -> str:
        return f"RewardFunction({self.__name__!r})"

    @property
    def reward(self) -> Reward:
        """This reward's record (looked up by name, so the function pickles without its scorer)."""
        return REWARDS[self.__name__]

    def __call__(self, completions: Sequence[Any] | None = None, **columns: Any) -> list[float]:
        name, gold_column = self.__name__, self.reward.gold_column
        texts = [completion_text(completion) for completion in (completions or [])]
        golds = _column(columns.get(gold_column), len(texts)) if gold_column else [None] * len(texts)
        if gold_column and any(gold is None for gold in golds):
            _log_once(
                f"missing:{name}",
                f"{name}: gold column {gold_column!r} is absent or None for some rows; the parts "
                "of this reward that need it score 0 there.",
            )
        if self.reward.score_batch is not None:
            raw = self.reward.score_batch(texts, golds, self)
        else:
            raw = [self._score_one(text, gold) for text, gold in zip(texts, golds)]
        rewards = [_finite_in_range(value, self.reward.maximum) for value in raw]
        if self.settings.verbose:
            print(f"{self.reward.label}: {rewards}")
        return rewards

    def sentence_encoder(self) -> SentenceEncoder | None:
        """The injected encoder, else the settings' embedding model (:func:`load_sentence_encoder`)."""
        return self.encoder if self.encoder is not None else load_sentence_encoder(self.settings.embedding_model)

    def _score_one(self, text: str, gold: Any) -> float:
        """This reward for one completion; 0 (logged once per error type) if scoring fails."""
        try:
            return self.reward.score(text, gold, self.settings)
        except Exception as error:
            _log_once(f"{self.__name__}:{type(error).__name__}", f"{self.__name__} scored 0 after {error!r}")
            return 0.0


@dataclass(frozen=True)
class Reward:
    """One Chart-RVR reward: its name (TRL's, and the key of its weight), its largest value (its smallest is
    0), its label in the ``verbose_rewards`` console lines, the dataset column holding its gold value (None:
    it needs none), and its scorer: ``score(text, gold, settings)`` per completion, or ``score_batch(texts,
    golds, reward_function)`` for a reward scored a batch at a time."""

    name: str
    maximum: float
    label: str
    gold_column: str | None
    score: Callable[[str, Any, RewardSettings], float] | None = None
    score_batch: Callable[[list[str], list[Any], RewardFunction], list[float]] | None = None


REWARDS = {reward.name: reward for reward in (
    Reward("format_reward", 2.0, "Format rewards", None, lambda text, gold, settings: format_score(text)),
    Reward("accuracy_reward", 1.0, "Rewards Accuracy", "answer",
           lambda text, gold, settings: accuracy_score(text, gold)),
    Reward("length_think_reward", 1.0 + STEP_BONUS_CAP, "Length Rewards", None,
           lambda text, gold, settings: length_think_score(text, settings.length_window_words)),
    Reward("count_reward", 2.0, "Count rewards", None, lambda text, gold, settings: count_score(text)),
    Reward("chart_type_reward", 1.0, "Graph Type Rewards", "chart_type",
           lambda text, gold, settings: chart_type_score(text, gold)),
    Reward("table_style_reward", 1.75, "Table style rewards", "table",
           lambda text, gold, settings: table_style_score(text, gold)),
    Reward("process_style_reward", 1.0, "Process Style Rewards", "reasoning",
           score_batch=lambda texts, golds, function: process_style_scores(texts, golds, function.sentence_encoder())),
)}
"""Every reward, in the order TRL gets them; adding a reward is adding its record (and its scorer)."""
REWARD_NAMES = tuple(REWARDS)
REWARD_MAXIMA = {name: reward.maximum for name, reward in REWARDS.items()}
"""Largest value of each reward (every reward's smallest value is 0)."""
MAX_TOTAL_REWARD = sum(REWARD_MAXIMA.values())
"""The weighted total's largest value with unit weights (11.25)."""


def build_reward_funcs(
    settings: RewardSettings | None = None, encoder: SentenceEncoder | None = None
) -> list[RewardFunction]:
    """The reward functions in order (REWARD_NAMES), ready for `GRPOTrainer(reward_funcs=...)`.

    `encoder` replaces the sentence-transformers model of process_style_reward (tests pass a
    small local stand-in).
    """
    return [RewardFunction(name, settings, encoder) for name in REWARD_NAMES]


def reward_weights(settings: RewardSettings | None = None) -> list[float]:
    """The weights of the rewards in REWARD_NAMES order, for `GRPOConfig(reward_weights=...)`."""
    settings = settings if settings is not None else RewardSettings()
    return [settings.weights[name] for name in REWARD_NAMES]


REWARD_FUNCS = build_reward_funcs()
"""The rewards with default settings, in order."""

_DEFAULT_FUNCS = {function.__name__: function for function in REWARD_FUNCS}
format_reward = _DEFAULT_FUNCS["format_reward"]
accuracy_reward = _DEFAULT_FUNCS["accuracy_reward"]
length_think_reward = _DEFAULT_FUNCS["length_think_reward"]
count_reward = _DEFAULT_FUNCS["count_reward"]
chart_type_reward = _DEFAULT_FUNCS["chart_type_reward"]
table_style_reward = _DEFAULT_FUNCS["table_style_reward"]
process_style_reward = _DEFAULT_FUNCS["process_style_reward"]


def score_completions(
    completions: Sequence[Any],
    *,
    settings: RewardSettings | None = None,
    encoder: SentenceEncoder | None = None,
    **columns: Any,
) -> dict[str, list[float]]:
    """Every reward (unweighted) for each completion: reward name -> one float per completion."""
    return {
        reward.__name__: reward(completions=completions, **columns)
        for reward in build_reward_funcs(settings, encoder)
    }


def total_reward(
    completions: Sequence[Any],
    *,
    settings: RewardSettings | None = None,
    encoder: SentenceEncoder | None = None,
    **columns: Any,
) -> list[float]:
    """The weighted sum of the rewards for each completion (weights from `settings`)."""
    settings = settings if settings is not None else RewardSettings()
    completions = list(completions or [])
    scores = score_completions(completions, settings=settings, encoder=encoder, **columns)
    return [
        sum(settings.weights[name] * scores[name][index] for name in REWARD_NAMES)
        for index in range(len(completions))
    ]


# --------------------------------------------------------------------------- correctness (c_i)


def is_correct(completion: Any, answer: Any, threshold: float = 0.5, exact_match: bool = False) -> bool:
    """The correctness bit of one completion: accuracy_reward >= threshold (``exact_match``: the
    example's answer must match exactly, see `accuracy_score`).

    Sampling uses this; training thresholds the accuracy reward in the same way
    (`nbhelpers.objectives.correctness`), which is this score without the per-example exact match.
    """
    return accuracy_score(completion_text(completion), answer, exact_match) >= threshold
