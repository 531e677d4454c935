"""Test-session setup shared by every test file."""

import os

# Hypothesis loads third-party plugins through entry points; trio's (pulled in by selenium) fails when it is
# imported late. Our property tests need no plugin.
os.environ.setdefault("HYPOTHESIS_NO_PLUGINS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network in tests: hub look-ups fail fast instead of timing out
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
