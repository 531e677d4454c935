"""Builders of small dataset fixtures in the sources' published shapes (see /work/shared/DATASETS.md).

Hub sets are local `datasets.Dataset`s with the Hub's features; local sets are JSON/JSONL/PNG files
written into a tmp folder. Every image is a flat colour, `colour_of(k)`, so a test can check that an
example carries the image of the row it came from.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
from datasets import ClassLabel, Features, List, Value
from datasets import Image as ImageFeature
from PIL import Image

IMAGE_SIZE = (56, 42)  # width, height in px


def colour_of(k: int) -> tuple[int, int, int]:
    """A distinct RGB colour per fixture row k (0 <= k < 200)."""
    return (10 + k, 200 - k, (37 * k) % 256)


def png_bytes(k: int, mode: str = "RGB", size: tuple[int, int] = IMAGE_SIZE) -> bytes:
    """PNG bytes of a flat image of colour_of(k); RGBA images are fully transparent at the top-left pixel."""
    image = Image.new("RGB", size, colour_of(k)).convert(mode)
    if mode == "RGBA":
        image.putpixel((0, 0), (0, 0, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(path: Path, k: int, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(k, mode))
    return path


def write_json(path: Path, value) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value), encoding="utf-8")
    return path


def hub_loader_for(table: dict[tuple[str, str], datasets.Dataset], calls: list | None = None):
    """A stand-in for datasets.load_dataset serving {(repo id, split): Dataset}; records its calls."""
    def load(path: str, split: str | None = None, **kwargs):
        if calls is not None:
            calls.append((path, split))
        if (path, split) not in table:
            raise FileNotFoundError(f"no fixture for {path} split {split}")
        return table[(path, split)]
    return load


def _image(k: int) -> dict:
    return {"bytes": png_bytes(k), "path": None}


# --------------------------------------------------------------------------- Hub: chart-rvr-train
CHART_RVR_FEATURES = Features({
    "image": ImageFeature(), "query": Value("string"), "label": Value("string"), "prompt": Value("string"),
    "reasoning": Value("string"), "chart_type": Value("string"),
    "table": {"columns": List(Value("string")), "rows": List(List(Value("string")))},
})


def chart_rvr_rows() -> list[dict]:
    """7 rows: row 4 repeats row 1 exactly, row 5 has null reasoning/chart_type/table, row 6 is row 0
    with another image (not a duplicate)."""
    table = {"columns": ["Year", "Sales"], "rows": [["2019", "12"], ["2020", "15"]]}
    rows = [
        {"image": _image(k), "query": f"What is value {k}?", "label": str(10 + k),
         "prompt": f"<|im_start|>user\nWhat is value {k}?<|im_end|>",
         "reasoning": f"<step-1>: Read bar {k}.\n<step-2>: It is {10 + k}.", "chart_type": "bar", "table": table}
        for k in range(4)
    ]
    rows.append(dict(rows[1]))
    rows.append({"image": _image(5), "query": "Is it rising?", "label": "Yes", "prompt": "p5",
                 "reasoning": None, "chart_type": None, "table": None})
    rows.append({**rows[0], "image": _image(6)})
    return rows


def chart_rvr_dataset(rows: list[dict] | None = None) -> datasets.Dataset:
    rows = chart_rvr_rows() if rows is None else rows
    return datasets.Dataset.from_list(rows, features=CHART_RVR_FEATURES)


# --------------------------------------------------------------------------- Hub: ChartQA
CHARTQA_FEATURES = Features({
    "image": ImageFeature(), "query": Value("string"), "label": List(Value("string")),
    "human_or_machine": ClassLabel(names=["human", "machine"]),
})


def chartqa_dataset() -> datasets.Dataset:
    """4 rows: human, human, machine, machine (labels are one-element lists)."""
    rows = [
        {"image": _image(0), "query": "How many bars?", "label": ["14"], "human_or_machine": 0},
        {"image": _image(1), "query": "Is 2019 higher?", "label": ["Yes"], "human_or_machine": 0},
        {"image": _image(2), "query": "What is the value of A?", "label": ["1.216666667"], "human_or_machine": 1},
        {"image": _image(3), "query": "Which is the largest?", "label": ["Apples"], "human_or_machine": 1},
    ]
    return datasets.Dataset.from_list(rows, features=CHARTQA_FEATURES)


# --------------------------------------------------------------------------- Hub: ChartQA-Pro
CHARTQA_PRO_FEATURES = Features({
    "image": Value("binary"), "Question": List(Value("string")), "Answer": List(Value("string")),
    "Question Type": Value("string"), "Year": List(Value("string")), "Paragraph": Value("string"),
})


def chartqa_pro_dataset() -> datasets.Dataset:
    """3 rows: a factoid, a 3-turn conversation, an unanswerable question with a paragraph."""
    rows = [
        {"image": png_bytes(0), "Question": ["Which year had the highest value?"], "Answer": ["2016"],
         "Question Type": "Factoid", "Year": ["YES"], "Paragraph": ""},
        {"image": png_bytes(1), "Question": ["What is the value in 2019?", "And in 2020?", "What is their sum?"],
         "Answer": ["12", "15", "27"], "Question Type": "Conversational", "Year": ["NO", "NO", "NO"],
         "Paragraph": ""},
        {"image": png_bytes(2), "Question": ["What will the share be in 2050?"], "Answer": ["Unanswerable"],
         "Question Type": "Hypothetical", "Year": ["NO"], "Paragraph": "Shares grew every year."},
    ]
    return datasets.Dataset.from_list(rows, features=CHARTQA_PRO_FEATURES)


# --------------------------------------------------------------------------- local: ChartQA files
def write_chartqa_files(root: Path, split: str = "test", wrapper: bool = True) -> Path:
    """`ChartQA Dataset/{split}/{split}_{human,augmented}.json` and png/; returns the data_dir to pass."""
    base = root / "ChartQA Dataset" if wrapper else root
    human = [{"imgname": "41699051005347.png", "query": "How many food item is shown in the bar graph?",
              "label": "14"},
             {"imgname": "multi_col_1.png", "query": "Is the red bar higher?", "label": "Yes"}]
    augmented = [{"imgname": "two_col_7.png", "query": "What is the value of Chile?", "label": "63"}]
    write_json(base / split / f"{split}_human.json", human)
    write_json(base / split / f"{split}_augmented.json", augmented)
    for k, record in enumerate(human + augmented):
        write_png(base / split / "png" / record["imgname"], k)
    return root


# --------------------------------------------------------------------------- local: PlotQA
def write_plotqa(root: Path, split: str = "test", version: str = "V2") -> Path:
    """`{split}/qa_pairs_{version}.json` ({"qa_pairs": [...]}) with RGBA `{split}/png/<image_index>.png`."""
    qa_pairs = [
        {"image_index": 0, "qid": "nmax_1", "question_string": "What is the maximum value?", "answer": 42,
         "answer_bbox": {}, "template": "min_max", "type": "vbar_categorical", "answer_id": 1, "question_id": 0},
        {"image_index": 1, "qid": "diff_2", "question_string": "What is the difference?", "answer": 3.75,
         "answer_bbox": {}, "template": "arithmetic", "type": "dot_line", "answer_id": 2, "question_id": 1},
        {"image_index": 1, "qid": "label_3", "question_string": "What is the label of the x-axis?",
         "answer": "Years", "answer_bbox": {}, "template": "structural", "type": "line", "answer_id": 3,
         "question_id": 2},
    ]
    write_json(root / split / f"qa_pairs_{version}.json", {"qa_pairs": qa_pairs})
    for index in (0, 1):
        write_png(root / split / "png" / f"{index}.png", index, mode="RGBA")
    return root


# --------------------------------------------------------------------------- local: ChartFC
def write_chartfc(root: Path, split: str = "test", in_qa_folder: bool = False) -> Path:
    """`[qa/]{split}_barplot_seaborn_diverse_charts.json` and `images/<image_filename>`."""
    records = [
        {"question": "Germany had the highest GDP in 2019", "answer": 1,
         "image_filename": "2019_12_chart_0.png", "caption": "GDP by country"},
        {"question": "France had fewer exports than Spain.", "answer": 0,
         "image_filename": "2019_12_chart_1.png", "caption": "Exports"},
    ]
    folder = root / "qa" if in_qa_folder else root
    write_json(folder / f"{split}_barplot_seaborn_diverse_charts.json", records)
    for k, record in enumerate(records):
        write_png(root / "images" / record["image_filename"], k)
    return root


# --------------------------------------------------------------------------- local: EvoChart
def write_evochart(root: Path) -> Path:
    """`EvoChart-QA.json` (list of {imgname, query, label}) and `png/<imgname>`."""
    records = [{"imgname": "bar_001.png", "query": "What is the highest value?", "label": "87"},
               {"imgname": "line_002.png", "query": "In which year was the minimum reached?", "label": 2012}]
    write_json(root / "EvoChart-QA.json", records)
    for k, record in enumerate(records):
        write_png(root / "png" / record["imgname"], k)
    return root


# --------------------------------------------------------------------------- local: ChartBench
def chartbench_records() -> list[dict]:
    """A two-turn yes/no (Acc+) row and a one-turn numeric (NQA) row."""
    return [
        {"id": 17, "image": "./data/test/bar/horizontal_single/chart_3/image.png",
         "type": {"chart": "bar", "image": "horizontal_single", "task": "CR", "QA": "Acc+"},
         "conversation": [{"label": "Yes", "query": "Is this a bar chart?"},
                          {"label": "No", "query": "Is this a pie chart?"}]},
        {"id": 18, "image": "./data/test/line/line_multi/chart_9/image.png",
         "type": {"chart": "line", "image": "line_multi", "task": "NQA", "QA": "GPT-acc"},
         "conversation": [{"label": "41.5", "query": "What is the value of Sales in 2019?"}]},
    ]


def write_chartbench(root: Path, records: list[dict] | None = None) -> Path:
    """`test.jsonl` plus the images at the relative paths it names."""
    records = chartbench_records() if records is None else records
    root.mkdir(parents=True, exist_ok=True)
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    for k, record in enumerate(records):
        write_png(root / record["image"], k)
    return root
