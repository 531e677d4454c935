"""The overlay that tests needing speed, not a model that answers, layer after the smoke preset."""

from pathlib import Path

TINY = Path(__file__).parent / "tiny-random.yaml"  # tiny-random, short completions, small images
