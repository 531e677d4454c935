"""A whole training run from a RunConfig (:func:`train`): the run's identity checked, the newest complete
checkpoint restored from the persistent store and resumed, training, ``final/`` with the run's model card, the
summary, and the store kept complete. A run already trained to its last step gets its ``final/`` from that
checkpoint (:func:`finalize_from_checkpoint`)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState

from . import monitor
from .config import ConfigError, RunConfig, estimate_training_steps, load_resolved_config, save_resolved_config
from .model_card import model_card, write_model_card
from .platform import persistent_store
from .provenance import check_run_identity
from .sync import (FINAL_NAME, RESUME_ONLY_FILES, CheckpointSync, CheckpointSyncCallback, checkpoint_finished,
                   checkpoint_step, find_resume_checkpoint, partial_folder, publish, restore_newest)
from .training_setup import build_trainer, check_environment

log = logging.getLogger(__name__)


def finalize_from_checkpoint(checkpoint: Path, run_dir: Path, cfg: RunConfig) -> Path:
    """final/ and trainer_state.json of a run whose last checkpoint is complete but whose final save was lost."""
    step = checkpoint_step(checkpoint)
    tmp = partial_folder(run_dir / FINAL_NAME, tag=str(step))
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint, tmp, ignore=shutil.ignore_patterns(*RESUME_ONLY_FILES, "global_step*"))
    write_model_card(model_card(cfg), tmp)
    shutil.copy2(checkpoint / "trainer_state.json", run_dir / "trainer_state.json")
    return publish(tmp, run_dir / FINAL_NAME, step)


def record_config(cfg: RunConfig, run_dir: Path, store: Path | None) -> None:
    """Write the run's config.yaml into the run folder and its persistent-store folder (a store that cannot be
    written is reported, not fatal: checkpoints are still trained and kept locally)."""
    save_resolved_config(cfg, run_dir)
    if store is not None:
        try:
            save_resolved_config(cfg, store)
        except OSError as error:
            log.warning("could not write config.yaml into the persistent store %s: %s", store, error)


def recorded_config(run_dir: Path, fallback: RunConfig) -> RunConfig:
    """The configuration in the run folder's config.yaml (what its model was trained with), else ``fallback``."""
    try:
        return load_resolved_config(run_dir / "config.yaml")
    except ConfigError:
        return fallback


def _write_summary(run_dir: Path) -> None:
    summary = monitor.summarize_run(monitor.read_run(run_dir), run_dir.name)
    print(monitor.format_summary(summary), flush=True)
    monitor.write_summary(summary, run_dir)


def train(cfg: RunConfig, **build_kwargs: Any) -> Path:
    """Train (resuming from the newest complete checkpoint), save the final adapter/model; return the run folder.

    No file an earlier run wrote is changed before the run's identity is checked and model and data are
    loaded (only a checkpoint restored from the store is added), so a refused or failed start leaves them as
    they were. With a persistent store, every complete local
    checkpoint and final/ the store lacks is copied at the start and at the end."""
    check_environment(cfg)
    check_run_identity(cfg)
    run_dir = cfg.run_dir()
    store = persistent_store(cfg)
    resume_from = None
    state = PartialState()
    if cfg.resume:
        with state.main_process_first():  # one process restores; the others then read the result
            if store is not None and store.is_dir() and state.is_main_process:
                restore_newest(store, run_dir)
        resume_from = find_resume_checkpoint(run_dir)
    sync = CheckpointSync(store, keep_last=cfg.save_total_limit) if store is not None else None
    try:
        if resume_from is not None and checkpoint_finished(resume_from, cfg.max_steps):
            if state.is_main_process:
                print(f"Run already trained to its last step ({resume_from.name}); writing final/ from it",
                      flush=True)
                if not (run_dir / "config.yaml").is_file():  # restored from the store on a new machine
                    record_config(cfg, run_dir, store)
                finalize_from_checkpoint(resume_from, run_dir, recorded_config(run_dir, cfg))
                _write_summary(run_dir)
                if sync is not None:
                    sync.catch_up(run_dir)
            state.wait_for_everyone()
            return run_dir
        trainer = build_trainer(cfg, run_dir=run_dir, callbacks=[CheckpointSyncCallback(sync)], **build_kwargs)
        problems = len(trainer.train_dataset)
        estimate = estimate_training_steps(cfg, problems, trainer.accelerator.num_processes)
        if trainer.accelerator.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
            record_config(cfg, run_dir, store)
            if sync is not None:
                sync.catch_up(run_dir)  # copies an earlier session left unfinished (killed mid-copy)
            print(f"Run folder: {run_dir}\nEstimate: {estimate}", flush=True)
            print(f"Resuming from {resume_from}" if resume_from else "Starting fresh (no complete checkpoint)",
                  flush=True)
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        if torch.cuda.is_available():
            print(f"process {trainer.accelerator.process_index}: peak GPU memory "
                  f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", flush=True)
        tmp = partial_folder(run_dir / FINAL_NAME, tag=str(trainer.state.global_step))  # alike on every process
        trainer.save_model(str(tmp))
        if trainer.accelerator.is_main_process:
            trainer.processing_class.save_pretrained(str(tmp))
            write_model_card(model_card(cfg), tmp)
            publish(tmp, run_dir / FINAL_NAME, trainer.state.global_step)
            trainer.state.save_to_json(str(run_dir / "trainer_state.json"))
            _write_summary(run_dir)
            if sync is not None:
                sync.wait()  # the last checkpoint's copy first, then whatever the store still lacks
                sync.catch_up(run_dir)
    finally:
        if sync is not None:
            sync.wait()
            sync.close()
    return run_dir


__all__ = ["finalize_from_checkpoint", "record_config", "recorded_config", "train"]
