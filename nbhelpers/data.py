"""Datasets: one example schema, a registry of sources, the Chart-RVR prompt, pixel budgets, TRL datasets.

Example schema: every loader yields dicts with exactly the keys
    id          str, unique within the dataset
    image       PIL.Image in mode RGB (transparency composited on white)
    question    str, the text the model sees
    answer      str, the gold answer
    chart_type  str or None
    table       {"columns": [str], "rows": [[str]]} or None
    reasoning   str or None (reference steps, `<step-k>: text` lines where the source has them)
    dataset     the registry name
plus, on every example of the datasets whose accuracy is reported per part, the optional key
    subset      str: chartqa "human" | "augmented"; chartqa-pro its "Question Type";
                plotqa the question template; chartbench the task (CR, VE, VC, GC, NQA).
Datasets without parts (chart-rvr-train, chartfc, evochart, synthetic) have no `subset` key;
`example_subset(example)` reads it either way. ChartQA-Pro examples also carry
    exact_match bool: its `Year` flag of the scored answer; True means exact match is required
                (no 5% numeric tolerance: "2019" is not "2020"). `example_exact_match` reads it.

`load_examples` returns a `datasets.Dataset` whose stored columns are exactly the schema keys and
whose rows (integer index or iteration) are schema dicts. Images stay encoded (bytes from the Hub,
or file paths for local sets) and are decoded one row at a time on access, so the 34K-row training
set never sits decoded in memory. Use integer indexing or iteration: slices follow the `datasets`
convention and return a dict of columns.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from datasets import Features, List, Value
from datasets import Image as ImageFeature
from PIL import Image

from .completion_parsing import reference_steps
from .errors import InputError
from .registry import DATASET_CATALOG, DATASET_NAMES, DatasetCard
from .synthetic import SYNTHETIC_CHART_TYPES, make_synthetic_examples

log = logging.getLogger(__name__)

EXAMPLE_KEYS = ("id", "image", "question", "answer", "chart_type", "table", "reasoning", "dataset")
SUBSET_KEY = "subset"
EXACT_MATCH_KEY = "exact_match"
OPTIONAL_FEATURES = {SUBSET_KEY: Value("string"), EXACT_MATCH_KEY: Value("bool")}  # in column order
TRL_COLUMNS = ("prompt", "image", "answer", "chart_type", "table", "reasoning", "id", "dataset")
CHART_TYPES = ("line", "bar", "stacked bar", "pie", "histogram", "scatterplot", "area", "stacked area",
               "bubble", "treemap")
MIN_IMAGE_SIDE = 28  # px; Qwen2.5-VL patches are 14 px, merged 2 x 2
TRAIN_MAX_PIXELS = 320 * 28 * 28
EVAL_MAX_PIXELS = 480 * 28 * 28
CHARTFC_SUFFIX = ". Answer yes/no."
CHARTBENCH_YES_NO_SUFFIX = " For binary questions, answer in yes/no."

TABLE_FEATURE = {"columns": List(Value("string")), "rows": List(List(Value("string")))}

SYSTEM_PROMPT = (
    "You are an expert at reading charts. Look at the chart image and answer the question.\n"
    "First think inside <think> and </think>. Inside the think block write, in this order:\n"
    "1. the chart type inside <type> and </type>, one of: " + ", ".join(CHART_TYPES) + ";\n"
    "2. the chart's data table inside <table> and </table>, as JSON with exactly the keys \"columns\" "
    "(the header strings) and \"rows\" (one list of cell strings per row);\n"
    "3. your reasoning as numbered steps, one per line, each starting with <step-1>:, <step-2>:, and so on.\n"
    "Then give only the final answer inside <answer> and </answer>: a number, a word or a short phrase, "
    "without units.\n"
    "Answer in exactly this format:\n"
    "<think>\n"
    "<type>bar</type>\n"
    "<table>{\"columns\": [\"Year\", \"Sales\"], \"rows\": [[\"2019\", \"12\"], [\"2020\", \"15\"]]}</table>\n"
    "<step-1>: ...\n"
    "<step-2>: ...\n"
    "</think>\n"
    "<answer>15</answer>"
)


class DatasetFormatError(InputError):
    """A source lacks a column or key, or holds a value of the wrong kind; the message names it."""


# --------------------------------------------------------------------------- schema helpers
def example_features(optional: Iterable[str] = ()) -> Features:
    """Arrow features of the stored schema columns (image as a lazily decoded Image feature), with the
    optional keys named in ``optional`` (from OPTIONAL_FEATURES)."""
    features = {
        "id": Value("string"), "image": ImageFeature(), "question": Value("string"),
        "answer": Value("string"), "chart_type": Value("string"), "table": TABLE_FEATURE,
        "reasoning": Value("string"), "dataset": Value("string"),
    }
    features.update({key: feature for key, feature in OPTIONAL_FEATURES.items() if key in optional})
    return Features(features)


def example_subset(example: dict) -> str | None:
    """The part of its dataset an example belongs to (e.g. ChartQA "human"), None if the dataset has none."""
    return example.get(SUBSET_KEY)


def example_exact_match(example: dict) -> bool:
    """True when the example's answer must match exactly (ChartQA-Pro's Year flag), else False."""
    return bool(example.get(EXACT_MATCH_KEY))


def examples_to_dataset(examples: Iterable[dict]) -> datasets.Dataset:
    """Schema dicts (image: a PIL image or an image file path) as a stored `datasets.Dataset`.

    Raises DatasetFormatError when an example lacks a key, has an unknown key, when only some
    examples carry an optional key (`subset`, `exact_match`), or when an id repeats.
    """
    rows = list(examples)
    optional = [key for key in OPTIONAL_FEATURES if rows and key in rows[0]]
    keys = list(example_features(optional))
    seen_ids: set[str] = set()
    for position, row in enumerate(rows):
        if set(row) != set(keys):
            raise DatasetFormatError(
                f"example {position} (id {row.get('id')!r}) has keys {sorted(row)}; expected {sorted(keys)}")
        if row["id"] in seen_ids:
            raise DatasetFormatError(f"dataset {row['dataset']!r}: id {row['id']!r} occurs more than once")
        seen_ids.add(row["id"])
    columns = {key: [_storable_image(row[key]) if key == "image" else row[key] for row in rows] for key in keys}
    return datasets.Dataset.from_dict(columns, features=example_features(optional))


def _storable_image(image: Any) -> Any:
    return str(image) if isinstance(image, Path) else image


# --------------------------------------------------------------------------- images
def to_rgb(image: Image.Image) -> Image.Image:
    """The image in mode RGB; transparent pixels are composited on white (PlotQA charts are RGBA)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def fit_pixel_budget(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """(width, height) in px with width * height <= max_pixels and both sides >= 28, aspect ratio kept.

    Images already inside the budget keep their size; a side under 28 px is scaled up to 28. Only
    for aspect ratios beyond max_pixels / 28**2 is the long side cut further to meet the budget.
    """
    if max_pixels < MIN_IMAGE_SIDE * MIN_IMAGE_SIDE:
        raise ValueError(f"max_pixels must be at least {MIN_IMAGE_SIDE}*{MIN_IMAGE_SIDE} = "
                         f"{MIN_IMAGE_SIDE ** 2}, got {max_pixels}")
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width} x {height}")
    scale = min(1.0, math.sqrt(max_pixels / (width * height)))
    if min(width, height) * scale < MIN_IMAGE_SIDE:
        scale = MIN_IMAGE_SIDE / min(width, height)
    new_width = max(MIN_IMAGE_SIDE, math.floor(width * scale + 1e-6))
    new_height = max(MIN_IMAGE_SIDE, math.floor(height * scale + 1e-6))
    if new_width * new_height > max_pixels:
        if new_width >= new_height:
            new_width = max_pixels // new_height
        else:
            new_height = max_pixels // new_width
    return new_width, new_height


def resize_to_pixel_budget(image: Image.Image, max_pixels: int) -> Image.Image:
    """RGB image resized (bicubic) to `fit_pixel_budget`; returned as is when the size already fits."""
    image = to_rgb(image)
    size = fit_pixel_budget(image.width, image.height, max_pixels)
    return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)


# --------------------------------------------------------------------------- prompt
def build_messages(question: str) -> list[dict]:
    """System prompt plus a user turn holding an image placeholder and the question (TRL/Qwen format)."""
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
    ]


def perfect_completion(example: dict) -> str:
    """The gold Chart-RVR completion of an example (type, table JSON, reference steps, answer).

    Raises ValueError when the example has no chart_type, table, reasoning or answer.
    """
    missing = [key for key in ("chart_type", "table", "reasoning", "answer") if example.get(key) in (None, "")]
    if missing:
        raise ValueError(f"perfect_completion: example {example.get('id')!r} has no {', '.join(missing)}")
    table = json.dumps({"columns": example["table"]["columns"], "rows": example["table"]["rows"]},
                       ensure_ascii=False)
    steps = [f"<step-{k}>: {text}" for k, text in enumerate(reference_steps(example["reasoning"]), start=1)]
    return "\n".join(["<think>", f"<type>{example['chart_type']}</type>", f"<table>{table}</table>", *steps,
                      "</think>", f"<answer>{example['answer']}</answer>"])


# --------------------------------------------------------------------------- lazy row transforms
class ExampleRows:
    """`datasets` transform of stored schema columns to schema rows: images converted to RGB."""

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        if "image" in batch:
            batch["image"] = [None if image is None else to_rgb(image) for image in batch["image"]]
        return batch


class TrlRows:
    """`datasets` transform of stored schema columns to the rows TRL's GRPOTrainer reads."""

    def __init__(self, max_pixels: int):
        fit_pixel_budget(MIN_IMAGE_SIDE, MIN_IMAGE_SIDE, max_pixels)  # validates max_pixels
        self.max_pixels = max_pixels

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        return {
            "prompt": [build_messages(question) for question in batch["question"]],
            "image": [resize_to_pixel_budget(image, self.max_pixels) for image in batch["image"]],
            **{key: batch[key] for key in TRL_COLUMNS if key not in ("prompt", "image")},
        }


def to_trl_dataset(examples: datasets.Dataset | Iterable[dict], max_pixels: int) -> datasets.Dataset:
    """A GRPOTrainer dataset: rows hold `prompt` (build_messages), `image` (RGB, within max_pixels),
    answer, chart_type, table, reasoning, id and dataset.

    Lazy: rows are built on access by a `with_transform`, so images are decoded and resized one
    batch at a time. Note that `column_names` and `features` describe the stored schema columns
    (question, not prompt); TRL only reads rows (keep `remove_unused_columns=False`, TRL's default).
    """
    transform = TrlRows(max_pixels)
    stored = examples if isinstance(examples, datasets.Dataset) else examples_to_dataset(examples)
    missing = [key for key in EXAMPLE_KEYS if key not in stored.column_names]
    if missing:
        raise DatasetFormatError(f"to_trl_dataset: the dataset lacks the schema column(s) {missing}; "
                                 f"it has {stored.column_names}")
    return stored.with_transform(transform)


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True, kw_only=True)
class DatasetSpec(DatasetCard):
    """One registered dataset: its catalog card plus `loader(request, **options)`, which returns its stored
    schema Dataset."""

    loader: Callable[..., datasets.Dataset]

    def options(self) -> tuple[str, ...]:
        """Names of the extra keyword options this dataset's loader accepts."""
        return tuple(name for name in inspect.signature(self.loader).parameters if name != "request")


@dataclass(frozen=True)
class LoadRequest:
    """What `load_examples` asks a loader for; `size` is the resolved subset size (None: all)."""

    spec: DatasetSpec
    split: str
    data_dir: Path | None
    hub_loader: Callable[..., datasets.Dataset]
    seed: int
    size: int | None

    @property
    def name(self) -> str:
        return self.spec.name


def subset_indices(n: int, size: int, seed: int) -> list[int]:
    """Sorted indices of a seeded random subset of range(n): min(size, n) of them; nested in size."""
    if size < 1:
        raise ValueError(f"subset size must be >= 1, got {size}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[:size])


def get_spec(name: str) -> DatasetSpec:
    """The registry entry of `name`; ValueError listing the known names otherwise."""
    if name not in DATASETS:
        raise InputError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASET_NAMES)}")
    return DATASETS[name]


def load_examples(
    name: str,
    split: str | None = None,
    data_dir: str | Path | None = None,
    subset_size: int | None = None,
    seed: int = 0,
    hub_loader: Callable[..., datasets.Dataset] | None = None,
    **options: Any,
) -> datasets.Dataset:
    """The examples of a registered dataset as a lazily decoding `datasets.Dataset` of schema rows.

    split: None for the dataset's default. data_dir: folder of a local dataset, the original ChartQA
    files for `chartqa`, or a local copy of the Hub repository for the other Hub datasets.
    subset_size: a seeded random subset of that many examples (same seed, same subset; larger than
    the dataset: all of it); None uses the dataset's default (plotqa 5,000, synthetic 64, others
    all). hub_loader: called as `hub_loader(hub_id_or_dir, split=split)`, default
    `datasets.load_dataset`. options: dataset-specific (see `DATASETS[name].options()`).
    """
    spec = get_spec(name)
    split = spec.default_split if split is None else split
    if split not in spec.splits:
        hint = " (ChartQA names it 'val')" if split == "validation" and "val" in spec.splits else ""
        raise ValueError(f"{name}: unknown split {split!r}{hint}; splits: {', '.join(spec.splits)}")
    if subset_size is not None and (isinstance(subset_size, bool) or not isinstance(subset_size, int)
                                    or subset_size < 1):
        raise ValueError(f"{name}: subset_size must be a positive integer or None, got {subset_size!r}")
    unknown = sorted(set(options) - set(spec.options()))
    if unknown:
        raise TypeError(f"{name}: unknown option(s) {unknown}; this dataset accepts "
                        f"{list(spec.options()) or 'no options'}")
    size = spec.default_subset_size if subset_size is None else subset_size
    request = LoadRequest(spec, split, None if data_dir is None else Path(data_dir),
                          hub_loader or datasets.load_dataset, seed, size)
    examples = spec.loader(request, **options)
    if size is not None and size < len(examples):
        examples = examples.select(subset_indices(len(examples), size, seed))
    return examples.with_transform(ExampleRows())


# --------------------------------------------------------------------------- value checks
def _where(path: Path | str, position: int, unit: str = "record") -> str:
    return f"{path} {unit} {position}"


def _required_text(value: Any, name: str, key: str, where: str) -> str:
    """A non-null scalar as str; DatasetFormatError naming the key and place otherwise."""
    if value is None or isinstance(value, (dict, list)):
        raise DatasetFormatError(f"{name}: {key!r} at {where} must be a string or number, got {value!r}")
    return str(value)


def _optional_text(value: Any) -> str | None:
    """None for null or blank values, else the value as str."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return str(value)


def _table(value: Any, name: str, where: str) -> dict | None:
    """A table struct as {"columns": [str], "rows": [[str]]} (null cells as ""); None when null."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise DatasetFormatError(f"{name}: 'table' at {where} must be a struct, got {value!r}")
    if value.get("columns") is None and value.get("rows") is None:
        return None
    columns, rows = value.get("columns") or [], value.get("rows") or []
    if not isinstance(columns, list) or not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
        raise DatasetFormatError(f"{name}: 'table' at {where} must be {{columns: [str], rows: [[str]]}}, "
                                 f"got {value!r}")
    return {"columns": [_cell(c) for c in columns], "rows": [[_cell(c) for c in row] for row in rows]}


def _cell(value: Any) -> str:
    return "" if value is None else str(value)


def _record(record: Any, keys: Sequence[str], name: str, where: str) -> dict:
    """The record, checked to be a JSON object holding every key; the error names the first key missing."""
    if not isinstance(record, dict):
        raise DatasetFormatError(f"{name}: {where} must be a JSON object, got {type(record).__name__}")
    for key in keys:
        if key not in record:
            raise DatasetFormatError(f"{name}: {where} has no key {key!r} (keys: {sorted(record)})")
    return record


def _image_file(path: Path, name: str, where: str) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"{name}: image file {path} (named by {where}) not found")
    return str(path.resolve())


def _read_json(path: Path, name: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{name}: file {path} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DatasetFormatError(f"{name}: {path} is not valid JSON (line {error.lineno}: {error.msg})") from None


def _json_records(path: Path, name: str) -> list:
    records = _read_json(path, name)
    if not isinstance(records, list):
        raise DatasetFormatError(f"{name}: {path} must hold a JSON list of records, "
                                 f"found a {type(records).__name__}")
    return records


def _require_data_dir(request: LoadRequest, layout: str) -> Path:
    if request.data_dir is None:
        raise ValueError(f"{request.name}: a local dataset; pass data_dir, the folder holding {layout}")
    if not request.data_dir.is_dir():
        raise FileNotFoundError(f"{request.name}: data_dir {request.data_dir} is not a folder (expected {layout})")
    return request.data_dir


def _chosen(n: int, request: LoadRequest) -> list[int]:
    """Indices of the records a local loader converts: the subset load_examples would pick."""
    if request.size is None or request.size >= n:
        return list(range(n))
    return subset_indices(n, request.size, request.seed)


# --------------------------------------------------------------------------- hub sources
def _load_hub(request: LoadRequest, required: Sequence[str]) -> datasets.Dataset:
    """The raw Hub split (or a local copy in data_dir), checked for the columns the loader reads."""
    source = request.spec.hub_id if request.data_dir is None else str(request.data_dir)
    raw = request.hub_loader(source, split=request.split)
    if not isinstance(raw, datasets.Dataset):
        raise TypeError(f"{request.name}: hub_loader({source!r}, split={request.split!r}) returned "
                        f"{type(raw).__name__}, not a datasets.Dataset")
    missing = [column for column in required if column not in raw.column_names]
    if missing:
        raise DatasetFormatError(f"{request.name}: column(s) {missing} missing from {source} split "
                                 f"{request.split!r}; it has {raw.column_names}")
    return raw.with_format(None)


def _text_columns(raw: datasets.Dataset, columns: Sequence[str]) -> dict[str, list]:
    """Python lists of the given columns (never touches the image column)."""
    return raw.select_columns(list(columns))[:]


def _with_images(columns: dict[str, list], raw: datasets.Dataset, name: str) -> datasets.Dataset:
    """Schema text columns joined with the raw image column, images left encoded (no copy)."""
    optional = [key for key in OPTIONAL_FEATURES if key in columns]
    text_features = Features({k: v for k, v in example_features(optional).items() if k != "image"})
    text = datasets.Dataset.from_dict(columns, features=text_features)
    images = raw.select_columns(["image"])
    feature = images.features["image"]
    if isinstance(feature, Value) and feature.dtype in ("binary", "large_binary"):
        images = images.cast_column("image", ImageFeature())
    elif isinstance(feature, ImageFeature) and not feature.decode:
        images = images.cast_column("image", ImageFeature())
    elif not isinstance(feature, ImageFeature):
        raise DatasetFormatError(f"{name}: column 'image' must hold images or encoded image bytes, "
                                 f"found feature {feature}")
    joined = datasets.concatenate_datasets([text, images], axis=1)
    return joined.select_columns(list(example_features(optional)))


def find_exact_duplicates(raw: datasets.Dataset, batch_size: int = 1000) -> list[int]:
    """Indices of rows equal in every column (image bytes included) to an earlier row."""
    seen: set[bytes] = set()
    duplicates = []
    position = 0
    for batch in raw.with_format("arrow").iter(batch_size=batch_size):
        for row in batch.to_pylist():
            text = json.dumps(row, sort_keys=True, default=lambda b: hashlib.blake2b(b).hexdigest())
            digest = hashlib.blake2b(text.encode("utf-8")).digest()
            if digest in seen:
                duplicates.append(position)
            seen.add(digest)
            position += 1
    return duplicates


def _load_chart_rvr_train(request: LoadRequest, drop_duplicates: bool = False) -> datasets.Dataset:
    """sanchit97/chart-rvr-grpo-train: query -> question, label -> answer; null fields pass as None."""
    name = request.name
    raw = _load_hub(request, ("image", "query", "label", "reasoning", "chart_type", "table"))
    text = _text_columns(raw, ("query", "label", "reasoning", "chart_type", "table"))
    n = len(raw)
    where = [f"row {i}" for i in range(n)]
    columns = {
        "id": [f"{name}-{i}" for i in range(n)],
        "question": [_required_text(v, name, "query", w) for v, w in zip(text["query"], where)],
        "answer": [_required_text(v, name, "label", w) for v, w in zip(text["label"], where)],
        "chart_type": [_optional_text(v) for v in text["chart_type"]],
        "table": [_table(v, name, w) for v, w in zip(text["table"], where)],
        "reasoning": [_optional_text(v) for v in text["reasoning"]],
        "dataset": [name] * n,
    }
    examples = _with_images(columns, raw, name)
    nulls = {key: sum(v is None for v in columns[key]) for key in ("chart_type", "table", "reasoning")}
    if any(nulls.values()):
        log.info("%s: rows with null fields (kept, as None): %s of %d", name, nulls, n)
    duplicates = find_exact_duplicates(raw)
    if duplicates:
        action = "dropped" if drop_duplicates else "kept (drop them with drop_duplicates=True)"
        log.warning("%s: %d of %d rows are exact duplicates of an earlier row; %s",
                    name, len(duplicates), n, action)
        if drop_duplicates:
            dropped = set(duplicates)
            examples = examples.select([i for i in range(n) if i not in dropped])
    return examples


_CHARTQA_SUBSETS = {0: "human", 1: "augmented", "human": "human", "machine": "augmented", "augmented": "augmented"}


def _chartqa_answer(label: Any, name: str, where: str) -> str:
    """ChartQA's gold answer: label[0] for the Hub's list labels, the label itself in the original files."""
    if isinstance(label, list):
        if not label:
            raise DatasetFormatError(f"{name}: 'label' at {where} is an empty list")
        label = label[0]
    return _required_text(label, name, "label", where)


def _load_chartqa(request: LoadRequest) -> datasets.Dataset:
    """HuggingFaceM4/ChartQA (or the original files in data_dir); id chartqa-{split}-{subset}-{k}."""
    if request.data_dir is not None:
        return _load_chartqa_files(request)
    name, split = request.name, request.split
    raw = _load_hub(request, ("image", "query", "label", "human_or_machine"))
    text = _text_columns(raw, ("query", "label", "human_or_machine"))
    counts = {"human": 0, "augmented": 0}
    columns: dict[str, list] = {key: [] for key in example_features([SUBSET_KEY]) if key != "image"}
    for i, (query, label, kind) in enumerate(zip(text["query"], text["label"], text["human_or_machine"])):
        where = f"row {i}"
        if kind not in _CHARTQA_SUBSETS:
            raise DatasetFormatError(f"{name}: 'human_or_machine' at {where} must be 0 (human) or 1 (machine), "
                                     f"got {kind!r}")
        subset = _CHARTQA_SUBSETS[kind]
        columns["id"].append(f"chartqa-{split}-{subset}-{counts[subset]}")
        counts[subset] += 1
        columns["question"].append(_required_text(query, name, "query", where))
        columns["answer"].append(_chartqa_answer(label, name, where))
        columns[SUBSET_KEY].append(subset)
    n = len(raw)
    columns.update(chart_type=[None] * n, table=[None] * n, reasoning=[None] * n, dataset=[name] * n)
    return _with_images(columns, raw, name)


def _load_chartqa_files(request: LoadRequest) -> datasets.Dataset:
    """Original layout: [ChartQA Dataset/]{split}/{split}_{human,augmented}.json and {split}/png/<imgname>."""
    name, split = request.name, request.split
    root = request.data_dir / "ChartQA Dataset" if (request.data_dir / "ChartQA Dataset").is_dir() \
        else request.data_dir
    records = []
    for subset in ("human", "augmented"):
        path = root / split / f"{split}_{subset}.json"
        records += [(subset, k, path, record) for k, record in enumerate(_json_records(path, name))]
    rows = []
    for subset, k, path, record in (records[i] for i in _chosen(len(records), request)):
        where = _where(path, k)
        record = _record(record, ("imgname", "query", "label"), name, where)
        rows.append({
            "id": f"chartqa-{split}-{subset}-{k}",
            "question": _required_text(record["query"], name, "query", where),
            "answer": _chartqa_answer(record["label"], name, where),
            "image": _image_file(root / split / "png" / str(record["imgname"]), name, where),
            "chart_type": None, "table": None, "reasoning": None, "dataset": name, SUBSET_KEY: subset,
        })
    return examples_to_dataset(rows)


def chartqa_pro_question(questions: Sequence[str], answers: Sequence[str], paragraph: str | None = None) -> str:
    """The text of one ChartQA-Pro row: optional context paragraph, earlier turns with their answers
    (conversational rows), then the last question, the only one scored."""
    parts = [f"Context: {paragraph.strip()}"] if paragraph and paragraph.strip() else []
    if len(questions) > 1:
        history = "\n".join(f"Q: {q}\nA: {a}" for q, a in zip(questions[:-1], answers[:-1]))
        parts += [f"Previous questions and answers:\n{history}", f"Question: {questions[-1]}"]
    else:
        parts.append(questions[-1])
    return "\n\n".join(parts)


def chartqa_pro_exact_match(year_flags: Any, question_type: str, name: str, where: str) -> bool:
    """Whether the scored answer needs exact match: a "YES" among its `Year` flags (a conversational
    row's last flag only, the official scorer's rule). DatasetFormatError unless a list of YES/NO."""
    if not isinstance(year_flags, list) or not year_flags or any(
            not isinstance(flag, str) or flag.strip().upper() not in ("YES", "NO") for flag in year_flags):
        raise DatasetFormatError(f"{name}: 'Year' at {where} must be a non-empty list of \"YES\"/\"NO\", "
                                 f"got {year_flags!r}")
    scored = year_flags[-1:] if question_type == "Conversational" else year_flags
    return any(flag.strip().upper() == "YES" for flag in scored)


def _load_chartqa_pro(request: LoadRequest) -> datasets.Dataset:
    """ahmed-masry/ChartQAPro: image bytes; answer = Answer[-1] (Answer[0] for one-turn rows); exact_match
    from `Year` (a copy without that column scores every answer with the 5% tolerance, and says so)."""
    name, split = request.name, request.split
    raw = _load_hub(request, ("image", "Question", "Answer", "Question Type"))
    has_paragraph = "Paragraph" in raw.column_names
    has_year = "Year" in raw.column_names
    if not has_year:
        log.warning("%s: no 'Year' column, so answers flagged for exact match (years) get the 5%% "
                    "numeric tolerance too", name)
    text = _text_columns(raw, ["Question", "Answer", "Question Type"] + (["Paragraph"] if has_paragraph else [])
                         + (["Year"] if has_year else []))
    n = len(raw)
    paragraphs = text["Paragraph"] if has_paragraph else [None] * n
    questions, answers = [], []
    for i, (turns, turn_answers) in enumerate(zip(text["Question"], text["Answer"])):
        where = f"row {i}"
        if not isinstance(turns, list) or not isinstance(turn_answers, list) or not turns \
                or len(turns) != len(turn_answers):
            raise DatasetFormatError(f"{name}: 'Question' and 'Answer' at {where} must be non-empty lists of "
                                     f"equal length, got {turns!r} and {turn_answers!r}")
        turns = [_required_text(q, name, "Question", where) for q in turns]
        turn_answers = [_required_text(a, name, "Answer", where) for a in turn_answers]
        questions.append(chartqa_pro_question(turns, turn_answers, paragraphs[i]))
        answers.append(turn_answers[-1])
    question_types = [_required_text(v, name, "Question Type", f"row {i}")
                      for i, v in enumerate(text["Question Type"])]
    columns = {
        "id": [f"chartqa-pro-{split}-{i}" for i in range(n)], "question": questions, "answer": answers,
        "chart_type": [None] * n, "table": [None] * n, "reasoning": [None] * n, "dataset": [name] * n,
        SUBSET_KEY: question_types,
        EXACT_MATCH_KEY: [chartqa_pro_exact_match(flags, kind, name, f"row {i}")
                          for i, (flags, kind) in enumerate(zip(text["Year"], question_types))]
        if has_year else [False] * n,
    }
    return _with_images(columns, raw, name)


# --------------------------------------------------------------------------- local sources
_PLOTQA_CHART_TYPES = {"vbar_categorical": "bar", "hbar_categorical": "bar", "line": "line", "dot_line": "line"}


def _load_plotqa(request: LoadRequest, version: str = "V2") -> datasets.Dataset:
    """PlotQA: {split}/qa_pairs_{version}.json ({"qa_pairs": [...]}) and {split}/png/<image_index>.png."""
    name, split = request.name, request.split
    if version not in ("V1", "V2"):
        raise ValueError(f"{name}: version must be 'V1' or 'V2', got {version!r}")
    data_dir = _require_data_dir(request, f"{split}/qa_pairs_{version}.json and {split}/png/")
    path = data_dir / split / f"qa_pairs_{version}.json"
    document = _read_json(path, name)
    if not isinstance(document, dict) or not isinstance(document.get("qa_pairs"), list):
        raise DatasetFormatError(f"{name}: {path} must be a JSON object whose key 'qa_pairs' holds a list")
    records = document["qa_pairs"]
    rows = []
    for k in _chosen(len(records), request):
        where = _where(path, k)
        record = _record(records[k], ("image_index", "question_string", "answer", "template", "type"), name, where)
        chart_type = _required_text(record["type"], name, "type", where)
        rows.append({
            "id": f"plotqa-{split}-{version}-{k}",
            "question": _required_text(record["question_string"], name, "question_string", where),
            "answer": _required_text(record["answer"], name, "answer", where),
            "chart_type": _PLOTQA_CHART_TYPES.get(chart_type, chart_type),
            "table": None, "reasoning": None, "dataset": name,
            SUBSET_KEY: _required_text(record["template"], name, "template", where),
            "image": _image_file(data_dir / split / "png" / f"{record['image_index']}.png", name, where),
        })
    return examples_to_dataset(rows)


def chartfc_question(claim: str) -> str:
    """A ChartFC claim as a yes/no question: the claim without its final period, then ". Answer yes/no."."""
    return claim.strip().rstrip(".").rstrip() + CHARTFC_SUFFIX


_CHARTFC_ANSWERS = {1: "Yes", 0: "No", "1": "Yes", "0": "No"}


def _load_chartfc(request: LoadRequest) -> datasets.Dataset:
    """ChartFC: [qa/]{split}_barplot_seaborn_diverse_charts.json and images/<image_filename>; 1 -> Yes, 0 -> No."""
    name, split = request.name, request.split
    file_name = f"{split}_barplot_seaborn_diverse_charts.json"
    data_dir = _require_data_dir(request, f"{file_name} (or qa/{file_name}) and images/")
    candidates = [data_dir / file_name, data_dir / "qa" / file_name]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"{name}: none of {[str(p) for p in candidates]} exists")
    records = _json_records(path, name)
    rows = []
    for k in _chosen(len(records), request):
        where = _where(path, k)
        record = _record(records[k], ("question", "answer", "image_filename"), name, where)
        label = record["answer"]
        if isinstance(label, bool) or not isinstance(label, (int, str)) or label not in _CHARTFC_ANSWERS:
            raise DatasetFormatError(f"{name}: 'answer' at {where} must be 1 (supports) or 0 (refutes), "
                                     f"got {label!r}")
        rows.append({
            "id": f"chartfc-{split}-{k}",
            "question": chartfc_question(_required_text(record["question"], name, "question", where)),
            "answer": _CHARTFC_ANSWERS[label],
            "chart_type": "bar", "table": None, "reasoning": None, "dataset": name,
            "image": _image_file(data_dir / "images" / str(record["image_filename"]), name, where),
        })
    return examples_to_dataset(rows)


def _load_evochart(request: LoadRequest) -> datasets.Dataset:
    """EvoChart: EvoChart-QA.json (a list of {imgname, query, label}) and png/<imgname>."""
    name = request.name
    data_dir = _require_data_dir(request, "EvoChart-QA.json and png/")
    path = data_dir / "EvoChart-QA.json"
    records = _json_records(path, name)
    rows = []
    for k in _chosen(len(records), request):
        where = _where(path, k)
        record = _record(records[k], ("imgname", "query", "label"), name, where)
        rows.append({
            "id": f"evochart-{request.split}-{k}",
            "question": _required_text(record["query"], name, "query", where),
            "answer": _required_text(record["label"], name, "label", where),
            "chart_type": None, "table": None, "reasoning": None, "dataset": name,
            "image": _image_file(data_dir / "png" / str(record["imgname"]), name, where),
        })
    return examples_to_dataset(rows)


def _read_jsonl(path: Path, name: str) -> list[tuple[int, Any]]:
    """(line number, parsed object) for each non-blank line."""
    if not path.is_file():
        raise FileNotFoundError(f"{name}: file {path} not found")
    records = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    records.append((number, json.loads(line)))
                except json.JSONDecodeError as error:
                    raise DatasetFormatError(f"{name}: {path} line {number} is not valid JSON ({error.msg})") \
                        from None
    return records


def _load_chartbench(request: LoadRequest) -> datasets.Dataset:
    """ChartBench: test.jsonl, images at the paths it names relative to data_dir; one example per turn,
    id chartbench-{id}-{turn} (turn from 0); yes/no (Acc+) turns get CHARTBENCH_YES_NO_SUFFIX."""
    name = request.name
    data_dir = _require_data_dir(request, "test.jsonl and data/test/...")
    path = data_dir / "test.jsonl"
    turns = []
    for number, record in _read_jsonl(path, name):
        where = _where(path, number, "line")
        record = _record(record, ("id", "image", "type", "conversation"), name, where)
        _record(record["type"], ("chart", "task", "QA"), name, f"{where} 'type'")
        if not isinstance(record["conversation"], list) or not record["conversation"]:
            raise DatasetFormatError(f"{name}: 'conversation' at {where} must be a non-empty list")
        turns += [(where, record, t, turn) for t, turn in enumerate(record["conversation"])]
    rows = []
    for where, record, t, turn in (turns[i] for i in _chosen(len(turns), request)):
        turn = _record(turn, ("query", "label"), name, f"{where} turn {t}")
        kind = record["type"]
        query = _required_text(turn["query"], name, "query", f"{where} turn {t}")
        rows.append({
            "id": f"chartbench-{record['id']}-{t}",
            "question": query + (CHARTBENCH_YES_NO_SUFFIX if kind["QA"] == "Acc+" else ""),
            "answer": _required_text(turn["label"], name, "label", f"{where} turn {t}"),
            "chart_type": _required_text(kind["chart"], name, "chart", where),
            "table": None, "reasoning": None, "dataset": name,
            SUBSET_KEY: _required_text(kind["task"], name, "task", where),
            "image": _image_file(data_dir / str(record["image"]), name, where),
        })
    return examples_to_dataset(rows)


def _load_synthetic(request: LoadRequest, image_size: tuple[int, int] = (112, 112),
                    chart_types: Sequence[str] = SYNTHETIC_CHART_TYPES) -> datasets.Dataset:
    """Matplotlib charts of seeded random tables; the subset size is the number drawn."""
    return examples_to_dataset(make_synthetic_examples(request.size, seed=request.seed, image_size=image_size,
                                                       chart_types=chart_types, split=request.split))


# The loader of every dataset in the catalog (nbhelpers.registry holds names, sources and splits).
LOADERS: dict[str, Callable[..., datasets.Dataset]] = {
    "chart-rvr-train": _load_chart_rvr_train, "chartqa": _load_chartqa, "chartqa-pro": _load_chartqa_pro,
    "plotqa": _load_plotqa, "chartfc": _load_chartfc, "evochart": _load_evochart,
    "chartbench": _load_chartbench, "synthetic": _load_synthetic,
}
DATASETS: dict[str, DatasetSpec] = {name: DatasetSpec(loader=LOADERS[name], **dataclasses.asdict(card))
                                    for name, card in DATASET_CATALOG.items()}
