"""GPU speed of the Triton schedules: celldsl's graphed path and its new schedules vs cuDNN vs the
textbook loop, side by side in one run (issues 11 and 12).

Run from the repository root on a machine with a CUDA GPU (prints markdown tables):

    python bench/gpu.py                          # every suite, bf16
    python bench/gpu.py --suite dense --jobs 12  # one suite; kernels compiled in 12 processes first
    python bench/gpu.py --dry-run                # CPU, tiny sizes: every code path, no timing claims

Suites (N, T, H; I = H everywhere):
  dense    LSTM at (16, 1024, 768), (64, 256, 512), (256, 128, 1024), H = 1536 and 2048 at N = 16,
           2 layers bidirectional at (32, 512, 512); GRU at (16, 1024, 768)
  zoo      every dense zoo cell at (16, 1024, 768): the "3x faster than the graphed path" target
  columns  indrnn, sru, mingru, minlstm at (16, 1024, 768) and (64, 4096, 1024)

Implementations, all with the same weights (celldsl's parameters copied into the others):
  graphed, persistent, fused_step, time_loop, scan: celldsl.Recurrent(backend="triton", schedule=...)
      (graphed is today's default path; a schedule that does not apply or fit gets "-" and why);
  auto: schedule="auto", the compiler's choice at these sizes;
  cuDNN fp16 / bf16 / fp32: torch.nn.LSTM / GRU (weights flattened) in each dtype: which cuDNN
      algorithm runs differs by dtype (the profiler's kernel names are printed with cudnn.version());
  textbook: tests/reference_cells.py, the paper's equations one gate at a time in a Python loop over
      time, autograd for the backward (columns suite; --textbook adds it to the others).

Times: ms, median of --repeats CUDA-event measurements after --warmup runs; fwd = inference under
no_grad, fwd+bwd = forward and backward of (out * g).sum(), the input needing no gradient. Derived:
us per step; TFLOP/s = GEMM FLOPs (step and hoisted GEMMs, the backward counted as twice the forward)
over the fwd+bwd time; for the columns suite the forward's bytes floor (x read, the hoisted
projections written and read once, the output written) over the forward time, as a fraction of the
copy bandwidth measured in the same run. Targets (issues 11 and 12) are checked last, each with the
ratio it was measured at.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

import celldsl  # noqa: E402
from celldsl.compiler import ZOO, CompiledCell, compile_cell  # noqa: E402
from celldsl.targets.triton.applies import declines  # noqa: E402

CELLDSL = ("graphed", "persistent", "fused_step", "time_loop", "scan", "auto")
CUDNN = ("cuDNN fp16", "cuDNN bf16", "cuDNN fp32")
IMPLS = (*CELLDSL, *CUDNN, "textbook")
COLUMN_CELLS = ("indrnn", "sru", "mingru", "minlstm", "qrnn", "qrnn_f")


@dataclass(frozen=True)
class Case:
    suite: str
    cell: str
    N: int
    T: int
    H: int
    layers: int = 1
    bidirectional: bool = False

    def name(self) -> str:
        extra = f", {self.layers} layers" if self.layers > 1 else ""
        return self.cell + extra + (", bidirectional" if self.bidirectional else "")


def dense_zoo() -> list[str]:
    """The dense zoo cells the dense schedules run (the others, e.g. ln_lstm's row reductions, run
    graphed only: `celldsl explain CELL` says why)."""
    compiled = [compile_cell(p) for p in sorted(ZOO.glob("*.cell"))]
    return [c.name for c in compiled if isinstance(c, CompiledCell) and not _declared_widths(c)
            and declines(c.plan)["persistent"] is None]  # matrix cells: bench/gpu_matrix.py


def _declared_widths(compiled) -> list[str]:
    """The widths a Recurrent(cell, H, H) is not told (lstm_proj's P, chrono_lstm's T_max)."""
    ir = compiled.ir
    return sorted({*ir.widths.values(), *ir.init_sizes} - {"H", "row", *ir.inputs})


def suites(dry: bool) -> dict[str, list[Case]]:
    if dry:
        return {
            "dense": [Case("dense", "lstm", 2, 2, 8), Case("dense", "lstm", 2, 2, 8, 2, True),
                      Case("dense", "gru", 2, 2, 8)],
            "zoo": [Case("zoo", "gru_cho", 2, 2, 8)],
            "columns": [Case("columns", c, 2, 3, 8) for c in ("mingru", "sru")],
        }
    return {
        "dense": [Case("dense", "lstm", 16, 1024, 768), Case("dense", "lstm", 64, 256, 512),
                  Case("dense", "lstm", 256, 128, 1024), Case("dense", "lstm", 16, 1024, 1536),
                  Case("dense", "lstm", 16, 1024, 2048), Case("dense", "lstm", 32, 512, 512, 2, True),
                  Case("dense", "gru", 16, 1024, 768)],
        "zoo": [Case("zoo", c, 16, 1024, 768) for c in dense_zoo()],
        "columns": [Case("columns", c, N, T, H) for c in COLUMN_CELLS for N, T, H in ((16, 1024, 768),
                                                                                     (64, 4096, 1024))],
    }


def impls_of(case: Case, textbook: bool) -> list[str]:
    why = declines(compile_cell(case.cell).plan)
    names = [s for s in CELLDSL if s == "auto" or why[s] is None]
    if case.suite == "zoo":
        names = [n for n in names if n in ("graphed", "persistent", "fused_step")]
    if case.cell in ("lstm", "gru"):
        names += list(CUDNN)
    if textbook or case.suite == "columns":
        names.append("textbook")
    return names


@dataclass
class Row:
    case: Case
    impl: str
    dtype: str
    ms: tuple[float, float] | None = None  # (fwd, fwd+bwd)
    max_diff: float = 0.0
    note: str = ""
    kernels: list[str] = field(default_factory=list)


# ---- building each implementation -------------------------------------------------------------------


def _reference_cells():
    path = ROOT / "tests" / "reference_cells.py"
    spec = importlib.util.spec_from_file_location("celldsl_reference_cells", path)
    if spec.name not in sys.modules:
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules[spec.name].REFERENCES


def celldsl_layer(case: Case, schedule: str, device, dtype):
    torch.manual_seed(0)
    kwargs = dict(num_layers=case.layers, bidirectional=case.bidirectional, backend="triton", device=device,
                  dtype=dtype, schedule=None if schedule == "graphed" else schedule)
    if case.cell == "lstm":
        return celldsl.LSTM(case.H, case.H, **kwargs)
    if case.cell == "gru":
        return celldsl.GRU(case.H, case.H, **kwargs)
    return celldsl.Recurrent(case.cell, case.H, case.H, **kwargs)


def build(case: Case, impl: str, device, dtype) -> tuple[Callable, list]:
    """(run(x) -> out [T, N, D*H], parameters) of one implementation, weights equal to graphed's."""
    base = celldsl_layer(case, "graphed", device, dtype)
    if impl in CELLDSL:
        layer = base if impl == "graphed" else celldsl_layer(case, impl, device, dtype)
        layer.load_state_dict(base.state_dict())
        return (lambda x: layer(x)[0]), list(layer.parameters())
    if impl in CUDNN:
        kind = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[impl.split()[1]]
        cls = torch.nn.LSTM if case.cell == "lstm" else torch.nn.GRU
        ref = cls(case.H, case.H, num_layers=case.layers, bidirectional=case.bidirectional, device=device,
                  dtype=kind)
        ref.load_state_dict({k: v.to(kind) for k, v in base.state_dict().items()})
        ref.flatten_parameters()  # one contiguous weight buffer, as cuDNN wants
        return (lambda x: ref(x.to(kind))[0]), list(ref.parameters())
    if impl == "textbook":
        if case.layers > 1 or case.bidirectional:
            raise NotImplementedError("the textbook loop is one layer, one direction")
        ref = _reference_cells()[case.cell]
        names = [m for s in base.stores for m in s.members]
        p = {n: base.cell_parameter(n) for n in names}
        n_states = len(base.compiled.states)

        def run(x):
            return ref(p, x, tuple(x.new_zeros(x.shape[1], case.H) for _ in range(n_states)))[0]

        return run, list(base.parameters())
    raise ValueError(impl)


# ---- timing ---------------------------------------------------------------------------------------------


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


def measure(run, params, x, g, timer: Timer, warmup: int, repeats: int) -> tuple[float, float]:
    def fwd():
        with torch.no_grad():
            run(x)

    def fwdbwd():
        for p in params:
            p.grad = None
        (run(x).float() * g).sum().backward()

    out = []
    for fn in (fwd, fwdbwd):
        for _ in range(warmup):
            timer(fn)
        out.append(statistics.median(timer(fn) for _ in range(repeats)))
    return out[0], out[1]


def inputs(case: Case, device, dtype):
    gen = torch.Generator(device=device).manual_seed(1)
    D = 2 if case.bidirectional else 1
    x = torch.randn(case.T, case.N, case.H, generator=gen, device=device).to(dtype)
    g = torch.randn(case.T, case.N, D * case.H, generator=gen, device=device)
    return x, g


def bench_case(case: Case, impls: list[str], device, dtype, warmup, repeats) -> list[Row]:
    timer, rows = Timer(device), []
    x, g = inputs(case, device, dtype)
    want = None
    for impl in impls:
        kind = {"cuDNN fp16": "float16", "cuDNN bf16": "bfloat16", "cuDNN fp32": "float32"}.get(impl)
        row = Row(case, impl, kind or str(dtype).removeprefix("torch."))
        try:
            run, params = build(case, impl, device, dtype)
            with torch.no_grad():
                out = run(x).float()
            if want is None:
                want = out  # graphed comes first
            row.max_diff = float((out - want).abs().max())
            row.ms = measure(run, params, x, g, timer, warmup, repeats)
            if impl in CUDNN and device.type == "cuda":
                row.kernels = kernel_names(run, x)
        except (RuntimeError, NotImplementedError, ValueError) as e:  # a schedule that does not fit, ...
            row.note = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        rows.append(row)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def kernel_names(run, x) -> list[str]:
    """The CUDA kernels of one forward, longest first: which cuDNN algorithm ran (persistent or not)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        run(x)
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -getattr(e, "device_time_total", 0.0))
    return [e.key[:70] for e in events if getattr(e, "device_time_total", 0.0) > 0][:3]


def _warm(job) -> str:
    """In a worker process: build and run one implementation once, so its Triton kernels are compiled
    into the shared cache before the timed process needs them."""
    case, impl, dtype_name = job
    os.environ.pop("TRITON_INTERPRET", None)
    try:
        device, dtype = torch.device("cuda"), getattr(torch, dtype_name)
        run, params = build(case, impl, device, dtype)
        x, g = inputs(case, device, dtype)
        (run(x).float() * g).sum().backward()
        torch.cuda.synchronize()
        return ""
    except Exception as e:  # noqa: BLE001 - reported by the timed run
        return f"{case.name()} {impl}: {type(e).__name__}"


def warm_cache(jobs: list, workers: int) -> None:
    if workers <= 1 or not jobs:
        return
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        failed = [m for m in pool.map(_warm, jobs, chunksize=1) if m]
    print(f"compiled kernels of {len(jobs)} implementations in {workers} processes in "
          f"{time.perf_counter() - start:.0f} s" + (f"; failed: {failed}" if failed else ""), flush=True)


# ---- derived numbers -------------------------------------------------------------------------------


def gemm_flops(case: Case) -> float:
    """Forward GEMM FLOPs of the whole layer (every layer and direction): step and hoisted GEMMs."""
    plan = compile_cell(case.cell).plan
    step = sum(len(g.params) for g in plan.gemms)
    hoisted = sum(len(g.params) for g in plan.hoisted)
    D = 2 if case.bidirectional else 1
    total = 0.0
    for layer in range(case.layers):
        I = case.H if layer == 0 else D * case.H
        total += D * case.T * case.N * (2 * step * case.H * case.H + 2 * hoisted * case.H * I)
    return total


def floor_bytes(case: Case, size: int) -> float:
    """The forward's fewest bytes: x read, the hoisted projections written and read, the output written."""
    plan = compile_cell(case.cell).plan
    k = sum(len(g.params) for g in plan.hoisted)
    return size * case.T * case.N * case.H * (1 + 2 * k + 1)


def ceilings(device) -> tuple[float, float]:
    """(copy GB/s counting bytes read and written, bf16 matmul TFLOP/s on random data), measured."""
    if device.type != "cuda":
        return float("nan"), float("nan")
    timer = Timer(device)
    a = torch.empty(1 << 28, dtype=torch.float32, device=device).normal_()  # 1 GiB
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    copy = statistics.median(timer(lambda: b.copy_(a)) for _ in range(10))
    m = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        m @ m
    mm = statistics.median(timer(lambda: m @ m) for _ in range(10))
    return 2 * (1 << 30) / copy / 1e6, 2 * 8192**3 / mm / 1e9


# ---- output --------------------------------------------------------------------------------------------


def table(rows: list[Row], copy_gbs: float) -> str:
    head = ("| suite | case | N | T | H | impl | dtype | fwd ms | fwd+bwd ms | us/step fwd | us/step fwd+bwd "
            "| TFLOP/s fwd+bwd | fwd GB/s (% of copy) | max diff | note |")
    lines = [head, "|---|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        c = r.case
        if r.ms is None:
            cells = ["-"] * 6
        else:
            fwd, fb = r.ms
            tflops = 3 * gemm_flops(c) / (fb * 1e-3) / 1e12
            bw = "-"
            if c.suite == "columns" and copy_gbs == copy_gbs:  # not NaN: measured on a GPU
                size = torch.empty((), dtype=getattr(torch, r.dtype)).element_size()
                gbs = floor_bytes(c, size) / (fwd * 1e-3) / 1e9
                bw = f"{gbs:.0f} ({100 * gbs / copy_gbs:.0f}%)"
            cells = [f"{fwd:.2f}", f"{fb:.2f}", f"{1000 * fwd / c.T:.1f}", f"{1000 * fb / c.T:.1f}",
                     f"{tflops:.2f}", bw]
        note = r.note or (", ".join(r.kernels) if r.kernels else "")
        lines.append(f"| {c.suite} | {c.name()} | {c.N} | {c.T} | {c.H} | {r.impl} | {r.dtype} | "
                     + " | ".join(cells) + f" | {r.max_diff:.1e} | {note} |")
    return "\n".join(lines)


def _ms(rows, case_filter, impl, phase) -> float | None:
    vals = [r.ms[phase] for r in rows if r.ms is not None and r.impl == impl and case_filter(r.case)]
    return vals[0] if vals else None


def targets(rows: list[Row], copy_gbs: float) -> list[str]:
    """The issues' targets, each measured in this run: met, or missed by how much."""
    out = []

    def verdict(what, ours, theirs, factor=1.0):
        """ours must be <= theirs / factor (a time)."""
        if ours is None or theirs is None:
            out.append(f"- {what}: not measured")
            return
        ratio = theirs / ours
        state = "met" if ratio >= factor else f"MISSED (x{ratio:.2f}, needs x{factor:g})"
        out.append(f"- {what}: {ours:.2f} ms vs {theirs:.2f} ms = x{ratio:.2f}: {state}")

    def best(case_filter, phase, impls=("persistent", "fused_step", "time_loop", "scan", "auto")):
        vals = [r.ms[phase] for r in rows if r.ms and r.impl in impls and case_filter(r.case)]
        return min(vals) if vals else None

    def flash(c):
        return c.suite == "dense" and (c.cell, c.N, c.T, c.H, c.layers) == ("lstm", 16, 1024, 768, 1)

    for phase, word in ((0, "fwd"), (1, "fwd+bwd")):
        verdict(f"LSTM bf16 (16, 1024, 768) {word} no slower than cuDNN fp16 (same run)",
                best(flash, phase), _ms(rows, flash, "cuDNN fp16", phase))
    for cell in sorted({r.case.cell for r in rows if r.case.suite == "zoo"}):
        f = lambda c, cell=cell: c.suite == "zoo" and c.cell == cell  # noqa: E731
        verdict(f"{cell} fwd+bwd >= 3x faster than graphed", best(f, 1), _ms(rows, f, "graphed", 1), 3.0)
    for label, f in (("GRU (16, 1024, 768)", lambda c: c.suite == "dense" and c.cell == "gru"),
                     ("LSTM 2 layers bidirectional (32, 512, 512)",
                      lambda c: c.suite == "dense" and c.layers == 2)):
        cudnn = [r.ms[1] for r in rows if r.ms and r.impl in CUDNN and f(r.case)]
        verdict(f"{label} fwd+bwd ahead of cuDNN (its best dtype)", best(f, 1), min(cudnn) if cudnn else None)
    for c in sorted({r.case for r in rows if r.case.suite == "dense"}, key=lambda c: (c.cell, c.N, c.H)):
        f = lambda x, c=c: x == c  # noqa: E731
        verdict(f"{c.name()} ({c.N}, {c.T}, {c.H}) auto no slower than graphed (fwd+bwd)",
                _ms(rows, f, "auto", 1), _ms(rows, f, "graphed", 1))
    for c in sorted({r.case for r in rows if r.case.suite == "columns"}, key=lambda c: (c.cell, c.N)):
        f = lambda x, c=c: x == c  # noqa: E731
        for phase, word in ((0, "fwd"), (1, "fwd+bwd")):
            verdict(f"{c.cell} ({c.N}, {c.T}, {c.H}) {word} >= 10x faster than graphed", best(f, phase),
                    _ms(rows, f, "graphed", phase), 10.0)
        fwd = best(f, 0)
        if fwd and copy_gbs == copy_gbs:
            gbs = floor_bytes(c, 2) / (fwd * 1e-3) / 1e9
            state = "met" if gbs >= 0.5 * copy_gbs else f"MISSED ({100 * gbs / copy_gbs:.0f}% of copy)"
            out.append(f"- {c.cell} ({c.N}, {c.T}, {c.H}) fwd >= 50% of copy bandwidth: {gbs:.0f} GB/s: "
                       f"{state}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, tiny sizes, fp32, Triton interpreter: tests the code paths; the times mean "
                    "nothing")
    ap.add_argument("--suite", action="append", choices=("dense", "zoo", "columns"),
                    help="repeatable; default: every suite")
    ap.add_argument("--cells", default="", help="comma-separated cells to keep (default: all of the suite)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--textbook", action="store_true", help="time the textbook loop in every suite")
    ap.add_argument("--jobs", type=int, default=0,
                    help="compile every implementation's kernels in this many processes first (GPU)")
    args = ap.parse_args(argv)
    dry = args.dry_run
    chosen = args.suite or ["dense", "zoo", "columns"]
    keep = {c for c in args.cells.split(",") if c}
    cases = [c for s in chosen for c in suites(dry)[s] if not keep or c.cell in keep]
    if dry:
        device, dtype, warmup, repeats = torch.device("cpu"), torch.float32, 0, 1
    else:
        if not torch.cuda.is_available():
            print("bench/gpu.py needs a CUDA GPU (use --dry-run to exercise it on the CPU)", file=sys.stderr)
            return 2
        device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
        warmup, repeats = args.warmup, args.repeats
    plan = [(c, impls_of(c, args.textbook)) for c in cases]
    if dry:
        plan = [(c, [i for i in impls if i in (*CELLDSL, "cuDNN fp32", "textbook")]) for c, impls in plan]
    before = os.environ.get("TRITON_INTERPRET")
    try:
        if dry:
            os.environ["TRITON_INTERPRET"] = "1"
        else:
            warm_cache([(c, i, args.dtype) for c, impls in plan for i in impls if i in CELLDSL], args.jobs)
        copy_gbs, mm_tflops = ceilings(device)
        rows = []
        for c, impls in plan:  # progress on stderr, so a run cut short still says what it measured
            rows += bench_case(c, impls, device, dtype, warmup, repeats)
            done = table(rows[-len(impls):], copy_gbs).splitlines()[2:]
            print("\n".join(done), file=sys.stderr, flush=True)
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before
    where = "CPU dry run (times mean nothing)" if dry else torch.cuda.get_device_name()
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    import triton

    print(f"{where}; torch {torch.__version__}; triton {triton.__version__}; cuDNN {cudnn} "
          f"(allow_tf32={torch.backends.cudnn.allow_tf32}); ms, median of {repeats} after {warmup} warm-up "
          "runs")
    if not dry:
        print(f"measured ceilings: copy {copy_gbs:.0f} GB/s (read + write), bf16 matmul {mm_tflops:.0f} "
              "TFLOP/s")
    print()
    print(table(rows, copy_gbs))
    print("\nTargets (issues 11 and 12):")
    print("  not evaluated in a dry run" if dry else "\n".join(targets(rows, copy_gbs)))
    bad = [r for r in rows if r.ms is not None and not r.max_diff == r.max_diff]  # NaN
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
