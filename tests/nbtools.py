"""Helpers of the notebook tests: reading the notebooks, running them with papermill, and small
samples files with a known share of correct answers."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Mapping

import nbformat

from nbhelpers.batch import KERNEL_NAME, NOTEBOOKS_DIR
from nbhelpers.config import REPO_ROOT

NOTEBOOK_NAMES = ("00_setup", "10_train", "20_generate", "30_passk")
CELL_TIMEOUT_S = 300


def read_notebook(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOKS_DIR / f"{name}.ipynb", as_version=4)


def parameters_cell(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    tagged = [c for c in notebook.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {len(tagged)}"
    return tagged[0]


def parameter_names(notebook: nbformat.NotebookNode) -> list[str]:
    """Names assigned in the parameters cell, in order."""
    from papermill.translators import PythonTranslator

    return [p.name for p in PythonTranslator.inspect(parameters_cell(notebook))]


def execute(name: str, output: Path, parameters: Mapping[str, Any]) -> nbformat.NotebookNode:
    """Run a notebook with papermill as the batch does (kernel python3, repository root as working
    folder); returns the executed notebook; raises papermill's exception when a cell fails."""
    import papermill

    return papermill.execute_notebook(str(NOTEBOOKS_DIR / f"{name}.ipynb"), str(output), parameters=dict(parameters),
                                      kernel_name=KERNEL_NAME, cwd=str(REPO_ROOT), progress_bar=False,
                                      execution_timeout=CELL_TIMEOUT_S)


def executed_code_cells(notebook: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [c for c in notebook.cells if c.cell_type == "code" and c.get("execution_count")]


def output_text(notebook: nbformat.NotebookNode) -> str:
    """All stream text and text/plain results of a notebook, joined."""
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", "") or output.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def image_outputs(notebook: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for c in notebook.cells for o in c.get("outputs", []))


def write_samples(path: Path, method: str, share_correct: float, problems: int = 6, n: int = 8,
                  seed: int = 0) -> Path:
    """A samples file (the format of nbhelpers.passk) whose samples are correct with probability ``share_correct``."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(problems):
            correct = [rng.random() < share_correct for _ in range(n)]
            handle.write(json.dumps({"id": str(i), "dataset": "synthetic", "question": f"q{i}", "answer": "1",
                                     "completions": ["<answer>1</answer>" if c else "<answer>0</answer>"
                                                     for c in correct],
                                     "correct": correct, "meta": {"method": method}}) + "\n")
    return path
