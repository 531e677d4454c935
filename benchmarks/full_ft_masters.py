"""Full fine-tuning with bf16 weights against fp32 master weights under bf16 autocast, side by side in one process on
one device (issue 26, item 1): per variant the time per optimizer step, the peak GPU memory, the training state's
size, and the share of weights a few steps at the paper's learning rate leave unchanged.

    python benchmarks/full_ft_masters.py                                        # tiny-pretrained, 5 steps, GPU
    python benchmarks/full_ft_masters.py --models tiny-pretrained qwen2-5-3b-random --steps 4
    python benchmarks/full_ft_masters.py --device cpu --steps 2 --out /tmp/ft  # CPU smoke check

Variants, each a fresh trainer (``build_trainer``) on the same configuration: the smoke preset (synthetic charts,
4 completions of up to 192 tokens per step) in mode nsr (every wrong completion gets a gradient, so a random model
trains too), ``finetune: full``, ``deepspeed: none``, ``learning_rate`` 1e-6, ``rollout_engine: auto``:

* ``bf16-weights``: the model loaded in bf16 and handed to the trainer, so AdamW updates bf16 weights (and keeps
  bf16 moments): chartrl's path before fp32 masters;
* ``fp32-masters``: the model in fp32, computed under the Trainer's bf16 autocast; the engine decodes with bf16
  compute copies (``nbhelpers.rollout.ComputeCopies``): chartrl's path now.

Per variant: ``step_s`` (median wall time of the steps after the first, which captures CUDA graphs and compiles;
rollouts, forward, backward and optimizer), ``update_s`` (the same without the rollouts, whose length differs
between variants once their weights differ), ``peak_gib`` (torch.cuda.max_memory_allocated, reset before each
variant; None on the CPU), ``resident_before_gib`` (what earlier variants left allocated), ``state_gib``
(weights + gradients + optimizer state + compute copies, counted from the tensors), ``unchanged`` (share of
weight elements equal to their initial value after all steps) and ``empty_steps`` (steps nsr skipped: no wrong
completion). The results go to ``<out>/full-ft-masters-<device>-
<date>.json`` and ``.md`` (``--out``, default benchmarks/results); the last line printed is the JSON.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("bf16-weights", "fp32-masters")
GIB = 2 ** 30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny-pretrained"],
                        help="registry names or model folders (e.g. tiny-pretrained qwen2-5-3b-random)")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per variant (>= 2)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cuda (one GPU), or cpu to check that the script runs (the GPU is hidden)")
    parser.add_argument("--learning-rate", type=float, default=1e-6, help="learning rate (> 0)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other RunConfig key (repeatable)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder of the results")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step is warm-up)")
    if not args.learning_rate > 0:
        parser.error("--learning-rate must be > 0")
    return args


def environment() -> dict:
    import torch
    import transformers
    import trl

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "gpu": gpu,
            "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "trl": trl.__version__, "python": platform.python_version(),
            "commit": commit.stdout.strip() or None, "cpu_threads": torch.get_num_threads()}


def step_timer():
    """A callback recording the wall time of every optimizer step and of the rollouts in it (device synchronised
    at both ends; :meth:`time_rollouts` wraps a trainer's generation)."""
    import torch
    from transformers import TrainerCallback

    def now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.rollouts: list[float] = []
            self.start = 0.0

        def time_rollouts(self, trainer) -> None:
            generate = trainer._generate_single_turn

            def timed(*args, **kwargs):
                start = now()
                try:
                    return generate(*args, **kwargs)
                finally:
                    self.rollouts[-1] += now() - start

            trainer._generate_single_turn = timed

        def on_step_begin(self, args, state, control, **kwargs):
            self.rollouts.append(0.0)
            self.start = now()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(now() - self.start)

    return StepTimer()


def training_state_bytes(trainer) -> int:
    """Weights, their gradients (one per trainable weight, in its dtype), the optimizer's state tensors and the
    engine's compute copies, in bytes."""
    import torch

    params = list(trainer.model.parameters())
    total = sum(p.numel() * p.element_size() for p in params)
    total += sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    for state in trainer.optimizer.state.values():
        total += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
    copies = getattr(trainer, "_chartrl_compute_copies", None)
    return total + (copies.copy_bytes() if copies is not None else 0)


def run_variant(model_name: str, variant: str, args: argparse.Namespace, out_root: Path) -> dict:
    """One fresh trainer of ``variant`` for ``args.steps`` steps; its measurements."""
    import torch

    from nbhelpers import models
    from nbhelpers.config import load_config, resolve_parameter_file
    from nbhelpers.training_setup import build_trainer

    cfg = load_config([resolve_parameter_file("smoke", "presets"), resolve_parameter_file("nsr", "modes")],
                      [*args.set, f"vlm_name={model_name}", "finetune=full", "dtype=bf16", "deepspeed=none",
                       f"learning_rate={args.learning_rate}", f"max_steps={args.steps}",
                       f"save_steps={args.steps + 1}", "logging_steps=1", f"output_root={out_root / variant}",
                       "report_to=[none]", "persistent_root=none", "resume=false"])
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated() / GIB if torch.cuda.is_available() else None  # left by earlier runs
    weights = torch.bfloat16 if variant == "bf16-weights" else torch.float32
    model = models.load_model(model_name, weights, device=args.device, attn_implementation=cfg.attn_implementation)
    initial = {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters()}
    timer = step_timer()
    trainer = build_trainer(cfg, model=model, callbacks=[timer])
    timer.time_rollouts(trainer)
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else None
    unchanged = sum(int((p.detach().cpu() == initial[name]).sum()) for name, p in trainer.model.named_parameters())
    elements = sum(t.numel() for t in initial.values())
    empty = sum(e.get("mode/empty_step", 0.0) for e in trainer.state.log_history if "loss" in e)
    result = {"model": model_name, "variant": variant, "weights_dtype": str(weights).removeprefix("torch."),
              "parameters": elements, "step_times_s": [round(t, 4) for t in timer.times],
              "rollout_times_s": [round(t, 4) for t in timer.rollouts],
              "step_s": statistics.median(timer.times[1:]),
              "update_s": statistics.median(t - r for t, r in zip(timer.times[1:], timer.rollouts[1:])),
              "peak_gib": peak, "resident_before_gib": resident,
              "state_gib": training_state_bytes(trainer) / GIB, "unchanged": unchanged / elements,
              "empty_steps": int(round(empty))}
    del trainer, model, initial
    gc.collect()
    return result


def markdown(env: dict, results: list[dict], steps: int, learning_rate: float) -> str:
    def num(value, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    lines = [f"# Full fine-tuning: bf16 weights against fp32 masters + bf16 autocast ({env['gpu']}, {env['date']})",
             "", " | ".join(f"{k} {v}" for k, v in env.items()), "",
             f"{steps} optimizer steps per variant at learning rate {learning_rate:g} (smoke preset, mode nsr, "
             "`finetune: full`, `deepspeed: none`); step time: median after the first step.", "",
             "| model | variant | weights | step (s) | step without rollouts (s) | peak GPU memory (GiB) | "
             f"training state (GiB) | weights unchanged after {steps} steps | empty steps |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['variant']} | {r['weights_dtype']} | {r['step_s']:.3f} | "
                     f"{r['update_s']:.3f} | "
                     f"{num(r['peak_gib'], '.2f')} | {r['state_gib']:.3f} | {r['unchanged']:.2%} | "
                     f"{r['empty_steps']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA: the trainer then runs on the CPU
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("full_ft_masters: no CUDA GPU (use --device cpu for the CPU smoke check)", file=sys.stderr)
        return 2
    env = environment()
    print(" | ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="full-ft-masters-") as tmp:
        for model_name in args.models:
            for variant in VARIANTS:
                result = run_variant(model_name, variant, args, Path(tmp) / model_name.replace("/", "_"))
                print(f"{model_name} {variant}: {result['step_s']:.3f} s/step ({result['update_s']:.3f} s without "
                      f"rollouts), peak "
                      f"{result['peak_gib'] if result['peak_gib'] is None else round(result['peak_gib'], 2)} GiB, "
                      f"state {result['state_gib']:.3f} GiB, {result['unchanged']:.2%} of weights unchanged",
                      flush=True)
                results.append(result)
    summary = {**env, "steps": args.steps, "learning_rate": args.learning_rate, "results": results}
    device = env["gpu"].replace(" ", "-") if args.device == "cuda" else "cpu"
    stem = args.out / f"full-ft-masters-{device}-{env['date'][:10]}"
    args.out.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(env, results, args.steps, args.learning_rate))
    print(f"wrote {stem}.json and .md", flush=True)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
