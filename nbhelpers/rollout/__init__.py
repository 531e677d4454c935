"""Rollouts for GRPO training and Pass@k sampling: the fast engine, stock ``generate`` and the optional vLLM path.

Modules: :mod:`.engine` (the engine: prefill, continuous batching, CUDA graphs), :mod:`.kernels` (the decode
step's math and Triton attention), :mod:`.logits` (HF-equivalent sampling, seeded noise), :mod:`.weights`
(projection weights with LoRA merged or cast; bf16/fp16 compute copies of fp32 master weights), :mod:`.dispatch`
(choosing a path; streams of problems), :mod:`.trainer` (the TRL hook), :mod:`.vllm`, :mod:`.notices` (one-time
warnings, environment switches).
"""

from .dispatch import (cached_engine, engine_choice, halved_after_oom, resolve_engine, sample_completions,
                       sample_problems, stock_generate)
from .engine import (Request, RolloutEngine, base_model, engine_unavailable_reason, model_unsupported_reason)
from .kernels import attention_bias, shared_prefix_attention, triton_decode_attention
from .logits import (gumbel_max_sample, make_warpers, process_logits, sample_key, seeded_gumbel_sample,
                     token_logprobs, truncate_at_eos)
from .notices import FALLBACK_ENV, WEIGHTS_ENV
from .trainer import (group_consecutive, rollout_model, split_prompts, trainer_generate,
                      trainer_rollout_unavailable_reason)
from .vllm import collapse_image_pads, vllm_sample
from .weights import ComputeCopies, DecodeWeights, merged_weight

__all__ = ["FALLBACK_ENV", "WEIGHTS_ENV", "ComputeCopies", "DecodeWeights", "Request", "RolloutEngine",
           "attention_bias", "base_model", "cached_engine", "collapse_image_pads", "engine_choice",
           "engine_unavailable_reason", "group_consecutive", "gumbel_max_sample", "halved_after_oom", "make_warpers",
           "merged_weight", "model_unsupported_reason", "process_logits", "resolve_engine", "rollout_model",
           "sample_completions", "sample_key", "sample_problems", "seeded_gumbel_sample", "shared_prefix_attention",
           "split_prompts", "stock_generate", "token_logprobs", "trainer_generate",
           "trainer_rollout_unavailable_reason", "triton_decode_attention", "truncate_at_eos", "vllm_sample"]
