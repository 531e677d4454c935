"""Run identity: which keys make a different experiment, folder names that keep experiments apart, the refusal
of a run folder (or persistent-store folder) trained with other settings, and the model card. Fast: the
refusals happen before any model is built; the real training runs are in test_training_runs.py."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from nbhelpers import cli
from nbhelpers.config import FIELDS, NOT_TRAINING_KEYS, TRAINING_KEYS, load_config, resolve_parameter_file, \
    save_resolved_config, training_fingerprint
from nbhelpers.model_card import model_card
from nbhelpers.provenance import ProvenanceError, check_run_folder, run_differences
from fast_presets import TINY



def preset_config(preset, mode="nsr", platform="local-cpu", **overrides):
    files = [resolve_parameter_file(mode, "modes"), resolve_parameter_file(preset, "presets"),
             *([TINY] if preset == "smoke" else []),
             resolve_parameter_file(platform, "platforms")]
    return load_config(files, overrides)


def tree_digest(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``folder``."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def trained_folder(root: Path, cfg) -> Path:
    """A run folder as training leaves it (config.yaml, a checkpoint, final/), without training."""
    folder = root / cfg.resolved_run_name()
    save_resolved_config(cfg, folder)
    for name in ("checkpoint-2", "final"):
        (folder / name).mkdir(parents=True)
        (folder / name / "adapter_model.safetensors").write_bytes(b"weights")
    return folder


# ------------------------------------------------------------------------------------------ which keys count
def test_every_key_is_classified_and_the_excluded_ones_exist():
    assert NOT_TRAINING_KEYS <= set(FIELDS)
    assert set(TRAINING_KEYS) | NOT_TRAINING_KEYS == set(FIELDS)


CHANGES = [  # key, new value, changes the fingerprint (and so the folder name)
    ("learning_rate", 0.05, True), ("lora_r", 4, True), ("num_generations", 2, True), ("num_epochs", 4.0, True),
    ("max_steps", 3, True), ("reward_weights", {"format": 0.5}, True), ("lambda_psr", 0.3, True), ("passk_k", 3, True),
    ("max_pixels", 6272, True), ("dtype", "bf16", True), ("num_processes", 2, True), ("finetune", "full", True),
    ("logging_steps", 7, False), ("save_steps", 9, False), ("output_root", "elsewhere", False),
    ("persistent_root", "none", False), ("n_samples", 16, False), ("sample_temperature", 1.0, False),
    ("eval_dataset", "chartqa", False), ("gradient_checkpointing", True, False), ("rollout_engine", "fast", False),
    ("report_to", ["none"], False), ("resume_changed_config", True, False),
]


@pytest.mark.parametrize("key,value,changes", CHANGES)
def test_fingerprint_follows_exactly_the_training_keys(key, value, changes):
    base = preset_config("smoke")
    changed = preset_config("smoke", **{key: value})
    assert (training_fingerprint(changed) != training_fingerprint(base)) is changes
    assert (changed.resolved_run_name() != base.resolved_run_name()) is changes


def test_same_settings_give_the_same_folder_and_presets_their_own():
    assert preset_config("smoke").run_dir() == preset_config("smoke").run_dir()
    names = {preset_config(p).resolved_run_name() for p in ("moderate", "safe", "paper")}
    assert len(names) == 3
    assert preset_config("smoke").resolved_run_name().startswith("nsr_tiny-random_synthetic_n8_s42_")


def test_explicit_run_name_is_kept():
    assert preset_config("smoke", run_name="mine").resolved_run_name() == "mine"


# ------------------------------------------------------------------------------------------ the folder check
def test_differences_are_the_training_keys_only(tmp_path):
    recorded = preset_config("smoke").to_dict()
    cfg = preset_config("smoke", learning_rate=0.05, lora_r=4, logging_steps=9, n_samples=16)
    assert run_differences(recorded, cfg) == {"learning_rate": (0.001, 0.05), "lora_r": (8, 4)}


def test_a_key_missing_from_an_older_record_takes_its_default():
    recorded = preset_config("smoke").to_dict()
    del recorded["top_k"]  # as if written before top_k existed
    recorded["retired_key"] = 1  # as if a key was removed since
    assert run_differences(recorded, preset_config("smoke")) == {}
    assert run_differences(recorded, preset_config("smoke", top_k=5)) == {"top_k": (0, 5)}


def test_folder_with_other_settings_is_refused_naming_the_keys(tmp_path):
    folder = trained_folder(tmp_path, preset_config("smoke", run_name="mine"))
    before = tree_digest(folder)
    with pytest.raises(ProvenanceError) as error:
        check_run_folder(preset_config("smoke", run_name="mine", learning_rate=0.05, lora_r=4), folder)
    message = str(error.value)
    assert "learning_rate 0.001 -> 0.05" in message and "lora_r 8 -> 4" in message
    assert "run_name" in message and "resume_changed_config" in message and "\n" not in message
    assert tree_digest(folder) == before


@pytest.mark.parametrize("case,passes", [
    ("same settings", True), ("other logging", True), ("opt in", True), ("no model yet", True),
    ("model without record", False), ("other settings", False),
])
def test_folder_check_cases(tmp_path, case, passes):
    recorded = preset_config("smoke", run_name="mine")
    folder = trained_folder(tmp_path, recorded)
    request = {"same settings": {}, "other logging": {"logging_steps": 5, "save_steps": 3},
               "opt in": {"learning_rate": 0.05, "resume_changed_config": True},
               "no model yet": {"learning_rate": 0.05}, "model without record": {},
               "other settings": {"seed": 1}}[case]
    if case == "no model yet":
        for name in ("checkpoint-2", "final"):
            (folder / name / "adapter_model.safetensors").unlink()
            (folder / name).rmdir()
    if case == "model without record":
        (folder / "config.yaml").unlink()
    cfg = preset_config("smoke", run_name="mine", **request)
    if passes:
        check_run_folder(cfg, folder)
    else:
        with pytest.raises(ProvenanceError):
            check_run_folder(cfg, folder)


def test_cli_train_refuses_in_one_line_and_changes_nothing(tmp_path, capsys):
    runs, store = tmp_path / "runs", tmp_path / "store"
    cfg = preset_config("smoke", output_root=str(runs), run_name="mine")
    local = trained_folder(runs, cfg)
    before = tree_digest(local)
    code = cli.main(["train", "--params", "smoke", "--params", "nsr", "--set", f"output_root={runs}",
                     "--set", "run_name=mine", "--set", "persistent_root=none", "--set", "learning_rate=0.05"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "learning_rate 0.001 -> 0.05" in err and "Traceback" not in err
    assert tree_digest(local) == before
    # the same experiment recorded only in the persistent store (a fresh VM) is refused too, before any copy
    stored = trained_folder(store, cfg)
    stored_before = tree_digest(stored)
    code = cli.main(["train", "--params", "smoke", "--params", "nsr", "--set", f"output_root={tmp_path / 'fresh'}",
                     "--set", "run_name=mine", "--set", f"persistent_root={store}", "--set", "lora_r=4"])
    err = capsys.readouterr().err
    assert code == 2 and "persistent store folder" in err and "lora_r 8 -> 4" in err
    assert tree_digest(stored) == stored_before and not (tmp_path / "fresh").exists()


def test_failed_start_does_not_rewrite_config_yaml(tmp_path):
    """Model and data load before config.yaml is written: an unknown vlm_name leaves the record as it was."""
    from nbhelpers.training_run import train

    cfg = preset_config("smoke", output_root=str(tmp_path), run_name="mine")
    folder = trained_folder(tmp_path, cfg)
    before = tree_digest(folder)
    with pytest.raises(ValueError, match="no-such-model"):
        train(preset_config("smoke", output_root=str(tmp_path), run_name="mine", vlm_name="no-such-model",
                            resume_changed_config=True))
    assert tree_digest(folder) == before
    assert yaml.safe_load((folder / "config.yaml").read_text())["config"]["vlm_name"] == "tiny-random"


# ------------------------------------------------------------------------------------------ model card
@pytest.mark.parametrize("mode,vlm,hub_link,objective", [
    ("nsr", "tiny-random", None, "only incorrect samples"),
    ("psr", "tiny-random", None, "only correct samples"),
    ("w-reinforce", "tiny-random", None, "+lambda_psr"),
    ("passk", "tiny-random", None, "Pass@k Training with k = 2"),
    ("grpo", "qwen2-5-3b", "https://huggingface.co/Qwen/Qwen2.5-VL-3B-Instruct", "group-normalised"),
])
def test_model_card_names_the_real_mode_base_model_and_settings(mode, vlm, hub_link, objective):
    cfg = preset_config("smoke", mode=mode, vlm_name=vlm, learning_rate=0.05)
    card = model_card(cfg)
    metadata = yaml.safe_load(card.split("---")[1])
    assert f"**{mode}** objective" in card and objective in card and mode in metadata["tags"]
    assert "| `learning_rate` | `0.05` |" in card and training_fingerprint(cfg) in card
    if hub_link is None:
        assert "huggingface.co" not in card and "base_model" not in metadata and "not on the Hub" in card
        assert "GRPO" not in card
    else:
        assert hub_link in card and metadata["base_model"] == "Qwen/Qwen2.5-VL-3B-Instruct"


def test_model_card_of_a_local_model_names_the_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    card = model_card(preset_config("smoke", vlm_name=str(tmp_path)))
    assert f"local model folder `{tmp_path}`" in card and "huggingface.co" not in card


def finished_run(root: Path, cfg) -> Path:
    """A run folder whose last checkpoint is complete and final (as a kill before the final save leaves it)."""
    import json

    from nbhelpers.sync import write_manifest

    folder = root / cfg.resolved_run_name()
    save_resolved_config(cfg, folder)
    checkpoint = folder / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "adapter_model.safetensors").write_bytes(b"weights")
    (checkpoint / "trainer_state.json").write_text(json.dumps(
        {"global_step": 2, "max_steps": 2, "log_history": [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}]}))
    write_manifest(checkpoint)
    return folder


def test_finished_run_reports_done_and_fills_the_store_with_the_recorded_card(tmp_path):
    """The finish path (no training): final/ from the last checkpoint, its card from config.yaml even under
    resume_changed_config, and the store gets the checkpoint and final/."""
    from nbhelpers.sync import is_complete_checkpoint
    from nbhelpers.training_run import train

    runs, store = tmp_path / "runs", tmp_path / "store"
    folder = finished_run(runs, preset_config("smoke", output_root=str(runs), run_name="done"))
    record = (folder / "config.yaml").read_bytes()
    assert train(preset_config("smoke", output_root=str(runs), run_name="done", persistent_root=str(store),
                               learning_rate=0.05, resume_changed_config=True)) == folder
    card = (folder / "final" / "README.md").read_text()
    assert "| `learning_rate` | `0.001` |" in card and "| `learning_rate` | `0.05` |" not in card
    assert (folder / "config.yaml").read_bytes() == record
    assert is_complete_checkpoint(store / "done" / "checkpoint-2", True)
    assert is_complete_checkpoint(store / "done" / "final", True)


def test_multi_process_launch_is_refused_before_writing_its_files(tmp_path):
    """Kaggle's two processes go through accelerate launch: the refusal comes before launch-params.yaml."""
    from nbhelpers import launch

    folder = trained_folder(tmp_path, preset_config("smoke", output_root=str(tmp_path), run_name="mine"))
    before = tree_digest(folder)
    launched = []
    with pytest.raises(ProvenanceError, match="seed 42 -> 1"):
        launch.launch_training(preset_config("smoke", output_root=str(tmp_path), run_name="mine", seed=1,
                                             num_processes=2), run=lambda *a, **k: launched.append(a) or 0)
    assert launched == [] and tree_digest(folder) == before
