"""The decode step's math: RMSNorm, rotary embedding, SiLU gate, grouped-query attention over a shared
prompt KV (plain PyTorch and a Triton flash-decoding kernel), and the op sets the engine runs with.

Attention layout (one decoding step, one new token per row): every row r reads the prompt KV of its own
prompt, slots [prefix_start[r], prefix_start[r] + prefix_len[r]) of a prompt buffer shared by all rows
([KV, P, D]), plus its own completion KV, slots [0, step[r]] of [R, KV, S, D]. Several rows (a prompt's
samples) point at the same prompt slots, which are stored once. K/V are never expanded to the query heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs run the PyTorch attention instead
    import triton
    import triton.language as tl
except ImportError:
    triton = None

TRITON_BLOCK = 64  # keys per tile
TARGET_PROGRAMS = 264  # about two programs per multiprocessor of an H100/H200


# ------------------------------------------------------------------------------------------ elementwise pieces
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
    """q [R, H, D] and k [R, KV, D] rotated with per-row cos/sin [R, 1, D]."""
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


def bmm_out_dtype_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch.bmm(..., out_dtype=float32) runs for ``dtype`` inputs on ``device``."""
    if device.type != "cuda" or dtype == torch.float32:
        return False
    try:
        a = torch.ones(2, 2, 16, device=device, dtype=dtype)
        return torch.bmm(a, a.transpose(1, 2), out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError):
        return False


def attention_bias(prefix_start: torch.Tensor, prefix_len: torch.Tensor, step: torch.Tensor, prefix_slots: int,
                   width: int) -> torch.Tensor:
    """[R, prefix_slots + width] float32: 0 on each row's visible keys (its prompt's slots and its completion
    slots [0, step]), -inf elsewhere. prefix_start, prefix_len, step: [R] long."""
    p = torch.arange(prefix_slots, device=step.device)
    s = torch.arange(width, device=step.device)
    prefix = (p >= prefix_start[:, None]) & (p < (prefix_start + prefix_len)[:, None])
    visible = torch.cat([prefix, s <= step[:, None]], dim=1)
    return torch.where(visible, 0.0, -math.inf)


def shared_prefix_attention(q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
                            suffix_k: torch.Tensor, suffix_v: torch.Tensor, bias: torch.Tensor, scaling: float,
                            probs_fn=attention_probs, out_dtype_ok: bool = False) -> torch.Tensor:
    """One decoding step of grouped-query attention over a prompt KV buffer shared by all rows.

    q: [R, H, D] (one new token per row); prefix_k/v: [KV, P, D] (shared); suffix_k/v: [R, KV, S, D]
    (each row's completion); bias: [P + S] or [R, P + S] float32 (0 where a key is visible to the row,
    -inf elsewhere; see :func:`attention_bias`). Returns [R, H, D].
    """
    rows, heads, dim = q.shape
    kv_heads, prefix_len, _ = prefix_k.shape
    group = heads // kv_heads
    suffix_len = suffix_k.shape[2]
    if bias.dim() == 2:
        bias = bias[:, None, None, :]
    # prefix: all rows' queries of one KV head against that head's keys, in one matrix product
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
    def _attention_kernel(Q, PK, PV, SK, SV, OUT, ACC, ML, prefix_start_ptr, prefix_len_ptr, step_ptr, scale,
                          stride_qr, stride_qh, stride_ph, stride_pp, stride_sr, stride_sh, stride_ss,
                          stride_or, stride_oh, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                          HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, SPLITS: tl.constexpr, IEEE: tl.constexpr):
        # program (row r, KV head h, split s): the GROUP query heads of h against keys of blocks s, s+SPLITS, ...
        r = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.program_id(2)
        prefix_start = tl.load(prefix_start_ptr + r).to(tl.int32)
        prefix_len = tl.load(prefix_len_ptr + r).to(tl.int32)
        suffix_len = tl.load(step_ptr + r).to(tl.int32) + 1
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
            offsets = h * stride_ph + (prefix_start + pos)[:, None] * stride_pp + offs_d[None, :]
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
                            suffix_v: torch.Tensor, prefix_start: torch.Tensor, prefix_len: torch.Tensor,
                            step: torch.Tensor, scaling: float) -> torch.Tensor:
    """:func:`shared_prefix_attention` as one Triton kernel (flash-decoding), reading lengths on the device.

    prefix_start, prefix_len, step: [R] long device tensors (see the module docstring), so one CUDA graph
    serves every step and every assignment of rows to prompts. Only the visible K/V tiles are read.
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
        q, prefix_k, prefix_v, suffix_k, suffix_v, out, acc, ml, prefix_start, prefix_len, step, scaling,
        q.stride(0), q.stride(1), prefix_k.stride(0), prefix_k.stride(1),
        suffix_k.stride(0), suffix_k.stride(1), suffix_k.stride(2), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=dim, BLOCK=TRITON_BLOCK, SPLITS=splits, IEEE=ieee)
    if splits > 1:
        _combine_kernel[(rows, kv_heads)](acc, ml, out, out.stride(0), out.stride(1), GROUP=group,
                                          GROUP_PAD=group_pad, HEAD_DIM=dim, SPLITS=splits)
    return out


# ------------------------------------------------------------------------------------------ op sets
class EagerOps:
    """The elementwise pieces of a decode step and its attention, as plain PyTorch ops."""

    triton_attention = False
    rms_norm = staticmethod(rms_norm)
    add_rms_norm = staticmethod(add_rms_norm)
    rope_q_k = staticmethod(rope_q_k)
    silu_mul = staticmethod(silu_mul)
    attention_probs = staticmethod(attention_probs)


class FastOps(EagerOps):
    """The same pieces fused by torch.compile (one or two kernels each), and the Triton attention kernel."""

    def __init__(self) -> None:
        self.triton_attention = triton is not None
        self.rms_norm = torch.compile(rms_norm, fullgraph=True)
        self.add_rms_norm = torch.compile(add_rms_norm, fullgraph=True)
        self.rope_q_k = torch.compile(rope_q_k, fullgraph=True)
        self.silu_mul = torch.compile(silu_mul, fullgraph=True)
        self.attention_probs = torch.compile(attention_probs, fullgraph=True)


_kernel_checks: dict[tuple, str | None] = {}


def fast_kernels_unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when the Triton attention kernel (and inductor, which also emits Triton) runs correctly for
    ``dtype`` on ``device``; otherwise why not. Checked once per (device, dtype): capability first (Triton
    needs sm_70+, bf16 needs sm_80+; a T4 is sm_75 with fp16), then one small random problem against the
    PyTorch attention."""
    if device.type != "cuda":
        return f"fast kernels need CUDA, not {device.type}"
    key = (str(device), dtype)
    if key in _kernel_checks:
        return _kernel_checks[key]
    capability = torch.cuda.get_device_capability(device)
    sm = f"sm_{capability[0]}{capability[1]}"
    if triton is None:
        reason = "Triton is not installed"
    elif capability < (7, 0):
        reason = f"Triton kernels need sm_70 or newer; this GPU is {sm}"
    elif dtype == torch.bfloat16 and capability < (8, 0):
        reason = f"bf16 Triton kernels need sm_80 or newer; this GPU is {sm} (use fp16)"
    else:
        reason = _triton_attention_self_check(device, dtype, sm)
    _kernel_checks[key] = reason
    return reason


def _triton_attention_self_check(device: torch.device, dtype: torch.dtype, sm: str) -> str | None:
    gen = torch.Generator(device=device).manual_seed(0)
    rows, heads, kv_heads, dim, prefix_cap, suffix_cap = 3, 16, 2, 128, 256, 128

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    q, pk, pv = rand(rows, heads, dim), rand(kv_heads, prefix_cap, dim), rand(kv_heads, prefix_cap, dim)
    sk, sv = rand(rows, kv_heads, suffix_cap, dim), rand(rows, kv_heads, suffix_cap, dim)
    start = torch.tensor([0, 0, 128], device=device)
    length = torch.tensor([100, 100, 77], device=device)
    step = torch.tensor([0, 70, 127], device=device)
    try:
        out = triton_decode_attention(q, pk, pv, sk, sv, start, length, step, dim ** -0.5)
        torch.cuda.synchronize(device)
    except Exception as err:  # compiler or launch failure on this GPU / Triton version
        return f"the Triton attention kernel does not run on {sm} in {dtype} ({type(err).__name__}: {str(err)[:160]})"
    bias = attention_bias(start, length, step, prefix_cap, suffix_cap).double()
    ref = shared_prefix_attention(q.double(), pk.double(), pv.double(), sk.double(), sv.double(), bias, dim ** -0.5)
    error = float((out.double() - ref).norm() / ref.norm())
    if not math.isfinite(error) or error > 2e-2:
        return f"the Triton attention kernel is wrong on {sm} in {dtype} (relative error {error:.2g})"
    return None
