"""The shipped ``tiny-pretrained`` model: offline loading, its tokenizer and config agreeing, its size, and
answers that earn rewards on held-out synthetic problems (so the default's rewards are not zero)."""

from __future__ import annotations

import json

import pytest
import torch

from nbhelpers import data, models, registry, rewards, synthetic
from nbhelpers.sampling import encode_prompt

FRESH_SEED = 777_001  # a test-split seed that neither pretraining nor any preset uses
PIXELS = 112 * 112


@pytest.fixture(scope="module")
def model_and_processor():
    return (models.load_model("tiny-pretrained").eval(), models.load_processor("tiny-pretrained", PIXELS))


def test_registry_points_at_the_shipped_folder():
    kind, location = models.resolve_model("tiny-pretrained")
    assert kind == "asset" and location == str(registry.asset_dir("tiny-pretrained"))


def test_loads_offline_as_the_real_class_and_names_itself(model_and_processor):
    model, _ = model_and_processor
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert model.name_or_path == "tiny-pretrained" == model.config._name_or_path  # adapters record this name
    assert model.config.chartrl_base_model == "tiny-pretrained"


def test_tokenizer_and_config_agree_on_special_tokens(model_and_processor):
    model, processor = model_and_processor
    ids = models.special_token_ids(processor.tokenizer)
    assert model.config.image_token_id == ids["<|image_pad|>"]
    assert model.config.text_config.eos_token_id == ids["<|im_end|>"] == processor.tokenizer.eos_token_id
    assert model.config.text_config.vocab_size >= len(processor.tokenizer)
    completion = data.perfect_completion(synthetic.make_synthetic_examples(1, seed=FRESH_SEED, split="test",
                                                                           draw=False)[0])
    assert processor.tokenizer.decode(processor.tokenizer(completion).input_ids) == completion


def test_weights_fit_the_size_limit_and_the_record_says_how_they_were_made():
    folder = registry.asset_dir("tiny-pretrained")
    weight_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    assert 0 < weight_bytes <= 50 * 2**20
    record = json.loads((folder / "pretrain.json").read_text())
    assert record["steps"] > 0 and record["examples_seen"] == record["steps"] * record["hyperparameters"]["BATCH_SIZE"]
    assert record["hyperparameters"]["SEED"] == 0 and record["train_seconds"] > 0 and record["device"]


def test_greedy_answers_on_fresh_problems_are_well_formed_and_some_are_correct(model_and_processor):
    model, processor = model_and_processor
    problems = synthetic.make_synthetic_examples(12, seed=FRESH_SEED, split="test")
    texts = []
    for problem in problems:
        inputs = encode_prompt(processor, problem, PIXELS)
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=192,
                                 pad_token_id=processor.tokenizer.pad_token_id)
        texts.append(processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    formats = [rewards.format_score(t) for t in texts]
    correct = [rewards.accuracy_score(t, p["answer"]) for t, p in zip(texts, problems)]
    assert sum(formats) / len(formats) >= 1.5, texts
    assert 0 < sum(correct) < len(problems), texts
