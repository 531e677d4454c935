"""Choosing a generation path: the fast engine, stock ``generate`` or vLLM, for one prompt or a stream of problems."""

from __future__ import annotations

import weakref
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from ..config import ROLLOUT_ENGINES
from .engine import Request, RolloutEngine, engine_unavailable_reason
from .logits import truncate_at_eos
from .notices import log, warn_once
from .vllm import vllm_sample


def stock_generate(model, prompt_inputs: dict, n: int, *, max_new_tokens: int, temperature: float, top_p: float,
                   eos_token_ids: Sequence[int], pad_token_id: int, top_k: int | None = None,
                   min_new_tokens: int = 0, suppress_token_ids: Sequence[int] = ()) -> list[list[int]]:
    """Stock ``model.generate(num_return_sequences=n)``, cut after each row's first EOS.

    top_k and repetition_penalty are passed explicitly (off unless given), so a checkpoint's own
    generation_config (Qwen2.5-VL-Instruct ships top_k=1, repetition_penalty=1.05) cannot change them.
    """
    device = next(model.parameters()).device
    inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in prompt_inputs.items()}
    kwargs: dict[str, Any] = dict(num_return_sequences=n, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                  eos_token_id=list(eos_token_ids), pad_token_id=pad_token_id, top_k=top_k or 0,
                                  top_p=top_p, repetition_penalty=1.0)
    if temperature > 0:
        kwargs["temperature"] = temperature
    if min_new_tokens:
        kwargs["min_new_tokens"] = min_new_tokens
    if suppress_token_ids:
        kwargs["suppress_tokens"] = list(suppress_token_ids)
    with torch.no_grad():
        out = model.generate(**inputs, **kwargs)
    return truncate_at_eos(out[:, inputs["input_ids"].shape[1]:].tolist(), eos_token_ids)


_engines: "weakref.WeakKeyDictionary[Any, RolloutEngine]" = weakref.WeakKeyDictionary()


def engine_choice(engine: str, reason: str | None, needs_logprobs: bool = False) -> str:
    """The generation path of ``rollout_engine`` ``engine`` when the fast engine cannot run for ``reason`` (None: it
    can): stock and vllm as asked; fast where it can run, else RuntimeError naming why; auto: fast where it can run,
    else stock. ``needs_logprobs``: the caller corrects with the sampler's log-probabilities (importance sampling),
    which stock generate does not return, so auto cannot fall back."""
    if engine not in ROLLOUT_ENGINES:
        raise ValueError(f"rollout engine must be one of {', '.join(ROLLOUT_ENGINES)}, got '{engine}'")
    if engine in ("stock", "vllm"):
        return engine
    if reason is None:
        return "fast"
    if engine == "fast":
        raise RuntimeError(f"rollout_engine 'fast' cannot run here: {reason}")
    if needs_logprobs:
        raise RuntimeError(f"importance_sampling_correction is on, but the fast rollout engine cannot run here "
                           f"({reason}) and TRL's stock generate returns no sampler log-probabilities; set "
                           "importance_sampling_correction: off")
    return "stock"


def resolve_engine(engine: str, model, *, unavailable_reason: Callable[[Any], str | None] = engine_unavailable_reason,
                   needs_logprobs: bool = False) -> str:
    """:func:`engine_choice` for ``model``, warning once with the reason when auto falls back to stock. ``model`` is
    what generates: a model, or a trainer with :func:`.trainer.trainer_rollout_unavailable_reason`."""
    reason = None if engine in ("stock", "vllm") else unavailable_reason(model)
    choice = engine_choice(engine, reason, needs_logprobs)
    if reason is not None and choice == "stock":
        warn_once(f"fast rollout engine off ({reason}); using stock generate")
    return choice


def halved_after_oom(size: int, error: BaseException, release: Callable[[], None] | None = None) -> int:
    """The rows to retry with after CUDA ran out of memory (``error``) at ``size`` rows: half of them, at least 1,
    once ``release`` (what the caller can free first) has run and the CUDA cache is emptied; ``error`` raised
    again when ``size`` is 1 already."""
    if size <= 1:
        raise error
    if release is not None:
        release()
    torch.cuda.empty_cache()
    return max(1, size // 2)


def cached_engine(model, **settings: Any) -> RolloutEngine:
    """One engine per model object, rebuilt when the generation settings change."""
    engine = _engines.get(model)
    if engine is None or any(engine.settings.get(k) != v for k, v in settings.items()):
        engine = RolloutEngine(model, **settings)
        _engines[model] = engine
    return engine


def sample_completions(model, prompt_inputs: dict, n: int, *, max_new_tokens: int, temperature: float, top_p: float,
                       eos_token_ids: Sequence[int], pad_token_id: int, engine: str = "auto",
                       generator: torch.Generator | None = None, top_k: int | None = None,
                       images: Sequence | None = None) -> list[list[int]]:
    """n completions (token ids, each ending at its first EOS) of one processed prompt.

    engine: 'auto' (fast where available, else stock), 'stock', 'fast' (error if unavailable) or 'vllm'
    (needs the vllm package and ``images``, the prompt's PIL images). ``generator`` seeds the fast
    engine only (it must live on the model's device); seed the stock path with torch.manual_seed.
    """
    choice = resolve_engine(engine, model)
    if choice == "vllm":
        return vllm_sample(model, prompt_inputs, n, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_p=top_p, top_k=top_k, eos_token_ids=eos_token_ids, images=images)
    if choice == "fast":
        fast = cached_engine(model, eos_token_ids=tuple(eos_token_ids), pad_token_id=pad_token_id,
                             max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
        return fast.generate(prompt_inputs, n, generator=generator)
    return stock_generate(model, prompt_inputs, n, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_p=top_p, top_k=top_k, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id)


def sample_problems(model, problems: Iterable[tuple[Any, dict, int]], n: int, *, rows: int, max_new_tokens: int,
                    temperature: float, top_p: float, eos_token_ids: Sequence[int], pad_token_id: int,
                    engine: str, one_problem: Callable[[dict, int], list[list[int]]]
                    ) -> Iterator[tuple[Any, int, list[list[int]]]]:
    """(key, seed, n completions) per problem of ``problems`` ((key, prompt_inputs, seed), read lazily), in the
    order problems finish.

    With the fast engine: continuous batching across problems, ``rows`` rows decoded at once (capped by
    memory); each sample draws from noise keyed by (problem seed, sample index), so a problem's completions
    are the same whatever else is in flight, alone or resumed. On CUDA out of memory the problems in flight
    start again with half the rows (same seeds, so the same completions). Otherwise each problem in turn
    through ``one_problem(prompt_inputs, seed)`` (the caller's stock path).
    """
    if resolve_engine(engine, model) != "fast":
        for key, inputs, seed in problems:
            yield key, seed, one_problem(inputs, seed)
        return
    fast = cached_engine(model, eos_token_ids=tuple(eos_token_ids), pad_token_id=pad_token_id,
                         max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=None)
    source = iter(problems)
    in_flight: dict[Any, Request] = {}
    retry: list[Request] = []

    def requests() -> Iterator[Request]:
        while retry:
            yield retry.pop(0)
        for key, inputs, seed in source:
            request = Request(key, inputs, n, seed)
            in_flight[key] = request
            yield request

    while True:
        try:
            for key, completions in fast.generate_stream(requests(), rows=rows):
                request = in_flight.pop(key)
                yield key, request.seed, completions
            return
        except torch.cuda.OutOfMemoryError as error:
            rows = halved_after_oom(rows, error, release=fast.drop_graphs)
            retry[:] = list(in_flight.values())
            log.warning("CUDA out of memory while sampling: %d rows at once, %d problems start again", rows,
                        len(retry))
