"""The rollout/training log-probability gap on a CUDA GPU: a few training steps with the fast engine, per step the
mean and max |training-forward log-prob - engine log-prob| (nats) that training logs under TRL's keys
``sampling/sampling_logp_difference/mean|max``, plus the GPU, library versions and date, so the bf16 bound can be
recorded (issue 26, item 2). The CPU fp32 bound (< 1e-4) is a test: tests/test_logprob_gap.py.

    python benchmarks/logprob_gap.py                                  # tiny-pretrained, bf16, 5 steps
    python benchmarks/logprob_gap.py --model qwen2-5-3b --steps 3     # a bigger registry model (downloads it)

The run uses the smoke preset (LoRA, synthetic charts) with ``--model``, ``--dtype``, ``--temperature`` and
``--steps`` over it; ``--set key=value`` passes any other RunConfig key. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GAP_MEAN, GAP_MAX = "sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-pretrained", help="vlm_name: a registry name or model folder")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps (>= 1)")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="compute dtype")
    parser.add_argument("--temperature", type=float, default=1.0, help="rollout temperature (> 0)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other RunConfig key (repeatable)")
    parser.add_argument("--allow-cpu", action="store_true", help="run without CUDA (the fp32 check, slow)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    return args


def environment() -> dict:
    import torch
    import transformers
    import trl

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)"
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "gpu": gpu,
            "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "trl": trl.__version__, "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from nbhelpers.config import load_config, resolve_parameter_file
    from nbhelpers.training_setup import build_trainer

    if not torch.cuda.is_available() and not args.allow_cpu:
        print("logprob_gap: no CUDA GPU (pass --allow-cpu to run on the CPU anyway)", file=sys.stderr)
        return 2
    out = Path(tempfile.mkdtemp(prefix="logprob-gap-"))
    cfg = load_config([resolve_parameter_file("smoke", "presets"), resolve_parameter_file("grpo", "modes")],
                      [*args.set, f"vlm_name={args.model}", f"dtype={args.dtype}", f"max_steps={args.steps}",
                       f"temperature={args.temperature}", "rollout_engine=fast", f"output_root={out}",
                       "report_to=[none]", "persistent_root=none", "resume=false"])
    env = environment()
    print(" | ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    trainer = build_trainer(cfg)
    trainer.train()
    steps = [{"step": e["step"], "mean": e[GAP_MEAN], "max": e[GAP_MAX]}
             for e in trainer.state.log_history if GAP_MEAN in e]
    for s in steps:
        print(f"step {s['step']}: gap mean {s['mean']:.3g} nats, max {s['max']:.3g} nats", flush=True)
    summary = {**env, "model": args.model, "dtype": args.dtype, "temperature": args.temperature,
               "max_completion_length": cfg.max_completion_length, "steps": steps,
               "max_of_max": max((s["max"] for s in steps), default=None),
               "mean_of_mean": sum(s["mean"] for s in steps) / len(steps) if steps else None}
    print(json.dumps(summary))
    return 0 if steps else 1


if __name__ == "__main__":
    sys.exit(main())
