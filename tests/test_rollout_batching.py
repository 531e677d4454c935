"""Tests of the rollout engine's multi-prompt runs, continuous batching, seeded noise, LoRA decode weights and
fallback switches (nbhelpers.rollout). CPU unless marked ``gpu``."""

from __future__ import annotations

import logging

import pytest
import torch

from nbhelpers import rollout
from nbhelpers.config import load_config, resolve_parameter_file
from nbhelpers.models import apply_lora, build_offline_processor, build_random_model
from nbhelpers.rollout import Request, RolloutEngine, stock_generate
from nbhelpers.rollout.weights import DecodeWeights, lora_parts, merged_weight
from test_rollout import TINY_EOS, TINY_PAD, _chi_square_p, gpu, prompt_inputs, tiny_model, tiny_processor  # noqa: F401
from fast_presets import TINY



def text_prompt(processor, text: str) -> dict:
    chat = processor.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return dict(processor(text=[chat], return_tensors="pt"))


def lora_model(device: str = "cpu", dtype=torch.float32, std: float = 0.5):
    model = apply_lora(build_random_model("tiny-random", dtype, device), r=4, dropout=0.0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * std)
    return model.eval()


def greedy_stock(model, inputs, tokens):
    return stock_generate(model, inputs, 1, max_new_tokens=tokens, temperature=0.0, top_p=1.0,
                          eos_token_ids=[TINY_EOS], pad_token_id=TINY_PAD, min_new_tokens=tokens)[0]


# ------------------------------------------------------------------------------------------ seeded noise
def test_hashed_uniforms_are_uniform_and_a_function_of_key_and_counter():
    keys = torch.tensor([rollout.sample_key(5, s) for s in range(64)])
    counter = torch.arange(64)
    columns = rollout.logits.column_keys(1000, "cpu")
    u = rollout.logits.hashed_uniform(keys[:, 0], keys[:, 1], counter, columns)
    assert u.shape == (64, 1000) and float(u.min()) > 0 and float(u.max()) < 1
    bins = torch.histc(u.flatten(), bins=20, min=0, max=1)
    expected = u.numel() / 20
    chi2 = float(((bins - expected) ** 2 / expected).sum())
    assert float(torch.special.gammaincc(torch.tensor(19 / 2, dtype=torch.float64), torch.tensor(chi2 / 2))) > 1e-3
    again = rollout.logits.hashed_uniform(keys[:, 0], keys[:, 1], counter, columns)
    assert torch.equal(u, again)
    shifted = rollout.logits.hashed_uniform(keys[:, 0], keys[:, 1], counter + 1, columns)
    assert float((u == shifted).float().mean()) < 0.01  # another token index draws other noise
    # neighbouring samples and seeds give uncorrelated noise
    assert abs(float(torch.corrcoef(torch.stack([u[0], u[1]]))[0, 1])) < 0.15
    assert rollout.sample_key(5, 0) != rollout.sample_key(6, 0) != rollout.sample_key(5, 1)


@pytest.mark.parametrize("rows, kv_heads, heads", [(4, 2, 4), (5, 2, 16), (3, 4, 4)])
def test_attention_with_per_row_prompt_regions_matches_eager_attention(rows, kv_heads, heads):
    """Rows read different prompt regions and lengths of one buffer and are at different completion steps."""
    gen = torch.Generator().manual_seed(rows * 10 + heads)
    dim, region, regions, width = 8, 16, 3, 12
    q = torch.randn(rows, heads, dim, generator=gen)
    prefix_k = torch.randn(kv_heads, regions * region, dim, generator=gen)
    prefix_v = torch.randn(kv_heads, regions * region, dim, generator=gen)
    suffix_k = torch.randn(rows, kv_heads, width, dim, generator=gen)
    suffix_v = torch.randn(rows, kv_heads, width, dim, generator=gen)
    r = torch.arange(rows)
    starts, lengths, steps = (r % regions) * region, 3 + 4 * (r % 3), (5 * r) % width
    bias = rollout.attention_bias(starts, lengths, steps, regions * region, width)
    out = rollout.shared_prefix_attention(q, prefix_k, prefix_v, suffix_k, suffix_v, bias, dim ** -0.5)
    group = heads // kv_heads
    for row in range(rows):  # reference: each row alone, its own keys gathered explicitly, keys repeated per head
        keys = torch.cat([prefix_k[:, starts[row]:starts[row] + lengths[row]], suffix_k[row, :, :steps[row] + 1]], 1)
        values = torch.cat([prefix_v[:, starts[row]:starts[row] + lengths[row]], suffix_v[row, :, :steps[row] + 1]], 1)
        keys, values = keys.repeat_interleave(group, 0).double(), values.repeat_interleave(group, 0).double()
        probs = torch.softmax(torch.einsum("hd,hsd->hs", q[row].double(), keys) * dim ** -0.5, -1)
        assert torch.allclose(out[row].double(), torch.einsum("hs,hsd->hd", probs, values), atol=1e-5)


# ------------------------------------------------------------------------------------------ decode weights
@pytest.mark.parametrize("adapters, scaling", [(1, 2.0), (2, 0.5), (0, 1.0)])
def test_merged_weight_equals_base_plus_lora_and_leaves_the_base_alone(adapters, scaling):
    gen = torch.Generator().manual_seed(adapters)
    weight = torch.randn(12, 10, generator=gen)
    before = weight.clone()
    parts = [(torch.randn(3, 10, generator=gen), torch.randn(12, 3, generator=gen), scaling) for _ in range(adapters)]
    x = torch.randn(5, 10, generator=gen, dtype=torch.float64)
    reference = x @ weight.double().t() + sum((x @ a.double().t() @ b.double().t()) * s for a, b, s in parts)
    merged = merged_weight(weight, parts, torch.float32)
    assert torch.allclose(x @ merged.double().t(), reference, rtol=1e-5, atol=1e-5)
    assert torch.equal(weight, before)


@pytest.mark.parametrize("mode", ["fused", "adapters", "modules"])
def test_decode_weights_match_the_peft_modules_in_fp32(mode):
    model = lora_model()
    layers = list(model.get_base_model().model.language_model.layers)
    weights = DecodeWeights(layers, mode, torch.float32)
    x = torch.randn(6, layers[0].self_attn.q_proj.in_features, generator=torch.Generator().manual_seed(1))
    attn = layers[1].self_attn
    with torch.no_grad():
        expected = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]
        got = weights.qkv(1, x)
        for e, g in zip(expected, got):
            assert torch.allclose(g, e, rtol=1e-5, atol=1e-5)
        mlp = layers[0].mlp
        h = torch.randn(6, mlp.down_proj.in_features, generator=torch.Generator().manual_seed(2))
        assert torch.allclose(weights.down(0, h), mlp.down_proj(h), rtol=1e-5, atol=1e-5)
    assert (weights.copy_bytes() > 0) == (mode != "modules")


def test_decode_weights_follow_in_place_updates_without_touching_the_model():
    model = lora_model()
    layers = list(model.get_base_model().model.language_model.layers)
    weights = DecodeWeights(layers, "fused", torch.float32)
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    storage = weights.groups[0][0].weight.data_ptr()
    q = layers[0].self_attn.q_proj
    with torch.no_grad():
        q.lora_B["default"].weight.add_(1.0)  # an optimizer step
    snapshot["base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_B.default.weight"].add_(1.0)
    weights.refresh()
    x = torch.randn(3, q.in_features)
    with torch.no_grad():
        assert torch.allclose(weights.qkv(0, x)[0], q(x), rtol=1e-5, atol=1e-5)
    assert weights.groups[0][0].weight.data_ptr() == storage  # refreshed in place: CUDA graphs stay valid
    for name, param in model.named_parameters():
        assert torch.equal(param, snapshot[name]), name


def test_bf16_merge_rounds_once_and_loses_only_sub_ulp_deltas():
    """The documented limit of merged bf16 copies: W + delta is rounded once to bf16."""
    weight = torch.full((4, 4), 1.0, dtype=torch.bfloat16)
    tiny = [(torch.eye(4), torch.full((4, 4), 1e-3), 1.0)]  # 1e-3 < half a bf16 ulp at 1.0 (2**-8)
    large = [(torch.eye(4), torch.full((4, 4), 0.03), 1.0)]
    assert torch.equal(merged_weight(weight, tiny, torch.bfloat16), weight)
    assert torch.allclose(merged_weight(weight, large, torch.bfloat16).float(), torch.full((4, 4), 1.03), atol=4e-3)


@pytest.mark.parametrize("need_gb, free_gb, total_gb, fits", [
    (5.5, 120.0, 140.0, True),  # 3B LoRA copies on an H200
    (5.5, 7.0, 15.0, False),  # the same on a T4-sized budget during training: adapters instead
    (3.6, 8.0, 15.0, True),  # 3B bare fused q/k/v and gate/up copies beside a 7 GB model on 15 GB
    (3.6, 8.0, 14.0, False),  # over a quarter of the device
    (1.0, 1.9, 80.0, False),  # over half of what is free
])
def test_fused_copies_fit_table(need_gb, free_gb, total_gb, fits):
    assert rollout.weights.fused_copies_fit(int(need_gb * 1e9), int(free_gb * 1e9), int(total_gb * 1e9)) is fits


def test_dora_adapters_use_the_modules(caplog):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_random_model("tiny-random"), LoraConfig(r=2, target_modules=["q_proj"],
                                                                         use_dora=True))
    layers = list(model.get_base_model().model.language_model.layers)
    with pytest.raises(rollout.weights.UnsupportedAdapter):
        lora_parts(layers[0].self_attn.q_proj)
    assert rollout.weights.choose_mode(layers, torch.device("cpu"), torch.float32) == "modules"


# ------------------------------------------------------------------------------------------ several prompts
@pytest.mark.parametrize("mode", ["fused", "adapters", "modules"])
def test_greedy_batch_of_prompts_equals_stock_per_prompt_with_lora(tiny_processor, mode):
    """One engine run, three prompts of different lengths with 1, 3 and 2 rows: every row is stock's greedy."""
    model = lora_model()
    prompts = [(prompt_inputs(tiny_processor, 0), 1), (text_prompt(tiny_processor, "A longer text-only prompt?"), 3),
               (prompt_inputs(tiny_processor, 5), 2)]
    snapshot = [p.detach().clone() for p in model.parameters()]
    engine = RolloutEngine(model, [TINY_EOS], TINY_PAD, 20, temperature=0.0, min_new_tokens=20, weights=mode)
    got = engine.generate_batch(prompts)
    assert engine.weights_mode == mode
    assert engine.last_stats["rows"] == 6 and engine.last_stats["prompts"] == 3
    for (inputs, n), completions in zip(prompts, got):
        assert completions == [greedy_stock(model, inputs, 20)] * n
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), snapshot))  # rollouts change no weight


def test_engine_follows_in_place_adapter_updates_between_runs(tiny_processor):
    model = lora_model()
    inputs = prompt_inputs(tiny_processor, 3)
    engine = RolloutEngine(model, [TINY_EOS], TINY_PAD, 12, temperature=0.0, min_new_tokens=12)
    before = engine.generate(inputs, 1)[0]
    with torch.no_grad():  # an optimizer step on the adapters, in place
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(-1.5)
    after = engine.generate(inputs, 1)[0]
    assert after == greedy_stock(model, inputs, 12) and after != before


def test_greedy_rows_reuse_freed_slots_and_still_equal_stock(tiny_model, tiny_processor):
    """Forced lengths (2 to 13 tokens) with 3 rows for 4 prompts: rows are refilled mid-run."""
    prompts = [prompt_inputs(tiny_processor, i) for i in range(4)]
    lengths = [[2, 13, 5], [7, 3, 11], [13, 2, 4], [9, 9, 1]]
    engine = RolloutEngine(tiny_model, [TINY_EOS], TINY_PAD, 13, temperature=0.0, min_new_tokens=13)
    got = dict(engine.generate_stream([Request(i, p, 3, lengths=lengths[i]) for i, p in enumerate(prompts)],
                                      rows=3, regions=2))
    for i, inputs in enumerate(prompts):
        full = greedy_stock(tiny_model, inputs, 13)
        assert got[i] == [full[:length - 1] + [TINY_EOS] for length in lengths[i]]
    stats = engine.last_stats
    assert stats["rows"] == 3 and stats["tokens"] == sum(map(sum, lengths))
    assert stats["busy_row_steps"] < stats["steps"] * 3  # some rows idled at the very end, not before


def test_seeded_stream_equals_each_problem_alone(tiny_model, tiny_processor):
    """Continuous batching with seeds: the same completions as each problem sampled alone with its seed."""
    problems = [(i, prompt_inputs(tiny_processor, i), 1000 + 7 * i) for i in range(5)]
    engine = RolloutEngine(tiny_model, [TINY_EOS], TINY_PAD, 10, temperature=1.0, top_p=0.9)
    lengths = {i: [1 + (3 * i + s) % 10 for s in range(4)] for i in range(5)}
    streamed = dict(engine.generate_stream([Request(k, x, 4, seed, lengths[k]) for k, x, seed in problems], rows=3))
    alone_engine = RolloutEngine(tiny_model, [TINY_EOS], TINY_PAD, 10, temperature=1.0, top_p=0.9)
    for key, inputs, seed in problems:
        alone = next(alone_engine.generate_stream([Request(key, inputs, 4, seed, lengths[key])], rows=4))[1]
        assert streamed[key] == alone, key
    # a problem's samples draw their own noise: their first tokens are not all equal (some may share by chance)
    assert sum(len({c[0] for c in streamed[k]}) > 1 for k in streamed) >= 4


def test_seeded_samples_follow_their_definition(tiny_model, tiny_processor):
    """Sample s of a problem seeded k: token t = argmax(HF-processed scores of the full model's forward on the
    prompt and the tokens so far + Gumbel noise hashed from (sample_key(k, s), t)); reference built without
    the engine."""
    from nbhelpers.rollout.logits import column_keys, make_warpers, process_logits, sample_key, seeded_gumbel_sample

    inputs, seed, n, tokens = prompt_inputs(tiny_processor, 4), 321, 3, 6
    engine = RolloutEngine(tiny_model, [TINY_EOS], TINY_PAD, tokens, temperature=0.8, top_p=0.9,
                           min_new_tokens=tokens)
    got = engine.generate(inputs, n, seed=seed)
    columns = column_keys(tiny_model.config.text_config.vocab_size, "cpu")
    warpers = make_warpers(0.8, None, 0.9)
    for s in range(n):
        key = torch.tensor([sample_key(seed, s)])
        ids = inputs["input_ids"]
        expected = []
        for t in range(tokens):
            grown = {k: torch.cat([v, v.new_zeros(1, ids.shape[1] - v.shape[1])], dim=1)
                     for k, v in inputs.items() if v.dim() == 2 and v.shape[1] == inputs["input_ids"].shape[1]}
            with torch.no_grad():
                logits = tiny_model(**{**inputs, **grown, "input_ids": ids,
                                       "attention_mask": torch.ones_like(ids)}).logits
            scores = process_logits(logits[:, -1], generated=t, min_new_tokens=tokens,
                                    eos_token_ids=torch.tensor([TINY_EOS]), suppress_token_ids=None, warpers=warpers)
            token = int(seeded_gumbel_sample(scores, key[:, 0], key[:, 1], torch.tensor([t]), columns))
            expected.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        assert got[s] == expected, s


def test_stream_yields_problems_as_they_finish_and_validates(tiny_model, tiny_processor):
    engine = RolloutEngine(tiny_model, [TINY_EOS], TINY_PAD, 12, temperature=1.0, min_new_tokens=12)
    requests = [Request("long", prompt_inputs(tiny_processor, 0), 2, 1, [12, 12]),
                Request("short", prompt_inputs(tiny_processor, 1), 2, 2, [2, 2])]
    order = [key for key, _ in engine.generate_stream(requests, rows=4, regions=2)]
    assert order == ["short", "long"]
    with pytest.raises(ValueError, match="one length >= 1 per sample"):
        list(engine.generate_stream([Request("x", prompt_inputs(tiny_processor, 0), 2, 1, [3])]))
    with pytest.raises(ValueError, match="all have seeds or none"):
        list(engine.generate_stream([Request("a", prompt_inputs(tiny_processor, 0), 1, 1),
                                     Request("b", prompt_inputs(tiny_processor, 1), 1, None)], rows=1, regions=1))


def test_stream_grows_prompt_regions_for_a_longer_prompt(tiny_model, tiny_processor):
    short = text_prompt(tiny_processor, "Hi?")
    long = text_prompt(tiny_processor, "word " * 200)
    assert long["input_ids"].shape[1] > 128 > short["input_ids"].shape[1]
    engine = RolloutEngine(tiny_model, [TINY_EOS], TINY_PAD, 6, temperature=0.0, min_new_tokens=6)
    got = dict(engine.generate_stream([Request(0, short, 2), Request(1, long, 1), Request(2, short, 1)], rows=2))
    assert got[0] == [greedy_stock(tiny_model, short, 6)] * 2
    assert got[1] == [greedy_stock(tiny_model, long, 6)]
    assert got[2] == [greedy_stock(tiny_model, short, 6)]


def _batch_statistics(model, processor) -> None:
    """Two prompts in one engine run, 10,000 rows each: per prompt and position, the first three tokens match
    stock generate (chi-square, level 1e-3 with Bonferroni); a wrong temperature fails (negative control)."""
    draws, new_tokens, temperature = 10_000, 3, 0.25
    prompts = [text_prompt(processor, "Bar?"), text_prompt(processor, "Which bar is the tallest one?")]
    vocab = model.config.text_config.vocab_size
    stock = []
    for inputs in prompts:
        torch.manual_seed(0)
        stock.append(stock_generate(model, inputs, draws, max_new_tokens=new_tokens, temperature=temperature,
                                    top_p=1.0, eos_token_ids=[TINY_EOS], pad_token_id=TINY_PAD,
                                    min_new_tokens=new_tokens))

    def smallest_p(temp: float) -> float:
        engine = RolloutEngine(model, [TINY_EOS], TINY_PAD, new_tokens, temperature=temp, min_new_tokens=new_tokens)
        ours = engine.generate_batch([(p, draws) for p in prompts])
        return min(_chi_square_p([s[i] for s in ref], [s[i] for s in got], vocab)
                   for ref, got in zip(stock, ours) for i in range(new_tokens))

    alpha = 1e-3 / (2 * new_tokens)
    assert smallest_p(temperature) > alpha
    assert smallest_p(temperature * 1.25) < alpha


def test_batch_of_prompts_samples_the_stock_distribution(tiny_model, tiny_processor):
    _batch_statistics(tiny_model, tiny_processor)


# ------------------------------------------------------------------------------------------ switches
def test_fallback_switch_forces_stock_and_rejects_bad_values(tiny_model, monkeypatch):
    monkeypatch.setenv(rollout.FALLBACK_ENV, "stock")
    assert "forces stock generation" in rollout.engine_unavailable_reason(tiny_model)
    monkeypatch.setenv(rollout.FALLBACK_ENV, "fastest")
    with pytest.raises(ValueError, match="CHARTRL_ROLLOUT_FALLBACK must be one of plain, stock"):
        rollout.engine_unavailable_reason(tiny_model)
    monkeypatch.setenv(rollout.WEIGHTS_ENV, "adapters")
    monkeypatch.delenv(rollout.FALLBACK_ENV)
    engine = RolloutEngine(lora_model(), [TINY_EOS], TINY_PAD, 3)
    assert engine.weights_mode == "adapters"


def test_sample_problems_streams_through_the_engine_and_matches_alone(tiny_model, tiny_processor, monkeypatch):
    """The sampling loop's entry: with the engine chosen, problems come back with their seeds, each equal to
    the problem sampled alone; the stock path goes through ``one_problem``."""
    monkeypatch.setattr(rollout.dispatch, "resolve_engine", lambda engine, model: engine)
    problems = [(f"p{i}", prompt_inputs(tiny_processor, i), 50 + i) for i in range(3)]
    settings = dict(max_new_tokens=5, temperature=1.0, top_p=1.0, eos_token_ids=[TINY_EOS], pad_token_id=TINY_PAD)
    out = {key: (seed, ids) for key, seed, ids in rollout.sample_problems(
        tiny_model, iter(problems), 3, rows=2, engine="fast", one_problem=None, **settings)}
    assert sorted(out) == ["p0", "p1", "p2"]
    engine = RolloutEngine(tiny_model, [TINY_EOS], TINY_PAD, 5, temperature=1.0)
    for key, inputs, seed in problems:
        assert out[key] == (seed, engine.generate(inputs, 3, seed=seed))
    calls = []
    stocked = list(rollout.sample_problems(tiny_model, iter(problems), 3, rows=2, engine="stock",
                                           one_problem=lambda inputs, seed: calls.append(seed) or [[1]],
                                           **settings))
    assert calls == [50, 51, 52] and [k for k, _, _ in stocked] == ["p0", "p1", "p2"]


def test_samples_file_through_the_engine_resumes_to_the_same_samples(tmp_path, monkeypatch):
    """sample_to_file with the engine (continuous batching over 4 problems, 3 rows): a run stopped after 2
    problems and resumed writes the same completions per problem as one uninterrupted run."""
    import json

    from nbhelpers import sampling
    from nbhelpers.config import load_config, resolve_parameter_file
    from nbhelpers.data import load_examples

    monkeypatch.setattr(rollout.dispatch, "resolve_engine", lambda engine, model: "fast")  # the engine on CPU
    cfg = load_config([resolve_parameter_file("smoke", "presets"), TINY,
                       resolve_parameter_file("local-cpu", "platforms")],
                      {"n_samples": 4, "sample_chunk_size": 3, "sample_max_new_tokens": 6})
    model = build_random_model("tiny-random").eval()
    processor = build_offline_processor(cfg.eval_max_pixels, tiny=True)
    examples = load_examples("synthetic", split="test", subset_size=4, seed=cfg.seed)

    def records(path):
        return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}

    full = records(sampling.sample_to_file(cfg, tmp_path / "full.jsonl", examples=examples, model=model,
                                           processor=processor))
    sampling.sample_to_file(cfg, tmp_path / "part.jsonl", examples=examples.select(range(2)), model=model,
                            processor=processor)
    resumed = records(sampling.sample_to_file(cfg, tmp_path / "part.jsonl", examples=examples, model=model,
                                              processor=processor))
    assert sorted(full) == sorted(resumed) == sorted(str(e["id"]) for e in examples)
    for key in full:
        assert resumed[key]["completions"] == full[key]["completions"]
        assert resumed[key]["meta"]["seed_problem"] == full[key]["meta"]["seed_problem"]
        assert len(full[key]["completions"]) == 4


# ------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@gpu
def test_gpu_seeded_stream_equals_problems_alone_and_fills_rows(tiny_processor):
    model = build_random_model("tiny-random", torch.float32, "cuda").eval()
    engine = RolloutEngine(model, [TINY_EOS], TINY_PAD, 40, temperature=1.0, min_new_tokens=40)
    problems = [(i, prompt_inputs(tiny_processor, i), 77 + i) for i in range(6)]
    lengths = {i: [1 + (11 * i + 5 * s) % 40 for s in range(8)] for i in range(6)}
    streamed = dict(engine.generate_stream([Request(k, x, 8, s, lengths[k]) for k, x, s in problems], rows=5))
    assert engine.graph_captures >= 1 and engine.fast_kernels
    for key, inputs, seed in problems:
        alone = RolloutEngine(model, [TINY_EOS], TINY_PAD, 40, temperature=1.0, min_new_tokens=40)
        assert streamed[key] == next(alone.generate_stream([Request(key, inputs, 8, seed, lengths[key])]))[1]
    assert [len(c) for k in range(6) for c in streamed[k]] == [v for k in range(6) for v in lengths[k]]


@pytest.mark.gpu
@gpu
def test_gpu_greedy_batch_with_fused_lora_equals_peft_stock(tiny_processor):
    model = lora_model("cuda")
    prompts = [(prompt_inputs(tiny_processor, i), 1 + i % 3) for i in range(5)]
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        engine = RolloutEngine(model, [TINY_EOS], TINY_PAD, 32, temperature=0.0, min_new_tokens=32)
        got = engine.generate_batch(prompts)
        assert engine.weights_mode == "fused" and engine.graph_captures >= 1
        for (inputs, n), completions in zip(prompts, got):
            assert completions == [greedy_stock(model, inputs, 32)] * n
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.gpu
@gpu
def test_gpu_forced_plain_fallback_runs_in_fp16_and_says_why_once(tiny_processor, monkeypatch, caplog):
    """The T4 path forced on this GPU: fp16, no Triton/compiled kernels, CUDA graphs of plain PyTorch ops.
    Greedy completions may differ from stock fp16 only at near-ties of stock's logits."""
    monkeypatch.setenv(rollout.FALLBACK_ENV, "plain")
    monkeypatch.setattr(rollout.notices, "_warned_reasons", set())
    model = build_random_model("tiny-random", torch.float16, "cuda").eval()
    eos, pad, new_tokens = TINY_EOS, TINY_PAD, 24
    prompts = [(prompt_inputs(tiny_processor, i), 2) for i in range(4)]
    with caplog.at_level(logging.WARNING, logger="nbhelpers.rollout"):
        engine = RolloutEngine(model, [eos], pad, new_tokens, temperature=0.0, min_new_tokens=new_tokens)
        RolloutEngine(model, [eos], pad, new_tokens, temperature=0.0, min_new_tokens=new_tokens)
        got = engine.generate_batch(prompts)
    notes = [r.getMessage() for r in caplog.records if "fast kernels off" in r.getMessage()]
    assert len(notes) == 1 and "CHARTRL_ROLLOUT_FALLBACK=plain" in notes[0]
    assert not engine.fast_kernels and engine.use_cuda_graphs and engine.graph_captures >= 1
    for (inputs, n), completions in zip(prompts, got):
        inputs = {k: v.cuda() for k, v in inputs.items()}
        with torch.no_grad():
            stock = model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                   eos_token_id=[eos], pad_token_id=pad, output_scores=True,
                                   return_dict_in_generate=True)
        expected = stock.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        assert completions[0] == completions[1]
        if completions[0] != expected:
            j = next(k for k, (a, b) in enumerate(zip(completions[0], expected)) if a != b)
            margin = float(stock.scores[j][0, expected[j]] - stock.scores[j][0, completions[0][j]])
            assert margin < 0.05, f"differs from stock at token {j} where stock's margin is {margin}"
    monkeypatch.setenv(rollout.FALLBACK_ENV, "stock")
    assert rollout.resolve_engine("auto", model) == "stock"


def test_the_main_job_runs_the_engine_on_a_cpu(tiny_model):
    """The README's main job (smoke on local-cpu) trains and samples with the engine, not stock generate."""
    cfg = load_config([resolve_parameter_file("smoke", "presets"), resolve_parameter_file("local-cpu", "platforms")])
    assert rollout.resolve_engine(cfg.rollout_engine, tiny_model) == "fast"
