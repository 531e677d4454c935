"""Synthetic chart questions: seeded random tables drawn with matplotlib (Agg), answers computed from the table.

Each example follows the data schema of ``nbhelpers.data`` (id, image, question, answer, chart_type,
table, reasoning, dataset). Example ``i`` of seed ``s`` depends only on ``(s, i)``, so
``make_synthetic_examples(10, s)[:5] == make_synthetic_examples(5, s)`` and the same seed gives
byte-identical images.

Reference reasoning format: 2 or 3 lines ``<step-k>: text`` (k = 1, 2, ...) joined by ``\\n``, exactly
the step lines a correct Chart-RVR completion contains (``nbhelpers.data.reasoning_steps`` strips
the markers).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # before any pyplot import anywhere; this module never imports pyplot

import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402

SYNTHETIC_CHART_TYPES = ("bar", "line", "pie", "scatterplot")
# "pretrain" is the stream tools/pretrain_tiny.py trains tiny-pretrained on, apart from RL training and tests.
SYNTHETIC_SPLITS = ("train", "test", "pretrain")
QUESTION_KINDS = ("value", "max", "min", "difference", "sum")
DPI = 64  # small so that drawing a 112 x 112 px chart takes a few milliseconds
FONT_SIZE = 5  # points

_CATEGORY_POOLS = {
    "Fruit": ("Apples", "Bananas", "Cherries", "Dates", "Figs", "Grapes", "Kiwis", "Lemons"),
    "Country": ("Chile", "Egypt", "India", "Japan", "Kenya", "Peru", "Spain", "Togo"),
    "Team": ("Red", "Blue", "Green", "Gold", "Grey", "Pink", "Teal", "Navy"),
}
_METRICS = ("Sales", "Revenue", "Visitors", "Units", "Orders")
_COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860")
_PIE_COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C")


def make_synthetic_examples(
    n: int,
    seed: int = 0,
    image_size: tuple[int, int] = (112, 112),
    chart_types: Sequence[str] = SYNTHETIC_CHART_TYPES,
    split: str = "train",
    draw: bool = True,
    start: int = 0,
) -> list[dict]:
    """Examples ``start`` .. ``start + n - 1``; chart types cycle through ``chart_types``; image_size is
    (width, height) px.

    ``draw=False`` skips the rendering (``image`` is None) for text-only uses such as tokenizer training.
    """
    if split not in SYNTHETIC_SPLITS:
        raise ValueError(f"synthetic: split must be one of {SYNTHETIC_SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"synthetic: n must be >= 0, got {n}")
    if start < 0:
        raise ValueError(f"synthetic: start must be >= 0, got {start}")
    width, height = (int(v) for v in image_size)
    if width < 28 or height < 28:
        raise ValueError(f"synthetic: image_size must be at least 28 x 28 px, got {image_size}")
    chart_types = tuple(chart_types)
    unknown = [t for t in chart_types if t not in SYNTHETIC_CHART_TYPES]
    if not chart_types or unknown:
        raise ValueError(f"synthetic: chart_types must be a non-empty subset of {SYNTHETIC_CHART_TYPES}, "
                         f"got {chart_types}")
    canvas = FigureCanvasAgg(Figure(figsize=(width / DPI, height / DPI), dpi=DPI))
    return [_make_example(canvas if draw else None, split, seed, i, chart_types[i % len(chart_types)],
                          (width, height)) for i in range(start, start + n)]


def _make_example(canvas: FigureCanvasAgg | None, split: str, seed: int, index: int, chart_type: str,
                  size: tuple[int, int]) -> dict:
    rng = random.Random(f"synthetic:{split}:{seed}:{index}")  # str seeds hash with SHA-512: stable everywhere
    header, categories, metric, values = _random_table(rng, chart_type)
    question, answer, steps = _random_question(rng, chart_type, header, categories, metric, values)
    image = None if canvas is None else _draw(canvas, rng, chart_type, categories, metric, values, size)
    return {
        "id": f"synthetic-{split}-{seed}-{index}",
        "image": image,
        "question": question,
        "answer": answer,
        "chart_type": chart_type,
        "table": {"columns": [header, metric], "rows": [[c, str(v)] for c, v in zip(categories, values)]},
        "reasoning": "\n".join(f"<step-{k}>: {text}" for k, text in enumerate(steps, start=1)),
        "dataset": "synthetic",
    }


def _random_table(rng: random.Random, chart_type: str) -> tuple[str, list[str], str, list[int]]:
    """(category header, categories, metric name, distinct integer values in [1, 60])."""
    count = rng.randint(3, 5) if chart_type == "pie" else rng.randint(3, 6)
    use_years = chart_type in ("line", "scatterplot") or (chart_type == "bar" and rng.random() < 0.5)
    if use_years:
        start = rng.randint(2000, 2018)
        header, categories = "Year", [str(start + k) for k in range(count)]
    else:
        header = rng.choice(sorted(_CATEGORY_POOLS))
        categories = rng.sample(_CATEGORY_POOLS[header], count)
    return header, categories, rng.choice(_METRICS), rng.sample(range(1, 61), count)


def _random_question(rng: random.Random, chart_type: str, header: str, categories: list[str], metric: str,
                     values: list[int]) -> tuple[str, str, list[str]]:
    """(question, answer, reasoning steps without markers); the answer is computed from the table."""
    kind = rng.choice(QUESTION_KINDS)
    chart_words = {"bar": "bar chart", "line": "line chart", "pie": "pie chart", "scatterplot": "scatter plot"}
    intro = f"The {chart_words[chart_type]} shows {metric} by {header}"
    listing = ", ".join(f"{c} = {v}" for c, v in zip(categories, values))
    if kind == "value":
        k = rng.randrange(len(categories))
        return (f"What is the {metric} for {categories[k]}?", str(values[k]),
                [f"{intro}; find the mark labelled {categories[k]}.",
                 f"Read its value from the chart: the {metric} for {categories[k]} is {values[k]}."])
    if kind in ("max", "min"):
        pick = max if kind == "max" else min
        k = values.index(pick(values))
        word = "highest" if kind == "max" else "lowest"
        return (f"Which {header} has the {word} {metric}?", categories[k],
                [f"{intro}; read every value: {listing}.",
                 f"The {word} value is {values[k]}, so the answer is {categories[k]}."])
    if kind == "difference":
        a, b = rng.sample(range(len(categories)), 2)
        if values[a] < values[b]:
            a, b = b, a
        return (f"What is the difference in {metric} between {categories[a]} and {categories[b]}?",
                str(values[a] - values[b]),
                [f"{intro}; read the value for {categories[a]}: {values[a]}.",
                 f"Read the value for {categories[b]}: {values[b]}.",
                 f"Subtract the smaller from the larger: {values[a]} - {values[b]} = {values[a] - values[b]}."])
    total = sum(values)
    return (f"What is the total {metric} over all {header} values shown?", str(total),
            [f"{intro}; read every value: {listing}.",
             f"Add them up: {' + '.join(str(v) for v in values)} = {total}."])


def _draw(canvas: FigureCanvasAgg, rng: random.Random, chart_type: str, categories: list[str], metric: str,
          values: list[int], size: tuple[int, int]) -> Image.Image:
    """Render the chart on the reused canvas and return it as an RGB image of exactly ``size`` px."""
    figure = canvas.figure
    figure.clear()
    ax = figure.add_axes((0.25, 0.1, 0.5, 0.76) if chart_type == "pie" else (0.06, 0.2, 0.88, 0.68))
    positions = list(range(len(categories)))
    color = rng.choice(_COLORS)
    if chart_type == "pie":
        ax.pie(values, labels=[f"{c} ({v})" for c, v in zip(categories, values)], colors=_PIE_COLORS,
               startangle=90, counterclock=False, textprops={"fontsize": FONT_SIZE})
        ax.set_aspect("equal")
    else:
        if chart_type == "bar":
            ax.bar(positions, values, color=color, width=0.6)
        elif chart_type == "line":
            ax.plot(positions, values, color=color, marker="o", markersize=2, linewidth=1)
        else:
            ax.scatter(positions, values, color=color, s=6)
        for x, v in zip(positions, values):
            ax.text(x, v + 1, str(v), ha="center", va="bottom", fontsize=FONT_SIZE)
        ax.set_ylim(0, max(values) * 1.25)
        ax.set_xlim(-0.6, len(categories) - 0.4)
        ax.set_xticks(positions, categories, fontsize=FONT_SIZE, rotation=45 if len(categories) > 4 else 0)
        ax.yaxis.set_visible(False)  # values are printed on the marks; y ticks would double the drawing time
    figure.text(0.5, 0.97, metric, ha="center", va="top", fontsize=FONT_SIZE + 1)
    canvas.draw()
    image = Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())
    return image if image.size == size else image.resize(size, Image.Resampling.BICUBIC)
