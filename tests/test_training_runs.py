"""End-to-end training on the smoke preset with the tiny-random overlay (CPU, synthetic charts).

Slow checks that run once: every mode trains 2 steps and writes logs, checkpoints and its resolved
configuration; a training process SIGKILLed at random moments (also mid-save and mid-sync) and
restarted ends at the same step with the same adapter weights as an uninterrupted run.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from nbhelpers.config import MODES, load_config, resolve_parameter_file
from nbhelpers.monitor import read_run
from nbhelpers.sync import checkpoint_problem, find_resume_checkpoint, is_complete_checkpoint
from nbhelpers.training_run import train
from fast_presets import TINY

pytestmark = pytest.mark.slow


def smoke_config(mode, root, **overrides):
    files = [resolve_parameter_file(mode, "modes"), resolve_parameter_file("smoke", "presets"), TINY,
             resolve_parameter_file("local-cpu", "platforms")]
    return load_config(files, {"output_root": str(root), **overrides})


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {mode: train(smoke_config(mode, root)) for mode in MODES}


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_trains_and_writes_logs_and_checkpoints(trained_runs, mode):
    run = trained_runs[mode]
    assert run.name.startswith(f"{mode}_tiny-random_synthetic_n8_s42")
    assert load_config(overrides=__import__("yaml").safe_load((run / "config.yaml").read_text())["config"]).mode == mode
    state = json.loads((run / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    logged = [h for h in state["log_history"] if "loss" in h]
    assert len(logged) == 2
    for key in ("mode/kept_positive", "mode/kept_negative", "mode/empty_step", "mode/total_reward",
                "rewards/accuracy_reward/mean", "rewards/format_reward/mean"):
        assert key in logged[-1], key
    assert list((run / "logs").glob("events.out.tfevents.*")), "no TensorBoard events"
    newest = find_resume_checkpoint(run)
    assert newest is not None and newest.name == "checkpoint-2" and is_complete_checkpoint(newest, True)
    assert (newest / "adapter_model.safetensors").is_file()
    assert (run / "final" / "adapter_model.safetensors").is_file()
    summary = (run / "summary.txt").read_text()
    assert run.name in summary and "steps" in summary.lower()
    for card in (run / "README.md", run / "final" / "README.md"):  # ours, not TRL's "trained with GRPO"
        text = card.read_text()
        assert f"**{mode}** objective" in text and "huggingface.co" not in text, card


def test_psr_with_no_correct_sample_is_a_logged_no_op(trained_runs):
    # tiny-random never answers correctly, so every PSR step keeps nothing.
    state = json.loads((trained_runs["psr"] / "trainer_state.json").read_text())
    logged = [h for h in state["log_history"] if "loss" in h]
    assert [h["mode/kept_positive"] for h in logged] == [0.0, 0.0]
    assert [h["mode/empty_step"] for h in logged] == [1.0, 1.0]
    assert read_run(trained_runs["psr"])["mode/empty_steps"].tolist() == [1.0, 2.0]
    first = load_file(trained_runs["psr"] / "checkpoint-1" / "adapter_model.safetensors") \
        if (trained_runs["psr"] / "checkpoint-1").exists() else None
    final = load_file(trained_runs["psr"] / "final" / "adapter_model.safetensors")
    nsr = load_file(trained_runs["nsr"] / "final" / "adapter_model.safetensors")
    # NSR (all samples negative) moved the same initial adapter; PSR did not.
    assert any((final[k] != nsr[k]).any() for k in final)
    if first is not None:
        assert all((first[k] == final[k]).all() for k in final)


def test_full_fine_tuning_saves_the_whole_model(tmp_path):
    run = train(smoke_config("nsr", tmp_path, finetune="full", max_steps=1, learning_rate=1e-4))
    final = run / "final"
    assert (final / "model.safetensors").is_file() and not (final / "adapter_config.json").exists()
    from nbhelpers import models

    reloaded = models.load_model(str(final))  # a folder trained from tiny-random reloads offline
    base = models.build_random_model("tiny-random")
    moved = [n for n, p in reloaded.state_dict().items() if not __import__("torch").equal(p, base.state_dict()[n])]
    assert moved, "full fine-tuning changed no weight"
    assert models.load_processor(str(final), 3136).tokenizer.eos_token == "<|im_end|>"


def test_rerun_after_a_kill_between_last_checkpoint_and_final_save(trained_runs, tmp_path):
    """HF would train one step past max_steps when resuming from the last checkpoint; we finalize from it."""
    import shutil

    run = tmp_path / trained_runs["nsr"].name
    shutil.copytree(trained_runs["nsr"], run)
    expected = load_file(run / "final" / "adapter_model.safetensors")
    shutil.rmtree(run / "final")
    (run / "trainer_state.json").unlink()
    assert train(smoke_config("nsr", tmp_path)) == run
    assert json.loads((run / "trainer_state.json").read_text())["global_step"] == 2
    again = load_file(run / "final" / "adapter_model.safetensors")
    assert all((expected[k] == again[k]).all() for k in expected)
    assert not (run / "final" / "optimizer.pt").exists()


# ------------------------------------------------------------------------------------------ kill and resume
def train_command(root, store, steps):
    return [sys.executable, "-m", "nbhelpers", "train", "--params", "smoke", "--params", str(TINY), "--params", "nsr",
            "--set", f"output_root={root}", "--set", f"persistent_root={store}", "--set", f"max_steps={steps}",
            "--set", "save_total_limit=2"]


def run_to_completion(cmd, cwd):
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


def kill_when(cmd, cwd, condition, timeout=120.0):
    """Start ``cmd``, SIGKILL it as soon as ``condition()`` holds (or after ``timeout``); True if it was killed."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if condition():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.01)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    return proc.returncode == -signal.SIGKILL


def test_sigkill_at_random_moments_then_resume_matches_uninterrupted(tmp_path):
    steps = 4
    reference = run_to_completion(train_command(tmp_path / "ref", "none", steps), tmp_path)
    assert reference.returncode == 0, reference.stderr[-2000:]
    ref_run = next((tmp_path / "ref").iterdir())

    root, store = tmp_path / "runs", tmp_path / "store"
    cmd = train_command(root, store, steps)
    run_dir = lambda: next(root.iterdir(), None) if root.exists() else None  # noqa: E731

    def saving_checkpoint():  # a checkpoint folder exists whose manifest is not written yet
        run = run_dir()
        return run is not None and any(not (c / "chartrl-manifest.json").exists() for c in run.glob("checkpoint-*"))

    def syncing():  # a copy into the persistent store is under way
        return store.exists() and any(store.glob("*/.partial-*"))

    killed = [kill_when(cmd, tmp_path, saving_checkpoint), kill_when(cmd, tmp_path, syncing)]
    rng = random.Random(os.getpid())
    for _ in range(2):  # and at random moments
        start = time.monotonic()
        delay = rng.uniform(2.0, 9.0)
        killed.append(kill_when(cmd, tmp_path, lambda: time.monotonic() - start > delay))
    assert any(killed), "no attempt was interrupted: the test proved nothing"
    final = run_to_completion(cmd, tmp_path)
    assert final.returncode == 0, final.stderr[-2000:]

    run = run_dir()
    state = json.loads((run / "trainer_state.json").read_text())
    assert state["global_step"] == steps
    # the logs of the sessions before the kills carry over, so per-step metrics (and their sums) span the run
    assert [h["step"] for h in state["log_history"] if "mode/empty_step" in h] == list(range(1, steps + 1))
    a = load_file(ref_run / "final" / "adapter_model.safetensors")
    b = load_file(run / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a), "resumed weights differ from the uninterrupted run"
    stored = sorted(p.name for p in (store / run.name).glob("checkpoint-*"))
    assert stored and all(is_complete_checkpoint(store / run.name / s, True) for s in stored)
    assert f"checkpoint-{steps}" in stored


# ------------------------------------------------------------------------------------------ the store completes
_SLOW_STORE_TRAIN = """
import sys, time
import nbhelpers.sync as s
original = s._copy_file
def slow_copy(source, destination):  # store copies take long enough to be killed in the middle
    result = original(source, destination)
    time.sleep(0.4)
    return result
s._copy_file = slow_copy
from nbhelpers import cli
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("killed_copy", ["checkpoint-1", "checkpoint-2"])
def test_store_ends_complete_after_a_kill_during_a_store_copy(tmp_path, killed_copy):
    """SIGKILL while a checkpoint is copied into the store (the first one: the restart trains on; the last
    one: the restart only writes final/), then the same command again: the store holds every checkpoint the
    run folder holds, and final/, all complete, and no partial folder."""
    root, store = tmp_path / "runs", tmp_path / "store"
    args = train_command(root, store, 2)[3:]  # the arguments after `python -m nbhelpers`
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path.cwd()), os.environ.get("PYTHONPATH")]))}

    def copying():
        return any(p.name.startswith(f".partial-{killed_copy}-") for p in store.glob("*/.partial-*"))

    proc = subprocess.Popen([sys.executable, "-c", _SLOW_STORE_TRAIN, *args], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while proc.poll() is None and not copying() and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training ended before the copy could be killed"
    (stored,) = store.iterdir()
    assert list(stored.glob(".partial-*")) and not is_complete_checkpoint(stored / killed_copy)

    again = run_to_completion([sys.executable, "-m", "nbhelpers", *args], tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    (run,) = root.iterdir()
    local = sorted(p.name for p in run.glob("checkpoint-*")) + ["final"]
    assert sorted(p.name for p in stored.iterdir() if p.is_dir()) == local
    for name in local:
        assert checkpoint_problem(stored / name, verify_checksums=True) is None, name
    assert not list(stored.glob(".partial-*")) and (stored / "config.yaml").is_file()
    a, b = (load_file(folder / "final" / "adapter_model.safetensors") for folder in (run, stored))
    assert all((a[k] == b[k]).all() for k in a)


def test_resume_changed_config_continues_a_run_to_a_larger_max_steps(tmp_path):
    """The opt-in: the same run_name with max_steps 2 -> 3 trains one more step from the old checkpoint; without
    the opt-in the same request is refused."""
    from nbhelpers.provenance import ProvenanceError

    first = train(smoke_config("nsr", tmp_path, run_name="grow"))
    with pytest.raises(ProvenanceError, match="max_steps 2 -> 3"):
        train(smoke_config("nsr", tmp_path, run_name="grow", max_steps=3))
    grown = train(smoke_config("nsr", tmp_path, run_name="grow", max_steps=3, resume_changed_config=True))
    assert grown == first
    state = json.loads((grown / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3]
    assert load_config(overrides=__import__("yaml").safe_load((grown / "config.yaml").read_text())["config"]
                       ).max_steps == 3
