"""The data-parallel (DDP) training path on one GPU, with the fast rollout engine: run through
``benchmarks/dp_one_gpu.sh`` (``accelerate launch`` with ``nbhelpers/launch_configs/multi-gpu.yaml`` and
``--num_processes 1``). The smoke preset (tiny-pretrained), mode nsr (left-out rows), ``rollout_engine: fast``, which
stops with an error if the engine cannot run. Accelerate does not wrap a one-process model in DDP, so after
training the model is wrapped in torch's DistributedDataParallel by hand and one more generation batch runs
through the engine. Prints the setup and the evidence; the last line starts with ``DP ONE GPU OK``.

Usage: python benchmarks/dp_one_gpu.py OUT_DIR [key=value ...]   (under accelerate launch)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch


def main() -> None:
    import accelerate
    import peft
    import transformers
    import trl

    from nbhelpers import rollout
    from nbhelpers.config import load_config, resolve_parameter_file
    from nbhelpers.training_setup import build_trainer

    out = Path(sys.argv[1])
    overrides = {"rollout_engine": "fast", "output_root": str(out), "run_name": "dp-one-gpu",
                 "persistent_root": "none", "report_to": ["none"], "max_steps": 2, "save_steps": 100,
                 "resume": False}
    cfg = load_config([resolve_parameter_file("smoke", "presets"), resolve_parameter_file("nsr", "modes")],
                      {**overrides, **dict(arg.split("=", 1) for arg in sys.argv[2:])})
    calls = {"generate": 0, "completions": 0}
    stream = rollout.RolloutEngine.generate_stream  # every engine run (generate, generate_batch) goes through it

    def counted(self, *args, **kwargs):
        calls["generate"] += 1
        for key, completions, *logprobs in stream(self, *args, **kwargs):  # training asks for log-probabilities
            calls["completions"] += len(completions)
            yield key, completions, *logprobs

    rollout.RolloutEngine.generate_stream = counted
    trainer = build_trainer(cfg, run_dir=out / cfg.run_name)
    acc = trainer.accelerator
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    print(f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} | torch {torch.__version__} transformers "
          f"{transformers.__version__} trl {trl.__version__} peft {peft.__version__} accelerate "
          f"{accelerate.__version__} | GPU {gpu}", flush=True)
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
    dtype = "bf16" if trainer.args.bf16 else "fp16" if trainer.args.fp16 else "fp32"
    print(f"accelerate distributed_type {acc.distributed_type.value}, processes {acc.num_processes}, "
          f"process group {backend}, deepspeed {cfg.deepspeed}, dtype {dtype}", flush=True)
    start = time.monotonic()
    trainer.train()
    print(f"training: {trainer.state.global_step} steps in {time.monotonic() - start:.1f} s; fast engine used: "
          f"{trainer._fast_rollouts}; engine generate calls {calls['generate']}, completions {calls['completions']}",
          flush=True)
    assert trainer._fast_rollouts is True and calls["generate"] > 0, "the fast engine did not generate"

    ddp = torch.nn.parallel.DistributedDataParallel
    trainer.model_wrapped = ddp(trainer.model, device_ids=[acc.local_process_index])
    reason = rollout.trainer_rollout_unavailable_reason(trainer)
    print(f"DDP-wrapped model ({type(trainer.model_wrapped).__name__}): engine check says {reason!r}", flush=True)
    assert reason is None, reason
    before = calls["completions"]
    rows = [trainer.train_dataset[i] for i in range(2) for _ in range(cfg.num_generations)]
    batch = trainer._generate_and_score_completions(rows)
    made = calls["completions"] - before
    print(f"DDP-wrapped generation: {made} completions from the engine, completion_ids "
          f"{tuple(batch['completion_ids'].shape)}", flush=True)
    assert made == len(rows), (made, len(rows))
    print(f"DP ONE GPU OK: {acc.distributed_type.value} x{acc.num_processes} ({backend}), fast engine in training "
          f"({calls['generate']} engine runs) and under DistributedDataParallel; peak GPU memory "
          f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
