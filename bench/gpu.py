"""GPU speed of the Triton backend: celldsl vs cuDNN vs a textbook per-gate loop vs torch.compile of it.

Run from the repository root on a machine with a CUDA GPU (prints one markdown table):

    python bench/gpu.py                      # the three sizes below, bf16, every cell
    python bench/gpu.py --dry-run            # CPU, tiny sizes: exercises every code path, no timing claims

Rows are (cell, size); columns side by side are, for each implementation, the forward time
(inference, under torch.no_grad) and the forward+backward time (`out.backward(g)`, parameter
gradients reset before each run, the input needs no gradient), in milliseconds, median of the timed
runs after warm-up runs, measured with CUDA events.

Implementations, all with the same weights (celldsl's `cell_parameter`s copied into the others):
  * celldsl: `celldsl.Recurrent(cell, backend="triton")`: hoisted input GEMM, per step cuBLAS GEMMs
    and one fused Triton kernel per pointwise stage, the SymPy-derived backward;
  * cuDNN: torch.nn.LSTM / torch.nn.GRU (LSTM and GRU only);
  * textbook: the per-gate PyTorch cell written from the paper (bench/cpu.py's `Textbook*` classes:
    one nn.Linear per gate and operand, a Python loop over time, autograd for the backward);
  * compiled: the same loop with its step function passed through torch.compile (the step, not the
    unrolled T-step loop, which would take minutes to trace at T=1024).
The last column is the largest output difference of any implementation from celldsl (a check that
the rows compare like with like, at the storage dtype's precision).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

import celldsl  # noqa: E402

CELLS = ("lstm", "gru", "mut1", "greff_vanilla", "slstm")
SIZES = ((16, 1024, 768), (64, 256, 512), (256, 128, 1024))  # (N, T, H)
DRY_SIZES = ((2, 3, 8),)
IMPLS = ("celldsl", "cuDNN", "textbook", "compiled")
N_STATES = {"lstm": 2, "gru": 1, "greff_vanilla": 2, "mut1": 1, "slstm": 4}


def _textbook_classes() -> dict:
    """bench/cpu.py's textbook cells (one definition of each, shared by both benchmarks)."""
    spec = importlib.util.spec_from_file_location("celldsl_bench_cpu", Path(__file__).with_name("cpu.py"))
    if spec.name not in sys.modules:
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[spec.name]
            raise
    return sys.modules[spec.name].TEXTBOOK


@dataclass
class Row:
    cell: str
    N: int
    T: int
    H: int
    dtype: str
    ms: dict[str, tuple[float, float] | None] = field(default_factory=dict)  # impl -> (fwd, fwd+bwd)
    max_diff: float = 0.0
    notes: list[str] = field(default_factory=list)


class Timer:
    """CUDA events on a GPU (elapsed GPU time between two records), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], None]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        start = time.perf_counter()
        fn()
        return 1000.0 * (time.perf_counter() - start)


def implementations(cell: str, N: int, H: int, device, dtype, compile_backend: str):
    """{name: (run(x) -> out [T, N, H], parameters)} with one set of weights; I = H for every cell
    (MUT1's un-weighted tanh(x) needs it)."""
    torch.manual_seed(0)
    layer = celldsl.Recurrent(str(ROOT / "cells" / f"{cell}.cell"), H, H, backend="triton", device=device,
                              dtype=dtype)
    impls = {"celldsl": (lambda x: layer(x)[0], list(layer.parameters()))}
    if cell in ("lstm", "gru"):
        ref = (nn.LSTM if cell == "lstm" else nn.GRU)(H, H, device=device, dtype=dtype)
        ref.load_state_dict(layer.state_dict())
        ref.flatten_parameters()  # one contiguous weight buffer, as cuDNN wants (else it compacts per call)
        impls["cuDNN"] = (lambda x: ref(x)[0], list(ref.parameters()))
    book = _textbook_classes()[cell](H, H).to(device=device, dtype=dtype)
    book.load_from(layer)
    zeros = tuple(torch.zeros(N, H, device=device, dtype=dtype) for _ in range(N_STATES[cell]))
    impls["textbook"] = (lambda x: book(x, zeros)[0], list(book.parameters()))
    step = torch.compile(book.step, backend=compile_backend, dynamic=False)

    def compiled(x):
        state, ys = zeros, []
        for x_t in x:
            y, state = step(x_t, state)
            ys.append(y)
        return torch.stack(ys)

    impls["compiled"] = (compiled, list(book.parameters()))
    return impls


def measure(run, params, x, g, timer: Timer, warmup: int, repeats: int) -> tuple[float, float]:
    def fwd():
        with torch.no_grad():
            run(x)

    def fwdbwd():
        for p in params:
            p.grad = None
        run(x).backward(g)

    out = []
    for fn in (fwd, fwdbwd):
        for _ in range(warmup):
            timer(fn)
        out.append(statistics.median(timer(fn) for _ in range(repeats)))
    return out[0], out[1]


def bench(cells, sizes, device, dtype, warmup: int, repeats: int, compile_backend: str) -> list[Row]:
    timer = Timer(device)
    rows = []
    for N, T, H in sizes:
        for cell in cells:
            row = Row(cell, N, T, H, str(dtype).removeprefix("torch."))
            impls = implementations(cell, N, H, device, dtype, compile_backend)
            gen = torch.Generator(device=device).manual_seed(1)
            x = torch.randn(T, N, H, generator=gen, device=device).to(dtype)
            g = torch.randn(T, N, H, generator=gen, device=device).to(dtype)
            with torch.no_grad():
                want = impls["celldsl"][0](x).float()
            for name in IMPLS:
                if name not in impls:
                    row.ms[name] = None
                    continue
                run, params = impls[name]
                try:
                    with torch.no_grad():
                        row.max_diff = max(row.max_diff, float((run(x).float() - want).abs().max()))
                    row.ms[name] = measure(run, params, x, g, timer, warmup, repeats)
                except (RuntimeError, NotImplementedError) as e:  # e.g. a dtype cuDNN lacks
                    row.ms[name] = None
                    row.notes.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            rows.append(row)
            del impls
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def table(rows: list[Row]) -> str:
    columns = " | ".join(f"{i} fwd | {i} fwd+bwd" for i in IMPLS)
    head = f"| cell | N | T | H | dtype | {columns} | max diff |"
    lines = [head, "|---|---:|---:|---:|---|" + "---:|" * (2 * len(IMPLS)) + "---:|"]
    for r in rows:
        cells = []
        for i in IMPLS:
            t = r.ms.get(i)
            cells += ["-", "-"] if t is None else [f"{t[0]:.2f}", f"{t[1]:.2f}"]
        lines.append(f"| {r.cell} | {r.N} | {r.T} | {r.H} | {r.dtype} | " + " | ".join(cells)
                     + f" | {r.max_diff:.1e} |")
    notes = [f"- {r.cell} N={r.N} T={r.T} H={r.H}: {n}" for r in rows for n in r.notes]
    return "\n".join(lines + ([""] + notes if notes else []))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, tiny sizes, fp32, Triton interpreter, torch.compile backend 'eager': tests "
                         "the code paths; the times mean nothing")
    ap.add_argument("--cells", default=",".join(CELLS), help=f"comma-separated subset of {CELLS}")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)
    cells = [c for c in args.cells.split(",") if c]
    for c in cells:
        if c not in CELLS:
            ap.error(f"unknown cell {c!r}; choose from {CELLS}")
    if args.dry_run:
        device, dtype, sizes, compile_backend = torch.device("cpu"), torch.float32, DRY_SIZES, "eager"
        warmup, repeats = 0, 1
    else:
        if not torch.cuda.is_available():
            print("bench/gpu.py needs a CUDA GPU (use --dry-run to exercise it on the CPU)", file=sys.stderr)
            return 2
        device, dtype, sizes = torch.device("cuda"), getattr(torch, args.dtype), SIZES
        compile_backend = "inductor"
        warmup, repeats = args.warmup, args.repeats
    before = os.environ.get("TRITON_INTERPRET")
    try:
        if args.dry_run:
            os.environ["TRITON_INTERPRET"] = "1"  # the celldsl column runs its kernels on the interpreter
        rows = bench(cells, sizes, device, dtype, warmup, repeats, compile_backend)
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before
    where = "CPU dry run (times mean nothing)" if args.dry_run else torch.cuda.get_device_name()
    print(f"{where}; torch {torch.__version__}; ms, median of {repeats} after {warmup} warm-up runs; "
          "fwd = inference (no_grad), fwd+bwd = training step of the layer\n")
    print(table(rows))
    bad = [r for r in rows if not math.isfinite(r.max_diff)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
