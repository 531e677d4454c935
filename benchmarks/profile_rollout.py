"""Where a decode step's GPU time goes: the engine's kernels grouped by name (torch.profiler), at given n.

The engine runs eagerly (no CUDA graphs; the same kernels as in the graphs) for a few steps under the
profiler; the table lists GPU milliseconds per decode step for the kernels that take the most time, then by
kind (matrix products, attention, fused elementwise, other). The same step with CUDA graphs is timed after:
graph time minus kernel time is what launches and gaps between kernels cost.

    python benchmarks/profile_rollout.py --ns 16,256 --steps 32 [--lora] [--weights fused|adapters|modules]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_rollout import EOS, PAD, PIXELS, chart_prompt, engine_run  # noqa: E402
from nbhelpers.models import apply_lora, build_offline_processor, build_random_model  # noqa: E402
from nbhelpers.rollout import RolloutEngine  # noqa: E402


KINDS = (("matrix products", ("gemm", "cutlass", "nvjet", "sm90", "cublas", "splitk", "gemv")),
         ("attention", ("_attention_kernel", "_combine_kernel")), ("fused elementwise", ("triton_",)))


def kind_of(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, keys in KINDS if any(k in lowered for k in keys)), "other")


def kernel_table(model, inputs, n: int, steps: int, top: int, weights: str | None) -> float:
    engine = RolloutEngine(model, [EOS], PAD, steps + 1, temperature=1.0, min_new_tokens=steps + 1,
                           use_cuda_graphs=False, weights=weights)
    engine.generate(inputs, n)  # compile and warm up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        engine.generate(inputs, n)
        torch.cuda.synchronize()
    per_kernel: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.name] += event.device_time_total / 1e3  # ms
            counts[event.name] += 1
    total = sum(per_kernel.values())
    print(f"n={n}: GPU kernel time {total / steps:.3f} ms per decode step (prefill included once), "
          f"{sum(counts.values()) / steps:.0f} kernels per step")
    for name, ms in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {ms / steps:8.3f} ms  {counts[name] / steps:6.1f}/step  {name[:110]}")
    by_kind: dict[str, float] = defaultdict(float)
    kind_counts: dict[str, int] = defaultdict(int)
    for name, ms in per_kernel.items():
        by_kind[kind_of(name)] += ms
        kind_counts[kind_of(name)] += counts[name]
    print(f"n={n} by kind (weights {engine.weights_mode}): " + "; ".join(
        f"{kind} {ms / steps:.3f} ms ({kind_counts[kind] / steps:.0f} kernels)" for kind, ms in
        sorted(by_kind.items(), key=lambda kv: -kv[1])))
    return total / steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ns", default="16,256")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--lora", action="store_true", help="LoRA r=8 on all projections")
    parser.add_argument("--weights", default=None, help="decode-weights mode (default: the engine's choice)")
    args = parser.parse_args()
    model = build_random_model("qwen2-5-3b-random", torch.bfloat16, "cuda").eval()
    if args.lora:
        model = apply_lora(model, r=8).eval()
    inputs = chart_prompt(build_offline_processor(PIXELS, tiny=False))
    for n in (int(v) for v in args.ns.split(",")):
        kernel_ms = kernel_table(model, inputs, n, args.steps, args.top, args.weights)
        timing = engine_run(model, inputs, n, 256, weights=args.weights)
        print(f"n={n}: with CUDA graphs {timing['decode_ms_per_step']:.3f} ms per decode step (256 tokens); "
              f"kernels alone {kernel_ms:.3f} ms (prefill included once, {args.steps} steps)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
