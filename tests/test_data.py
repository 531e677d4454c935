"""Tests of nbhelpers.data: loaders on fixtures in the sources' shapes, subsets, prompt, images, TRL rows."""

from __future__ import annotations

import logging

import datasets
import pytest
from PIL import Image

import fixtures_data as fx
from nbhelpers import data
from nbhelpers.data import DatasetFormatError, load_examples

EXPECTED_REGISTRY = {
    # name: (source, hub id, default split, splits)
    "chart-rvr-train": ("hub", "sanchit97/chart-rvr-grpo-train", "train", ("train",)),
    "chartqa": ("hub", "HuggingFaceM4/ChartQA", "test", ("train", "val", "test")),
    "chartqa-pro": ("hub", "ahmed-masry/ChartQAPro", "test", ("test",)),
    "plotqa": ("local", None, "test", ("train", "val", "test")),
    "chartfc": ("local", None, "test", ("train", "valid", "test")),
    "evochart": ("local", None, "test", ("test",)),
    "chartbench": ("local", None, "test", ("test",)),
    "synthetic": ("synthetic", None, "train", ("train", "test", "pretrain")),
}


def hub(name: str, dataset: datasets.Dataset, split: str | None = None, calls: list | None = None):
    spec = data.DATASETS[name]
    return fx.hub_loader_for({(spec.hub_id, split or spec.default_split): dataset}, calls)


def rows(examples) -> list[dict]:
    return [examples[i] for i in range(len(examples))]


def assert_schema(examples, name: str, with_subset: bool, with_exact_match: bool = False):
    keys = set(data.EXAMPLE_KEYS) | ({data.SUBSET_KEY} if with_subset else set()) \
        | ({data.EXACT_MATCH_KEY} if with_exact_match else set())
    assert isinstance(examples, datasets.Dataset)
    all_rows = rows(examples)
    assert all_rows, "no examples"
    for example in all_rows:
        assert set(example) == keys
        assert isinstance(example["image"], Image.Image) and example["image"].mode == "RGB"
        assert isinstance(example["question"], str) and example["question"]
        assert isinstance(example["answer"], str)
        assert example["dataset"] == name
    ids = [example["id"] for example in all_rows]
    assert len(set(ids)) == len(ids)
    assert [example["id"] for example in examples] == ids  # iteration yields the same rows
    return all_rows


def colour(image: Image.Image) -> tuple[int, int, int]:
    return image.getpixel((image.width // 2, image.height // 2))


# --------------------------------------------------------------------------- registry
def test_registry_holds_the_datasets_with_their_sources_and_splits():
    assert set(data.DATASETS) == set(EXPECTED_REGISTRY)
    for name, (source, hub_id, default_split, splits) in EXPECTED_REGISTRY.items():
        spec = data.DATASETS[name]
        assert (spec.name, spec.source, spec.hub_id, spec.default_split, spec.splits) == \
            (name, source, hub_id, default_split, splits)
        assert spec.description and "\n" not in spec.description
    assert data.DATASETS["plotqa"].default_subset_size == 5000
    assert data.DATASETS["synthetic"].default_subset_size == 64
    assert data.DATASETS["chart-rvr-train"].options() == ("drop_duplicates",)


@pytest.mark.parametrize("call, error, message", [
    (lambda: load_examples("chartqa2"), ValueError, "unknown dataset 'chartqa2'"),
    (lambda: load_examples("chartqa", split="validation"), ValueError, "'val'"),
    (lambda: load_examples("synthetic", colour="red"), TypeError, "colour"),
    (lambda: load_examples("evochart"), ValueError, "data_dir"),
    (lambda: load_examples("synthetic", subset_size=0), ValueError, "subset_size"),
    (lambda: load_examples("synthetic", subset_size=-3), ValueError, "subset_size"),
    (lambda: load_examples("synthetic", subset_size=True), ValueError, "subset_size"),
])
def test_bad_requests_raise_clear_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


# --------------------------------------------------------------------------- chart-rvr-train
def test_chart_rvr_train_maps_columns_and_passes_nulls(caplog):
    calls = []
    loader = hub("chart-rvr-train", fx.chart_rvr_dataset(), calls=calls)
    examples = load_examples("chart-rvr-train", hub_loader=loader)
    assert calls == [("sanchit97/chart-rvr-grpo-train", "train")]
    all_rows = assert_schema(examples, "chart-rvr-train", with_subset=False)
    assert len(all_rows) == 7
    first = all_rows[0]
    assert (first["id"], first["question"], first["answer"], first["chart_type"]) == \
        ("chart-rvr-train-0", "What is value 0?", "10", "bar")
    assert first["table"] == {"columns": ["Year", "Sales"], "rows": [["2019", "12"], ["2020", "15"]]}
    assert first["reasoning"] == "<step-1>: Read bar 0.\n<step-2>: It is 10."
    nulls = all_rows[5]
    assert (nulls["reasoning"], nulls["chart_type"], nulls["table"], nulls["answer"]) == (None, None, None, "Yes")
    assert [colour(r["image"]) for r in all_rows] == [fx.colour_of(k) for k in (0, 1, 2, 3, 1, 5, 6)]


def test_chart_rvr_train_reports_and_drops_exact_duplicates(caplog):
    loader = hub("chart-rvr-train", fx.chart_rvr_dataset())
    with caplog.at_level(logging.WARNING, logger="nbhelpers.data"):
        kept = load_examples("chart-rvr-train", hub_loader=loader)
    assert len(kept) == 7
    assert "1 of 7 rows are exact duplicates" in caplog.text and "drop_duplicates=True" in caplog.text
    dropped = load_examples("chart-rvr-train", hub_loader=loader, drop_duplicates=True)
    ids = [example["id"] for example in dropped]
    assert ids == [f"chart-rvr-train-{k}" for k in (0, 1, 2, 3, 5, 6)]  # row 6 differs from row 0 by its image
    assert [colour(example["image"]) for example in dropped] == [fx.colour_of(k) for k in (0, 1, 2, 3, 5, 6)]


def test_hub_datasets_read_a_local_copy_from_data_dir(tmp_path):
    calls = []
    loader = fx.hub_loader_for({(str(tmp_path), "train"): fx.chart_rvr_dataset()}, calls)
    examples = load_examples("chart-rvr-train", data_dir=tmp_path, hub_loader=loader)
    assert calls == [(str(tmp_path), "train")] and len(examples) == 7


def test_find_exact_duplicates_compares_every_column():
    assert data.find_exact_duplicates(fx.chart_rvr_dataset()) == [4]
    assert data.find_exact_duplicates(fx.chart_rvr_dataset(fx.chart_rvr_rows()[:4])) == []


def test_chart_rvr_train_subset_after_dropping_duplicates_is_seeded():
    loader = hub("chart-rvr-train", fx.chart_rvr_dataset())
    first = load_examples("chart-rvr-train", hub_loader=loader, drop_duplicates=True, subset_size=3, seed=5)
    again = load_examples("chart-rvr-train", hub_loader=loader, drop_duplicates=True, subset_size=3, seed=5)
    assert [e["id"] for e in first] == [e["id"] for e in again]
    assert len(first) == 3 and "chart-rvr-train-4" not in [e["id"] for e in first]


# --------------------------------------------------------------------------- missing columns (hub)
@pytest.mark.parametrize("name, build, column", [
    ("chart-rvr-train", fx.chart_rvr_dataset, "label"),
    ("chart-rvr-train", fx.chart_rvr_dataset, "table"),
    ("chartqa", fx.chartqa_dataset, "human_or_machine"),
    ("chartqa", fx.chartqa_dataset, "image"),
    ("chartqa-pro", fx.chartqa_pro_dataset, "Answer"),
    ("chartqa-pro", fx.chartqa_pro_dataset, "Question Type"),
])
def test_hub_loaders_name_a_missing_column(name, build, column):
    with pytest.raises(DatasetFormatError, match=f"{name}: column\\(s\\) \\['{column}'\\] missing"):
        load_examples(name, hub_loader=hub(name, build().remove_columns([column])))


# --------------------------------------------------------------------------- ChartQA
def test_chartqa_hub_takes_label_zero_and_reports_the_subset():
    examples = load_examples("chartqa", hub_loader=hub("chartqa", fx.chartqa_dataset()))
    all_rows = assert_schema(examples, "chartqa", with_subset=True)
    assert [(r["id"], r["answer"], data.example_subset(r)) for r in all_rows] == [
        ("chartqa-test-human-0", "14", "human"), ("chartqa-test-human-1", "Yes", "human"),
        ("chartqa-test-augmented-0", "1.216666667", "augmented"),
        ("chartqa-test-augmented-1", "Apples", "augmented"),
    ]
    assert all_rows[0]["question"] == "How many bars?"
    assert (all_rows[0]["chart_type"], all_rows[0]["table"], all_rows[0]["reasoning"]) == (None, None, None)


def test_chartqa_asks_the_hub_for_val():
    calls = []
    examples = load_examples("chartqa", split="val", hub_loader=hub("chartqa", fx.chartqa_dataset(), "val", calls))
    assert calls == [("HuggingFaceM4/ChartQA", "val")]
    assert examples[0]["id"] == "chartqa-val-human-0"


@pytest.mark.parametrize("wrapper", [True, False])
def test_chartqa_reads_the_original_files(tmp_path, wrapper):
    data_dir = fx.write_chartqa_files(tmp_path, wrapper=wrapper)
    all_rows = assert_schema(load_examples("chartqa", data_dir=data_dir), "chartqa", with_subset=True)
    assert [(r["id"], r["answer"], r["subset"], colour(r["image"])) for r in all_rows] == [
        ("chartqa-test-human-0", "14", "human", fx.colour_of(0)),
        ("chartqa-test-human-1", "Yes", "human", fx.colour_of(1)),
        ("chartqa-test-augmented-0", "63", "augmented", fx.colour_of(2)),
    ]
    assert all_rows[0]["question"] == "How many food item is shown in the bar graph?"


def test_chartqa_files_errors_name_the_file_or_key(tmp_path):
    data_dir = fx.write_chartqa_files(tmp_path)
    base = tmp_path / "ChartQA Dataset" / "test"
    with pytest.raises(FileNotFoundError, match="val_human.json"):
        load_examples("chartqa", split="val", data_dir=data_dir)
    (base / "png" / "two_col_7.png").unlink()
    with pytest.raises(FileNotFoundError, match="two_col_7.png"):
        load_examples("chartqa", data_dir=data_dir)
    fx.write_json(base / "test_human.json", [{"imgname": "41699051005347.png", "question": "q", "label": "1"}])
    with pytest.raises(DatasetFormatError, match=r"test_human.json record 0 has no key 'query'"):
        load_examples("chartqa", data_dir=data_dir)


# --------------------------------------------------------------------------- ChartQA-Pro
@pytest.mark.parametrize("questions, answers, paragraph, expected", [
    (["Which year?"], ["2016"], None, "Which year?"),
    (["Which year?"], ["2016"], "  ", "Which year?"),
    (["Share in 2050?"], ["Unanswerable"], "Shares grew.", "Context: Shares grew.\n\nShare in 2050?"),
    (["Value in 2019?", "And 2020?", "Sum?"], ["12", "15", "27"], None,
     "Previous questions and answers:\nQ: Value in 2019?\nA: 12\nQ: And 2020?\nA: 15\n\nQuestion: Sum?"),
])
def test_chartqa_pro_question_holds_the_history(questions, answers, paragraph, expected):
    assert data.chartqa_pro_question(questions, answers, paragraph) == expected


def test_chartqa_pro_scores_the_last_turn_and_keeps_unanswerable():
    examples = load_examples("chartqa-pro", hub_loader=hub("chartqa-pro", fx.chartqa_pro_dataset()))
    all_rows = assert_schema(examples, "chartqa-pro", with_subset=True, with_exact_match=True)
    assert [(r["id"], r["answer"], r["subset"], r["exact_match"]) for r in all_rows] == [
        ("chartqa-pro-test-0", "2016", "Factoid", True), ("chartqa-pro-test-1", "27", "Conversational", False),
        ("chartqa-pro-test-2", "Unanswerable", "Hypothetical", False),
    ]
    conversation = all_rows[1]["question"]
    assert conversation.endswith("Question: What is their sum?")
    assert "Q: What is the value in 2019?\nA: 12\nQ: And in 2020?\nA: 15" in conversation
    assert "27" not in conversation
    assert all_rows[2]["question"].startswith("Context: Shares grew every year.")
    assert [colour(r["image"]) for r in all_rows] == [fx.colour_of(k) for k in range(3)]


@pytest.mark.parametrize("flags, question_type, expected", [
    (["YES"], "Factoid", True),
    (["NO"], "Factoid", False),
    (["NO", "YES"], "Factoid", True),                 # a list answer with one year element
    (["YES", "NO", "NO"], "Conversational", False),   # only the last turn is scored
    (["NO", "NO", " yes "], "Conversational", True),
])
def test_chartqa_pro_exact_match_follows_the_scored_year_flag(flags, question_type, expected):
    assert data.chartqa_pro_exact_match(flags, question_type, "chartqa-pro", "row 0") is expected


@pytest.mark.parametrize("flags", [[], ["MAYBE"], "YES", [None]])
def test_chartqa_pro_rejects_bad_year_flags(flags):
    with pytest.raises(DatasetFormatError, match="'Year' at row 0"):
        data.chartqa_pro_exact_match(flags, "Factoid", "chartqa-pro", "row 0")


def test_chartqa_pro_without_year_column_uses_the_tolerance_and_says_so(caplog):
    without_year = fx.chartqa_pro_dataset().remove_columns(["Year"])
    with caplog.at_level("WARNING"):
        examples = load_examples("chartqa-pro", hub_loader=hub("chartqa-pro", without_year))
    assert [r["exact_match"] for r in rows(examples)] == [False, False, False]
    assert "no 'Year' column" in caplog.text


def test_chartqa_pro_rejects_turns_without_answers():
    broken = fx.chartqa_pro_dataset().map(lambda row: {"Answer": row["Answer"][:1]})
    with pytest.raises(DatasetFormatError, match="row 1"):
        load_examples("chartqa-pro", hub_loader=hub("chartqa-pro", broken))


# --------------------------------------------------------------------------- PlotQA
def test_plotqa_maps_records_and_composites_rgba_on_white(tmp_path):
    examples = load_examples("plotqa", data_dir=fx.write_plotqa(tmp_path))
    all_rows = assert_schema(examples, "plotqa", with_subset=True)
    assert [(r["id"], r["answer"], r["chart_type"], r["subset"]) for r in all_rows] == [
        ("plotqa-test-V2-0", "42", "bar", "min_max"), ("plotqa-test-V2-1", "3.75", "line", "arithmetic"),
        ("plotqa-test-V2-2", "Years", "line", "structural"),
    ]
    assert all_rows[0]["question"] == "What is the maximum value?"
    assert all_rows[0]["image"].getpixel((0, 0)) == (255, 255, 255)  # the transparent pixel
    assert colour(all_rows[1]["image"]) == fx.colour_of(1)


def test_plotqa_subset_is_the_seeded_choice(tmp_path):
    data_dir = fx.write_plotqa(tmp_path)
    picked = [e["id"] for e in load_examples("plotqa", data_dir=data_dir, subset_size=2, seed=3)]
    assert picked == [f"plotqa-test-V2-{k}" for k in data.subset_indices(3, 2, seed=3)]


def test_plotqa_errors_name_the_file_or_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="qa_pairs_V1.json"):
        load_examples("plotqa", data_dir=fx.write_plotqa(tmp_path), version="V1")
    fx.write_json(tmp_path / "test" / "qa_pairs_V2.json", {"qa_pairs": [{"image_index": 0, "answer": 1,
                                                                       "template": "t", "type": "line"}]})
    with pytest.raises(DatasetFormatError, match="record 0 has no key 'question_string'"):
        load_examples("plotqa", data_dir=tmp_path)
    fx.write_json(tmp_path / "test" / "qa_pairs_V2.json", [])
    with pytest.raises(DatasetFormatError, match="'qa_pairs'"):
        load_examples("plotqa", data_dir=tmp_path)
    fx.write_json(tmp_path / "test" / "qa_pairs_V2.json", {"qa_pairs": [
        {"image_index": 9, "question_string": "q", "answer": 1, "template": "t", "type": "line"}]})
    with pytest.raises(FileNotFoundError, match="9.png"):
        load_examples("plotqa", data_dir=tmp_path)


# --------------------------------------------------------------------------- ChartFC
@pytest.mark.parametrize("claim, question", [
    ("Germany had the highest GDP in 2019", "Germany had the highest GDP in 2019. Answer yes/no."),
    ("France had fewer exports than Spain. ", "France had fewer exports than Spain. Answer yes/no."),
])
def test_chartfc_question(claim, question):
    assert data.chartfc_question(claim) == question


@pytest.mark.parametrize("in_qa_folder", [False, True])
def test_chartfc_maps_labels_to_yes_no(tmp_path, in_qa_folder):
    examples = load_examples("chartfc", data_dir=fx.write_chartfc(tmp_path, in_qa_folder=in_qa_folder))
    all_rows = assert_schema(examples, "chartfc", with_subset=False)
    assert [(r["id"], r["question"], r["answer"], r["chart_type"]) for r in all_rows] == [
        ("chartfc-test-0", "Germany had the highest GDP in 2019. Answer yes/no.", "Yes", "bar"),
        ("chartfc-test-1", "France had fewer exports than Spain. Answer yes/no.", "No", "bar"),
    ]
    assert colour(all_rows[1]["image"]) == fx.colour_of(1)


def test_chartfc_errors_name_the_file_or_value(tmp_path):
    with pytest.raises(FileNotFoundError, match="valid_barplot_seaborn_diverse_charts.json"):
        load_examples("chartfc", split="valid", data_dir=fx.write_chartfc(tmp_path))
    path = tmp_path / "test_barplot_seaborn_diverse_charts.json"
    fx.write_json(path, [{"question": "c", "answer": "supports", "image_filename": "2019_12_chart_0.png"}])
    with pytest.raises(DatasetFormatError, match="'answer' at .* record 0 must be 1 .* got 'supports'"):
        load_examples("chartfc", data_dir=tmp_path)
    fx.write_json(path, [{"question": "c", "answer": 1}])
    with pytest.raises(DatasetFormatError, match="no key 'image_filename'"):
        load_examples("chartfc", data_dir=tmp_path)


# --------------------------------------------------------------------------- EvoChart
def test_evochart_maps_records(tmp_path):
    all_rows = assert_schema(load_examples("evochart", data_dir=fx.write_evochart(tmp_path)), "evochart", False)
    assert [(r["id"], r["question"], r["answer"]) for r in all_rows] == [
        ("evochart-test-0", "What is the highest value?", "87"),
        ("evochart-test-1", "In which year was the minimum reached?", "2012"),
    ]


def test_evochart_errors_name_the_file_or_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="EvoChart-QA.json"):
        load_examples("evochart", data_dir=tmp_path)
    fx.write_json(tmp_path / "EvoChart-QA.json", [{"imgname": "a.png", "query": "q"}])
    with pytest.raises(DatasetFormatError, match="record 0 has no key 'label'"):
        load_examples("evochart", data_dir=tmp_path)
    fx.write_json(tmp_path / "EvoChart-QA.json", {"imgname": "a.png"})
    with pytest.raises(DatasetFormatError, match="JSON list"):
        load_examples("evochart", data_dir=tmp_path)


# --------------------------------------------------------------------------- ChartBench
def test_chartbench_splits_turns_and_suffixes_yes_no_questions(tmp_path):
    examples = load_examples("chartbench", data_dir=fx.write_chartbench(tmp_path))
    all_rows = assert_schema(examples, "chartbench", with_subset=True)
    suffix = " For binary questions, answer in yes/no."
    assert [(r["id"], r["question"], r["answer"], r["chart_type"], r["subset"]) for r in all_rows] == [
        ("chartbench-17-0", "Is this a bar chart?" + suffix, "Yes", "bar", "CR"),
        ("chartbench-17-1", "Is this a pie chart?" + suffix, "No", "bar", "CR"),
        ("chartbench-18-0", "What is the value of Sales in 2019?", "41.5", "line", "NQA"),
    ]
    assert [colour(r["image"]) for r in all_rows] == [fx.colour_of(0), fx.colour_of(0), fx.colour_of(1)]


def test_chartbench_errors_name_the_line_key_or_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="test.jsonl"):
        load_examples("chartbench", data_dir=tmp_path)
    records = fx.chartbench_records()
    del records[1]["conversation"][0]["label"]
    fx.write_chartbench(tmp_path, records)
    with pytest.raises(DatasetFormatError, match="line 2 turn 0 has no key 'label'"):
        load_examples("chartbench", data_dir=tmp_path)
    (tmp_path / "test.jsonl").write_text('{"id": 1, "image": "x.png", "type": {}}\n', encoding="utf-8")
    with pytest.raises(DatasetFormatError, match="line 1 has no key 'conversation'"):
        load_examples("chartbench", data_dir=tmp_path)
    (tmp_path / "test.jsonl").write_text('\n{not json\n', encoding="utf-8")
    with pytest.raises(DatasetFormatError, match="line 2 is not valid JSON"):
        load_examples("chartbench", data_dir=tmp_path)
    records = fx.chartbench_records()
    fx.write_chartbench(tmp_path, records)
    (tmp_path / records[1]["image"]).unlink()
    with pytest.raises(FileNotFoundError, match="chart_9/image.png"):
        load_examples("chartbench", data_dir=tmp_path)


# --------------------------------------------------------------------------- subsets
@pytest.mark.parametrize("n, size, seed, expected_len", [
    (10, 3, 0, 3), (10, 10, 0, 10), (10, 25, 1, 10), (1, 1, 7, 1), (0, 5, 0, 0),
])
def test_subset_indices_are_sorted_unique_and_in_range(n, size, seed, expected_len):
    picked = data.subset_indices(n, size, seed)
    assert len(picked) == expected_len and picked == sorted(set(picked)) and all(0 <= i < n for i in picked)
    assert picked == data.subset_indices(n, size, seed)


def test_subset_indices_depend_on_the_seed_and_nest():
    assert data.subset_indices(1000, 10, 0) != data.subset_indices(1000, 10, 1)
    assert set(data.subset_indices(1000, 10, 4)) <= set(data.subset_indices(1000, 50, 4))
    with pytest.raises(ValueError, match=">= 1"):
        data.subset_indices(10, 0, 0)


def test_load_examples_subsets_are_seeded_and_clamped(tmp_path):
    loader = hub("chart-rvr-train", fx.chart_rvr_dataset())
    ids = lambda **kw: [e["id"] for e in load_examples("chart-rvr-train", hub_loader=loader, **kw)]  # noqa: E731
    assert ids(subset_size=4, seed=1) == ids(subset_size=4, seed=1)
    assert len(ids(subset_size=4, seed=1)) == 4
    assert {tuple(ids(subset_size=3, seed=s)) for s in range(6)} != {tuple(ids(subset_size=3, seed=0))}
    assert ids(subset_size=100) == ids()


# --------------------------------------------------------------------------- images
@pytest.mark.parametrize("width, height, max_pixels, expected", [
    (100, 80, 320 * 28 * 28, (100, 80)),      # inside the budget: unchanged
    (1000, 500, 250880, (708, 354)),          # scaled down, aspect 2:1 kept
    (800, 800, 401408, (633, 633)),
    (1920, 1080, 320 * 28 * 28, (667, 375)),
    (20, 10, 320 * 28 * 28, (56, 28)),        # short side raised to 28
    (20, 20, 784, (28, 28)),
    (10000, 10, 784 * 10, (280, 28)),         # extreme aspect: long side cut to the budget
    (10, 10000, 784 * 10, (28, 280)),
])
def test_fit_pixel_budget(width, height, max_pixels, expected):
    new_width, new_height = data.fit_pixel_budget(width, height, max_pixels)
    assert (new_width, new_height) == expected
    assert new_width * new_height <= max_pixels and min(new_width, new_height) >= 28


def test_fit_pixel_budget_rejects_a_budget_under_one_patch():
    with pytest.raises(ValueError, match="784"):
        data.fit_pixel_budget(100, 100, 783)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_resize_to_pixel_budget_returns_rgb_within_budget(mode):
    image = Image.new("RGB", (300, 200), (200, 30, 40)).convert(mode)
    resized = data.resize_to_pixel_budget(image, 120 * 28 * 28 // 10)
    assert resized.mode == "RGB" and resized.size == data.fit_pixel_budget(300, 200, 120 * 28 * 28 // 10)
    assert resized.width * resized.height <= 120 * 28 * 28 // 10


def test_to_rgb_composites_transparency_on_white():
    image = Image.new("RGBA", (30, 30), (255, 0, 0, 255))
    image.putpixel((0, 0), (0, 0, 0, 0))
    image.putpixel((1, 0), (0, 0, 255, 128))
    rgb = data.to_rgb(image)
    assert rgb.mode == "RGB"
    assert [rgb.getpixel((x, 0)) for x in range(3)] == [(255, 255, 255), (127, 127, 255), (255, 0, 0)]


# --------------------------------------------------------------------------- prompt
def test_build_messages_shape():
    assert data.build_messages("What is 2019's value?") == [
        {"role": "system", "content": [{"type": "text", "text": data.SYSTEM_PROMPT}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is 2019's value?"}]},
    ]


def test_system_prompt_asks_for_the_chart_rvr_shape():
    for chart_type in ("line", "bar", "stacked bar", "pie", "histogram", "scatterplot", "area", "stacked area",
                       "bubble", "treemap"):
        assert chart_type in data.SYSTEM_PROMPT
    shape = ('<think>\n<type>bar</type>\n<table>{"columns": ["Year", "Sales"], "rows": [["2019", "12"], '
             '["2020", "15"]]}</table>\n<step-1>: ...\n<step-2>: ...\n</think>\n<answer>15</answer>')
    assert shape in data.SYSTEM_PROMPT


def test_qwen_chat_template_renders_the_messages():
    models = pytest.importorskip("nbhelpers.models")
    processor = models.build_offline_processor(data.TRAIN_MAX_PIXELS)
    messages = data.build_messages("Which bar is tallest?")
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert data.SYSTEM_PROMPT in text
    assert "<|vision_start|><|image_pad|><|vision_end|>Which bar is tallest?" in text
    assert text.rstrip().endswith("<|im_start|>assistant")
    image = Image.new("RGB", (84, 56), "white")
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 6]]


def test_perfect_completion_has_the_output_format():
    parsing = pytest.importorskip("nbhelpers.completion_parsing")
    example = {"id": "x", "chart_type": "bar", "answer": "15",
               "reasoning": "<step-1>: Read 2020.\n<step-2>: It is 15.",
               "table": {"columns": ["Year", "Sales"], "rows": [["2019", "12"], ["2020", "15"]]}}
    completion = data.perfect_completion(example)
    assert completion == ('<think>\n<type>bar</type>\n'
                          '<table>{"columns": ["Year", "Sales"], "rows": [["2019", "12"], ["2020", "15"]]}</table>\n'
                          '<step-1>: Read 2020.\n<step-2>: It is 15.\n</think>\n<answer>15</answer>')
    assert parsing.matches_output_format(completion)
    with pytest.raises(ValueError, match="'x' has no table, reasoning"):
        data.perfect_completion({**example, "table": None, "reasoning": None})


# --------------------------------------------------------------------------- TRL datasets
def test_to_trl_dataset_from_hub_examples_is_lazy_and_complete():
    examples = load_examples("chart-rvr-train", hub_loader=hub("chart-rvr-train", fx.chart_rvr_dataset()))
    trl_rows = data.to_trl_dataset(examples, max_pixels=28 * 28 * 2)
    assert isinstance(trl_rows, datasets.Dataset) and len(trl_rows) == len(examples)
    assert trl_rows.format["type"] == "custom"  # built on access, not materialised
    row = trl_rows[5]
    assert set(row) == set(data.TRL_COLUMNS)
    assert row["prompt"] == data.build_messages("Is it rising?")
    assert (row["answer"], row["table"], row["reasoning"], row["id"], row["dataset"]) == \
        ("Yes", None, None, "chart-rvr-train-5", "chart-rvr-train")
    assert row["image"].mode == "RGB" and row["image"].width * row["image"].height <= 28 * 28 * 2
    assert [r["id"] for r in trl_rows] == [e["id"] for e in examples]


def test_to_trl_dataset_from_a_list_feeds_trl_prepare_multimodal_messages():
    from trl.data_utils import prepare_multimodal_messages

    example = {"id": "a", "image": Image.new("RGBA", (300, 100), (0, 0, 255, 255)), "question": "Q?",
               "answer": "3", "chart_type": "bar", "table": {"columns": ["x"], "rows": [["1"]]},
               "reasoning": "<step-1>: r", "dataset": "synthetic"}
    row = data.to_trl_dataset([example], max_pixels=28 * 28 * 4)[0]
    assert row["image"].size == (96, 32)  # 300 x 100 scaled into 4 patches of 28 x 28
    assert row["table"] == {"columns": ["x"], "rows": [["1"]]}
    messages = prepare_multimodal_messages(row["prompt"], images=[row["image"]])
    assert messages[1]["content"][0]["image"] is row["image"]
    assert messages[1]["content"][1] == {"type": "text", "text": "Q?"}


@pytest.mark.parametrize("bad, message", [
    ({"extra": 1}, "has keys"),
])
def test_examples_to_dataset_rejects_keys_outside_the_schema(bad, message):
    example = {"id": "a", "image": Image.new("RGB", (28, 28)), "question": "q", "answer": "a", "chart_type": None,
               "table": None, "reasoning": None, "dataset": "d"}
    with pytest.raises(DatasetFormatError, match=message):
        data.examples_to_dataset([{**example, **bad}])
    with pytest.raises(DatasetFormatError, match="id 'a' occurs more than once"):
        data.examples_to_dataset([example, example])


def test_to_trl_dataset_names_missing_schema_columns():
    with pytest.raises(DatasetFormatError, match=r"lacks the schema column\(s\) \['id', 'image', 'answer'"):
        data.to_trl_dataset(datasets.Dataset.from_dict({"question": ["q"]}), max_pixels=28 * 28 * 4)


def test_catalog_splits_of_synthetic_are_the_generator_splits():
    from nbhelpers.registry import DATASET_CATALOG
    from nbhelpers.synthetic import SYNTHETIC_SPLITS

    assert DATASET_CATALOG["synthetic"].splits == SYNTHETIC_SPLITS
