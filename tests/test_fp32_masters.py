"""fp32 master weights (issue 26, item 1): full fine-tuning in bf16 compute keeps its weights in fp32 under autocast,
so an update far below a bf16 step (lr 1e-6) is not rounded away; the rollout engine decodes with bf16 compute
copies of those weights (:class:`nbhelpers.rollout.weights.ComputeCopies`); LoRA keeps its frozen base in the
compute dtype and PEFT's fp32 adapters."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers import TrainerCallback

from nbhelpers.config import load_config, resolve_parameter_file
from nbhelpers.models import build_random_model
from nbhelpers.platform import weights_dtype
from nbhelpers.rollout import ComputeCopies, rollout_model
from nbhelpers.training_setup import build_trainer
from fast_presets import TINY

ADAM_EPS = 1e-8  # the Trainer's adam_epsilon: a gradient at least this large moves a weight by >= lr/2 at step 1


def tiny_config(root, **overrides):
    files = [resolve_parameter_file("nsr", "modes"), resolve_parameter_file("smoke", "presets"), TINY,
             resolve_parameter_file("local-cpu", "platforms")]  # nsr: tiny-random's wrong answers all get a gradient
    return load_config(files, {"output_root": str(root), "report_to": ["none"], "resume": False, **overrides})


class StepRecorder(TrainerCallback):
    """The weights and gradients just before the optimizer step, and the weights just after it."""

    def __init__(self, model) -> None:
        self.model = model

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.before = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.after = {n: p.detach().clone() for n, p in self.model.named_parameters()}


# ------------------------------------------------------------------------------------------ the training step
@pytest.fixture(scope="module")
def full_bf16_step(tmp_path_factory):
    """One full fine-tuning step at lr 1e-6 with bf16 compute on the CPU: (trainer, recorder, run folder)."""
    root = tmp_path_factory.mktemp("masters")
    trainer = build_trainer(tiny_config(root, finetune="full", dtype="bf16", learning_rate=1e-6, max_steps=1))
    recorder = StepRecorder(trainer.model)
    trainer.add_callback(recorder)
    trainer.train()
    return trainer, recorder, root


def test_a_step_at_lr_1e6_in_bf16_compute_changes_every_weight_with_a_gradient(full_bf16_step):
    trainer, recorder, _ = full_bf16_step
    with_gradient = unchanged = 0
    for name, grad in recorder.grads.items():
        moves = grad.abs() >= ADAM_EPS
        with_gradient += int(moves.sum())
        unchanged += int((moves & (recorder.after[name] == recorder.before[name])).sum())
    assert with_gradient > 0.8 * sum(p.numel() for p in trainer.model.parameters())
    assert unchanged == 0, f"{unchanged} of {with_gradient} weights with a gradient did not change"
    assert trainer.args.bf16 and {p.dtype for p in trainer.model.parameters()} == {torch.float32}


def test_the_saved_checkpoint_holds_fp32_weights(full_bf16_step):
    trainer, _, root = full_bf16_step
    weights = next(root.glob("*/checkpoint-1/model.safetensors"))
    with safe_open(str(weights), "pt") as f:
        dtypes = {f.get_slice(key).get_dtype() for key in f.keys()}
    assert dtypes == {"F32"}


def test_the_engine_decoded_with_bf16_copies_refreshed_after_the_step(full_bf16_step):
    trainer, recorder, _ = full_bf16_step
    copies = trainer._chartrl_compute_copies
    assert trainer._chartrl_rollout_engine.model is copies.model  # the step's rollouts ran on the copies
    assert copies.version == 0 and {p.dtype for p in copies.model.parameters()} == {torch.bfloat16}
    assert rollout_model(trainer, trainer.model) is copies.model  # the next generation, after step 1
    assert copies.version == 1
    for name, copy in copies.model.named_parameters():
        assert torch.equal(copy, recorder.after[name].to(torch.bfloat16)), name


# ------------------------------------------------------------------------------------------ which dtype loads
@pytest.mark.parametrize("finetune, dtype, deepspeed, expected", [
    ("full", "bf16", "none", "fp32"),  # masters in fp32, compute under autocast
    ("full", "fp16", "none", "fp32"),
    ("full", "fp32", "none", "fp32"),
    ("full", "bf16", "zero3", "bf16"),  # DeepSpeed keeps fp32 masters in its optimizer
    ("lora", "bf16", "none", "bf16"),  # frozen base in the compute dtype; PEFT's adapters in fp32
    ("lora", "fp16", "none", "fp16"),
])
def test_weights_dtype(finetune, dtype, deepspeed, expected):
    assert weights_dtype(dtype, finetune, deepspeed) == expected


def test_lora_keeps_its_base_frozen_in_bf16_and_trains_fp32_adapters(tmp_path):
    trainer = build_trainer(tiny_config(tmp_path, finetune="lora", dtype="bf16"))
    trainable = {p.dtype for p in trainer.model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in trainer.model.parameters() if not p.requires_grad}
    assert (trainable, frozen) == ({torch.float32}, {torch.bfloat16})
    assert rollout_model(trainer, trainer.model) is trainer.model  # no compute copies: the engine reads the model
    assert getattr(trainer, "_chartrl_compute_copies", None) is None


# ------------------------------------------------------------------------------------------ ComputeCopies
def test_compute_copies_are_the_masters_in_bf16_with_ties_and_buffers():
    master = build_random_model("tiny-random", torch.float32)
    copies = ComputeCopies(master, torch.bfloat16)
    assert copies.refresh(0) and copies.refreshes == 1
    named = dict(master.named_parameters())
    for name, copy in copies.model.named_parameters():
        assert not copy.requires_grad and torch.equal(copy, named[name].to(torch.bfloat16)), name
    model = copies.model
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # tied, as the master
    buffers = dict(master.named_buffers())
    for name, buffer in model.named_buffers():
        assert buffer.dtype == buffers[name].dtype and torch.equal(buffer, buffers[name]), name
    assert copies.copy_bytes() == 2 * sum(p.numel() for p in master.parameters())
    ids = torch.arange(300, 340).view(1, -1)
    with torch.no_grad():
        expected, got = master(input_ids=ids).logits, model(input_ids=ids).logits.float()
    assert got.dtype == torch.float32 and torch.allclose(got, expected, atol=0.05, rtol=0.05)


def test_compute_copies_refresh_only_when_the_version_changes():
    master = build_random_model("tiny-random", torch.float32)
    copies = ComputeCopies(master, torch.bfloat16)
    copies.refresh(3)
    weight = master.get_input_embeddings().weight
    storage = copies.model.get_input_embeddings().weight.data_ptr()
    with torch.no_grad():
        weight.add_(1.0)
    assert not copies.refresh(3) and copies.refreshes == 1  # same version: nothing copied
    assert not torch.equal(copies.model.get_input_embeddings().weight, weight.to(torch.bfloat16))
    assert copies.refresh(4) and copies.refreshes == 2
    assert torch.equal(copies.model.get_input_embeddings().weight, weight.to(torch.bfloat16))
    assert copies.model.get_input_embeddings().weight.data_ptr() == storage  # in place: CUDA graphs stay valid
