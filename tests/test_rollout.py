"""Tests of the rollout engine (nbhelpers.rollout): pure pieces, equality with stock generate, sampling
statistics, the trainer hook, fallbacks; GPU checks are marked ``gpu`` and skipped without CUDA."""

from __future__ import annotations

import logging
import math
import sys

import pytest
import torch
from PIL import Image, ImageDraw

from nbhelpers import rollout
from nbhelpers.models import apply_lora, build_offline_processor, build_random_model
from nbhelpers.rollout import (RolloutEngine, engine_unavailable_reason, group_consecutive, process_logits,
                               shared_prefix_attention, split_prompts, stock_generate, truncate_at_eos)

TINY_EOS, TINY_PAD = 258, 256  # tiny-random: <|im_end|>, <|endoftext|>
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny_model():
    return build_random_model("tiny-random").eval()


@pytest.fixture(scope="module")
def tiny_processor():
    return build_offline_processor(56 * 56, tiny=True)


def chart(i: int, size: int = 56) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    for j in range(3):
        height = 8 + 6 * ((i + j) % 6)
        draw.rectangle([4 + 16 * j, size - 4 - height, 14 + 16 * j, size - 4], fill=((40 * i) % 255, 90, 200))
    return image


def prompt_inputs(processor, i: int, size: int = 56) -> dict:
    """One chart prompt; every i < 100 gives the same token count (fixed-width question text)."""
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": f"Question {i:02d}: the value of bar {i % 3}?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return dict(processor(text=[text], images=[chart(i, size)], return_tensors="pt"))


# ------------------------------------------------------------------------------------------ pure pieces
@pytest.mark.parametrize("rows, eos, expected", [
    ([[1, 2, 3]], [9], [[1, 2, 3]]),
    ([[1, 9, 3, 9]], [9], [[1, 9]]),
    ([[9, 1], [2, 8, 9]], [8, 9], [[9], [2, 8]]),
    ([[]], [9], [[]]),
])
def test_truncate_at_eos(rows, eos, expected):
    assert truncate_at_eos(rows, eos) == expected


def _reference_attention(q, keys, values, visible, scaling):
    """HF eager attention (repeat_kv, float32 softmax) over explicit keys; visible: [S] bool."""
    heads, kv_heads = q.shape[1], keys.shape[1]
    k = keys.repeat_interleave(heads // kv_heads, dim=1)
    v = values.repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.einsum("rhd,rhsd->rhs", q.double(), k.double()) * scaling
    scores = scores.masked_fill(~visible, -math.inf)
    return torch.einsum("rhs,rhsd->rhd", torch.softmax(scores, -1), v.double())


@pytest.mark.parametrize("rows, heads, kv_heads, prompt_len, prefix_cap, written, width", [
    (1, 4, 2, 5, 8, 1, 4),
    (3, 4, 2, 7, 8, 3, 4),
    (5, 16, 2, 30, 32, 9, 16),
    (2, 4, 4, 8, 8, 4, 4),
])
def test_shared_prefix_attention_matches_eager_attention(rows, heads, kv_heads, prompt_len, prefix_cap, written,
                                                         width):
    gen = torch.Generator().manual_seed(rows * 100 + heads)
    dim = 8
    q = torch.randn(rows, heads, dim, generator=gen)
    prefix_k = torch.randn(kv_heads, prefix_cap, dim, generator=gen)
    prefix_v = torch.randn(kv_heads, prefix_cap, dim, generator=gen)
    suffix_k = torch.randn(rows, kv_heads, width, dim, generator=gen)
    suffix_v = torch.randn(rows, kv_heads, width, dim, generator=gen)
    visible = torch.cat([torch.arange(prefix_cap) < prompt_len, torch.arange(width) < written])
    bias = torch.zeros(prefix_cap + width).masked_fill(~visible, -math.inf)
    out = shared_prefix_attention(q, prefix_k, prefix_v, suffix_k, suffix_v, bias, dim ** -0.5)
    keys = torch.cat([prefix_k.unsqueeze(0).expand(rows, -1, -1, -1), suffix_k], dim=2)
    values = torch.cat([prefix_v.unsqueeze(0).expand(rows, -1, -1, -1), suffix_v], dim=2)
    ref = _reference_attention(q, keys, values, visible, dim ** -0.5)
    assert out.shape == (rows, heads, dim)
    assert torch.allclose(out.double(), ref, atol=1e-5)


@pytest.mark.parametrize("temperature, top_k, top_p, generated, min_new", [
    (1.0, None, 1.0, 0, 0),
    (0.7, None, 0.9, 3, 0),
    (1.3, 5, 0.5, 0, 2),
    (0.5, 20, 1.0, 2, 2),
])
def test_process_logits_matches_hf_processor_list(temperature, top_k, top_p, generated, min_new):
    from transformers.generation.logits_process import (LogitsProcessorList, MinNewTokensLengthLogitsProcessor,
                                                        SuppressTokensLogitsProcessor, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    eos, suppress = torch.tensor([4, 9]), torch.tensor([11])
    hf = LogitsProcessorList([MinNewTokensLengthLogitsProcessor(10, min_new, eos),
                              SuppressTokensLogitsProcessor([11])])
    if temperature != 1.0:
        hf.append(TemperatureLogitsWarper(temperature))
    if top_k:
        hf.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        hf.append(TopPLogitsWarper(top_p))
    input_ids = torch.zeros(3, 10 + generated, dtype=torch.long)
    expected = hf(input_ids, logits[:, :].to(torch.float32))
    got = process_logits(logits, generated=generated, min_new_tokens=min_new, eos_token_ids=eos,
                         suppress_token_ids=suppress, warpers=rollout.make_warpers(temperature, top_k, top_p))
    assert got.dtype == torch.float32
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    assert torch.allclose(got[~torch.isinf(got)], expected[~torch.isinf(expected)])


def _trl_style_fields(prompts: list[tuple[list[int], list[tuple[int, int, int]]]], feature: int = 3):
    """(prompt_ids, multimodal_fields) as TRL batches them: pixel rows and grid rows concatenated."""
    prompt_ids, grids, pixels, token_types = [], [], [], []
    for ids, image_grids in prompts:
        prompt_ids.append(ids)
        token_types.append([1 if t == 99 else 0 for t in ids])
        for j, grid in enumerate(image_grids):
            grids.append(list(grid))
            patches = grid[0] * grid[1] * grid[2]
            pixels.append(torch.full((patches, feature), float(sum(ids) + j)))
    fields = {"pixel_values": torch.cat(pixels), "image_grid_thw": torch.tensor(grids),
              "mm_token_type_ids": token_types}
    return prompt_ids, fields


@pytest.mark.parametrize("prompts, expected_groups", [
    # two prompts x two generations, one image each (grid 1x2x2 = 4 patches -> 1 token with merge 2)
    ([([1, 99, 2], [(1, 2, 2)])] * 2 + [([3, 99, 4], [(1, 2, 2)])] * 2, [(0, 2), (2, 2)]),
    # same ids, different image size -> different prompts
    ([([1, 99, 99, 2], [(1, 2, 4)]), ([1, 99, 99, 2], [(1, 4, 2)])], [(0, 1), (1, 1)]),
    # a prompt with two images, repeated three times
    ([([5, 99, 6, 99], [(1, 2, 2), (1, 2, 2)])] * 3, [(0, 3)]),
    # a text-only prompt between image prompts
    ([([1, 99], [(1, 2, 2)]), ([7, 8], []), ([7, 8], [])], [(0, 1), (1, 2)]),
])
def test_split_and_group_trl_prompts(prompts, expected_groups):
    prompt_ids, fields = _trl_style_fields(prompts)
    items = split_prompts(prompt_ids, fields, image_token_id=99, merge_size=2)
    assert [it["input_ids"][0].tolist() for it in items] == prompt_ids
    for item, (_, image_grids) in zip(items, prompts):
        patches = sum(t * h * w for t, h, w in image_grids)
        assert item.get("pixel_values", torch.empty(0, 3)).shape[0] == patches
        assert item["mm_token_type_ids"].shape == item["input_ids"].shape
    assert group_consecutive(items) == expected_groups


def test_split_prompts_names_the_prompt_without_an_image():
    prompt_ids, fields = _trl_style_fields([([1, 99], [(1, 2, 2)])])
    with pytest.raises(ValueError, match="prompt 1"):
        split_prompts(prompt_ids + [[2, 99]], fields, image_token_id=99, merge_size=2)


# ------------------------------------------------------------------------------------------ availability
def test_unavailable_reasons(tiny_model):
    assert engine_unavailable_reason(tiny_model) is None  # CUDA or the CPU
    with torch.device("meta"):
        on_meta = type(tiny_model)(tiny_model.config)
    assert "CUDA or the CPU; the model is on meta" in engine_unavailable_reason(on_meta)
    assert "Linear" in engine_unavailable_reason(torch.nn.Linear(2, 2))
    assert rollout.model_unsupported_reason(tiny_model) is None


def test_auto_runs_the_engine_on_cpu_and_a_forced_fallback_warns_once(tiny_model, tiny_processor, caplog,
                                                                      monkeypatch):
    monkeypatch.setattr(rollout.notices, "_warned_reasons", set())
    inputs = prompt_inputs(tiny_processor, 1)
    kwargs = dict(max_new_tokens=3, temperature=1.0, top_p=1.0, eos_token_ids=[TINY_EOS], pad_token_id=TINY_PAD)
    stock_calls = []
    monkeypatch.setattr(rollout.dispatch, "stock_generate", lambda *a, **k: stock_calls.append(1) or [[TINY_EOS]])
    first = rollout.sample_completions(tiny_model, inputs, 4, **kwargs)
    assert len(first) == 4 and all(1 <= len(c) <= 3 for c in first) and stock_calls == []
    assert rollout.dispatch._engines[tiny_model].device.type == "cpu"
    monkeypatch.setenv(rollout.FALLBACK_ENV, "stock")
    with caplog.at_level(logging.WARNING, logger="nbhelpers.rollout"):
        rollout.sample_completions(tiny_model, inputs, 2, **kwargs)
        rollout.sample_completions(tiny_model, inputs, 2, **kwargs)
    assert stock_calls == [1, 1]
    warnings = [r for r in caplog.records if "forces stock generation" in r.getMessage()]
    assert len(warnings) == 1 and "stock generate" in warnings[0].getMessage()
    with pytest.raises(RuntimeError, match="forces stock generation"):
        rollout.sample_completions(tiny_model, inputs, 2, engine="fast", **kwargs)


@pytest.mark.parametrize("engine,reason,needs_logprobs,expected", [
    ("stock", "no CUDA", True, "stock"),      # stock and vllm as asked: the engine's availability is not looked at
    ("vllm", "no CUDA", False, "vllm"),
    ("fast", None, True, "fast"),
    ("auto", None, True, "fast"),
    ("auto", "no CUDA", False, "stock"),      # falls back, saying why
    ("fast", "no CUDA", False, "rollout_engine 'fast' cannot run here: no CUDA"),
    ("auto", "no CUDA", True, "importance_sampling_correction is on, but the fast rollout engine cannot run here "
                              r"\(no CUDA\)"),
    ("fastest", None, False, "rollout engine must be one of auto, stock, fast, vllm"),
])
def test_resolve_engine_is_the_one_rule_for_sampling_and_training(engine, reason, needs_logprobs, expected,
                                                                   monkeypatch):
    monkeypatch.setattr(rollout.notices, "_warned_reasons", set())
    resolve = lambda: rollout.resolve_engine(engine, "model", unavailable_reason=lambda model: reason,  # noqa: E731
                                             needs_logprobs=needs_logprobs)
    if expected in ("stock", "vllm", "fast"):
        assert resolve() == expected
    else:
        with pytest.raises((RuntimeError, ValueError), match=expected):
            resolve()


def test_vllm_switch_raises_a_clear_error_without_vllm(tiny_model, tiny_processor, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(RuntimeError, match="needs the vllm package"):
        rollout.sample_completions(tiny_model, prompt_inputs(tiny_processor, 1), 2, max_new_tokens=3,
                                   temperature=1.0, top_p=1.0, eos_token_ids=[TINY_EOS], pad_token_id=TINY_PAD,
                                   engine="vllm")


@pytest.mark.parametrize("ids, expected", [([1, 5, 5, 5, 2, 5], [1, 5, 2, 5]), ([5], [5]), ([1, 2], [1, 2])])
def test_collapse_image_pads(ids, expected):
    assert rollout.collapse_image_pads(ids, 5) == expected


# ------------------------------------------------------------------------------------------ equality with stock
def _greedy_mismatches(model, processor, n_prompts: int, new_tokens: int) -> list[int]:
    """Prompts whose greedy completion differs between the engine (one prompt at a time) and stock generate
    (all prompts in one batch; they share a length, so there is no padding)."""
    batch = [prompt_inputs(processor, i) for i in range(n_prompts)]
    stacked = {k: torch.cat([b[k] for b in batch]) for k in batch[0]}
    expected = stock_generate(model, stacked, 1, max_new_tokens=new_tokens, temperature=0.0, top_p=1.0,
                              eos_token_ids=[TINY_EOS], pad_token_id=TINY_PAD, min_new_tokens=new_tokens)
    engine = RolloutEngine(model, [TINY_EOS], TINY_PAD, new_tokens, temperature=0.0, min_new_tokens=new_tokens)
    got = [engine.generate(b, 1)[0] for b in batch]
    assert all(len(g) == new_tokens for g in got)
    return [i for i, (g, e) in enumerate(zip(got, expected)) if g != e]


def test_greedy_tokens_equal_stock_generate_fp32(tiny_model, tiny_processor):
    assert _greedy_mismatches(tiny_model, tiny_processor, n_prompts=8, new_tokens=48) == []


def test_greedy_tokens_equal_stock_generate_with_unmerged_lora(tiny_processor):
    model = apply_lora(build_random_model("tiny-random"), r=4, dropout=0.0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5, generator=torch.Generator().manual_seed(len(name)))
    model.eval()
    assert _greedy_mismatches(model, tiny_processor, n_prompts=2, new_tokens=24) == []
    base = model.get_base_model()
    with model.disable_adapter():
        plain = RolloutEngine(base, [TINY_EOS], TINY_PAD, 8, temperature=0.0, min_new_tokens=8)
        without = plain.generate(prompt_inputs(tiny_processor, 0), 1)
    with_lora = RolloutEngine(model, [TINY_EOS], TINY_PAD, 8, temperature=0.0, min_new_tokens=8)
    assert with_lora.generate(prompt_inputs(tiny_processor, 0), 1) != without  # the adapters do act


# ------------------------------------------------------------------------------------------ sampling statistics
def _chi_square_p(a: list[int], b: list[int], vocab: int, min_count: int = 10) -> float:
    """p-value of a two-sample chi-square homogeneity test on token counts (sparse bins pooled)."""
    ca = torch.bincount(torch.tensor(a), minlength=vocab).double()
    cb = torch.bincount(torch.tensor(b), minlength=vocab).double()
    dense = (ca + cb) >= min_count
    ca = torch.cat([ca[dense], ca[~dense].sum().view(1)])
    cb = torch.cat([cb[dense], cb[~dense].sum().view(1)])
    keep = (ca + cb) > 0
    ca, cb = ca[keep], cb[keep]
    na, nb = ca.sum(), cb.sum()
    stat = (((ca * (nb / na).sqrt() - cb * (na / nb).sqrt()) ** 2) / (ca + cb)).sum()
    dof = float(len(ca) - 1)
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


def _check_sampling_statistics(model, processor) -> None:
    """10,000 draws of the first three tokens from stock generate and the engine must match (chi-square at level
    1e-3 per position, Bonferroni), and a deliberately wrong temperature must fail (negative control).

    A short text prompt keeps the stock path's 10,000-row prefill cheap; images are covered by the greedy checks.
    """
    draws, new_tokens, temperature = 10_000, 3, 0.25
    text = processor.apply_chat_template([{"role": "user", "content": "Bar?"}], add_generation_prompt=True)
    inputs = dict(processor(text=[text], return_tensors="pt"))
    vocab = model.config.text_config.vocab_size
    for top_p in (0.8, 1.0):
        torch.manual_seed(0)
        stock = stock_generate(model, inputs, draws, max_new_tokens=new_tokens, temperature=temperature,
                               top_p=top_p, eos_token_ids=[TINY_EOS], pad_token_id=TINY_PAD,
                               min_new_tokens=new_tokens)

        def smallest_p(temp: float) -> float:
            engine = RolloutEngine(model, [TINY_EOS], TINY_PAD, new_tokens, temperature=temp, top_p=top_p,
                                   min_new_tokens=new_tokens)
            ours = engine.generate(inputs, draws)
            return min(_chi_square_p([s[i] for s in stock], [s[i] for s in ours], vocab) for i in range(new_tokens))

        alpha = 1e-3 / new_tokens
        assert smallest_p(temperature) > alpha, top_p
        assert smallest_p(temperature * 1.25) < alpha, top_p  # negative control: a wrong temperature fails


def test_sampled_token_frequencies_match_stock_and_catch_a_wrong_temperature(tiny_model, tiny_processor):
    _check_sampling_statistics(tiny_model, tiny_processor)


def _fused_gumbel(logits, temp, bias):
    below = torch.zeros(logits.shape[0], dtype=torch.bool)
    return rollout.gumbel_max_sample(logits, 1.0 / temp, bias, bias, below)


def _seeded_gumbel(logits, temp, bias):
    """The seeded sampler, one sample key per row (problem seed 11, sample index = row), token index 0."""
    keys = torch.tensor([rollout.sample_key(11, s) for s in range(logits.shape[0])])
    scores = logits.float() / temp + bias
    return rollout.seeded_gumbel_sample(scores, keys[:, 0], keys[:, 1], torch.zeros(len(keys), dtype=torch.long),
                                        rollout.logits.column_keys(scores.shape[-1], "cpu"))


@pytest.mark.parametrize("sampler", [_fused_gumbel, _seeded_gumbel])
@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_gumbel_max_samplers_match_multinomial_and_catch_a_wrong_temperature(sampler, temperature):
    draws = 10_000
    logits = (torch.randn(1, 300, generator=torch.Generator().manual_seed(3)) * 2).to(torch.bfloat16)
    bias = torch.zeros(300)
    bias[[0, 7]] = -math.inf
    torch.manual_seed(0)
    probs = torch.softmax(logits.float() / temperature + bias, dim=-1).expand(draws, -1)
    reference = torch.multinomial(probs, 1).squeeze(1).tolist()

    def gumbel(temp: float) -> list[int]:
        return sampler(logits.expand(draws, -1), temp, bias).tolist()

    ours = gumbel(temperature)
    assert not {0, 7} & set(ours)
    assert _chi_square_p(reference, ours, 300) > 1e-3
    assert _chi_square_p(reference, gumbel(temperature * 1.25), 300) < 1e-3


# ------------------------------------------------------------------------------------------ trainer hook
def _tiny_trainer(fast: bool, processor, recorded: list, output_dir):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    class Trainer(GRPOTrainer):
        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
            if fast:
                out = rollout.trainer_generate(self, prompt_ids, multimodal_fields)
            else:
                out = super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations)
            recorded.append((prompt_ids, out[0]))
            return out

    torch.manual_seed(0)
    model = apply_lora(build_random_model("tiny-random"), r=4, dropout=0.0)
    with torch.no_grad():  # very sharp logits: sampling at temperature 1 is deterministic in practice
        model.get_base_model().model.language_model.norm.weight.mul_(2000.0)
    rows = [{"prompt": [{"role": "user", "content": [{"type": "image"},
                                                      {"type": "text", "text": f"Question {i:02d}?"}]}],
             "image": chart(i)} for i in range(4)]

    def reward(completions, **kwargs):
        return [float(len(c[0]["content"]) % 3) for c in completions]

    args = GRPOConfig(output_dir=str(output_dir), per_device_train_batch_size=4, num_generations=2,
                      gradient_accumulation_steps=1, max_completion_length=12, max_steps=1, logging_steps=1,
                      report_to=[], save_strategy="no", learning_rate=1e-2, beta=0.0, use_cpu=True,
                      dataloader_num_workers=0, seed=0, disable_tqdm=True)
    return Trainer(model=model, reward_funcs=[reward], args=args, train_dataset=Dataset.from_list(rows),
                   processing_class=processor)


def test_trainer_hook_gives_stock_completions_order_and_loss(tmp_path):
    processor = build_offline_processor(56 * 56, tiny=True)
    processor.tokenizer.padding_side = "left"
    stock_calls, fast_calls = [], []
    stock = _tiny_trainer(False, processor, stock_calls, tmp_path / "stock")
    stock.train()
    fast = _tiny_trainer(True, processor, fast_calls, tmp_path / "fast")
    fast.train()
    (stock_prompts, stock_out), = stock_calls
    (fast_prompts, fast_out), = fast_calls
    assert stock_prompts == fast_prompts
    # TRL repeats each prompt num_generations times, consecutively
    assert all(stock_prompts[2 * i] == stock_prompts[2 * i + 1] for i in range(len(stock_prompts) // 2))
    assert fast_out == stock_out
    stock_loss = stock.state.log_history[0]["loss"]
    assert math.isclose(fast.state.log_history[0]["loss"], stock_loss, rel_tol=1e-4, abs_tol=1e-6)


# ------------------------------------------------------------------------------------------ GPU
@pytest.fixture
def exact_fp32():
    """float32 matmuls and convolutions without TF32 (cuDNN uses TF32 for convolutions by default)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.gpu
@gpu
def test_gpu_greedy_fp32_3b_batch_of_64_prompts_matches_stock(exact_fp32):
    processor = build_offline_processor(320 * 28 * 28, tiny=False)
    model = build_random_model("qwen2-5-3b-random", torch.float32, "cuda").eval()
    eos, pad, new_tokens = 151645, 151643, 64
    batch = [prompt_inputs(processor, i, size=448) for i in range(64)]
    stacked = {k: torch.cat([b[k] for b in batch]).cuda() for k in batch[0]}
    with torch.no_grad():
        stock = model.generate(**stacked, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               eos_token_id=[eos], pad_token_id=pad, output_scores=True,
                               return_dict_in_generate=True)
    expected = stock.sequences[:, stacked["input_ids"].shape[1]:].tolist()
    engine = RolloutEngine(model, [eos], pad, new_tokens, temperature=0.0, min_new_tokens=new_tokens)
    got = [c[0] for c in engine.generate_batch([(b, 1) for b in batch])]  # one engine run, 64 prompts
    assert engine.last_stats["prompts"] == 64
    diverged = {}  # prompt -> (first differing position, stock's score margin of its token over ours there)
    for i, (g, e) in enumerate(zip(got, expected)):
        if g != e:
            j = next(k for k, (a, b) in enumerate(zip(g, e)) if a != b)
            diverged[i] = (j, float(stock.scores[j][i, e[j]] - stock.scores[j][i, g[j]]))
    assert diverged == {}, f"engine differs from stock greedy (prompt: position, logit margin): {diverged}"
    assert engine.graph_captures >= 1


@pytest.mark.gpu
@gpu
def test_gpu_graphs_follow_in_place_lora_updates_and_moved_storage(tiny_processor):
    model = apply_lora(build_random_model("tiny-random", torch.float32, "cuda"), r=4, dropout=0.0).eval()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    engine = RolloutEngine(model, [TINY_EOS], TINY_PAD, 40, temperature=0.0, min_new_tokens=40)
    inputs = prompt_inputs(tiny_processor, 2)

    def stock():
        return stock_generate(model, inputs, 1, max_new_tokens=40, temperature=0.0, top_p=1.0,
                              eos_token_ids=[TINY_EOS], pad_token_id=TINY_PAD, min_new_tokens=40)

    before = engine.generate(inputs, 1)
    assert before == stock()
    captures = engine.graph_captures
    with torch.no_grad():  # an optimizer step: in place, same storage
        for i, p in enumerate(lora_b):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)).cuda() * 0.5)
    after = engine.generate(inputs, 1)
    assert after == stock() and after != before
    assert engine.graph_captures == captures  # the same graphs, reading the updated weights
    with torch.no_grad():  # storage moves (as after ZeRO-3 gathering or model.to): graphs are captured again
        for p in lora_b:
            p.data = p.data.clone().mul_(-1.0)
    moved = engine.generate(inputs, 1)
    assert moved == stock() and engine.graph_captures > captures


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("rows, prompt_len, step, dtype", [
    (2, 398, 0, torch.bfloat16), (2, 398, 700, torch.bfloat16), (64, 130, 65, torch.bfloat16),
    (256, 398, 767, torch.bfloat16), (3, 5, 9, torch.float16), (7, 64, 63, torch.float32),
])
def test_gpu_triton_attention_matches_pytorch_attention(rows, prompt_len, step, dtype):
    """Rows of one step read prompts of different regions and lengths and are at different completion steps."""
    gen = torch.Generator(device="cuda").manual_seed(rows + step)
    heads, kv_heads, dim, region, suffix_cap = 16, 2, 128, 512, 768

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device="cuda").to(dtype)

    q, prefix_k, prefix_v = rand(rows, heads, dim), rand(kv_heads, 3 * region, dim), rand(kv_heads, 3 * region, dim)
    suffix_k, suffix_v = rand(rows, kv_heads, suffix_cap, dim), rand(rows, kv_heads, suffix_cap, dim)
    r = torch.arange(rows, device="cuda")
    starts = (r % 3) * region
    lengths = torch.clamp(prompt_len - 37 * (r % 3), min=1)
    steps = torch.clamp(step - 13 * (r % 4), min=0)
    out = rollout.triton_decode_attention(q, prefix_k, prefix_v, suffix_k, suffix_v, starts, lengths, steps,
                                          dim ** -0.5)
    bias = rollout.attention_bias(starts, lengths, steps, 3 * region, suffix_cap)
    ref = shared_prefix_attention(q.double(), prefix_k.double(), prefix_v.double(), suffix_k.double(),
                                  suffix_v.double(), bias.double(), dim ** -0.5)
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert torch.allclose(out.double(), ref, atol=tolerance, rtol=tolerance)


@pytest.mark.gpu
@gpu
def test_gpu_sampled_token_frequencies_match_stock(tiny_processor):
    """The same statistics on CUDA, where temperature-only sampling takes the fused Gumbel-max path."""
    _check_sampling_statistics(build_random_model("tiny-random", torch.float32, "cuda").eval(), tiny_processor)


def test_nonfinite_logits_raise_a_clear_error_naming_the_parameters(tiny_processor):
    """A NaN weight would send NaN probabilities to torch.multinomial: on CUDA a device-side assert that
    kills the process with no hint of the cause. The engine says what is wrong instead."""
    model = build_random_model("tiny-random")
    engine = RolloutEngine(model, [TINY_EOS], TINY_PAD, 4, temperature=1.0)
    assert len(engine.generate(prompt_inputs(tiny_processor, 0), 2)) == 2
    with torch.no_grad():
        model.lm_head.weight[3, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"logits are NaN or inf; 1 parameter tensors hold NaN/inf \(e\.g\. "
                                                 r"model\.language_model\.embed_tokens\.weight\)"):  # tied to lm_head
        engine.generate(prompt_inputs(tiny_processor, 0), 2)
