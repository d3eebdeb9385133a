"""The cold first call of a new cell on the CPU (issue 27 item 7): fresh process, empty cache.

Each row runs a child process per run with its own empty CELLDSL_CACHE, one thread, and times (wall
clock) `compile_cell` + the layer's construction ("compile"), then the layer's first forward and
backward on CPU tensors ("first call": the quick C build of the cell's kernels or matrix loop, the
GEMM choices measured for the call's shapes, the call; the final libraries build in the background
and are not waited for). Every zoo cell: cells/*.cell and cells/matrix/*.cell, with a size for every
width a cell declares; a cell the cpu backend refuses gets a row saying why. Two settings:

    empty   the cache is empty: the GEMM library (once per machine and compiler) is built too
    gemm    the cache holds only the GEMM library and its measurements, made beforehand by another
            process (what a researcher editing a cell meets: the library is built once)

Run from the repository root (the machine is shared: take the median of several runs):

    .venv/bin/python bench/cold_build.py --runs 1                 # every zoo cell, both settings (~8 min)
    .venv/bin/python bench/cold_build.py --cells ln_lstm,mlstm,lstm --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_SECONDS = 3.0

CHILD = r"""
import json, os, sys, time
import torch
torch.set_num_threads(1)
import celldsl
from celldsl.compiler import CompiledMatrixCell, compile_cell
stem, I, H, N, T = sys.argv[1], 16, 16, 2, 5
SIZES = {"heads": 2, "T_max": 100}  # and 8 for any other width a cell declares
t0 = time.perf_counter()
compiled = compile_cell(stem)
ir = compiled.ir
extra = {}
if isinstance(compiled, CompiledMatrixCell) and not ir.heads:  # shaped parameters: one head, H wide
    declared = [w for w in [*ir.widths, *ir.init_sizes] if w not in ("H", "heads")]
    layer = celldsl.Recurrent(compiled, I, H, backend="cpu", sizes={w: SIZES.get(w, 8) for w in declared})
elif isinstance(compiled, CompiledMatrixCell):
    needed = ["heads", *ir.widths, *ir.init_sizes]
    try:
        layer = celldsl.MatrixRecurrent(compiled, I, {w: SIZES.get(w, 8) for w in needed}, backend="cpu")
    except celldsl.CellError as err:  # an operation the C loop lacks: torch runs it (backend="auto")
        print(json.dumps({"refused": str(err).splitlines()[0].split("error: ")[-1]}), flush=True)
        os._exit(0)
else:
    declared = {*ir.widths.values(), *getattr(ir, "init_sizes", ())} - {"H", "row", *ir.inputs}
    inputs = {n: 1 if ir.width(n) == "row" else 4 for n in ir.inputs[1:]}
    layer = celldsl.Recurrent(compiled, I, H, backend="cpu", sizes={w: SIZES.get(w, 8) for w in declared},
                              input_sizes=inputs)
    extra = {n: torch.rand(T, N, size) * 10 for n, size in inputs.items()}  # time stamps and the like
t1 = time.perf_counter()
x = torch.randn(T, N, I)
out = layer(x, **extra)[0]
out.sum().backward()
t2 = time.perf_counter()
print(json.dumps({"compile": t1 - t0, "first": t2 - t1}), flush=True)
os._exit(0)  # not waiting for the background builds: the parent ends them (child())
"""


def zoo_cells() -> list[str]:
    """Every zoo cell: cells/*.cell, then cells/matrix/*.cell (the names celldsl list prints)."""
    cells = sorted(p.stem for p in (ROOT / "cells").glob("*.cell"))
    return cells + sorted(p.stem for p in (ROOT / "cells" / "matrix").glob("*.cell") if p.stem not in cells)


def child(stem: str, cache: Path) -> dict:
    """One fresh process's timings. The child leaves at once after its first call; the C compilers
    its background builds started are then ended with its process group, so that they do not load the
    machine while the next row is measured (they did: gcc outlives its parent)."""
    env = dict(os.environ, CELLDSL_CACHE=str(cache), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, stem], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the child's own group: the compilers it left running
        except ProcessLookupError:
            pass
    if proc.returncode != 0:
        raise SystemExit(f"{stem}: the child failed:\n{stderr[-2000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def gemm_only_cache(folder: Path) -> Path:
    """A cache holding only the GEMM library and its measurements, built by another process."""
    cache = folder / "gemm-only"
    env = dict(os.environ, CELLDSL_CACHE=str(cache), CELLDSL_BACKGROUND_BUILD="0", OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", CHILD, "rnn_tanh"], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    for entry in cache.iterdir():
        if entry.is_dir() and entry.name != "cpu_gemm":
            shutil.rmtree(entry)
    return cache


def run(stem: str, setting: str, runs: int, template: Path | None) -> tuple[float, float] | str:
    """Medians of (compile, first call) seconds over `runs` fresh processes and caches, or why the cpu
    backend refuses the cell."""
    compile_s, first_s = [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="celldsl-cold-") as tmp:
            cache = Path(tmp) / "cache"
            if setting == "gemm":
                shutil.copytree(template, cache, symlinks=False)
                os.chmod(cache, 0o700)
            result = child(stem, cache)
            if "refused" in result:
                return result["refused"]
            compile_s.append(result["compile"])
            first_s.append(result["first"])
    return statistics.median(compile_s), statistics.median(first_s)


def cpu_family() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = {}
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
        return f"{info.get('model name', '?')} (cpu family {info.get('cpu family', '?')})"
    except OSError:
        return "?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", default="",
                    help="comma-separated zoo cells (default: every zoo cell, matrix-memory cells included)")
    ap.add_argument("--runs", type=int, default=3, help="fresh processes per row (the median is reported)")
    ap.add_argument("--settings", default="empty,gemm", help="comma-separated subset of empty,gemm")
    args = ap.parse_args(argv)
    cells = [c for c in args.cells.split(",") if c] or zoo_cells()
    settings = [s for s in args.settings.split(",") if s]
    command = " ".join(["python bench/cold_build.py", *(sys.argv[1:] if argv is None else argv)])
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"command: `{command}`\n")
    print(f"{cpu_family()}; {os.cpu_count()} CPUs, load average {load} at start; one thread; wall clock, "
          f"median of {args.runs} fresh processes, each with its own empty cache\n")
    header = "| cell | " + " | ".join(f"{s}: compile s | {s}: first call s" for s in settings) + " |"
    print(header)
    print("|---|" + "---:|---:|" * len(settings))
    missed = []
    holder = tempfile.TemporaryDirectory(prefix="celldsl-cold-gemm-")
    template = gemm_only_cache(Path(holder.name)) if "gemm" in settings else None
    for stem in cells:
        cols = []
        for s in settings:
            timings = run(stem, s, args.runs, template)
            if isinstance(timings, str):
                cols = [f"refused: {timings.split(': ', 1)[-1]} (backend='auto' runs torch's loop)"]
                break
            c, f = timings
            cols += [f"{c:.2f}", f"{f:.2f}"]
            if f > TARGET_SECONDS:
                missed.append(f"{stem} ({s}): {f:.1f} s")
        print(f"| {stem} | " + " | ".join(cols) + " |", flush=True)
    print(f"\nTarget: first call within {TARGET_SECONDS:.0f} s of the compile: "
          + ("met for every row" if not missed else "MISSED for " + ", ".join(missed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
