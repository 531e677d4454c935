import math

import pytest
import yaml

from nbhelpers.config import (MODES, ConfigError, RunConfig, describe, estimate_training_steps, field_help,
                              load_config, load_resolved_config, resolve_parameter_file,
                              resolved_epsilon_high, save_resolved_config)


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if isinstance(data, dict) else data)
    return path


def test_precedence_files_then_flags_then_set(tmp_path):
    a = write(tmp_path, "a.yaml", {"mode": "psr", "seed": 1, "num_generations": 2, "batch_size": 2})
    b = write(tmp_path, "b.yaml", {"seed": 2, "learning_rate": 3e-6})
    cfg = load_config([a, b], ["seed=4"], flags={"seed": 3, "lambda_psr": 0.2})
    assert (cfg.mode, cfg.seed, cfg.learning_rate, cfg.lambda_psr) == ("psr", 4, 3e-6, 0.2)
    assert cfg._sources["mode"] == str(a) and cfg._sources["learning_rate"] == str(b)
    assert cfg._sources["seed"] == "--set" and cfg._sources["lambda_psr"] == "command-line flag"
    assert load_config([a, b]).seed == 2


def test_shipped_parameter_files_all_load():
    for mode in MODES:
        for preset in ("smoke", "poc", "ultra-fast", "fast", "moderate", "safe", "paper"):
            for platform in ("colab-a100", "kaggle-2xt4", "local-cpu"):
                files = [resolve_parameter_file(mode, "modes"), resolve_parameter_file(preset, "presets"),
                         resolve_parameter_file(platform, "platforms")]
                # passk needs k < G: the smoke preset sets k = 2, the others (G = 2 or 4) leave it to the user
                overrides = {"passk_k": 1} if mode == "passk" and preset != "smoke" else None
                cfg = load_config(files, overrides)
                assert cfg.mode == mode


@pytest.mark.parametrize("preset", ["poc", "safe", "paper"])
def test_passk_on_a_preset_whose_group_is_at_most_k_names_passk_k(preset):
    with pytest.raises(ConfigError, match=r"modes/passk.yaml: key 'passk_k' must be below num_generations"):
        load_config([resolve_parameter_file("passk", "modes"), resolve_parameter_file(preset, "presets")])


PRESETS = [  # preset, subset, epochs, generations (the seeds' table)
    ("poc", 100, 1, 2), ("ultra-fast", 1000, 1, 2), ("fast", 10000, 1, 2), ("moderate", None, 1, 2),
    ("safe", None, 1, 4), ("paper", None, 4, 4),
]


@pytest.mark.parametrize("preset,subset,epochs,generations", PRESETS)
def test_preset_table(preset, subset, epochs, generations):
    cfg = load_config([resolve_parameter_file(preset, "presets")])
    assert (cfg.subset_size, cfg.num_epochs, cfg.num_generations) == (subset, epochs, generations)


ERRORS = [  # file content, overrides, words the message must contain
    ({"learnin_rate": 1e-5}, None, ["unknown key 'learnin_rate'", "learning_rate", "bad.yaml"]),
    ({"seed": "abc"}, None, ["'seed'", "expects int", "bad.yaml"]),
    ({"gradient_checkpointing": "maybe"}, None, ["'gradient_checkpointing'", "bool"]),
    ({"mode": "ppo"}, None, ["'mode'", "grpo, psr, nsr, w-reinforce", "bad.yaml"]),
    ({"num_generations": 3, "batch_size": 4, "gradient_accumulation_steps": 1}, None,
     ["'batch_size'", "not divisible by num_generations"]),
    ({"mode": "nsr", "num_generations": 1, "batch_size": 2}, None, ["'num_generations'", ">= 2", "nsr"]),
    ({"mode": "w-reinforce", "num_generations": 1}, None, ["'num_generations'", "w-reinforce"]),
    ({"n_samples": 8, "passk_ks": [1, 4, 16]}, None, ["'passk_ks'", "[16]", "n_samples = 8"]),
    ({"lambda_psr": 1.5}, None, ["'lambda_psr'", "(0, 1]"]),
    ({"passk_k": 0}, None, ["bad.yaml", "'passk_k'", ">= 1"]),
    ({"passk_k": 2.5}, None, ["bad.yaml", "'passk_k'", "expects int"]),
    ({"mode": "passk", "num_generations": 4, "passk_k": 4}, None,
     ["bad.yaml", "'passk_k'", "below num_generations = 4", "every advantage is 0"]),
    ({"mode": "passk", "num_generations": 2, "batch_size": 2}, ["passk_k=3"], ["--set", "'passk_k'", "got 3"]),
    ({"top_p": 0}, None, ["'top_p'"]),
    ({"loss_type": "ppo"}, None, ["'loss_type'", "dapo"]),
    ({"reward_weights": {"beauty": 1.0}}, None, ["'reward_weights'", "beauty"]),
    ({"length_window": [50, 10]}, None, ["'length_window'"]),
    ({"report_to": ["mlflow"]}, None, ["'report_to'", "mlflow"]),
    ({}, ["batch_size=three"], ["--set", "'batch_size'", "expects int"]),
    ({}, ["nonsense=1"], ["--set", "unknown key 'nonsense'"]),
    ({}, ["subset_size=0"], ["'subset_size'", ">= 1"]),
    ("mode: [grpo\n", None, ["bad.yaml", "line", "invalid YAML"]),
    ("- a\n- b\n", None, ["bad.yaml", "mapping"]),
    ({"correctness_from": "total"}, None, ["bad.yaml", "'correctness_from' is total", "'reward_threshold'",
                                           "set explicitly", "weighted total reward"]),
    ({"loss_type": "cispo", "epsilon_high": 0.2}, None, ["'epsilon_high'", "cispo", "5.0"]),
    ({"epsilon_high": -1}, None, ["'epsilon_high'", "> 0"]),
    ({"deepspeed": "zero2"}, None, ["'deepspeed'", "none, zero3, auto"]),
]


@pytest.mark.parametrize("content,overrides,words", ERRORS)
def test_config_errors_name_key_and_source(tmp_path, content, overrides, words):
    path = write(tmp_path, "bad.yaml", content)
    with pytest.raises(ConfigError) as info:
        load_config([path], overrides)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_missing_file_and_unknown_short_name(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config([tmp_path / "nope.yaml"])
    with pytest.raises(ConfigError, match="no parameters file named 'smok'"):
        resolve_parameter_file("smok")


def test_types_are_coerced_where_safe(tmp_path):
    cfg = load_config(overrides=["learning_rate=1", "num_epochs=2", "subset_size=none", "report_to=tensorboard,wandb",
                                 "gradient_checkpointing=false", "lora_target_modules=[q_proj, v_proj]"])
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert cfg.subset_size is None and cfg.report_to == ["tensorboard", "wandb"]
    assert cfg.gradient_checkpointing is False and cfg.lora_target_modules == ["q_proj", "v_proj"]


def test_resolved_config_round_trip(tmp_path):
    cfg = load_config(overrides={"mode": "nsr", "seed": 7})
    path = save_resolved_config(cfg, tmp_path / "run")
    again = load_resolved_config(path)
    assert again.to_dict() == cfg.to_dict()
    assert "mode" in describe(cfg) and "nsr" in describe(cfg)


def test_run_name_keeps_runs_apart():
    names = {load_config(overrides=o).resolved_run_name() for o in
             ({"mode": "psr"}, {"mode": "nsr"}, {"seed": 1}, {"subset_size": 10}, {"dataset_name": "chartqa"},
              {"vlm_name": "qwen2-5-3b"})}
    assert len(names) == 6


ESTIMATES = [  # problems, G, batch, grad_acc, processes, epochs, max_steps, expected steps
    (10000, 2, 2, 2, 1, 1, -1, 5000),
    (34194, 4, 4, 2, 1, 4, -1, 4 * 17097),
    (34194, 2, 2, 2, 2, 1, -1, 8549),
    (10, 4, 4, 1, 1, 1, -1, 10),
    (7, 2, 2, 2, 1, 1.5, -1, 6),
    (100, 2, 2, 2, 1, 1, 3, 3),
]


@pytest.mark.parametrize("problems,g,batch,acc,procs,epochs,max_steps,expected", ESTIMATES)
def test_training_step_estimator(problems, g, batch, acc, procs, epochs, max_steps, expected):
    cfg = RunConfig(num_generations=g, batch_size=batch, gradient_accumulation_steps=acc, num_epochs=epochs,
                    max_steps=max_steps)
    est = estimate_training_steps(cfg, problems, procs)
    assert est.total_steps == expected
    assert est.steps_per_epoch == math.ceil(problems * g / (batch * acc * procs))


@pytest.mark.parametrize("env,expected", [
    ({}, []),
    ({"WANDB_API_KEY": "x"}, ["wandb"]),
    ({"WANDB_MODE": "offline"}, ["wandb"]),
])
def test_wandb_only_with_a_key_or_offline_mode(monkeypatch, env, expected):
    from nbhelpers.training_setup import _report_to

    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert _report_to(load_config(overrides={"report_to": ["tensorboard", "wandb"]})) == expected


def test_total_correctness_needs_an_explicit_threshold(tmp_path):
    cfg = load_config(overrides=["correctness_from=total", "reward_threshold=9.5"])
    assert (cfg.correctness_from, cfg.reward_threshold) == ("total", 9.5)
    assert load_config().reward_threshold == 0.5  # the accuracy reward's default stays
    assert "weighted total reward" in field_help("reward_threshold")


@pytest.mark.parametrize("overrides, expected", [
    ({}, 0.2), ({"loss_type": "cispo"}, 5.0), ({"loss_type": "cispo", "epsilon_high": 3.0}, 3.0),
    ({"epsilon_high": 0.28}, 0.28),
])
def test_epsilon_high_defaults_to_trls_recommendation_per_loss_type(overrides, expected):
    assert resolved_epsilon_high(load_config(overrides=overrides)) == expected


@pytest.mark.parametrize("finetune, dtype, deepspeed, config_file", [
    ("lora", "fp16", "none", "multi-gpu.yaml"),  # plain data parallel, the fast engine on each T4
    ("full", "fp16", "zero3", "zero3-2gpu.yaml"),  # fp16 full fine-tuning: fp32 masters in DeepSpeed
])
def test_kaggle_platform_picks_data_parallel_for_lora_and_zero3_for_full(finetune, dtype, deepspeed, config_file):
    from nbhelpers.platform import accelerate_config_path, resolve_deepspeed

    cfg = load_config([resolve_parameter_file("kaggle-2xt4", "platforms")],
                      overrides={"finetune": finetune, "dtype": dtype})
    assert cfg.deepspeed == "auto" and cfg.num_processes == 2
    resolved, why = resolve_deepspeed(cfg.deepspeed, cfg.finetune)
    assert resolved == deepspeed and f"auto -> {deepspeed}" in why
    assert accelerate_config_path(cfg.num_processes, resolved).name == config_file
    assert resolve_deepspeed("zero3", "lora")[0] == "zero3" and resolve_deepspeed(None, "full")[0] == "none"
