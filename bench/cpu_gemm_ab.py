"""Two versions of the native GEMM library side by side on celldsl.LSTM: the one at a git revision
(A) against the working tree's (B), in one process.

    .venv/bin/python bench/cpu_gemm_ab.py --rev HEAD~1              # one thread, process CPU time
    .venv/bin/python bench/cpu_gemm_ab.py --rev HEAD~1 --threads 2  # two threads, wall clock

Why one process: on a shared machine the same code measured up to 1.5x apart in two processes, far
more than a change to the GEMM is worth. Here A and B are two private copies of the LSTM cell (their
own cache keys and loops), identical but for the GEMM library their loop calls; they run alternately
(the order swapped every repeat), and each row prints the medians and the median of the per-repeat
ratios B/A with its range. Both loops use the GEMM choices measured for the working tree's library
(targets/c/gemm.py's cache), so a row compares the kernels, not the choices.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import celldsl  # noqa: E402
from celldsl import cache  # noqa: E402
from celldsl.ops.function import cell_for  # noqa: E402
from celldsl.targets.c import fused as cpu_fused  # noqa: E402

# (T, N, I, H, backward): issue 9's sizes
CASES = [(100, 32, 128, 256, False), (100, 32, 128, 256, True), (100, 1, 128, 256, False),
         (100, 128, 512, 512, False)]
SMOKE = [(3, 2, 8, 16, False), (3, 2, 8, 16, True)]


def gemm_source_at(rev: str) -> str:
    """targets/c/emit_gemm.py's gemm_source() as it was at `rev`."""
    text = subprocess.run(["git", "show", f"{rev}:celldsl/targets/c/emit_gemm.py"], capture_output=True,
                          text=True, check=True, cwd=ROOT).stdout
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c_gemm_at_rev.py"
        path.write_text(text)
        spec = importlib.util.spec_from_file_location("c_gemm_at_rev", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.gemm_source()


def lstm_with(lib, tag: str, I: int, H: int):
    """A private copy of cells/lstm.cell whose CPU loop calls the GEMM library `lib`."""
    text = (ROOT / "cells" / "lstm.cell").read_text() + f"\n# bench/cpu_gemm_ab.py: {tag}\n"
    layer = celldsl.Recurrent(text, I, H)
    loop = cell_for(layer.compiled.key).loop("cpu")
    if not isinstance(loop, cpu_fused.FusedCPULoop):
        raise SystemExit("the C kernels are unavailable here")
    loop.lib = lib
    loop._natives.clear()  # the native loops hold the library they were made with
    loop._plans.clear()
    return layer


def case(libs, T, N, I, H, backward, repeats, clock) -> str:
    torch.manual_seed(0)
    a, b = (lstm_with(lib, tag, I, H) for lib, tag in zip(libs, "AB", strict=True))
    b.load_state_dict(a.state_dict())
    x, g = torch.randn(T, N, I), torch.randn(T, N, H)

    def run(layer) -> float:
        layer.zero_grad(set_to_none=True)
        start = clock()
        if backward:
            layer(x)[0].backward(g)
        else:
            with torch.no_grad():
                layer(x)
        return clock() - start

    with torch.no_grad():
        diff = float((a(x)[0] - b(x)[0]).abs().max())
    for _ in range(2):
        run(a), run(b)
    times_a, times_b, ratios = [], [], []
    for r in range(repeats):
        if r % 2:
            tb, ta = run(b), run(a)
        else:
            ta, tb = run(a), run(b)
        times_a.append(ta), times_b.append(tb), ratios.append(tb / ta)
    what = "forward+backward" if backward else "forward"
    return (f"| {T} | {N} | {I} | {H} | {what} | {statistics.median(times_a) * 1e3:.2f} | "
            f"{statistics.median(times_b) * 1e3:.2f} | {statistics.median(ratios):.3f} | "
            f"{min(ratios):.3f}-{max(ratios):.3f} | {diff:.1e} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="HEAD", help="the git revision of A's GEMM (B: the working tree's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 3 repeats: checks that it runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    lib_a, why = cpu_fused._library(gemm_source_at(args.rev), cache.root() / "cpu_gemm_ab", "cpu_gemm")
    lib_b, why_b = cpu_fused.build_gemm_library()
    if lib_a is None or lib_b is None:
        raise SystemExit(f"the GEMM library did not build: {why or why_b}")
    clock_name = "process CPU" if args.threads == 1 else "wall"
    print(f"A: the GEMM of {args.rev}; B: the working tree's; {args.threads} thread(s), {clock_name} clock, "
          f"medians of {args.repeats} alternating runs")
    print()
    print("| T | N | I | H | pass | A ms | B ms | B/A (median) | B/A range | max abs diff |")
    print("|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    repeats = 3 if args.smoke else args.repeats
    for T, N, I, H, backward in SMOKE if args.smoke else CASES:
        print(case((lib_a, lib_b), T, N, I, H, backward, repeats, clock), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
