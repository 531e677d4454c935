"""Row occupancy of the engine's continuous batching, simulated on the CPU (no model, no GPU).

The engine's scheduling policy, step for step: ``rows`` decode rows; every REFILL_INTERVAL decode steps the
finished rows are harvested and refilled in order with the next samples, a new problem admitted whenever a
prompt region is free; a sample of forced length L holds its row for L - 1 decode steps (its first token comes
from the prefill). Lengths are ``bench_rollout.forced_lengths``. Occupancy = completion tokens / (rows x decode
steps), which is continuous-batching throughput over forced-full-length throughput at equal step time.
Checked against the GPU run: 4 problems x 256 samples, 256 rows, 3 regions gives 1,616 decode steps and
244,901 tokens, as measured (benchmarks/results/NVIDIA-H200-2026-12-02.json, continuous_batching).

    python benchmarks/simulate_continuous.py [--problems 4,300] [--regions 3,6]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_rollout import forced_lengths  # noqa: E402
from nbhelpers.rollout.engine import REFILL_INTERVAL  # noqa: E402


def simulate(problems: int, rows: int = 256, n: int = 256, regions: int = 3, tokens: int = 768) -> dict:
    queue, pending, free_regions = deque(range(problems)), deque(), regions
    busy: list = [None] * rows  # per row: (problem, decode step at which it is finished)
    remaining, lengths, steps, made = {}, {}, 0, 0
    while True:
        for r, slot in enumerate(busy):  # harvest
            if slot is not None and slot[1] <= steps:
                remaining[slot[0]] -= 1
                free_regions += remaining[slot[0]] == 0
                busy[r] = None
        for r in range(rows):  # refill
            if busy[r] is not None:
                continue
            while pending and pending[0][1] >= n:
                pending.popleft()
            if not pending and queue and free_regions:
                p = queue.popleft()
                free_regions -= 1
                lengths[p], remaining[p] = forced_lengths(p, n, tokens), n
                pending.append([p, 0])
            if not pending:
                break
            p, s = pending[0]
            pending[0][1] += 1
            made += lengths[p][s]
            busy[r] = (p, steps + lengths[p][s] - 1)
        if all(slot is None for slot in busy) and not queue and not pending:
            break
        steps += REFILL_INTERVAL
    return {"problems": problems, "rows": rows, "n": n, "regions": regions, "decode_steps": steps,
            "completion_tokens": made, "occupancy": made / (rows * steps)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", default="4,300")
    parser.add_argument("--regions", default="3,6")
    args = parser.parse_args()
    for problems in (int(v) for v in args.problems.split(",")):
        for regions in (int(v) for v in args.regions.split(",")):
            print(json.dumps(simulate(problems, regions=regions)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
