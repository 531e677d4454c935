"""Gradient tests of the five objectives on tiny-random (on-policy, one step, fixed seed, fp32).

One generation batch per mode, drawn with the same seed from identical weights, so every mode sees the
same rollouts. Correctness comes from a deterministic stand-in accuracy reward (parity of the
completion's length), which gives a mix of correct and incorrect samples with random weights.
"""

import contextlib

import loss_cases
import pytest
import torch
from transformers import TrainerCallback
from trl import GRPOTrainer

from nbhelpers import models
from nbhelpers.config import LOSS_TYPES, MODES, load_config, resolve_parameter_file
from nbhelpers.data import make_synthetic_examples, to_trl_dataset
from nbhelpers.objectives import passk_advantages
from nbhelpers.platform import deepspeed_config_path
from nbhelpers.rewards import completion_text
from nbhelpers.trainer import ChartRLTrainer, gradients_are_finite, left_out_loss_scale, without_left_out_rows
from nbhelpers.training_setup import build_trainer, grpo_config
from fast_presets import TINY

G = 4
PASSK_K = 2  # k < G, so groups with two or more incorrect samples and one correct have non-zero advantages
PIXELS = 56 * 56


def accuracy_reward(completions, **kwargs):
    """Stand-in accuracy: a completion is 'correct' when its text has an even number of characters."""
    return [float(len(completion_text(c)) % 2 == 0) for c in completions]


def length_reward(completions, **kwargs):
    return [len(completion_text(c)) / 10.0 for c in completions]


@pytest.fixture(scope="module")
def dataset():
    return to_trl_dataset(make_synthetic_examples(4, seed=3), PIXELS)


def make_trainer(tmp_path, dataset, mode, loss_type="dapo", stock=False, rewards=(accuracy_reward, length_reward),
                 deepspeed_file=None):
    cfg = load_config([resolve_parameter_file("smoke", "presets"), TINY],
                      {"mode": mode, "loss_type": loss_type, "max_completion_length": 12, "batch_size": 2 * G,
                       "num_generations": G, "gradient_accumulation_steps": 1, "report_to": ["none"],
                       "temperature": 1.0, "lora_dropout": 0.0})
    args = grpo_config(cfg, tmp_path / f"{mode}-{loss_type}-{stock}", "fp32", use_cpu=deepspeed_file is None,
                       deepspeed_file=deepspeed_file)
    args.reward_weights = None
    torch.manual_seed(0)
    model = models.build_random_model("tiny-random")
    processor = models.build_offline_processor(PIXELS)
    processor.tokenizer.padding_side = "left"
    common = dict(model=model, reward_funcs=list(rewards), args=args, train_dataset=dataset,
                  processing_class=processor, peft_config=models.lora_config(r=4, alpha=8, dropout=0.0))
    trainer = GRPOTrainer(**common) if stock else \
        ChartRLTrainer(**common, mode=mode, lambda_psr=0.1, passk_k=PASSK_K)
    # LoRA B starts at zero, which would make every gradient w.r.t. A vanish: give B values.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def one_step(trainer, dataset):
    """Generate + score one batch (2 prompts x G) with a fixed seed; return (inputs, loss, grads)."""
    inputs = [dataset[i] for i in (0, 1) for _ in range(G)]
    torch.manual_seed(1234)
    batch = trainer._generate_and_score_completions(inputs)
    trainer._buffered_inputs = [batch]  # as TRL's _prepare_inputs leaves it: the step's micro-batches
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.model.zero_grad()
    return batch, loss.detach(), grads


def token_logps(trainer, batch):
    """Per-token log-probabilities of the batch's completions under the trainer's model (as TRL feeds them)."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    multimodal = {k: batch.get(k) for k in ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask",
                                              "spatial_shapes", "num_tiles", "image_sizes", "token_type_ids",
                                              "mm_token_type_ids", "image_position_ids")}
    logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention,
                                                             batch["completion_ids"].size(1), **multimodal)
    return logps


def reference_grads(trainer, batch, mask, weights, normaliser):
    """Gradient of sum_i weights_i * sum_t mask_it * (-log p_it) / normaliser."""
    trainer.model.zero_grad()
    logps = token_logps(trainer, batch)
    loss = -(logps * mask * weights.unsqueeze(1)).sum() / normaliser
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.model.zero_grad()
    return grads


def assert_grads_close(actual, expected):
    assert actual.keys() == expected.keys()
    total = sum(float(g.abs().sum()) for g in expected.values())
    assert total > 0, "reference gradient is zero: the test would prove nothing"
    for name in actual:  # fp32; the trainer leaves out rows the reference keeps, so sums round differently
        scale = float(expected[name].abs().max())
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6 * scale, msg=name)


@pytest.fixture(scope="module")
def rollouts(tmp_path_factory, dataset):
    """Each mode's batch, loss and gradients on the same rollouts, plus the full completion mask."""
    tmp = tmp_path_factory.mktemp("grad")
    out = {}
    for mode in MODES:
        trainer = make_trainer(tmp, dataset, mode)
        batch, loss, grads = one_step(trainer, dataset)
        correct = trainer._last_rewards_per_func[:, 0] >= 0.5
        out[mode] = dict(trainer=trainer, batch=batch, loss=loss, grads=grads, correct=correct)
    full_mask = out["grpo"]["batch"]["completion_mask"].float()
    for mode in out:
        assert torch.equal(out[mode]["batch"]["completion_ids"], out["grpo"]["batch"]["completion_ids"])
    correct = out["grpo"]["correct"]
    assert 0 < int(correct.sum()) < correct.numel(), "need both correct and incorrect samples"
    return out, full_mask, correct


def test_psr_gradient_is_token_mean_nll_of_correct_completions(rollouts):
    out, mask, correct = rollouts
    m = mask * correct.unsqueeze(1)
    ref = reference_grads(out["psr"]["trainer"], out["psr"]["batch"], m, torch.ones(len(correct)), m.sum())
    assert_grads_close(out["psr"]["grads"], ref)


def test_nsr_gradient_is_negated_token_mean_nll_of_incorrect_completions(rollouts):
    out, mask, correct = rollouts
    m = mask * (~correct).unsqueeze(1)
    ref = reference_grads(out["nsr"]["trainer"], out["nsr"]["batch"], m, -torch.ones(len(correct)), m.sum())
    assert_grads_close(out["nsr"]["grads"], ref)


def test_w_reinforce_is_lambda_psr_plus_nsr(rollouts):
    """With the batch's own token normaliser T: T * grad_W = lambda * T_c * grad_PSR + T_i * grad_NSR."""
    out, mask, correct = rollouts
    t_all = mask.sum()
    t_c = (mask * correct.unsqueeze(1)).sum()
    t_i = t_all - t_c
    combined = {n: (0.1 * t_c * out["psr"]["grads"][n] + t_i * out["nsr"]["grads"][n]) / t_all
                for n in out["psr"]["grads"]}
    assert_grads_close(out["w-reinforce"]["grads"], combined)
    weights = torch.where(correct, torch.tensor(0.1), torch.tensor(-1.0))
    ref = reference_grads(out["w-reinforce"]["trainer"], out["w-reinforce"]["batch"], mask, weights, t_all)
    assert_grads_close(out["w-reinforce"]["grads"], ref)


def test_passk_gradient_is_the_closed_form_advantage_weighted_token_mean_nll(rollouts):
    """Every sample in the loss (dapo: one token normaliser), weighted by its group's Pass@k advantage
    computed from the correctness bits with the trainer's passk_k."""
    out, mask, correct = rollouts
    advantages = passk_advantages(correct, G, PASSK_K)
    assert advantages.abs().max() > 0, "no group with non-zero Pass@k advantages: the test would prove nothing"
    torch.testing.assert_close(out["passk"]["batch"]["advantages"], advantages)
    ref = reference_grads(out["passk"]["trainer"], out["passk"]["batch"], mask, advantages, mask.sum())
    assert_grads_close(out["passk"]["grads"], ref)


def test_build_trainer_hands_the_objective_settings_to_the_trainer(tmp_path):
    cfg = load_config([resolve_parameter_file("passk", "modes"), resolve_parameter_file("smoke", "presets"), TINY],
                      {"passk_k": 3, "lambda_psr": 0.3, "output_root": str(tmp_path), "report_to": ["none"]})
    trainer = build_trainer(cfg)
    assert (trainer.mode, trainer.passk_k, trainer.lambda_psr) == ("passk", 3, 0.3)


def test_grpo_mode_matches_stock_trl(tmp_path, dataset, rollouts):
    out, _, _ = rollouts
    stock = make_trainer(tmp_path, dataset, "grpo", stock=True)
    batch, loss, grads = one_step(stock, dataset)
    assert torch.equal(batch["completion_ids"], out["grpo"]["batch"]["completion_ids"])
    torch.testing.assert_close(out["grpo"]["batch"]["advantages"], batch["advantages"])
    torch.testing.assert_close(out["grpo"]["loss"], loss, rtol=1e-6, atol=0)
    assert_grads_close(out["grpo"]["grads"], grads)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "bnpo", "cispo"])
def test_left_out_samples_leave_the_normaliser_for_every_loss_type(tmp_path, dataset, loss_type, rollouts):
    _, mask, correct = rollouts
    trainer = make_trainer(tmp_path, dataset, "psr", loss_type=loss_type)
    batch, _, grads = one_step(trainer, dataset)
    m = mask * correct.unsqueeze(1)
    kept = correct.float()
    if loss_type == "grpo":  # mean over kept sequences of each sequence's token mean
        weights, norm = kept / m.sum(1).clamp(min=1), kept.sum()
    elif loss_type == "dr_grpo":  # constant max_completion_length per kept sequence
        weights, norm = kept, kept.sum() * trainer.max_completion_length
    elif loss_type == "cispo":  # token mean over kept tokens; on-policy the ratio is 1, below the cap epsilon_high
        assert trainer.epsilon_high == 5.0  # TRL's recommendation for cispo (its default 0.2 would scale by 0.2)
        weights, norm = kept, m.sum()
    else:  # bnpo: token mean over kept tokens (one micro-batch)
        weights, norm = kept, m.sum()
    ref = reference_grads(trainer, batch, m, weights, norm)
    assert_grads_close(grads, ref)


def correct_only_in_first_batch():
    """Stand-in accuracy: half of the first generation batch is correct, nothing after it."""
    calls = []

    def accuracy_reward(completions, **kwargs):
        calls.append(len(completions))
        return [float(len(calls) == 1 and i % 2 == 0) for i in range(len(completions))]

    return accuracy_reward


class TrainableWeightsPerStep(TrainerCallback):
    """Copies of the trainable weights after each optimizer step, by step number."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        with gathered(list(params.values())):
            self.weights[state.global_step] = {n: p.detach().clone().cpu() for n, p in params.items()}


def gathered(params):
    """ZeRO-3 partitions parameters across processes: gather them to read the full tensors."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


def check_empty_step_leaves_the_weights_alone(tmp_path, dataset, mode, empty_step_moves_weights, deepspeed_file):
    # accuracy is the only reward, so grpo's step-2 advantages (and with beta 0, its gradients) are zero
    trainer = make_trainer(tmp_path, dataset, mode, rewards=(correct_only_in_first_batch(),),
                           deepspeed_file=deepspeed_file)
    assert trainer.beta == 0.0
    trainer.args.max_steps = 2
    trainer.args.save_strategy = "no"
    trainer.args.lr_scheduler_type = "constant"
    trainer.args.warmup_steps = 0
    recorder = TrainableWeightsPerStep()
    trainer.add_callback(recorder)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    grad_norms = [float(h["grad_norm"]) for h in trainer.state.log_history if "grad_norm" in h]
    assert len(grad_norms) == 2 and grad_norms[0] > 0 and grad_norms[1] == 0, grad_norms
    first, second = recorder.weights[1], recorder.weights[2]
    moved = [n for n in first if not torch.equal(first[n], second[n])]
    assert bool(moved) == empty_step_moves_weights, moved[:3]
    if mode == "psr":
        assert [h["mode/empty_step"] for h in trainer.state.log_history if "mode/empty_step" in h] == [0.0, 1.0]


@pytest.mark.parametrize("mode, empty_step_moves_weights", [("psr", False), ("grpo", True)])
def test_empty_step_leaves_the_weights_alone(tmp_path, dataset, mode, empty_step_moves_weights):
    """Step 1 learns; step 2 keeps no sample (psr) or has zero advantages (grpo). Adam's momentum from step
    1 would still move the weights at step 2: stock GRPO lets it (the control), psr skips the optimizer."""
    check_empty_step_leaves_the_weights_alone(tmp_path, dataset, mode, empty_step_moves_weights, None)


@pytest.mark.gpu
@pytest.mark.parametrize("mode, empty_step_moves_weights", [("psr", False), ("grpo", True)])
def test_empty_step_leaves_the_weights_alone_under_deepspeed_zero3(tmp_path, dataset, monkeypatch, mode,
                                                                   empty_step_moves_weights):
    """The same through DeepSpeed ZeRO-3 (one process), which steps our optimizer once per sub-group."""
    pytest.importorskip("deepspeed")
    from accelerate.state import AcceleratorState

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29531"}.items():
        monkeypatch.setenv(key, value)
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        check_empty_step_leaves_the_weights_alone(tmp_path, dataset, mode, empty_step_moves_weights,
                                                  str(deepspeed_config_path()))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_every_optimizer_call_of_an_empty_step_is_skipped(tmp_path, dataset):
    """DeepSpeed calls the wrapped optimizer's step once per parameter sub-group: none may update."""
    trainer = make_trainer(tmp_path, dataset, "psr")
    optimizer = trainer.create_optimizer()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for p in params:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in params]
    trainer._skip_optimizer_step = True
    optimizer.step()
    optimizer.step()
    assert all(torch.equal(b, p) for b, p in zip(before, params))
    trainer._skip_optimizer_step = False
    optimizer.step()
    assert not all(torch.equal(b, p) for b, p in zip(before, params))


def test_a_step_with_nonfinite_gradients_is_skipped_and_counted(tmp_path, dataset, caplog):
    trainer = make_trainer(tmp_path, dataset, "grpo")
    optimizer = trainer.create_optimizer()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for p in params:
        p.grad = torch.ones_like(p)
    params[-1].grad.view(-1)[0] = float("inf")
    before = [p.detach().clone() for p in params]
    with caplog.at_level("WARNING"):
        optimizer.step()
    assert all(torch.equal(b, p) for b, p in zip(before, params))
    assert trainer.nonfinite_steps == 1 and "non-finite gradients; optimizer step skipped" in caplog.text
    params[-1].grad.view(-1)[0] = 1.0
    optimizer.step()
    assert not all(torch.equal(b, p) for b, p in zip(before, params)) and trainer.nonfinite_steps == 1


def test_a_resumed_run_counts_the_nonfinite_steps_of_its_log_history(tmp_path, dataset):
    trainer = make_trainer(tmp_path, dataset, "psr")
    trainer.state.log_history = [{"step": 5, "loss": 0.1}, {"step": 10, "optimizer/nonfinite_steps": 3}]
    optimizer = trainer.create_optimizer()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    optimizer.step()
    assert trainer.nonfinite_steps == 4
    logs = {"loss": 0.2}
    trainer.log(logs)
    assert logs["optimizer/nonfinite_steps"] == 4


@pytest.mark.parametrize("grads, expected", [
    ([[1.0, 2.0], [3.0]], True), ([[1.0, float("nan")], [3.0]], False), ([[1.0], [float("-inf")]], False),
    ([None, [0.0]], True), ([None], True),
])
def test_gradients_are_finite(grads, expected):
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros(2 if g is None else len(g)))
        p.grad = None if g is None else torch.tensor(g)
        params.append(p)
    assert gradients_are_finite(params) is expected


@pytest.mark.parametrize("overrides, expected", [
    ({}, {"full_determinism": False, "seed": 42, "data_seed": 42}),
    ({"full_determinism": True, "seed": 7}, {"full_determinism": True, "seed": 7, "data_seed": 7}),
    ({"save_steps": 3, "save_total_limit": 1}, {"save_steps": 3, "save_total_limit": 1}),
    ({}, {"epsilon_high": 0.2}), ({"loss_type": "cispo"}, {"loss_type": "cispo", "epsilon_high": 5.0}),
])
def test_grpo_config_carries_the_run_settings(tmp_path, overrides, expected):
    cfg = load_config([resolve_parameter_file("smoke", "presets"), TINY], {"report_to": ["none"], **overrides})
    args = grpo_config(cfg, tmp_path, "fp32", use_cpu=True, deepspeed_file=None)
    assert {key: getattr(args, key) for key in expected} == expected


def vlm_batch(kept_rows):
    """A micro-batch of 3 rows shaped as TRL's: row i has one image of (i + 1) x 2 patches, valued i."""
    grid = torch.tensor([[1, i + 1, 2] for i in range(3)])
    return {
        "prompt_ids": torch.arange(3).unsqueeze(1).repeat(1, 4), "completion_ids": torch.arange(3).unsqueeze(1),
        "completion_mask": torch.tensor([[1 if i in kept_rows else 0] for i in range(3)]),
        "advantages": torch.tensor([0.0, 1.0, 2.0]), "old_per_token_logps": None,
        "pixel_values": torch.cat([torch.full((int(g.prod()), 5), float(i)) for i, g in enumerate(grid)]),
        "image_grid_thw": grid, "num_images": [1, 1, 1], "num_items_in_batch": torch.tensor(7),
    }


@pytest.mark.parametrize("kept_rows, rows, expected_rows", [
    ([0, 2], 2, [0, 2]),
    ([1], 1, [1]),
    ([], 1, [0]),  # none kept: one row stays, with its zero mask, so every process runs forward and backward
    ([2], 2, [0, 2]),  # padded to another process's kept count with the first left-out row, batch order kept
    ([], 2, [0, 1]),
])
def test_without_left_out_rows_selects_rows_and_their_images(kept_rows, rows, expected_rows):
    out = without_left_out_rows(vlm_batch(kept_rows), rows)
    assert out["prompt_ids"][:, 0].tolist() == expected_rows
    assert out["advantages"].tolist() == [float(i) for i in expected_rows]
    assert out["image_grid_thw"].tolist() == [[1, i + 1, 2] for i in expected_rows]
    assert out["pixel_values"][:, 0].tolist() == [float(i) for i in expected_rows for _ in range((i + 1) * 2)]
    assert out["num_images"] == [1] * len(expected_rows)
    assert int(out["num_items_in_batch"]) == 7 and out["old_per_token_logps"] is None
    assert int(out["completion_mask"].sum()) == len(kept_rows)


def test_without_left_out_rows_keeps_a_full_batch_as_is_and_never_drops_a_kept_row():
    batch = vlm_batch([0, 1, 2])
    assert without_left_out_rows(batch, 3) is batch
    assert without_left_out_rows(vlm_batch([0]), 3)["prompt_ids"].size(0) == 3
    with pytest.raises(ValueError, match="would drop kept rows"):
        without_left_out_rows(vlm_batch([0, 2]), 1)


# ------------------------------------------------------------------ gradient accumulation with left-out rows
@pytest.fixture(scope="module")
def accumulation_cases(tmp_path_factory):
    """A trainer and each (pattern, mode)'s generation batch of 16 rows, 2 micro-batches (one process)."""
    trainer = loss_cases.build_trainer(tmp_path_factory.mktemp("accumulation"))
    return trainer, loss_cases.generation_batches(trainer, loss_cases.ONE_PROCESS_PAIRS)


def objective_weights(loss_type, batch, max_completion_length):
    """(per-row weight, normaliser) of the objective: grad = -sum_i w_i sum_t mask_it grad log p_it / normaliser,
    each loss type with left-out samples in no normaliser (see left_out_loss_scale)."""
    mask = batch["completion_mask"].float()
    tokens, advantages = mask.sum(1), batch["advantages"]
    kept = (tokens > 0).float()
    if loss_type in ("dapo", "cispo"):
        return advantages, mask.sum()
    if loss_type in ("grpo", "sapo"):  # on-policy sapo's soft gate has slope 1, like the clipped ratio
        return advantages * kept / tokens.clamp(min=1), kept.sum()
    if loss_type == "dr_grpo":
        return advantages, kept.sum() * max_completion_length
    micro = tokens.view(loss_cases.MICRO_BATCHES, -1).sum(1)  # bnpo: kept tokens per micro-batch
    per_row = micro.repeat_interleave(loss_cases.ROWS // loss_cases.MICRO_BATCHES)
    return advantages / per_row.clamp(min=1), (micro > 0).sum()


@pytest.mark.parametrize("pattern, mode", loss_cases.ONE_PROCESS_PAIRS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_accumulated_gradient_with_left_out_rows_is_the_objective(accumulation_cases, pattern, mode, loss_type):
    """Gradient accumulation 2, several micro-batches, rows left out (psr, nsr) or weighted (w-reinforce, passk):
    the summed gradient equals the objective's for every loss type. Without the rescaling in _compute_loss
    (TRL's per-micro-batch row and token counts) grpo, sapo, dr_grpo and bnpo would differ."""
    trainer, batches = accumulation_cases
    batch = batches[pattern, mode]
    loss_cases.set_case(trainer, mode, loss_type)
    grads = loss_cases.accumulated_grads(trainer, loss_cases.process_micro_batches(batch, 1, 0))
    weights, normaliser = objective_weights(loss_type, batch, trainer.max_completion_length)
    ref = reference_grads(trainer, batch, batch["completion_mask"].float(), weights, normaliser)
    loss_cases.assert_grads_close(grads, ref, f"{pattern} {mode} {loss_type}")


@pytest.mark.parametrize("loss_type, expected", [
    # rows 3 of a micro-batch, accumulation 2, 2 processes, 4 kept sequences: 3 * 2 * 2 / 4
    ("grpo", 3.0), ("sapo", 3.0), ("dr_grpo", 3.0),
    # local tokens 10, micro-batch tokens 40 (all processes), 1 of 2 micro-batches kept: 10 * 2 * 2 / (40 * 1)
    ("bnpo", 1.0),
    ("dapo", 1.0), ("cispo", 1.0),
])
def test_left_out_loss_scale_table(loss_type, expected):
    assert left_out_loss_scale(loss_type, rows=3, accumulation=2, processes=2, kept_sequences=4, local_tokens=10,
                               micro_batch_tokens=40, kept_micro_batches=1) == pytest.approx(expected)
