"""The gap between the rollout sampler's and the training forward's token log-probabilities (issue 26, item 2):
the engine's per-token log-probabilities, the logged gap, TRL's importance-sampling correction and its keys."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nbhelpers import models
from nbhelpers.config import ConfigError, load_config, resolve_parameter_file, training_fingerprint
from nbhelpers.data import make_synthetic_examples, to_trl_dataset
from nbhelpers.rewards import completion_text
from nbhelpers.rollout import Request, RolloutEngine, token_logprobs
from nbhelpers.trainer import GAP_KEYS, ChartRLTrainer, logprob_gap
from nbhelpers.training_setup import build_trainer, grpo_config
from fast_presets import TINY
from test_rollout import TINY_EOS, TINY_PAD, prompt_inputs

REPO = Path(__file__).resolve().parents[1]
IS_KEYS = ("sampling/importance_sampling_ratio/min", "sampling/importance_sampling_ratio/mean",
           "sampling/importance_sampling_ratio/max")
G, PIXELS = 4, 56 * 56


# ------------------------------------------------------------------------------------------ pure pieces
@pytest.mark.parametrize("logits, tokens, temperature, expected", [
    ([[0.0, 0.0]], [1], 1.0, [math.log(0.5)]),
    ([[0.0, math.log(3.0)]], [1, 0], 1.0, [math.log(0.75), math.log(0.25)]),  # one row of logits, two draws
    ([[0.0, math.log(3.0)], [2.0, 2.0]], [0, 1], 0.5, [math.log(1 / 10), math.log(0.5)]),  # 3**2 = 9 : 1
    ([[1.0, 5.0]], [1], 0.0, [5.0 - math.log(math.exp(1.0) + math.exp(5.0))]),  # greedy counts as T = 1
])
def test_token_logprobs(logits, tokens, temperature, expected):
    got = token_logprobs(torch.tensor(logits), torch.tensor(tokens), temperature)
    torch.testing.assert_close(got, torch.tensor(expected), rtol=0, atol=1e-6)


@pytest.mark.parametrize("train, sampler, mask, expected", [
    ([[-1.0, -2.0]], [[-1.5, -2.0]], [[1, 1]], (0.25, 0.5)),
    ([[-1.0, -2.0]], [[-1.5, -9.0]], [[1, 0]], (0.5, 0.5)),  # a masked token does not count
    ([[-1.0, -2.0]], [[float("nan"), -1.0]], [[1, 1]], (1.0, 1.0)),  # a NaN sampler value is left out
    ([[-1.0, -2.0]], [[-1.5, -9.0]], [[0, 0]], None),  # nothing to measure
])
def test_logprob_gap(train, sampler, mask, expected):
    got = logprob_gap(torch.tensor(train), torch.tensor(sampler), torch.tensor(mask))
    assert (got is None) if expected is None else tuple(float(v) for v in got) == pytest.approx(expected)


@pytest.mark.parametrize("overrides, message", [
    ({"importance_sampling_correction": "token_truncate", "rollout_engine": "stock"},
     "key 'importance_sampling_correction' is token_truncate, but rollout_engine stock"),
    ({"importance_sampling_correction": "tis"}, "key 'importance_sampling_correction' must be one of off"),
    ({"importance_sampling_cap": 0}, "key 'importance_sampling_cap' must be a finite number > 0"),
    ({"importance_sampling_cap": float("inf")}, "key 'importance_sampling_cap' must be a finite number > 0"),
])
def test_importance_sampling_keys_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_importance_sampling_keys_reach_trl_and_the_fingerprint(tmp_path):
    off = load_config()
    on = load_config(overrides={"importance_sampling_correction": "token_truncate", "importance_sampling_cap": 2})
    assert training_fingerprint(on) != training_fingerprint(off)
    args = grpo_config(on, tmp_path, "fp32", use_cpu=True, deepspeed_file=None)
    assert (args.vllm_importance_sampling_correction, args.vllm_importance_sampling_mode,
            args.vllm_importance_sampling_clip_max) == (True, "token_truncate", 2.0)
    assert grpo_config(off, tmp_path, "fp32", use_cpu=True, deepspeed_file=None) \
        .vllm_importance_sampling_correction is False  # TRL's own default is on


# ------------------------------------------------------------------------------------------ the engine
def test_engine_logprobs_are_the_model_forwards_log_softmax_over_temperature():
    """Each sampled token's log-probability equals log_softmax(logits / T) of one full forward of prompt +
    completion (fp32, CPU), for every token, the first one (from the prefill) included; also when rows are
    refilled with later samples (continuous batching, 2 rows for 3 samples)."""
    model = models.build_random_model("tiny-random").eval()
    processor = models.build_offline_processor(PIXELS, tiny=True)
    inputs = prompt_inputs(processor, 0)
    engine = RolloutEngine(model, TINY_EOS, TINY_PAD, max_new_tokens=10, temperature=0.7)
    (completions,), (logps,) = engine.generate_batch([(inputs, 3)], generator=torch.Generator().manual_seed(0),
                                                     logprobs=True)
    (_, refilled, refilled_logps), = engine.generate_stream([Request(0, inputs, 3)], rows=2, logprobs=True)
    plain = engine.generate_batch([(inputs, 1)])  # without logprobs: per prompt, token lists only
    assert len(plain) == 1 and all(isinstance(t, int) for t in plain[0][0])
    prompt_len = inputs["input_ids"].shape[1]
    for tokens, sampled in zip(completions + refilled, logps + refilled_logps):
        assert len(sampled) == len(tokens)
        ids = torch.cat([inputs["input_ids"], torch.tensor([tokens])], dim=1)
        mm = torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, len(tokens), dtype=torch.long)], dim=1)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm,
                           pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]).logits
        expected = torch.log_softmax(logits[0, prompt_len - 1:-1] / 0.7, dim=-1)[torch.arange(len(tokens)),
                                                                                   torch.tensor(tokens)]
        torch.testing.assert_close(torch.tensor(sampled), expected, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ training
def test_training_logs_a_near_zero_gap_in_fp32(tmp_path):
    """The smoke preset on tiny-random with the fast engine on the CPU, fp32, temperature 0.7: TRL's gap keys
    are logged at every step and the gap is below 1e-4 nats (it is about 1e-6)."""
    cfg = load_config([resolve_parameter_file("smoke", "presets"), TINY, resolve_parameter_file("grpo", "modes")],
                      {"output_root": str(tmp_path), "report_to": ["none"], "rollout_engine": "fast",
                       "temperature": 0.7, "max_steps": 1})
    trainer = build_trainer(cfg)
    trainer.train()
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert steps and all(key in entry for entry in steps for key in GAP_KEYS)
    assert max(entry[GAP_KEYS[1]] for entry in steps) < 1e-4
    assert not any(key in entry for entry in steps for key in IS_KEYS)  # correction off: no ratio logged


def accuracy_reward(completions, **kwargs):
    return [float(len(completion_text(c)) % 2 == 0) for c in completions]


def _trainer(tmp_path, engine: str, correction: str) -> ChartRLTrainer:
    """A psr trainer on tiny-random (LoRA B non-zero, so the loss has a gradient path), fp32, CPU."""
    cfg = load_config([resolve_parameter_file("smoke", "presets"), TINY],
                      {"mode": "psr", "loss_type": "dapo", "max_completion_length": 8, "batch_size": 2 * G,
                       "num_generations": G, "gradient_accumulation_steps": 1, "report_to": ["none"],
                       "rollout_engine": engine, "importance_sampling_correction": correction,
                       "importance_sampling_cap": 3.0})
    args = grpo_config(cfg, tmp_path / f"{engine}-{correction}", "fp32", use_cpu=True, deepspeed_file=None)
    args.reward_weights = None
    torch.manual_seed(0)
    processor = models.build_offline_processor(PIXELS)
    processor.tokenizer.padding_side = "left"
    trainer = ChartRLTrainer(model=models.build_random_model("tiny-random"), reward_funcs=[accuracy_reward],
                             args=args, train_dataset=to_trl_dataset(make_synthetic_examples(2, seed=3), PIXELS),
                             processing_class=processor, peft_config=models.lora_config(r=4, alpha=8, dropout=0.0),
                             mode="psr", rollout_engine=engine)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def _loss_and_metrics(trainer) -> tuple[float, dict]:
    inputs = [trainer.train_dataset[i] for i in (0, 1) for _ in range(G)]
    torch.manual_seed(1234)
    batch = trainer._generate_and_score_completions(inputs)
    trainer._buffered_inputs = [batch]
    loss = float(trainer.compute_loss(trainer.model, batch).detach())
    return loss, {key: list(values) for key, values in trainer._metrics["train"].items()}


def test_the_correction_weights_the_loss_by_the_capped_ratio(tmp_path, monkeypatch):
    """Sampler log-probabilities 0.5 nats below the training forward's make every token's ratio e^0.5 (under
    the cap 3): with token_truncate the psr loss is e^0.5 times the uncorrected one, and TRL logs the ratio."""
    import nbhelpers.rollout.engine as engine_module

    monkeypatch.setattr(engine_module, "token_logprobs", lambda *a: token_logprobs(*a) - 0.5)
    loss_off, metrics_off = _loss_and_metrics(_trainer(tmp_path, "fast", "off"))
    loss_on, metrics_on = _loss_and_metrics(_trainer(tmp_path, "fast", "token_truncate"))
    assert loss_off != 0
    assert loss_on == pytest.approx(loss_off * math.exp(0.5), rel=1e-4)
    for metrics in (metrics_off, metrics_on):
        assert metrics[GAP_KEYS[0]][0] == pytest.approx(0.5, abs=1e-4)
    assert metrics_on["sampling/importance_sampling_ratio/mean"][0] == pytest.approx(math.exp(0.5), rel=1e-4)
    assert not any(key in metrics_off for key in IS_KEYS)


def test_stock_generation_logs_no_gap_and_refuses_a_fallback_with_the_correction(tmp_path, monkeypatch):
    _, metrics = _loss_and_metrics(_trainer(tmp_path, "stock", "off"))
    assert not any(key in metrics for key in GAP_KEYS)  # absent, not zero
    monkeypatch.setenv("CHARTRL_ROLLOUT_FALLBACK", "stock")  # auto falls back to stock generate
    with pytest.raises(RuntimeError, match="importance_sampling_correction is on, but the fast rollout engine"):
        _loss_and_metrics(_trainer(tmp_path, "auto", "token_truncate"))


def test_benchmark_script_help_parses():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "logprob_gap.py"), "--help"],
                         capture_output=True, text=True, check=True)
    assert "--model" in out.stdout and "--steps" in out.stdout
