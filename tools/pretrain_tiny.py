"""Pretrain ``tiny-pretrained``: a small Qwen2.5-VL taught, supervised, to answer synthetic chart questions
in the Chart-RVR format, so that the offline default has real rewards and Pass@k curves.

Two stages, each a command (run from the repository root):

    python tools/pretrain_tiny.py tokenizer              # byte-level BPE -> nbhelpers/assets/tiny-pretrained/
    python tools/pretrain_tiny.py train --out DIR        # weights + pretrain.json into DIR (a GPU: minutes)

then copy DIR's files into ``nbhelpers/assets/tiny-pretrained/``. Training data is an endless stream of
fresh charts from the generator's ``pretrain`` split (never used by RL training, ``train``, or evaluation,
``test``), drawn by DataLoader workers while the GPU trains; the reference completion of each chart is
``nbhelpers.data.perfect_completion``. Every ``EVAL_EVERY`` steps the model samples at the default Pass@k
temperature on held-out ``test`` problems of ``EVAL_SEED``; training ends with its learning-rate decay
(started at ``--stable-steps``, or by the clock), or once Pass@1 reaches ``STOP_AT_PASS1`` (a model RL can
still improve, not a saturated one). ``--stable-steps`` with the recorded value regenerates a run.
Everything that made the shipped weights (seed, steps, examples seen, GPU time, evaluations) is written to
``pretrain.json`` beside them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

# --------------------------------------------------------------------------- hyperparameters
SEED = 0                      # model init and the pretrain split's generator seed
VOCAB_SIZE = 2048             # byte-level BPE; Qwen's special tokens first
TOKENIZER_PROBLEMS = 20_000   # synthetic problems (pretrain split, seed TOKENIZER_SEED) the BPE is trained on
TOKENIZER_SEED = 1
LAYERS, HIDDEN, INTERMEDIATE, HEADS, KV_HEADS = 4, 256, 768, 4, 2   # language model
VISION_DEPTH, VISION_HIDDEN, VISION_HEADS = 4, 192, 3              # vision tower
IMAGE_SIZE = (112, 112)       # px, the generator's default; 16 image tokens after the 2x2 merge
BATCH_SIZE = 128              # examples per step
REUSE = 2                     # each drawn chart enters REUSE batches (drawing, not the GPU, is the bottleneck)
LEARNING_RATE = 1e-3          # AdamW peak: linear warm-up, constant until STABLE_STEPS, then linear decay
WARMUP_STEPS = 200            # to LR_FLOOR x peak over DECAY_FRACTION x STABLE_STEPS more steps
DECAY_FRACTION = 0.25
LR_FLOOR = 0.05
WEIGHT_DECAY = 0.1
GRAD_CLIP = 1.0
STABLE_STEPS = None           # None: chosen by the clock, when MINUTES x STABLE_SHARE have passed
MINUTES = 2.3                 # wall-clock budget of the training loop (the GPU call's limit is 10 min)
STABLE_SHARE = 0.78
EVAL_EVERY = 500              # steps
EVAL_SEED = 900_001           # test-split seed of the held-out problems (no RL or test default uses it)
EVAL_PROBLEMS = 192
EVAL_SAMPLES = 4              # per problem, for Pass@1 during training
FINAL_PROBLEMS = 300
FINAL_SAMPLES = 64            # Pass@1 .. Pass@64 of the shipped model
TEMPERATURE, TOP_P = 0.6, 0.95  # RunConfig's sample_temperature and sample_top_p defaults
MAX_NEW_TOKENS = 192          # reference completions are 100-145 tokens
STOP_AT_PASS1 = 0.45
WORKERS = max(1, min(14, (os.cpu_count() or 2) - 2))
ASSET = REPO_ROOT / "nbhelpers" / "assets" / "tiny-pretrained"


# --------------------------------------------------------------------------- tokenizer
def prompt_text(tokenizer, question: str) -> str:
    from nbhelpers.data import build_messages

    return tokenizer.apply_chat_template(build_messages(question), add_generation_prompt=True, tokenize=False)


def train_tokenizer(out: Path) -> None:
    """Byte-level BPE over prompts and reference completions of synthetic problems; writes tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from nbhelpers.data import perfect_completion
    from nbhelpers.models import CHAT_TEMPLATE, QWEN_SPECIAL_TOKENS, build_offline_processor
    from nbhelpers.synthetic import make_synthetic_examples

    byte_tokenizer = build_offline_processor(IMAGE_SIZE[0] * IMAGE_SIZE[1]).tokenizer  # renders the template
    assert byte_tokenizer.chat_template == CHAT_TEMPLATE
    examples = make_synthetic_examples(TOKENIZER_PROBLEMS, seed=TOKENIZER_SEED, split="pretrain", draw=False)
    texts = [prompt_text(byte_tokenizer, e["question"]) + perfect_completion(e) + "<|im_end|>" for e in examples]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(QWEN_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    lengths = [len(tokenizer.encode(t).ids) for t in texts[:1000]]
    print(f"tokenizer: {tokenizer.get_vocab_size()} tokens -> {out / 'tokenizer.json'}; "
          f"mean {sum(lengths) / len(lengths):.0f} tokens per prompt + completion (bytes: "
          f"{sum(len(t.encode()) for t in texts[:1000]) / 1000:.0f})")


# --------------------------------------------------------------------------- data
def encode_example(processor, example: dict) -> dict:
    """Prompt (with image) and reference completion tokenised apart, as TRL does; labels on the completion."""
    import torch

    from nbhelpers.data import perfect_completion

    prompt = processor(text=[prompt_text(processor.tokenizer, example["question"])], images=[example["image"]],
                       return_tensors="pt")
    completion = processor.tokenizer(perfect_completion(example) + "<|im_end|>", add_special_tokens=False,
                                     return_tensors="pt").input_ids[0]
    ids = torch.cat([prompt.input_ids[0], completion])
    labels = torch.cat([torch.full_like(prompt.input_ids[0], -100), completion])
    # mm_token_type_ids marks the image tokens: without it transformers falls back to 1-D positions,
    # and a model trained so would meet M-RoPE positions at generation (as TRL passes them).
    token_types = torch.cat([prompt.mm_token_type_ids[0], torch.zeros_like(completion)])
    return {"input_ids": ids, "labels": labels, "mm_token_type_ids": token_types,
            "pixel_values": prompt.pixel_values, "image_grid_thw": prompt.image_grid_thw}


def training_stream(processor, block: int = 32):
    """Endless examples of the pretrain split: worker w of W draws blocks w, w + W, ... of ``block`` indices;
    each example is yielded once when drawn and REUSE - 1 more times later, from a shuffled buffer."""
    import random

    import torch

    from nbhelpers.synthetic import make_synthetic_examples

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            worker, workers = (info.id, info.num_workers) if info else (0, 1)
            rng, buffer = random.Random(f"{SEED}:{worker}"), []
            for first in range(worker * block, 2**62, workers * block):
                for example in make_synthetic_examples(block, seed=SEED, image_size=IMAGE_SIZE, split="pretrain",
                                                       start=first):
                    encoded = encode_example(processor, example)
                    yield encoded
                    buffer += [encoded] * (REUSE - 1)
                    if len(buffer) >= 8 * block:
                        yield buffer.pop(rng.randrange(len(buffer)))

    return Stream()


def collate(rows: list[dict], pad_id: int) -> dict:
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    token_types = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = r["input_ids"], r["labels"], 1
        token_types[i, :n] = r["mm_token_type_ids"]
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "mm_token_type_ids": token_types,
            "pixel_values": torch.cat([r["pixel_values"] for r in rows]),
            "image_grid_thw": torch.cat([r["image_grid_thw"] for r in rows])}


# --------------------------------------------------------------------------- evaluation
def sample_problems(model, processor, problems: list[dict], samples: int, seed: int, rows_per_batch: int = 2048):
    """``samples`` completions per problem at TEMPERATURE / TOP_P (HF generate) -> texts per problem.

    Problems are batched only with prompts of their own token length, so no row is padded."""
    import torch

    tokenizer = processor.tokenizer
    prompts = [prompt_text(tokenizer, p["question"]) for p in problems]
    by_length: dict[int, list[int]] = {}
    for i, text in enumerate(prompts):
        by_length.setdefault(len(tokenizer(text).input_ids), []).append(i)
    texts: list[list[str]] = [[] for _ in problems]
    per_batch = max(1, rows_per_batch // samples)
    torch.manual_seed(seed)
    for group in by_length.values():
        for start in range(0, len(group), per_batch):
            chunk = group[start:start + per_batch]
            inputs = processor(text=[prompts[i] for i in chunk for _ in range(samples)],
                               images=[problems[i]["image"] for i in chunk for _ in range(samples)],
                               return_tensors="pt").to(model.device)
            with torch.no_grad(), torch.autocast(model.device.type, torch.bfloat16,
                                                 enabled=model.device.type == "cuda"):
                out = model.generate(**inputs, do_sample=True, temperature=TEMPERATURE, top_p=TOP_P, top_k=0,
                                     max_new_tokens=MAX_NEW_TOKENS, pad_token_id=tokenizer.pad_token_id)
            decoded = tokenizer.batch_decode(out[:, inputs.input_ids.shape[1]:], skip_special_tokens=True)
            for j, i in enumerate(chunk):
                texts[i] = decoded[j * samples:(j + 1) * samples]
    return texts


def evaluate(model, processor, problems: list[dict], samples: int, ks: tuple[int, ...],
             samples_file: Path | None = None) -> dict:
    """Pass@k (unbiased estimator), mean format reward and mean completion tokens over ``problems``;
    ``samples_file``: also write the completions there as a samples file (JSON Lines, nbhelpers' format)."""
    from nbhelpers.passk import pass_at_k
    from nbhelpers.rewards import accuracy_score, format_score

    was_training = model.training
    model.eval()
    texts = sample_problems(model, processor, problems, samples, seed=EVAL_SEED)
    model.train(was_training)
    correct_bits = [[accuracy_score(t, p["answer"]) > 0 for t in row] for p, row in zip(problems, texts)]
    correct = [sum(bits) for bits in correct_bits]
    if samples_file is not None:
        samples_file.parent.mkdir(parents=True, exist_ok=True)
        with open(samples_file, "w") as handle:
            for p, row, bits in zip(problems, texts, correct_bits):
                handle.write(json.dumps({"id": p["id"], "dataset": p["dataset"], "question": p["question"],
                                         "answer": p["answer"], "completions": row, "correct": bits,
                                         "meta": {"temperature": TEMPERATURE, "top_p": TOP_P,
                                                  "max_new_tokens": MAX_NEW_TOKENS}}) + "\n")
    flat = [t for row in texts for t in row]
    return {"problems": len(problems), "samples": samples,
            "pass_at_k": {str(k): sum(pass_at_k(samples, c, k) for c in correct) / len(problems) for k in ks},
            "format_reward": sum(format_score(t) for t in flat) / len(flat),
            "mean_completion_tokens": sum(len(processor.tokenizer(t).input_ids) for t in flat) / len(flat)}


# --------------------------------------------------------------------------- training
def build_model(processor):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from nbhelpers.models import small_vl_config, special_token_ids

    cfg = small_vl_config(special_token_ids(processor.tokenizer), len(processor.tokenizer), layers=LAYERS,
                          hidden=HIDDEN, intermediate=INTERMEDIATE, heads=HEADS, kv_heads=KV_HEADS,
                          vision_depth=VISION_DEPTH, vision_hidden=VISION_HIDDEN, vision_heads=VISION_HEADS)
    cfg._attn_implementation = "sdpa"
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    model.config.chartrl_base_model = "tiny-pretrained"  # fine-tuned copies find this processor
    return model


def learning_rate(step: int, stable_steps: int | None) -> float:
    """Warm-up, constant, then linear decay over DECAY_FRACTION x stable_steps (None: not decaying yet)."""
    if step < WARMUP_STEPS:
        return LEARNING_RATE * (step + 1) / WARMUP_STEPS
    if stable_steps is None or step < stable_steps:
        return LEARNING_RATE
    progress = min(1.0, (step - stable_steps) / max(1, round(DECAY_FRACTION * stable_steps)))
    return LEARNING_RATE * (1 - (1 - LR_FLOOR) * progress)


def train(out: Path, minutes: float, stable_steps: int | None, init_from: Path | None = None,
          samples_file: Path | None = None) -> None:
    import torch

    import transformers
    from nbhelpers.models import TOKENIZER_FILE, processor_from_tokenizer_file
    from nbhelpers.synthetic import make_synthetic_examples

    torch.manual_seed(SEED)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    processor = processor_from_tokenizer_file(ASSET / TOKENIZER_FILE, IMAGE_SIZE[0] * IMAGE_SIZE[1])
    if init_from is None:
        model = build_model(processor).to(device)
    else:  # continue from saved weights (fresh optimizer and schedule)
        from transformers import Qwen2_5_VLForConditionalGeneration

        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(init_from), dtype=torch.float32).to(device)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.2f} M parameters on {device}; vocab {len(processor.tokenizer)}", flush=True)
    loader = torch.utils.data.DataLoader(training_stream(processor), batch_size=BATCH_SIZE, num_workers=WORKERS,
                                         collate_fn=lambda rows: collate(rows, processor.tokenizer.pad_token_id),
                                         persistent_workers=WORKERS > 0, prefetch_factor=4 if WORKERS else None)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=LEARNING_RATE, betas=(0.9, 0.95),
                                  fused=device.type == "cuda")
    held_out = make_synthetic_examples(FINAL_PROBLEMS, seed=EVAL_SEED, split="test", image_size=IMAGE_SIZE)
    history, started, step, loss_sum, tokens, skipped = [], time.monotonic(), 0, 0.0, 0, 0
    stop_reason = "end of the learning-rate decay"
    model.train()
    for batch in loader:
        if stable_steps is None and time.monotonic() - started > minutes * 60 * STABLE_SHARE:
            stable_steps = step
            print(f"step {step}: learning-rate decay starts (by the clock)", flush=True)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, stable_steps)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(**batch).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        if torch.isfinite(loss) and torch.isfinite(norm):
            optimizer.step()
        else:  # a non-finite batch is skipped; a diverging run is stopped, not saved
            skipped += 1
            print(f"step {step}: non-finite loss or gradient, update skipped ({skipped} so far)", flush=True)
            if skipped > 20:
                raise RuntimeError("more than 20 non-finite steps; lower LEARNING_RATE")
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_sum += loss.item() if torch.isfinite(loss) else 0.0
        tokens += int((batch["labels"] != -100).sum())
        elapsed = time.monotonic() - started
        if step % 50 == 0:
            print(f"step {step:5d}  loss {loss_sum / 50:.4f}  lr {learning_rate(step, stable_steps):.2e}  "
                  f"{elapsed / 60:.1f} min  {step * BATCH_SIZE / elapsed:.0f} examples/s", flush=True)
            loss_sum = 0.0
        done = stable_steps is not None and step >= stable_steps + round(DECAY_FRACTION * stable_steps)
        if step % EVAL_EVERY == 0 or done:
            result = evaluate(model, processor, held_out[:EVAL_PROBLEMS], EVAL_SAMPLES, (1,))
            history.append({"step": step, "minutes": round(elapsed / 60, 2), **result})
            print(f"eval step {step}: pass@1 {result['pass_at_k']['1']:.3f}  format {result['format_reward']:.2f}  "
                  f"tokens {result['mean_completion_tokens']:.0f}", flush=True)
            if result["pass_at_k"]["1"] >= STOP_AT_PASS1:
                stop_reason = f"pass@1 {result['pass_at_k']['1']:.3f} >= {STOP_AT_PASS1}"
                break
        if done:
            break
    train_seconds = time.monotonic() - started
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float32).save_pretrained(str(out), max_shard_size="14MB")  # saved before the long evaluation
    ks = tuple(2 ** i for i in range(int(math.log2(FINAL_SAMPLES)) + 1))
    final = evaluate(model, processor, held_out, FINAL_SAMPLES, ks, samples_file=samples_file)
    print(f"final ({FINAL_PROBLEMS} problems x {FINAL_SAMPLES}): "
          + "  ".join(f"pass@{k} {v:.3f}" for k, v in final["pass_at_k"].items())
          + f"  format {final['format_reward']:.2f}", flush=True)
    hyper = {k: v for k, v in globals().items() if k.isupper() and isinstance(v, (int, float, str, tuple))}
    init = None if init_from is None else json.loads((init_from / "pretrain.json").read_text())
    record = {"command": " ".join(["python", "tools/pretrain_tiny.py", *sys.argv[1:]]), "minutes": minutes,
              "init_from": init, "hyperparameters": hyper, "stable_steps": stable_steps, "skipped_steps": skipped, "parameters": params, "steps": step,
              "examples_seen": step * BATCH_SIZE,
              "completion_tokens_seen": tokens, "stop_reason": stop_reason, "train_seconds": round(train_seconds, 1),
              "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__},
              "date": time.strftime("%Y-%m-%d"), "evaluations": history, "final": final}
    (out / "pretrain.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(f"saved to {out} after {step} steps ({train_seconds / 60:.1f} min)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True)
    tok = sub.add_parser("tokenizer", help="train the BPE tokenizer")
    tok.add_argument("--out", type=Path, default=ASSET)
    run = sub.add_parser("train", help="pretrain the model (GPU)")
    run.add_argument("--out", type=Path, required=True, help="folder for the weights and pretrain.json")
    run.add_argument("--minutes", type=float, default=MINUTES, help="time budget of the training loop")
    run.add_argument("--stable-steps", type=int, default=STABLE_STEPS,
                     help="steps before the decay (regenerates a recorded run; default: chosen by the clock)")
    run.add_argument("--init-from", type=Path, default=None,
                     help="start from these weights (a folder with pretrain.json), not from random ones")
    run.add_argument("--samples", type=Path, default=None,
                     help="also write the final evaluation's completions to this samples file (JSON Lines)")
    run.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                     help="override a hyperparameter at the top of this file, e.g. --set BATCH_SIZE=16")
    args = parser.parse_args(argv)
    if args.stage == "tokenizer":
        train_tokenizer(args.out)
        return 0
    for item in args.set:
        name, _, value = item.partition("=")
        if not name.isupper() or name not in globals():
            parser.error(f"--set {item}: no hyperparameter named {name!r}")
        globals()[name] = type(globals()[name])(value) if globals()[name] is not None else int(value)
    train(args.out, args.minutes, args.stable_steps, args.init_from, args.samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
