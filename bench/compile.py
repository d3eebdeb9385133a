"""Compile times: the zoo (cold, recompiled, from memory) and the "bombs" of issue 8 (`--bombs`).

    python bench/compile.py                 # every zoo cell; targets: < 2 s cold, < 100 ms warm
    python bench/compile.py --cells lstm,slstm
    python bench/compile.py --bombs         # `celldsl check` < 5 s, the C kernels' build < 30 s

Zoo: one fresh interpreter compiles each cell three times. Cold is the first compile in the process:
the first cell also pays for building the Lark parser, so the heaviest cells (sLSTM, Greff FGR) go
first and their cold times are the worst a user sees. Recompiled (use_cache=False) is what any later
process pays for a cell, since nothing compiled is kept on disk (celldsl/cache.py: no pickles); from
memory is a second compile_cell in the same process. SymPy's import is timed on its own: every
process pays it once (a layer's process pays about a second for torch as well).

Bombs: each file is checked by `celldsl check` in a fresh process (wall time, start-up included),
then its C kernels are built (the first CPU forward) in another.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ZOO = sorted(p.stem for p in (ROOT / "cells").glob("*.cell"))
HEAVIEST_FIRST = ["slstm", "greff_fgr"]

SCRIPT = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
t0 = time.perf_counter(); import sympy
times = {"import": [time.perf_counter() - t0]}
from celldsl.compiler import compile_cell
for name in sys.argv[1:]:
    t0 = time.perf_counter(); compile_cell(name); first = time.perf_counter() - t0
    t0 = time.perf_counter(); compile_cell(name, use_cache=False); again = time.perf_counter() - t0
    t0 = time.perf_counter(); compile_cell(name); memory = time.perf_counter() - t0
    times[name] = [first, again, memory]
print(json.dumps(times))
"""

# ---- the bombs: files within the documented limits that once hung the compiler (tests/test_bombs.py) ----

HEADER = "input x\nstate h\nparam W, U, b\n"


def tanh_product(n: int) -> str:
    return (
        HEADER
        + "h' = tanh(W @ x + U @ h + b) * "
        + " * ".join(f"tanh(h + {k})" for k in range(1, n + 1))
        + "\n"
    )


def vector_product(n: int) -> str:
    names = [f"a{k}" for k in range(n)]
    return HEADER + f"param {', '.join(names)}\nh' = tanh(W @ x + U @ h + b) * {' * '.join(names)}\n"


def many_states(states: int = 60, factors: int = 100) -> str:
    """A state per line, each under the bound on one value, together far over the step's bound."""
    names = [f"s{j}" for j in range(states)]
    body = "".join(
        f"{s}' = {s} * " + " * ".join(f"tanh(h + {k + factors * j})" for k in range(1, factors + 1)) + "\n"
        for j, s in enumerate(names)
    )
    return (
        HEADER.replace("state h", f"state h, {', '.join(names)}\noutput h")
        + body
        + "h' = tanh(W @ x + U @ h + b)\n"
    )


# name -> (text, the error it must stop at, or None when it must compile)
BOMBS = {
    "1000 tanh factors": (tanh_product(1000), None),
    "1000 vector factors": (vector_product(1000), None),
    "2400 vector factors": (vector_product(2400), None),
    "300 vector factors": (vector_product(300), None),
    "60 states of 100 factors": (many_states(), "the limit is 6000"),
}

BUILD_SCRIPT = r"""
import sys, time, warnings, torch
warnings.simplefilter("error", RuntimeWarning)
import celldsl
from celldsl.targets.c.fused import FusedCPULoop
layer = celldsl.Recurrent(sys.argv[1], 3, 3, backend="cpu")
t0 = time.perf_counter(); loop = layer.compiled.cpu_loop; seconds = time.perf_counter() - t0
print(seconds if isinstance(loop, FusedCPULoop) else -1)
"""


def run_bombs() -> int:
    print("command: `python bench/compile.py --bombs`\n")
    print("| file | lines | `celldsl check` s (target < 5) | result | C build s (target < 30) |")
    print("|---|---:|---:|---|---:|")
    with tempfile.TemporaryDirectory(prefix="celldsl-bombs-") as folder:
        env = dict(os.environ, CELLDSL_CACHE=os.path.join(folder, "cache"))
        for name, (text, _error) in BOMBS.items():
            path = Path(folder) / f"{name.replace(' ', '_')}.cell"
            path.write_text(text)
            start = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "celldsl.cli", "check", str(path)],
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            check = time.perf_counter() - start
            result = "ok" if done.returncode == 0 else done.stderr.splitlines()[0].split(": error: ")[-1][:60]
            build = "-"
            if done.returncode == 0:
                out = subprocess.run(
                    [sys.executable, "-c", BUILD_SCRIPT, str(path)],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                build = (
                    f"{float(out.stdout.strip().splitlines()[-1]):.1f}" if out.returncode == 0 else "failed"
                )
            print(f"| {name} | {text.count(chr(10))} | {check:.2f} | {result} | {build} |")
    return 0


def run(cache: str, names: list[str]) -> dict[str, list[float]]:
    env = dict(os.environ, CELLDSL_CACHE=cache)
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, *names],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", default=",".join(ZOO), help="comma-separated zoo cells")
    ap.add_argument("--bombs", action="store_true", help="time the files of issue 8 instead of the zoo")
    args = ap.parse_args(argv)
    if args.bombs:
        return run_bombs()
    names = [n for n in args.cells.split(",") if n]
    unknown = sorted(set(names) - set(ZOO))
    if unknown:
        ap.error(f"not zoo cells: {', '.join(unknown)}")
    names = [n for n in HEAVIEST_FIRST if n in names] + [n for n in names if n not in HEAVIEST_FIRST]
    with tempfile.TemporaryDirectory(prefix="celldsl-bench-") as cache:
        times = run(cache, names)
    print(f"command: `python bench/compile.py{'' if argv is None else ' ' + ' '.join(argv)}`\n")
    print("| cell | cold ms | recompiled ms (any later process) | from memory ms |")
    print("|---|---:|---:|---:|")
    for n in names:
        print(f"| {n} | {1000 * times[n][0]:.0f} | {1000 * times[n][1]:.1f} | {1000 * times[n][2]:.2f} |")
    worst_cold = max(times[n][0] for n in names)
    worst_warm = max(times[n][1] for n in names)
    print(
        f"\nworst cold: {1000 * worst_cold:.0f} ms (target < 2000); "
        f"worst warm (recompiled): {1000 * worst_warm:.1f} ms (target < 100)"
    )
    print(f"once per process, before any of these: importing SymPy {1000 * times['import'][0]:.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
