"""Checkpoint persistence: manifests, resume selection, and background copies to a persistent store.

A run folder ``<output_root>/<run_name>/`` holds Hugging Face Trainer checkpoints
``checkpoint-<step>/``. A checkpoint counts as complete only when it holds a
``chartrl-manifest.json`` (written last, atomically) whose every listed file is present with the
listed size (and sha256 when asked). A persistent store folder (Google Drive on Colab,
``/kaggle/working`` on Kaggle) receives copies made in a background thread: each copy is built in a
hidden ``.partial-checkpoint-<step>-<random>/`` folder, gets its manifest last, and is then renamed
to ``checkpoint-<step>``, so a process killed at any moment never leaves a folder that
:func:`is_complete_checkpoint` accepts but that is not complete. The run's ``final/`` model is built the
same way in its run folder (``.partial-final-<step>/``, then :func:`publish`), gets a manifest too (its step
is the run's last) and is copied like a checkpoint. :meth:`CheckpointSync.catch_up`,
called when training starts and when it ends, copies every complete local folder the store lacks and
removes stale partial folders, so a copy cut short by a kill is finished by the next session.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import queue
import re
import secrets
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch.distributed
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

MANIFEST_NAME = "chartrl-manifest.json"
MANIFEST_FORMAT = "chartrl-checkpoint-manifest"
MANIFEST_VERSION = 1
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
FINAL_NAME = "final"
PARTIAL_PREFIX = ".partial-"
# Files of a checkpoint that only resuming needs; the rest (weights, configs, processor) make up final/.
RESUME_ONLY_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin",
                     MANIFEST_NAME, "scaler.pt")
_MANIFEST_TEMP_PREFIX = "." + MANIFEST_NAME
_CHUNK_BYTES = 16 * 1024 * 1024
_HASH_THREADS = 8
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")

# Partial folders being written by this process; pruning never removes them.
_ACTIVE_PARTIALS: set[Path] = set()
_ACTIVE_PARTIALS_LOCK = threading.Lock()


class ManifestError(ValueError):
    """A checkpoint manifest is missing, unreadable or malformed; the message names the file."""


# ----------------------------------------------------------------------------- manifests


def checkpoint_step(checkpoint_dir: str | os.PathLike) -> int:
    """Training step of a folder named ``checkpoint-<step>``; ValueError naming the folder otherwise."""
    match = CHECKPOINT_NAME.match(Path(checkpoint_dir).name)
    if match is None:
        raise ValueError(f"{checkpoint_dir}: not a checkpoint folder (expected a name like checkpoint-<step>)")
    return int(match.group(1))


def write_manifest(checkpoint_dir: str | os.PathLike, step: int | None = None) -> Path:
    """Write ``chartrl-manifest.json`` listing every file of the checkpoint (path, bytes, sha256) and the step.

    Every listed file is fsynced, then the manifest is written to a temporary file, fsynced and moved
    into place with ``os.replace``: it appears last and whole. Returns the manifest path. ``step`` is
    needed for a folder not named ``checkpoint-<step>`` (``final/``, or its temporary folder).
    Raises ValueError for such a folder without ``step`` and FileNotFoundError for a missing one.
    """
    folder = Path(checkpoint_dir)
    step = checkpoint_step(folder) if step is None else step
    if not folder.is_dir():
        raise FileNotFoundError(errno.ENOENT, "checkpoint folder does not exist", str(folder))
    relative_paths = sorted(
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file() and not path.name.startswith((MANIFEST_NAME, _MANIFEST_TEMP_PREFIX))
    )
    with ThreadPoolExecutor(max_workers=_HASH_THREADS) as pool:
        digests = list(pool.map(lambda relative: _hash_file(folder / relative, fsync=True), relative_paths))
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "step": step,
        "files": [
            {"path": relative, "size": size, "sha256": sha256}
            for relative, (size, sha256) in zip(relative_paths, digests)
        ],
    }
    manifest_path = folder / MANIFEST_NAME
    _write_json_atomically(manifest_path, manifest)
    return manifest_path


def read_manifest(checkpoint_dir: str | os.PathLike) -> dict:
    """Parsed and validated manifest of a checkpoint folder; ManifestError naming the file otherwise."""
    manifest_path = Path(checkpoint_dir) / MANIFEST_NAME
    try:
        text = manifest_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"{manifest_path}: no manifest (save interrupted or not made by chartrl)") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ManifestError(f"{manifest_path}: unreadable manifest: {error}") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as error:
        raise ManifestError(
            f"{manifest_path}: line {error.lineno} column {error.colno}: not valid JSON: {error.msg}"
        ) from None
    _validate_manifest(manifest, manifest_path)
    return manifest


def checkpoint_problem(checkpoint_dir: str | os.PathLike, verify_checksums: bool = False) -> str | None:
    """Why a checkpoint folder is not complete, or None when it is.

    Complete: a valid manifest whose step matches the folder name, and every listed file present with
    the listed size (and the listed sha256 when ``verify_checksums``). Files not listed are ignored.
    """
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return "not a folder"
    try:
        manifest = read_manifest(folder)
    except ManifestError as error:
        return str(error)
    name_match = CHECKPOINT_NAME.match(folder.name)
    if name_match is not None and int(name_match.group(1)) != manifest["step"]:
        return f"manifest step {manifest['step']} does not match the folder name"
    for entry in manifest["files"]:
        path = folder / entry["path"]
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return f"file {entry['path']} listed in the manifest is missing"
        except OSError as error:
            return f"file {entry['path']} cannot be read: {error}"
        if size != entry["size"]:
            return f"file {entry['path']} is {size} bytes, the manifest says {entry['size']}"
    if verify_checksums:
        for entry in manifest["files"]:
            try:
                _, sha256 = _hash_file(folder / entry["path"], fsync=False)
            except OSError as error:
                return f"file {entry['path']} cannot be read: {error}"
            if sha256 != entry["sha256"]:
                return f"file {entry['path']}: sha256 does not match the manifest (corrupted)"
    return None


def is_complete_checkpoint(checkpoint_dir: str | os.PathLike, verify_checksums: bool = False) -> bool:
    """True when the checkpoint folder has a valid manifest and every listed file (see checkpoint_problem)."""
    return checkpoint_problem(checkpoint_dir, verify_checksums) is None


# ----------------------------------------------------------------------------- resume selection


def find_resume_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """Newest complete ``checkpoint-<step>`` of a run folder (by step, numerically), checksums verified.

    Newer incomplete or corrupt checkpoints are skipped with a logged warning naming the folder and the
    reason. None when the folder does not exist or holds no complete checkpoint.
    """
    for _, folder in _complete_checkpoints_newest_first(Path(run_dir), warn=True):
        problem = checkpoint_problem(folder, verify_checksums=True)
        if problem is None:
            return folder
        logger.warning("skipping checkpoint %s: %s", folder, problem)
    return None


def restore_newest(store_dir: str | os.PathLike, run_dir: str | os.PathLike) -> Path | None:
    """Bring the store's newest complete checkpoint into the run folder when it is newer than the local one.

    Returns the local checkpoint to resume from (the restored copy, else the local newest, else None).
    The copy is built in a ``.partial-*`` folder of the run folder, checked against the manifest's sizes
    and sha256, and renamed into place; a store checkpoint that fails the check is skipped with a warning.
    """
    run_path, store_path = Path(run_dir), Path(store_dir)
    local = find_resume_checkpoint(run_path)
    local_step = -1 if local is None else checkpoint_step(local)
    if run_path.is_dir():
        _remove_stale_partials(run_path)
    for step, candidate in _complete_checkpoints_newest_first(store_path, warn=True):
        if step <= local_step:
            break
        run_path.mkdir(parents=True, exist_ok=True)
        try:
            restored = _copy_checkpoint_atomically(candidate, run_path)
        except (OSError, ManifestError) as error:
            logger.warning("could not restore %s into %s: %s", candidate, run_path, _describe_error(error))
            continue
        logger.info("restored %s from the store to %s", candidate, restored)
        return restored
    return local


def missing_from_store(run_dir: str | os.PathLike, store_dir: str | os.PathLike) -> list[Path]:
    """The complete local ``checkpoint-<step>`` folders (oldest first) and ``final/`` that the store holds
    not at all, incomplete, or with other content (by manifest)."""
    run_path, store_path = Path(run_dir), Path(store_dir)
    local = [folder for _, folder in reversed(list(_complete_checkpoints_newest_first(run_path, warn=False)))]
    if checkpoint_problem(run_path / FINAL_NAME) is None:
        local.append(run_path / FINAL_NAME)
    return [folder for folder in local if not _same_in_store(folder, store_path / folder.name)]


def _same_in_store(local: Path, stored: Path) -> bool:
    return checkpoint_problem(stored) is None and read_manifest(stored)["files"] == read_manifest(local)["files"]


# ----------------------------------------------------------------------------- folders put in place


def partial_folder(target: str | os.PathLike, tag: str | None = None) -> Path:
    """``<parent>/.partial-<name>-<tag>``: where a folder is built before it replaces ``target``. ``tag`` defaults
    to 8 random hex digits; give one that every process computes alike (e.g. the step) when several processes
    write into the folder. Stale ones are removed by :func:`restore_newest` and :meth:`CheckpointSync.catch_up`."""
    target = Path(target)
    return target.with_name(f"{PARTIAL_PREFIX}{target.name}-{tag or secrets.token_hex(4)}")


def replace_folder(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename the finished folder ``new`` to ``target``. An existing target is first moved aside to a partial
    name and removed after the rename, so a crash at any moment leaves the old or the new folder whole (at worst
    under a partial name, which the next clean-up removes)."""
    new, target = Path(new), Path(target)
    if target.exists():
        aside = partial_folder(target.with_name(f"replaced-{target.name}"))
        os.rename(target, aside)
        os.rename(new, target)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(new, target)
    _fsync_directory(target.parent)


def publish(folder: str | os.PathLike, target: str | os.PathLike, step: int) -> Path:
    """Give the finished folder ``folder`` (``final/`` being built) its manifest at ``step``, so it can be synced
    and checked, and put it in place of ``target`` (:func:`replace_folder`); returns ``target``."""
    write_manifest(folder, step=step)
    replace_folder(folder, target)
    return Path(target)


def checkpoint_finished(checkpoint: str | os.PathLike, requested_max_steps: int = -1) -> bool:
    """True when a checkpoint was saved at its run's last step (HF would train one step too many on resume)
    and ``requested_max_steps`` (-1: the run's own) asks for no more."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    last = max(state.get("max_steps", 0), requested_max_steps)
    return last > 0 and state["global_step"] >= last


# ----------------------------------------------------------------------------- background sync


@dataclass(frozen=True)
class SyncFailure:
    """One failed copy or prune: the checkpoint, the store, what went wrong and the errno (None if not an OSError)."""

    checkpoint: Path
    store: Path
    reason: str
    errno: int | None

    def __str__(self) -> str:
        return f"checkpoint sync of {self.checkpoint} to store {self.store} failed: {self.reason}"


class CheckpointSync:
    """Copies checkpoints to a persistent store in one background thread and keeps the newest ``keep_last``.

    ``submit`` only enqueues; failures (disk full, store gone, permissions, checkpoint deleted during the
    copy) are logged as warnings and appended to ``errors``, and never raised into training.
    ``synced`` lists the store checkpoints written or found identical. ``wait`` drains the queue.
    """

    def __init__(self, store_dir: str | os.PathLike, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, got {keep_last}")
        self.store_dir = Path(store_dir)
        self.keep_last = keep_last
        self.errors: list[SyncFailure] = []
        self.synced: list[Path] = []
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self._queue: queue.Queue[Path | None] = queue.Queue()
        self._pending = 0
        self._idle = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="chartrl-checkpoint-sync", daemon=True)
        self._thread.start()

    def submit(self, checkpoint_dir: str | os.PathLike) -> None:
        """Queue a checkpoint folder for copying; returns at once."""
        if self._closed:
            raise RuntimeError(f"CheckpointSync for {self.store_dir} is closed; create a new one")
        with self._idle:
            self._pending += 1
        self._queue.put(Path(checkpoint_dir))

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every submitted checkpoint is handled (timeout in seconds); True when drained."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Drain the queue (up to timeout seconds) and stop the worker; True when everything was handled."""
        drained = self.wait(timeout)
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            if drained:
                self._thread.join()
        return drained

    def catch_up(self, run_dir: str | os.PathLike) -> list[Path]:
        """Queue every complete local folder (``checkpoint-<step>`` oldest first, then ``final/``) that the
        store lacks or holds with other content, after removing the store's stale partial folders; returns
        the queued folders. Called at the start of training and at its end, so a copy interrupted by a kill
        (or a run finished from its last checkpoint) still reaches the store."""
        if self.store_dir.is_dir():
            _remove_stale_partials(self.store_dir)
        missing = missing_from_store(run_dir, self.store_dir)
        for folder in missing:
            self.submit(folder)
        return missing

    def __enter__(self) -> CheckpointSync:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _work(self) -> None:
        while (checkpoint := self._queue.get()) is not None:
            try:
                self._sync_one(checkpoint)
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def _sync_one(self, checkpoint: Path) -> None:
        try:
            if not self.store_dir.is_dir():
                raise FileNotFoundError(
                    errno.ENOENT, "store folder does not exist (Drive unmounted or folder removed?)", str(self.store_dir)
                )
            self.synced.append(_copy_checkpoint_atomically(checkpoint, self.store_dir))
        except Exception as error:  # a failed copy must never stop training
            reason = _describe_error(error)
            if isinstance(error, FileNotFoundError) and not checkpoint.exists():
                reason += " (checkpoint deleted before or during the copy, e.g. by save_total_limit)"
            self._record(checkpoint, "copy failed: " + reason, error)
            return
        try:
            _prune(self.store_dir, self.keep_last)
        except Exception as error:
            self._record(checkpoint, "pruning old store checkpoints failed: " + _describe_error(error), error)

    def _record(self, checkpoint: Path, reason: str, error: Exception) -> None:
        failure = SyncFailure(checkpoint, self.store_dir, reason, getattr(error, "errno", None))
        self.errors.append(failure)
        logger.warning("%s; training goes on", failure)


class CheckpointSyncCallback(TrainerCallback):
    """Trainer callback: writes the manifest of each saved checkpoint and submits it to the sync.

    ``on_save`` acts on the main process only (after a barrier when torch.distributed is running, so every
    rank has finished writing its files); ``on_train_end`` waits for the copies. ``sync`` may be None to
    only write manifests (needed for ``find_resume_checkpoint`` to accept the checkpoints).
    """

    def __init__(self, sync: CheckpointSync | None = None):
        self.sync = sync

    def on_save(self, args, state, control, **kwargs):
        _barrier_if_distributed()
        if not state.is_world_process_zero:
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        try:
            write_manifest(checkpoint)
        except OSError as error:
            logger.warning(
                "could not write the manifest of %s: %s; it will not be resumed from or synced",
                checkpoint,
                _describe_error(error),
            )
            return
        if self.sync is not None:
            self.sync.submit(checkpoint)

    def on_train_end(self, args, state, control, **kwargs):
        if self.sync is not None and state.is_world_process_zero:
            self.sync.wait()


# ----------------------------------------------------------------------------- internals


def _validate_manifest(manifest: object, manifest_path: Path) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"{manifest_path}: not a chartrl checkpoint manifest (key 'format' is not {MANIFEST_FORMAT!r})")
    if manifest.get("version") != MANIFEST_VERSION:
        raise ManifestError(f"{manifest_path}: key 'version' is {manifest.get('version')!r}, expected {MANIFEST_VERSION}")
    step = manifest.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ManifestError(f"{manifest_path}: key 'step' must be a non-negative integer, got {step!r}")
    files = manifest.get("files")
    if not isinstance(files, list) or not files:
        raise ManifestError(f"{manifest_path}: key 'files' must be a non-empty list")
    seen: set[str] = set()
    for index, entry in enumerate(files):
        where = f"{manifest_path}: files[{index}]"
        if not isinstance(entry, dict):
            raise ManifestError(f"{where}: must be an object with path, size, sha256")
        path, size, sha256 = entry.get("path"), entry.get("size"), entry.get("sha256")
        parts = Path(path).parts if isinstance(path, str) else ()
        if not parts or Path(path).is_absolute() or ".." in parts or path in seen:
            raise ManifestError(f"{where}: key 'path' must be a unique relative path inside the folder, got {path!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestError(f"{where}: key 'size' must be a non-negative integer (bytes), got {size!r}")
        if not isinstance(sha256, str) or not _SHA256_HEX.match(sha256):
            raise ManifestError(f"{where}: key 'sha256' must be 64 lowercase hex digits, got {sha256!r}")
        seen.add(path)


def _hash_file(path: Path, fsync: bool) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file; with fsync, also flush it to disk."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
        if fsync:
            os.fsync(handle.fileno())
    return size, digest.hexdigest()


def _copy_file(source: Path, destination: Path) -> tuple[int, str]:
    """Copy one file, fsync the copy, and return (bytes copied, sha256 of what was read)."""
    digest = hashlib.sha256()
    size = 0
    with open(source, "rb") as reader, open(destination, "xb") as writer:
        while chunk := reader.read(_CHUNK_BYTES):
            digest.update(chunk)
            writer.write(chunk)
            size += len(chunk)
        writer.flush()
        os.fsync(writer.fileno())
    return size, digest.hexdigest()


def _write_json_atomically(path: Path, data: dict) -> None:
    temporary = path.with_name(f"{_MANIFEST_TEMP_PREFIX}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temporary, "x", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_directory(path.parent)


def _fsync_directory(path: Path) -> None:
    """Persist a folder's entries; best effort, as some filesystems (e.g. FUSE mounts) refuse it."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _checkpoint_folders_newest_first(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = CHECKPOINT_NAME.match(child.name)
        if match is not None and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found, reverse=True)


def _complete_checkpoints_newest_first(folder: Path, warn: bool) -> Iterator[tuple[int, Path]]:
    """(step, folder) of the checkpoints that pass the size check, newest first."""
    for step, checkpoint in _checkpoint_folders_newest_first(folder):
        problem = checkpoint_problem(checkpoint, verify_checksums=False)
        if problem is None:
            yield step, checkpoint
        elif warn:
            logger.warning("skipping checkpoint %s: %s", checkpoint, problem)


def _copy_checkpoint_atomically(source: Path, destination_root: Path) -> Path:
    """Copy a complete checkpoint (or ``final/``) into ``destination_root/<its name>`` through a partial folder.

    Skips the copy when an identical complete checkpoint is already there; replaces an incomplete or
    different one. Every file's size and sha256 must match the source manifest.
    """
    manifest = read_manifest(source)
    problem = checkpoint_problem(source, verify_checksums=False)
    if problem is not None:
        raise ManifestError(f"{source}: source checkpoint is incomplete: {problem}")
    target = destination_root / source.name
    if checkpoint_problem(target) is None and read_manifest(target)["files"] == manifest["files"]:
        logger.info("%s already holds an identical copy of %s", target, source)
        return target
    partial = partial_folder(target)
    with _ACTIVE_PARTIALS_LOCK:
        _ACTIVE_PARTIALS.add(partial)
    try:
        partial.mkdir()
        for entry in manifest["files"]:
            destination = partial / entry["path"]
            destination.parent.mkdir(parents=True, exist_ok=True)
            size, sha256 = _copy_file(source / entry["path"], destination)
            if size != entry["size"] or sha256 != entry["sha256"] or destination.stat().st_size != entry["size"]:
                raise ManifestError(
                    f"{source / entry['path']}: copy does not match the manifest "
                    f"(read {size} bytes, manifest says {entry['size']}; file changed or corrupted)"
                )
            _fsync_directory(destination.parent)
        _write_json_atomically(partial / MANIFEST_NAME, manifest)
        replace_folder(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        with _ACTIVE_PARTIALS_LOCK:
            _ACTIVE_PARTIALS.discard(partial)
    return target


def _remove_stale_partials(folder: Path) -> None:
    with _ACTIVE_PARTIALS_LOCK:
        active = set(_ACTIVE_PARTIALS)
    for child in folder.iterdir():
        if child.name.startswith(PARTIAL_PREFIX) and child not in active:
            shutil.rmtree(child, ignore_errors=True)


def _prune(store: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints (and anything newer); remove older ones and stale partials."""
    kept_steps = [step for step, _ in _complete_checkpoints_newest_first(store, warn=False)][:keep_last]
    if len(kept_steps) == keep_last:
        for step, checkpoint in _checkpoint_folders_newest_first(store):
            if step < kept_steps[-1]:
                shutil.rmtree(checkpoint)
    _remove_stale_partials(store)


def _barrier_if_distributed() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _describe_error(error: BaseException) -> str:
    if isinstance(error, OSError) and error.errno is not None:
        name = errno.errorcode.get(error.errno, "?")
        where = f": {error.filename}" if error.filename else ""
        return f"{name} (errno {error.errno}) {error.strerror}{where}"
    return str(error)
