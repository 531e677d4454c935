"""The study's settings (study.yaml), its parts, and where each part's files live.

Shared by the runner (study.py) and the report (report.py). A part is either ``base`` (samples of the base
model) or ``<mode>-s<seed>`` (train that mode with that seed, then sample the trained model). A part is done
when its marker ``runs/<part>/part.json`` exists with the current settings (the same fingerprint, or no changed
key, a RunConfig key newer than the marker counting at its default) and its samples file
``samples/<part>.compact.jsonl.xz`` exists; the marker is written last, so a part killed at any moment is not done.
The samples files are compact (``nbhelpers.passk.write_compact_samples``): every problem's correct bits and
extracted answers, the completion texts of COMPLETIONS_KEPT problems.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nbhelpers.config import FIELDS, MODES, ConfigError, RunConfig, load_config, read_yaml_file, \
    resolve_parameter_file

SANDBOX = Path(__file__).resolve().parent
DEFAULT_SETTINGS = SANDBOX / "study.yaml"
BASE_PART = "base"
MARKER = "part.json"
COMPLETIONS_KEPT = 8  # problems whose completion texts a published samples file keeps (all keep their answers)
TOP_LEVEL_KEYS = ("model", "modes", "seeds", "eval_seed", "common", "train", "sample", "report")
RUNCONFIG_SECTIONS = ("common", "train", "sample")
RUNNER_KEYS = ("mode", "seed", "vlm_name", "run_name", "output_root", "persistent_root")
REPORT_DEFAULTS = {"bootstrap": 1000, "bootstrap_seed": 0, "near_pp": 1.0}


class SettingsError(ValueError):
    """A bad study setting; the message names the file and key."""


@dataclass(frozen=True)
class Part:
    """One unit of work: sample the base model (mode None) or train ``mode`` with ``seed`` and sample it."""

    name: str
    mode: str | None = None
    seed: int | None = None

    @property
    def trains(self) -> bool:
        return self.mode is not None


@dataclass
class StudySettings:
    """study.yaml, checked. ``root`` holds samples/, runs/, results/, figures/ and the scratch folder work/."""

    path: Path
    model: str
    modes: list[str]
    seeds: list[int]
    eval_seed: int
    common: dict[str, Any]
    train: dict[str, Any]
    sample: dict[str, Any]
    report: dict[str, Any]
    root: Path = field(default=SANDBOX)

    # --- parts ---------------------------------------------------------------------------------------
    def parts(self) -> list[Part]:
        """base first, then the trained parts seed by seed (a partial study stays balanced across modes)."""
        return [Part(BASE_PART)] + [Part(f"{mode}-s{seed}", mode, seed) for seed in self.seeds for mode in self.modes]

    def part(self, name: str) -> Part:
        for part in self.parts():
            if part.name == name:
                return part
        raise SettingsError(f"{self.path}: no part named {name!r} (parts: {', '.join(p.name for p in self.parts())})")

    # --- paths ---------------------------------------------------------------------------------------
    def samples_path(self, part: Part) -> Path:
        """The part's compact samples file (xz)."""
        return self.root / "samples" / f"{part.name}.compact.jsonl.xz"

    def run_path(self, part: Part) -> Path:
        """Committed logs and the marker of a part (no checkpoints)."""
        return self.root / "runs" / part.name

    def work_path(self, part: Part) -> Path:
        """Scratch folder of a part in progress: training run folder, checkpoints, uncompressed samples, log."""
        return self.root / "work" / part.name

    # --- run configurations --------------------------------------------------------------------------
    def train_config(self, part: Part) -> RunConfig:
        """The RunConfig that trains ``part``: the mode file, then common and train, then the runner's keys."""
        overrides = {**self.common, **self.train, "vlm_name": self.model, "seed": part.seed, "run_name": part.name,
                     "output_root": str(self.work_path(part) / "run"), "persistent_root": "none"}
        return _load(self, [resolve_parameter_file(part.mode, "modes")], overrides, "common/train")

    def sample_config(self, part: Part) -> RunConfig:
        """The RunConfig that samples ``part``: the test problems of ``eval_seed``, the same for every part."""
        mode = part.mode or "grpo"  # the base model has no mode; the label in the samples is the part's name
        overrides = {**self.common, **self.sample, "vlm_name": self.model, "seed": self.eval_seed, "mode": mode,
                     "persistent_root": "none"}
        return _load(self, [], overrides, "common/sample")

    def fingerprint(self, part: Part) -> str:
        """sha256 of everything that decides the part's outputs (its resolved configurations)."""
        return hashlib.sha256(json.dumps(self.part_settings(part), sort_keys=True).encode()).hexdigest()

    def part_settings(self, part: Part) -> dict[str, Any]:
        settings = {"model": self.model, "sample": _decisive(self.sample_config(part).to_dict())}
        if part.trains:
            settings["train"] = _decisive(self.train_config(part).to_dict())
        return settings


# Keys that decide where files go or how a run checkpoints, not what it computes: outside the fingerprint.
NOT_DECISIVE = ("output_root", "persistent_root", "run_name", "resume", "save_steps", "save_total_limit", "report_to")


def _decisive(config: dict[str, Any]) -> dict[str, Any]:
    """A configuration without the NOT_DECISIVE keys (so a moved study folder, say, still matches)."""
    return {k: v for k, v in config.items() if k not in NOT_DECISIVE}


def _load(settings: StudySettings, files: list[Path], overrides: dict[str, Any], sections: str) -> RunConfig:
    try:
        return load_config(files, overrides, override_source=f"{settings.path} ({sections})")
    except ConfigError as error:
        raise SettingsError(str(error)) from error


def _require(condition: bool, path: Path, key: str, message: str) -> None:
    if not condition:
        raise SettingsError(f"{path}: key '{key}' {message}")


def load_settings(path: str | Path = DEFAULT_SETTINGS, root: str | Path | None = None) -> StudySettings:
    """Read and check study.yaml: every key known, every part's RunConfig valid (errors name file and key)."""
    path = Path(path)
    try:
        data = read_yaml_file(path)
    except ConfigError as error:
        raise SettingsError(str(error)) from error
    unknown = sorted(set(data) - set(TOP_LEVEL_KEYS))
    _require(not unknown, path, unknown[0] if unknown else "", f"is unknown (known: {', '.join(TOP_LEVEL_KEYS)})")
    for key in ("model", "modes", "seeds", "eval_seed", "sample"):
        _require(key in data, path, key, "is missing")
    _require(isinstance(data["model"], str) and bool(data["model"]), path, "model", "must be a model name or folder")
    modes = data["modes"]
    _require(isinstance(modes, list) and bool(modes) and all(m in MODES for m in modes)
             and len(set(modes)) == len(modes), path, "modes",
             f"must be a non-empty list of distinct modes from {', '.join(MODES)}, got {modes!r}")
    seeds = data["seeds"]
    _require(isinstance(seeds, list) and bool(seeds) and all(isinstance(s, int) and not isinstance(s, bool)
                                                             for s in seeds) and len(set(seeds)) == len(seeds),
             path, "seeds", f"must be a non-empty list of distinct integers, got {seeds!r}")
    eval_seed = data["eval_seed"]
    _require(isinstance(eval_seed, int) and not isinstance(eval_seed, bool), path, "eval_seed",
             f"must be an integer, got {eval_seed!r}")
    _require(eval_seed not in seeds, path, "eval_seed", f"= {eval_seed} is also a training seed")
    sections = {}
    for section in RUNCONFIG_SECTIONS:
        values = data.get(section) or {}
        _require(isinstance(values, dict), path, section, "must be a mapping of RunConfig keys")
        for key in values:
            _require(key in FIELDS, path, f"{section}.{key}", "is not a RunConfig key (see nbhelpers/config.py)")
            _require(key not in RUNNER_KEYS, path, f"{section}.{key}",
                     "is set by the runner (use model, modes, seeds or eval_seed)")
        sections[section] = dict(values)
    report = data.get("report") or {}
    _require(isinstance(report, dict) and set(report) <= set(REPORT_DEFAULTS), path, "report",
             f"may hold only {', '.join(REPORT_DEFAULTS)}")
    settings = StudySettings(path, data["model"], list(modes), list(seeds), eval_seed, sections["common"],
                             sections["train"], sections["sample"], {**REPORT_DEFAULTS, **report},
                             Path(root) if root is not None else path.resolve().parent)
    sample = settings.sample_config(Part(BASE_PART))
    if sample.eval_dataset == "synthetic":
        _require(sample.eval_split == "test", path, "sample.eval_split",
                 f"must be test for synthetic test problems (training uses the train split), got {sample.eval_split!r}")
    _require(sample.max_problems is not None, path, "sample.max_problems", "must be set (the number of test problems)")
    for part in settings.parts()[1:]:
        train = settings.train_config(part)  # every training configuration is valid before any work starts
        _require(train.subset_size is not None, path, "train.subset_size",
                 "must be set (the training problems per seed, the same for every mode)")
    return settings


# --- the state of a part on disk ------------------------------------------------------------------------
def read_marker(settings: StudySettings, part: Part) -> dict[str, Any] | None:
    """The part's marker, or None if it has none (or an unreadable one, as a kill can never leave)."""
    path = settings.run_path(part) / MARKER
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def part_status(settings: StudySettings, part: Part) -> str:
    """done (marker and samples file, made with today's settings: the same fingerprint, or no changed key),
    changed (a marker whose settings differ) or todo (anything else, a half-written part included)."""
    marker = read_marker(settings, part)
    if marker is None or not settings.samples_path(part).is_file():
        return "todo"
    same = marker.get("fingerprint") == settings.fingerprint(part) or not changed_keys(settings, part)
    return "done" if same else "changed"


def changed_keys(settings: StudySettings, part: Part) -> list[str]:
    """The settings (section.key) whose values differ between a part's marker and study.yaml. A RunConfig key
    the marker lacks (added to chartrl after the part was made, e.g. passk_k) counts as recorded at its
    default, so a new key at its default leaves done parts done."""
    recorded = (read_marker(settings, part) or {}).get("settings", {})
    current = settings.part_settings(part)
    default = RunConfig().to_dict()
    keys = []
    for section in sorted(set(recorded) | set(current)):
        old, new = recorded.get(section), current.get(section)
        if isinstance(old, dict) and isinstance(new, dict):
            old = {**{k: default[k] for k in new if k in default and k not in old}, **old}
            keys += [f"{section}.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                     if old.get(k) != new.get(k)]
        elif old != new:
            keys.append(f"{section}: {old!r} -> {new!r}")
    return keys
