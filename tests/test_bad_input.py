"""Every bad input of the command line: one line on stderr naming the key, flag, file or line, exit code
2, no traceback, no file changed, and neither torch, transformers nor TRL imported (so it comes at once)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nbhelpers.config import load_config, resolve_parameter_file

HEAVY_MODULES = ("torch", "transformers", "trl")
# Runs the command line and then reports on stdout which heavy modules it imported.
RUNNER = ("import sys\nfrom nbhelpers.cli import main\ntry:\n    code = main(sys.argv[1:])\nfinally:\n"
          f"    print('imported:', [m for m in {HEAVY_MODULES!r} if m in sys.modules])\nsys.exit(code)\n")
RECORD = {"id": "1", "dataset": "synthetic", "question": "q", "answer": "a", "completions": ["x"],
          "correct": [True], "meta": {}}


def write_inputs(folder: Path) -> None:
    """The files the cases point at: bad parameters and samples files, a folder, and an earlier run in the
    folder `train --params smoke` writes to."""
    (folder / "latin1.yaml").write_bytes(b"seed: 1\nmode: \"gr\xe9po\"\n")
    (folder / "bad.jsonl").write_text(json.dumps(RECORD) + "\n{not json\n" + json.dumps(RECORD) + "\n")
    (folder / "latin1.jsonl").write_bytes(json.dumps(RECORD).encode() + b"\n{\"id\": \"\xff\"}\n")
    (folder / "a-folder").mkdir()
    (folder / "not-a-model").mkdir()
    run = folder / "runs" / load_config([resolve_parameter_file("smoke", "presets")]).resolved_run_name()
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("config: {mode: grpo}\n")


TRAIN = ["train", "--params", "smoke", "--set", "output_root=runs"]
CASES = {  # name: (arguments, words the one line must contain)
    "parameters file not UTF-8": (["train", "--params", "latin1.yaml"], ["latin1.yaml", "line 2", "UTF-8"]),
    "train: unknown vlm_name": (TRAIN + ["--set", "vlm_name=no-such-model"], ["--set", "'vlm_name'", "no-such-model"]),
    "train: unknown dataset_name": (TRAIN + ["--dataset-name", "nope"], ["command-line flag", "'dataset_name'", "nope"]),
    "train: unknown preset": (["train", "--preset", "nonexistent"], ["--preset", "nonexistent", "smoke"]),
    "train: unknown platform": (["train", "--preset", "smoke", "--platform", "tpu"], ["--platform", "tpu", "local-cpu"]),
    "train: --set num_generations=3": (TRAIN + ["--set", "num_generations=3"], ["--set", "'num_generations'"]),
    "sample: unknown eval_dataset": (["sample", "--params", "smoke", "--eval-dataset", "nope", "--out", "s.jsonl"],
                                     ["'eval_dataset'", "nope"]),
    "sample: unknown eval_split": (["sample", "--params", "smoke", "--set", "eval_split=val", "--out", "s.jsonl"],
                                   ["'eval_split'", "val", "train, test"]),
    "sample: unknown vlm_name": (["sample", "--params", "smoke", "--vlm-name", "nope", "--out", "s.jsonl"],
                                 ["'vlm_name'", "nope"]),
    "sample: missing checkpoint": (["sample", "--params", "smoke", "--checkpoint", "gone", "--out", "s.jsonl"],
                                   ["--checkpoint", "gone"]),
    "sample: checkpoint is no model": (["sample", "--params", "smoke", "--checkpoint", "not-a-model", "--out",
                                        "s.jsonl"], ["--checkpoint", "config.json"]),
    "sample: non-JSON line in the samples file": (["sample", "--params", "smoke", "--out", "bad.jsonl"],
                                                  ["bad.jsonl:2", "not valid JSON"]),
    "eval: unknown dataset": (["eval", "--params", "smoke", "--datasets", "synthetic", "nope", "--out", "e.json"],
                              ["--datasets", "nope"]),
    "passk of a folder": (["passk", "--samples", "a-folder", "--out", "r.json"], ["a-folder", "folder"]),
    "passk of a non-UTF-8 file": (["passk", "--samples", "latin1.jsonl", "--out", "r.json"],
                                  ["latin1.jsonl:2", "UTF-8"]),
    "batch: unknown preset": (["batch", "--preset", "nonexistent", "--out", "batch"], ["--preset", "nonexistent"]),
}


def snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_before_any_slow_work(tmp_path, name):
    arguments, words = CASES[name]
    write_inputs(tmp_path)
    before = snapshot(tmp_path)
    out = subprocess.run([sys.executable, "-c", RUNNER, *arguments], capture_output=True, text=True, cwd=tmp_path,
                         timeout=120)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, out.stderr
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert "imported: []" in out.stdout, out.stdout
    assert snapshot(tmp_path) == before
