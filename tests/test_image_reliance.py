"""tools/image_reliance.py: completion segments, and the shipped model's reliance on its images."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))

import image_reliance  # noqa: E402


@pytest.mark.parametrize("before, piece, segment", [
    ("<think>\n<type>", "bar", "type"),
    ("<think>\n<type>bar</type>\n<table>{\"columns\": [\"", "Year", "table words"),
    ("<think>\n<type>bar</type>\n<table>{\"rows\": [[\"", "7", "table digits"),
    ("<think>\n<type>bar</type>\n<table>{", "\":", "table other"),
    ("<type>bar</type><table>{}</table>\n<step-1>: read ", "4", "step digits"),
    ("<type>bar</type><table>{}</table>\n<step-1>: read ", " the", "step other"),
    ("<table>{}</table>\n<step-1>: x\n</think>\n<answer>", "4", "answer"),
    ("<think>\n", "<", "other"),
])
def test_segment_of(before, piece, segment):
    assert image_reliance.segment_of(before, piece) == segment


def test_shipped_model_reads_the_chart_type_from_its_image(capsys):
    image_reliance.main([str(Path(__file__).resolve().parents[1] / "nbhelpers" / "assets" / "tiny-pretrained"),
                         "--problems", "4"])
    lines = {line.split()[0]: line.split()[-2:] for line in capsys.readouterr().out.splitlines()[1:]}
    true, swapped = (float(v) for v in lines["type"])
    assert swapped > true + 0.5
