"""Two CPU processes (gloo, no DeepSpeed) against one process with the same global batch.

Rollouts use top_k=1, so every rank decodes the same completions as the single process whatever its
random stream; then rewards, correctness and advantages must agree, and so must the trained adapter.
"""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow
GLOBAL_BATCH = 8  # completions per optimizer step: 2 prompts x 4 generations


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, world, port, out_dir, mode):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from nbhelpers import trainer as trainer_module
    from nbhelpers.config import load_config, resolve_parameter_file

    cfg = load_config([resolve_parameter_file("smoke", "presets")],
                      {"mode": mode, "top_k": 1, "batch_size": GLOBAL_BATCH // world, "num_generations": 4,
                       "gradient_accumulation_steps": 1, "max_steps": 2, "lora_dropout": 0.0, "report_to": ["none"],
                       "save_steps": 100, "output_root": str(out_dir), "run_name": f"world{world}",
                       "persistent_root": "none"})
    advantages = []

    class Recording(trainer_module.ChartRLTrainer):
        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            gathered = self.accelerator.gather(output["advantages"].contiguous())
            advantages.append(gathered.tolist())
            return output

    trainer = trainer_module.build_trainer(cfg, run_dir=out_dir / f"world{world}")
    trainer.__class__ = Recording
    trainer.train()
    if trainer.accelerator.is_main_process:
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(trainer.accelerator.unwrap_model(trainer.model))
        torch.save({k: v.detach().cpu() for k, v in state.items()}, out_dir / f"adapter-world{world}.pt")
        (out_dir / f"advantages-world{world}.json").write_text(json.dumps(advantages))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def run(world, out_dir, mode):
    mp.start_processes(worker, args=(world, free_port(), out_dir, mode), nprocs=world, join=True,
                       start_method="spawn")
    adapter = torch.load(out_dir / f"adapter-world{world}.pt")
    return adapter, json.loads((out_dir / f"advantages-world{world}.json").read_text())


@pytest.mark.parametrize("mode", ["nsr", "w-reinforce"])
def test_two_ranks_match_one_process(tmp_path, mode):
    one, adv_one = run(1, tmp_path, mode)
    two, adv_two = run(2, tmp_path, mode)
    assert adv_one == adv_two and len(adv_one) == 2
    assert any(a != 0 for step in adv_one for a in step)
    assert one.keys() == two.keys()
    changed = False
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-7, msg=name)
        changed |= bool((one[name] != 0).any()) and "lora_B" in name
    assert changed, "the adapter did not move: the comparison would prove nothing"
