"""Gradient cases shared by the one-process and the two-process loss tests (tiny-random, fp32, on-policy).

One generation batch of 16 completions (4 prompts x G=4) is split into 2 micro-batches (gradient
accumulation 2) of 8 rows each: micro-batch j is rows 8j..8j+7. With P processes, process p holds rows
8j + p*8/P .. of each micro-batch, so one process with the whole micro-batches sees the same global batch.
Correctness comes from a fixed pattern per case, chosen so that processes keep different numbers of rows
and a process (or a whole micro-batch) may keep none.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nbhelpers import models
from nbhelpers.config import LOSS_TYPES, load_config, resolve_parameter_file
from nbhelpers.data import make_synthetic_examples, to_trl_dataset
from nbhelpers.rewards import completion_text
from nbhelpers.trainer import ChartRLTrainer, select_rows
from nbhelpers.training_setup import grpo_config
from fast_presets import TINY


G = 4
PIXELS = 56 * 56
ROWS = 16  # completions in the generation batch
MICRO_BATCHES = 2  # gradient accumulation steps
# rows:        micro-batch 0: process 0 | process 1     micro-batch 1: process 0 | process 1
PATTERNS = {
    "uneven": [1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0],  # psr keeps 3|1 then 0|2; nsr 1|3 then 4|2
    "second-empty": [1, 0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # psr keeps nothing in micro-batch 1
}
PASSK_K = 2  # "uneven" with G = 4 and k = 2: groups 2 and 4 have non-zero Pass@2 advantages, groups 1 and 3 zero
# Two processes: psr and nsr on both patterns, w-reinforce and passk (nothing left out) and grpo on one, every loss
# type; not grpo with bnpo: mode grpo is TRL's GRPO unchanged, whose bnpo normalises by each process's own tokens.
CASES = [(pattern, mode, loss_type) for pattern in PATTERNS for mode in ("psr", "nsr") for loss_type in LOSS_TYPES] + \
    [("uneven", mode, loss_type) for mode in ("w-reinforce", "passk", "grpo") for loss_type in LOSS_TYPES
     if (mode, loss_type) != ("grpo", "bnpo")]
# One process: a micro-batch with nothing kept (psr), unequal kept counts (nsr), weights without left-out rows
# (w-reinforce, passk).
ONE_PROCESS_PAIRS = [("second-empty", "psr"), ("uneven", "nsr"), ("uneven", "w-reinforce"), ("uneven", "passk")]
TRL_EPSILON = 0.2


class PatternAccuracy:
    """Stand-in accuracy reward: the correctness bits of ``pattern`` (set before each generation)."""

    __name__ = "accuracy_reward"

    def __init__(self) -> None:
        self.pattern: list[int] = []

    def __call__(self, completions, **kwargs):
        assert len(completions) == len(self.pattern)
        return [float(bit) for bit in self.pattern]


def length_reward(completions, **kwargs):
    return [len(completion_text(c)) / 10.0 for c in completions]


def problems() -> list[dict]:
    """Four synthetic chart problems as TRL rows, without the system prompt (a thousand tokens of the tiny
    tokenizer, which would make every forward pass slow)."""
    rows = to_trl_dataset(make_synthetic_examples(4, seed=3), PIXELS)
    return [{**row, "prompt": [turn for turn in row["prompt"] if turn["role"] != "system"]} for row in rows]


def build_trainer(out_dir: Path) -> ChartRLTrainer:
    """A psr trainer (mode and loss type are switched per case) on tiny-random with LoRA B made non-zero."""
    cfg = load_config([resolve_parameter_file("smoke", "presets"), TINY],
                      {"mode": "psr", "max_completion_length": 12, "batch_size": ROWS // MICRO_BATCHES,
                       "num_generations": G, "gradient_accumulation_steps": MICRO_BATCHES, "report_to": ["none"],
                       "temperature": 1.0, "lora_dropout": 0.0})
    args = grpo_config(cfg, Path(out_dir) / "trainer", "fp32", use_cpu=True, deepspeed_file=None)
    args.reward_weights = None
    torch.manual_seed(0)
    processor = models.build_offline_processor(PIXELS)
    processor.tokenizer.padding_side = "left"
    trainer = ChartRLTrainer(model=models.build_random_model("tiny-random"),
                             reward_funcs=[PatternAccuracy(), length_reward], args=args,
                             train_dataset=to_trl_dataset(make_synthetic_examples(4, seed=3), PIXELS),
                             processing_class=processor, peft_config=models.lora_config(r=4, alpha=8, dropout=0.0),
                             mode="psr", passk_k=PASSK_K)
    with torch.no_grad():  # LoRA B starts at zero, which would make every gradient w.r.t. A vanish
        gen = torch.Generator().manual_seed(1)
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    trainer.model.train()
    return trainer


def generation_batches(trainer: ChartRLTrainer, pairs=None) -> dict[tuple[str, str], dict]:
    """Each (pattern, mode)'s scored generation batch (default: all pairs), all from the same rollouts."""
    inputs = [row for row in problems() for _ in range(G)]
    accuracy = trainer.reward_funcs[0]
    out = {}
    for pattern, mode in pairs or sorted({(pattern, mode) for pattern, mode, _ in CASES}):
        accuracy.pattern, trainer.mode = PATTERNS[pattern], mode
        torch.manual_seed(1234)
        out[pattern, mode] = trainer._generate_and_score_completions(inputs)
    first = next(iter(out.values()))["completion_ids"]
    assert all(torch.equal(b["completion_ids"], first) for b in out.values())
    return out


def process_micro_batches(batch: dict, processes: int, rank: int) -> list[dict]:
    """Process ``rank``'s share of each micro-batch of a generation batch."""
    per_micro, per_process = ROWS // MICRO_BATCHES, ROWS // MICRO_BATCHES // processes
    starts = [j * per_micro + rank * per_process for j in range(MICRO_BATCHES)]
    return [select_rows(batch, torch.arange(start, start + per_process)) for start in starts]


def set_case(trainer: ChartRLTrainer, mode: str, loss_type: str) -> None:
    """Mode and loss type of the next gradient, with the epsilon_high grpo_config gives that loss type."""
    trainer.mode, trainer.loss_type = mode, loss_type
    trainer.epsilon_high = 5.0 if loss_type == "cispo" else TRL_EPSILON


def accumulated_grads(trainer: ChartRLTrainer, micro_batches: list[dict]) -> dict[str, torch.Tensor]:
    """This process's gradient of one optimizer step over ``micro_batches`` (as TRL's training loop runs it)."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = len(micro_batches)
    trainer.args.gradient_accumulation_steps = trainer.args.steps_per_generation = len(micro_batches)
    trainer._buffered_inputs = micro_batches  # as TRL's _prepare_inputs leaves it
    trainer.model.zero_grad()
    for batch in micro_batches:
        trainer.compute_loss(trainer.model, batch).backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.model.zero_grad()
    return grads


def assert_grads_close(actual, expected, msg=""):
    """fp32 agreement at each tensor's scale: sums over different row sets and batch shapes round differently, and
    group-normalised advantages cancel (relative differences of a few 1e-6 seen); scale errors are O(1)."""
    assert actual.keys() == expected.keys()
    total = sum(float(g.abs().sum()) for g in expected.values())
    assert total > 0, f"{msg}: reference gradient is zero: the test would prove nothing"
    for name in actual:
        scale = float(expected[name].abs().max())
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-5 * scale, msg=f"{msg} {name}")
