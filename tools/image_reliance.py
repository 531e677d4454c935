"""Does a small chart model read the image? Per-segment loss of the reference completions with the true images
against the same completions with each image swapped for another problem's.

    python tools/image_reliance.py MODEL_DIR [--problems 32] [--seed 78] [--size 112]

Prints the mean negative log-likelihood (nats per token) of each segment of the Chart-RVR completion: the
chart type, the table's words (category names), the table's digits (the values), the reasoning steps and the
answer. A segment whose loss does not rise when the images are swapped is not read from the image: the
model guesses it from the question and the language alone. The problems are the generator's ``test`` split of
``--seed`` (the default is used by no training or evaluation default); MODEL_DIR needs its ``tokenizer.json``.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def segment_of(text_before: str, piece: str) -> str:
    """The completion segment a token belongs to, from the text generated before it."""
    def inside(tag: str) -> bool:
        return f"<{tag}>" in text_before and f"</{tag}>" not in text_before

    if inside("type"):
        return "type"
    if inside("table"):
        return "table digits" if piece.strip().isdigit() else "table words" if piece.strip().isalpha() else "table other"
    if "<answer>" in text_before:
        return "answer"
    if "<step" in text_before:
        return "step digits" if piece.strip().isdigit() else "step other"
    return "other"


def segment_losses(model, tokenizer, batch: dict) -> dict[str, float]:
    """Mean NLL (nats per token) of each segment over the batch's completion tokens."""
    import torch

    with torch.no_grad():
        logits = model(**batch).logits[:, :-1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    labels = batch["labels"][:, 1:]
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for row in range(labels.shape[0]):
        text = ""
        for position in (labels[row] != -100).nonzero().flatten().tolist():
            token = int(labels[row, position])
            piece = tokenizer.decode([token])
            total = sums[segment_of(text, piece)]
            total[0] -= float(logprobs[row, position, token])
            total[1] += 1
            text += piece
    return {name: value / count for name, (value, count) in sorted(sums.items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="model folder (weights, config.json, tokenizer.json)")
    parser.add_argument("--problems", type=int, default=32)
    parser.add_argument("--seed", type=int, default=78, help="test-split seed of the problems")
    parser.add_argument("--size", type=int, default=112, help="image side in px (the generator's default)")
    args = parser.parse_args(argv)

    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from nbhelpers.models import TOKENIZER_FILE, processor_from_tokenizer_file
    from nbhelpers.synthetic import make_synthetic_examples
    from pretrain_tiny import collate, encode_example

    processor = processor_from_tokenizer_file(args.model / TOKENIZER_FILE, args.size * args.size)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(args.model), dtype=torch.float32).eval()
    examples = make_synthetic_examples(args.problems, seed=args.seed, split="test", image_size=(args.size, args.size))
    rows = [encode_example(processor, e) for e in examples]
    batch = collate(rows, processor.tokenizer.pad_token_id)
    true = segment_losses(model, processor.tokenizer, batch)
    swapped_rows = rows[1:] + rows[:1]
    batch["pixel_values"] = torch.cat([r["pixel_values"] for r in swapped_rows])
    swapped = segment_losses(model, processor.tokenizer, batch)
    print(f"{'segment':<14}{'true images':>12}{'swapped':>10}   (nats per token, {args.problems} problems)")
    for name in true:
        print(f"{name:<14}{true[name]:>12.3f}{swapped[name]:>10.3f}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT / "tools"))
    sys.exit(main())
