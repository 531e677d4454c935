"""Rollout benchmark on one GPU: stock generate vs the fast engine, stock GRPOTrainer vs ours, T4 memory check.

Model: ``qwen2-5-3b-random`` (the real Qwen2.5-VL-3B architecture, random weights, SDPA), one chart
image at 320*28*28 pixels. Random weights never emit EOS, so sampling forces every completion to full
length with ``min_new_tokens``. Sections (run several per call; results merge into one JSON file):

* ``sampling``  stock ``generate(num_return_sequences=n)`` and the engine at n = 16, 64, 256, in this
  process, plus the bandwidth roofline from the measured weight and KV bytes and a measured copy bandwidth;
* ``engine``    the engine alone (variants: fused elementwise ops or not, CUDA graphs or eager);
* ``decode``    the engine alone at n = 16, 64, 256, bare and with LoRA r=8 attached (decode weights fused and
  merged; at the largest n also adapters cast to bf16 and the PEFT modules as they are), with roofline fractions;
* ``continuous`` continuous batching: 16 problems (``--continuous-problems``) x 256 samples with forced lengths drawn around a mean of 250
  (tail to the full length) streamed through 256 rows, vs forced full length, vs one problem at a time;
* ``train-fast`` / ``train-safe``  stock GRPOTrainer vs a subclass whose ``_generate_single_turn`` calls
  ``nbhelpers.rollout.trainer_generate``: seconds per optimizer step and peak memory (LoRA r=8 on all
  projections, gradient checkpointing, bf16); ``train-fast-ours`` / ``train-safe-ours``: ours only;
* ``t4``        our training step at the fast shape in fp16 with the process capped to 15 GB;
* ``passk``     end-to-end Pass@k sampling at real lengths (completions that stop at EOS): ``sample_to_file`` on
  ``tiny-pretrained``, 300 held-out synthetic problems x 256 samples with the engine (continuous batching),
  and the first problems with the engine and with stock ``generate`` side by side.

    python benchmarks/bench_rollout.py --sections sampling,train-fast --out-dir benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nbhelpers.models import apply_lora, build_offline_processor, build_random_model, lora_config  # noqa: E402
from nbhelpers.rollout import Request, RolloutEngine, stock_generate, trainer_generate  # noqa: E402

EOS, PAD = 151645, 151643  # Qwen <|im_end|>, <|endoftext|>
PIXELS = 320 * 28 * 28
SPEC_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}  # bytes/s, datasheet (HBM3 / HBM3e SXM)
ROOFLINE_DEFINITION = (
    "decode-step bytes / measured device-to-device copy bandwidth (read+write): text-model weights (language model + "
    "tied LM head, each storage once; the vision tower is not read while decoding) plus KV bytes averaged over the "
    "completion; 'shared' counts the prompt KV once (as the engine reads it), 'expanded' counts it per row (the stock "
    "cache layout). fraction = roofline ms per step / engine decode ms per step.")
LOSS_NOTE = ("random weights: every reward is 0, so both trainers log loss 0; equal completions and equal loss on "
             "the same rollouts are checked by "
             "tests/test_rollout.py::test_trainer_hook_gives_stock_completions_order_and_loss")
TRAIN_SHAPES = {  # the seeds' presets: prompts x generations per optimizer step
    "fast": dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, num_generations=2),
    "safe": dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, num_generations=4),
}


def log(*args) -> None:
    print(*args, flush=True)


# ------------------------------------------------------------------------------------------ inputs
def chart(i: int):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (560, 448), "white")
    draw = ImageDraw.Draw(image)
    for j in range(5):
        draw.rectangle([40 + 100 * j, 400 - 60 * ((i + j) % 6 + 1), 100 + 100 * j, 400], fill="steelblue")
    return image


def question(i: int) -> str:
    return f"What is the value of bar {i % 5}? Think step by step."


def chart_prompt(processor, i: int = 3) -> dict:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question(i)}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return {k: v.cuda() for k, v in processor(text=[text], images=[chart(i)], return_tensors="pt").items()}


def versions() -> dict:
    import accelerate
    import peft
    import transformers
    import trl

    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "trl": trl.__version__, "peft": peft.__version__,
            "accelerate": accelerate.__version__}


# ------------------------------------------------------------------------------------------ measurements
def copy_bandwidth(gigabytes: float = 2.0, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written (median)."""
    src = torch.randn(int(gigabytes * 1e9 / 4), device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * gigabytes * 1e9 / statistics.median(times[3:])


def decode_weight_bytes(model) -> int:
    """Bytes of the weights one decode step reads: the text model and the (tied) LM head, each storage once."""
    seen, total = set(), 0
    tensors = list(model.model.language_model.parameters()) + [model.lm_head.weight]
    for p in tensors:
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def engine_run(model, inputs, n: int, tokens: int, **engine_kwargs) -> dict:
    """Engine at n rows: a warm-up call (graph capture, compilation), then a timed call."""
    engine = RolloutEngine(model, [EOS], PAD, tokens, temperature=1.0, top_p=1.0, min_new_tokens=tokens,
                           **engine_kwargs)
    engine.generate(inputs, n)
    torch.cuda.reset_peak_memory_stats()
    out, seconds = timed(lambda: engine.generate(inputs, n))
    stats = engine.last_stats
    assert all(len(c) == tokens for c in out), "forced-length completions came back short"
    result = {"n": n, "tokens": tokens, "s": seconds, "tok_s": n * tokens / seconds,
              "ms_per_step": seconds / tokens * 1e3, "decode_ms_per_step": stats["decode_s"] / stats["steps"] * 1e3,
              "prefill_s": stats["prefill_s"], "rows_per_chunk": stats["rows"], "graph_captures": engine.graph_captures,
              "fast_kernels": engine.fast_kernels, "cuda_graphs": engine.use_cuda_graphs,
              "weights": engine.weights_mode, "weight_copy_gb": engine.weight_copy_bytes / 1e9,
              "peak_gb": torch.cuda.max_memory_allocated() / 1e9}
    engine.drop_graphs()
    del engine
    torch.cuda.empty_cache()
    return result


def stock_run(model, inputs, n: int, tokens: int) -> dict:
    torch.cuda.reset_peak_memory_stats()
    out, seconds = timed(lambda: stock_generate(model, inputs, n, max_new_tokens=tokens, temperature=1.0, top_p=1.0,
                                                eos_token_ids=[EOS], pad_token_id=PAD, min_new_tokens=tokens))
    assert all(len(c) == tokens for c in out)
    result = {"n": n, "tokens": tokens, "s": seconds, "tok_s": n * tokens / seconds,
              "ms_per_step": seconds / tokens * 1e3, "peak_gb": torch.cuda.max_memory_allocated() / 1e9}
    torch.cuda.empty_cache()
    return result


def roofline(weight_bytes: int, kv_bytes_per_token: int, prompt_len: int, n: int, tokens: int,
             bandwidth: float) -> dict:
    """Bytes one decode step must move, averaged over the completion, and the time at ``bandwidth``.

    shared: the prompt's KV read once (as the engine does) plus each row's completion KV;
    expanded: every row reading its own copy of the prompt KV (the stock cache layout).
    """
    mean_completion_kv = tokens / 2  # step k reads k + 1 completion tokens, k = 0 .. tokens - 2
    kv_shared = kv_bytes_per_token * (prompt_len + n * mean_completion_kv)
    kv_expanded = kv_bytes_per_token * n * (prompt_len + mean_completion_kv)
    out = {"weight_bytes": weight_bytes, "kv_bytes_per_token": kv_bytes_per_token, "prompt_tokens": prompt_len,
           "bandwidth_bytes_s": bandwidth}
    for name, kv in (("shared", kv_shared), ("expanded", kv_expanded)):
        step_s = (weight_bytes + kv) / bandwidth
        out[name] = {"bytes_per_step": weight_bytes + kv, "ms_per_step": step_s * 1e3, "tok_s": n / step_s}
    return out


# ------------------------------------------------------------------------------------------ sections
def section_sampling(args, result: dict, with_stock: bool = True) -> None:
    processor = build_offline_processor(PIXELS, tiny=False)
    model = build_random_model("qwen2-5-3b-random", torch.bfloat16, "cuda").eval()
    inputs = chart_prompt(processor)
    prompt_len = int(inputs["input_ids"].shape[1])
    weight_bytes = decode_weight_bytes(model)
    total_weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth()
    kv_per_token = RolloutEngine(model, [EOS], PAD, 2).kv_bytes_per_token
    log(f"prompt {prompt_len} tokens; decode weights {weight_bytes / 1e9:.2f} GB of {total_weight_bytes / 1e9:.2f} GB;"
        f" copy bandwidth {bandwidth / 1e12:.2f} TB/s; KV {kv_per_token} B/token")
    sampling = result.setdefault("sampling", {})
    sampling.update({"prompt_tokens": prompt_len, "decode_weight_bytes": weight_bytes,
                     "total_weight_bytes": total_weight_bytes, "copy_bandwidth_bytes_s": bandwidth})
    tokens = args.tokens
    for n in args.ns:
        row = sampling.setdefault(f"n{n}", {})
        row["engine"] = engine_run(model, inputs, n, tokens)
        log(f"engine n={n}: {row['engine']}")
        row["roofline"] = roofline(weight_bytes, kv_per_token, prompt_len, n, tokens, bandwidth)
        spec = next((v for k, v in SPEC_BANDWIDTH.items() if k in torch.cuda.get_device_name()), None)
        row["roofline_fraction"] = row["roofline"]["shared"]["ms_per_step"] / row["engine"]["decode_ms_per_step"]
        row["roofline_fraction_expanded"] = \
            row["roofline"]["expanded"]["ms_per_step"] / row["engine"]["decode_ms_per_step"]
        if spec:
            row["roofline_fraction_spec_bandwidth"] = row["roofline_fraction"] * bandwidth / spec
        if with_stock:
            row["stock"] = stock_run(model, inputs, n, tokens)
            row["speedup"] = row["engine"]["tok_s"] / row["stock"]["tok_s"]
            log(f"stock n={n}: {row['stock']}; speedup {row['speedup']:.1f}x")
        log(f"roofline n={n}: fraction {row['roofline_fraction']:.3f} (shared-prefix bytes), "
            f"{row['roofline_fraction_expanded']:.3f} (expanded-cache bytes)")
    if "n256" in sampling:
        top = sampling["n256"]
        result["sampling_roofline_fraction_n256"] = top["roofline_fraction"]
        result["sampling_roofline_fraction_n256_expanded_kv"] = top["roofline_fraction_expanded"]
        if "roofline_fraction_spec_bandwidth" in top:
            result["sampling_roofline_fraction_n256_spec_bandwidth"] = top["roofline_fraction_spec_bandwidth"]
        result["roofline_definition"] = ROOFLINE_DEFINITION
        if "speedup" in top:
            result["sampling_speedup_n256"] = top["speedup"]
        result.setdefault("peak_memory_gb", {})["sampling_engine_n256"] = top["engine"]["peak_gb"]
        if "stock" in top:
            result["peak_memory_gb"]["sampling_stock_n256"] = top["stock"]["peak_gb"]


def section_engine_variants(args, result: dict) -> None:
    """The engine alone at the largest n: fused vs plain elementwise ops, CUDA graphs vs eager."""
    processor = build_offline_processor(PIXELS, tiny=False)
    model = build_random_model("qwen2-5-3b-random", torch.bfloat16, "cuda").eval()
    inputs = chart_prompt(processor)
    n = max(args.ns)
    variants = {"graphs+fast_kernels": {}, "graphs": {"fast_kernels": False},
                "eager": {"use_cuda_graphs": False, "fast_kernels": False}}
    out = result.setdefault("engine_variants", {})
    for name, kwargs in variants.items():
        tokens = args.tokens if name != "eager" else min(args.tokens, 128)
        out[name] = engine_run(model, inputs, n, tokens, **kwargs)
        log(f"variant {name}: {out[name]}")
    for n_small in sorted(set(args.ns) - {n}):
        out[f"graphs+fast_kernels n{n_small}"] = engine_run(model, inputs, n_small, args.tokens)
        log(f"variant graphs+fast_kernels n={n_small}: {out[f'graphs+fast_kernels n{n_small}']}")


def section_decode(args, result: dict) -> None:
    """The engine's decode step, bare and with LoRA r=8 (PEFT's default init: B = 0, the same cost as trained
    adapters), at each n, with the bandwidth roofline fraction."""
    processor = build_offline_processor(PIXELS, tiny=False)
    model = build_random_model("qwen2-5-3b-random", torch.bfloat16, "cuda").eval()
    inputs = chart_prompt(processor)
    prompt_len = int(inputs["input_ids"].shape[1])
    weight_bytes = decode_weight_bytes(model)
    bandwidth = copy_bandwidth()
    kv_per_token = RolloutEngine(model, [EOS], PAD, 2).kv_bytes_per_token
    out = result.setdefault("decode", {})
    out.update({"prompt_tokens": prompt_len, "decode_weight_bytes": weight_bytes, "copy_bandwidth_bytes_s": bandwidth,
                "tokens": args.tokens, "roofline_definition": ROOFLINE_DEFINITION})
    for n in args.ns:
        row = out.setdefault(f"n{n}", {})
        row["roofline"] = roofline(weight_bytes, kv_per_token, prompt_len, n, args.tokens, bandwidth)
        row["bare"] = engine_run(model, inputs, n, args.tokens)
        row["bare_roofline_fraction"] = row["roofline"]["shared"]["ms_per_step"] / row["bare"]["decode_ms_per_step"]
        log(f"decode n={n} bare: {row['bare']}; roofline fraction {row['bare_roofline_fraction']:.3f}")
    if "n256" in out:
        result["decode_roofline_fraction_n256"] = out["n256"]["bare_roofline_fraction"]
    lora = apply_lora(model, r=8, dropout=0.0).eval()
    for n in args.ns:
        row = out[f"n{n}"]
        row["lora_fused"] = engine_run(lora, inputs, n, args.tokens)
        row["lora_over_bare"] = row["lora_fused"]["decode_ms_per_step"] / row["bare"]["decode_ms_per_step"]
        log(f"decode n={n} lora fused: {row['lora_fused']}; {row['lora_over_bare']:.3f}x bare")
    top = out[f"n{max(args.ns)}"]
    for mode in args.lora_modes.split(","):
        top[f"lora_{mode}"] = engine_run(lora, inputs, max(args.ns), args.tokens, weights=mode)
        top[f"lora_{mode}_over_bare"] = top[f"lora_{mode}"]["decode_ms_per_step"] / top["bare"]["decode_ms_per_step"]
        log(f"decode n={max(args.ns)} lora {mode}: {top[f'lora_{mode}']}; {top[f'lora_{mode}_over_bare']:.3f}x bare")
    result["lora_decode_over_bare"] = {f"n{n}": out[f"n{n}"]["lora_over_bare"] for n in args.ns}


def forced_lengths(problem: int, n: int, tokens: int) -> list[int]:
    """Completion lengths for the continuous-batching benchmark: log-normal around 200 (mean about 250 after
    clipping to [8, tokens]), a tail up to ``tokens``; a stand-in for a model that stops at EOS."""
    gen = torch.Generator().manual_seed(1000 + problem)
    lengths = torch.exp(math.log(200.0) + 0.65 * torch.randn(n, generator=gen)).round().clamp(8, tokens)
    return [int(v) for v in lengths]


def section_continuous(args, result: dict) -> None:
    processor = build_offline_processor(PIXELS, tiny=False)
    model = build_random_model("qwen2-5-3b-random", torch.bfloat16, "cuda").eval()
    rows, n, tokens, problems = 256, 256, args.tokens, args.continuous_problems
    prompts = [chart_prompt(processor, i) for i in range(problems)]
    engine = RolloutEngine(model, [EOS], PAD, tokens, temperature=1.0, top_p=1.0, min_new_tokens=tokens, max_rows=rows)

    def stream(requests) -> dict:
        requests = list(requests)
        (_, seconds) = timed(lambda: list(engine.generate_stream(requests, rows=rows)))
        stats = engine.last_stats
        made = sum(sum(r.lengths) for r in requests)
        assert stats["tokens"] == made, "forced lengths were not kept"
        return {"problems": len(requests), "samples": sum(r.n for r in requests), "completion_tokens": made,
                "mean_length": made / sum(r.n for r in requests), "s": seconds, "tok_s": made / seconds,
                "decode_steps": stats["steps"], "row_utilisation": stats["busy_row_steps"] / (rows * stats["steps"]),
                "decode_ms_per_step": stats["decode_s"] / stats["steps"] * 1e3, "prefill_s": stats["prefill_s"]}

    stream([Request(0, prompts[0], n, 7, [tokens] * n)])  # warm-up: graph capture, compilation
    out = result.setdefault("continuous_batching", {})
    out["setting"] = (f"{problems} problems x {n} samples, {rows} rows, seeded sampling at temperature 1; forced "
                      "lengths (forced_lengths in this script): log-normal around 200, clipped to [8, "
                      f"{tokens}]")
    out["continuous"] = stream(Request(p, prompts[p], n, 7 + p, forced_lengths(p, n, tokens)) for p in range(problems))
    log(f"continuous: {out['continuous']}")
    out["full_length"] = stream(Request(p, prompts[p], n, 7 + p, [tokens] * n) for p in range(2))
    log(f"full length: {out['full_length']}")
    alone = [stream([Request(p, prompts[p], n, 7 + p, forced_lengths(p, n, tokens))]) for p in range(2)]
    made, seconds = sum(a["completion_tokens"] for a in alone), sum(a["s"] for a in alone)
    out["one_problem_at_a_time"] = {"completion_tokens": made, "s": seconds, "tok_s": made / seconds,
                                    "row_utilisation": statistics.mean(a["row_utilisation"] for a in alone)}
    log(f"one problem at a time: {out['one_problem_at_a_time']}")
    out["continuous_over_full_length"] = out["continuous"]["tok_s"] / out["full_length"]["tok_s"]
    out["continuous_over_one_at_a_time"] = out["continuous"]["tok_s"] / out["one_problem_at_a_time"]["tok_s"]
    result["continuous_over_full_length_tok_s"] = out["continuous_over_full_length"]


def _train_dataset():
    from datasets import Dataset

    return Dataset.from_list([{"prompt": [{"role": "user", "content": [{"type": "image"},
                                                                       {"type": "text", "text": question(i)}]}],
                               "image": chart(i), "label": str(i % 6)} for i in range(64)])


def _reward(prompts, completions, label, **kwargs):
    return [1.0 if gold in c[0]["content"] else 0.0 for c, gold in zip(completions, label)]


def train_run(shape: str, fast: bool, steps: int, tokens: int, dtype=torch.bfloat16, model=None) -> dict:
    """Seconds per optimizer step (each step measured alone) and peak memory of one training run."""
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class OurTrainer(GRPOTrainer):
        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations,
                                  has_tool_images=False):
            return trainer_generate(self, prompt_ids, multimodal_fields)

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)
            log(f"  {shape} {'ours' if fast else 'stock'} step {state.global_step}: {times[-1]:.1f} s")

    processor = build_offline_processor(PIXELS, tiny=False)
    processor.tokenizer.padding_side = "left"
    torch.manual_seed(0)
    model = model if model is not None else build_random_model("qwen2-5-3b-random", dtype, "cuda")
    config = GRPOConfig(output_dir="/tmp/bench-grpo", max_completion_length=tokens, max_steps=steps, logging_steps=1,
                        report_to=[], bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                        gradient_checkpointing=True, save_strategy="no", learning_rate=1e-5, beta=0.0,
                        temperature=1.0, dataloader_num_workers=0, disable_tqdm=True, seed=0,
                        **TRAIN_SHAPES[shape])
    trainer_class = OurTrainer if fast else GRPOTrainer
    trainer = trainer_class(model=model, reward_funcs=[_reward], args=config, train_dataset=_train_dataset(),
                            processing_class=processor, peft_config=lora_config(r=8), callbacks=[StepTimer()])
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    engine = getattr(trainer, "_chartrl_rollout_engine", None)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    lengths = [h.get("completions/mean_length") for h in trainer.state.log_history if "loss" in h]
    result = {"step_s": times, "steady_step_s": statistics.median(times[1:]) if len(times) > 1 else times[0],
              "peak_gb": torch.cuda.max_memory_allocated() / 1e9, "loss": losses, "mean_completion_length": lengths,
              "trainable_parameters": trainable, "completions_per_step": 2 * TRAIN_SHAPES[shape]["num_generations"]}
    if engine is not None:
        result.update({"rollout_weights": engine.weights_mode, "fast_kernels": engine.fast_kernels,
                       "rollout_rows": engine.last_stats.get("rows"),
                       "rollout_prompts": engine.last_stats.get("prompts"),
                       "weight_copy_gb": engine.weight_copy_bytes / 1e9})
    del trainer, model
    torch.cuda.empty_cache()
    return result


def section_train(args, result: dict, shape: str, with_stock: bool = True) -> None:
    out = result.setdefault(f"train_{shape}", {})
    out["ours"] = train_run(shape, fast=True, steps=args.our_steps, tokens=args.tokens)
    log(f"train {shape} ours: {out['ours']}")
    peaks = result.setdefault("peak_memory_gb", {})
    peaks[f"train_{shape}_ours"] = out["ours"]["peak_gb"]
    if not with_stock:
        return
    out["stock"] = train_run(shape, fast=False, steps=args.stock_steps, tokens=args.tokens)
    log(f"train {shape} stock: {out['stock']}")
    out["speedup"] = out["stock"]["steady_step_s"] / out["ours"]["steady_step_s"]
    log(f"train {shape}: {out['speedup']:.1f}x fewer seconds per optimizer step")
    result[f"train_step_speedup_{shape}"] = out["speedup"]
    result["loss_note"] = LOSS_NOTE
    peaks[f"train_{shape}_stock"] = out["stock"]["peak_gb"]


def section_t4(args, result: dict) -> None:
    """fp16, GPU memory capped to 15 GB: the fast shape (then shorter completions) until one fits.

    The random model is initialised before the cap (its float32 initialisation needs 15 GB on its own; a real
    checkpoint loads straight into fp16), then the cap holds for the whole training run.
    """
    cap = 15e9
    fraction = cap / torch.cuda.get_device_properties(0).total_memory
    out = result.setdefault("t4_check", {})
    out.update({"memory_cap_gb": cap / 1e9, "dtype": "fp16", "shape": "fast",
                "note": "one process, no DeepSpeed; Kaggle runs ZeRO-3 over two T4s"})
    for tokens in (args.tokens, 512, 256):
        key = f"completion_{tokens}"
        torch.cuda.set_per_process_memory_fraction(1.0)
        model = build_random_model("qwen2-5-3b-random", torch.float16, "cuda")
        gc.collect()
        torch.cuda.empty_cache()
        out[f"{key}_allocated_gb_before"] = torch.cuda.memory_allocated() / 1e9  # the fp16 model: about 7.5
        torch.cuda.set_per_process_memory_fraction(fraction)
        try:
            out[key] = train_run("fast", fast=True, steps=2, tokens=tokens, dtype=torch.float16, model=model)
            out[key]["fits"] = True
            out["fits_setting"] = f"fast shape, {tokens} completion tokens"
            log(f"t4 check {key}: fits, {out[key]}")
            break
        except torch.OutOfMemoryError as err:
            out[key] = {"fits": False, "error": str(err).splitlines()[0]}
            log(f"t4 check {key}: out of memory")
        finally:
            del model
            gc.collect()
            torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1.0)
    result.setdefault("peak_memory_gb", {})["t4_check"] = max(
        (v.get("peak_gb", 0.0) for v in out.values() if isinstance(v, dict)), default=0.0)


def _passk_run(model, processor, engine: str, problems: int, out: Path) -> dict:
    """Wall time and completion tokens of ``sample_to_file`` (the project's Pass@k sampling) on ``problems``
    held-out synthetic problems, n = 256, the study's sampling settings (``sandbox/study.yaml``)."""
    from nbhelpers.config import load_config
    from nbhelpers.rollout.dispatch import _engines
    from nbhelpers.sampling import sample_to_file

    cfg = load_config(overrides={
        "vlm_name": "tiny-pretrained", "eval_dataset": "synthetic", "eval_split": "test", "max_problems": problems,
        "n_samples": 256, "sample_max_new_tokens": 192, "sample_chunk_size": 256, "eval_max_pixels": 12544,
        "max_pixels": 12544, "rollout_engine": engine, "seed": 7001, "dtype": "bf16"})
    out.unlink(missing_ok=True)
    torch.cuda.reset_peak_memory_stats()
    _, seconds = timed(lambda: sample_to_file(cfg, out, model=model, processor=processor, method=engine))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    tokenizer = processor.tokenizer
    lengths = [len(ids) + 1 for r in records for ids in tokenizer(r["completions"])["input_ids"]]  # + EOS
    samples = len(lengths)
    row = {"engine": engine, "problems": len(records), "samples": samples, "s": seconds,
           "samples_s": samples / seconds, "completion_tokens_approx": sum(lengths), "tok_s": sum(lengths) / seconds,
           "mean_length": sum(lengths) / samples, "max_length": max(lengths),
           "pass_at_1": sum(sum(r["correct"]) for r in records) / samples,
           "peak_gb": torch.cuda.max_memory_allocated() / 1e9}
    if engine == "fast":
        stats = _engines[model].last_stats
        row.update({"decode_steps": stats["steps"], "engine_completion_tokens": stats["tokens"],
                    "row_utilisation": stats["busy_row_steps"] / (stats["rows"] * stats["steps"]),
                    "decode_ms_per_step": stats["decode_s"] / stats["steps"] * 1e3})
    return row


def section_passk(args, result: dict) -> None:
    from nbhelpers.config import load_config
    from nbhelpers.sampling import load_for_sampling

    cfg = load_config(overrides={"vlm_name": "tiny-pretrained", "dtype": "bf16"})
    model, processor = load_for_sampling(cfg, None, 12544)
    work = Path(os.environ.get("PASSK_WORK", "/tmp/chartrl-passk"))
    work.mkdir(parents=True, exist_ok=True)
    out = result.setdefault("passk_end_to_end", {})
    out["setting"] = ("tiny-pretrained (bf16, sdpa), synthetic test split (seed 7001), n = 256 at temperature 0.6, "
                      "top_p 0.95, at most 192 new tokens, 256 rows; completions stop at EOS. Tokens are the saved "
                      "texts re-tokenized plus one EOS each (approximate for the stock path; the engine's own count "
                      "is engine_completion_tokens)")
    _passk_run(model, processor, "fast", 2, work / "warmup.jsonl")  # graph capture and compilation
    subset = args.passk_subset
    out["fast_subset"] = _passk_run(model, processor, "fast", subset, work / "fast-subset.jsonl")
    log(f"passk fast, {subset} problems: {out['fast_subset']}")
    out["stock_subset"] = _passk_run(model, processor, "stock", subset, work / "stock-subset.jsonl")
    log(f"passk stock, {subset} problems: {out['stock_subset']}")
    out["fast_over_stock_subset_samples_s"] = out["fast_subset"]["samples_s"] / out["stock_subset"]["samples_s"]
    out["fast_full"] = _passk_run(model, processor, "fast", args.passk_problems, work / "fast-full.jsonl")
    log(f"passk fast, {args.passk_problems} problems: {out['fast_full']}")
    result["passk_fast_over_stock_samples_s"] = out["fast_over_stock_subset_samples_s"]


SECTIONS = {
    "sampling": lambda a, r: section_sampling(a, r, with_stock=True),
    "engine": section_engine_variants,
    "train-fast": lambda a, r: section_train(a, r, "fast"),
    "train-safe": lambda a, r: section_train(a, r, "safe"),
    "train-fast-ours": lambda a, r: section_train(a, r, "fast", with_stock=False),
    "train-safe-ours": lambda a, r: section_train(a, r, "safe", with_stock=False),
    "decode": section_decode,
    "continuous": section_continuous,
    "t4": section_t4,
    "passk": section_passk,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="sampling,train-fast,train-safe,t4",
                        help=f"comma-separated, from {', '.join(SECTIONS)}")
    parser.add_argument("--ns", default="16,64,256", help="samples per prompt for the sampling sections")
    parser.add_argument("--tokens", type=int, default=768, help="completion tokens (forced)")
    parser.add_argument("--stock-steps", type=int, default=2, help="stock optimizer steps (the first is warm-up)")
    parser.add_argument("--our-steps", type=int, default=3, help="our optimizer steps (the first is warm-up)")
    parser.add_argument("--lora-modes", default="adapters,modules",
                        help="decode-weights modes also timed with LoRA at the largest n (decode section)")
    parser.add_argument("--continuous-problems", type=int, default=16,
                        help="problems streamed by the continuous section (256 samples each, forced lengths)")
    parser.add_argument("--passk-problems", type=int, default=300, help="problems of the passk section's full run")
    parser.add_argument("--passk-subset", type=int, default=8,
                        help="problems sampled by both the engine and stock generate in the passk section")
    parser.add_argument("--out-dir", default="benchmarks/results", help="the JSON file <gpu>-<date>.json goes here")
    args = parser.parse_args(argv)
    args.ns = [int(n) for n in args.ns.split(",")]
    if not torch.cuda.is_available():
        print("bench_rollout needs a CUDA GPU", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(0)
    date = dt.date.today().isoformat()
    path = Path(args.out_dir) / f"{gpu.replace(' ', '-')}-{date}.json"
    result = json.loads(path.read_text()) if path.is_file() else {}
    result.update({"gpu": gpu, "date": date, "versions": versions(), "model": "qwen2-5-3b-random (bf16, sdpa)"})
    result.setdefault("commands", []).append("python benchmarks/bench_rollout.py " + " ".join(argv or sys.argv[1:]))
    for name in args.sections.split(","):
        log(f"== section {name}")
        SECTIONS[name](args, result)
        gc.collect()  # what a section leaves allocated would count against the next one (the T4 cap above all)
        torch.cuda.empty_cache()
        result.setdefault("allocated_gb_after_section", {})[name] = torch.cuda.memory_allocated() / 1e9
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], path.name).write_text(json.dumps(result, indent=1))
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
