"""What a run folder or a samples file was made from, and whether a new request may reuse it.

* A run folder's ``config.yaml`` records the configuration of the model it holds. A request whose
  training-relevant keys (:data:`nbhelpers.config.TRAINING_KEYS`) differ is refused with one line naming
  the keys, unless it sets ``resume_changed_config``; :func:`check_run_identity` checks the run folder and
  its persistent-store folder. A folder that holds no model yet (no checkpoint,
  no ``final/``) is free: a failed first attempt never blocks a corrected one.
* A samples file's ``<stem>.config.yaml`` records its provenance (:data:`SAMPLES_PROVENANCE_FIELDS`);
  an existing file is resumed only when the request has the same provenance.

The comparisons are pure functions of two mappings; the checks read the records and raise
:class:`ProvenanceError` (a ConfigError, so the CLI prints one line and exits 2) before any work.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from .config import TRAINING_KEYS, ConfigError, RunConfig, _coerce, read_yaml_file
from .platform import persistent_store

RUN_CONFIG_NAME = "config.yaml"
# Each field of a samples file's provenance and the RunConfig key it records: the model (registry name or
# folder) and the checkpoint sampled (None here: an absolute path, None for the base model), the sampling seed
# and settings, the problems' dataset and split, the image pixel budget, and the correctness threshold the
# ``correct`` lists were judged with. Sampling reads its settings under these names too.
SAMPLES_PROVENANCE_KEYS = {"model": "vlm_name", "checkpoint": None, "seed": "seed", "n": "n_samples",
                           "temperature": "sample_temperature", "top_p": "sample_top_p",
                           "max_new_tokens": "sample_max_new_tokens", "dataset": "eval_dataset", "split": "eval_split",
                           "max_pixels": "eval_max_pixels", "reward_threshold": "reward_threshold"}
SAMPLES_PROVENANCE_FIELDS = tuple(SAMPLES_PROVENANCE_KEYS)
_MISSING = "(not recorded)"


class ProvenanceError(ConfigError):
    """An existing output was made from something else than the request; the message says how to proceed."""


# ------------------------------------------------------------------------------------------ comparisons
def differing_fields(recorded: Mapping[str, Any], requested: Mapping[str, Any],
                     fields: tuple[str, ...]) -> dict[str, tuple[Any, Any]]:
    """{field: (recorded value, requested value)} for each of ``fields`` whose values differ; a field
    missing from ``recorded`` counts as different (shown as '(not recorded)')."""
    return {name: (recorded.get(name, _MISSING), requested.get(name))
            for name in fields if name not in recorded or recorded[name] != requested.get(name)}


def describe_differences(differences: Mapping[str, tuple[Any, Any]]) -> str:
    """``key recorded -> requested`` for each difference, comma-separated."""
    return ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in differences.items())


def recorded_training_settings(recorded_config: Mapping[str, Any]) -> dict[str, Any]:
    """The training-relevant keys of a recorded configuration, with today's types; a key the record lacks
    (written before the key existed) takes today's default, a key today's code lacks is ignored."""
    default = RunConfig()
    settings = {}
    for name in TRAINING_KEYS:
        if name not in recorded_config:
            settings[name] = getattr(default, name)
            continue
        try:
            settings[name] = _coerce(name, recorded_config[name], "recorded")
        except ConfigError:
            settings[name] = recorded_config[name]
    return settings


def run_differences(recorded_config: Mapping[str, Any], cfg: RunConfig) -> dict[str, tuple[Any, Any]]:
    """Training-relevant keys whose recorded value differs from ``cfg``'s."""
    requested = {name: getattr(cfg, name) for name in TRAINING_KEYS}
    return differing_fields(recorded_training_settings(recorded_config), requested, TRAINING_KEYS)


# ------------------------------------------------------------------------------------------ run folders
def holds_model(folder: Path) -> bool:
    """True when a run folder holds a trained model or checkpoint (complete or not)."""
    return (folder / "final").is_dir() or any(p.is_dir() for p in folder.glob("checkpoint-*"))


def check_run_folder(cfg: RunConfig, folder: str | os.PathLike, where: str = "run folder") -> None:
    """Refuse to resume or report ``folder`` when the model it holds was trained with other settings.

    Raises ProvenanceError naming the differing keys (or the missing record) and the two ways on: a new
    ``run_name``, or ``resume_changed_config: true``. A folder without a model, or ``resume_changed_config``,
    passes."""
    folder = Path(folder)
    if cfg.resume_changed_config or not folder.is_dir() or not holds_model(folder):
        return
    how = ("set another run_name for a new run, or resume_changed_config=true to continue this one with "
           "the new settings")
    record = folder / RUN_CONFIG_NAME
    if not record.is_file():
        raise ProvenanceError(f"{where} {folder} holds a model but no {RUN_CONFIG_NAME}, so its settings "
                              f"cannot be checked: {how}")
    try:
        recorded = read_yaml_file(record)
    except ConfigError as error:
        raise ProvenanceError(f"{where} {folder}: {error}; {how}") from None
    differences = run_differences(recorded.get("config", recorded), cfg)
    if differences:
        raise ProvenanceError(f"{where} {folder} holds a model trained with other settings "
                              f"({describe_differences(differences)}): {how}")


def check_run_identity(cfg: RunConfig) -> None:
    """Refuse (ProvenanceError, one line) when the run folder, or its persistent-store folder, holds a model
    trained with other training-relevant settings; nothing is read or written beyond the two config.yaml."""
    check_run_folder(cfg, cfg.run_dir())
    store = persistent_store(cfg)
    if store is not None:
        check_run_folder(cfg, store, where="persistent store folder")


# ------------------------------------------------------------------------------------------ samples files
def samples_record_path(samples_file: str | os.PathLike) -> Path:
    """``<folder>/<stem>.config.yaml``, the record beside a samples file."""
    path = Path(samples_file)
    return path.with_name(path.stem + ".config.yaml")


def samples_provenance(cfg: RunConfig, checkpoint: str | os.PathLike | None) -> dict[str, Any]:
    """The provenance of samples drawn with ``cfg`` from ``checkpoint`` (None: the base model)."""
    sampled = None if checkpoint is None else str(Path(checkpoint).resolve())
    return {name: sampled if key is None else getattr(cfg, key) for name, key in SAMPLES_PROVENANCE_KEYS.items()}


def _has_records(samples_file: Path) -> bool:
    if not samples_file.is_file():
        return False
    with open(samples_file, "rb") as handle:
        return any(line.strip() for line in handle)


def check_samples_file(samples_file: str | os.PathLike, requested: Mapping[str, Any]) -> bool:
    """Whether an existing samples file may be resumed by a request of provenance ``requested``.

    False when there is nothing to resume (no file, or no record in it): the caller writes a new record.
    True when the recorded provenance matches. Raises ProvenanceError naming the differing fields, or the
    missing record, and how to proceed; nothing is written either way."""
    samples_file = Path(samples_file)
    if not _has_records(samples_file):
        return False
    record = samples_record_path(samples_file)
    how = "choose another samples file (--out / samples_path), or move the existing one away"
    if not record.is_file():
        raise ProvenanceError(f"{samples_file} has samples but no provenance record {record.name}, so it "
                              f"cannot be resumed safely: {how}")
    try:
        recorded = read_yaml_file(record).get("provenance")
    except ConfigError as error:
        raise ProvenanceError(f"{error}; {how}") from None
    if not isinstance(recorded, dict):
        raise ProvenanceError(f"{record}: no 'provenance' section (written by an older chartrl): {how}")
    differences = differing_fields(recorded, requested, SAMPLES_PROVENANCE_FIELDS)
    if differences:
        raise ProvenanceError(f"{samples_file} holds samples of another provenance "
                              f"({describe_differences(differences)}): {how}, or sample with the recorded settings")
    return True


__all__ = ["ProvenanceError", "SAMPLES_PROVENANCE_FIELDS", "SAMPLES_PROVENANCE_KEYS", "check_run_folder",
           "check_run_identity", "check_samples_file", "describe_differences", "differing_fields", "holds_model",
           "run_differences", "samples_provenance", "samples_record_path"]
