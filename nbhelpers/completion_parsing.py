"""Parsing of Chart-RVR completions: type, table, reasoning steps and answer.

The model answers in this shape (asked for by :data:`nbhelpers.data.SYSTEM_PROMPT`, scored by
:mod:`nbhelpers.rewards`):

    <think>
    <type>bar</type>
    <table>{"columns": ["Year", "Sales"], "rows": [["2019", "12"], ["2020", "15"]]}</table>
    <step-1>: ...
    <step-2>: ...
    </think>
    <answer>15</answer>

Every function here is pure and total: any input (including megabyte strings and unbalanced
tags) returns a value without raising, in time linear in the input. No regular expression here
can backtrack catastrophically: tag blocks are located with `str.find`/`str.rfind`, and the
only patterns used (step markers, thousands groups, word tokens) are unambiguous.
"""

from __future__ import annotations

import json
import re
from typing import Any

BLOCK_TAGS = ("think", "type", "table", "answer")

STEP_MARKER = re.compile(r"<step-[ \t]*\d+[ \t]*>[ \t]*:?")
"""A reasoning-step marker, tolerant form: `<step-3>:`, `<step-3>` or `<step- 3 >:`."""

_STRICT_STEP_MARKER = re.compile(r"<step-\d+>:")
"""The exact marker the output format asks for."""
_STEP_CLOSING_TAG = re.compile(r"</step-[ \t]*\d+[ \t]*>")


def completion_text(completion: Any) -> str:
    """The text of a completion: a plain string, or TRL's chat form.

    The chat form is a list of messages `[{"role": "assistant", "content": str}]`; the
    contents of all assistant messages (or messages without a role) are joined. A content
    that is a list of parts contributes the `text` of its text parts. Anything else
    (None, numbers, malformed messages) reads as the empty string.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if not isinstance(completion, (list, tuple)):
        return ""
    pieces = []
    for message in completion:
        if not isinstance(message, dict) or message.get("role", "assistant") != "assistant":
            continue
        content = message.get("content")
        if isinstance(content, str):
            pieces.append(content)
        elif isinstance(content, (list, tuple)):
            pieces.extend(
                part["text"]
                for part in content
                if isinstance(part, dict) and isinstance(part.get("text"), str)
            )
    return "".join(pieces)


def last_tag_span(text: str, tag: str) -> tuple[int, int] | None:
    """Start and end offsets of the content of the LAST closed `<tag>...</tag>` pair, or None.

    The last closing tag is paired with the last opening tag before it, so a later unclosed
    `<tag>` does not hide an earlier complete block, and the content never contains `<tag>`.
    """
    opening, closing = f"<{tag}>", f"</{tag}>"
    end = text.rfind(closing)
    if end < 0:
        return None
    start = text.rfind(opening, 0, end)
    if start < 0:
        return None
    return start + len(opening), end


def last_tag_content(text: str, tag: str) -> str | None:
    """Stripped content of the last closed `<tag>...</tag>` pair, or None when there is none."""
    span = last_tag_span(text, tag)
    return None if span is None else text[span[0] : span[1]].strip()


def extract_answer(text: str) -> str | None:
    """The answer: content of the last closed `<answer>` block (the last answer wins)."""
    return last_tag_content(text, "answer")


def extract_chart_type(text: str) -> str | None:
    """The predicted chart type: content of the last closed `<type>` block."""
    return last_tag_content(text, "type")


def strip_code_fence(raw: str) -> str:
    """Remove one Markdown code fence (```json ... ``` or ``` ... ```) around a JSON text."""
    body = raw.strip()
    if body.startswith("```"):
        body = body[3:]
        if body[:4].lower() == "json":
            body = body[4:]
        body = body.strip()
        if body.endswith("```"):
            body = body[:-3].rstrip()
    return body


def parse_json_table(raw: str) -> dict | None:
    """The table text parsed as a JSON object, or None when it is not one.

    A code fence around the JSON is removed first. Numbers and the constants NaN/Infinity
    are kept as their source text (so cells compare as the strings the model wrote and huge
    integers cannot overflow). Anything that is not a JSON object (a list, a number, text,
    nesting too deep for the parser) is not a table.
    """
    try:
        parsed = json.loads(strip_code_fence(raw), parse_int=str, parse_float=str, parse_constant=str)
    except (ValueError, RecursionError):
        return None
    return parsed if isinstance(parsed, dict) else None


def extract_table(text: str) -> dict | None:
    """The predicted table: the last closed `<table>` block parsed by `parse_json_table`."""
    raw = last_tag_content(text, "table")
    return None if raw is None else parse_json_table(raw)


def remove_tag_blocks(text: str, tag: str) -> str:
    """`text` with every closed `<tag>...</tag>` block (tags included) cut out, in one pass."""
    opening, closing = f"<{tag}>", f"</{tag}>"
    kept, position = [], 0
    while True:
        start = text.find(opening, position)
        if start < 0:
            break
        end = text.find(closing, start + len(opening))
        if end < 0:
            break
        kept.append(text[position:start])
        position = end + len(closing)
    kept.append(text[position:])
    return "".join(kept)


def split_steps(region: str) -> list[str]:
    """The non-empty texts of the `<step-k>` markers in `region`, in order.

    A step's text runs from its marker (and optional colon) to the next marker or the end of
    the region; closing `</step-k>` tags are dropped. Text before the first marker is not a step.
    """
    markers = list(STEP_MARKER.finditer(region))
    steps = []
    for index, marker in enumerate(markers):
        end = markers[index + 1].start() if index + 1 < len(markers) else len(region)
        step = _STEP_CLOSING_TAG.sub(" ", region[marker.end() : end]).strip()
        if step:
            steps.append(step)
    return steps


def reasoning_steps(text: str) -> list[str]:
    """The reasoning steps of a completion: `<step-k>` texts only.

    They are read from the last closed `<think>` block (the whole completion when there is
    none), after cutting out the `<type>`, `<table>` and `<answer>` blocks, so neither the
    chart type nor the JSON table ever counts as reasoning.
    """
    span = last_tag_span(text, "think")
    region = text if span is None else text[span[0] : span[1]]
    for tag in ("type", "table", "answer"):
        region = remove_tag_blocks(region, tag)
    return split_steps(region)


def reference_steps(reasoning: str | None) -> list[str]:
    """The steps of a reference reasoning: its `<step-k>` texts, or the whole text if it has
    none; no steps for None or blank text."""
    if not isinstance(reasoning, str):
        return []
    steps = split_steps(reasoning)
    if steps:
        return steps
    stripped = reasoning.strip()
    return [stripped] if stripped else []


def tag_counts(text: str) -> dict[str, int]:
    """Occurrences of each opening and closing block tag, e.g. {"<think>": 1, "</think>": 1, ...}."""
    return {
        marker: text.count(marker) for tag in BLOCK_TAGS for marker in (f"<{tag}>", f"</{tag}>")
    }


def matches_output_format(text: str) -> bool:
    """Whether the whole completion has the Chart-RVR shape (module docstring).

    Required, after stripping surrounding whitespace: the text starts with `<think>` and ends
    with `</answer>`; each block tag occurs exactly once, in the order think, type, /type,
    table, /table, /think, answer, /answer; only whitespace between `<think>` and `<type>`,
    between `</type>` and `<table>`, and between `</think>` and `<answer>`; non-empty type,
    table and answer texts; and between `</table>` and `</think>` one or more `<step-k>:`
    steps with non-empty text, the first marker opening the region. The table does not have
    to be valid JSON here (table_style_reward judges it).
    """
    body = text.strip()
    if not (body.startswith("<think>") and body.endswith("</answer>")):
        return False
    if any(count != 1 for count in tag_counts(body).values()):
        return False
    order = ("<think>", "<type>", "</type>", "<table>", "</table>", "</think>", "<answer>", "</answer>")
    starts = {marker: body.find(marker) for marker in order}
    if any(starts[later] <= starts[earlier] for earlier, later in zip(order, order[1:])):
        return False

    def segment(after: str, before: str) -> str:
        return body[starts[after] + len(after) : starts[before]].strip()

    if segment("<think>", "<type>") or segment("</type>", "<table>") or segment("</think>", "<answer>"):
        return False
    if not (segment("<type>", "</type>") and segment("<table>", "</table>") and segment("<answer>", "</answer>")):
        return False
    steps_region = segment("</table>", "</think>")
    markers = [marker.group() for marker in STEP_MARKER.finditer(steps_region)]
    return (
        STEP_MARKER.match(steps_region) is not None
        and all(_STRICT_STEP_MARKER.fullmatch(marker) for marker in markers)
        and len(split_steps(steps_region)) == len(markers)
    )
