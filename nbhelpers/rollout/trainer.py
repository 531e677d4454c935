"""TRL hook: ``GRPOTrainer._generate_single_turn`` through the fast engine, one engine run per generation batch."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .engine import RolloutEngine, base_model, engine_unavailable_reason
from .weights import ComputeCopies


def split_prompts(prompt_ids: Sequence[Sequence[int]], multimodal_fields: dict, image_token_id: int,
                  merge_size: int) -> list[dict]:
    """Per-prompt processor-style inputs (CPU tensors, batch 1) from TRL's batched prompt fields.

    pixel_values rows and image_grid_thw rows are assigned to prompts in order, by each prompt's count
    of image placeholder tokens (an image of grid t x h x w has t*h*w patches and t*h*w/merge^2 tokens).
    """
    import numpy as np

    grids = multimodal_fields.get("image_grid_thw")
    pixels = multimodal_fields.get("pixel_values")
    grids = None if grids is None else torch.as_tensor(np.asarray(grids) if not torch.is_tensor(grids) else grids)
    pixels = None if pixels is None else (pixels if torch.is_tensor(pixels) else torch.as_tensor(np.asarray(pixels)))
    image, row = 0, 0
    out = []
    for i, ids in enumerate(prompt_ids):
        ids = [int(t) for t in ids]
        item: dict[str, Any] = {"input_ids": torch.tensor([ids]),
                                "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        tokens = sum(1 for t in ids if t == image_token_id)
        first_image, first_row = image, row
        while tokens > 0:
            if grids is None or image >= grids.shape[0]:
                raise ValueError(f"prompt {i}: {tokens} image placeholder tokens have no image_grid_thw row left")
            patches = int(grids[image].prod())
            tokens -= patches // merge_size ** 2
            image, row = image + 1, row + patches
        if tokens < 0:
            raise ValueError(f"prompt {i}: image placeholder tokens do not match image_grid_thw")
        if image > first_image:
            item["image_grid_thw"] = grids[first_image:image]
            item["pixel_values"] = pixels[first_row:row]
        for key, value in multimodal_fields.items():
            if key in ("image_grid_thw", "pixel_values"):
                continue
            if isinstance(value, (list, tuple)) or (torch.is_tensor(value) and value.dim() == 2
                                                     and value.shape[0] == len(prompt_ids)):
                per_prompt = value[i]
                per_prompt = per_prompt[-len(ids):] if len(per_prompt) > len(ids) else per_prompt  # left padding
                item[key] = torch.as_tensor(per_prompt if not torch.is_tensor(per_prompt) else per_prompt).view(1, -1)
            else:
                raise ValueError(f"multimodal field '{key}' is neither per-prompt nor an image field")
        out.append(item)
    if grids is not None and image != grids.shape[0]:
        raise ValueError(f"{grids.shape[0] - image} image_grid_thw rows were not claimed by any prompt's tokens")
    return out


def _same_prompt(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def group_consecutive(items: Sequence[dict]) -> list[tuple[int, int]]:
    """(start, count) of runs of identical consecutive prompts (ids and images)."""
    groups: list[tuple[int, int]] = []
    for i, item in enumerate(items):
        if groups and _same_prompt(items[groups[-1][0]], item):
            groups[-1] = (groups[-1][0], groups[-1][1] + 1)
        else:
            groups.append((i, 1))
    return groups


def trainer_rollout_unavailable_reason(trainer) -> str | None:
    """None when :func:`trainer_generate` can replace the trainer's generation; otherwise why not."""
    args = trainer.args
    if getattr(trainer, "use_vllm", False) or getattr(trainer, "use_transformers_continuous_batching", False):
        return "the trainer generates with vLLM or continuous batching"
    if getattr(trainer, "tools", None) or getattr(trainer, "rollout_func", None) is not None:
        return "the trainer uses tools or a custom rollout_func"
    if trainer.min_p is not None or trainer.repetition_penalty != 1.0:
        return "min_p and repetition_penalty are not supported by the fast rollout engine"
    if args.generation_kwargs:
        return f"generation_kwargs {sorted(args.generation_kwargs)} are not supported by the fast rollout engine"
    if getattr(args, "cast_lm_head_to_fp32", False):
        return "cast_lm_head_to_fp32 is not supported by the fast rollout engine"
    return engine_unavailable_reason(trainer.accelerator.unwrap_model(trainer.model_wrapped))


def rollout_model(trainer, model):
    """The model the engine decodes with: ``model`` itself, or, when ``model`` holds fp32 master weights that
    train under bf16/fp16 mixed precision (full fine-tuning without DeepSpeed), its :class:`.weights.ComputeCopies`
    in that dtype, refreshed when an optimizer step has run since the last generation (``state.global_step``).
    LoRA models (frozen base in the compute dtype, PEFT's fp32 adapters) decode as they are."""
    args = trainer.args
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    if dtype is None or base_model(model) is not model or model.get_input_embeddings().weight.dtype != torch.float32:
        return model
    copies = getattr(trainer, "_chartrl_compute_copies", None)
    if copies is None or copies.master is not model or copies.dtype != dtype:
        copies = ComputeCopies(model, dtype)
        trainer._chartrl_compute_copies = copies
    copies.refresh(trainer.state.global_step)
    return copies.model


def _trainer_engine(trainer, model) -> RolloutEngine:
    """The trainer's engine for ``model``, built once with the trainer's generation settings."""
    settings = dict(eos_token_ids=tuple(trainer.eos_token_ids), pad_token_id=trainer._tokenizer.pad_token_id,
                    max_new_tokens=trainer.max_completion_length, temperature=trainer.temperature,
                    top_p=trainer.top_p, top_k=trainer.top_k or None,
                    suppress_token_ids=tuple(trainer.generation_config.suppress_tokens or ()))
    engine = getattr(trainer, "_chartrl_rollout_engine", None)
    if engine is None or engine.model is not model or any(engine.settings.get(k) != v for k, v in settings.items()):
        engine = RolloutEngine(model, **settings)
        trainer._chartrl_rollout_engine = engine
    return engine


def trainer_generate(trainer, prompt_ids: list[list[int]],
                     multimodal_fields: dict) -> tuple[list[list[int]], list[list[float]]]:
    """TRL ``_generate_single_turn`` replacement: one engine run for the whole generation batch (every prompt
    prefilled once, all rows decoded together), results in input order.

    TRL repeats each prompt num_generations times consecutively; runs of identical prompts (ids and images)
    are found by comparison, so the group size need not be given and any order is handled. Returns
    (completion ids, per-token sampling log-probabilities), the latter as TRL's vLLM path returns them: TRL
    keeps them as ``sampling_per_token_logps`` (see :func:`.logits.token_logprobs` for what they are).
    """
    from trl.extras.profiling import profiling_context
    from trl.models import unwrap_model_for_generation

    base_cfg = base_model(trainer.accelerator.unwrap_model(trainer.model_wrapped)).config
    items = split_prompts(prompt_ids, multimodal_fields, int(base_cfg.image_token_id),
                          int(base_cfg.vision_config.spatial_merge_size))
    completions: list[list[int] | None] = [None] * len(items)
    logprobs: list[list[float] | None] = [None] * len(items)
    with (
        profiling_context(trainer, "rollout_engine.generate"),
        unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator,
                                    gather_deepspeed3_params=trainer.args.ds3_gather_for_generation,
                                    generation_kwargs=trainer.generation_kwargs,
                                    gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs)
        as unwrapped_model,
        torch.no_grad(),
        trainer._dist.summon_full_params(trainer.model_wrapped, recurse=False),
    ):
        engine = _trainer_engine(trainer, rollout_model(trainer, unwrapped_model))
        groups = group_consecutive(items)
        per_prompt, per_prompt_logps = engine.generate_batch([(items[start], count) for start, count in groups],
                                                             logprobs=True)
        for (start, count), outputs, logps in zip(groups, per_prompt, per_prompt_logps):
            completions[start:start + count] = outputs
            logprobs[start:start + count] = logps
    return completions, logprobs
