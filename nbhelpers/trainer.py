"""The training objective: TRL's GRPOTrainer with the five modes' advantages and loss.

:mod:`nbhelpers.training_setup` builds a ``ChartRLTrainer`` from a RunConfig and :mod:`nbhelpers.training_run`
runs it (resume, final/, persistence). ``ChartRLTrainer`` changes TRL by small overrides and copies none of its
long methods:

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
* ``log`` adds the process's peak GPU memory;
* ``create_model_card`` writes the run's own card (:mod:`nbhelpers.model_card`).

``mode: grpo`` runs TRL's GRPO unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from trl import GRPOTrainer
from trl.trainer.utils import split_pixel_values_by_grid, unsplit_pixel_values_by_grid

from .model_card import write_model_card
from .objectives import compute_advantages, correctness, mode_statistics
from .rollout import resolve_engine, trainer_generate, trainer_rollout_unavailable_reason

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
                 model_card: str | None = None, **kwargs: Any) -> None:
        """TRL's arguments, then the objective's settings (RunConfig's keys of the same names) and the run's
        model card text (:func:`nbhelpers.model_card.model_card`; None: TRL's card)."""
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
        self.model_card_text = model_card
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
            return trainer_generate(self, prompt_ids, multimodal_fields)
        return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                             has_tool_images)

    def _use_fast_rollouts(self) -> bool:
        """Whether the fast engine generates, decided once (:func:`nbhelpers.rollout.resolve_engine`): auto uses it
        where it can run (else stock, saying why once); fast requires it; auto falling back to stock with the
        importance-sampling correction on is an error (stock has no sampler log-probabilities; RunConfig refuses
        rollout_engine stock with the correction before any work)."""
        if self._fast_rollouts is None:
            self._fast_rollouts = resolve_engine(
                self.rollout_engine, self, unavailable_reason=trainer_rollout_unavailable_reason,
                needs_logprobs=self.vllm_importance_sampling_correction) == "fast"
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

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        train = self.model.training
        num_generations = self.num_generations if train else self.num_generations_eval
        accuracy = None if self.correctness_from == "total" else self.reward_func_names.index("accuracy_reward")
        total, correct = correctness(self._last_rewards_per_func, self.reward_weights, self.reward_threshold, accuracy)
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
    def create_model_card(self, model_name=None, dataset_name=None, tags=None) -> None:
        """The run's own card (mode, base model, settings) in place of TRL's, which says GRPO for every mode
        and links any base model, local or offline, to a Hub page."""
        if self.model_card_text is None:
            return super().create_model_card(model_name, dataset_name, tags)
        if self.is_world_process_zero():
            write_model_card(self.model_card_text, Path(self.args.output_dir))

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
    positions = index.tolist()

    def pick(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return value[index.to(value.device)]
        if isinstance(value, list):
            return [value[i] for i in positions]
        return value

    return unsplit_pixel_values_by_grid({key: pick(value) for key, value in split_pixel_values_by_grid(batch).items()})


__all__ = ["ChartRLTrainer", "GAP_KEYS", "NONFINITE_KEY", "SEQUENCE_AVERAGED_LOSSES", "gradients_are_finite",
           "left_out_loss_scale", "logprob_gap", "select_rows", "without_left_out_rows"]
