"""The objectives study (benchmarks/sandbox): settings, the resumable runner, the report and the pattern rules.

Everything runs without a model (fake train / sample stages, samples files written here) except the one
end-to-end check marked slow, which runs study.py and report.py on tiny-random with tiny settings.
"""

from __future__ import annotations

import json
import lzma
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

SANDBOX = Path(__file__).resolve().parents[1] / "benchmarks" / "sandbox"
sys.path.insert(0, str(SANDBOX))

import compact_samples  # noqa: E402
import report  # noqa: E402
import study  # noqa: E402
import study_pattern  # noqa: E402
import study_settings  # noqa: E402
from nbhelpers import passk  # noqa: E402

MODES = ["grpo", "psr", "nsr", "w-reinforce"]


def tiny_settings(modes=("grpo", "psr"), seeds=(0,), **changes) -> dict:
    settings = {
        "model": "tiny-random", "modes": list(modes), "seeds": list(seeds), "eval_seed": 7001,
        "common": {"dataset_name": "synthetic", "dtype": "fp32", "max_pixels": 3136, "eval_max_pixels": 3136},
        "train": {"subset_size": 8, "max_steps": 2, "num_generations": 4, "batch_size": 8,
                  "gradient_accumulation_steps": 1, "gradient_checkpointing": False, "learning_rate": 0.001,
                  "max_completion_length": 24, "logging_steps": 1, "save_steps": 1, "report_to": ["none"]},
        "sample": {"eval_dataset": "synthetic", "eval_split": "test", "max_problems": 3, "n_samples": 4,
                   "sample_max_new_tokens": 24, "sample_chunk_size": 4},
        "report": {"bootstrap": 50},
    }
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            settings[section][name] = value
        else:
            settings[section] = value
    return settings


def write_settings(folder: Path, data: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def fake_train(cfg) -> Path:
    """Stands in for nbhelpers.training_run.train: a final/ folder and a trainer_state.json with a log history."""
    run_dir = cfg.run_dir()
    (run_dir / "final").mkdir(parents=True, exist_ok=True)
    history = [{"step": s, "loss": 0.1 / s, "reward": 1.0 + s, "mode/accuracy": 0.1 * s, "mode/kept_positive": 2,
                "mode/kept_negative": 6, "entropy": 1.0 - 0.1 * s} for s in range(1, cfg.max_steps + 1)]
    (run_dir / "trainer_state.json").write_text(json.dumps({"global_step": cfg.max_steps, "log_history": history}))
    (run_dir / "config.yaml").write_text("config: {}\n")
    return run_dir


def fake_sample(cfg, out, checkpoint, method, problems=None) -> Path:
    """Stands in for nbhelpers.sampling.sample_to_file: cfg.max_problems records of cfg.n_samples samples,
    resuming a file that already holds some (as the real one does)."""
    done = len(Path(out).read_text().splitlines()) if Path(out).exists() else 0
    with open(out, "a", encoding="utf-8") as handle:
        for i in range(done, cfg.max_problems if problems is None else problems):
            correct = [j < i for j in range(cfg.n_samples)]
            handle.write(json.dumps({"id": f"p{i}", "dataset": "synthetic", "question": "q", "answer": "1",
                                     "completions": ["<answer>1</answer>"] * cfg.n_samples, "correct": correct,
                                     "meta": {"checkpoint": checkpoint}}) + "\n")
    return Path(out)


# ------------------------------------------------------------------------------------------ settings
def test_committed_study_settings_are_valid_and_give_every_mode_the_same_budget():
    settings = study_settings.load_settings()
    assert set(settings.modes) == set(MODES) and len(settings.seeds) == 3
    sample = settings.sample_config(settings.parts()[0])
    assert sample.max_problems >= 300 and sample.n_samples == 256 and sample.eval_split == "test"
    trains = [settings.train_config(p).to_dict() for p in settings.parts() if p.trains]
    differing = {k for t in trains for k in t if t[k] != trains[0][k]}
    assert differing == {"mode", "seed", "run_name", "output_root"}
    assert trains[0]["finetune"] == "lora" and trains[0]["lambda_psr"] == 0.1


@pytest.mark.parametrize("changes, message", [
    ({"color": "red"}, "key 'color' is unknown"),
    ({"eval_seed": 0}, "key 'eval_seed' = 0 is also a training seed"),
    ({"modes": ["grpo", "ppo"]}, "key 'modes' must be a non-empty list"),
    ({"seeds": [1, 1]}, "key 'seeds' must be a non-empty list of distinct integers"),
    ({"train__seed": 3}, "key 'train.seed' is set by the runner"),
    ({"train__learning_rat": 1e-4}, "key 'train.learning_rat' is not a RunConfig key"),
    ({"train__learning_rate": "fast"}, "key 'learning_rate' expects float"),
    ({"train__subset_size": None}, "key 'train.subset_size' must be set"),
    ({"sample__eval_split": "train"}, "key 'sample.eval_split' must be test"),
    ({"report": {"near": 2}}, "key 'report' may hold only"),
])
def test_bad_settings_name_file_and_key(tmp_path, changes, message):
    path = write_settings(tmp_path, tiny_settings(**changes))
    with pytest.raises(study_settings.SettingsError, match=message) as error:
        study_settings.load_settings(path)
    assert str(path) in str(error.value)


def test_bad_settings_on_the_command_line_exit_2_with_one_line_and_write_nothing(tmp_path, capsys):
    path = write_settings(tmp_path, tiny_settings(train__seed=3))
    assert study.main(["--settings", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "train.seed" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]


def test_select_parts_by_name_mode_and_seed(tmp_path):
    settings = study_settings.load_settings(write_settings(tmp_path, tiny_settings(modes=MODES, seeds=[0, 1])))
    names = lambda parts: [p.name for p in parts]  # noqa: E731
    assert names(settings.parts())[:3] == ["base", "grpo-s0", "psr-s0"]
    assert names(study.select_parts(settings, modes=["nsr"], seeds=[1])) == ["base", "nsr-s1"]
    assert names(study.select_parts(settings, names=["psr-s1", "grpo-s0"])) == ["grpo-s0", "psr-s1"]
    with pytest.raises(study_settings.SettingsError, match="unknown part"):
        study.select_parts(settings, names=["ppo-s0"])
    with pytest.raises(study_settings.SettingsError, match="--seeds"):
        study.select_parts(settings, seeds=[5])


# ------------------------------------------------------------------------------------------ one part
@pytest.fixture
def small_study(tmp_path):
    return study_settings.load_settings(write_settings(tmp_path, tiny_settings()))


def test_run_part_publishes_samples_logs_and_marker(small_study):
    part = small_study.part("psr-s0")
    marker = study.run_part(small_study, part, train=fake_train, sample=fake_sample)
    assert study_settings.part_status(small_study, part) == "done"
    assert small_study.samples_path(part).name == "psr-s0.compact.jsonl.xz"
    with lzma.open(small_study.samples_path(part), "rt") as handle:
        records = [json.loads(line) for line in handle]
    assert [r["id"] for r in records] == ["p0", "p1", "p2"]
    assert records[0]["meta"]["checkpoint"].endswith("psr-s0/final")
    assert all(r["answers"] == ["1"] * 4 and r["meta"]["completions_kept"] for r in records)  # 3 <= 8 kept
    run = small_study.run_path(part)
    assert sorted(p.name for p in run.iterdir()) == ["part.json", "train-config.yaml", "trainer_state.json"]
    assert marker["train_steps"] == 2 and marker["sample_problems"] == 3 and marker["n_samples"] == 4
    assert marker["sample_tokens"] > 0 and marker["fingerprint"] == small_study.fingerprint(part)
    assert set(marker["versions"]) >= {"python", "torch", "transformers", "trl", "peft"}


def test_export_writes_one_tar_per_part_relative_to_the_study_folder(small_study, tmp_path):
    import tarfile

    study.run_part(small_study, small_study.part("grpo-s0"), train=fake_train, sample=fake_sample)
    [path] = study.export_parts(small_study, ["grpo-s0"], tmp_path / "export")
    with tarfile.open(path) as tar:
        names = sorted(tar.getnames())
    assert names == ["runs/grpo-s0", "runs/grpo-s0/part.json", "runs/grpo-s0/train-config.yaml",
                     "runs/grpo-s0/trainer_state.json", "samples/grpo-s0.compact.jsonl.xz"]


def test_published_samples_are_compact_reproducible_and_read_by_passk(small_study, monkeypatch):
    monkeypatch.setattr(study, "COMPLETIONS_KEPT", 2)
    part = small_study.part("base")
    study.run_part(small_study, part, sample=fake_sample)
    packed, plain = small_study.samples_path(part), small_study.work_path(part) / "samples.jsonl"
    first = packed.read_bytes()
    study.publish(small_study, part, plain, None, study_settings.read_marker(small_study, part))
    assert packed.read_bytes() == first and first[:6] == b"\xfd7zXZ\x00"  # xz: same samples, same bytes
    with lzma.open(packed, "rt") as handle:
        records = [json.loads(line) for line in handle]
    assert [("completions" in r, r["meta"]["completions_kept"]) for r in records] == [(True, True), (False, False),
                                                                                      (True, True)]
    from_xz = passk.read_samples(packed)
    from_plain = passk.read_samples(plain)
    assert [(p.id, p.n, p.c, p.answers) for p in from_xz] == [(p.id, p.n, p.c, p.answers) for p in from_plain]
    assert [(p.id, p.n, p.c) for p in from_xz] == [("p0", 4, 0), ("p1", 4, 1), ("p2", 4, 2)]


@pytest.mark.parametrize("damage", ["no marker", "no samples", "unreadable marker"])
def test_a_half_written_part_is_todo_and_redone(small_study, damage):
    part = small_study.part("grpo-s0")
    study.run_part(small_study, part, train=fake_train, sample=fake_sample)
    marker_path = small_study.run_path(part) / study_settings.MARKER
    if damage == "no marker":
        marker_path.unlink()
    elif damage == "no samples":
        small_study.samples_path(part).unlink()
    else:
        marker_path.write_text('{"part": "grpo-s0", "finger')
    assert study_settings.part_status(small_study, part) == "todo"
    study.run_part(small_study, part, train=fake_train, sample=fake_sample)
    assert study_settings.part_status(small_study, part) == "done"


def test_a_done_part_stays_done_when_chartrl_adds_a_config_key_at_its_default(small_study):
    """A marker written before a RunConfig key existed (here passk_k) lacks it; at its default nothing changed."""
    part = small_study.part("grpo-s0")
    study.run_part(small_study, part, train=fake_train, sample=fake_sample)
    marker_path = small_study.run_path(part) / study_settings.MARKER
    marker = json.loads(marker_path.read_text())
    for section in ("train", "sample"):
        del marker["settings"][section]["passk_k"]
    marker["fingerprint"] = "made before passk_k existed"
    marker_path.write_text(json.dumps(marker))
    assert study_settings.part_status(small_study, part) == "done"
    marker["settings"]["train"]["passk_k"] = 2
    marker_path.write_text(json.dumps(marker))
    assert study_settings.part_status(small_study, part) == "changed"
    assert study_settings.changed_keys(small_study, part) == ["train.passk_k: 2 -> 4"]


def test_passk_is_a_study_mode_whose_k_is_checked(tmp_path):
    settings = study_settings.load_settings(write_settings(tmp_path, tiny_settings(modes=["grpo", "passk"],
                                                                                   train__passk_k=2)))
    cfg = settings.train_config(settings.part("passk-s0"))
    assert (cfg.mode, cfg.passk_k, cfg.num_generations) == ("passk", 2, 4)
    with pytest.raises(study_settings.SettingsError, match="key 'passk_k' must be below num_generations = 4"):
        study_settings.load_settings(write_settings(tmp_path / "k4", tiny_settings(modes=["grpo", "passk"])))


def test_a_short_samples_file_publishes_nothing(small_study):
    part = small_study.part("base")
    short = lambda cfg, out, checkpoint, method: fake_sample(cfg, out, checkpoint, method, problems=2)  # noqa: E731
    with pytest.raises(RuntimeError, match="2 problems sampled, study.yaml asks for 3"):
        study.run_part(small_study, part, sample=short)
    assert not small_study.samples_path(part).exists() and not small_study.run_path(part).exists()


def test_unfinished_work_is_kept_for_the_same_settings_and_cleared_for_others(tmp_path):
    path = write_settings(tmp_path, tiny_settings())
    settings = study_settings.load_settings(path)
    part = settings.part("grpo-s0")
    work = study.prepare_work(settings, part)
    (work / "run").mkdir()
    (work / "run" / "checkpoint-1").mkdir()
    study.prepare_work(settings, part)
    assert (work / "run" / "checkpoint-1").is_dir()  # a killed part resumes from its checkpoint
    changed = study_settings.load_settings(write_settings(tmp_path, tiny_settings(train__learning_rate=0.01)))
    study.prepare_work(changed, part)
    assert not (work / "run").exists() and (work / study.FINGERPRINT_FILE).is_file()


def test_rerun_skips_done_parts_and_refuses_changed_ones(tmp_path, monkeypatch, capsys):
    path = write_settings(tmp_path, tiny_settings())
    settings = study_settings.load_settings(path)
    for part in settings.parts():
        study.run_part(settings, part, train=fake_train, sample=fake_sample)

    def no_processes(*args, **kwargs):
        raise AssertionError("a done part was started again")

    monkeypatch.setattr(study, "run_processes", no_processes)
    assert study.main(["--settings", str(path), "--jobs", "2"]) == 0
    assert "3 of 3 selected parts done" in capsys.readouterr().out
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and "work" not in p.parts}
    write_settings(tmp_path, tiny_settings(sample__n_samples=8, sample__sample_chunk_size=8))
    assert study.main(["--settings", str(path)]) == 2
    err = capsys.readouterr().err
    assert "done part(s) were made with other settings" in err and "sample.n_samples: 4 -> 8" in err
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and "work" not in p.parts}
    assert {p: t for p, t in after.items() if p.name != "study.yaml"} == \
        {p: t for p, t in before.items() if p.name != "study.yaml"}


def test_dry_run_lists_progress_and_estimates_from_recorded_rates(tmp_path, capsys):
    path = write_settings(tmp_path, tiny_settings())
    settings = study_settings.load_settings(path)
    study.run_part(settings, settings.part("grpo-s0"), train=fake_train, sample=fake_sample)
    marker_path = settings.run_path(settings.part("grpo-s0")) / "part.json"
    marker = json.loads(marker_path.read_text())
    marker.update(train_s=10.0, sample_s=2.0, sample_tokens=1000)
    marker_path.write_text(json.dumps(marker))
    psr = settings.part("psr-s0")
    work = study.prepare_work(settings, psr)
    (work / "run" / "psr-s0" / "checkpoint-1").mkdir(parents=True)
    assert study.main(["--settings", str(path), "--dry-run", "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    assert "grpo-s0            done" in out and "checkpoint 1/2 steps" in out
    # psr-s0: 2 steps x 5 s; base + psr-s0: 2 x 3 x 4 samples x (1000 / 12) tokens x 2 ms
    assert "5.00 s per training step, 2.000 ms per sampled token, 83 tokens per sample" in out
    assert "2 x 5.00 s + 24 x 83 x 2.000 ms" in out
    assert not settings.samples_path(psr).exists()


# ------------------------------------------------------------------------------------------ processes
def test_run_processes_runs_in_parallel_reports_failures_and_logs(tmp_path):
    flag = tmp_path / "a-started"
    # b waits until a has started: with jobs=2 both run at once; with jobs=1 this would never finish
    commands = {
        "a": ([sys.executable, "-c", f"import pathlib, time; pathlib.Path({str(flag)!r}).touch(); time.sleep(1); "
                                     "print('a says hi')"], tmp_path / "a.log"),
        "b": ([sys.executable, "-c", f"import pathlib, time, sys\nwhile not pathlib.Path({str(flag)!r}).exists(): "
                                     "time.sleep(0.05)\nsys.exit(3)"], tmp_path / "b.log"),
    }
    lines = []
    outcomes = study.run_processes(commands, jobs=2, time_budget_s=120, say=lines.append, poll_s=0.05)
    states = {o.part: (o.state, o.returncode) for o in outcomes}
    assert states == {"a": ("done", 0), "b": ("failed", 3)}
    assert "a says hi" in (tmp_path / "a.log").read_text()
    assert any("failed b (exit 3)" in line for line in lines)


def test_run_processes_stops_running_parts_at_the_time_budget(tmp_path):
    pid_file = tmp_path / "pid"
    commands = {
        "sleeper": ([sys.executable, "-c", f"import os, pathlib, time; pathlib.Path({str(pid_file)!r})"
                                           ".write_text(str(os.getpid())); time.sleep(600)"], tmp_path / "s.log"),
        "never": ([sys.executable, "-c", "print('started')"], tmp_path / "n.log"),
    }
    lines = []
    outcomes = study.run_processes(commands, jobs=1, time_budget_s=0.5, say=lines.append, poll_s=0.05)
    assert [(o.part, o.state, o.returncode) for o in outcomes] == [("sleeper", "stopped", -signal.SIGTERM)]
    assert not (tmp_path / "n.log").exists()
    assert any("time budget" in line for line in lines)
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def test_last_progress_line_reads_progress_bars(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("start\nsampling:  10%|#  | 1/10\rsampling:  20%|## | 2/10\r")
    assert study.last_progress_line(log) == "sampling:  20%|## | 2/10"
    assert study.last_progress_line(tmp_path / "missing.txt") == ""


# ------------------------------------------------------------------------------------------ pattern rules
PAPER = {  # Zhu et al. 2025, Table (MATH), Pass@k at k = 1 and 256, as fractions
    "grpo": {1: 0.763, 256: 0.955}, "psr": {1: 0.741, 256: 0.912},
    "nsr": {1: 0.757, 256: 0.969}, "w-reinforce": {1: 0.766, 256: 0.967}}


def pairs_from(estimates, half_width):
    """Paired intervals: the difference of the estimates, +- half_width."""
    modes = list(estimates)
    return {(a, b): {k: (estimates[a][k] - estimates[b][k], estimates[a][k] - estimates[b][k] - half_width,
                         estimates[a][k] - estimates[b][k] + half_width) for k in estimates[a]}
            for i, a in enumerate(modes) for b in modes[i + 1:]}


PATTERN_HOLDS = {m: dict(v) for m, v in PAPER.items()}
PATTERN_HOLDS["psr"][1] = 0.762  # within 1 pp of the best at k = 1 (the paper's PSR is 2.5 pp below it)


def with_value(mode, k, value, table=PATTERN_HOLDS):
    return {m: {kk: (value if (m, kk) == (mode, k) else v) for kk, v in ks.items()} for m, ks in table.items()}


@pytest.mark.parametrize("estimates, half_width, near_pp, expected", [
    (PATTERN_HOLDS, 0.01, 1.0, [True, True, True, True, True]),
    (PAPER, 0.01, 1.0, [False, True, True, True, True]),  # the paper's MATH numbers: PSR 2.5 pp below W-R at k=1
    (PAPER, 0.03, 1.0, [True, True, True, True, True]),  # wide intervals contain 0: near
    (PATTERN_HOLDS, 0.002, 0.5, [True, True, False, True, True]),  # NSR 0.6 pp below GRPO, interval excludes 0
    (with_value("psr", 256, 0.950), 0.002, 1.0, [True, False, True, True, True]),  # PSR lowest but near GRPO
    (with_value("psr", 256, 0.990), 0.01, 1.0, [True, False, True, False, False]),  # PSR best at large k
    (with_value("nsr", 1, 0.700), 0.01, 1.0, [True, True, False, True, True]),  # NSR far below GRPO at k=1
    (with_value("w-reinforce", 1, 0.700), 0.01, 1.0, [True, True, True, True, False]),  # W-R far from best at k=1
    ({m: {1: 0.0, 256: 0.0} for m in MODES}, 0.0, 1.0, [True, False, True, True, True]),  # all tied: none worst
])
def test_pattern_claims_follow_the_written_rules(estimates, half_width, near_pp, expected):
    claims = study_pattern.pattern_claims(estimates, pairs_from(estimates, half_width), [1, 256], near_pp)
    assert [c.holds for c in claims] == expected
    verdict = study_pattern.pattern_verdict(claims)
    assert verdict.startswith("The paper's pattern holds") == all(expected)
    for claim in claims:
        if not claim.holds:
            assert claim.statement in verdict


def test_pattern_reads_pairs_in_either_order_and_waits_for_missing_modes():
    forward = {("a", "b"): {1: (0.1, 0.05, 0.2)}}
    assert study_pattern.paired(forward, "b", "a", 1) == (-0.1, -0.2, -0.05)
    partial = {m: v for m, v in PAPER.items() if m != "nsr"}
    claims = study_pattern.pattern_claims(partial, pairs_from(partial, 0.01), [1, 256], 1.0)
    assert all(c.holds is None for c in claims)
    assert "cannot be judged yet: no results for nsr" in study_pattern.pattern_verdict(claims)


# ------------------------------------------------------------------------------------------ the report
def write_part(settings, name: str, counts: list[int], n: int = 16) -> None:
    """A done part made by hand: samples with the given correct counts per problem, a marker, a log history."""
    part = settings.part(name)
    work = study.prepare_work(settings, part)
    samples = work / "samples.jsonl"
    with open(samples, "w") as handle:
        for i, c in enumerate(counts):
            handle.write(json.dumps({"id": str(i), "dataset": "synthetic", "question": "q", "answer": "a",
                                     "completions": [f"<answer>{'a' if j < c else 'b'}</answer>" for j in range(n)],
                                     "correct": [j < c for j in range(n)]}) + "\n")
    run_dir = fake_train(settings.train_config(part)) if part.trains else None
    marker = {"part": name, "fingerprint": settings.fingerprint(part), "settings": settings.part_settings(part),
              "train_s": 30.0 if part.trains else None, "train_steps": 2 if part.trains else None, "sample_s": 5.0,
              "sample_tokens": 1000, "sample_problems": len(counts), "n_samples": n, "jobs": 4, "gpu": "Test GPU",
              "versions": {"torch": "x"}, "finished": "2026-12-02T00:00:00+00:00"}
    study.publish(settings, part, samples, run_dir, marker)


PATTERN_COUNTS = {  # 40 problems, n = 16; PSR sharpens (higher Pass@1, lower Pass@16), NSR and W-R keep k = 16
    "base": [4] * 40, "grpo": [8] * 40, "psr": [16] * 24 + [0] * 16, "nsr": [8] * 40, "w-reinforce": [9] * 40}


def pattern_study(tmp_path, seeds=(0, 1), skip=()):
    settings = study_settings.load_settings(write_settings(tmp_path, tiny_settings(
        modes=MODES, seeds=list(seeds), sample__max_problems=40, sample__n_samples=16, report={"bootstrap": 200})))
    for part in settings.parts():
        if part.name not in skip:
            write_part(settings, part.name, PATTERN_COUNTS[part.mode or "base"])
    return settings


def test_report_computes_pooled_passk_comparisons_verdict_and_readme(tmp_path, capsys):
    settings = pattern_study(tmp_path)
    (tmp_path / "README.md").write_text(f"# Study\n\nhand-written\n\n{report.BEGIN}\nold\n{report.END}\n\ntail\n")
    assert report.main(["--settings", str(settings.path)]) == 0
    assert "The paper's pattern holds here" in capsys.readouterr().out
    pooled = passk.load_results(tmp_path / "results" / "pooled-psr.json")
    assert pooled["pass_at_k"]["1"] == pytest.approx(0.6) and pooled["pass_at_k"]["16"] == pytest.approx(0.6)
    assert passk.load_results(tmp_path / "results" / "pooled-nsr.json")["pass_at_k"]["16"] == 1.0
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert summary["versus"]["base"]["grpo"]["difference"]["1"] == pytest.approx(0.25)
    assert summary["versus"]["grpo"]["psr"]["difference"]["16"] == pytest.approx(-0.4)
    assert set(summary["per_seed_vs_grpo"]) == {"psr-s0", "nsr-s0", "w-reinforce-s0", "psr-s1", "nsr-s1",
                                                "w-reinforce-s1"}
    assert summary["missing_parts"] == [] and all(c["holds"] for c in summary["claims"])
    readme = (tmp_path / "README.md").read_text()
    assert readme.startswith("# Study\n\nhand-written") and readme.rstrip().endswith("tail") and "\nold\n" not in readme
    assert "| psr (seeds 0, 1) | 60.0 [" in readme and "| psr - grpo |" in readme and "Test GPU" in readme
    # every gold answer is "a": a psr problem draws the 23 (or 24) other all-"a" problems of 39, so p = 0.6
    assert pooled["chance_floor"]["1"] == pytest.approx(0.6) and "| *psr chance floor* | 60.0 [" in readme
    assert "| *psr-s0 chance floor* | 60.0 [" in readme
    assert "identical apart from `mode` and `seed`" in readme
    for figure in ("passk_curves", "improvement_over_base", "improvement_over_grpo", "training_curves",
                   "training_psr"):
        assert (tmp_path / "figures" / f"{figure}.png").stat().st_size > 0
        assert f"(figures/{figure}.png)" in readme
    results_bytes = {p.name: p.read_bytes() for p in (tmp_path / "results").iterdir()}
    report.write_results(report.collect(settings))
    assert {p.name: p.read_bytes() for p in (tmp_path / "results").iterdir()} == results_bytes  # identical again


def test_training_rows_count_the_steps_skipped_for_nonfinite_gradients():
    logged = pd.DataFrame({"step": [5, 10, 15], "reward": [1.0, 2.0, 3.0],
                           "optimizer/nonfinite_steps": [float("nan"), 1.0, 2.0]})  # logged from the first skip on
    rows = report.training_rows({"training": {"psr-s0": logged, "grpo-s0": logged.drop(columns="optimizer/"
                                                                                              "nonfinite_steps")}})
    assert [row[0] for row in rows] == ["psr-s0", "grpo-s0"] and [row[-1] for row in rows] == ["2", "0"]
    assert rows[0][2] == "1 -> 3"


def test_report_with_missing_parts_names_them_and_still_writes(tmp_path, capsys):
    settings = pattern_study(tmp_path, seeds=(0,), skip=("nsr-s0", "base"))
    assert report.main(["--settings", str(settings.path)]) == 0
    out = capsys.readouterr().out
    assert "missing: base, nsr-s0" in out and "cannot be judged yet: no results for nsr" in out
    readme = (tmp_path / "README.md").read_text()
    assert "**Missing: base, nsr-s0**" in readme and "against base" not in readme
    assert not (tmp_path / "figures" / "improvement_over_base.png").exists()


def test_report_with_nothing_done_says_so(tmp_path, capsys):
    path = write_settings(tmp_path, tiny_settings())
    assert report.main(["--settings", str(path)]) == 0
    assert "0 of 3 parts done; missing: base, grpo-s0, psr-s0" in capsys.readouterr().out


def test_pooled_comparison_of_one_seed_each_equals_passk_compare_methods(tmp_path):
    settings = pattern_study(tmp_path, seeds=(0,))
    a = passk.read_samples(settings.samples_path(settings.part("w-reinforce-s0")))
    b = passk.read_samples(settings.samples_path(settings.part("psr-s0")))
    ours = report.pooled_comparison([a], [b], "w", "p", bootstrap=300, seed=4)
    theirs = passk.compare_methods(a, b, method_a="w", method_b="p", bootstrap=300, seed=4)
    assert ours["difference"] == pytest.approx(theirs["difference"]) and ours["ci95"] == theirs["ci95"]
    pooled = report.pooled_results([a], "w", bootstrap=300, seed=4, seeds=[0])
    single = passk.passk_results(a, "w", bootstrap=300, seed=4)
    assert pooled["pass_at_k"] == pytest.approx(single["pass_at_k"]) and pooled["ci95"] == single["ci95"]
    assert 0 < single["chance_floor"]["1"] < 1
    assert pooled["chance_floor"] == pytest.approx(single["chance_floor"])
    assert pooled["chance_floor_ci95"] == single["chance_floor_ci95"]


def test_pooling_averages_each_problem_over_seeds(tmp_path):
    one = [passk.ProblemCounts("d", str(i), 4, c) for i, c in enumerate([0, 4])]
    two = [passk.ProblemCounts("d", str(i), 4, c) for i, c in enumerate([4, 4])]
    pooled = report.pooled_results([one, two], "m", bootstrap=20, seed=0, seeds=[0, 1])
    assert pooled["pass_at_k"]["1"] == pytest.approx((0.5 + 1.0) / 2)
    assert "chance_floor" not in pooled  # counts without answers have no floor
    with pytest.raises(ValueError, match="not sampled on the same problems"):
        report.pooled_results([one, one[:1]], "m", bootstrap=20, seed=0, seeds=[0, 1])


def test_pooling_averages_each_problems_floor_over_seeds():
    """Each seed's floor comes from its own answers: seed one's problem 0 draws problem 1's "2"s (p = 0) and
    problem 1 the "1"s (p = 1); seed two's problems draw one "1" in two (p = 1/2)."""
    def problems(answer_pairs):
        return [passk.ProblemCounts("d", str(i), 2, pair.count("1"), gold="1", answers=pair)
                for i, pair in enumerate(answer_pairs)]

    pooled = report.pooled_results([problems([("1", "1"), ("2", "2")]), problems([("1", "2"), ("2", "1")])], "m",
                                   bootstrap=20, seed=0, seeds=[0, 1])
    assert pooled["chance_floor"] == pytest.approx({"1": ((0 + 0.5) / 2 + (1 + 0.5) / 2) / 2,
                                                    "2": ((0 + 0.75) / 2 + (1 + 0.75) / 2) / 2})
    assert [seed["types"] for seed in pooled["meta"]["chance_floor"]["per_seed"]] == [{"integer": 2}] * 2


@pytest.mark.parametrize("tamper", [False, True])
def test_compacting_full_samples_checks_every_number_before_deleting(tmp_path, capsys, tamper):
    """Full samples files (as study.py published them before) become compact ones; they are deleted only when
    the compact files give the same problems and every number of results/ again."""
    settings = pattern_study(tmp_path, seeds=(0,))
    assert report.main(["--settings", str(settings.path)]) == 0
    fulls = []
    for part in settings.parts():
        full = compact_samples.full_samples_path(settings.samples_path(part))
        with open(settings.work_path(part) / "samples.jsonl", "rb") as raw, lzma.open(full, "wb") as packed:
            packed.write(raw.read())
        settings.samples_path(part).unlink()
        fulls.append(full)
    if tamper:
        path = tmp_path / "results" / "pooled-psr.json"
        results = json.loads(path.read_text())
        results["chance_floor_ci95"]["4"][0] -= 1e-9
        path.write_text(json.dumps(results))
    assert compact_samples.main(["--settings", str(settings.path), "--delete"]) == (1 if tamper else 0)
    out, err = capsys.readouterr()
    assert all(settings.samples_path(part).is_file() for part in settings.parts())
    if tamper:
        assert "pooled-psr.json: chance_floor_ci95.4[0]" in out and "nothing deleted" in err
        assert all(full.is_file() for full in fulls)
    else:
        assert "numbers of results/ reproduced exactly" in out and not any(full.exists() for full in fulls)
        assert compact_samples.main(["--settings", str(settings.path)]) == 0
        assert "no full samples files to compact" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_study_and_report_end_to_end_on_tiny_random(tmp_path):
    """study.py trains and samples base + grpo-s0 on tiny-random (CPU), a rerun skips both, report.py reports."""
    path = write_settings(tmp_path, tiny_settings(modes=["grpo"]))
    env = {**os.environ, "PYTHONPATH": str(SANDBOX.parents[1])}
    run = subprocess.run([sys.executable, str(SANDBOX / "study.py"), "--settings", str(path), "--jobs", "2",
                          "--export", str(tmp_path / "export")], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "finished 2 part(s) this run; all selected parts done" in run.stdout
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["base.tar", "grpo-s0.tar"]
    marker = json.loads((tmp_path / "runs" / "grpo-s0" / "part.json").read_text())
    assert marker["train_steps"] == 2 and marker["sample_problems"] == 3
    state = json.loads((tmp_path / "runs" / "grpo-s0" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and any("reward" in entry for entry in state["log_history"])
    rerun = subprocess.run([sys.executable, str(SANDBOX / "study.py"), "--settings", str(path)],
                           capture_output=True, text=True, env=env, timeout=120)
    assert rerun.returncode == 0 and "2 of 2 selected parts done" in rerun.stdout
    reported = subprocess.run([sys.executable, str(SANDBOX / "report.py"), "--settings", str(path)],
                              capture_output=True, text=True, env=env, timeout=120)
    assert reported.returncode == 0, reported.stderr
    assert "| grpo - base |" in (tmp_path / "README.md").read_text()
