from pathlib import Path

import pytest
import torch

from nbhelpers import models
from nbhelpers.platform import (GPUInfo, PlatformInfo, accelerate_config_path, detect_platform,
                                detect_platform_name, resolve_dtype)

A100 = GPUInfo("NVIDIA A100-SXM4-40GB", 39.4, (8, 0))
T4 = GPUInfo("Tesla T4", 14.7, (7, 5))

DETECT = [  # environment, colab importable, expected
    ({}, False, "local"),
    ({"COLAB_RELEASE_TAG": "release-colab"}, False, "colab"),
    ({}, True, "colab"),
    ({"KAGGLE_KERNEL_RUN_TYPE": "Interactive"}, False, "kaggle"),
]


@pytest.mark.parametrize("env,colab,expected", DETECT)
def test_platform_detection(env, colab, expected):
    assert detect_platform_name(env, colab) == expected


PLATFORMS = [  # name, gpus, dtype, store, recommended
    ("colab", [A100], "bf16", "/content/drive/MyDrive/chartrl", "colab-a100"),
    ("kaggle", [T4, T4], "fp16", "/kaggle/working/chartrl-runs", "kaggle-2xt4"),
    ("local", [], "fp32", None, "local-cpu"),
]


@pytest.mark.parametrize("name,gpus,dtype,store,recommended", PLATFORMS)
def test_platform_facts(name, gpus, dtype, store, recommended):
    info = PlatformInfo(name, gpus)
    assert (info.dtype, info.persistent_root, info.recommended_platform_file) == (dtype, store, recommended)
    assert name in info.report()


def test_kaggle_keeps_store_run_folders_and_code_clone_apart(monkeypatch):
    """On Kaggle the notebooks clone the code into /kaggle/working/<clone>; the store must be a folder of its
    own (not inside the clone, the clone not inside it) and the local run folders outside /kaggle/working,
    so no checkpoint lands in the repository tree or counts twice against the output quota."""
    import re

    import nbtools
    from nbhelpers.config import load_config, resolve_parameter_file
    from nbhelpers.platform import persistent_store

    get_code = next(c.source for c in nbtools.read_notebook("10_train").cells if "git clone" in c.source)
    clone = Path("/kaggle/working") / re.search(r"%cd (\S+)", get_code).group(1)
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    cfg = load_config([resolve_parameter_file(f) for f in ("nsr", "poc", "kaggle-2xt4")])
    store = persistent_store(cfg)
    working = Path("/kaggle/working")
    assert store.is_relative_to(working) and not store.is_relative_to(clone) and not clone.is_relative_to(store.parent)
    run_dir = clone / cfg.run_dir()  # relative run folders live in the working folder, the clone
    assert not run_dir.is_relative_to(working)


def test_detect_platform_with_faked_environment():
    info = detect_platform({"KAGGLE_KERNEL_RUN_TYPE": "Batch"}, gpus=[T4, T4], colab_importable=False)
    assert info.name == "kaggle" and info.dtype == "fp16" and len(info.gpus) == 2


def test_dtype_resolution():
    assert resolve_dtype("auto", PlatformInfo("kaggle", [T4])) == "fp16"
    with pytest.raises(ValueError, match="bf16 is not supported by Tesla T4"):
        resolve_dtype("bf16", PlatformInfo("kaggle", [T4]))
    assert resolve_dtype("fp32", PlatformInfo("local", [])) == "fp32"


def test_shipped_launch_configs():
    import yaml

    for procs in (1, 2):
        path = accelerate_config_path(procs, "zero3")
        cfg = yaml.safe_load(path.read_text())
        assert cfg["distributed_type"] == "DEEPSPEED" and cfg["num_processes"] == procs
        assert cfg["deepspeed_config"]["zero_stage"] == 3
    assert accelerate_config_path(1, None).is_file() and accelerate_config_path(2, None).is_file()
    import json

    from nbhelpers.platform import deepspeed_config_path

    assert json.loads(deepspeed_config_path().read_text())["zero_optimization"]["stage"] == 3


REGISTRY = [
    ("qwen2-5-3b", ("hub", "Qwen/Qwen2.5-VL-3B-Instruct")),
    ("qwen2-5-7b", ("hub", "Qwen/Qwen2.5-VL-7B-Instruct")),
    ("tiny-random", ("random", "tiny-random")),
    ("qwen2-5-3b-random", ("random", "qwen2-5-3b-random")),
]


@pytest.mark.parametrize("name,expected", REGISTRY)
def test_registry(name, expected):
    assert models.resolve_model(name) == expected


def test_registry_local_folder_and_errors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert models.resolve_model(str(tmp_path)) == ("local", str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="config.json"):
        models.resolve_model(str(empty))
    with pytest.raises(ValueError, match="neither a registered model"):
        models.resolve_model("./no-such-model")


def test_tiny_random_forward_and_generate_on_a_chart():
    from nbhelpers.data import build_messages, make_synthetic_examples, resize_to_pixel_budget

    model = models.build_random_model("tiny-random")
    summary = models.model_summary(model)
    assert summary["parameters"] < 1_000_000
    processor = models.build_offline_processor(56 * 56)
    tok = processor.tokenizer
    assert len(tok) <= models.TINY_VOCAB_SIZE == model.config.text_config.vocab_size
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.text_config.eos_token_id == tok.eos_token_id
    example = make_synthetic_examples(1, seed=0)[0]
    text = processor.apply_chat_template(build_messages(example["question"]), add_generation_prompt=True)
    inputs = processor(text=[text], images=[resize_to_pixel_budget(example["image"], 56 * 56)], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=8, do_sample=True)
    assert logits.shape == (1, inputs["input_ids"].shape[1], models.TINY_VOCAB_SIZE)
    completion = tok.decode(out[0, inputs["input_ids"].shape[1]:])
    assert isinstance(completion, str) and out.shape[1] > inputs["input_ids"].shape[1]
    # Same seed -> same weights in another build.
    again = models.build_random_model("tiny-random")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_qwen_3b_random_builds_offline_with_the_real_lora_count():
    from peft import get_peft_model

    model = models.build_random_model("qwen2-5-3b-random", device="meta")
    assert 3.7e9 < models.model_summary(model)["parameters"] < 3.8e9
    peft_model = get_peft_model(model, models.lora_config(r=8))
    assert models.count_trainable_parameters(peft_model) == 18_576_384
