"""RolloutEngine: sampled completions of many prompts, decoded together at about one pass over the weights per step.

Stock ``model.generate(num_return_sequences=n)`` encodes the image and the prompt n times and then pays about
100 ms of Python per decoding step. The engine instead

1. runs each prompt and image through the model's own forward once, with batch 1 (the prefill), and keeps
   that prompt's KV once, in one region of a prompt-KV buffer shared by all rows;
2. decodes a fixed set of rows together; each row is one sample of one prompt and reads that prompt's region
   plus its own completion KV (:mod:`.kernels`), inside a CUDA graph that serves every step;
3. continuous batching: when a row ends (EOS or the length limit) its slot takes the next sample, of the same
   prompt or the next one, so the decode batch stays full while work remains. Training passes all prompts of a
   generation batch at once (:meth:`RolloutEngine.generate_batch`); Pass@k sampling streams problems through
   (:meth:`RolloutEngine.generate_stream`);
4. projections through :class:`.weights.DecodeWeights` (LoRA adapters merged into engine-owned copies, or cast
   to the compute dtype, never changing the model's parameters), a Triton flash-decoding kernel for attention
   and torch.compile-fused norms, rotary embedding and activation;
5. samples as Hugging Face ``generate`` does (:mod:`.logits`). Requests with a seed draw from noise hashed from
   (seed, sample index, token index), so their completions do not depend on what else shares the batch;
6. on request (``logprobs=True``) returns each sampled token's log-probability under the float32 logits it was
   drawn from, divided by the temperature, over the whole vocabulary (:func:`.logits.token_logprobs`): what TRL's
   training forward recomputes, so the two differ only by the engine's arithmetic (kernels, dtype, no dropout).

Supported: Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``), plain or PEFT-wrapped; on CUDA with graphs and
fast kernels; on the CPU eagerly with plain PyTorch ops (about 1.8x stock ``generate`` there, whose per-step
overhead dominates small models). Where the fast kernels cannot run (no Triton, a
GPU too old for the dtype, a failed self-check, ``CHARTRL_ROLLOUT_FALLBACK=plain``) the engine says why once and
runs plain PyTorch ops in CUDA graphs.

CUDA graphs read parameters through their storage. Optimizer steps update weights in place, so graphs stay valid;
when a parameter's storage moves (``model.to``, DeepSpeed ZeRO-3 gathering, merging adapters) the engine notices at
the next run and captures again. Rollouts run in eval mode (LoRA dropout off), the policy being optimized; TRL's
stock path samples in train mode, with LoRA dropout active.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import torch

from . import kernels
from .logits import (column_keys, draw_tokens, gumbel_max_sample, make_warpers, process_logits, sample_key,
                     seeded_gumbel_sample, seeded_temperature_sample, token_logprobs, truncate_at_eos)
from .notices import FALLBACK_ENV, forced_fallback, log, warn_once
from .weights import DecodeWeights, choose_mode, memory_budget

SUPPORTED_MODEL_CLASSES = ("Qwen2_5_VLForConditionalGeneration",)
LENGTH_BUCKET = 64  # completion-KV slots per CUDA graph bucket (PyTorch attention)
PREFIX_BUCKET = 128  # prompt-KV regions are allocated in multiples of this
REFILL_INTERVAL = 8  # decode steps between host checks for finished rows
MAX_REGIONS = 16  # prompts resident at once in a stream

_compiled: dict[Any, Any] = {}  # function -> its torch.compile wrapper, or the function itself once compiling failed


# ------------------------------------------------------------------------------------------ availability
def base_model(model):
    """The Hugging Face model inside a PEFT wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_unsupported_reason(model) -> str | None:
    """None when the engine's code fits ``model`` (class, config, full weights) on any device."""
    base = base_model(model)
    name = type(base).__name__
    if name not in SUPPORTED_MODEL_CLASSES:
        return f"fast rollout engine supports {', '.join(SUPPORTED_MODEL_CLASSES)}, not {name}"
    if any(p.numel() == 0 for p in base.parameters()):
        return PARTITIONED_REASON
    return _text_config_reason(base.config.get_text_config())


PARTITIONED_REASON = "the fast rollout engine needs the full weights, and DeepSpeed ZeRO-3 partitions them"


def forced_off_reason() -> str | None:
    """Why the environment turns the engine off (``CHARTRL_ROLLOUT_FALLBACK=stock``), or None."""
    return f"{FALLBACK_ENV}=stock forces stock generation" if forced_fallback() == "stock" else None


def engine_unavailable_reason(model) -> str | None:
    """None when the fast engine can run on ``model`` (CUDA or the CPU, supported model, not forced off);
    otherwise why not."""
    if forced_off_reason() is not None:
        return forced_off_reason()
    reason = model_unsupported_reason(model)
    if reason is not None:
        return reason
    device = next(base_model(model).parameters()).device
    if device.type not in ("cuda", "cpu"):
        return f"fast rollout engine runs on CUDA or the CPU; the model is on {device.type}"
    return None


def _text_config_reason(cfg) -> str | None:
    rope_type = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type != "default":
        return f"fast rollout engine supports rope_type 'default', not '{rope_type}'"
    if "sliding_attention" in (getattr(cfg, "layer_types", None) or []):
        return "fast rollout engine does not support sliding-window attention layers"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"fast rollout engine supports hidden_act 'silu', not '{cfg.hidden_act}'"
    return None


@contextlib.contextmanager
def _eval_mode(model) -> Iterator[None]:
    """Every submodule in eval mode; each module's own flag restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


# ------------------------------------------------------------------------------------------ requests and state
@dataclass
class Request:
    """n completions of one prompt (processor output, batch 1). seed: draw from hashed noise keyed by
    (seed, sample index) (see :mod:`.logits`); lengths: forced completion lengths per sample, EOS put at the
    last position (a benchmark stand-in for a model that stops; None: stop at EOS)."""

    key: Any
    inputs: dict
    n: int
    seed: int | None = None
    lengths: Sequence[int] | None = None


@dataclass
class _Problem:
    request: Request
    region: int
    first: list[int]  # each sample's first token
    first_logps: list[float]  # and its log-probability (empty unless the run asked for log-probabilities)
    prefix_len: int
    rope_start: int
    next_sample: int = 0
    done: int = 0
    completions: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # per sample, one float per completion token (if asked for)


@dataclass
class _DecodeState:
    """Static buffers of one decode configuration (rows x completion slots x prompt regions); the CUDA graphs
    read every per-row input from here."""

    rows: int
    suffix_cap: int
    regions: int
    region_cap: int
    tokens: torch.Tensor  # [R] long: the token fed at this step
    step: torch.Tensor  # [R] long: completion slot written at this step
    rope_start: torch.Tensor  # [R] long: rope position of completion slot 0
    prefix_start: torch.Tensor  # [R] long: first prompt-KV slot of the row's prompt
    prefix_len: torch.Tensor  # [R] long
    cos: torch.Tensor  # [region_cap + suffix_cap, D] rope by position
    sin: torch.Tensor
    row_ids: torch.Tensor  # [R] long arange
    prefix_k: list[torch.Tensor]  # per layer [KV, regions * region_cap, D]
    prefix_v: list[torch.Tensor]
    suffix_k: list[torch.Tensor]  # per layer [R, KV, suffix_cap, D]
    suffix_v: list[torch.Tensor]
    graphs: dict[int, tuple[Any, torch.Tensor]] = field(default_factory=dict)


@dataclass
class _Run:
    """One stream's bookkeeping: host-side row assignment and the device-side per-row progress."""

    requests: Iterator[Request]
    generator: torch.Generator | None
    out: torch.Tensor  # [R, max_new + 1] long: tokens drawn per row
    generated: torch.Tensor  # [R] long: tokens drawn so far
    unfinished: torch.Tensor  # [R] bool
    stop_at: torch.Tensor  # [R] long: forced completion length (max_new + 1: none)
    key_a: torch.Tensor  # [R] int64 seeded-noise keys
    key_b: torch.Tensor
    logps: torch.Tensor  # [R, max_new + 1] float32: log-probability of each drawn token (if asked for)
    with_logprobs: bool
    row_sample: list  # per row: (problem, sample index) or None
    start_step: list[int]  # per row: the run's step count when the row was assigned
    free_rows: list[int]
    free_regions: list[int]
    pending: deque = field(default_factory=deque)
    ahead: Request | None = None
    exhausted: bool = False
    seeded: bool | None = None
    steps: int = 0
    finished: list = field(default_factory=list)


class RolloutEngine:
    """Sampled completions of prompts, decoded together from one prefill per prompt (see module docstring).

    temperature 0 means greedy. ``min_new_tokens`` (benchmarks only) keeps EOS out until that many tokens exist.
    ``suppress_token_ids`` are never sampled (TRL suppresses the image placeholder). ``use_cuda_graphs`` and
    ``fast_kernels`` default to True on CUDA. ``max_rows`` caps the rows decoded at once (default: what fits in
    free GPU memory). ``weights``: decode-weights mode (:mod:`.weights`; default: fused where memory allows).
    """

    def __init__(self, model, eos_token_ids: Sequence[int] | int, pad_token_id: int, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None, min_new_tokens: int = 0,
                 *, suppress_token_ids: Sequence[int] = (), use_cuda_graphs: bool | None = None,
                 fast_kernels: bool | None = None, max_rows: int | None = None, weights: str | None = None) -> None:
        reason = model_unsupported_reason(model)
        if reason is not None:
            raise ValueError(reason)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        self.model = model
        self.base = base_model(model)
        self.text = self.base.model.language_model
        self.layers = list(self.text.layers)
        cfg = self.base.config.get_text_config()
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.scaling = self.head_dim ** -0.5
        self.eos_token_ids = [int(eos_token_ids)] if isinstance(eos_token_ids, int) else [int(e) for e in eos_token_ids]
        self.pad_token_id = int(pad_token_id)
        self.max_new_tokens = int(max_new_tokens)
        self.min_new_tokens = int(min_new_tokens)
        self.temperature = float(temperature)
        self.greedy = self.temperature == 0
        self.warpers = make_warpers(self.temperature, top_k, top_p)
        self.suppress_token_ids = [int(t) for t in suppress_token_ids]
        embed = self.text.embed_tokens.weight
        self.device, self.dtype = embed.device, embed.dtype
        # built once: a host-to-device copy inside the decode loop would wait for the GPU at every step
        self._eos = torch.tensor(self.eos_token_ids, dtype=torch.long, device=self.device)
        self._suppress = torch.tensor(self.suppress_token_ids, dtype=torch.long, device=self.device) \
            if self.suppress_token_ids else None
        self.vocab = self.base.lm_head.out_features
        self._bias = torch.zeros(self.vocab, device=self.device)  # -inf on suppressed tokens
        if self._suppress is not None:
            self._bias[self._suppress] = -math.inf
        self._bias_min_new = self._bias.clone()  # and on EOS, while fewer than min_new_tokens exist
        self._bias_min_new[self._eos] = -math.inf
        on_cuda = self.device.type == "cuda"
        self.use_cuda_graphs = on_cuda if use_cuda_graphs is None else bool(use_cuda_graphs and on_cuda)
        want_fast = on_cuda if fast_kernels is None else bool(fast_kernels and on_cuda)
        self.fast_kernels_off_reason: str | None = None
        if want_fast:
            off = f"{FALLBACK_ENV}=plain" if forced_fallback() == "plain" else \
                kernels.fast_kernels_unavailable_reason(self.device, self.dtype)
            if off is not None:
                self.fast_kernels_off_reason = off
                warn_once(f"fast rollout engine: fast kernels off ({off}); using plain PyTorch ops"
                          f"{' in CUDA graphs' if self.use_cuda_graphs else ''}")
                want_fast = False
        self.fast_kernels = want_fast
        # temperature-only sampling uses the fused one-pass samplers (top-k/top-p keep HF's warpers)
        self._temperature_only = not self.greedy and not top_k and top_p >= 1.0
        self._columns = column_keys(self.vocab, self.device)  # per-token keys of the seeded noise
        self.max_rows = max_rows
        self._weights_request = weights
        self._weights: DecodeWeights | None = None
        self._out_dtype_ok = kernels.bmm_out_dtype_supported(self.device, self.dtype)
        self._ops = kernels.EagerOps()
        self._fast: kernels.EagerOps | None = None
        self._state: _DecodeState | None = None
        self._pool = None
        self._fingerprint: tuple | None = None
        self.kv_bytes_per_token = 2 * len(self.layers) * self.kv_heads * self.head_dim * embed.element_size()
        self.last_stats: dict[str, float] = {}
        self.graph_captures = 0
        self.settings = dict(eos_token_ids=tuple(self.eos_token_ids), pad_token_id=self.pad_token_id,
                             max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=float(top_p),
                             top_k=top_k or None, min_new_tokens=self.min_new_tokens,
                             suppress_token_ids=tuple(self.suppress_token_ids))

    # -- public ------------------------------------------------------------------------------
    def generate(self, prompt_inputs: dict, n: int, generator: torch.Generator | None = None,
                 seed: int | None = None) -> list[list[int]]:
        """n completions of one prompt (processor output with batch 1), each ending at its first EOS."""
        return self.generate_batch([(prompt_inputs, n)], generator=generator,
                                   seeds=None if seed is None else [seed])[0]

    def generate_batch(self, prompts: Sequence[tuple[dict, int]], generator: torch.Generator | None = None,
                       seeds: Sequence[int] | None = None, logprobs: bool = False):
        """Completions of several prompts in one engine run: [(prompt_inputs, n), ...] -> per prompt, n token
        lists. Every prompt's rows are decoded together (each prompt's KV stored once for its n rows).

        logprobs: return (completions, log-probabilities) instead, the latter per prompt n lists of one float per
        token (nats, :func:`.logits.token_logprobs`)."""
        if not prompts:
            return ([], []) if logprobs else []
        requests = [Request(i, inputs, n, None if seeds is None else seeds[i]) for i, (inputs, n) in enumerate(prompts)]
        for r in requests:
            self._validate(r)
        out: list = [None] * len(requests)
        logps: list = [None] * len(requests)
        longest = max(int(r.inputs["input_ids"].shape[1]) for r in requests)
        for key, completions, *lp in self.generate_stream(requests, rows=sum(r.n for r in requests),
                                                          regions=len(requests), generator=generator,
                                                          region_cap=longest, logprobs=logprobs):
            out[key] = completions
            logps[key] = lp[0] if lp else None
        return (out, logps) if logprobs else out

    def generate_stream(self, requests: Iterable[Request], *, rows: int | None = None, regions: int | None = None,
                        generator: torch.Generator | None = None, region_cap: int | None = None,
                        logprobs: bool = False) -> Iterator[tuple]:
        """(request key, its n completions) for each request as it finishes (continuous batching); with
        ``logprobs``, (key, completions, per completion one log-probability per token).

        rows: decode batch (capped by memory; default: the first request's n); regions: prompts resident at
        once (default: enough to keep the rows busy); requests are read lazily, as rows come free.
        """
        requests = iter(requests)
        first = next(requests, None)
        if first is None:
            return
        self._validate(first)
        prompt_len = int(first.inputs["input_ids"].shape[1])
        stats = {"prefill_s": 0.0, "decode_s": 0.0, "steps": 0, "tokens": 0, "busy_row_steps": 0, "prompts": 0}
        self.last_stats = stats
        with self._context():
            self._sync_weights()
            # spare regions let the next prompts start while the last samples of earlier ones finish
            regions = regions or min(MAX_REGIONS, 4 + 2 * math.ceil((rows or first.n) / first.n))
            rows = self._rows_that_fit(rows or first.n, max(prompt_len, region_cap or 0), regions)
            state = self._prepare_state(rows, regions, max(prompt_len, region_cap or 0))
            run = self._new_run(state, requests, generator, logprobs)
            run.ahead = first
        stats["rows"] = rows
        while True:
            with self._context():
                finished = self._advance(run, stats)
            for problem in finished:
                yield (problem.request.key, problem.completions, problem.logprobs) if logprobs else \
                    (problem.request.key, problem.completions)
            if not finished and self._idle(run):
                return

    def drop_graphs(self) -> None:
        """Forget captured graphs and decode buffers (they are rebuilt on the next run)."""
        self._state = None
        self._pool = None

    @property
    def weights_mode(self) -> str:
        """How projections are computed while decoding: fused, adapters or modules (see :mod:`.weights`)."""
        return self._decode_weights().mode

    @property
    def weight_copy_bytes(self) -> int:
        """Bytes of engine-owned decode weight copies (fused/merged copies, cast adapters)."""
        return self._decode_weights().copy_bytes()

    # -- run loop ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        with torch.no_grad(), _eval_mode(self.model):
            yield

    def _new_run(self, state: _DecodeState, requests: Iterator[Request], generator, logprobs: bool) -> _Run:
        rows, dev = state.rows, self.device
        return _Run(requests=requests, generator=generator, with_logprobs=logprobs,
                    logps=torch.zeros((rows, self.max_new_tokens + 1) if logprobs else (0, 0), device=dev),
                    out=torch.full((rows, self.max_new_tokens + 1), self.pad_token_id, dtype=torch.long, device=dev),
                    generated=torch.zeros(rows, dtype=torch.long, device=dev),
                    unfinished=torch.zeros(rows, dtype=torch.bool, device=dev),
                    stop_at=torch.full((rows,), self.max_new_tokens + 1, dtype=torch.long, device=dev),
                    key_a=torch.zeros(rows, dtype=torch.long, device=dev),
                    key_b=torch.zeros(rows, dtype=torch.long, device=dev),
                    row_sample=[None] * rows, start_step=[0] * rows, free_rows=list(range(rows - 1, -1, -1)),
                    free_regions=list(range(state.regions - 1, -1, -1)))

    def _idle(self, run: _Run) -> bool:
        return run.exhausted and run.ahead is None and not run.pending and all(s is None for s in run.row_sample)

    def _advance(self, run: _Run, stats: dict) -> list[_Problem]:
        """Harvest finished rows, refill free ones, and decode until some problem finishes or all work is done."""
        while True:
            self._harvest(run, stats)
            self._refill(run, stats)
            if run.finished:
                finished, run.finished = run.finished, []
                return finished
            busy = [r for r, s in enumerate(run.row_sample) if s is not None]
            if not busy:
                if self._idle(run):
                    return []
                if run.ahead is not None and not run.pending:  # a longer prompt waits for an empty engine
                    self._grow_regions(run, stats)
                    continue
                raise RuntimeError("rollout engine: rows are free but no work could be placed")  # pragma: no cover
            t0 = self._now()
            for _ in range(REFILL_INTERVAL):
                self._decode_step(run, busy)
            stats["decode_s"] += self._now() - t0
            stats["steps"] += REFILL_INTERVAL
            stats["busy_row_steps"] += REFILL_INTERVAL * len(busy)

    def _harvest(self, run: _Run, stats: dict) -> None:
        busy = [r for r, s in enumerate(run.row_sample) if s is not None]
        if not busy:
            return
        unfinished = run.unfinished.tolist()
        done = [r for r in busy if not unfinished[r]]
        if not done:
            return
        index = torch.tensor(done, device=self.device)
        lengths = run.generated[index].tolist()
        tokens = run.out[index].tolist()
        logps = run.logps[index].tolist() if run.with_logprobs else [None] * len(done)
        for r, length, row, row_logps in zip(done, lengths, tokens, logps):
            problem, sample = run.row_sample[r]
            run.row_sample[r] = None
            run.free_rows.append(r)
            completion = truncate_at_eos([row[:length]], self.eos_token_ids)[0]
            self._complete(run, problem, sample, completion, stats,
                           None if row_logps is None else row_logps[:len(completion)])

    def _complete(self, run: _Run, problem: _Problem, sample: int, tokens: list[int], stats: dict,
                  logps: list[float] | None = None) -> None:
        problem.completions[sample] = tokens
        if run.with_logprobs:
            problem.logprobs[sample] = logps
        problem.done += 1
        stats["tokens"] += len(tokens)
        if problem.done == problem.request.n:
            run.free_regions.append(problem.region)
            run.finished.append(problem)

    def _refill(self, run: _Run, stats: dict) -> None:
        """Give free rows the next samples (admitting new prompts into free regions as needed)."""
        assigned: list[tuple[int, _Problem, int]] = []
        while run.free_rows:
            while run.pending and run.pending[0].next_sample >= run.pending[0].request.n:
                run.pending.popleft()
            if not run.pending:
                if not self._admit(run, stats):
                    break
                continue
            problem = run.pending[0]
            sample = problem.next_sample
            problem.next_sample += 1
            token = problem.first[sample]
            length = self._forced_length(problem.request, sample)
            if length == 1:
                token = self.eos_token_ids[0]
            if token in self.eos_token_ids or self.max_new_tokens == 1:
                self._complete(run, problem, sample, [token], stats,
                               problem.first_logps[sample:sample + 1] if run.with_logprobs else None)
                continue
            row = run.free_rows.pop()
            run.row_sample[row] = (problem, sample)
            run.start_step[row] = run.steps
            assigned.append((row, problem, sample))
        if assigned:
            self._place(run, assigned)

    def _forced_length(self, request: Request, sample: int) -> int:
        return self.max_new_tokens + 1 if request.lengths is None else int(request.lengths[sample])

    def _place(self, run: _Run, assigned: list[tuple[int, _Problem, int]]) -> None:
        """Write the assigned rows' starting state (one small host-to-device copy)."""
        state = self._state
        table = []
        for row, problem, sample in assigned:
            key_a, key_b = sample_key(problem.request.seed, sample) if problem.request.seed is not None else (0, 0)
            table.append([row, problem.first[sample], problem.region * state.region_cap, problem.prefix_len,
                          problem.rope_start, self._forced_length(problem.request, sample), key_a, key_b])
        t = torch.tensor(table, dtype=torch.long).to(self.device)
        rows = t[:, 0]
        state.tokens[rows] = t[:, 1]
        state.step[rows] = 0
        state.prefix_start[rows] = t[:, 2]
        state.prefix_len[rows] = t[:, 3]
        state.rope_start[rows] = t[:, 4]
        run.out[rows, 0] = t[:, 1]
        run.generated[rows] = 1
        run.unfinished[rows] = True
        run.stop_at[rows] = t[:, 5]
        run.key_a[rows] = t[:, 6]
        run.key_b[rows] = t[:, 7]
        if run.with_logprobs:
            run.logps[rows, 0] = torch.tensor([problem.first_logps[sample] for _, problem, sample in assigned],
                                              device=self.device)

    def _admit(self, run: _Run, stats: dict) -> bool:
        """Prefill the next request into a free prompt region; False when none can be admitted now."""
        if run.ahead is None and not run.exhausted:
            run.ahead = next(run.requests, None)
            if run.ahead is None:
                run.exhausted = True
            else:
                self._validate(run.ahead)
        if run.ahead is None or not run.free_regions:
            return False
        request = run.ahead
        if int(request.inputs["input_ids"].shape[1]) > self._state.region_cap:
            return False  # waits until the engine is empty (see _grow_regions)
        seeded = request.seed is not None
        if run.seeded is None:
            run.seeded = seeded
        elif run.seeded != seeded:
            raise ValueError("rollout engine: requests of one run must all have seeds or none")
        run.ahead = None
        region = run.free_regions.pop()
        t0 = self._now()
        prefix, logits, scores, rope_start = self._prefill(request.inputs)
        state = self._state
        start = region * state.region_cap
        for (k, v), pk, pv in zip(prefix, state.prefix_k, state.prefix_v):
            pk[:, start:start + k.shape[1]].copy_(k)
            pv[:, start:start + v.shape[1]].copy_(v)
        first = self._first_tokens(scores, request, run.generator)
        first_logps = token_logprobs(logits, first, self.temperature).tolist() if run.with_logprobs else []
        stats["prefill_s"] += self._now() - t0
        stats["prompts"] += 1
        problem = _Problem(request=request, region=region, first=first.tolist(), first_logps=first_logps,
                           prefix_len=int(prefix[0][0].shape[1]), rope_start=rope_start,
                           completions=[None] * request.n, logprobs=[None] * request.n)
        run.pending.append(problem)
        return True

    def _grow_regions(self, run: _Run, stats: dict) -> None:
        """The engine is empty and the next prompt is longer than a region: reallocate with larger regions."""
        state = self._state
        need = int(run.ahead.inputs["input_ids"].shape[1])
        rows = self._rows_that_fit(state.rows, need, state.regions)
        self.drop_graphs()
        state = self._prepare_state(rows, state.regions, need)
        fresh = self._new_run(state, run.requests, run.generator, run.with_logprobs)
        fresh.ahead, fresh.exhausted, fresh.seeded, fresh.steps = run.ahead, run.exhausted, run.seeded, run.steps
        run.__dict__.update(fresh.__dict__)
        stats["rows"] = rows

    def _first_tokens(self, scores: torch.Tensor, request: Request, generator) -> torch.Tensor:
        """Each sample's first token from the prompt's processed scores [1, V]."""
        n = request.n
        if self.greedy:
            return scores.argmax(dim=-1).expand(n)
        if request.seed is not None:
            keys = torch.tensor([sample_key(request.seed, s) for s in range(n)], dtype=torch.long, device=self.device)
            zero = torch.zeros(n, dtype=torch.long, device=self.device)
            return seeded_gumbel_sample(scores.expand(n, -1), keys[:, 0], keys[:, 1], zero, self._columns)
        return draw_tokens(scores, n, False, generator)

    def _decode_step(self, run: _Run, busy: list[int]) -> None:
        state = self._state
        width = state.suffix_cap
        if not self._step_ops().triton_attention:  # PyTorch attention reads a fixed width: bucket it
            deepest = max(run.steps - run.start_step[r] for r in busy)
            width = self._bucket(min(deepest, state.suffix_cap - 1), state.suffix_cap)
        logits = self._run_step(state, width)
        token = self._sample(logits, run)
        token = torch.where(run.generated == run.stop_at - 1, self.eos_token_ids[0], token)
        token = torch.where(run.unfinished, token, self.pad_token_id)
        run.out[state.row_ids, run.generated] = token
        if run.with_logprobs:
            run.logps[state.row_ids, run.generated] = token_logprobs(logits, token, self.temperature)
        run.generated += run.unfinished
        run.unfinished &= ~torch.isin(token, self._eos) & (run.generated < self.max_new_tokens)
        state.tokens.copy_(token)
        state.step.copy_((run.generated - 1).clamp_(0, state.suffix_cap - 1))  # rows never used: 0
        run.steps += 1

    def _sample(self, logits: torch.Tensor, run: _Run) -> torch.Tensor:
        """Next token per row; ``run.generated`` is each row's index of the token being drawn."""
        generated = run.generated
        if self.greedy:
            return self._process(logits, generated).argmax(dim=-1)
        if self._temperature_only and self.fast_kernels and (run.seeded or run.generator is None):
            below = generated < self.min_new_tokens
            args = (logits, 1.0 / self.temperature, self._bias, self._bias_min_new, below)
            if run.seeded:
                return _compiled_call(seeded_temperature_sample, *args, run.key_a, run.key_b, generated,
                                      self._columns)
            return _compiled_call(gumbel_max_sample, *args)
        scores = self._process(logits, generated)
        if run.seeded:
            return seeded_gumbel_sample(scores, run.key_a, run.key_b, generated, self._columns)
        return draw_tokens(scores, scores.shape[0], False, run.generator)

    def _process(self, logits: torch.Tensor, generated) -> torch.Tensor:
        return process_logits(logits, generated=generated, min_new_tokens=self.min_new_tokens,
                              eos_token_ids=self._eos, suppress_token_ids=self._suppress, warpers=self.warpers)

    # -- prefill -----------------------------------------------------------------------------
    def _validate(self, request: Request) -> None:
        if request.n < 1:
            raise ValueError(f"n must be >= 1, got {request.n}")
        input_ids = request.inputs["input_ids"]
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"prompt_inputs['input_ids'] must have shape [1, L], got {tuple(input_ids.shape)}")
        if request.lengths is not None and (len(request.lengths) != request.n or min(request.lengths) < 1):
            raise ValueError("forced lengths need one length >= 1 per sample")

    def _prefill(self, prompt_inputs: dict):
        """Prompt + image through the model once: per-layer prompt K/V, the first token's logits [1, V] and its
        processed scores, rope start."""
        inputs = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in prompt_inputs.items()}
        input_ids = inputs.pop("input_ids")
        if inputs.get("attention_mask") is None:
            inputs["attention_mask"] = torch.ones_like(input_ids)
        position_ids = self.base._prepare_position_ids_for_generation(input_ids, dict(inputs))
        out = self.base(input_ids=input_ids, position_ids=position_ids, use_cache=True, logits_to_keep=1, **inputs)
        rope = position_ids[-3:, 0, -1]
        if not bool((rope == rope[0]).all()):
            raise ValueError("the prompt's last token has 3-D (vision) rope positions; it must be a text token")
        if not bool(torch.isfinite(out.logits[:, -1, :]).all()):  # multinomial would hit a device-side assert
            raise FloatingPointError(nonfinite_logits_message(self.model))
        cache = out.past_key_values
        prefix = [(layer.keys[0], layer.values[0]) for layer in cache.layers]  # [KV, P, D] each
        logits = out.logits[:, -1, :]
        return prefix, logits, self._process(logits, generated=0), int(rope[0]) + 1

    # -- buffers -----------------------------------------------------------------------------
    @staticmethod
    def _bucket(step: int, cap: int) -> int:
        return min((step // LENGTH_BUCKET + 1) * LENGTH_BUCKET, cap)

    def _rows_that_fit(self, rows: int, prompt_len: int, regions: int) -> int:
        """min(rows, max_rows, what fits in free GPU memory)."""
        if self.max_rows is not None:
            return max(1, min(rows, self.max_rows))
        if self.device.type != "cuda":
            return rows
        free, _ = memory_budget(self.device)
        state = self._state
        held = 0 if state is None else (state.rows * state.suffix_cap
                                        + state.regions * state.region_cap) * self.kv_bytes_per_token
        prefix_slots = regions * math.ceil(prompt_len / PREFIX_BUCKET) * PREFIX_BUCKET
        per_row = self.max_new_tokens * self.kv_bytes_per_token + 8 * 4 * self.vocab \
            + 16 * 4 * self.heads * (prefix_slots + self.max_new_tokens)
        limit = int((0.8 * (free + held) - prefix_slots * self.kv_bytes_per_token) / per_row)
        return max(1, min(rows, limit))

    def _prepare_state(self, rows: int, regions: int, prompt_len: int) -> _DecodeState:
        suffix_cap = max(1, self.max_new_tokens - 1)
        state = self._state
        if state is None or state.rows != rows or state.regions != regions or state.suffix_cap != suffix_cap \
                or state.region_cap < prompt_len:
            region_cap = max(1, math.ceil(prompt_len / PREFIX_BUCKET)) * PREFIX_BUCKET
            self._state = None  # free the old buffers before allocating new ones
            self._pool = None
            state = self._allocate(rows, suffix_cap, regions, region_cap)
            self._state = state
        state.prefix_start.zero_()
        state.prefix_len.fill_(1)  # rows never assigned attend to one slot: finite values, no NaN
        state.step.zero_()
        state.tokens.fill_(self.pad_token_id)
        return state

    def _allocate(self, rows: int, suffix_cap: int, regions: int, region_cap: int) -> _DecodeState:
        kw = dict(device=self.device, dtype=self.dtype)
        n_layers = len(self.layers)
        slots = regions * region_cap
        positions = torch.arange(region_cap + suffix_cap, device=self.device)
        cos, sin = self.text.rotary_emb(torch.zeros(1, **kw), positions.view(1, 1, -1))
        longs = dict(dtype=torch.long, device=self.device)
        return _DecodeState(
            rows=rows, suffix_cap=suffix_cap, regions=regions, region_cap=region_cap,
            tokens=torch.zeros(rows, **longs), step=torch.zeros(rows, **longs),
            rope_start=torch.zeros(rows, **longs), prefix_start=torch.zeros(rows, **longs),
            prefix_len=torch.ones(rows, **longs),
            cos=cos[0].to(self.dtype).contiguous(), sin=sin[0].to(self.dtype).contiguous(),
            row_ids=torch.arange(rows, device=self.device),
            prefix_k=[torch.zeros(self.kv_heads, slots, self.head_dim, **kw) for _ in range(n_layers)],
            prefix_v=[torch.zeros(self.kv_heads, slots, self.head_dim, **kw) for _ in range(n_layers)],
            suffix_k=[torch.zeros(rows, self.kv_heads, suffix_cap, self.head_dim, **kw) for _ in range(n_layers)],
            suffix_v=[torch.zeros(rows, self.kv_heads, suffix_cap, self.head_dim, **kw) for _ in range(n_layers)],
        )

    # -- one decode step ---------------------------------------------------------------------
    def _run_step(self, state: _DecodeState, width: int) -> torch.Tensor:
        """Logits [R, V] of this step, replaying a graph when enabled.

        The Triton kernel reads only the written completion slots, so one graph serves all steps; the
        PyTorch attention reads a fixed width, so each 64-slot length bucket gets its own graph.
        """
        if not self.use_cuda_graphs:
            return self._with_fallback(lambda ops: self._step_body(state, width, ops))
        entry = state.graphs.get(width)
        if entry is None:
            entry = self._capture(state, width)
            state.graphs[width] = entry
        graph, out = entry
        graph.replay()
        return out

    def _capture(self, state: _DecodeState, width: int) -> tuple[Any, torch.Tensor]:
        """Capture one decode step for completion slots [0, width) (warm-up first, on a side stream).

        The warm-up writes each row's K/V slot with the values the step itself writes, so it is harmless.
        """
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._with_fallback(lambda ops: self._step_body(state, width, ops))
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        ops = self._step_ops()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out = self._step_body(state, width, ops)
        self.graph_captures += 1
        return graph, out

    def _with_fallback(self, run):
        """run(ops) with the fast kernels; if compiling them fails, warn once and use plain ops from then on."""
        ops = self._step_ops()
        if ops is self._ops:
            return run(ops)
        try:
            return run(ops)
        except Exception as err:  # torch.compile/inductor failure on this platform
            warn_once(f"fast rollout engine: fast kernels off ({type(err).__name__}: {str(err)[:200]})")
            self.fast_kernels = False
            self.fast_kernels_off_reason = f"{type(err).__name__} while compiling"
            return run(self._ops)

    def _step_ops(self) -> kernels.EagerOps:
        if not self.fast_kernels:
            return self._ops
        if self._fast is None:
            self._fast = kernels.FastOps()
        return self._fast

    def _step_body(self, state: _DecodeState, width: int, ops: kernels.EagerOps) -> torch.Tensor:
        """One decoding step for all rows, reading only static buffers, the decode weights and the parameters."""
        rows, heads, kv_heads, dim = state.rows, self.heads, self.kv_heads, self.head_dim
        weights = self._decode_weights()
        position = state.rope_start + state.step
        cos = state.cos.index_select(0, position).unsqueeze(1)  # [R, 1, D]
        sin = state.sin.index_select(0, position).unsqueeze(1)
        lo, hi = 0, state.prefix_k[0].shape[1]
        if not ops.triton_attention:
            if not self.use_cuda_graphs:  # eager: read only the prompt slots some row sees (shapes vary)
                lo = int(state.prefix_start.min())
                hi = int((state.prefix_start + state.prefix_len).max())
            bias = kernels.attention_bias(state.prefix_start - lo, state.prefix_len, state.step, hi - lo, width)
        # each row's completion slot in the flattened [R * KV * S, D] cache (index_copy_, as under determinism)
        slot = ((state.row_ids[:, None] * kv_heads + torch.arange(kv_heads, device=self.device)) * state.suffix_cap
                + state.step[:, None]).reshape(-1)
        hidden = self.text.embed_tokens(state.tokens)
        first = self.layers[0].input_layernorm
        residual, normed = hidden, ops.rms_norm(hidden, first.weight, first.variance_epsilon)
        for i, layer in enumerate(self.layers):
            q, k, v = weights.qkv(i, normed)
            q, k = ops.rope_q_k(q.view(rows, heads, dim), k.view(rows, kv_heads, dim), cos, sin)
            state.suffix_k[i].view(-1, dim).index_copy_(0, slot, k.reshape(rows * kv_heads, dim))
            state.suffix_v[i].view(-1, dim).index_copy_(0, slot, v.reshape(rows * kv_heads, dim))
            if ops.triton_attention:
                o = kernels.triton_decode_attention(q, state.prefix_k[i], state.prefix_v[i], state.suffix_k[i],
                                                    state.suffix_v[i], state.prefix_start, state.prefix_len,
                                                    state.step, self.scaling)
            else:
                o = kernels.shared_prefix_attention(q, state.prefix_k[i][:, lo:hi], state.prefix_v[i][:, lo:hi],
                                                    state.suffix_k[i][:, :, :width], state.suffix_v[i][:, :, :width],
                                                    bias, self.scaling, probs_fn=ops.attention_probs,
                                                    out_dtype_ok=self._out_dtype_ok)
            update = weights.o(i, o.reshape(rows, heads * dim))
            post = layer.post_attention_layernorm
            residual, normed = ops.add_rms_norm(residual, update, post.weight, post.variance_epsilon)
            gate, up = weights.gate_up(i, normed)
            update = weights.down(i, ops.silu_mul(gate, up))
            norm = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.text.norm
            residual, normed = ops.add_rms_norm(residual, update, norm.weight, norm.variance_epsilon)
        return self.base.lm_head(normed)

    # -- weights and graph lifecycle -----------------------------------------------------------
    def _decode_weights(self) -> DecodeWeights:
        if self._weights is None:
            mode = choose_mode(self.layers, self.device, self.dtype, self._weights_request)
            self._weights = DecodeWeights(self.layers, mode, self.dtype)
        return self._weights

    def _sync_weights(self) -> None:
        """Refresh the decode weights from the model (once per run), then drop graphs if any storage moved."""
        self._decode_weights().refresh()
        if not self.use_cuda_graphs:
            return
        fingerprint = _model_fingerprint(self.base, self._decode_weights())
        if fingerprint != self._fingerprint:
            if self._fingerprint is not None:
                log.info("fast rollout engine: parameters moved or adapters changed; capturing graphs again")
            self.drop_graphs()
            self._fingerprint = fingerprint

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def nonfinite_logits_message(model) -> str:
    """Why a prompt's logits hold NaN or inf: the parameters that do (first few named), or none."""
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    where = (f"{len(bad)} parameter tensors hold NaN/inf (e.g. {', '.join(bad[:3])})" if bad
             else "every parameter is finite, so the forward pass overflowed on this prompt")
    return f"fast rollout engine: the prompt's next-token logits are NaN or inf; {where}"


def _compiled_call(fn, *args):
    """fn compiled with torch.compile (once per process); if compiling fails, warn once and run it eagerly."""
    compiled = _compiled.get(fn)
    if compiled is None:
        compiled = _compiled[fn] = torch.compile(fn, fullgraph=True)
    if compiled is fn:
        return fn(*args)
    try:
        return compiled(*args)
    except Exception as err:  # torch.compile/inductor failure on this platform
        warn_once(f"fast rollout engine: compiled sampler off ({type(err).__name__}: {str(err)[:200]})")
        _compiled[fn] = fn
        return fn(*args)


def _model_fingerprint(base, weights: DecodeWeights) -> tuple:
    params = tuple((p.data_ptr(), p.dtype) for p in base.model.language_model.parameters())
    adapters = tuple((bool(getattr(m, "merged", False)), bool(getattr(m, "disable_adapters", False)),
                      tuple(getattr(m, "active_adapters", ()) or ()))
                     for m in base.model.language_model.modules() if hasattr(m, "lora_A"))
    owned = tuple(t.data_ptr() for layer in weights.groups for g in layer
                  for t in (g.weight, g.bias, g.lora_a, *g.lora_b) if t is not None)
    return params, adapters, owned, base.lm_head.weight.data_ptr()
