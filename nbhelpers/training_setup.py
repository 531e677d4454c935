"""A training run's pieces from a RunConfig: TRL's GRPOConfig, the reward functions, model, processor and data,
the callbacks, and the :class:`nbhelpers.trainer.ChartRLTrainer` that holds them."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from torch.utils.tensorboard import SummaryWriter
from transformers.trainer_callback import ProgressCallback
from trl import GRPOConfig

from . import data, models
from .config import ConfigError, RunConfig, resolved_epsilon_high
from .model_card import model_card
from .platform import deepspeed_config_path, resolve_training_path
from .rewards import RewardSettings, build_reward_funcs, reward_weights
from .trainer import ChartRLTrainer
from .training_callbacks import CollapseWarningCallback, QuietProgressCallback, StepLineCallback, TensorBoardNumbers

log = logging.getLogger(__name__)


def _report_to(cfg: RunConfig) -> list[str]:
    loggers = [r for r in cfg.report_to if r not in ("none", "tensorboard")]
    if "wandb" in loggers and not (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") in
                                   ("offline", "disabled")):
        log.warning("report_to has wandb but neither WANDB_API_KEY nor WANDB_MODE=offline is set: "
                    "W&B logging is off for this run (it never prompts).")
        loggers.remove("wandb")
    return loggers


def grpo_config(cfg: RunConfig, run_dir: Path, dtype: str, use_cpu: bool, deepspeed_file: str | None) -> GRPOConfig:
    """The TRL GRPOConfig equivalent of a RunConfig."""
    return GRPOConfig(
        output_dir=str(run_dir), seed=cfg.seed, data_seed=cfg.seed,
        full_determinism=cfg.full_determinism,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length,
        num_train_epochs=cfg.num_epochs, max_steps=cfg.max_steps, learning_rate=cfg.learning_rate,
        # transformers 5 has no warmup_ratio: a warmup_steps below 1 is the fraction of all optimizer steps
        # (TrainingArguments.get_warmup_steps: ceil(fraction x steps)), and RunConfig keeps warmup_ratio in [0, 1).
        lr_scheduler_type=cfg.lr_scheduler_type, warmup_steps=float(cfg.warmup_ratio), weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm, loss_type=cfg.loss_type, beta=cfg.beta,
        epsilon_high=resolved_epsilon_high(cfg), temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
        reward_weights=reward_weights(reward_settings(cfg)),
        logging_steps=cfg.logging_steps, save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit,
        save_strategy="steps", report_to=_report_to(cfg), bf16=(dtype == "bf16"), fp16=(dtype == "fp16"),
        activation_checkpointing=cfg.gradient_checkpointing, use_cpu=use_cpu, deepspeed=deepspeed_file,
        remove_unused_columns=False, dataloader_num_workers=0, log_completions=False,
        use_vllm=(cfg.rollout_engine == "vllm"),
        disable_tqdm=False, **importance_sampling_settings(cfg),
    )


def importance_sampling_settings(cfg: RunConfig) -> dict[str, Any]:
    """GRPOConfig's vllm_importance_sampling_* for ``importance_sampling_correction`` (TRL's default is on)."""
    if cfg.importance_sampling_correction == "off":
        return {"vllm_importance_sampling_correction": False}
    return {"vllm_importance_sampling_correction": True,
            "vllm_importance_sampling_mode": cfg.importance_sampling_correction,
            "vllm_importance_sampling_clip_max": cfg.importance_sampling_cap}


def _reward_weight_names(weights: dict) -> dict:
    return {name if name.endswith("_reward") else f"{name}_reward": float(w) for name, w in weights.items()}


def reward_settings(cfg: RunConfig) -> RewardSettings:
    """The rewards' settings (weights, length window, embedding model, verbosity) of a RunConfig."""
    return RewardSettings(weights=_reward_weight_names(cfg.reward_weights),
                          length_window_words=tuple(int(v) for v in cfg.length_window),
                          embedding_model=cfg.embedding_model, verbose=cfg.verbose_rewards)


def build_reward_functions(cfg: RunConfig) -> list:
    """The reward functions of a RunConfig, in TRL's form."""
    return build_reward_funcs(reward_settings(cfg))


def check_environment(cfg: RunConfig) -> None:
    """Fail before any work when the configuration needs a package this machine lacks."""
    if cfg.rollout_engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError("key 'rollout_engine' is vllm but the vllm package is not installed "
                          "(pip install vllm, or use rollout_engine: auto)")


def build_trainer(cfg: RunConfig, run_dir: Path | None = None, callbacks: list | None = None,
                  model=None, processor=None, train_dataset=None) -> ChartRLTrainer:
    """Everything a training run needs, from a validated configuration (model/data injectable for tests)."""
    check_environment(cfg)
    path = resolve_training_path(cfg)
    dtype = path.dtype
    if PartialState().is_main_process:
        print(path.line(), flush=True)
    run_dir = Path(run_dir or cfg.run_dir())
    if processor is None:
        processor = models.load_processor(cfg.vlm_name, cfg.max_pixels)
    processor.tokenizer.padding_side = "left"
    if train_dataset is None:
        options = {"drop_duplicates": True} if cfg.drop_duplicates else {}
        examples = data.load_examples(cfg.dataset_name, data_dir=cfg.data_dir, subset_size=cfg.subset_size,
                                      seed=cfg.seed, **options)
        train_dataset = data.to_trl_dataset(examples, cfg.max_pixels)
    if model is None:
        # Random and shipped models are built straight on this process's GPU (seconds, not minutes of CPU
        # init). They have no hub repository, so hub look-ups (PEFT checks the base model's files when
        # saving) stay off.
        random_model = models.resolve_model(cfg.vlm_name)[0] in ("random", "asset")
        if random_model:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            # Offline, PEFT cannot look up the base model's config when saving an adapter and warns that it
            # assumes an unchanged vocabulary; a random or shipped registry model has no hub config, and LoRA never
            # resizes its vocabulary, so the assumption holds.
            warnings.filterwarnings("ignore", category=UserWarning,
                                    message=f"Could not find a config file in {re.escape(cfg.vlm_name)} ")
        device = PartialState().device if random_model else "cpu"
        model = models.load_model(cfg.vlm_name, models.torch_dtype(path.weights_dtype), device=device,
                                  attn_implementation=cfg.attn_implementation)
    peft_config = models.lora_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules) \
        if cfg.finetune == "lora" else None
    use_cpu = not torch.cuda.is_available()
    deepspeed_file = _in_process_deepspeed_file(path.deepspeed)
    args = grpo_config(cfg, run_dir, dtype, use_cpu, deepspeed_file)
    all_callbacks = [StepLineCallback(cfg.mode), CollapseWarningCallback(), *(callbacks or [])]
    if "tensorboard" in cfg.report_to and PartialState().is_main_process:
        all_callbacks.append(TensorBoardNumbers(tb_writer=SummaryWriter(log_dir=str(run_dir / "logs"))))
    trainer = ChartRLTrainer(
        model=model, reward_funcs=build_reward_functions(cfg), args=args, train_dataset=train_dataset,
        processing_class=processor, peft_config=peft_config, callbacks=all_callbacks,
        mode=cfg.mode, lambda_psr=cfg.lambda_psr, passk_k=cfg.passk_k, reward_threshold=cfg.reward_threshold,
        correctness_from=cfg.correctness_from, rollout_engine=cfg.rollout_engine, model_card=model_card(cfg))
    if trainer.pop_callback(ProgressCallback) is not None:  # the terminal bar (a notebook's shows a table)
        trainer.add_callback(QuietProgressCallback)
    return trainer


def _in_process_deepspeed_file(deepspeed: str) -> str | None:
    """The DeepSpeed JSON for a run started in-process whose DeepSpeed, as it runs here (TrainingPath.deepspeed),
    is ``deepspeed``; under ``accelerate launch`` its config file rules."""
    if deepspeed != "zero3" or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        return None
    return str(deepspeed_config_path())


__all__ = ["build_reward_functions", "build_trainer", "check_environment", "grpo_config",
           "importance_sampling_settings", "reward_settings"]
