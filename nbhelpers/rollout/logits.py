"""From logits to tokens, as Hugging Face ``generate`` samples: float32 scores, min-new-tokens and suppressed
tokens at -inf, then temperature, top-k, top-p (HF's own warpers), softmax and ``torch.multinomial``.

Two equivalent draws in one pass over the scores (argmax(scores + Gumbel noise) is distributed as
multinomial(softmax(scores))):

* :func:`gumbel_max_sample`, with ``torch.rand`` noise (the engine's fused sampler for temperature-only
  sampling without a seed);
* :func:`seeded_gumbel_sample`, whose noise is a hash of (row key, token index, vocabulary id): a sample's
  tokens depend only on its key (problem seed, sample index), never on which other rows share the batch,
  so continuous batching, resumed runs and a problem sampled alone all give the same completions.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

MASK32 = 0xFFFFFFFF


def truncate_at_eos(rows: Sequence[Sequence[int]], eos_token_ids: Sequence[int]) -> list[list[int]]:
    """Each row cut after its first EOS token (inclusive); rows without EOS are kept whole."""
    eos = set(int(e) for e in eos_token_ids)
    out = []
    for row in rows:
        row = [int(t) for t in row]
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        out.append(row[:cut])
    return out


def process_logits(logits: torch.Tensor, *, generated: int | torch.Tensor, min_new_tokens: int,
                   eos_token_ids: torch.Tensor, suppress_token_ids: torch.Tensor | None,
                   warpers: Sequence) -> torch.Tensor:
    """HF's order on float32 logits [R, V]: min-new-tokens and suppressed tokens to -inf, then the warpers.

    generated: tokens each row already has (an int for all rows, or an [R] tensor per row).
    """
    scores = logits.to(torch.float32, copy=True)
    if torch.is_tensor(generated):
        if min_new_tokens > 0:
            below = (generated < min_new_tokens)[:, None]
            scores[:, eos_token_ids] = torch.where(below, -math.inf, scores[:, eos_token_ids])
    elif generated < min_new_tokens:
        scores.index_fill_(-1, eos_token_ids, -math.inf)
    if suppress_token_ids is not None:
        scores.index_fill_(-1, suppress_token_ids, -math.inf)
    for warper in warpers:
        scores = warper(None, scores)
    return scores


def make_warpers(temperature: float, top_k: int | None, top_p: float) -> list:
    """HF's sampling warpers in HF's order (temperature, top-k, top-p); none for greedy (temperature 0)."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    if temperature == 0:
        return []
    warpers: list = []
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k=int(top_k), min_tokens_to_keep=1))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    return warpers


def draw_tokens(scores: torch.Tensor, rows: int, greedy: bool, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from processed scores [R or 1, V]: argmax (greedy) or multinomial(softmax)."""
    if greedy:
        return scores.argmax(dim=-1).expand(rows) if scores.shape[0] == 1 else scores.argmax(dim=-1)
    probs = torch.softmax(scores, dim=-1)
    if probs.shape[0] != rows:
        probs = probs.expand(rows, -1).contiguous()
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """[R] float32 log-probabilities of ``tokens`` [R] under log_softmax(float32 logits [R or 1, V] / T), in nats
    (<= 0): the quantity TRL's training forward computes per completion token (its fused head divides the logits
    by the temperature and takes the log-softmax over the whole vocabulary). Top-k/top-p truncation and suppressed
    tokens are therefore not applied, so the value is comparable with the training forward's; temperature 0
    (greedy) counts as 1."""
    scores = logits.to(torch.float32)
    if temperature not in (0.0, 1.0):
        scores = scores / temperature
    if scores.shape[0] != tokens.shape[0]:
        scores = scores.expand(tokens.shape[0], -1)
    return scores.gather(-1, tokens.view(-1, 1)).squeeze(1) - torch.logsumexp(scores, dim=-1)


def temperature_scores(logits: torch.Tensor, inv_temperature: float, bias: torch.Tensor, bias_below_min: torch.Tensor,
                       below_min: torch.Tensor) -> torch.Tensor:
    """float32 logits / T + bias. bias: [V], 0 or -inf per token; rows with ``below_min`` ([R] bool, fewer than
    min-new-tokens so far) use ``bias_below_min`` (EOS at -inf too)."""
    return logits.to(torch.float32) * inv_temperature + torch.where(below_min[:, None], bias_below_min, bias)


def gumbel_max_sample(logits: torch.Tensor, inv_temperature: float, bias: torch.Tensor, bias_below_min: torch.Tensor,
                      below_min: torch.Tensor) -> torch.Tensor:
    """argmax(:func:`temperature_scores` + Gumbel noise): one token per row, distributed as
    multinomial(softmax(logits / T + bias)). Compiled, it is one pass over the logits instead of the cast,
    softmax, exponential, division and argmax of the HF path."""
    scores = temperature_scores(logits, inv_temperature, bias, bias_below_min, below_min)
    uniform = torch.rand_like(scores)
    return torch.argmax(scores - torch.log(-torch.log(uniform)), dim=-1)


# ------------------------------------------------------------------------------------------ seeded noise
def mix32(x):
    """A 32-bit integer hash (lowbias32, C. Wellons) on non-negative ints or int64 tensors below 2**32."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & MASK32
    return x ^ (x >> 15)


def sample_key(seed: int, sample: int) -> tuple[int, int]:
    """Two 32-bit keys for sample ``sample`` of a problem seeded ``seed`` (any non-negative int, e.g. 63 bits)."""
    lo, hi = seed & MASK32, (seed >> 32) & MASK32
    s = mix32(sample & MASK32)
    return mix32(lo ^ s), mix32(hi ^ mix32(s ^ 0x5BD1E995))


def column_keys(vocab: int, device) -> torch.Tensor:
    """[vocab] int64 per-token hash keys (a tensor input, so compiled kernels never multiply an int32 index by
    a constant above 2**31)."""
    return mix32((torch.arange(vocab, device=device, dtype=torch.int64) * 0x2C1B3C6D) & MASK32)


def hashed_uniform(key_a: torch.Tensor, key_b: torch.Tensor, counter: torch.Tensor,
                   columns: torch.Tensor) -> torch.Tensor:
    """[R, V] float32 uniforms in (0, 1), a pure function of (key_a, key_b, counter) per row and the column's
    key (:func:`column_keys`)."""
    row = mix32(key_a ^ mix32((counter & MASK32) ^ 0x1E3779B9))
    row_b = mix32((key_b + counter) & MASK32)
    x = mix32(row[:, None] ^ columns[None, :])
    x = mix32(x ^ row_b[:, None])
    return ((x >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def seeded_gumbel_sample(scores: torch.Tensor, key_a: torch.Tensor, key_b: torch.Tensor, counter: torch.Tensor,
                         columns: torch.Tensor) -> torch.Tensor:
    """argmax(scores + Gumbel noise from :func:`hashed_uniform`): one token per row of processed float32 scores
    [R, V], distributed as multinomial(softmax(scores)); counter [R]: the token's index in its completion."""
    uniform = hashed_uniform(key_a, key_b, counter, columns)
    return torch.argmax(scores - torch.log(-torch.log(uniform)), dim=-1)


def seeded_temperature_sample(logits: torch.Tensor, inv_temperature: float, bias: torch.Tensor,
                              bias_below_min: torch.Tensor, below_min: torch.Tensor, key_a: torch.Tensor,
                              key_b: torch.Tensor, counter: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """:func:`seeded_gumbel_sample` of :func:`temperature_scores` (temperature-only sampling, one pass compiled)."""
    return seeded_gumbel_sample(temperature_scores(logits, inv_temperature, bias, bias_below_min, below_min),
                                key_a, key_b, counter, columns)
