"""Stock generation inside the trainer keeps its KV cache (transformers 5's Trainer turns the model config's
use_cache off for training; without a fix every decode step would rerun the whole sequence)."""

from __future__ import annotations


from nbhelpers.config import load_config, resolve_parameter_file
from nbhelpers.training_setup import build_trainer
from fast_presets import TINY



def test_stock_rollouts_decode_one_token_per_step_with_a_cache(tmp_path):
    cfg = load_config([resolve_parameter_file("smoke", "presets"), TINY, resolve_parameter_file("grpo", "modes")],
                      {"output_root": str(tmp_path), "report_to": ["none"], "rollout_engine": "stock",
                       "max_completion_length": 8})
    trainer = build_trainer(cfg)
    widths = []  # tokens the language model processes per call

    def record(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        widths.append(embeds.shape[1] if embeds is not None else kwargs["input_ids"].shape[1])

    trainer.model.get_base_model().model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    batch = [trainer.train_dataset[0]] * cfg.num_generations
    trainer.model.eval()
    trainer._generate_and_score_completions(batch)
    decode = widths[1:]
    assert len(widths) > 2 and decode and all(w == 1 for w in decode), widths
