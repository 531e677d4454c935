"""The model card (``README.md``) of a run folder and of its ``final/`` model.

It names the run's real objective, its base model (a Hub link only for a Hub model; a local folder or
an offline random model is named as such) and the training-relevant settings, so a card copied out of
the run still says what the weights are.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from .config import RunConfig, training_fingerprint, training_settings
from .models import resolve_model
from .objectives import MODE_DESCRIPTIONS, MODE_REFERENCES

def base_model_line(vlm_name: str) -> tuple[str | None, str]:
    """(Hub id or None, a Markdown phrase naming the base model): a Hub link only for a Hub model."""
    try:
        kind, location = resolve_model(vlm_name)
    except ValueError:
        return None, f"`{vlm_name}`"
    if kind == "hub":
        return location, f"[{location}](https://huggingface.co/{location}) (`{vlm_name}`)"
    if kind == "random":
        return None, f"`{vlm_name}`, an offline model with random weights built by chartrl (not on the Hub)"
    return None, f"the local model folder `{location}`"


def model_card(cfg: RunConfig) -> str:
    """The card's Markdown text, with Hub-style YAML metadata (base_model only for a Hub model)."""
    hub_id, base = base_model_line(cfg.vlm_name)
    adapter = f"LoRA adapter (r = {cfg.lora_r}, alpha = {cfg.lora_alpha})" if cfg.finetune == "lora" \
        else "fully fine-tuned model"
    metadata = {**({"base_model": hub_id} if hub_id else {}),
                "library_name": "peft" if cfg.finetune == "lora" else "transformers",
                "tags": ["chartrl", cfg.mode, cfg.finetune, "chart-question-answering"]}
    problems = "all" if cfg.subset_size is None else str(cfg.subset_size)
    settings = "\n".join(f"| `{key}` | `{json.dumps(value)}` |" for key, value in training_settings(cfg).items())
    return (f"---\n{yaml.safe_dump(metadata, sort_keys=False)}---\n\n"
            f"# {cfg.resolved_run_name()}\n\n"
            f"A {adapter} of {base}, trained by chartrl with the **{cfg.mode}** objective on the "
            f"`{cfg.dataset_name}` training set ({problems} problems, seed {cfg.seed}).\n\n"
            f"Objective: {MODE_DESCRIPTIONS[cfg.mode].format(passk_k=cfg.passk_k)}. Reference: {MODE_REFERENCES[cfg.mode]}.\n\n"
            f"## Training settings\n\nEvery key that changes the trained weights (fingerprint "
            f"`{training_fingerprint(cfg)}`); `config.yaml` in the run folder has the whole configuration.\n\n"
            f"| key | value |\n|---|---|\n{settings}\n")


def write_model_card(card: str, folder: str | os.PathLike) -> Path:
    """``folder/README.md`` holding ``card`` (the text of :func:`model_card`); returns its path."""
    path = Path(folder) / "README.md"
    path.write_text(card, encoding="utf-8")
    return path
