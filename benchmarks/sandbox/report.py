"""Regenerate every number and figure of the study's report from the committed samples files and logs (CPU).

    python benchmarks/sandbox/report.py

Reads samples/<part>.compact.jsonl.xz and runs/<part>/ (trainer_state.json, part.json) of the parts that are done;
writes results/ (Pass@k per part, pooled per mode, paired comparisons, the pattern verdict), figures/ and the
generated section of README.md. Parts not done are listed as missing; nothing fails for their absence.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

SANDBOX = Path(__file__).resolve().parent
REPO_ROOT = SANDBOX.parents[1]
sys.path[:0] = [str(REPO_ROOT), str(SANDBOX)]

from nbhelpers import passk, plots  # noqa: E402
from nbhelpers.monitor import read_run  # noqa: E402
from study_pattern import pattern_claims, pattern_verdict  # noqa: E402
from study_settings import (BASE_PART, DEFAULT_SETTINGS, SettingsError, StudySettings, load_settings,  # noqa: E402
                            part_status, read_marker)

BEGIN, END = "<!-- BEGIN GENERATED REPORT (report.py) -->", "<!-- END GENERATED REPORT -->"
TRAINING_METRICS = ("reward", "mode/accuracy", "mode/kept_positive", "mode/kept_negative", "entropy",
                    "completions/mean_length")


# ------------------------------------------------------------------------------------------ Pass@k
def aligned_values(problem_lists: Sequence[Sequence[passk.ProblemCounts]], ks: Sequence[int],
                   order: Sequence[tuple[str, str]], per_problem=passk.per_problem_pass_at_k) -> np.ndarray:
    """Per-problem values (problems in ``order`` x ks), averaged over the lists (seeds) given; ``per_problem``
    (problems, ks) -> matrix gives them, by default each problem's Pass@k."""
    matrices = []
    for problems in problem_lists:
        by_key = {p.key: p for p in problems}
        missing = [key for key in order if key not in by_key]
        if missing or len(by_key) != len(order):
            raise ValueError(f"{problems[0].source.rsplit(':', 1)[0]}: not sampled on the same problems as the "
                             f"others ({len(missing)} missing, {len(by_key)} vs {len(order)})")
        matrices.append(per_problem([by_key[key] for key in order], ks))
    return np.mean(matrices, axis=0)


def chance_floor_per_problem(problems: Sequence[passk.ProblemCounts], ks: Sequence[int]) -> np.ndarray:
    """Each problem's chance floor 1 - (1 - p)^k (problems x ks), p from its own samples file's answers."""
    return passk.chance_floor_matrix(passk.chance_rates(problems)[0], ks)


def pooled_results(problem_lists: Sequence[Sequence[passk.ProblemCounts]], method: str, *, bootstrap: int,
                   seed: int, seeds: Sequence[int | None]) -> dict:
    """Results-file dict of a mode with its seeds pooled: each problem's Pass@k (and chance floor, each seed's
    from its own answers) averaged over the seeds, then the mean over problems with a 95% bootstrap interval
    over problems (passk.bootstrap_mean_ci)."""
    first = problem_lists[0]
    ns = {p.n for problems in problem_lists for p in problems}
    if len(ns) != 1:
        raise ValueError(f"{method}: samples with different n {sorted(ns)}")
    n = ns.pop()
    ks = passk.k_values(n)
    order = [p.key for p in first]
    values = aligned_values(problem_lists, ks, order)
    meta = {"seeds": list(seeds), "pooling": "per-problem Pass@k averaged over seeds",
            "bootstrap": {"resamples": bootstrap, "seed": seed, "level": passk.CI_LEVEL}}
    floor = None
    if all(len(p.answers) == p.n for problems in problem_lists for p in problems):  # hand-made counts have none
        floor = aligned_values(problem_lists, ks, order, chance_floor_per_problem)
        meta["chance_floor"] = {"method": passk.CHANCE_FLOOR_METHOD,
                                "pooling": "per-problem floor of each seed's own answers, averaged over seeds",
                                "per_seed": [passk.chance_rates(problems)[1] for problems in problem_lists]}
    return {"method": method, "dataset": first[0].dataset,
            **passk.results_table(values, ks, n, bootstrap, seed, floor), "meta": meta}


def pooled_comparison(lists_a, lists_b, method_a: str, method_b: str, *, bootstrap: int, seed: int) -> dict:
    """Paired difference A - B on the same problems with seeds pooled per side (as pooled_results), in the
    format of passk.compare_methods; with one seed per side it equals compare_methods."""
    order = [p.key for p in lists_a[0]]
    n = lists_a[0][0].n
    ks = [k for k in passk.k_values(n) if k <= lists_b[0][0].n]
    difference = aligned_values(lists_a, ks, order) - aligned_values(lists_b, ks, order)
    low, high = passk.bootstrap_mean_ci(difference, bootstrap=bootstrap, seed=seed)
    return {"method_a": method_a, "method_b": method_b, "n_problems": len(order),
            "difference": {str(k): float(v) for k, v in zip(ks, difference.mean(axis=0))},
            "ci95": {str(k): [float(a), float(b)] for k, a, b in zip(ks, low, high)},
            "bootstrap": {"resamples": bootstrap, "seed": seed, "level": passk.CI_LEVEL}}


def intervals_by_k(comparison: Mapping) -> dict[int, tuple[float, float, float]]:
    return {int(k): (v, *comparison["ci95"][k]) for k, v in comparison["difference"].items()}


# ------------------------------------------------------------------------------------------ the study's numbers
def collect(settings: StudySettings) -> dict:
    """Everything the report shows, computed from the done parts."""
    bootstrap, boot_seed = settings.report["bootstrap"], settings.report["bootstrap_seed"]
    parts = settings.parts()
    status = {p.name: part_status(settings, p) for p in parts}
    done = [p for p in parts if status[p.name] == "done"]
    problems = {p.name: passk.read_samples(settings.samples_path(p)) for p in done}
    markers = {p.name: read_marker(settings, p) for p in done}
    per_part = {p.name: passk.passk_results(problems[p.name], p.name, bootstrap=bootstrap, seed=boot_seed,
                                            source_samples=[settings.samples_path(p).relative_to(settings.root)])
                for p in done}
    for results in per_part.values():
        results["meta"].pop("created", None)  # regenerating gives identical files
    seeds_of = {m: [p for p in done if p.mode == m] for m in settings.modes}
    lists = {"base": [problems[BASE_PART]]} if BASE_PART in problems else {}
    lists.update({m: [problems[p.name] for p in seeds_of[m]] for m in settings.modes if seeds_of[m]})
    pooled = {label: pooled_results(lists[label], label, bootstrap=bootstrap, seed=boot_seed,
                                    seeds=[p.seed for p in seeds_of.get(label, [])] or [None]) for label in lists}
    versus = {}
    for reference in ("grpo", "base"):
        if reference in lists:
            versus[reference] = {label: pooled_comparison(lists[label], lists[reference], label, reference,
                                                          bootstrap=bootstrap, seed=boot_seed)
                                 for label in lists if label not in (reference, "base")}
    per_seed_vs_grpo = {}
    for part in done:
        partner = f"grpo-s{part.seed}"
        if part.trains and part.mode != "grpo" and partner in problems:
            per_seed_vs_grpo[part.name] = passk.compare_methods(problems[part.name], problems[partner],
                                                                method_a=part.name, method_b=partner,
                                                                bootstrap=bootstrap, seed=boot_seed)
    modes_done = [m for m in settings.modes if m in lists]
    pairs = {(a, b): intervals_by_k(pooled_comparison(lists[a], lists[b], a, b, bootstrap=bootstrap, seed=boot_seed))
             for i, a in enumerate(modes_done) for b in modes_done[i + 1:]}
    estimates = {m: {int(k): v for k, v in pooled[m]["pass_at_k"].items()} for m in modes_done}
    ks = sorted(int(k) for k in next(iter(pooled.values()))["pass_at_k"]) if pooled else []
    claims = pattern_claims(estimates, pairs, ks or [1], settings.report["near_pp"])
    return {"settings": settings, "parts": parts, "status": status, "done": done, "markers": markers,
            "per_part": per_part, "pooled": pooled, "versus": versus, "per_seed_vs_grpo": per_seed_vs_grpo,
            "claims": claims, "verdict": pattern_verdict(claims), "ks": ks,
            "training": {p.name: read_run(settings.run_path(p)) for p in done if p.trains}}


# ------------------------------------------------------------------------------------------ files
def write_json(data, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)


def results_files(study: dict) -> dict[str, dict]:
    """{file name in results/: its content}: Pass@k per part and per mode (seeds pooled), and summary.json."""
    files = {f"{label}.json": results for label, results in
             {**study["per_part"], **{f"pooled-{k}": v for k, v in study["pooled"].items()}}.items()}
    files["summary.json"] = {
        "verdict": study["verdict"],
        "claims": [{"statement": c.statement, "holds": c.holds, "evidence": c.evidence} for c in study["claims"]],
        "versus": study["versus"], "per_seed_vs_grpo": study["per_seed_vs_grpo"],
        "missing_parts": [p.name for p in study["parts"] if study["status"][p.name] != "done"],
        "gpu_time": gpu_time_rows(study)}
    return files


def write_results(study: dict) -> list[Path]:
    root = study["settings"].root / "results"
    written = []
    for name, content in results_files(study).items():
        if name == "summary.json":
            write_json(content, root / name)
            written.append(root / name)
        else:
            written.append(passk.write_results(content, root / name))
    return written


def seed_mean_frame(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """The training logs of several seeds averaged step by step (the metrics of TRAINING_METRICS present)."""
    columns = [c for c in TRAINING_METRICS if any(c in f for f in frames)]
    stacked = pd.concat([f[["step"] + [c for c in columns if c in f]] for f in frames])
    return stacked.groupby("step", as_index=False).mean()


def write_figures(study: dict) -> dict[str, Path]:
    """The project's own plots: Pass@k curves, improvements, training curves; {title: path}."""
    folder = study["settings"].root / "figures"
    figures: dict[str, Path] = {}
    pooled = study["pooled"]
    order = [label for label in ["base", *study["settings"].modes] if label in pooled]
    if order:
        title = "Pass@k, seeds pooled (95% intervals; dashed: chance floors)"
        figures[title] = folder / "passk_curves.png"
        plots.plot_passk_curves([pooled[l] for l in order], order, title="Pass@k (seeds pooled)",
                                save_to=figures[title])
    per_part = study["per_part"]
    if per_part:
        figures["Pass@k of every part"] = folder / "passk_curves_per_part.png"
        plots.plot_passk_curves(list(per_part.values()), list(per_part), show_ci=False, show_floor=False,
                                title="Pass@k per part (chance floors: the pooled figure)",
                                save_to=figures["Pass@k of every part"])
    for reference in ("base", "grpo"):
        others = [l for l in order if l not in (reference, "base")] if reference == "grpo" else \
            [l for l in order if l != "base"]
        if reference in pooled and others:
            title = f"Improvement over {reference} (seeds pooled; paired 95% bands)"
            figures[title] = folder / f"improvement_over_{reference}.png"
            plots.plot_improvement([pooled[reference]] + [pooled[l] for l in others], [reference] + others,
                                   baseline=reference, comparisons=study["versus"][reference], save_to=figures[title])
    training = study["training"]
    by_mode = {m: [training[p.name] for p in study["done"] if p.mode == m] for m in study["settings"].modes}
    by_mode = {m: frames for m, frames in by_mode.items() if frames}
    if by_mode:
        means = {m: seed_mean_frame(frames) for m, frames in by_mode.items()}
        metrics = [c for c in TRAINING_METRICS if all(c in f for f in means.values())]
        title = "Training curves per mode (mean over seeds)"
        figures[title] = folder / "training_curves.png"
        plots.plot_training_curves(means, metrics=metrics, save_to=figures[title])
        for mode, frames in by_mode.items():
            labels = [p.name for p in study["done"] if p.mode == mode]
            metrics = [c for c in TRAINING_METRICS if all(c in f for f in frames)]
            figures[f"Training curves of {mode}, per seed"] = folder / f"training_{mode}.png"
            plots.plot_training_curves(dict(zip(labels, frames)), metrics=metrics,
                                       save_to=figures[f"Training curves of {mode}, per seed"])
    return figures


# ------------------------------------------------------------------------------------------ text
def _cell(value: float, interval: Sequence[float]) -> str:
    return f"{value * 100:.1f} [{interval[0] * 100:.1f}, {interval[1] * 100:.1f}]"


def _diff_cell(value: float, interval: Sequence[float]) -> str:
    value, low, high = (v * 100 + 0.0 for v in (value, *interval))  # + 0.0: no "-0.0"
    return f"{value:+.1f} [{low:+.1f}, {high:+.1f}]"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def passk_table(results: Mapping[str, Mapping], ks: Sequence[int]) -> str:
    """Pass@k with intervals, one row per method and, below it, its chance floor where the results have one."""
    def row(label: str, values: Mapping, intervals: Mapping) -> list[str]:
        return [label] + [_cell(values[str(k)], intervals[str(k)]) if str(k) in values else "n/a" for k in ks]

    rows = []
    for label, r in results.items():
        rows.append(row(label, r["pass_at_k"], r["ci95"]))
        if "chance_floor" in r:
            rows.append(row(f"*{label.split(' (')[0]} chance floor*", r["chance_floor"], r["chance_floor_ci95"]))
    return markdown_table(["method"] + [f"k={k}" for k in ks], rows)


def comparison_table(comparisons: Mapping[str, Mapping], ks: Sequence[int]) -> str:
    rows = [[f"{c['method_a']} - {c['method_b']}"] + [_diff_cell(c["difference"][str(k)], c["ci95"][str(k)])
                                                    if str(k) in c["difference"] else "n/a" for k in ks]
            for c in comparisons.values()]
    return markdown_table(["difference (pp)"] + [f"k={k}" for k in ks], rows)


def training_rows(study: dict) -> list[list[str]]:
    """Per trained part: steps, and first -> last logged value (mean of the first and last 20% of points)."""
    rows = []
    for name, frame in study["training"].items():
        cells = [name, str(int(frame["step"].max())) if len(frame) else "0"]
        for column in ("reward", "mode/accuracy", "mode/kept_positive", "mode/kept_negative", "entropy"):
            values = frame[column].dropna().to_numpy() if column in frame else np.array([])
            window = max(1, int(np.ceil(0.2 * values.size)))
            cells.append(f"{values[:window].mean():.3g} -> {values[-window:].mean():.3g}" if values.size else "n/a")
        skipped = frame["optimizer/nonfinite_steps"].max() if "optimizer/nonfinite_steps" in frame else 0
        cells.append(str(int(skipped)) if skipped == skipped else "0")  # NaN where never logged
        rows.append(cells)
    return rows


def gpu_time_rows(study: dict) -> list[dict]:
    rows = []
    for name, marker in study["markers"].items():
        steps, tokens = marker.get("train_steps"), marker.get("sample_tokens")
        rows.append({"part": name, "gpu": marker.get("gpu") or f"CPU ({marker.get('cpu_count')} cores)",
                     "jobs": marker.get("jobs"), "train_s": marker.get("train_s"), "train_steps": steps,
                     "s_per_step": marker["train_s"] / steps if steps and marker.get("train_s") else None,
                     "sample_s": marker.get("sample_s"), "sample_tokens": tokens,
                     "ms_per_token": 1e3 * marker["sample_s"] / tokens if tokens else None,
                     "finished": marker.get("finished"), "code": (marker.get("git_commit") or "n/a")[:7]})
    return rows


def _number(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def same_budget_check(study: dict) -> str:
    """Compare the training settings recorded in the done parts' markers: equal apart from mode and seed?"""
    trained = {n: m["settings"]["train"] for n, m in study["markers"].items() if "train" in m["settings"]}
    if not trained:
        return "No trained part yet."
    ignore = {"mode", "seed"}
    reference_name, reference = next(iter(trained.items()))
    differing = sorted({k for s in trained.values() for k in set(s) | set(reference)
                        if k not in ignore and s.get(k) != reference.get(k)})
    if differing:
        return f"**Budgets differ** between done parts in: {', '.join(differing)} (checked from the part markers)."
    return (f"Checked from the markers of the {len(trained)} trained parts: their training configurations are "
            f"identical apart from `mode` and `seed` (learning rate {reference['learning_rate']:g}, "
            f"G = {reference['num_generations']}, {reference['max_steps']} steps, {reference['subset_size']} problems "
            f"per seed, {reference['finetune']}).")


def report_markdown(study: dict, figures: Mapping[str, Path]) -> str:
    settings: StudySettings = study["settings"]
    root = settings.root
    ks = study["ks"]
    missing = [p.name for p in study["parts"] if study["status"][p.name] != "done"]
    sample = settings.sample_config(settings.parts()[0])
    out = ["## Results (generated by `report.py`; do not edit by hand)", ""]
    out.append(f"Parts done: {len(study['done'])} of {len(study['parts'])}." +
               (f" **Missing: {', '.join(missing)}** (the numbers below use the done parts only)." if missing else ""))
    out += ["", f"Base model `{settings.model}`; {sample.max_problems} held-out test problems "
                f"({sample.eval_dataset}, split {sample.eval_split}, seed {settings.eval_seed}), "
                f"n = {sample.n_samples} samples each at temperature {sample.sample_temperature:g}, "
                f"top-p {sample.sample_top_p:g}, at most {sample.sample_max_new_tokens} new tokens. "
                f"Intervals: 95% bootstrap over problems "
                f"({settings.report['bootstrap']} resamples); pooled = each problem's Pass@k averaged over the seeds.",
            "", "*Chance floor* (the rows in italics, the dashed lines): the Pass@k of a guesser that never sees the "
                "chart. For each problem it draws k of the same method's completions to other test problems whose "
                "gold answer has the same type (yes/no, year, integer, decimal, text), and scores their answers "
                "against this problem's gold answer with the samples' own rule (relaxed accuracy: numbers within 5%; "
                "`nbhelpers.passk`). Pass@k near its floor is guessing, not reading the chart."]
    out += ["", "### Does the paper's pattern hold?", "", study["verdict"], ""]
    out += [markdown_table(["claim", "holds", "numbers"],
                           [[c.statement, {True: "yes", False: "no", None: "n/a"}[c.holds], c.evidence]
                            for c in study["claims"]])]
    out += ["", f"Rules (in `study_pattern.py`): two modes are near (tied) at k when their paired difference is "
                f"within {settings.report['near_pp']:g} percentage points or its 95% interval contains 0; best or near "
                f"best = highest, or near the highest; worst = lowest and not near the next lowest; large k = the "
                f"largest k; overall = every k."]
    if study["pooled"]:
        labelled = {label if label == "base" else f"{label} (seeds {', '.join(map(str, r['meta']['seeds']))})": r
                    for label, r in study["pooled"].items()}
        out += ["", "### Pass@k (%), seeds pooled", "", passk_table(labelled, ks)]
        out += ["", "### Pass@k (%) per part", "", passk_table(study["per_part"], ks)]
    for reference, comparisons in study["versus"].items():
        if comparisons:
            out += ["", f"### Paired differences against {reference} (percentage points, seeds pooled)", "",
                    comparison_table(comparisons, ks)]
    if study["per_seed_vs_grpo"]:
        out += ["", "### Paired differences against grpo of the same seed (percentage points, "
                    "`nbhelpers.passk.compare_methods`)", "", comparison_table(study["per_seed_vs_grpo"], ks)]
    for title, path in figures.items():
        out += ["", f"**{title}**", "", f"![{title}]({path.relative_to(root).as_posix()})"]
    if study["training"]:
        out += ["", "### Training (first 20% -> last 20% of logged steps)", "",
                markdown_table(["part", "steps", "reward", "accuracy", "kept correct / step",
                                "kept incorrect / step", "entropy", "steps skipped (non-finite gradients)"],
                               training_rows(study))]
    out += ["", "### Settings", "", same_budget_check(study), "", f"`{settings.path.name}`:", "", "```yaml",
            settings.path.read_text().rstrip(), "```"]
    rows = gpu_time_rows(study)
    if rows:
        out += ["", "### GPU time", ""]
        out.append(markdown_table(
            ["part", "device", "jobs", "train s", "steps", "s/step", "sample s", "tokens", "ms/token", "finished",
             "code"],
            [[r["part"], r["gpu"], str(r["jobs"]), _number(r["train_s"], ".0f"), _number(r["train_steps"], "d"),
              _number(r["s_per_step"], ".2f"), _number(r["sample_s"], ".0f"), _number(r["sample_tokens"], ",d"),
              _number(r["ms_per_token"], ".3f"), r["finished"] or "", r["code"]] for r in rows]))
        total = sum((r["train_s"] or 0) + (r["sample_s"] or 0) for r in rows)
        versions = {json.dumps(m.get("versions"), sort_keys=True) for m in study["markers"].values()}
        out += ["", f"Sum of part wall times: {total / 60:.1f} minutes (parts ran {max(r['jobs'] or 1 for r in rows)} "
                    f"at a time on one device, so the device was held for less). Versions: " +
                "; ".join(", ".join(f"{k} {v}" for k, v in json.loads(v).items()) for v in sorted(versions)) + "."]
    return "\n".join(out) + "\n"


def update_readme(readme: Path, section: str) -> None:
    """Replace the generated section of the README (between the markers), or append one."""
    text = readme.read_text(encoding="utf-8") if readme.is_file() else "# Objectives study\n"
    block = f"{BEGIN}\n{section}{END}\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    tmp = readme.with_name(f".{readme.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(readme)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", type=Path, default=DEFAULT_SETTINGS, help="study settings (YAML)")
    parser.add_argument("--root", type=Path, default=None, help="study folder (default: the settings file's)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.settings, args.root)
        study = collect(settings)
    except (SettingsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    written = write_results(study)
    figures = write_figures(study)
    readme = settings.root / "README.md"
    update_readme(readme, report_markdown(study, figures))
    missing = [p.name for p in study["parts"] if study["status"][p.name] != "done"]
    print(f"{len(study['done'])} of {len(study['parts'])} parts done" +
          (f"; missing: {', '.join(missing)}" if missing else ""))
    print(study["verdict"])
    print(f"wrote {len(written)} results files, {len(figures)} figures and {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
