"""Can the tiny Qwen2.5-VL learn to read the generator's labels? A CPU-sized probe of one question: the model
of ``tools/pretrain_tiny.py`` (same architecture, from scratch) is trained only to transcribe each chart's table
(the ``<table>...</table>`` line of the Chart-RVR completion) after a one-line prompt, and every EVAL_EVERY steps
``tools/image_reliance.py``'s per-segment loss is measured on held-out test charts with their own images and with
each image swapped for another's. Reading shows as the table-digit and table-word losses falling below their
swapped values; a model that guesses from the language has equal losses.

    python benchmarks/sandbox/v2-attempts/reading_probe.py --tokenizer DIR --minutes 50 [--threads 1] [--out F]

DIR holds the ``tokenizer.json`` of ``pretrain_tiny.py tokenizer --out DIR`` for the generator being probed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tools")]

SEED, BATCH_SIZE, LEARNING_RATE, WARMUP_STEPS, WEIGHT_DECAY = 0, 16, 1e-3, 50, 0.1
EVAL_EVERY, EVAL_PROBLEMS, EVAL_SEED = 100, 32, 78
PROMPT = "Transcribe the chart's table."


def encode(processor, example: dict) -> dict:
    """One-line prompt with the image; the table line of the reference completion as the labelled target."""
    import torch

    from nbhelpers.data import perfect_completion

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = processor(text=[text], images=[example["image"]], return_tensors="pt")
    table = next(line for line in perfect_completion(example).splitlines() if line.startswith("<table>"))
    target = processor.tokenizer(table + "<|im_end|>", add_special_tokens=False, return_tensors="pt").input_ids[0]
    return {"input_ids": torch.cat([prompt.input_ids[0], target]),
            "labels": torch.cat([torch.full_like(prompt.input_ids[0], -100), target]),
            "mm_token_type_ids": torch.cat([prompt.mm_token_type_ids[0], torch.zeros_like(target)]),
            "pixel_values": prompt.pixel_values, "image_grid_thw": prompt.image_grid_thw}


def reliance(model, processor, rows: list[dict]) -> dict[str, tuple[float, float]]:
    """Per segment: (loss with the true images, loss with the images rotated by one), nats per token."""
    import torch

    from image_reliance import segment_losses
    from pretrain_tiny import collate

    model.eval()
    batch = collate(rows, processor.tokenizer.pad_token_id)
    true = segment_losses(model, processor.tokenizer, batch)
    batch["pixel_values"] = torch.cat([r["pixel_values"] for r in rows[1:] + rows[:1]])
    swapped = segment_losses(model, processor.tokenizer, batch)
    model.train()
    return {name: (round(true[name], 4), round(swapped[name], 4)) for name in true}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", type=Path, required=True, help="folder with the probed tokenizer.json")
    parser.add_argument("--minutes", type=float, default=30.0, help="training time budget")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--size", type=int, default=224, help="chart side in px")
    parser.add_argument("--out", type=Path, default=None, help="write the evaluations here as JSON")
    args = parser.parse_args(argv)

    import torch

    from nbhelpers.models import TOKENIZER_FILE, processor_from_tokenizer_file
    from nbhelpers.synthetic import make_synthetic_examples
    from pretrain_tiny import build_model, collate

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    processor = processor_from_tokenizer_file(args.tokenizer / TOKENIZER_FILE, args.size * args.size)
    model = build_model(processor)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY, betas=(0.9, 0.95))
    held_out = [encode(processor, e) for e in make_synthetic_examples(EVAL_PROBLEMS, seed=EVAL_SEED, split="test",
                                                                       image_size=(args.size, args.size))]
    history, started, step = [], time.monotonic(), 0
    while time.monotonic() - started < args.minutes * 60:
        if step % EVAL_EVERY == 0:
            history.append({"step": step, "examples": step * BATCH_SIZE,
                            "minutes": round((time.monotonic() - started) / 60, 2),
                            "segments": reliance(model, processor, held_out)})
            print(json.dumps(history[-1]), flush=True)
        examples = make_synthetic_examples(BATCH_SIZE, seed=SEED, split="pretrain", start=step * BATCH_SIZE,
                                           image_size=(args.size, args.size))
        batch = collate([encode(processor, e) for e in examples], processor.tokenizer.pad_token_id)
        for group in optimizer.param_groups:
            group["lr"] = LEARNING_RATE * min(1.0, (step + 1) / WARMUP_STEPS)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % 20 == 0:
            print(f"step {step}  loss {loss.item():.4f}  {(time.monotonic() - started) / 60:.1f} min", flush=True)
    history.append({"step": step, "examples": step * BATCH_SIZE, "minutes": round((time.monotonic() - started) / 60, 2),
                    "segments": reliance(model, processor, held_out)})
    print(json.dumps(history[-1]), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps({"batch_size": BATCH_SIZE, "learning_rate": LEARNING_RATE,
                                        "evaluations": history}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
