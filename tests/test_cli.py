import json
import random
import subprocess
import sys

import pytest

COMMANDS = ["train", "sample", "passk", "plot", "monitor", "eval", "batch"]


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "nbhelpers", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_help_lists_every_command():
    out = cli("--help")
    assert out.returncode == 0
    for command in COMMANDS:
        assert command in out.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command):
    out = cli(command, "--help")
    assert out.returncode == 0, out.stderr
    assert "usage" in out.stdout


def test_train_help_keeps_the_seed_flag_names():
    out = cli("train", "--help").stdout
    for flag in ("--mode", "--vlm-name", "--dataset-name", "--seed", "--subset-size", "--num-epochs",
                 "--num-generations", "--batch-size", "--disable-gradient-checkpointing", "--lambda-psr",
                 "--reward-threshold", "--params", "--set"):
        assert flag in out, flag


def test_top_level_help_is_plain_text():
    out = cli("--help").stdout
    assert "``" not in out and ":func:" not in out and ":class:" not in out


@pytest.mark.parametrize("command", ["train", "sample", "eval", "batch"])
def test_help_lists_the_presets_platforms_and_names(command):
    from nbhelpers.config import MODES, parameter_names
    from nbhelpers.registry import DATASET_NAMES

    out = " ".join(cli(command, "--help").stdout.split())  # argparse wraps lines
    names = parameter_names("presets") + parameter_names("platforms")
    names += list(MODES) if command in ("train", "batch") else []
    names += list(DATASET_NAMES) if command != "batch" else []
    for name in names:
        assert name in out, name
    assert "--preset" in out and "--platform" in out


def test_flag_help_is_the_key_documentation():
    from nbhelpers.config import field_help

    out = " ".join(cli("train", "--help").stdout.split())
    assert " ".join(field_help("num_generations").split()) in out


@pytest.mark.parametrize("args,words", [
    (["--mode", "ppo"], ["'mode'", "command-line flag"]),
    (["--set", "learnin_rate=1"], ["unknown key 'learnin_rate'", "--set"]),
    (["--params", "smoke", "--batch-size", "3"], ["'batch_size'", "num_generations"]),
    (["--params", "no-such-preset"], ["no parameters file named 'no-such-preset'"]),
    (["--params", "smoke", "--set", "rollout_engine=vllm"], ["'rollout_engine'", "vllm package is not installed"]),
])
def test_bad_configuration_fails_fast_with_the_key(tmp_path, args, words):
    out = cli("train", *args, "--set", f"output_root={tmp_path}", timeout=60)
    assert out.returncode == 2
    for word in words:
        assert word in out.stderr, (word, out.stderr)
    assert not any(tmp_path.iterdir()), "a failed configuration must not create a run folder"


def write_samples(path, p_correct, problems=12, n=16, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for i in range(problems):
            correct = [rng.random() < p_correct * (i % 4 + 1) / 4 for _ in range(n)]
            fh.write(json.dumps({"id": str(i), "dataset": "synthetic", "question": "q", "answer": "1",
                                 "completions": ["x"] * n, "correct": correct, "meta": {}}) + "\n")


def test_samples_to_passk_to_plot_for_two_methods(tmp_path):
    write_samples(tmp_path / "nsr.jsonl", 0.3, seed=1)
    write_samples(tmp_path / "psr.jsonl", 0.6, seed=2)
    for method in ("nsr", "psr"):
        out = cli("passk", "--samples", str(tmp_path / f"{method}.jsonl"), "--out", str(tmp_path / f"{method}.json"),
                  "--method-name", method.upper(), "--bootstrap", "200")
        assert out.returncode == 0, out.stderr
        result = json.loads((tmp_path / f"{method}.json").read_text())
        assert result["method"] == method.upper() and result["n_problems"] == 12 and result["n_samples"] == 16
        assert list(result["pass_at_k"]) == ["1", "2", "4", "8", "16"]
        values = list(result["pass_at_k"].values())
        assert values == sorted(values) and all(0 <= v <= 1 for v in values)
        for k, (lo, hi) in result["ci95"].items():
            assert lo <= result["pass_at_k"][k] <= hi
    figure = tmp_path / "curves.png"
    out = cli("plot", "--results", str(tmp_path / "nsr.json"), str(tmp_path / "psr.json"), "--labels", "NSR", "PSR",
              "--out", str(figure))
    assert out.returncode == 0, out.stderr
    assert figure.stat().st_size > 1000 and figure.read_bytes()[:4] == b"\x89PNG"


def test_bad_samples_file_gives_a_clean_error_with_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "1", "dataset": "d", "question": "q", "answer": "a", "completions": ["x"], '
                    '"correct": [true], "meta": {}}\n{not json}\n')
    out = cli("passk", "--samples", str(path), "--out", str(tmp_path / "r.json"))
    assert out.returncode == 2
    assert "bad.jsonl" in out.stderr and "2" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "r.json").exists()
