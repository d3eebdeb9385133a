"""A layer's training call (forward + backward of out.sum()) three ways, side by side: torch.nn's
layer, celldsl's prepared training sequences (targets/c/fused.PreparedTrainSequence, the default for
small calls), and celldsl's full path on the same module (the op's loop: `_sequenced` switched off).
One thread, process time, the three interleaved, medians of --repeats rounds.

    python bench/prepared_training.py [--repeats 5] [--calls 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import celldsl
from celldsl.nn import stack

# (T, N, I, H, bidirectional): the sizes docs/benchmarks.md reports
SIZES = [(10, 8, 64, 64, False), (100, 1, 32, 32, False), (20, 16, 256, 256, False),
         (10, 16, 512, 512, False), (40, 32, 64, 64, False), (5, 32, 128, 128, True)]


def per_call(step, module, calls: int) -> float:
    """Process time of one call, in microseconds."""
    start = time.process_time()
    for _ in range(calls):
        step(module)
    return (time.process_time() - start) / calls * 1e6


def row(T, N, I, H, bidirectional, repeats, calls):
    torch.manual_seed(0)
    ref = torch.nn.LSTM(I, H, bidirectional=bidirectional)
    ours = celldsl.LSTM(I, H, bidirectional=bidirectional)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(T, N, I, requires_grad=True)
    prepared = stack.RecurrentStack._sequenced

    def call(m):
        m(x)[0].sum().backward()

    def full(m):
        stack.RecurrentStack._sequenced = lambda self, input, given: None
        try:
            call(m)
        finally:
            stack.RecurrentStack._sequenced = prepared

    for _ in range(3):  # builds, measures the GEMMs, prepares
        call(ref), call(ours), full(ours)
    times = [(per_call(call, ref, calls), per_call(call, ours, calls), per_call(full, ours, calls))
             for _ in range(repeats)]
    nn_us, prep_us, full_us = (statistics.median(t) for t in zip(*times, strict=True))
    ratio = statistics.median(p / f for _n, p, f in times)
    size = f"T={T} N={N} I={I} H={H}" + (" bidirectional" if bidirectional else "")
    print(f"| {size} | {nn_us:.0f} | {prep_us:.0f} | {full_us:.0f} | {prep_us / nn_us:.2f} | "
          f"{full_us / nn_us:.2f} | {ratio:.2f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--calls", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"celldsl.LSTM training call (forward+backward), one thread, process time, medians of "
          f"{args.repeats} interleaved rounds of {args.calls} calls; load average {load}\n")
    print("| size | torch.nn us | prepared us | full path us | prepared / nn | full / nn | prepared / full |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for size in SIZES:
        row(*size, args.repeats, args.calls)


if __name__ == "__main__":
    main()
