"""What 20_generate samples: which checkpoint, under which method label, into which samples file."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .config import RunConfig
from .platform import persistent_store
from .sync import find_resume_checkpoint


def resolve_checkpoint(cfg: RunConfig, checkpoint: str | None) -> str | None:
    """What to sample from: None -> the base model ``cfg.vlm_name``; "run" -> the run these parameters
    train (``<output_root>/<run name>``); a run folder -> its ``final`` model, else its newest complete
    checkpoint; any other folder -> itself. Raises FileNotFoundError naming the folder."""
    if checkpoint is None:
        return None
    folder = cfg.run_dir() if checkpoint == "run" else Path(checkpoint)
    if not folder.is_dir():
        hint = " (train it with 10_train using the same parameters, or set checkpoint = None for the base " \
               "model)" if checkpoint == "run" else ""
        raise FileNotFoundError(f"checkpoint folder not found: {folder}{hint}")
    if (folder / "final").is_dir():
        return str(folder / "final")
    if any(folder.glob("checkpoint-*")):
        newest = find_resume_checkpoint(folder)
        if newest is None:
            raise FileNotFoundError(f"{folder}: no complete checkpoint-N folder to sample from")
        return str(newest)
    return str(folder)


@dataclass
class SamplingPlan:
    """What 20_generate samples: from ``checkpoint`` (None: the base model), stored as ``method``,
    into ``samples_path``."""

    checkpoint: str | None
    method: str
    samples_path: Path


def sampling_plan(cfg: RunConfig, checkpoint: str | None, method: str | None = None,
                  samples_path: str | os.PathLike | None = None) -> SamplingPlan:
    """Resolve the checkpoint (see :func:`resolve_checkpoint`); the method label defaults to the mode
    for a trained checkpoint and to 'base' for the base model; the samples file defaults to
    ``<persistent store or .>/samples/<method>_<dataset>_n<n>.jsonl`` (on Colab/Kaggle it survives
    the VM like the checkpoints, so a rerun resumes it)."""
    source = resolve_checkpoint(cfg, checkpoint)
    method = method or (cfg.mode if source is not None else "base")
    if samples_path is None:
        store = persistent_store(cfg)
        root = store.parent if store is not None else Path(".")
        samples_path = root / "samples" / f"{method}_{cfg.eval_dataset}_n{cfg.n_samples}.jsonl"
    plan = SamplingPlan(source, method, Path(samples_path))
    resumed = " (resumed: finished problems are kept)" if plan.samples_path.exists() else ""
    print(f"sampling n = {cfg.n_samples} per problem of {cfg.eval_dataset} "
          f"(max_problems {cfg.max_problems}) from {source or cfg.vlm_name + ' (base model)'} as "
          f"'{method}' into {plan.samples_path}{resumed}")
    return plan
