"""n samples per problem from a base model or checkpoint, written to a resumable samples file.

Samples file: JSON Lines, one line per finished problem (the format is in :mod:`nbhelpers.passk`, whose
:func:`~nbhelpers.passk.read_samples` checks it), appended and flushed as each problem completes. Rerunning
the same command resumes: finished problems are skipped, a truncated last line (a crash mid-write) is cut
off, nothing is duplicated. Each problem draws from its own seed (run seed + problem id), so a resumed run
gives the same samples as an uninterrupted one.
With the fast rollout engine, problems are sampled together (continuous batching) and their lines come
in the order the problems finish.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable

import torch

from .config import RunConfig, save_resolved_config

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ samples file
def repair_samples_file(path: str | Path) -> int:
    """Cut a truncated last line (no trailing newline, or not valid JSON); return bytes removed."""
    path = Path(path)
    if not path.exists():
        return 0
    data = path.read_bytes()
    keep = len(data)
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
    else:
        last_start = data.rfind(b"\n", 0, max(len(data) - 1, 0)) + 1
        try:
            if data[last_start:].strip():
                json.loads(data[last_start:])
        except json.JSONDecodeError:
            keep = last_start
    if keep < len(data):
        with open(path, "r+b") as fh:
            fh.truncate(keep)
        log.warning("%s: removed a truncated last line (%d bytes) left by an interrupted run",
                    path, len(data) - keep)
    return len(data) - keep


def finished_problems(path: str | Path) -> set[tuple[str, str]]:
    """(dataset, id) of every problem already in a samples file (after repair)."""
    path = Path(path)
    done: set[tuple[str, str]] = set()
    if not path.exists():
        return done
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                done.add((str(record["dataset"]), str(record["id"])))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{path} line {line_no}: not a samples record ({exc})") from exc
    return done


class SamplesWriter:
    """Appends one JSON line per finished problem, flushed and fsynced, so a kill loses at most one problem."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_samples_file(self.path)
        self.done = finished_problems(self.path)
        self._fh = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        key = (str(record["dataset"]), str(record["id"]))
        if key in self.done:
            return
        self._fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.done.add(key)

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "SamplesWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ------------------------------------------------------------------------------------------ generation
def problem_seed(seed: int, dataset: str, problem_id: str) -> int:
    """A 63-bit seed per problem, independent of the order in which problems are sampled."""
    digest = hashlib.sha256(f"{seed}/{dataset}/{problem_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def encode_prompt(processor, example: dict[str, Any], max_pixels: int) -> dict[str, torch.Tensor]:
    """Processor inputs (batch of one) for an example's chat prompt and resized image."""
    from .data import build_messages, resize_to_pixel_budget

    text = processor.apply_chat_template(build_messages(example["question"]), add_generation_prompt=True)
    image = resize_to_pixel_budget(example["image"], max_pixels)
    return dict(processor(text=[text], images=[image], return_tensors="pt"))


def generate_in_chunks(model, prompt_inputs: dict[str, torch.Tensor], n: int, chunk_size: int, *,
                       max_new_tokens: int, temperature: float, top_p: float, eos_token_ids: list[int],
                       pad_token_id: int, seed: int, engine: str = "auto") -> list[list[int]]:
    """n completions (token ids, cut after the first EOS) in chunks; a CUDA OOM halves the chunk and retries."""
    from .rollout import halved_after_oom, sample_completions

    device = next(model.parameters()).device
    prompt_inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in prompt_inputs.items()}
    generator = torch.Generator(device=device).manual_seed(seed)
    torch.manual_seed(seed)
    completions: list[list[int]] = []
    chunk = max(1, min(chunk_size, n))
    while len(completions) < n:
        take = min(chunk, n - len(completions))
        try:
            completions += sample_completions(model, prompt_inputs, take, max_new_tokens=max_new_tokens,
                                              temperature=temperature, top_p=top_p, eos_token_ids=eos_token_ids,
                                              pad_token_id=pad_token_id, engine=engine, generator=generator)
        except torch.cuda.OutOfMemoryError as error:
            chunk = halved_after_oom(chunk, error)
            log.warning("CUDA out of memory: sampling chunk halved to %d", chunk)
    return completions


def _eos_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(i for i in ids if i is not None)


def load_for_sampling(cfg: RunConfig, checkpoint: str | None, max_pixels: int):
    """(model in eval mode on the best device, processor) for a base model or a checkpoint/adapter folder."""
    from .models import load_model, load_processor, torch_dtype
    from .platform import detect_platform, resolve_dtype

    source = checkpoint or cfg.vlm_name
    processor = load_processor(source, max_pixels)
    dtype = resolve_dtype(cfg.dtype, detect_platform())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(source, torch_dtype(dtype), device=device, attn_implementation=cfg.attn_implementation)
    model.eval()
    return model, processor


def _progress(desc: str, total: int | None = None, iterable=None):
    """A text tqdm bar over problems (count, rate and ETA). Text, not a widget: a notebook saved after a
    headless run keeps the bar's last state (a widget bar's saved text stays at 0%)."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="problem", dynamic_ncols=True)


def sample_to_file(cfg: RunConfig, out: str | Path, checkpoint: str | None = None, method: str | None = None,
                   examples: Iterable[dict] | None = None, model=None, processor=None) -> Path:
    """Draw ``cfg.n_samples`` completions per problem of ``cfg.eval_dataset`` into ``out`` (resumable)."""
    from . import data, provenance
    from .completion_parsing import extract_answer
    from .rewards import is_correct
    from .rollout import sample_problems

    out = Path(out)
    requested = provenance.samples_provenance(cfg, checkpoint)
    resuming = provenance.check_samples_file(out, requested)  # refuses another provenance before any work
    if examples is None:
        examples = data.load_examples(cfg.eval_dataset, split=cfg.eval_split, data_dir=cfg.data_dir,
                                      subset_size=cfg.max_problems, seed=cfg.seed)
    examples = list(examples) if not hasattr(examples, "__len__") else examples
    if model is None or processor is None:
        model, processor = load_for_sampling(cfg, checkpoint, cfg.eval_max_pixels)
    if not resuming:
        save_resolved_config(cfg, out.parent, name=provenance.samples_record_path(out).name,
                             extra={"provenance": requested})
    tokenizer = processor.tokenizer
    eos = _eos_ids(model, tokenizer)
    meta_base = {"method": method or cfg.mode, "model": requested["model"], "checkpoint": checkpoint,
                 **{name: requested[name] for name in ("n", "temperature", "top_p", "max_new_tokens", "seed")}}
    with SamplesWriter(out) as writer:
        todo = [i for i in range(len(examples))
                if (examples[i]["dataset"], str(examples[i]["id"])) not in writer.done]
        bar = _progress(f"sampling n={cfg.n_samples}", total=len(examples))
        bar.update(len(examples) - len(todo))
        started, drawn = time.monotonic(), 0
        problems = ((i, encode_prompt(processor, examples[i], cfg.eval_max_pixels),
                     problem_seed(cfg.seed, examples[i]["dataset"], str(examples[i]["id"]))) for i in todo)
        settings = {name: requested[name] for name in ("max_new_tokens", "temperature", "top_p")}
        settings.update(eos_token_ids=eos, pad_token_id=tokenizer.pad_token_id)

        def one_problem(inputs, seed):  # the stock path, one problem at a time
            return generate_in_chunks(model, inputs, cfg.n_samples, cfg.sample_chunk_size, seed=seed,
                                      engine=cfg.rollout_engine, **settings)

        # fast engine: continuous batching across problems (sample_chunk_size rows), finished problems first
        for index, seed, ids in sample_problems(model, problems, cfg.n_samples, rows=cfg.sample_chunk_size,
                                                engine=cfg.rollout_engine, one_problem=one_problem, **settings):
            example = examples[index]
            texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
            exact = data.example_exact_match(example)
            writer.write({"id": str(example["id"]), "dataset": example["dataset"], "question": example["question"],
                          "answer": example["answer"], "completions": texts,
                          "correct": [is_correct(t, example["answer"], cfg.reward_threshold, exact) for t in texts],
                          "answers": [extract_answer(t) for t in texts],
                          "meta": {**meta_base, "seed_problem": seed, "exact_match": exact,
                                   "reward_threshold": cfg.reward_threshold}})
            drawn += len(texts)
            bar.update(1)
            bar.set_postfix(samples_per_s=f"{drawn / max(time.monotonic() - started, 1e-9):.1f}")
        bar.close()
    return out


def evaluate_accuracy(cfg: RunConfig, datasets: list[str], out: str | Path, checkpoint: str | None = None,
                      model=None, processor=None) -> dict[str, Any]:
    """Greedy accuracy (relaxed metric; exact match where the example asks for it) per evaluation dataset
    (and per subset where there is one), as JSON."""
    from . import data
    from .rewards import is_correct

    if model is None or processor is None:
        model, processor = load_for_sampling(cfg, checkpoint, cfg.eval_max_pixels)
    tokenizer = processor.tokenizer
    eos = _eos_ids(model, tokenizer)
    device = next(model.parameters()).device
    results: dict[str, Any] = {"model": cfg.vlm_name, "checkpoint": checkpoint, "datasets": {}}
    for name in datasets:
        split = cfg.eval_split if name == cfg.eval_dataset else None
        examples = data.load_examples(name, split=split, data_dir=cfg.data_dir, subset_size=cfg.max_problems,
                                      seed=cfg.seed)
        per_subset: dict[str, list[bool]] = {}
        for example in _progress(f"eval {name}", iterable=examples):
            inputs = {k: v.to(device) for k, v in encode_prompt(processor, example, cfg.eval_max_pixels).items()}
            with torch.no_grad():
                output = model.generate(**inputs, do_sample=False, max_new_tokens=cfg.sample_max_new_tokens,
                                        eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
            text = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            verdict = is_correct(text, example["answer"], cfg.reward_threshold, data.example_exact_match(example))
            per_subset.setdefault("all", []).append(verdict)
            if example.get("subset"):
                per_subset.setdefault(str(example["subset"]), []).append(verdict)
        results["datasets"][name] = {subset: {"n": len(v), "accuracy": sum(v) / len(v) if v else 0.0}
                                     for subset, v in per_subset.items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out)
    return results
