"""Left-out rows on one GPU: a PSR training step with them dropped from the forward/backward pass
(``nbhelpers.trainer.without_left_out_rows``, the default) and with them kept (masked only), side by side.

Model ``qwen2-5-3b-random`` (bf16, LoRA r=8, gradient checkpointing, fast rollout engine), the ``fast`` shape
of ``bench_rollout.py`` (2 completions per micro-batch, 2 micro-batches per step, G=2), forced-length
completions. A stand-in accuracy reward marks every other completion correct, so PSR keeps half the rows.
Reports seconds per optimizer step (median after the first), the part spent in generation and scoring, and
the rest (forward, backward, optimizer), plus the first step's loss of both variants.

    python benchmarks/bench_left_out_rows.py --out-dir benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_rollout import PIXELS, TRAIN_SHAPES, _train_dataset, log, versions  # noqa: E402

import nbhelpers.trainer as trainer_module  # noqa: E402
from nbhelpers.models import build_offline_processor, build_random_model, lora_config  # noqa: E402


def accuracy_reward(completions, **kwargs):
    """Stand-in: every other completion is correct (one of each group of two)."""
    return [float(i % 2 == 0) for i in range(len(completions))]


def psr_run(drop_left_out: bool, steps: int, tokens: int) -> dict:
    from trl import GRPOConfig

    step_s: list[float] = []
    generation_s: list[float] = []  # per call of _generate_and_score_completions
    generation_per_step: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            self.start, self.generation_before = time.perf_counter(), sum(generation_s)

        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            step_s.append(time.perf_counter() - self.start)
            generation_per_step.append(sum(generation_s) - self.generation_before)
            log(f"  drop_left_out={drop_left_out} step {state.global_step}: {step_s[-1]:.2f} s "
                f"({generation_per_step[-1]:.2f} s generating and scoring)")

    class TimedTrainer(trainer_module.ChartRLTrainer):
        def _generate_and_score_completions(self, inputs):
            torch.cuda.synchronize()
            start = time.perf_counter()
            output = super()._generate_and_score_completions(inputs)
            torch.cuda.synchronize()
            generation_s.append(time.perf_counter() - start)
            return output

    original = trainer_module.without_left_out_rows
    trainer_module.without_left_out_rows = original if drop_left_out else (lambda batch, rows: batch)
    try:
        processor = build_offline_processor(PIXELS, tiny=False)
        processor.tokenizer.padding_side = "left"
        torch.manual_seed(0)
        model = build_random_model("qwen2-5-3b-random", torch.bfloat16, "cuda")
        config = GRPOConfig(output_dir="/tmp/bench-left-out", max_completion_length=tokens, max_steps=steps,
                            logging_steps=1, report_to=[], bf16=True, gradient_checkpointing=True,
                            save_strategy="no", learning_rate=1e-5, beta=0.0, temperature=1.0,
                            dataloader_num_workers=0, disable_tqdm=True, seed=0, loss_type="dapo",
                            **TRAIN_SHAPES["fast"])
        trainer = TimedTrainer(model=model, reward_funcs=[accuracy_reward], args=config,
                               train_dataset=_train_dataset(), processing_class=processor,
                               peft_config=lora_config(r=8), callbacks=[StepTimer()], mode="psr",
                               rollout_engine="fast")
        torch.cuda.reset_peak_memory_stats()
        trainer.train()
    finally:
        trainer_module.without_left_out_rows = original
    rest = [s - g for s, g in zip(step_s, generation_per_step)]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = {"step_s": step_s, "generation_s_per_step": generation_per_step,
              "steady_step_s": statistics.median(step_s[1:]), "steady_rest_s": statistics.median(rest[1:]),
              "peak_gb": torch.cuda.max_memory_allocated() / 1e9, "loss": losses,
              "kept_positive": [h.get("mode/kept_positive") for h in trainer.state.log_history if "loss" in h]}
    del trainer, model
    torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per variant (the first is warm-up)")
    parser.add_argument("--tokens", type=int, default=768, help="completion tokens (forced)")
    parser.add_argument("--out-dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    result = {"what": "PSR step, fast shape, half the rows left out", "versions": versions(),
              "date": dt.date.today().isoformat(), "tokens": args.tokens}
    result["dropped"] = psr_run(True, args.steps, args.tokens)
    result["kept"] = psr_run(False, args.steps, args.tokens)
    result["step_speedup"] = result["kept"]["steady_step_s"] / result["dropped"]["steady_step_s"]
    result["rest_speedup"] = result["kept"]["steady_rest_s"] / result["dropped"]["steady_rest_s"]
    log(f"step {result['step_speedup']:.2f}x, forward+backward+optimizer {result['rest_speedup']:.2f}x")
    gpu = torch.cuda.get_device_name(0).replace(" ", "-")
    out = Path(args.out_dir) / f"left-out-rows-{gpu}-{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
