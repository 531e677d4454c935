"""Training: TRL's GRPOTrainer with the five objectives, plus construction from a RunConfig.

``ChartRLTrainer`` changes TRL by small overrides and copies none of its long methods:

* ``_calculate_rewards`` keeps the gathered per-function rewards of the batch;
* ``_generate_and_score_completions`` (after TRL's own) replaces the advantages with
  :func:`nbhelpers.objectives.compute_advantages` for psr / nsr / w-reinforce / passk and zeroes the
  completion mask of left-out samples, so they leave both the loss and its token normaliser;
* ``_compute_loss`` leaves the left-out rows out of the forward and backward pass (they would add
  nothing but compute), keeping on every process as many rows as the process with the most kept rows
  (so TRL's per-row gathers see equal shapes), and rescales TRL's loss (:func:`left_out_loss_scale`) so
  that left-out samples count in no normaliser and the gradient, averaged over processes, equals one
  process with the same global batch;
* ``create_optimizer`` makes a step in which no sample is kept skip the optimizer (no update, no NaN;
  logged as ``mode/empty_step``), and so does a step whose gradients are not finite (said on the console,
  counted as ``optimizer/nonfinite_steps``);
* ``_generate_single_turn`` hands rollouts to the fast engine (:mod:`nbhelpers.rollout`) where it runs; the
  engine's per-token log-probabilities reach TRL as its vLLM path's do (``sampling_per_token_logps``), and
  ``use_vllm`` reads True while the engine generates with the importance-sampling correction on, so TRL's own
  code computes, applies and logs it (``sampling/sampling_logp_difference/*``,
  ``sampling/importance_sampling_ratio/*``); with the correction off, ``_compute_loss`` logs the same gap keys
  from the training forward (:func:`logprob_gap`). Stock ``generate`` returns no log-probabilities: the keys
  are then absent;
* ``CollapseWarningCallback`` (added by ``build_trainer``) prints one line when :mod:`nbhelpers.collapse` finds
  a policy collapse in the log;
* ``log`` adds the process's peak GPU memory;
* ``create_model_card`` writes the run's own card (:mod:`nbhelpers.model_card`).

``mode: grpo`` runs TRL's GRPO unchanged.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import ProgressCallback
from trl import GRPOConfig, GRPOTrainer

from .config import (ConfigError, RunConfig, estimate_training_steps, resolved_epsilon_high,
                     save_resolved_config)
from .objectives import compute_advantages, mode_statistics

log = logging.getLogger(__name__)

# Loss types whose TRL normaliser is a per-sequence average: rescaled to count kept sequences only.
SEQUENCE_AVERAGED_LOSSES = ("grpo", "sapo", "dr_grpo")
NONFINITE_KEY = "optimizer/nonfinite_steps"  # logged: optimizer steps skipped for NaN/inf gradients so far
GAP_KEYS = ("sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max")  # TRL's names


def logprob_gap(train_logps: torch.Tensor, sampler_logps: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(mean, max) of |training-forward log-prob - sampler log-prob| in nats over the tokens where ``mask`` is
    non-zero ([B, T] each), NaN sampler values left out as TRL does; None when no token is left."""
    delta = (train_logps.detach() - sampler_logps).abs()
    delta = delta[mask.bool() & ~torch.isnan(delta)]
    return None if delta.numel() == 0 else (delta.mean(), delta.max())


def left_out_loss_scale(loss_type: str, rows: int, accumulation: float, processes: int, kept_sequences: float,
                        local_tokens: float, micro_batch_tokens: float, kept_micro_batches: int) -> float:
    """The factor that turns TRL's loss of one process's micro-batch (left-out rows removed, ``rows`` rows left)
    into that process's share of the objective in which left-out samples count in no normaliser.

    DDP / ZeRO averages gradients over ``processes``; ``accumulation`` is TRL's own divisor (gradient
    accumulation steps in training, 1 in evaluation). Per loss type, the objective of an optimizer step is

    * grpo, sapo: the mean over kept sequences of the generation batch (``kept_sequences``, all processes)
      of each sequence's token mean; dr_grpo: the same with ``max_completion_length`` for every sequence's
      token count. TRL divides by the micro-batch's row count instead.
    * bnpo: in each micro-batch, the token mean over the kept tokens of all processes (``micro_batch_tokens``;
      TRL divides by this process's ``local_tokens``), averaged over the micro-batches of the step that keep
      at least one token (``kept_micro_batches``; TRL divides by all of them).
    * dapo, cispo: TRL's token mean over ``num_items_in_batch``, which the trainer sets to the kept tokens of
      the generation batch: factor 1.
    """
    if loss_type in SEQUENCE_AVERAGED_LOSSES:
        return rows * accumulation * processes / max(kept_sequences, 1.0)
    if loss_type == "bnpo":
        return max(local_tokens, 1.0) * accumulation * processes / (
            max(micro_batch_tokens, 1.0) * max(kept_micro_batches, 1))
    return 1.0


def _loss_mask(batch: dict[str, Any]) -> torch.Tensor:
    """The token mask TRL's loss uses: the completion mask, times the tool mask where there is one."""
    mask = batch["completion_mask"]
    return mask * batch["tool_mask"] if "tool_mask" in batch else mask


class ChartRLTrainer(GRPOTrainer):
    """GRPOTrainer whose ``mode`` picks the objective (grpo, psr, nsr, w-reinforce, passk)."""

    def __init__(self, *args: Any, mode: str = "grpo", lambda_psr: float = 0.1, reward_threshold: float = 0.5,
                 correctness_from: str = "accuracy", rollout_engine: str = "stock", passk_k: int = 4,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # transformers 5's Trainer sets model.config.use_cache = args.use_cache (False) for training, and TRL's
        # generation config leaves use_cache unset, so stock generation would recompute every prefix token at
        # every step (12x slower on the smoke preset). Rollouts keep their KV cache.
        if getattr(self, "generation_config", None) is not None:
            self.generation_config.use_cache = True
        self.mode = mode
        self.lambda_psr = lambda_psr
        self.passk_k = passk_k
        self.reward_threshold = reward_threshold
        self.correctness_from = correctness_from
        self.rollout_engine = rollout_engine
        self._fast_rollouts: bool | None = None  # decided at the first generation
        self._forward_logps: torch.Tensor | None = None  # the last _get_per_token_logps_and_entropies result
        self._skip_optimizer_step = False
        self.nonfinite_steps = 0  # optimizer steps skipped for NaN/inf gradients
        self._nonfinite_counted_history = False
        self._last_rewards_per_func: torch.Tensor | None = None
        if mode != "grpo" and self.args.steps_per_generation != self.args.gradient_accumulation_steps:
            raise ValueError(f"mode {mode} needs steps_per_generation == gradient_accumulation_steps (one generation "
                             "batch per optimizer step: the normalisers of kept samples span it)")
        if correctness_from == "accuracy" and "accuracy_reward" not in self.reward_func_names:
            raise ValueError("correctness_from=accuracy needs a reward function named accuracy_reward; "
                             f"got {self.reward_func_names}")

    # -- rollouts ------------------------------------------------------------------------------
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if self._use_fast_rollouts():
            from .rollout import trainer_generate

            return trainer_generate(self, prompt_ids, multimodal_fields, num_generations)
        return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                             has_tool_images)

    def _use_fast_rollouts(self) -> bool:
        """auto: the fast engine where it can run (else stock, saying why once); fast: required; else stock.
        auto falling back to stock with the importance-sampling correction on is an error (stock has no sampler
        log-probabilities; RunConfig refuses rollout_engine stock with the correction before any work)."""
        if self._fast_rollouts is None:
            self._fast_rollouts = False
            if self.rollout_engine in ("auto", "fast"):
                from .rollout import trainer_rollout_unavailable_reason

                reason = trainer_rollout_unavailable_reason(self)
                if reason is not None and self.rollout_engine == "fast":
                    raise RuntimeError(f"rollout_engine 'fast' cannot run here: {reason}")
                if reason is not None and self.vllm_importance_sampling_correction:
                    raise RuntimeError(f"importance_sampling_correction is on, but the fast rollout engine cannot "
                                       f"run here ({reason}) and TRL's stock generate returns no sampler "
                                       "log-probabilities; set importance_sampling_correction: off")
                if reason is not None:
                    log.warning("fast rollout engine off (%s); training uses TRL's generate", reason)
                self._fast_rollouts = reason is None
        return self._fast_rollouts

    @property
    def use_vllm(self) -> bool:
        """TRL's switch for its vLLM-only steps; also True while the fast engine generates with the importance-
        sampling correction on, so that TRL computes the ratio from the engine's log-probabilities, applies it to
        the loss and logs it, with its own code."""
        return getattr(self, "_use_vllm", False) or bool(
            getattr(self, "_fast_rollouts", None) and getattr(self, "vllm_importance_sampling_correction", False))

    @use_vllm.setter
    def use_vllm(self, value: bool) -> None:  # TRL's __init__ sets it from args.use_vllm
        self._use_vllm = bool(value)

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        result = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        self._forward_logps = result[0]
        return result

    def _trl_loss(self, model, inputs):
        """TRL's loss of a micro-batch. With sampler log-probabilities and TRL's correction off (TRL then logs no
        gap), logs :func:`logprob_gap` of this training forward under TRL's gap keys (per micro-batch, averaged
        over the logging window as TRL's metrics are)."""
        self._forward_logps = None
        loss = super()._compute_loss(model, inputs)
        sampler = inputs.get("sampling_per_token_logps")
        if sampler is not None and not self.vllm_importance_sampling_correction and self._forward_logps is not None:
            gap = logprob_gap(self._forward_logps, sampler, _loss_mask(inputs))
            if gap is not None:
                metrics = self._metrics["train" if self.model.training else "eval"]
                metrics[GAP_KEYS[0]].append(self.accelerator.gather(gap[0]).mean().item())
                metrics[GAP_KEYS[1]].append(self.accelerator.gather(gap[1]).max().item())
        return loss

    # -- rewards -> correctness -> advantages ------------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._last_rewards_per_func = rewards_per_func  # gathered over processes, (N_global, n_funcs)
        return rewards_per_func

    def correctness(self, rewards_per_func: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weighted total reward, correctness bit) per sample, from the gathered rewards."""
        weights = self.reward_weights.to(rewards_per_func.device)
        total = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
        if self.correctness_from == "total":
            return total, total >= self.reward_threshold
        accuracy = torch.nan_to_num(rewards_per_func[:, self.reward_func_names.index("accuracy_reward")], nan=0.0)
        return total, accuracy >= self.reward_threshold

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        train = self.model.training
        num_generations = self.num_generations if train else self.num_generations_eval
        total, correct = self.correctness(self._last_rewards_per_func)
        advantages, keep = compute_advantages(self.mode, total, correct, num_generations, self.lambda_psr, self.passk_k)
        self._log_mode_statistics(correct, keep, total, train)
        if self.mode == "grpo":
            return output
        local = slice(self.accelerator.process_index * len(inputs), (self.accelerator.process_index + 1) * len(inputs))
        keep_local = keep[local].to(output["completion_mask"].device)
        output["advantages"] = advantages[local].to(output["advantages"].device)
        output["completion_mask"] = output["completion_mask"] * keep_local.unsqueeze(1).to(
            output["completion_mask"].dtype)
        mask = output["completion_mask"] if "tool_mask" not in output else \
            output["completion_mask"] * output["tool_mask"]
        output["num_items_in_batch"] = self.accelerator.gather(mask.sum()).sum()
        output["num_kept_sequences"] = keep.sum().to(output["completion_mask"].device)
        if train:  # holds until the next generation batch, i.e. for every optimizer step it feeds
            self._skip_optimizer_step = not bool(keep.any())
        return output

    def _compute_loss(self, model, inputs):
        if self.mode == "grpo":
            return self._trl_loss(model, inputs)
        counts = self._kept_counts(inputs)
        rows = max(int(counts[:, 0].max()), 1)
        inputs = without_left_out_rows(inputs, rows)
        loss = self._trl_loss(model, inputs)
        scale = left_out_loss_scale(
            self.loss_type, rows=inputs["completion_mask"].size(0),
            accumulation=self.current_gradient_accumulation_steps if self.model.training else 1.0,
            processes=self.accelerator.num_processes, kept_sequences=float(inputs["num_kept_sequences"]),
            local_tokens=float(counts[self.accelerator.process_index, 1]),
            micro_batch_tokens=float(counts[:, 1].sum()), kept_micro_batches=int((counts[:, 2:].sum(dim=0) > 0).sum()))
        return loss * scale

    def _kept_counts(self, inputs) -> torch.Tensor:
        """(processes, 2 + W) float tensor, one collective: per process, the kept rows and kept tokens of this
        micro-batch, then the kept tokens of each of the W micro-batches of the optimizer step (in training
        TRL's buffer of the generation batch, which is the step's micro-batches since steps_per_generation =
        gradient_accumulation_steps; in evaluation the batch itself)."""
        window = self._buffered_inputs if self.model.training else [inputs]
        mask = _loss_mask(inputs)
        local = [(inputs["completion_mask"].sum(dim=1) > 0).sum(), mask.sum()]
        local += [_loss_mask(batch).sum().to(mask.device) for batch in window]
        return self.accelerator.gather(torch.stack(local).float().unsqueeze(0)).cpu()

    # -- empty steps are no-ops -------------------------------------------------------------
    def create_optimizer(self, model=None):
        """The Trainer's optimizer, whose ``step`` does nothing while the current generation batch keeps no
        sample. DeepSpeed wraps this same optimizer and calls its ``step`` once per parameter sub-group,
        so every call of an empty step is skipped, not just the first."""
        optimizer = super().create_optimizer(model)
        if getattr(optimizer, "_chartrl_skippable", False):
            return optimizer
        step = optimizer.step
        params = [p for group in optimizer.param_groups for p in group["params"]]

        def step_unless_empty(*args: Any, **kwargs: Any):
            if self._skip_optimizer_step:
                return None
            if not gradients_are_finite(params):
                self._skip_nonfinite_step()
                return None
            return step(*args, **kwargs)

        optimizer.step = step_unless_empty
        optimizer._chartrl_skippable = True
        return optimizer

    def _skip_nonfinite_step(self) -> None:
        """A NaN or inf gradient (a NaN loss, a bf16/fp16 overflow) would make every weight NaN for the rest of
        the run: the step is skipped instead, said on the console and counted (``optimizer/nonfinite_steps``)."""
        self._count_nonfinite_before_this_process()
        self.nonfinite_steps += 1
        log.warning("step %d: non-finite gradients; optimizer step skipped (%d such steps so far)",
                    self.state.global_step + 1, self.nonfinite_steps)

    def _count_nonfinite_before_this_process(self) -> None:
        """A resumed run starts counting from what its loaded log history says (once, before this process logs)."""
        if self._nonfinite_counted_history:
            return
        self._nonfinite_counted_history = True
        self.nonfinite_steps += int(max((entry.get(NONFINITE_KEY, 0) for entry in self.state.log_history),
                                        default=0))

    # -- model card -----------------------------------------------------------------------------
    run_config: RunConfig | None = None  # set by build_trainer; the model card describes this run

    def create_model_card(self, model_name=None, dataset_name=None, tags=None) -> None:
        """The run's own card (mode, base model, settings) in place of TRL's, which says GRPO for every mode
        and links any base model, local or offline, to a Hub page."""
        if self.run_config is None:
            return super().create_model_card(model_name, dataset_name, tags)
        if self.is_world_process_zero():
            write_model_card(self.run_config, Path(self.args.output_dir))

    # -- logging ------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if torch.cuda.is_available():
            logs["memory/peak_gb"] = torch.cuda.max_memory_allocated() / 2**30  # this process's GPU, GiB
        self._count_nonfinite_before_this_process()
        if self.nonfinite_steps:
            logs[NONFINITE_KEY] = self.nonfinite_steps  # so far in this run, resumed parts included
        super().log(logs, start_time)

    def _log_mode_statistics(self, correct, keep, total, train: bool) -> None:
        split = "train" if train else "eval"
        stats = mode_statistics(self.mode, correct, keep, total)
        metrics = self._metrics[split]
        metrics["mode/kept_positive"].append(stats["kept_positive"])
        metrics["mode/kept_negative"].append(stats["kept_negative"])
        metrics["mode/empty_step"].append(stats["empty"])  # 0 or 1; a logging window logs the fraction
        metrics["mode/total_reward"].append(stats["total_reward"])
        metrics["mode/accuracy"].append(stats["accuracy"])


def gradients_are_finite(params) -> bool:
    """True when no parameter's gradient holds NaN or inf (one device sync; parameters without a gradient,
    e.g. partitioned by ZeRO-3, are not looked at)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def without_left_out_rows(batch: dict[str, Any], rows: int) -> dict[str, Any]:
    """The micro-batch cut to ``rows`` rows: every kept row (completion mask not all zero) and, as filler, the
    first left-out rows, in batch order, images included. ``rows`` must be at least the kept count.

    With several processes every process passes the largest kept count of all processes, so TRL's per-row
    gathers in ``_compute_loss`` see equal shapes. A filler row has an all-zero mask and adds nothing to any
    loss type's sum or token count; the normalisers that count rows are rescaled (:func:`left_out_loss_scale`).
    Padding to the largest count costs each process the rows of the slowest one, which the gradient
    all-reduce waits for anyway; keeping every row instead would make all processes compute the whole
    micro-batch. One row always stays, so every process runs its forward and backward (DDP and ZeRO-3
    synchronise there). Per-row values are those that are not 0-dim, TRL's own convention.
    """
    kept = batch["completion_mask"].sum(dim=1) > 0
    if rows < int(kept.sum()) or rows < 1:
        raise ValueError(f"rows={rows} would drop kept rows (the micro-batch keeps {int(kept.sum())})")
    if rows >= kept.numel():
        return batch
    order = torch.argsort((~kept).int(), stable=True)  # kept rows first, then the left-out ones, each in order
    return select_rows(batch, order[:rows].sort().values)


def select_rows(batch: dict[str, Any], index: torch.Tensor) -> dict[str, Any]:
    """The rows ``index`` (1-D long tensor) of a TRL batch, images included; 0-dim values and None stay."""
    from trl.trainer.utils import split_pixel_values_by_grid, unsplit_pixel_values_by_grid

    positions = index.tolist()

    def pick(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return value[index.to(value.device)]
        if isinstance(value, list):
            return [value[i] for i in positions]
        return value

    return unsplit_pixel_values_by_grid({key: pick(value) for key, value in split_pixel_values_by_grid(batch).items()})


def format_log_line(mode: str, step: int, max_steps: int, logs: dict[str, Any], seconds_per_step: float) -> str:
    """One console line per logging step, e.g. ``NSR [step 10/40] loss 0.012 | reward 1.85 | accuracy 25% |
    kept 0 correct + 3.5 incorrect per batch | 0% empty steps | 2.10 s/step, ETA 0:01:03``. Rewards and
    kept counts are means over the logging window; missing values are left out."""
    parts = []
    if "loss" in logs:
        parts.append(f"loss {logs['loss']:.4g}")
    if "reward" in logs:
        parts.append(f"reward {logs['reward']:.2f}")
    if "mode/accuracy" in logs:
        parts.append(f"accuracy {logs['mode/accuracy']:.0%}")
    if "mode/kept_positive" in logs and "mode/kept_negative" in logs:
        parts.append(f"kept {logs['mode/kept_positive']:.3g} correct + {logs['mode/kept_negative']:.3g} incorrect "
                     "per batch")
    if "mode/empty_step" in logs:
        parts.append(f"{logs['mode/empty_step']:.0%} empty steps")
    if logs.get(NONFINITE_KEY):
        parts.append(f"{logs[NONFINITE_KEY]:.0f} non-finite steps skipped")
    remaining = max(max_steps - step, 0) * seconds_per_step
    parts.append(f"{seconds_per_step:.2f} s/step, ETA {_hms(remaining)}")
    return f"{mode.upper()} [step {step}/{max_steps}] " + " | ".join(parts)


class StepLineCallback(TrainerCallback):
    """Prints the step range before training and :func:`format_log_line` at each logging step (once per
    step: the end-of-training summary log at the same step prints nothing)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.start: float | None = None
        self.start_step = 0
        self.printed_step: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.start_step = time.monotonic(), state.global_step
        if state.is_world_process_zero:
            print(f"Training: steps {state.global_step} -> {state.max_steps}", flush=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        done = state.global_step - self.start_step
        if not state.is_world_process_zero or self.start is None or done <= 0 \
                or state.global_step == self.printed_step or "train_runtime" in (logs or {}):
            return
        self.printed_step = state.global_step
        per_step = (time.monotonic() - self.start) / done
        from tqdm import tqdm  # writes above a running terminal bar instead of through it

        tqdm.write(format_log_line(self.mode, state.global_step, state.max_steps, logs or {}, per_step))


class CollapseWarningCallback(TrainerCallback):
    """Prints one warning line, once per training session, when :func:`nbhelpers.collapse.detect_collapse` finds a
    policy collapse in the log history (naming the step and the statistic)."""

    def __init__(self) -> None:
        self.warned = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        from .collapse import detect_collapse

        if self.warned or not state.is_world_process_zero:
            return
        event = detect_collapse(state.log_history)
        if event is not None:
            self.warned = True
            log.warning("%s", event.message())


class TensorBoardNumbers(TensorBoardCallback):
    """TensorBoard logging without the values TRL logs as None (a metric with no valid value in the
    window, such as clip_ratio/low_min of a psr step with no kept token), which a scalar cannot hold."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        numbers = {key: value for key, value in (logs or {}).items() if value is not None}
        return super().on_log(args, state, control, logs=numbers, **kwargs)


class QuietProgressCallback(ProgressCallback):
    """transformers' terminal progress bar without its raw log dict (StepLineCallback prints a readable line)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return None


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# ------------------------------------------------------------------------------------------ construction
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
    from .rewards import reward_weights

    return GRPOConfig(
        output_dir=str(run_dir), seed=cfg.seed, data_seed=cfg.seed,
        full_determinism=cfg.full_determinism,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length,
        num_train_epochs=cfg.num_epochs, max_steps=cfg.max_steps, learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type, warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm, loss_type=cfg.loss_type, beta=cfg.beta,
        epsilon_high=resolved_epsilon_high(cfg),
        temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, reward_weights=reward_weights(reward_settings(cfg)),
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


def reward_settings(cfg: RunConfig):
    """The rewards' settings (weights, length window, embedding model, verbosity) of a RunConfig."""
    from .rewards import RewardSettings

    return RewardSettings(weights=_reward_weight_names(cfg.reward_weights),
                          length_window_words=tuple(int(v) for v in cfg.length_window),
                          embedding_model=cfg.embedding_model, verbose=cfg.verbose_rewards)


def build_reward_functions(cfg: RunConfig) -> list:
    from .rewards import build_reward_funcs

    return build_reward_funcs(reward_settings(cfg))


def check_environment(cfg: RunConfig) -> None:
    """Fail before any work when the configuration needs a package this machine lacks."""
    if cfg.rollout_engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError("key 'rollout_engine' is vllm but the vllm package is not installed "
                          "(pip install vllm, or use rollout_engine: auto)")


def build_trainer(cfg: RunConfig, run_dir: Path | None = None, callbacks: list | None = None,
                  model=None, processor=None, train_dataset=None) -> ChartRLTrainer:
    """Everything a training run needs, from a validated configuration (model/data injectable for tests)."""
    from accelerate import PartialState

    from . import data, models
    from .platform import detect_platform, resolve_dtype

    check_environment(cfg)
    platform = detect_platform()
    dtype = resolve_dtype(cfg.dtype, platform)
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
        model = models.load_model(cfg.vlm_name, models.torch_dtype(dtype), device=device,
                                  attn_implementation=cfg.attn_implementation)
    peft_config = models.lora_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules) \
        if cfg.finetune == "lora" else None
    use_cpu = not torch.cuda.is_available()
    deepspeed_file = _in_process_deepspeed_file(cfg, use_cpu)
    args = grpo_config(cfg, run_dir, dtype, use_cpu, deepspeed_file)
    all_callbacks = [StepLineCallback(cfg.mode), CollapseWarningCallback(), *(callbacks or [])]
    if "tensorboard" in cfg.report_to and PartialState().is_main_process:
        from torch.utils.tensorboard import SummaryWriter

        all_callbacks.append(TensorBoardNumbers(tb_writer=SummaryWriter(log_dir=str(run_dir / "logs"))))
    trainer = ChartRLTrainer(
        model=model, reward_funcs=build_reward_functions(cfg), args=args, train_dataset=train_dataset,
        processing_class=processor, peft_config=peft_config, callbacks=all_callbacks,
        mode=cfg.mode, lambda_psr=cfg.lambda_psr, passk_k=cfg.passk_k, reward_threshold=cfg.reward_threshold,
        correctness_from=cfg.correctness_from, rollout_engine=cfg.rollout_engine)
    trainer.run_config = cfg
    if trainer.pop_callback(ProgressCallback) is not None:  # the terminal bar (a notebook's shows a table)
        trainer.add_callback(QuietProgressCallback)
    return trainer


def _in_process_deepspeed_file(cfg: RunConfig, use_cpu: bool) -> str | None:
    """The DeepSpeed JSON for a run started in-process; under ``accelerate launch`` its config file rules."""
    from .platform import deepspeed_config_path, resolve_deepspeed

    if resolve_deepspeed(cfg.deepspeed, cfg.finetune)[0] != "zero3" or use_cpu or \
            os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        return None
    if importlib.util.find_spec("deepspeed") is None:
        log.warning("deepspeed: zero3 asked for but the deepspeed package is not installed; training without it")
        return None
    return str(deepspeed_config_path())


def persistent_store(cfg: RunConfig) -> Path | None:
    """The run's folder in the persistent store, or None when persistence is off."""
    from .platform import detect_platform

    root = cfg.persistent_root
    if root in (None, "none", ""):
        return None
    if root == "auto":
        root = detect_platform().persistent_root
        if root is None:
            return None
    return Path(root) / cfg.resolved_run_name()


def finalize_from_checkpoint(checkpoint: Path, run_dir: Path, cfg: RunConfig) -> Path:
    """final/ and trainer_state.json of a run whose last checkpoint is complete but whose final save was lost."""
    from .sync import FINAL_NAME, RESUME_ONLY_FILES, checkpoint_step, partial_folder, publish

    step = checkpoint_step(checkpoint)
    tmp = partial_folder(run_dir / FINAL_NAME, tag=str(step))
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint, tmp, ignore=shutil.ignore_patterns(*RESUME_ONLY_FILES, "global_step*"))
    write_model_card(cfg, tmp)
    shutil.copy2(checkpoint / "trainer_state.json", run_dir / "trainer_state.json")
    return publish(tmp, run_dir / FINAL_NAME, step)


def write_model_card(cfg: RunConfig, folder: Path) -> Path:
    """``folder/README.md``: the run's own model card (:func:`nbhelpers.model_card.model_card`)."""
    from .model_card import model_card

    path = Path(folder) / "README.md"
    path.write_text(model_card(cfg), encoding="utf-8")
    return path


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
    from .config import load_resolved_config

    try:
        return load_resolved_config(run_dir / "config.yaml")
    except ConfigError:
        return fallback


def _write_summary(run_dir: Path) -> None:
    from . import monitor

    summary = monitor.summarize_run(monitor.read_run(run_dir), run_dir.name)
    print(monitor.format_summary(summary), flush=True)
    monitor.write_summary(summary, run_dir)


def check_run_identity(cfg: RunConfig) -> None:
    """Refuse (ProvenanceError, one line) when the run folder, or its persistent-store folder, holds a model
    trained with other training-relevant settings; nothing is read or written beyond the two config.yaml."""
    from .provenance import check_run_folder

    check_run_folder(cfg, cfg.run_dir())
    store = persistent_store(cfg)
    if store is not None:
        check_run_folder(cfg, store, where="persistent store folder")


def train(cfg: RunConfig, **build_kwargs: Any) -> Path:
    """Train (resuming from the newest complete checkpoint), save the final adapter/model; return the run folder.

    No file an earlier run wrote is changed before the run's identity is checked and model and data are
    loaded (only a checkpoint restored from the store is added), so a refused or failed start leaves them as
    they were. With a persistent store, every complete local
    checkpoint and final/ the store lacks is copied at the start and at the end."""
    from accelerate import PartialState

    from .sync import (FINAL_NAME, CheckpointSync, CheckpointSyncCallback, checkpoint_finished, find_resume_checkpoint,
                       partial_folder, publish, restore_newest)

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
            write_model_card(cfg, tmp)
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


__all__ = ["ChartRLTrainer", "StepLineCallback", "format_log_line", "build_trainer", "check_run_identity",
           "grpo_config", "train", "persistent_store", "SEQUENCE_AVERAGED_LOSSES", "left_out_loss_scale",
           "select_rows", "without_left_out_rows", "logprob_gap", "GAP_KEYS", "CollapseWarningCallback"]
