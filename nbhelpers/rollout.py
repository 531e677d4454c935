"""Rollout engine: n sampled completions of one prompt, for GRPO training and Pass@k sampling.

Stock ``model.generate(num_return_sequences=n)`` encodes the image and the prompt n times and then
pays about 100 ms of Python per decoding step. :class:`RolloutEngine` instead

1. runs the prompt and image through the model's own forward once, with batch 1 (the prefill);
2. keeps that prompt's KV cache once and shares it across the n samples (attention reads the shared
   prefix once per step, plus each sample's own completion KV in a static buffer);
3. decodes all n rows together with the model's own modules (LoRA adapters stay unmerged and apply as
   usual) inside a CUDA graph, with a Triton flash-decoding kernel for attention (grouped-query heads
   read each K/V tile once) and torch.compile-fused norms, rotary embedding and activation, so a step
   costs about one pass over the weights plus the completion KV;
4. samples as Hugging Face ``generate`` does: float32 logits, min-new-tokens and suppressed tokens set
   to -inf, then temperature, top-k, top-p (HF's own warpers), softmax and ``torch.multinomial``;
   ``temperature=0`` is greedy. On CUDA, temperature-only sampling without a ``generator`` uses a fused
   Gumbel-max sampler instead (the same distribution in one pass over the logits). Rows stop at their
   first EOS.

Supported: Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``), plain or PEFT-wrapped, on CUDA.
Elsewhere :func:`sample_completions` falls back to stock ``generate`` and logs the reason once.

CUDA graphs read parameters through their storage. Optimizer steps update weights in place, so the
graphs stay valid across training steps; when a parameter's storage moves (``model.to``, DeepSpeed
ZeRO-3 gathering, merging adapters) the engine notices at the next ``generate`` and captures again.

Rollouts run in eval mode (LoRA dropout off), which is the policy being optimized; TRL's stock path
samples in train mode, with LoRA dropout active.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SUPPORTED_MODEL_CLASSES = ("Qwen2_5_VLForConditionalGeneration",)
ENGINE_CHOICES = ("auto", "stock", "fast", "vllm")
LENGTH_BUCKET = 64  # completion-KV slots per CUDA graph bucket (PyTorch attention)
PREFIX_BUCKET = 128  # prompt-KV slots are allocated in multiples of this
EOS_CHECK_INTERVAL = 32  # decode steps between host checks for "all rows finished"

_warned_reasons: set[str] = set()


def _warn_once(reason: str) -> None:
    """logging.warning once per distinct reason (per process)."""
    if reason not in _warned_reasons:
        _warned_reasons.add(reason)
        log.warning(reason)


# ------------------------------------------------------------------------------------------ pure helpers
def truncate_at_eos(rows: Sequence[Sequence[int]], eos_token_ids: Sequence[int]) -> list[list[int]]:
    """Each row cut after its first EOS token (inclusive); rows without EOS are kept whole."""
    eos = set(int(e) for e in eos_token_ids)
    out = []
    for row in rows:
        row = [int(t) for t in row]
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        out.append(row[:cut])
    return out


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Qwen/Llama RoPE helper: (x1, x2) -> (-x2, x1) on the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as HF's ``apply_rotary_pos_emb`` computes it (in x's dtype)."""
    return x * cos + rotate_half(x) * sin


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2.5-VL RMSNorm: normalise in float32, round to x's dtype, then scale by the weight."""
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(residual: torch.Tensor, update: torch.Tensor, weight: torch.Tensor, eps: float):
    """(residual + update, rms_norm(residual + update)): a decoder layer's residual add and next norm."""
    summed = residual + update
    return summed, rms_norm(summed, weight, eps)


def rope_q_k(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def attention_probs(prefix_scores: torch.Tensor, suffix_scores: torch.Tensor, bias: torch.Tensor,
                    scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """softmax((scores * scaling) + bias) in float32 over [prefix | suffix] keys, returned in ``dtype``."""
    scores = torch.cat([prefix_scores, suffix_scores], dim=-1) * scaling + bias
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)


def _bmm_f32(a: torch.Tensor, b: torch.Tensor, out_dtype_ok: bool) -> torch.Tensor:
    """Batched a @ b with a float32 result (scores are kept in float32, as SDPA's kernels keep them)."""
    if a.dtype == torch.float32:
        return torch.bmm(a, b)
    if out_dtype_ok:
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())


def shared_prefix_attention(q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
                            suffix_k: torch.Tensor, suffix_v: torch.Tensor, bias: torch.Tensor, scaling: float,
                            probs_fn=attention_probs, out_dtype_ok: bool = False) -> torch.Tensor:
    """One decoding step of grouped-query attention over a prompt KV shared by all rows.

    q: [R, H, D] (one new token per row); prefix_k/v: [KV, P, D] (shared); suffix_k/v: [R, KV, S, D]
    (each row's completion); bias: [P + S] float32 (0 where a key is visible, -inf elsewhere).
    Returns [R, H, D]. K/V are never expanded to H heads: each KV head serves its H/KV query heads.
    """
    rows, heads, dim = q.shape
    kv_heads, prefix_len, _ = prefix_k.shape
    group = heads // kv_heads
    suffix_len = suffix_k.shape[2]
    # prefix: all rows' queries of one KV head against that head's shared keys, in one matrix product
    q_by_head = q.view(rows, kv_heads, group, dim).transpose(0, 1).reshape(kv_heads, rows * group, dim)
    prefix_scores = _bmm_f32(q_by_head, prefix_k.transpose(1, 2), out_dtype_ok)  # [KV, R*G, P]
    prefix_scores = prefix_scores.view(kv_heads, rows, group, prefix_len).transpose(0, 1)
    # suffix: each row against its own completion keys
    q_rows = q.view(rows * kv_heads, group, dim)
    suffix_scores = _bmm_f32(q_rows, suffix_k.reshape(rows * kv_heads, suffix_len, dim).transpose(1, 2),
                             out_dtype_ok).view(rows, kv_heads, group, suffix_len)
    probs = probs_fn(prefix_scores, suffix_scores, bias, scaling, q.dtype)  # [R, KV, G, P + S]
    probs_prefix = probs[..., :prefix_len].transpose(0, 1).reshape(kv_heads, rows * group, prefix_len)
    out = torch.bmm(probs_prefix, prefix_v).view(kv_heads, rows, group, dim).transpose(0, 1)
    out = out + torch.bmm(probs[..., prefix_len:].reshape(rows * kv_heads, group, suffix_len),
                          suffix_v.reshape(rows * kv_heads, suffix_len, dim)).view(rows, kv_heads, group, dim)
    return out.reshape(rows, heads, dim)


# ------------------------------------------------------------------------------------------ Triton decode attention
try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs run the PyTorch attention instead
    import triton
    import triton.language as tl
except ImportError:
    triton = None
TRITON_BLOCK = 64  # keys per tile
TARGET_PROGRAMS = 264  # about two programs per H100 multiprocessor

if triton is not None:
    @triton.jit
    def _attend_block(q, k_ptrs, v_ptrs, valid, m_i, l_i, acc, scale, IEEE: tl.constexpr):
        k = tl.load(k_ptrs, mask=valid[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=valid[:, None], other=0.0)
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = tl.where(valid[None, :], qk * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc * alpha[:, None] + pv

    @triton.jit
    def _attention_kernel(Q, PK, PV, SK, SV, OUT, ACC, ML, prefix_len_ptr, step_ptr, scale,
                         stride_qr, stride_qh, stride_ph, stride_pp, stride_sr, stride_sh, stride_ss,
                         stride_or, stride_oh, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                         HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, SPLITS: tl.constexpr, IEEE: tl.constexpr):
        # program (row r, KV head h, split s): the GROUP query heads of h against keys of blocks s, s+SPLITS, ...
        r = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.program_id(2)
        prefix_len = tl.load(prefix_len_ptr).to(tl.int32)
        suffix_len = tl.load(step_ptr).to(tl.int32) + 1
        offs_g = tl.arange(0, GROUP_PAD)
        offs_d = tl.arange(0, HEAD_DIM)
        offs_n = tl.arange(0, BLOCK)
        head_rows = (offs_g < GROUP)[:, None]
        q = tl.load(Q + r * stride_qr + (h * GROUP + offs_g)[:, None] * stride_qh + offs_d[None, :],
                    mask=head_rows, other=0.0)
        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        n_prefix = tl.cdiv(prefix_len, BLOCK)
        for b in range(s, n_prefix, SPLITS):
            pos = b * BLOCK + offs_n
            offsets = h * stride_ph + pos[:, None] * stride_pp + offs_d[None, :]
            m_i, l_i, acc = _attend_block(q, PK + offsets, PV + offsets, pos < prefix_len, m_i, l_i, acc, scale, IEEE)
        n_suffix = tl.cdiv(suffix_len, BLOCK)
        for b in range((s + SPLITS - n_prefix % SPLITS) % SPLITS, n_suffix, SPLITS):
            pos = b * BLOCK + offs_n
            offsets = r * stride_sr + h * stride_sh + pos[:, None] * stride_ss + offs_d[None, :]
            m_i, l_i, acc = _attend_block(q, SK + offsets, SV + offsets, pos < suffix_len, m_i, l_i, acc, scale, IEEE)
        if SPLITS == 1:
            out = acc / l_i[:, None]
            tl.store(OUT + r * stride_or + (h * GROUP + offs_g)[:, None] * stride_oh + offs_d[None, :],
                     out.to(OUT.dtype.element_ty), mask=head_rows)
        else:
            part = (r * tl.num_programs(1) + h) * SPLITS + s
            tl.store(ACC + (part * GROUP_PAD + offs_g)[:, None] * HEAD_DIM + offs_d[None, :], acc)
            tl.store(ML + part * 2 * GROUP_PAD + offs_g, m_i)
            tl.store(ML + part * 2 * GROUP_PAD + GROUP_PAD + offs_g, l_i)

    @triton.jit
    def _combine_kernel(ACC, ML, OUT, stride_or, stride_oh, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                       HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr):
        # softmax-weighted sum of the splits' partial results (flash-decoding's second pass)
        r = tl.program_id(0)
        h = tl.program_id(1)
        first = (r * tl.num_programs(1) + h) * SPLITS
        offs_s = tl.arange(0, SPLITS)
        offs_g = tl.arange(0, GROUP_PAD)
        offs_d = tl.arange(0, HEAD_DIM)
        rows = (first + offs_s)[:, None] * 2 * GROUP_PAD + offs_g[None, :]
        m_all = tl.load(ML + rows)
        l_all = tl.load(ML + rows + GROUP_PAD)
        m_max = tl.max(m_all, 0)
        denominator = tl.sum(l_all * tl.exp(m_all - m_max[None, :]), 0)
        out = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        for s in range(SPLITS):
            weight = tl.exp(tl.load(ML + (first + s) * 2 * GROUP_PAD + offs_g) - m_max)
            part = tl.load(ACC + ((first + s) * GROUP_PAD + offs_g)[:, None] * HEAD_DIM + offs_d[None, :])
            out += part * weight[:, None]
        out = out / denominator[:, None]
        tl.store(OUT + r * stride_or + (h * GROUP + offs_g)[:, None] * stride_oh + offs_d[None, :],
                 out.to(OUT.dtype.element_ty), mask=(offs_g < GROUP)[:, None])



def attention_splits(rows: int, kv_heads: int) -> int:
    """Key-range splits per (row, KV head) so that about TARGET_PROGRAMS programs run (a power of 2, <= 64)."""
    want = max(1, math.ceil(TARGET_PROGRAMS / (rows * kv_heads)))
    return min(64, 1 << (want - 1).bit_length())


def triton_decode_attention(q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor, suffix_k: torch.Tensor,
                            suffix_v: torch.Tensor, prefix_len: torch.Tensor, step: torch.Tensor,
                            scaling: float) -> torch.Tensor:
    """:func:`shared_prefix_attention` as one Triton kernel (flash-decoding), reading lengths on the device.

    Keys visible to every row: prefix slots [0, prefix_len) and its own completion slots [0, step]
    (prefix_len and step are 1-element device tensors, so one CUDA graph serves every step and prompt).
    Only the visible K/V tiles are read; K/V are never expanded to the query heads.
    """
    rows, heads, dim = q.shape
    kv_heads = prefix_k.shape[0]
    group = heads // kv_heads
    group_pad = max(16, 1 << (group - 1).bit_length())  # tl.dot needs >= 16 rows
    splits = attention_splits(rows, kv_heads)
    out = torch.empty_like(q)
    if splits > 1:
        acc = torch.empty(rows * kv_heads * splits * group_pad * dim, device=q.device, dtype=torch.float32)
        ml = torch.empty(rows * kv_heads * splits * 2 * group_pad, device=q.device, dtype=torch.float32)
    else:
        acc = ml = out  # unused
    ieee = q.dtype == torch.float32
    _attention_kernel[(rows, kv_heads, splits)](
        q, prefix_k, prefix_v, suffix_k, suffix_v, out, acc, ml, prefix_len, step, scaling,
        q.stride(0), q.stride(1), prefix_k.stride(0), prefix_k.stride(1),
        suffix_k.stride(0), suffix_k.stride(1), suffix_k.stride(2), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=dim, BLOCK=TRITON_BLOCK, SPLITS=splits, IEEE=ieee)
    if splits > 1:
        _combine_kernel[(rows, kv_heads)](acc, ml, out, out.stride(0), out.stride(1), GROUP=group,
                                         GROUP_PAD=group_pad, HEAD_DIM=dim, SPLITS=splits)
    return out


def process_logits(logits: torch.Tensor, *, generated: int, min_new_tokens: int, eos_token_ids: torch.Tensor,
                   suppress_token_ids: torch.Tensor | None, warpers: Sequence) -> torch.Tensor:
    """HF's order on float32 logits: min-new-tokens and suppressed tokens to -inf, then the warpers."""
    scores = logits.to(torch.float32, copy=True)
    if generated < min_new_tokens:
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


def gumbel_max_sample(logits: torch.Tensor, inv_temperature: float, bias: torch.Tensor) -> torch.Tensor:
    """argmax(float32 logits / T + bias + Gumbel noise): one token per row, distributed as
    multinomial(softmax(logits / T + bias)) (bias: 0 or -inf per token). Compiled, it is one pass over the logits
    instead of the cast, softmax, exponential, division and argmax of the HF path."""
    scores = logits.to(torch.float32) * inv_temperature + bias
    uniform = torch.rand_like(scores)
    return torch.argmax(scores - torch.log(-torch.log(uniform)), dim=-1)


def collapse_image_pads(token_ids: Sequence[int], image_token_id: int) -> list[int]:
    """Runs of image placeholder tokens collapsed to one (vLLM expands placeholders itself)."""
    out: list[int] = []
    for t in token_ids:
        if t == image_token_id and out and out[-1] == image_token_id:
            continue
        out.append(int(t))
    return out


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
        return "fast rollout engine needs the full weights; some parameters are partitioned (DeepSpeed ZeRO-3)"
    return _text_config_reason(base.config.get_text_config())


def engine_unavailable_reason(model) -> str | None:
    """None when the fast engine can run on ``model`` (CUDA, supported model); otherwise why not."""
    reason = model_unsupported_reason(model)
    if reason is not None:
        return reason
    device = next(base_model(model).parameters()).device
    if device.type != "cuda":
        return f"fast rollout engine needs CUDA; the model is on {device.type}"
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


def _bmm_out_dtype_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch.bmm(..., out_dtype=float32) runs for ``dtype`` inputs on ``device``."""
    if device.type != "cuda" or dtype == torch.float32:
        return False
    try:
        a = torch.ones(2, 2, 16, device=device, dtype=dtype)
        return torch.bmm(a, a.transpose(1, 2), out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError):
        return False


# ------------------------------------------------------------------------------------------ the engine
@dataclass
class _DecodeState:
    """Static buffers of one decode configuration (rows x completion slots x prompt slots)."""

    rows: int
    suffix_cap: int
    prefix_cap: int
    tokens: torch.Tensor  # [R] long: the token fed at this step
    step: torch.Tensor  # [1] long: completion slot written at this step
    cos: torch.Tensor  # [suffix_cap, D] rope of each completion slot
    sin: torch.Tensor
    prefix_len: torch.Tensor  # [1] long: the prompt's length (slots used in prefix_k/v)
    prefix_bias: torch.Tensor  # [prefix_cap] float32, 0 on the prompt's slots, -inf after
    slots: torch.Tensor  # [suffix_cap] long arange
    prefix_k: list[torch.Tensor]  # per layer [KV, prefix_cap, D]
    prefix_v: list[torch.Tensor]
    suffix_k: list[torch.Tensor]  # per layer [R, KV, suffix_cap, D]
    suffix_v: list[torch.Tensor]
    graphs: dict[int, tuple[Any, torch.Tensor]] = field(default_factory=dict)


class RolloutEngine:
    """n completions of one prompt from one prefill, decoded together (see module docstring).

    temperature 0 means greedy. ``min_new_tokens`` (benchmarks only) keeps EOS out until that many
    tokens exist. ``suppress_token_ids`` are never sampled (TRL suppresses the image placeholder).
    ``use_cuda_graphs``/``fast_kernels`` default to True on CUDA (fast kernels: the Triton attention
    kernel, elementwise ops fused by torch.compile and the fused sampler; a failure there falls back to
    plain PyTorch ops with a warning). ``max_rows`` caps the rows decoded at once (default: what fits in
    free GPU memory); larger n is decoded in chunks from the same prefill.
    """

    def __init__(self, model, eos_token_ids: Sequence[int] | int, pad_token_id: int, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None, min_new_tokens: int = 0,
                 *, suppress_token_ids: Sequence[int] = (), use_cuda_graphs: bool | None = None,
                 fast_kernels: bool | None = None, max_rows: int | None = None) -> None:
        reason = model_unsupported_reason(model)  # the engine also runs eagerly on CPU (tests)
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
        vocab = self.base.lm_head.out_features
        self._bias = torch.zeros(vocab, device=self.device)  # -inf on suppressed tokens
        if self._suppress is not None:
            self._bias[self._suppress] = -math.inf
        self._bias_min_new = self._bias.clone()  # and on EOS, while fewer than min_new_tokens exist
        self._bias_min_new[self._eos] = -math.inf
        on_cuda = self.device.type == "cuda"
        self.use_cuda_graphs = on_cuda if use_cuda_graphs is None else bool(use_cuda_graphs and on_cuda)
        self.fast_kernels = on_cuda if fast_kernels is None else bool(fast_kernels and on_cuda)
        # temperature-only sampling can use the fused Gumbel-max sampler (top-k/top-p keep HF's warpers)
        self._fused_sampling = self.fast_kernels and not self.greedy and not top_k and top_p >= 1.0
        self._sampler = None
        self.max_rows = max_rows
        self._out_dtype_ok = _bmm_out_dtype_supported(self.device, self.dtype)
        self._ops = _EagerOps()
        self._fast: _EagerOps | None = None
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
    def generate(self, prompt_inputs: dict, n: int, generator: torch.Generator | None = None) -> list[list[int]]:
        """n completions of one prompt (processor output with batch 1), each ending at its first EOS."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        input_ids = prompt_inputs["input_ids"]
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"prompt_inputs['input_ids'] must have shape [1, L], got {tuple(input_ids.shape)}")
        stats: dict[str, float] = {}
        with torch.no_grad(), _eval_mode(self.model):
            self._check_fingerprint()
            t0 = self._now()
            prefix, first_scores, rope_start = self._prefill(prompt_inputs)
            stats["prefill_s"] = self._now() - t0
            rows = self._rows_per_chunk(n, prefix[0][0].shape[1])
            completions: list[list[int]] = []
            stats["decode_s"] = 0.0
            stats["steps"] = 0
            for start in range(0, n, rows):
                t1 = self._now()
                chunk, steps = self._decode_chunk(prefix, first_scores, rope_start, rows, generator)
                stats["decode_s"] += self._now() - t1
                stats["steps"] += steps
                completions.extend(chunk[: n - start])
        stats["rows"] = rows
        self.last_stats = stats
        return completions

    def drop_graphs(self) -> None:
        """Forget captured graphs and decode buffers (they are rebuilt on the next ``generate``)."""
        self._state = None
        self._pool = None

    # -- prefill -----------------------------------------------------------------------------
    def _prefill(self, prompt_inputs: dict):
        """Prompt + image through the model once: per-layer prompt K/V, processed first-token scores, rope start."""
        inputs = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in prompt_inputs.items()}
        input_ids = inputs.pop("input_ids")
        if inputs.get("attention_mask") is None:
            inputs["attention_mask"] = torch.ones_like(input_ids)
        position_ids = self.base._prepare_position_ids_for_generation(input_ids, dict(inputs))
        out = self.base(input_ids=input_ids, position_ids=position_ids, use_cache=True, logits_to_keep=1, **inputs)
        rope = position_ids[-3:, 0, -1]
        if not bool((rope == rope[0]).all()):
            raise ValueError("the prompt's last token has 3-D (vision) rope positions; it must be a text token")
        cache = out.past_key_values
        prefix = [(layer.keys[0], layer.values[0]) for layer in cache.layers]  # [KV, P, D] each
        scores = self._process(out.logits[:, -1, :], generated=0)
        return prefix, scores, int(rope[0]) + 1

    # -- decode ------------------------------------------------------------------------------
    def _decode_chunk(self, prefix, first_scores, rope_start: int, rows: int, generator):
        """Decode ``rows`` completions from the shared prefix; returns (token lists, decode steps run)."""
        steps_total = self.max_new_tokens
        tokens_out = torch.full((rows, steps_total), self.pad_token_id, dtype=torch.long, device=self.device)
        eos = self._eos
        token = draw_tokens(first_scores, rows, self.greedy, generator)
        tokens_out[:, 0] = token
        unfinished = ~torch.isin(token, eos)
        steps = 0
        if steps_total > 1:
            state = self._prepare_state(rows, prefix, rope_start)
            for k in range(steps_total - 1):
                state.tokens.copy_(token)
                state.step.fill_(k)
                hidden = self._run_step(state, k)
                token = self._sample(self.base.lm_head(hidden), k + 1, rows, generator)
                token = torch.where(unfinished, token, self.pad_token_id)
                tokens_out[:, k + 1] = token
                unfinished &= ~torch.isin(token, eos)
                steps += 1
                if (k + 1) % EOS_CHECK_INTERVAL == 0 and not bool(unfinished.any()):
                    break
        return truncate_at_eos(tokens_out[:, : steps + 1].tolist(), self.eos_token_ids), steps

    def _sample(self, logits: torch.Tensor, generated: int, rows: int, generator) -> torch.Tensor:
        """Next token per row: the fused Gumbel-max sampler where it applies, else HF's processing + multinomial."""
        if self._fused_sampling and generator is None:
            if self._sampler is None:
                self._sampler = torch.compile(gumbel_max_sample, fullgraph=True)
            bias = self._bias_min_new if generated < self.min_new_tokens else self._bias
            try:
                return self._sampler(logits, 1.0 / self.temperature, bias)
            except Exception as err:  # torch.compile/inductor failure on this platform
                _warn_once(f"fast rollout engine: fused sampling off ({type(err).__name__}: {str(err)[:200]})")
                self._fused_sampling = False
        return draw_tokens(self._process(logits, generated), rows, self.greedy, generator)

    def _process(self, logits: torch.Tensor, generated: int) -> torch.Tensor:
        return process_logits(logits, generated=generated, min_new_tokens=self.min_new_tokens,
                              eos_token_ids=self._eos, suppress_token_ids=self._suppress, warpers=self.warpers)

    @staticmethod
    def _bucket(step: int, cap: int) -> int:
        return min((step // LENGTH_BUCKET + 1) * LENGTH_BUCKET, cap)

    def _rows_per_chunk(self, n: int, prompt_len: int) -> int:
        if self.max_rows is not None:
            limit = self.max_rows
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            held = 0 if self._state is None else self._state.rows * self._state.suffix_cap * self.kv_bytes_per_token
            vocab = self.base.lm_head.out_features
            per_row = self.max_new_tokens * self.kv_bytes_per_token + 6 * 4 * vocab \
                + 16 * 4 * self.heads * (prompt_len + PREFIX_BUCKET + self.max_new_tokens)
            limit = max(1, int(0.8 * (free + held) / per_row))
        else:
            limit = n
        chunks = math.ceil(n / max(1, min(n, limit)))
        return math.ceil(n / chunks)

    def _prepare_state(self, rows: int, prefix, rope_start: int) -> _DecodeState:
        prompt_len = prefix[0][0].shape[1]
        suffix_cap = self.max_new_tokens - 1
        state = self._state
        if state is None or state.rows != rows or state.suffix_cap != suffix_cap or state.prefix_cap < prompt_len:
            prefix_cap = math.ceil(prompt_len / PREFIX_BUCKET) * PREFIX_BUCKET
            self._state = None  # free the old buffers before allocating new ones
            self._pool = None
            state = self._allocate(rows, suffix_cap, prefix_cap)
            self._state = state
        for (k, v), pk, pv in zip(prefix, state.prefix_k, state.prefix_v):
            pk[:, :prompt_len].copy_(k)
            pv[:, :prompt_len].copy_(v)
        state.prefix_len.fill_(prompt_len)
        state.prefix_bias.fill_(-math.inf)
        state.prefix_bias[:prompt_len] = 0.0
        positions = torch.arange(rope_start, rope_start + suffix_cap, device=self.device)
        cos, sin = self.text.rotary_emb(state.cos, positions.view(1, 1, -1))
        state.cos.copy_(cos[0])
        state.sin.copy_(sin[0])
        return state

    def _allocate(self, rows: int, suffix_cap: int, prefix_cap: int) -> _DecodeState:
        kw = dict(device=self.device, dtype=self.dtype)
        n_layers = len(self.layers)
        return _DecodeState(
            rows=rows, suffix_cap=suffix_cap, prefix_cap=prefix_cap,
            tokens=torch.zeros(rows, dtype=torch.long, device=self.device),
            step=torch.zeros(1, dtype=torch.long, device=self.device),
            cos=torch.zeros(suffix_cap, self.head_dim, **kw), sin=torch.zeros(suffix_cap, self.head_dim, **kw),
            prefix_len=torch.zeros(1, dtype=torch.long, device=self.device),
            prefix_bias=torch.zeros(prefix_cap, dtype=torch.float32, device=self.device),
            slots=torch.arange(suffix_cap, device=self.device),
            prefix_k=[torch.zeros(self.kv_heads, prefix_cap, self.head_dim, **kw) for _ in range(n_layers)],
            prefix_v=[torch.zeros(self.kv_heads, prefix_cap, self.head_dim, **kw) for _ in range(n_layers)],
            suffix_k=[torch.zeros(rows, self.kv_heads, suffix_cap, self.head_dim, **kw) for _ in range(n_layers)],
            suffix_v=[torch.zeros(rows, self.kv_heads, suffix_cap, self.head_dim, **kw) for _ in range(n_layers)],
        )

    def _run_step(self, state: _DecodeState, step: int) -> torch.Tensor:
        """Hidden state after the final norm for this step ([R, hidden]), replaying a graph when enabled.

        The Triton kernel reads only the written completion slots, so one graph serves all steps; the
        PyTorch attention reads a fixed width, so each 64-slot length bucket gets its own graph.
        """
        width = state.suffix_cap if self._step_ops().triton_attention else self._bucket(step, state.suffix_cap)
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

        The warm-up writes this step's K/V slot with the values the step itself writes, so it is harmless.
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
            _warn_once(f"fast rollout engine: fast kernels off ({type(err).__name__}: {str(err)[:200]})")
            self.fast_kernels = False
            return run(self._ops)

    def _step_ops(self) -> "_EagerOps":
        if not self.fast_kernels:
            return self._ops
        if self._fast is None:
            self._fast = _FastOps()
        return self._fast

    def _step_body(self, state: _DecodeState, width: int, ops: "_EagerOps") -> torch.Tensor:
        """One decoding step for all rows, reading only static buffers and the model's parameters."""
        rows = state.rows
        cos = state.cos.index_select(0, state.step)  # [1, D]
        sin = state.sin.index_select(0, state.step)
        if not ops.triton_attention:
            suffix_bias = torch.where(state.slots[:width] <= state.step, 0.0, -math.inf)
            bias = torch.cat([state.prefix_bias, suffix_bias])
        hidden = self.text.embed_tokens(state.tokens)
        first = self.layers[0].input_layernorm
        residual, normed = hidden, ops.rms_norm(hidden, first.weight, first.variance_epsilon)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            q = attn.q_proj(normed).view(rows, self.heads, self.head_dim)
            k = attn.k_proj(normed).view(rows, self.kv_heads, self.head_dim)
            v = attn.v_proj(normed).view(rows, self.kv_heads, self.head_dim)
            q, k = ops.rope_q_k(q, k, cos, sin)
            state.suffix_k[i].index_copy_(2, state.step, k.unsqueeze(2))
            state.suffix_v[i].index_copy_(2, state.step, v.unsqueeze(2))
            if ops.triton_attention:
                o = triton_decode_attention(q, state.prefix_k[i], state.prefix_v[i], state.suffix_k[i],
                                            state.suffix_v[i], state.prefix_len, state.step, self.scaling)
            else:
                o = shared_prefix_attention(q, state.prefix_k[i], state.prefix_v[i], state.suffix_k[i][:, :, :width],
                                            state.suffix_v[i][:, :, :width], bias, self.scaling,
                                            probs_fn=ops.attention_probs, out_dtype_ok=self._out_dtype_ok)
            update = attn.o_proj(o.reshape(rows, self.heads * self.head_dim))
            post = layer.post_attention_layernorm
            residual, normed = ops.add_rms_norm(residual, update, post.weight, post.variance_epsilon)
            mlp = layer.mlp
            update = mlp.down_proj(ops.silu_mul(mlp.gate_proj(normed), mlp.up_proj(normed)))
            norm = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.text.norm
            residual, normed = ops.add_rms_norm(residual, update, norm.weight, norm.variance_epsilon)
        return normed

    # -- graph lifecycle ---------------------------------------------------------------------
    def _check_fingerprint(self) -> None:
        """Drop captured graphs when a parameter's storage, dtype or the adapter state has changed."""
        if not self.use_cuda_graphs:
            return
        fingerprint = _model_fingerprint(self.base)
        if fingerprint != self._fingerprint:
            if self._fingerprint is not None:
                log.info("fast rollout engine: parameters moved or adapters changed; capturing graphs again")
            self.drop_graphs()
            self._fingerprint = fingerprint

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def _model_fingerprint(base) -> tuple:
    params = tuple((p.data_ptr(), p.dtype) for p in base.model.language_model.parameters())
    adapters = tuple((bool(getattr(m, "merged", False)), bool(getattr(m, "disable_adapters", False)),
                      tuple(getattr(m, "active_adapters", ()) or ()))
                     for m in base.model.language_model.modules() if hasattr(m, "lora_A"))
    return params, adapters, base.lm_head.weight.data_ptr()


class _EagerOps:
    """The elementwise pieces of a decode step and its attention, as plain PyTorch ops."""

    triton_attention = False
    rms_norm = staticmethod(rms_norm)
    add_rms_norm = staticmethod(add_rms_norm)
    rope_q_k = staticmethod(rope_q_k)
    silu_mul = staticmethod(silu_mul)
    attention_probs = staticmethod(attention_probs)


class _FastOps(_EagerOps):
    """The same pieces fused by torch.compile (one or two kernels each), and the Triton attention kernel."""

    def __init__(self) -> None:
        self.triton_attention = triton is not None
        self.rms_norm = torch.compile(rms_norm, fullgraph=True)
        self.add_rms_norm = torch.compile(add_rms_norm, fullgraph=True)
        self.rope_q_k = torch.compile(rope_q_k, fullgraph=True)
        self.silu_mul = torch.compile(silu_mul, fullgraph=True)
        self.attention_probs = torch.compile(attention_probs, fullgraph=True)


# ------------------------------------------------------------------------------------------ stock path
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


# ------------------------------------------------------------------------------------------ sampling entry
_engines: "weakref.WeakKeyDictionary[Any, RolloutEngine]" = weakref.WeakKeyDictionary()


def resolve_engine(engine: str, model) -> str:
    """'auto' -> 'fast' where the engine can run, else 'stock' (warning once with the reason)."""
    if engine not in ENGINE_CHOICES:
        raise ValueError(f"rollout engine must be one of {', '.join(ENGINE_CHOICES)}, got '{engine}'")
    if engine in ("stock", "vllm"):
        return engine
    reason = engine_unavailable_reason(model)
    if reason is None:
        return "fast"
    if engine == "fast":
        raise RuntimeError(f"rollout engine 'fast' was asked for but cannot run: {reason}")
    _warn_once(f"{reason}; using stock generate")
    return "stock"


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


# ------------------------------------------------------------------------------------------ vLLM (optional)
_vllm_instances: dict[str, Any] = {}


def vllm_sample(model, prompt_inputs: dict, n: int, *, max_new_tokens: int, temperature: float, top_p: float,
                top_k: int | None, eos_token_ids: Sequence[int], images: Sequence | None) -> list[list[int]]:
    """n completions through vLLM (off by default). The model must be a plain (merged) checkpoint folder
    or hub id (``model.name_or_path``); pass the prompt's images as PIL images."""
    try:
        import vllm
    except ImportError as err:
        raise RuntimeError("rollout engine 'vllm' needs the vllm package, which is not installed; install a "
                           "vllm release that supports Qwen2.5-VL on a CUDA machine, or use engine 'fast' or "
                           "'auto'") from err
    if hasattr(model, "get_base_model"):
        raise ValueError("rollout engine 'vllm' loads weights from disk: merge the LoRA adapter "
                         "(model.merge_and_unload().save_pretrained(folder)) and load that folder")
    path = getattr(model, "name_or_path", "") or ""
    if not path:
        raise ValueError("rollout engine 'vllm' needs model.name_or_path (a checkpoint folder or hub id)")
    if images is None:
        raise ValueError("rollout engine 'vllm' needs images=[PIL images of the prompt]")
    llm = _vllm_instances.get(path)
    if llm is None:
        llm = _vllm_instances[path] = vllm.LLM(model=path, limit_mm_per_prompt={"image": max(1, len(images))})
    image_token_id = int(model.config.image_token_id)
    prompt = {"prompt_token_ids": collapse_image_pads(prompt_inputs["input_ids"][0].tolist(), image_token_id),
              "multi_modal_data": {"image": list(images)}}
    params = vllm.SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k or -1,
                                 max_tokens=max_new_tokens, stop_token_ids=list(eos_token_ids))
    result = llm.generate([prompt], params, use_tqdm=False)[0]
    return truncate_at_eos([list(o.token_ids) for o in result.outputs], eos_token_ids)


# ------------------------------------------------------------------------------------------ trainer hook
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


def trainer_generate(trainer, prompt_ids: list[list[int]], multimodal_fields: dict,
                     num_generations: int) -> tuple[list[list[int]], None]:
    """TRL ``_generate_single_turn`` replacement: one engine run per unique prompt, results in input order.

    TRL repeats each prompt ``num_generations`` times consecutively; runs of identical prompts (ids and
    images) are found by comparison, so any order is handled. Returns (completion ids, None logprobs).
    """
    from trl.extras.profiling import profiling_context
    from trl.models import unwrap_model_for_generation

    base_cfg = base_model(trainer.accelerator.unwrap_model(trainer.model_wrapped)).config
    items = split_prompts(prompt_ids, multimodal_fields, int(base_cfg.image_token_id),
                          int(base_cfg.vision_config.spatial_merge_size))
    completions: list[list[int] | None] = [None] * len(items)
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
        engine = _trainer_engine(trainer, unwrapped_model)
        for start, count in group_consecutive(items):
            completions[start:start + count] = engine.generate(items[start], count)
    return completions, None


__all__ = ["RolloutEngine", "engine_unavailable_reason", "model_unsupported_reason", "sample_completions",
           "trainer_generate", "trainer_rollout_unavailable_reason", "stock_generate", "resolve_engine",
           "truncate_at_eos", "shared_prefix_attention", "triton_decode_attention", "process_logits",
           "gumbel_max_sample", "split_prompts", "group_consecutive", "vllm_sample"]
