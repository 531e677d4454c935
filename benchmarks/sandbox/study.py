"""Run the objectives study of issue 12 (settings: study.yaml), resumably, several parts at once on one GPU.

Parts: ``base`` (samples of the base model) and ``<mode>-s<seed>`` (train with nbhelpers.training_run.train, then
sample the trained adapter with nbhelpers.sampling.sample_to_file). Each part runs as its own process with its
own scratch folder ``work/<part>/`` (run folder, checkpoints, uncompressed samples, ``log.txt``). A finished part
publishes, each step atomically (temp file, then rename), its compact samples ``samples/<part>.compact.jsonl.xz``
(every problem's correct bits and answers, the texts of a few), then ``runs/<part>/``
(trainer_state.json, configs, summary and the marker part.json with GPU, wall times and versions). A rerun skips
done parts; a killed part resumes from its newest checkpoint and its finished problems.

    python benchmarks/sandbox/study.py --jobs 6            # everything not yet done
    python benchmarks/sandbox/study.py --dry-run           # what is done, what remains, time estimate
    python benchmarks/sandbox/study.py --modes grpo nsr --seeds 0 --jobs 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

SANDBOX = Path(__file__).resolve().parent
REPO_ROOT = SANDBOX.parents[1]
sys.path[:0] = [str(REPO_ROOT), str(SANDBOX)]  # this checkout's nbhelpers, and study_settings beside this file

from nbhelpers.passk import write_compact_samples  # noqa: E402
from study_settings import (BASE_PART, COMPLETIONS_KEPT, DEFAULT_SETTINGS, MARKER, Part, SettingsError,  # noqa: E402
                            StudySettings, changed_keys, load_settings, part_status, read_marker)

FINGERPRINT_FILE = "fingerprint.txt"
TIMING_FILE = "timing.json"
STOP_GRACE_S = 30


# ------------------------------------------------------------------------------------------ one part
def prepare_work(settings: StudySettings, part: Part) -> Path:
    """The part's scratch folder, emptied first when it holds an attempt made with other settings."""
    work = settings.work_path(part)
    stamp = work / FINGERPRINT_FILE
    fingerprint = settings.fingerprint(part)
    if work.exists() and (not stamp.is_file() or stamp.read_text().strip() != fingerprint):
        print(f"{part.name}: the unfinished attempt in {work} was made with other settings: starting afresh",
              flush=True)
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fingerprint + "\n")
    return work


def _add_time(work: Path, stage: str, seconds: float) -> dict:
    """Accumulate a finished stage's wall time over attempts (a killed attempt's time is not counted)."""
    path = work / TIMING_FILE
    timing = json.loads(path.read_text()) if path.is_file() else {}
    timing[stage] = timing.get(stage, 0.0) + seconds
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(timing))
    tmp.replace(path)
    return timing


def default_train(cfg) -> Path:
    from nbhelpers.training_run import train

    return train(cfg)


def default_sample(cfg, out: Path, checkpoint: str | None, method: str) -> Path:
    from nbhelpers.sampling import sample_to_file

    return sample_to_file(cfg, out, checkpoint=checkpoint, method=method)


def run_part(settings: StudySettings, part: Part, train: Callable = default_train,
             sample: Callable = default_sample) -> dict:
    """Train (trained parts) and sample one part in its scratch folder, then publish it; returns the marker."""
    work = prepare_work(settings, part)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    checkpoint, run_dir = None, None
    if part.trains:
        print(f"{part.name}: training ({planned_steps(settings, part)} steps)", flush=True)
        t0 = time.monotonic()
        run_dir = Path(train(settings.train_config(part)))
        _add_time(work, "train_s", time.monotonic() - t0)
        checkpoint = str(run_dir / "final")
    cfg = settings.sample_config(part)
    print(f"{part.name}: sampling n = {cfg.n_samples} on {cfg.max_problems} {cfg.eval_dataset} "
          f"{cfg.eval_split} problems", flush=True)
    t0 = time.monotonic()
    samples = Path(sample(cfg, work / "samples.jsonl", checkpoint, part.name))
    timing = _add_time(work, "sample_s", time.monotonic() - t0)
    texts_per_problem = _read_completions(samples)
    if len(texts_per_problem) != cfg.max_problems:
        raise RuntimeError(f"{samples}: {len(texts_per_problem)} problems sampled, study.yaml asks for "
                           f"{cfg.max_problems} (does the test set hold that many?)")
    marker = {
        "part": part.name, "mode": part.mode, "seed": part.seed, "fingerprint": settings.fingerprint(part),
        "settings": settings.part_settings(part), "started": started,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "train_s": timing.get("train_s"), "sample_s": timing["sample_s"],
        "train_steps": _global_step(run_dir) if run_dir else None,
        "sample_problems": len(texts_per_problem), "n_samples": cfg.n_samples,
        "sample_tokens": count_tokens(settings.model, cfg.eval_max_pixels, texts_per_problem),
        "jobs": int(os.environ.get("STUDY_JOBS", "1")),
        **machine_record(),
    }
    publish(settings, part, samples, run_dir, marker)
    print(f"{part.name}: done ({_seconds(marker)})", flush=True)
    return marker


def _read_completions(samples: Path) -> list[list[str]]:
    with open(samples, encoding="utf-8") as handle:
        return [json.loads(line)["completions"] for line in handle if line.strip()]


def _global_step(run_dir: Path) -> int | None:
    state = run_dir / "trainer_state.json"
    return json.loads(state.read_text())["global_step"] if state.is_file() else None


def count_tokens(model: str, max_pixels: int, texts_per_problem: list[list[str]]) -> int:
    """Completion tokens of all samples, re-tokenized with the model's tokenizer (EOS not counted)."""
    from nbhelpers.models import load_processor

    tokenizer = load_processor(model, max_pixels).tokenizer
    return sum(len(ids) for texts in texts_per_problem
               for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def machine_record() -> dict:
    """GPU name, CPU count, package versions and the code's git commit, for the marker."""
    import importlib.metadata as metadata

    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for package in ("transformers", "trl", "peft", "accelerate", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    def git(*command: str) -> str | None:
        try:
            result = subprocess.run(["git", "-C", str(REPO_ROOT), *command], capture_output=True, text=True,
                                    timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return result.stdout if result.returncode == 0 else None

    # a copy without .git (a lent GPU machine) is named by the caller: STUDY_GIT_COMMIT=$(git rev-parse HEAD)
    commit = (git("rev-parse", "HEAD") or "").strip() or os.environ.get("STUDY_GIT_COMMIT") or None
    changes = git("status", "--porcelain", "--untracked-files=no")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"gpu": gpu, "cpu_count": os.cpu_count(), "versions": versions, "git_commit": commit,
            "git_dirty": None if changes is None else bool(changes.strip())}


def publish(settings: StudySettings, part: Part, samples: Path, run_dir: Path | None, marker: dict) -> None:
    """samples/<part>.compact.jsonl.xz (compact and xz, so that the repository stays small enough to travel to a
    GPU machine; the same samples give the same bytes), then runs/<part>/ with the logs and, inside, the marker
    (renamed in last)."""
    from nbhelpers.sync import replace_folder  # imports torch: inside, as this script's other nbhelpers imports

    write_compact_samples(settings.samples_path(part), samples, keep=COMPLETIONS_KEPT)
    final = settings.run_path(part)
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if run_dir is not None:
        for name, target in (("trainer_state.json", "trainer_state.json"), ("config.yaml", "train-config.yaml"),
                             ("summary.txt", "summary.txt")):
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, tmp / target)
    sample_config = samples.with_name(samples.stem + ".config.yaml")
    if sample_config.is_file():
        shutil.copy2(sample_config, tmp / "sample-config.yaml")
    (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    replace_folder(tmp, final)


def _seconds(marker: dict) -> str:
    train = f"train {marker['train_s']:.0f} s, " if marker.get("train_s") is not None else ""
    return f"{train}sample {marker['sample_s']:.0f} s"


# ------------------------------------------------------------------------------------------ many parts
@dataclass
class Outcome:
    part: str
    state: str  # done | failed | stopped
    returncode: int | None
    log: Path


def last_progress_line(log: Path, tail_bytes: int = 4096) -> str:
    """The last non-empty line of a log, progress bars (carriage returns) included."""
    try:
        with open(log, "rb") as handle:
            handle.seek(max(0, log.stat().st_size - tail_bytes))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [line.strip() for line in text.replace("\r", "\n").split("\n") if line.strip()]
    return lines[-1][:140] if lines else ""


def run_processes(commands: dict[str, tuple[list[str], Path]], jobs: int, *, env: dict | None = None,
                  time_budget_s: float | None = None, status_every_s: float = 60.0, poll_s: float = 0.5,
                  say: Callable[[str], None] = print) -> list[Outcome]:
    """Run {name: (argv, log file)} with at most ``jobs`` at once, in order; past ``time_budget_s`` start no
    more and stop the running ones (SIGTERM to each process group, SIGKILL after a grace period)."""
    pending = list(commands)
    running: dict[str, tuple[subprocess.Popen, object]] = {}
    outcomes: list[Outcome] = []
    start = last_status = time.monotonic()
    stopping = False

    def stamp() -> str:
        return f"[{_hms(time.monotonic() - start)}]"

    while pending or running:
        if time_budget_s is not None and not stopping and time.monotonic() - start > time_budget_s:
            stopping = True
            say(f"{stamp()} time budget of {time_budget_s:.0f} s spent: stopping {len(running)} running part(s), "
                f"not starting {len(pending)}; rerun to continue")
            for process, _ in running.values():
                _signal_group(process, signal.SIGTERM)
            pending.clear()
            deadline = time.monotonic() + STOP_GRACE_S
        while pending and len(running) < jobs and not stopping:
            name = pending.pop(0)
            argv, log = commands[name]
            log.parent.mkdir(parents=True, exist_ok=True)
            handle = open(log, "a", encoding="utf-8")
            handle.write(f"\n===== {datetime.now(timezone.utc).isoformat(timespec='seconds')} {' '.join(argv)}\n")
            handle.flush()
            running[name] = (subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                              start_new_session=True), handle)
            say(f"{stamp()} started {name} ({len(running)} running, {len(pending)} waiting; log {log})")
        for name in list(running):
            process, handle = running[name]
            code = process.poll()
            if code is None and stopping and time.monotonic() > deadline:
                _signal_group(process, signal.SIGKILL)
                code = process.wait()
            if code is None:
                continue
            handle.close()
            del running[name]
            log = commands[name][1]
            state = "done" if code == 0 else "stopped" if stopping else "failed"
            outcomes.append(Outcome(name, state, code, log))
            detail = "" if code == 0 else f" (exit {code}): {last_progress_line(log)}"
            say(f"{stamp()} {state} {name}{detail}")
        if running and time.monotonic() - last_status >= status_every_s:
            last_status = time.monotonic()
            for name in running:
                say(f"{stamp()}   {name}: {last_progress_line(commands[name][1])}")
        if running:
            time.sleep(poll_s)
    return outcomes


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def _hms(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60:d}:{minutes % 60:02d}:{secs:02d}"


def child_env(jobs: int) -> dict:
    """Environment of a part's process: threads shared among the parts, unbuffered output, offline hub."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    env.update({"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "STUDY_JOBS": str(jobs)})
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


# ------------------------------------------------------------------------------------------ selection, status
def select_parts(settings: StudySettings, names: Sequence[str] | None = None, modes: Sequence[str] | None = None,
                 seeds: Sequence[int] | None = None) -> list[Part]:
    """The parts asked for: by name, and/or trained parts of the given modes and seeds (base stays unless
    names leave it out)."""
    parts = settings.parts()
    if names:
        known = {p.name for p in parts}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise SettingsError(f"--parts: unknown part(s) {unknown} (parts: {', '.join(sorted(known))})")
        parts = [p for p in parts if p.name in names]
    for flag, values, attribute, allowed in (("--modes", modes, "mode", settings.modes),
                                             ("--seeds", seeds, "seed", settings.seeds)):
        if values:
            bad = [v for v in values if v not in allowed]
            if bad:
                raise SettingsError(f"{flag}: {bad} not in {settings.path} ({allowed})")
            parts = [p for p in parts if not p.trains or getattr(p, attribute) in values]
    return parts


def progress_of(settings: StudySettings, part: Part) -> str:
    """What an unfinished part has in its scratch folder: newest checkpoint step and sampled problems."""
    work = settings.work_path(part)
    if not work.is_dir():
        return "not started"
    bits = []
    if part.trains:
        run = work / "run" / part.name
        steps = [int(p.name.split("-")[1]) for p in run.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
        total = planned_steps(settings, part)
        if run.is_dir():
            bits.append("trained" if (run / "final").is_dir() else f"checkpoint {max(steps, default=0)}/{total} steps")
    samples = work / "samples.jsonl"
    if samples.is_file():
        with open(samples, "rb") as handle:
            finished = sum(1 for line in handle if line.endswith(b"\n"))
        bits.append(f"{finished} problems sampled")
    return ", ".join(bits) or "not started"


def planned_steps(settings: StudySettings, part: Part) -> int:
    """Optimizer steps of a trained part (max_steps, or from problems, G, batch and epochs)."""
    from nbhelpers.config import estimate_training_steps

    cfg = settings.train_config(part)
    return estimate_training_steps(cfg, cfg.subset_size).total_steps


def time_estimate(settings: StudySettings, parts: Sequence[Part], jobs: int) -> list[str]:
    """The remaining work of ``parts`` in training steps and sample tokens, and a time estimate from the
    rates that done parts recorded (seconds per training step, seconds per sampled token)."""
    markers = [m for m in (read_marker(settings, p) for p in settings.parts()) if m]
    cfg = settings.sample_config(Part(BASE_PART))
    steps = sum(planned_steps(settings, p) for p in parts if p.trains)
    samples = len(parts) * cfg.max_problems * cfg.n_samples
    lines = [f"remaining (checkpoints not subtracted): {len([p for p in parts if p.trains])} training runs = "
             f"{steps} steps; {len(parts)} "
             f"samplings = {samples:,} samples of at most {cfg.sample_max_new_tokens} tokens"]
    trained = [m for m in markers if m.get("train_s") and m.get("train_steps")]
    sampled = [m for m in markers if m.get("sample_tokens")]
    if not trained or not sampled:
        lines.append("time: no finished part with recorded rates yet; GPU time ~ steps x s_step + samples x "
                     "tokens_per_sample x s_token (rates under the same --jobs)")
        return lines
    s_step = sum(m["train_s"] for m in trained) / sum(m["train_steps"] for m in trained)
    s_token = sum(m["sample_s"] for m in sampled) / sum(m["sample_tokens"] for m in sampled)
    per_sample = sum(m["sample_tokens"] for m in sampled) / sum(m["sample_problems"] * m["n_samples"] for m in sampled)
    busy = steps * s_step + samples * per_sample * s_token
    concurrency = max(m.get("jobs", 1) for m in markers)
    lines.append(f"rates of done parts (each sharing the device with up to {concurrency} parts): {s_step:.2f} s per "
                 f"training step, {s_token * 1e3:.3f} ms per sampled token, {per_sample:.0f} tokens per sample")
    lines.append(f"time: {steps} x {s_step:.2f} s + {samples:,} x {per_sample:.0f} x {s_token * 1e3:.3f} ms = "
                 f"{busy / 60:.0f} part-minutes; with --jobs {jobs}: about "
                 f"{busy / 60 / max(1, min(jobs, len(parts))):.0f} minutes of wall time")
    return lines


def export_parts(settings: StudySettings, names: Sequence[str], out: Path) -> list[Path]:
    """One tar per part (samples file and runs folder, paths relative to the study folder) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        part = settings.part(name)
        path = out / f"{name}.tar"
        with tarfile.open(path, "w") as tar:
            for member in (settings.samples_path(part), settings.run_path(part)):
                tar.add(member, arcname=str(member.relative_to(settings.root)))
        written.append(path)
    return written


# ------------------------------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", type=Path, default=DEFAULT_SETTINGS, help="study settings (YAML)")
    parser.add_argument("--root", type=Path, default=None,
                        help="folder of samples/, runs/, work/ (default: the settings file's folder)")
    parser.add_argument("--parts", nargs="+", default=None, help="only these parts (base, grpo-s0, ...)")
    parser.add_argument("--modes", nargs="+", default=None, help="only trained parts of these modes")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="only trained parts of these seeds")
    parser.add_argument("--jobs", type=int, default=1, help="parts run at once (processes sharing the GPU)")
    parser.add_argument("--dry-run", action="store_true", help="list done and remaining parts; run nothing")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="stop the running parts (resumable) and start no new one after this long")
    parser.add_argument("--status-every", type=float, default=60.0, metavar="SECONDS",
                        help="print each running part's last progress line this often")
    parser.add_argument("--export", type=Path, default=None, metavar="DIR",
                        help="write one tar per part finished in this invocation into DIR")
    parser.add_argument("--run-part", default=None, help=argparse.SUPPRESS)  # a part's own process
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.jobs < 1:
            raise SettingsError(f"--jobs must be >= 1, got {args.jobs}")
        settings = load_settings(args.settings, args.root)
        if args.run_part:
            run_part(settings, settings.part(args.run_part))
            return 0
        parts = select_parts(settings, args.parts, args.modes, args.seeds)
        status = {p.name: part_status(settings, p) for p in parts}
        changed = [p for p in parts if status[p.name] == "changed"]
        if changed:
            details = "; ".join(f"{p.name} ({', '.join(changed_keys(settings, p)) or 'fingerprint'})" for p in changed)
            raise SettingsError(f"{settings.path}: done part(s) were made with other settings: {details}. Keep them "
                                f"(restore the settings) or delete their samples/<part>.compact.jsonl.xz and "
                                f"runs/<part>/ to redo them")
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    todo = [p for p in parts if status[p.name] != "done"]
    print(f"study {settings.path} (root {settings.root}): {len(parts) - len(todo)} of {len(parts)} selected "
          f"parts done")
    for part in parts:
        state = status[part.name]
        print(f"  {part.name:18s} {state}" + ("" if state == "done" else f"  ({progress_of(settings, part)})"))
    for line in time_estimate(settings, todo, args.jobs):
        print(line)
    if args.dry_run or not todo:
        return 0
    for part in todo:
        prepare_work(settings, part)
    script = str(Path(__file__).resolve())
    commands = {p.name: ([sys.executable, script, "--settings", str(settings.path), "--root", str(settings.root),
                          "--run-part", p.name], settings.work_path(p) / "log.txt") for p in todo}
    outcomes = run_processes(commands, args.jobs, env=child_env(args.jobs), time_budget_s=args.time_budget,
                             status_every_s=args.status_every)
    done = [o.part for o in outcomes if o.state == "done"]
    if args.export is not None and done:
        for path in export_parts(settings, done, args.export):
            print(f"exported {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    left = [p.name for p in todo if p.name not in done]
    print(f"finished {len(done)} part(s) this run; " + (f"left: {', '.join(left)} (rerun to resume)" if left
                                                         else "all selected parts done"))
    return 0 if not left else 1


if __name__ == "__main__":
    sys.exit(main())
