"""Tests of nbhelpers.sync: manifests, resume selection, crash-safe background copies, restore, callback."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from nbhelpers import sync as sync_module
from nbhelpers.sync import (
    MANIFEST_NAME,
    CheckpointSync,
    CheckpointSyncCallback,
    checkpoint_problem,
    find_resume_checkpoint,
    is_complete_checkpoint,
    read_manifest,
    restore_newest,
    write_manifest,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
FAKE_FILES = {  # relative path -> size in bytes
    "adapter_model.safetensors": 4096,
    "optimizer.pt": 2048,
    "trainer_state.json": 300,
    "global_step7/zero_pp_rank_0_mp_rank_00_optim_states.pt": 1024,
}


def make_checkpoint(root: Path, step: int, manifest: bool = True, seed: int = 0) -> Path:
    """A fake checkpoint-<step> folder of random bytes, with its manifest unless told otherwise."""
    rng = random.Random(f"{seed}-{step}")
    folder = root / f"checkpoint-{step}"
    for relative, size in FAKE_FILES.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(size))
    if manifest:
        write_manifest(folder)
    return folder


def flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def store_steps(store: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in store.glob("checkpoint-*") if is_complete_checkpoint(p))


def partials(folder: Path) -> list[Path]:
    return sorted(folder.glob(".partial-*"))


def same_tree(a: Path, b: Path) -> bool:
    files_a = {p.relative_to(a): p.read_bytes() for p in a.rglob("*") if p.is_file()}
    files_b = {p.relative_to(b): p.read_bytes() for p in b.rglob("*") if p.is_file()}
    return files_a == files_b


# ----------------------------------------------------------------------------- manifests


def test_manifest_round_trip(tmp_path):
    checkpoint = make_checkpoint(tmp_path, 7, manifest=False)

    manifest_path = write_manifest(checkpoint)

    assert manifest_path == checkpoint / MANIFEST_NAME
    manifest = read_manifest(checkpoint)
    assert manifest["step"] == 7
    listed = {entry["path"]: (entry["size"], entry["sha256"]) for entry in manifest["files"]}
    expected = {
        relative: (size, hashlib.sha256((checkpoint / relative).read_bytes()).hexdigest())
        for relative, size in FAKE_FILES.items()
    }
    assert listed == expected
    assert is_complete_checkpoint(checkpoint) and is_complete_checkpoint(checkpoint, verify_checksums=True)
    assert sorted(p.name for p in checkpoint.iterdir() if p.is_file()) == sorted(
        [MANIFEST_NAME, "adapter_model.safetensors", "optimizer.pt", "trainer_state.json"]
    ), "no temporary manifest file may be left behind"


def test_write_manifest_rejects_a_folder_not_named_checkpoint_step(tmp_path):
    folder = tmp_path / "final-model"
    folder.mkdir()
    with pytest.raises(ValueError, match="final-model"):
        write_manifest(folder)


def _remove_manifest(c: Path) -> None:
    (c / MANIFEST_NAME).unlink()


def _remove_file(c: Path) -> None:
    (c / "optimizer.pt").unlink()


def _truncate_file(c: Path) -> None:
    path = c / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])


def _corrupt_byte(c: Path) -> None:
    flip_byte(c / "adapter_model.safetensors")


def _corrupt_nested_byte(c: Path) -> None:
    flip_byte(c / "global_step7/zero_pp_rank_0_mp_rank_00_optim_states.pt")


def _garbage_manifest(c: Path) -> None:
    (c / MANIFEST_NAME).write_bytes(b'{"format": "chartrl-checkpoint-manif\x00\xff')


def _truncated_manifest(c: Path) -> None:
    (c / MANIFEST_NAME).write_text('{"format": "chartrl-checkpoint-manifest", "files": [')


def _manifest_not_an_object(c: Path) -> None:
    (c / MANIFEST_NAME).write_text("[1, 2, 3]")


def _manifest_escaping_path(c: Path) -> None:
    manifest = read_manifest(c)
    manifest["files"][0]["path"] = "../outside.bin"
    (c / MANIFEST_NAME).write_text(json.dumps(manifest))


def _manifest_without_files(c: Path) -> None:
    manifest = read_manifest(c)
    manifest["files"] = []
    (c / MANIFEST_NAME).write_text(json.dumps(manifest))


def _manifest_of_another_step(c: Path) -> None:
    manifest = read_manifest(c)
    manifest["step"] = 8
    (c / MANIFEST_NAME).write_text(json.dumps(manifest))


def _add_unlisted_file(c: Path) -> None:
    (c / "extra.txt").write_text("not in the manifest")


def _nothing(c: Path) -> None:
    pass


@pytest.mark.parametrize(
    ("damage", "verify_checksums", "complete", "reason_contains"),
    [
        (_nothing, False, True, None),
        (_nothing, True, True, None),
        (_add_unlisted_file, True, True, None),
        (_remove_manifest, False, False, "no manifest"),
        (_remove_file, False, False, "optimizer.pt listed in the manifest is missing"),
        (_truncate_file, False, False, "adapter_model.safetensors is 1000 bytes"),
        (_corrupt_byte, False, True, None),  # same size: only a checksum check can tell
        (_corrupt_byte, True, False, "adapter_model.safetensors: sha256 does not match"),
        (_corrupt_nested_byte, True, False, "zero_pp_rank_0_mp_rank_00_optim_states.pt: sha256"),
        (_garbage_manifest, False, False, "manifest"),
        (_truncated_manifest, False, False, "line 1 column"),
        (_manifest_not_an_object, False, False, "not a chartrl checkpoint manifest"),
        (_manifest_escaping_path, False, False, "'path' must be a unique relative path"),
        (_manifest_without_files, False, False, "'files' must be a non-empty list"),
        (_manifest_of_another_step, False, False, "step 8 does not match"),
    ],
)
def test_incomplete_checkpoint_detection(tmp_path, damage, verify_checksums, complete, reason_contains):
    checkpoint = make_checkpoint(tmp_path, 7)
    damage(checkpoint)

    problem = checkpoint_problem(checkpoint, verify_checksums=verify_checksums)

    assert is_complete_checkpoint(checkpoint, verify_checksums=verify_checksums) is complete
    if reason_contains is None:
        assert problem is None
    else:
        assert reason_contains in problem


# ----------------------------------------------------------------------------- resume selection


@pytest.mark.parametrize(
    ("complete_steps", "incomplete_steps", "expected_step"),
    [
        ([9, 10], [], 10),  # numeric order: checkpoint-10 > checkpoint-9
        ([2, 9, 100], [], 100),
        ([9, 10], [11], 10),  # newest has no manifest (killed while saving)
        ([3], [20, 100], 3),
        ([], [5], None),
        ([], [], None),
    ],
)
def test_find_resume_checkpoint_picks_newest_complete(tmp_path, complete_steps, incomplete_steps, expected_step):
    for step in complete_steps:
        make_checkpoint(tmp_path, step)
    for step in incomplete_steps:
        make_checkpoint(tmp_path, step, manifest=False)
    (tmp_path / "checkpoint-latest").mkdir()  # not a checkpoint-<step> name: ignored

    found = find_resume_checkpoint(tmp_path)

    assert found == (None if expected_step is None else tmp_path / f"checkpoint-{expected_step}")


def test_find_resume_checkpoint_skips_corrupt_newest_with_warning(tmp_path, caplog):
    make_checkpoint(tmp_path, 9)
    make_checkpoint(tmp_path, 10)
    _corrupt_byte(make_checkpoint(tmp_path, 11))  # sizes right, one byte wrong
    _truncate_file(make_checkpoint(tmp_path, 12))

    with caplog.at_level(logging.WARNING, logger="nbhelpers.sync"):
        found = find_resume_checkpoint(tmp_path)

    assert found == tmp_path / "checkpoint-10"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("checkpoint-11" in w and "sha256 does not match" in w for w in warnings)
    assert any("checkpoint-12" in w and "1000 bytes" in w for w in warnings)


def test_find_resume_checkpoint_missing_folder_is_none(tmp_path):
    assert find_resume_checkpoint(tmp_path / "does-not-exist") is None


# ----------------------------------------------------------------------------- crash safety of copies

_CHILD_SCRIPT = """
import sys, time
import nbhelpers.sync as s
original = s._copy_file
def slow_copy(source, destination):
    result = original(source, destination)
    time.sleep(0.5)
    return result
s._copy_file = slow_copy
sync = s.CheckpointSync(sys.argv[2])
sync.submit(sys.argv[1])
sync.wait()
"""


def test_copy_killed_midway_is_never_complete_and_resumes(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "run", 40)
    store = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", _CHILD_SCRIPT, str(checkpoint), str(store)], env=env)
    try:
        deadline = time.monotonic() + 25
        copied = []
        while len(copied) < 2:  # kill once two of the four files are in the partial folder
            assert child.poll() is None, "the child exited before it could be killed"
            assert time.monotonic() < deadline, "the child never started copying"
            time.sleep(0.02)
            copied = [p for folder in partials(store) for p in folder.rglob("*") if p.is_file()]
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL

    assert partials(store), "the interrupted copy must stay under a .partial- name"
    assert not (store / "checkpoint-40").exists()
    assert find_resume_checkpoint(store) is None

    with CheckpointSync(store) as sync:
        sync.submit(checkpoint)
        assert sync.wait(timeout=10)
    assert sync.errors == []
    assert is_complete_checkpoint(store / "checkpoint-40", verify_checksums=True)
    assert same_tree(store / "checkpoint-40", checkpoint)
    assert partials(store) == [], "stale partial folders are removed"


def make_final(run: Path, step: int, seed: int = 0) -> Path:
    """A fake final/ model folder with its manifest (step: the run's last)."""
    folder = run / "final"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_model.safetensors").write_bytes(random.Random(f"final-{seed}").randbytes(512))
    write_manifest(folder, step=step)
    return folder


def test_catch_up_after_a_copy_killed_midway_finishes_the_store(tmp_path):
    """The child is SIGKILLed halfway through copying checkpoint-40; a new session's catch_up (what train()
    calls at its start) copies it, without being told which checkpoint, and removes the stale partial."""
    run, store = tmp_path / "run", tmp_path / "store"
    checkpoint = make_checkpoint(run, 40)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", _CHILD_SCRIPT, str(checkpoint), str(store)], env=env)
    try:
        deadline = time.monotonic() + 25
        while not [p for folder in partials(store) for p in folder.rglob("*") if p.is_file()]:
            assert child.poll() is None, "the child exited before it could be killed"
            assert time.monotonic() < deadline, "the child never started copying"
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert partials(store) and not (store / "checkpoint-40").exists()

    with CheckpointSync(store) as sync:
        assert sync.catch_up(run) == [checkpoint]
    assert sync.errors == [] and partials(store) == []
    assert is_complete_checkpoint(store / "checkpoint-40", verify_checksums=True)


CATCH_UP_CASES = [  # store state before, what catch_up copies, store checkpoints after (keep_last 2)
    ("empty", ["checkpoint-1", "checkpoint-2", "checkpoint-3", "final"], [2, 3]),
    ("has 1 and 2", ["checkpoint-3", "final"], [2, 3]),
    ("has all but final", ["final"], [2, 3]),
    ("has everything", [], [1, 2, 3]),  # nothing copied, so nothing pruned
    ("incomplete 3", ["checkpoint-3", "final"], [2, 3]),
    ("other final", ["final"], [2, 3]),
]


@pytest.mark.parametrize("case,copied,kept", CATCH_UP_CASES)
def test_catch_up_copies_every_complete_local_folder_the_store_lacks(tmp_path, case, copied, kept):
    run, store = tmp_path / "run", tmp_path / "store"
    checkpoints = [make_checkpoint(run, step) for step in (1, 2, 3)]
    make_checkpoint(run, 4, manifest=False)  # a save cut short: never copied
    final = make_final(run, 3)
    store.mkdir()
    (store / ".partial-checkpoint-3-0badcafe").mkdir()  # left by a killed copy
    if case != "empty":
        for checkpoint in checkpoints[:{"has 1 and 2": 2, "incomplete 3": 2}.get(case, 3)]:
            shutil.copytree(checkpoint, store / checkpoint.name)
    if case in ("has everything", "other final"):
        shutil.copytree(final, store / "final")
    if case == "incomplete 3":
        shutil.copytree(checkpoints[2], store / "checkpoint-3")
        (store / "checkpoint-3" / "optimizer.pt").unlink()
    if case == "other final":
        shutil.rmtree(final)
        make_final(run, 3, seed=1)

    with CheckpointSync(store, keep_last=2) as sync:
        assert [p.name for p in sync.catch_up(run)] == copied
    assert sync.errors == [] and partials(store) == []
    assert store_steps(store) == kept and not (store / "checkpoint-4").exists()
    assert is_complete_checkpoint(store / "final", verify_checksums=True)
    assert same_tree(store / "final", run / "final")
    for step in kept:
        assert same_tree(store / f"checkpoint-{step}", run / f"checkpoint-{step}")


# ----------------------------------------------------------------------------- restore


@pytest.mark.parametrize(
    ("local_steps", "store_steps", "expected_step", "restored"),
    [
        ([5], [10, 15], 15, True),
        ([], [10], 10, True),
        ([20], [10, 15], 20, False),
        ([15], [15], 15, False),
        ([5], [], 5, False),
        ([], [], None, False),
    ],
)
def test_restore_newest(tmp_path, local_steps, store_steps, expected_step, restored):
    run, store = tmp_path / "run", tmp_path / "store"
    for step in local_steps:
        make_checkpoint(run, step, seed=1)
    for step in store_steps:
        make_checkpoint(store, step, seed=2)

    result = restore_newest(store, run)

    assert result == (None if expected_step is None else run / f"checkpoint-{expected_step}")
    if expected_step is not None:
        assert is_complete_checkpoint(result, verify_checksums=True)
        assert same_tree(result, store / f"checkpoint-{expected_step}") is restored
    assert partials(run) == []


def test_restore_newest_skips_corrupt_store_checkpoint_and_replaces_incomplete_local(tmp_path, caplog):
    run, store = tmp_path / "run", tmp_path / "store"
    make_checkpoint(run, 5, seed=1)
    make_checkpoint(run, 10, manifest=False, seed=1)  # local save of step 10 was interrupted
    make_checkpoint(store, 10, seed=2)
    _corrupt_byte(make_checkpoint(store, 15, seed=2))

    with caplog.at_level(logging.WARNING, logger="nbhelpers.sync"):
        result = restore_newest(store, run)

    assert result == run / "checkpoint-10"
    assert same_tree(result, store / "checkpoint-10")
    assert not (run / "checkpoint-15").exists()
    assert any("checkpoint-15" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert partials(run) == []


def test_restore_newest_missing_store_keeps_local(tmp_path):
    local = make_checkpoint(tmp_path / "run", 3)
    assert restore_newest(tmp_path / "no-store", tmp_path / "run") == local


# ----------------------------------------------------------------------------- background sync failures


def test_full_disk_is_reported_and_next_submit_works(tmp_path, monkeypatch, caplog):
    checkpoint = make_checkpoint(tmp_path / "run", 30)
    store = tmp_path / "store"

    def disk_full(source, destination):
        raise OSError(errno.ENOSPC, "No space left on device", str(destination))

    sync = CheckpointSync(store)
    monkeypatch.setattr(sync_module, "_copy_file", disk_full)
    with caplog.at_level(logging.WARNING, logger="nbhelpers.sync"):
        sync.submit(checkpoint)  # must not raise
        assert sync.wait(timeout=10)

    assert [failure.errno for failure in sync.errors] == [errno.ENOSPC]
    message = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert str(checkpoint) in message and str(store) in message and "ENOSPC" in message
    assert store_steps(store) == [] and partials(store) == []

    monkeypatch.undo()
    sync.submit(checkpoint)
    sync.close()
    assert len(sync.errors) == 1
    assert sync.synced == [store / "checkpoint-30"]
    assert is_complete_checkpoint(store / "checkpoint-30", verify_checksums=True)


def test_vanished_store_is_reported_not_recreated(tmp_path, caplog):
    checkpoint = make_checkpoint(tmp_path / "run", 30)
    store = tmp_path / "drive" / "chartrl" / "run"
    sync = CheckpointSync(store)
    shutil.rmtree(tmp_path / "drive")  # Drive unmounted

    with caplog.at_level(logging.WARNING, logger="nbhelpers.sync"):
        sync.submit(checkpoint)
        assert sync.wait(timeout=10)

    assert [failure.errno for failure in sync.errors] == [errno.ENOENT]
    assert "store folder does not exist" in sync.errors[0].reason
    assert any(str(store) in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert not (tmp_path / "drive").exists(), "a missing store must not be created on the local disk"

    store.mkdir(parents=True)  # Drive mounted again
    sync.submit(checkpoint)
    sync.close()
    assert len(sync.errors) == 1
    assert store_steps(store) == [30]


def test_checkpoint_deleted_during_copy_is_reported(tmp_path, monkeypatch):
    checkpoint = make_checkpoint(tmp_path / "run", 30)
    store = tmp_path / "store"
    original = sync_module._copy_file

    def rotate_then_copy(source, destination):
        shutil.rmtree(checkpoint, ignore_errors=True)  # save_total_limit rotation
        return original(source, destination)

    monkeypatch.setattr(sync_module, "_copy_file", rotate_then_copy)
    with CheckpointSync(store) as sync:
        sync.submit(checkpoint)
    assert [failure.errno for failure in sync.errors] == [errno.ENOENT]
    assert "deleted" in sync.errors[0].reason
    assert store_steps(store) == [] and partials(store) == []


def test_incomplete_source_is_reported(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "run", 30, manifest=False)
    with CheckpointSync(tmp_path / "store") as sync:
        sync.submit(checkpoint)
    assert len(sync.errors) == 1 and "no manifest" in sync.errors[0].reason
    assert sync.errors[0].errno is None


# ----------------------------------------------------------------------------- pruning, resubmission, threading


def test_pruning_keeps_last_k_and_removes_stale_partials(tmp_path):
    run, store = tmp_path / "run", tmp_path / "store"
    stale = store / ".partial-checkpoint-7-deadbeef"
    stale.mkdir(parents=True)
    (stale / "optimizer.pt").write_bytes(b"half a file")
    checkpoints = [make_checkpoint(run, step) for step in (1, 2, 10, 3)]

    with CheckpointSync(store, keep_last=2) as sync:
        for checkpoint in checkpoints:
            sync.submit(checkpoint)

    assert sync.errors == []
    assert sorted(p.name for p in store.iterdir()) == ["checkpoint-10", "checkpoint-3"]


def test_identical_resubmission_is_skipped_and_different_content_replaced(tmp_path, monkeypatch):
    run, store = tmp_path / "run", tmp_path / "store"
    checkpoint = make_checkpoint(run, 4)
    copies = []
    original = sync_module._copy_file
    monkeypatch.setattr(sync_module, "_copy_file", lambda s, d: copies.append(s) or original(s, d))

    with CheckpointSync(store) as sync:
        sync.submit(checkpoint)
        sync.wait()
        sync.submit(checkpoint)
        sync.wait()
        assert len(copies) == len(FAKE_FILES), "the second, identical submit copies nothing"
        shutil.rmtree(checkpoint)
        make_checkpoint(run, 4, seed=9)  # same step, other content (e.g. a retrained branch)
        sync.submit(checkpoint)

    assert sync.errors == []
    assert len(copies) == 2 * len(FAKE_FILES)
    assert same_tree(store / "checkpoint-4", checkpoint)


def test_submit_returns_at_once_while_copy_runs_and_wait_drains(tmp_path, monkeypatch):
    checkpoint = make_checkpoint(tmp_path / "run", 12)
    store = tmp_path / "store"
    original = sync_module._copy_file

    def slow_copy(source, destination):  # 4 files x 0.5 s = 2 s
        time.sleep(0.5)
        return original(source, destination)

    monkeypatch.setattr(sync_module, "_copy_file", slow_copy)
    sync = CheckpointSync(store)
    started = time.monotonic()
    sync.submit(checkpoint)
    assert time.monotonic() - started < 0.5
    assert sync.wait(timeout=0.1) is False
    assert not (store / "checkpoint-12").exists()

    assert sync.close(timeout=20) is True
    assert time.monotonic() - started >= 2.0
    assert is_complete_checkpoint(store / "checkpoint-12", verify_checksums=True)
    with pytest.raises(RuntimeError, match="closed"):
        sync.submit(checkpoint)


def test_keep_last_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointSync(tmp_path / "store", keep_last=0)


# ----------------------------------------------------------------------------- trainer callback


@pytest.mark.parametrize(("main_process", "with_sync"), [(True, True), (True, False), (False, True)])
def test_callback_writes_manifest_and_submits(tmp_path, main_process, with_sync):
    run, store = tmp_path / "run", tmp_path / "store"
    checkpoint = make_checkpoint(run, 25, manifest=False)
    sync = CheckpointSync(store) if with_sync else None
    callback = CheckpointSyncCallback(sync)
    args = SimpleNamespace(output_dir=str(run))
    state = SimpleNamespace(global_step=25, is_world_process_zero=main_process)

    callback.on_save(args, state, control=None)
    callback.on_train_end(args, state, control=None)

    assert is_complete_checkpoint(checkpoint, verify_checksums=True) is main_process
    if sync is not None:
        assert sync.close(timeout=10)
        assert sync.errors == []
        assert store_steps(store) == ([25] if main_process else [])


def test_callback_with_a_real_trainer_resumes(tmp_path):
    """End to end with transformers.Trainer on a one-layer model: rotation, sync, resume from the store."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Regression(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 1)

        def forward(self, x, y):
            return {"loss": torch.nn.functional.mse_loss(self.linear(x).squeeze(-1), y)}

    torch.manual_seed(0)
    rows = [{"x": torch.randn(4), "y": torch.randn(())} for _ in range(16)]
    run, store = tmp_path / "run", tmp_path / "store"
    steps_taken = []

    class CountSteps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps_taken.append(state.global_step)

    def train(max_steps, resume_from):
        arguments = TrainingArguments(
            output_dir=str(run), max_steps=max_steps, save_steps=1, save_total_limit=2,
            per_device_train_batch_size=4, report_to=[], use_cpu=True, logging_strategy="no",
            dataloader_num_workers=0,
        )
        sync = CheckpointSync(store, keep_last=2)
        trainer = Trainer(model=Regression(), args=arguments, train_dataset=rows,
                          callbacks=[CheckpointSyncCallback(sync), CountSteps()])
        trainer.train(resume_from_checkpoint=None if resume_from is None else str(resume_from))
        sync.close()
        return trainer, sync

    _, first = train(3, None)
    assert first.errors == [] or all("deleted" in failure.reason for failure in first.errors)
    assert store_steps(store)[-1] == 3

    shutil.rmtree(run)  # the VM is gone
    resume = restore_newest(store, run)
    assert resume == run / "checkpoint-3"
    steps_taken.clear()
    trainer, _ = train(5, resume)
    assert steps_taken == [4, 5], "training resumed after step 3"
    assert trainer.state.global_step == 5
    assert store_steps(store) == [4, 5]
    assert find_resume_checkpoint(run) == run / "checkpoint-5"


# ----------------------------------------------------------------------------- folders put in place


def test_publish_replaces_final_whole_and_leaves_no_partial(tmp_path):
    """publish gives the new final/ its manifest at the step and puts it in place of the old one; the partial
    folder's name follows the store's scheme, so the clean-ups find a stale one."""
    old = make_checkpoint(tmp_path, 1)
    old.rename(tmp_path / "final")
    new = make_checkpoint(tmp_path, 2, manifest=False, seed=1)
    staged = sync_module.partial_folder(tmp_path / "final", tag="2")
    assert staged.name == ".partial-final-2"
    new.rename(staged)
    assert sync_module.publish(staged, tmp_path / "final", step=2) == tmp_path / "final"
    assert read_manifest(tmp_path / "final")["step"] == 2 and is_complete_checkpoint(tmp_path / "final", True)
    assert partials(tmp_path) == [] and not staged.exists()


def test_replace_folder_cut_short_keeps_the_old_folder_whole(tmp_path, monkeypatch):
    """A crash between moving the old folder aside and renaming the new one in leaves the old one whole under a
    partial name (removed by the next clean-up) and the new one untouched: nothing is half deleted."""
    target = make_checkpoint(tmp_path, 3)
    new = make_checkpoint(tmp_path / "new", 3, seed=1)
    before = {p.name: p.read_bytes() for p in target.rglob("*") if p.is_file()}
    renames = []

    def rename_then_crash(source, destination):
        if renames:
            raise OSError(errno.EIO, "simulated crash")
        renames.append(destination)
        os.replace(source, destination)

    monkeypatch.setattr(sync_module.os, "rename", rename_then_crash)
    with pytest.raises(OSError, match="simulated crash"):
        sync_module.replace_folder(new, target)
    (aside,) = partials(tmp_path)
    assert {p.name: p.read_bytes() for p in aside.rglob("*") if p.is_file()} == before
    assert read_manifest(aside)["step"] == 3 and is_complete_checkpoint(aside, True)
    assert is_complete_checkpoint(new, True)
