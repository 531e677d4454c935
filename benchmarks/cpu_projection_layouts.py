"""The CPU decode step's projections in two layouts: ``F.linear(x, W, b)`` against ``(W @ x.T).T + b``.

The 17 projections of one ``tiny-pretrained`` decode step (4 layers of fused q/k/v, o, fused gate/up and down,
plus the LM head), each with its own weight so the weights stream from memory as in a real step. Prints the
milliseconds per step of each layout and their ratio (above 1: the transposed layout is faster) for 1 to 64
rows, with 2 threads and with 1. Results: ``results/cpu-smoke-step-2026-12-03.txt``.

    python benchmarks/cpu_projection_layouts.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

SHAPES = [(512, 256), (256, 256), (1536, 256), (256, 768)] * 4 + [(1330, 256)]  # (out, in) per projection
ROWS = (1, 2, 4, 8, 16, 32, 64)
REPEATS = 100


def ms_per_step(step) -> float:
    for _ in range(10):
        step()
    start = time.perf_counter()
    for _ in range(REPEATS):
        step()
    return (time.perf_counter() - start) / REPEATS * 1e3


def main() -> None:
    torch.manual_seed(0)
    weights = [(torch.randn(o, i), torch.randn(o)) for o, i in SHAPES]
    cpu = next(line for line in open("/proc/cpuinfo").read().splitlines() if line.startswith("model name"))
    for threads in (2, 1):
        torch.set_num_threads(threads)
        print(f"{cpu.split(':', 1)[1].strip()} | threads {threads} | torch {torch.__version__}")
        for rows in ROWS:
            inputs = {256: torch.randn(rows, 256), 768: torch.randn(rows, 768)}
            linear = ms_per_step(lambda: [F.linear(inputs[w.shape[1]], w, b) for w, b in weights])
            transposed = ms_per_step(lambda: [torch.addmm(b[:, None], w, inputs[w.shape[1]].t()).t().contiguous()
                                              for w, b in weights])
            print(f"rows {rows:3d}  linear {linear:.2f} ms  transposed {transposed:.2f} ms  ratio {linear / transposed:.2f}")


if __name__ == "__main__":
    main()
