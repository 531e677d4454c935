"""The install sets: a lean runtime for Colab/Kaggle, development and test tools kept apart, and the
README's two fresh-machine commands."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nbhelpers.config import REPO_ROOT

DEV_TOOLS = {"jupyterlab", "pytest", "selenium", "hypothesis"}
# Libraries Colab and Kaggle preinstall: a pin would replace the runtime's own build.
PREINSTALLED = {"torch", "numpy", "pandas", "matplotlib", "pillow", "ipykernel", "tqdm", "pyyaml"}


def requirements(name: str) -> dict[str, str]:
    """{distribution: version specifier} of a requirements file, following ``-r`` includes."""
    found: dict[str, str] = {}
    for line in (REPO_ROOT / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r "):
            found.update(requirements(line[3:].strip()))
        elif line:
            package, specifier = re.match(r"([A-Za-z0-9_.\-]+)(.*)", line).groups()
            found[package.lower()] = specifier
    return found


@pytest.mark.parametrize("name", ["requirements.txt", "requirements-gpu.txt"])
def test_runtime_sets_pull_no_development_or_test_tools(name):
    assert not DEV_TOOLS & set(requirements(name))


def test_dev_set_is_the_runtime_set_plus_the_tools():
    dev, runtime = requirements("requirements-dev.txt"), requirements("requirements.txt")
    assert set(dev) == set(runtime) | DEV_TOOLS


def test_preinstalled_libraries_are_ranges_not_pins():
    runtime = requirements("requirements.txt")
    pinned = sorted(p for p in PREINSTALLED if runtime[p].startswith("=="))
    assert not pinned and PREINSTALLED <= set(runtime)


def test_every_module_the_notebooks_import_is_in_the_runtime_set():
    from nbhelpers.install import REQUIRED_MODULES

    assert set(REQUIRED_MODULES.values()) - set(requirements("requirements.txt")) == set()


def test_readme_has_the_two_fresh_machine_commands():
    readme = Path(REPO_ROOT / "README.md").read_text()
    commands = re.findall(r"^pip install .*$", readme, flags=re.M)
    assert len(commands) == 2
    main_job, tests = commands
    assert "-r requirements.txt" in main_job and "python -m nbhelpers batch" in main_job
    assert re.match(r"^pip install .*python -m pytest", tests) and "-r requirements-dev.txt" in tests
