import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from nbhelpers import rollout, sampling
from nbhelpers.config import load_config, resolve_parameter_file
from nbhelpers.passk import read_samples
from nbhelpers.sampling import SamplesWriter, finished_problems, repair_samples_file
from fast_presets import TINY



def smoke(**overrides):
    return load_config([resolve_parameter_file("smoke", "presets"), TINY,
                        resolve_parameter_file("local-cpu", "platforms")],
                       overrides)


def record(i, dataset="synthetic"):
    return {"id": str(i), "dataset": dataset, "question": "q", "answer": "1", "completions": ["a", "b"],
            "correct": [True, False], "meta": {}}


REPAIRS = [  # file content, bytes removed, ids left
    (b"", 0, set()),
    (json.dumps(record(1)).encode() + b"\n", 0, {("synthetic", "1")}),
    (json.dumps(record(1)).encode() + b"\n" + json.dumps(record(2)).encode()[:20], 20, {("synthetic", "1")}),
    (json.dumps(record(1)).encode() + b"\n{\"id\": \"2\", \"dat\n", 17, {("synthetic", "1")}),
]


@pytest.mark.parametrize("content,removed,ids", REPAIRS)
def test_repair_truncated_last_line(tmp_path, content, removed, ids):
    path = tmp_path / "s.jsonl"
    path.write_bytes(content)
    assert repair_samples_file(path) == removed
    assert finished_problems(path) == ids


def test_writer_skips_finished_problems_and_never_duplicates(tmp_path):
    path = tmp_path / "s.jsonl"
    with SamplesWriter(path) as w:
        w.write(record(1))
        w.write(record(1))
    with SamplesWriter(path) as w:
        assert ("synthetic", "1") in w.done
        w.write(record(1))
        w.write(record(2))
    lines = path.read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["1", "2"]


def test_bad_line_in_the_middle_names_file_and_line(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps(record(1)) + "\n{oops}\n" + json.dumps(record(2)) + "\n")
    with pytest.raises(ValueError, match=r"s\.jsonl line 2"):
        finished_problems(path)


def test_out_of_memory_halves_the_chunk(monkeypatch):
    calls = []

    def fake_sample(model, inputs, n, **kwargs):
        calls.append(n)
        if n > 2:
            raise torch.cuda.OutOfMemoryError("fake")
        return [[1, 2]] * n

    monkeypatch.setattr("nbhelpers.rollout.sample_completions", fake_sample)
    model = torch.nn.Linear(1, 1)
    out = sampling.generate_in_chunks(model, {"input_ids": torch.ones(1, 3, dtype=torch.long)}, 7, 8,
                                      max_new_tokens=4, temperature=1.0, top_p=1.0, eos_token_ids=[0],
                                      pad_token_id=0, seed=0)
    assert len(out) == 7
    assert calls[:3] == [7, 3, 1] and all(c == 1 for c in calls[2:])  # 7 -> 3 -> 1, then stays


@pytest.mark.parametrize("rows,halved", [(8, 4), (7, 3), (3, 1), (2, 1)])
def test_out_of_memory_halves_the_rows_after_releasing(rows, halved):
    released = []
    assert rollout.halved_after_oom(rows, torch.cuda.OutOfMemoryError("fake"), lambda: released.append(1)) == halved
    assert released == [1]


def test_out_of_memory_at_one_row_is_raised_again():
    error = torch.cuda.OutOfMemoryError("fake")
    with pytest.raises(torch.cuda.OutOfMemoryError) as raised:
        rollout.halved_after_oom(1, error, lambda: pytest.fail("nothing to release: the error stands"))
    assert raised.value is error


def test_problem_seed_is_order_independent():
    assert sampling.problem_seed(1, "d", "a") == sampling.problem_seed(1, "d", "a")
    assert len({sampling.problem_seed(1, "d", i) for i in "abcdef"}) == 6
    assert sampling.problem_seed(1, "d", "a") != sampling.problem_seed(2, "d", "a")


def sample_command(out, problems):
    return [sys.executable, "-m", "nbhelpers", "sample", "--params", "smoke", "--params", str(TINY),
            "--params", "local-cpu", "--out", str(out), "--set", f"max_problems={problems}", "--set", "n_samples=8"]


@pytest.mark.slow
def test_killed_sampling_resumes_to_the_same_file(tmp_path):
    problems = 6
    full = tmp_path / "full.jsonl"
    done = subprocess.run(sample_command(full, problems), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    part = tmp_path / "part.jsonl"
    proc = subprocess.Popen(sample_command(part, problems), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if part.exists() and part.read_text().count("\n") >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "sampling finished before it could be killed"
    with open(part, "ab") as fh:  # as if the kill had landed mid-write
        fh.write(b'{"id": "synthetic-test-42-9", "dataset": "synth')
    again = subprocess.run(sample_command(part, problems), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]

    def by_id(path):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        return {(r["dataset"], r["id"]): r for r in records}, len(records)

    a, count_a = by_id(full)
    b, count_b = by_id(part)
    assert count_a == count_b == problems and a.keys() == b.keys()
    for key in a:  # each problem draws from its own seed, so resumed samples equal uninterrupted ones
        assert a[key]["completions"] == b[key]["completions"]
        assert a[key]["correct"] == b[key]["correct"]
        assert len(a[key]["completions"]) == 8
    assert len(read_samples(part)) == problems


def test_eval_accuracy_per_dataset(tmp_path):
    from nbhelpers import models
    from nbhelpers.data import load_examples

    cfg = smoke(max_problems=3, sample_max_new_tokens=16)
    processor = models.build_offline_processor(cfg.eval_max_pixels)
    gold = [e["answer"] for e in load_examples("synthetic", split="test", subset_size=3, seed=cfg.seed)]

    class ScriptedModel(torch.nn.Module):
        """Answers the first problem correctly and the others wrongly, through the real decode path."""

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.calls = 0

        def generate(self, input_ids, **kwargs):
            text = f"<answer>{gold[0]}</answer>" if self.calls == 0 else "<answer>no idea</answer>"
            self.calls += 1
            ids = torch.tensor([processor.tokenizer.encode(text)])
            return torch.cat([input_ids, ids], dim=1)

    out = tmp_path / "acc.json"
    result = sampling.evaluate_accuracy(cfg, ["synthetic"], out, model=ScriptedModel(), processor=processor)
    saved = json.loads(out.read_text())
    assert saved == result
    assert saved["datasets"]["synthetic"]["all"] == {"n": 3, "accuracy": 1 / 3}


def test_samples_use_exact_match_where_the_example_asks(tmp_path, monkeypatch):
    """ChartQA-Pro's Year flag: "2020" against gold "2019" is relaxed-correct, but not when exact match is asked."""
    from nbhelpers import models
    from nbhelpers.data import load_examples

    cfg = smoke(n_samples=2)
    processor = models.build_offline_processor(cfg.eval_max_pixels)
    answer_ids = processor.tokenizer.encode("<answer>2020</answer>")
    monkeypatch.setattr(sampling, "generate_in_chunks", lambda model, inputs, n, *a, **k: [answer_ids] * n)
    examples = [{**example, "answer": "2019", "exact_match": exact} for example, exact in
                zip(load_examples("synthetic", split="test", subset_size=2, seed=cfg.seed), (True, False))]
    out = sampling.sample_to_file(cfg, tmp_path / "samples.jsonl", examples=examples,
                                  model=torch.nn.Linear(1, 1), processor=processor)
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    exact_id, relaxed_id = str(examples[0]["id"]), str(examples[1]["id"])
    assert {key: r["correct"] for key, r in records.items()} == {exact_id: [False, False], relaxed_id: [True, True]}
    # what the chance floor needs, so that it never re-parses: each answer and how correctness was decided
    assert all(r["answers"] == ["2020", "2020"] for r in records.values())
    assert [(records[key]["meta"]["exact_match"], records[key]["meta"]["reward_threshold"])
            for key in (exact_id, relaxed_id)] == [(True, cfg.reward_threshold), (False, cfg.reward_threshold)]
    problems = {p.id: p for p in read_samples(out)}
    assert (problems[exact_id].exact_match, problems[relaxed_id].exact_match) == (True, False)


def test_records_and_generation_get_the_sampling_settings(tmp_path, monkeypatch):
    """The sampling keys reach the generation call and each record's meta under the provenance's names."""
    from nbhelpers import models
    from nbhelpers.data import load_examples

    cfg = smoke(n_samples=2, sample_temperature=0.8, sample_top_p=0.9, sample_max_new_tokens=7, seed=5)
    processor = models.build_offline_processor(cfg.eval_max_pixels)
    calls = []
    monkeypatch.setattr(sampling, "generate_in_chunks",
                        lambda model, inputs, n, *a, **k: calls.append(k) or [[processor.tokenizer.eos_token_id]] * n)
    examples = load_examples("synthetic", split="test", subset_size=1, seed=cfg.seed)
    out = sampling.sample_to_file(cfg, tmp_path / "samples.jsonl", examples=examples, method="m",
                                  model=torch.nn.Linear(1, 1), processor=processor)
    assert {k: calls[0][k] for k in ("max_new_tokens", "temperature", "top_p")} == \
        {"max_new_tokens": 7, "temperature": 0.8, "top_p": 0.9}
    meta = json.loads(out.read_text())["meta"]
    expected = {"method": "m", "model": cfg.vlm_name, "checkpoint": None, "n": 2, "temperature": 0.8, "top_p": 0.9,
                "max_new_tokens": 7, "seed": 5}
    assert {k: meta[k] for k in expected} == expected


# ------------------------------------------------------------------------------------------ provenance
PROVENANCE_CHANGES = [  # configuration override or checkpoint, the provenance field it changes
    ({"vlm_name": "qwen2-5-3b"}, "model"), ({"seed": 7}, "seed"), ({"n_samples": 16}, "n"),
    ({"sample_temperature": 1.0}, "temperature"), ({"sample_top_p": 0.5}, "top_p"),
    ({"sample_max_new_tokens": 12}, "max_new_tokens"), ({"eval_dataset": "chartqa"}, "dataset"),
    ({"eval_split": "train"}, "split"), ({"eval_max_pixels": 6272}, "max_pixels"),
    ({"reward_threshold": 0.9}, "reward_threshold"), ({"checkpoint": "runs/other/final"}, "checkpoint"),
]


def test_every_provenance_field_is_covered_by_a_case():
    from nbhelpers.provenance import SAMPLES_PROVENANCE_FIELDS

    assert sorted(field for _, field in PROVENANCE_CHANGES) == sorted(SAMPLES_PROVENANCE_FIELDS)


@pytest.mark.parametrize("change,field", PROVENANCE_CHANGES)
def test_provenance_differences_name_the_changed_field(change, field):
    from nbhelpers.provenance import differing_fields, samples_provenance, SAMPLES_PROVENANCE_FIELDS

    change = dict(change)
    checkpoint = change.pop("checkpoint", None)
    recorded = samples_provenance(smoke(), None)
    requested = samples_provenance(smoke(**change), checkpoint)
    assert list(differing_fields(recorded, requested, SAMPLES_PROVENANCE_FIELDS)) == [field]
    assert differing_fields(recorded, samples_provenance(smoke(max_problems=2, sample_chunk_size=2), None),
                            SAMPLES_PROVENANCE_FIELDS) == {}  # neither says where the samples come from


def test_relative_and_absolute_checkpoint_paths_are_the_same_provenance(tmp_path, monkeypatch):
    from nbhelpers.provenance import samples_provenance

    monkeypatch.chdir(tmp_path)
    assert samples_provenance(smoke(), "runs/x/final") == samples_provenance(smoke(), str(tmp_path / "runs/x/final"))


def file_bytes(*paths):
    return [p.read_bytes() if p.exists() else None for p in paths]


def sample_args(out):
    return ["sample", "--params", "smoke", "--params", str(TINY), "--params", "local-cpu", "--out", str(out),
            "--set", "max_problems=1", "--set", "n_samples=2"]


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    """A samples file (one problem, two samples, from tiny-random) and its provenance record."""
    from nbhelpers import cli
    from nbhelpers.provenance import samples_record_path

    out = tmp_path_factory.mktemp("sampled") / "s.jsonl"
    assert cli.main(sample_args(out)) == 0
    return out, samples_record_path(out)


def copy_sampled(sampled, folder):
    import shutil

    for path in sampled:
        shutil.copy2(path, folder / path.name)
    return folder / sampled[0].name, folder / sampled[1].name


def test_the_same_request_resumes_and_changes_nothing(sampled, tmp_path):
    from nbhelpers import cli

    out, record = copy_sampled(sampled, tmp_path)
    before = file_bytes(out, record)
    assert cli.main(sample_args(out) + ["--set", "sample_chunk_size=1"]) == 0  # chunking is not provenance
    assert file_bytes(out, record) == before  # the record still describes how the file was made


@pytest.mark.parametrize("change,field", PROVENANCE_CHANGES)
def test_sample_cli_refuses_another_provenance_and_changes_nothing(sampled, tmp_path, capsys, change, field):
    """One line naming the field, exit code 2, the file and its record byte for byte as before."""
    import re

    from nbhelpers import cli

    out, record = copy_sampled(sampled, tmp_path)
    before = file_bytes(out, record)
    change = dict(change)
    extra = []
    if "checkpoint" in change:  # an existing model folder, so only its provenance can refuse it
        checkpoint = tmp_path / change.pop("checkpoint")
        checkpoint.mkdir(parents=True)
        (checkpoint / "config.json").write_text("{}")
        extra = ["--checkpoint", str(checkpoint)]
    sets = [arg for key, value in change.items() for arg in ("--set", f"{key}={value}")]
    capsys.readouterr()
    assert cli.main(sample_args(out) + sets + extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(rf"[(,] ?{field} ", err) and str(out) in err
    assert "another samples file" in err and "Traceback" not in err
    assert file_bytes(out, record) == before


def test_samples_without_a_provenance_record_are_not_resumed(tmp_path):
    from nbhelpers.provenance import ProvenanceError, check_samples_file, samples_provenance

    out = tmp_path / "s.jsonl"
    assert check_samples_file(out, samples_provenance(smoke(), None)) is False  # nothing to resume
    out.write_text(json.dumps(record(1)) + "\n")
    with pytest.raises(ProvenanceError, match="no provenance record s.config.yaml"):
        check_samples_file(out, samples_provenance(smoke(), None))
