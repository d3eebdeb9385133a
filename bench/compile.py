"""Compile times of the zoo: cold (fresh process, empty cache), warm in the same process, and warm in
a second fresh process that finds the cache filled. Targets (issue 2): < 2 s cold, < 100 ms warm.

    python bench/compile.py                 # every zoo cell
    python bench/compile.py --cells lstm,slstm

Each measurement runs in its own interpreter (no parser built, nothing in memory) on a fresh cache
directory. The first cell compiled cold also pays for building the Lark parser, so the heaviest
cells (sLSTM, Greff FGR) go first: their cold times are the worst case a user sees. SymPy is imported
before the clock starts and reported on its own: a cached plan holds SymPy expressions, so every
process pays that import once (a layer's process pays about a second for torch as well).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ZOO = sorted(p.stem for p in (ROOT / "cells").glob("*.cell"))
HEAVIEST_FIRST = ["slstm", "greff_fgr"]

SCRIPT = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
from celldsl.compiler import compile_cell
t0 = time.perf_counter(); import celldsl.plan  # SymPy: unpickling a plan needs it, once per process
times = {"import": [time.perf_counter() - t0]}
for name in sys.argv[1:]:
    t0 = time.perf_counter(); compile_cell(name); first = time.perf_counter() - t0
    t0 = time.perf_counter(); compile_cell(name); again = time.perf_counter() - t0
    times[name] = [first, again]
print(json.dumps(times))
"""


def run(cache: str, names: list[str]) -> dict[str, list[float]]:
    env = dict(os.environ, CELLDSL_CACHE=cache)
    done = subprocess.run([sys.executable, "-c", SCRIPT, *names], env=env, capture_output=True, text=True,
                          check=True, timeout=600)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", default=",".join(ZOO), help="comma-separated zoo cells")
    args = ap.parse_args(argv)
    names = [n for n in args.cells.split(",") if n]
    unknown = sorted(set(names) - set(ZOO))
    if unknown:
        ap.error(f"not zoo cells: {', '.join(unknown)}")
    names = [n for n in HEAVIEST_FIRST if n in names] + [n for n in names if n not in HEAVIEST_FIRST]
    with tempfile.TemporaryDirectory(prefix="celldsl-bench-") as cache:
        cold = run(cache, names)  # first: compile; second: the in-memory-free disk hit, same process
        fresh = run(cache, names)  # a new process on the filled cache
    print(f"command: `python bench/compile.py{'' if argv is None else ' ' + ' '.join(argv)}`\n")
    print("| cell | cold ms | warm ms (same process) | warm ms (new process) |")
    print("|---|---:|---:|---:|")
    for n in names:
        print(f"| {n} | {1000 * cold[n][0]:.0f} | {1000 * cold[n][1]:.1f} | {1000 * fresh[n][0]:.1f} |")
    worst_cold = max(cold[n][0] for n in names)
    worst_warm = max(max(cold[n][1], fresh[n][0]) for n in names)
    print(f"\nworst cold: {1000 * worst_cold:.0f} ms (target < 2000); "
          f"worst warm: {1000 * worst_warm:.1f} ms (target < 100)")
    print(f"once per process, before any of these: importing the plan module (SymPy) "
          f"{1000 * fresh['import'][0]:.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
