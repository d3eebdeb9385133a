"""CPU speed: celldsl vs torch.nn (oneDNN), the textbook per-gate PyTorch cell and torch.compile of it.

Run from the repository root; it prints the command, the machine, one markdown table per size and
the targets (met or missed, by how much):

    .venv/bin/python bench/cpu.py --threads 1 --clock cpu     # 1 thread, this process's CPU time
    .venv/bin/python bench/cpu.py --threads 2                 # 2 threads, wall clock
    .venv/bin/python bench/cpu.py --tables nn --repeats 5     # one group of tables
    .venv/bin/python bench/cpu.py --smoke                     # tiny sizes, one run (tests/test_bench_cpu.py)

Tables (--tables, comma-separated):
    nn    celldsl.LSTM / GRU vs torch.nn.LSTM / GRU at (T=100, N=32, I=128, H=256), the LSTM at N=1 and
          at (T=100, N=128, I=H=512) (issue 9)
    zoo   every zoo cell at (T=100, N=32, I=128, H=256; I = H where the cell needs it): celldsl vs its
          textbook loop and torch.compile of the textbook step (issue 9)
    long  the cells without a state GEMM (indrnn, sru: elementwise; mingru, minlstm: linear) at T=1000,
          I=64, H=128, N=1 and N=32 (issue 11)
    step  one step with the state in and out: celldsl.LSTMCell / GRUCell vs torch.nn.LSTMCell / GRUCell,
          and celldsl.LSTM / GRU on T = 1 vs torch.nn.LSTM / GRU
          at N=32 and N=1, I=H=256 (a decoder's call; issue 27: no more than torch.nn's). The forward
          runs under torch.no_grad(), so celldsl replays its prepared step (nn/cells.py)
    small small layers, where a call's fixed cost (Python, argument checks, packing) outweighs its
          arithmetic: celldsl.LSTM / GRU vs torch.nn at (T=10, N=8, I=H=64) and (T=100, N=1, I=H=32);
          the target is torch.nn's time (the fixed cost per call is the known gap, docs/benchmarks.md)
    matrix (only when named) the matrix-memory cells mlstm, gla, deltanet (cells/) at T=1024
          (--matrix-T), N=8, 4 heads, K=V=64, I=256, and mamba (one head) at D=256, N_s=16, R=16,
          I=O=256: celldsl.MatrixRecurrent on backend="cpu" (the fused C loop,
          targets/c/matrix_loop.py) vs the textbook einsum loop of tests/matrix_references.py
          (autograd) and torch.compile of that loop's step (issue 26); a cell the cpu backend
          refuses prints the refusal instead of its table

Rows: "celldsl" is the layer as the library builds it (backend auto: on CPU tensors the C kernels of
targets/c/fused.py, the native loop or the Python loop, whichever targets/c/gemm.py measured
faster); "celldsl, Python loop" forces the per-step Python loop on torch.mm (the loop celldsl shipped
before the native one) on a private copy of the cell. "textbook" is what one writes from the paper:
one nn.Linear per gate and operand, applied every step, autograd for the backward (for the cells
without a class below, the per-gate step of tests/reference_cells.py, `x @ W.T + b`); "torch.compile"
is the same loop with its step compiled by torch.compile (compiled once, in the warm-up runs).

Every implementation of a cell runs with the same weights (the torch.nn state_dict is loaded into the
celldsl layer; the textbook copies celldsl's `cell_parameter`s); the last column is the largest
output difference from celldsl. forward: under torch.no_grad(). forward+backward: forward with
autograd, then `output.backward(g)` for a fixed random g, parameter gradients set to None before each
run, the input needing no gradient (a first layer). Timings are interleaved (each repeat runs every
row once, in an order rotated by one per repeat, so no row always runs right after another) and the
median is reported, so drifts of a shared machine hit all rows alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# Every library is built in full before its first call: a benchmark measures the final -O3 kernels
# and the native GEMM, never a new cell's quick first build or torch's GEMMs while the GEMM library
# builds in the background (targets/c/fused.py).
os.environ.setdefault("CELLDSL_BACKGROUND_BUILD", "0")

ROOT = Path(__file__).resolve().parent.parent
for folder in (ROOT, ROOT / "tests"):  # run as a script from a checkout; tests/ has reference_cells
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import reference_cells  # noqa: E402

import celldsl  # noqa: E402
from celldsl.compiler import ZOO  # noqa: E402

TABLES = ("nn", "zoo", "long", "step", "small", "matrix")
# matrix: named explicitly (it compiles three T=1 loops)
DEFAULT_TABLES = ("nn", "zoo", "long", "step", "small")
MATRIX_CELLS = ("mlstm", "gla", "deltanet", "mamba")
LONG_CELLS = ("indrnn", "sru", "mingru", "minlstm")


# ---- textbook cells: one nn.Linear per gate and operand, one Python step per time step --------------

class Textbook(nn.Module):
    """A cell written from its paper: `step(x_t, state) -> (y_t, state)` applied T times.

    x [T, N, I] -> (y [T, N, H], final state tuple of [N, H]). `compiled=True` runs the step through
    torch.compile.
    """

    linears: dict[str, tuple[str, str, bool]] = {}  # name -> (in "I" | "H", parameter, bias name or "")
    vectors: tuple[str, ...] = ()

    def __init__(self, I: int, H: int):
        super().__init__()
        size = {"I": I, "H": H}
        self.lin = nn.ModuleDict({k: nn.Linear(size[i], H, bias=bool(b))
                                  for k, (i, _w, b) in self.linears.items()})
        self.vec = nn.ParameterDict({k: nn.Parameter(torch.zeros(H)) for k in self.vectors})
        self.step_fn = self.step

    def compile_step(self) -> None:
        self.step_fn = torch.compile(self.step, dynamic=False)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, ...]):
        ys = []
        for x_t in x:
            y, state = self.step_fn(x_t, state)
            ys.append(y)
        return torch.stack(ys), state

    def load_from(self, layer) -> None:
        for k, (_i, w, b) in self.linears.items():
            self.lin[k].weight.data.copy_(layer.cell_parameter(w))
            if b:
                self.lin[k].bias.data.copy_(layer.cell_parameter(b))
        for k in self.vectors:
            self.vec[k].data.copy_(layer.cell_parameter(k))


class TextbookLSTM(Textbook):
    """torch.nn.LSTM's equations (gates i, f, g, o; biases b_i* and b_h*)."""

    linears = {f"{w}{g}": ("I" if w == "i" else "H", f"W_{w}{g}", f"b_{w}{g}") for w in "ih" for g in "ifgo"}

    def step(self, x, state):
        h, c = state
        L = self.lin
        i = torch.sigmoid(L["ii"](x) + L["hi"](h))
        f = torch.sigmoid(L["if"](x) + L["hf"](h))
        g = torch.tanh(L["ig"](x) + L["hg"](h))
        o = torch.sigmoid(L["io"](x) + L["ho"](h))
        c = f * c + i * g
        h = o * torch.tanh(c)
        return h, (h, c)


class TextbookGRU(Textbook):
    """torch.nn.GRU's equations: reset applied after the recurrent product."""

    linears = {f"{w}{g}": ("I" if w == "i" else "H", f"W_{w}{g}", f"b_{w}{g}") for w in "ih" for g in "rzn"}

    def step(self, x, state):
        (h,) = state
        L = self.lin
        r = torch.sigmoid(L["ir"](x) + L["hr"](h))
        z = torch.sigmoid(L["iz"](x) + L["hz"](h))
        n = torch.tanh(L["in"](x) + r * L["hn"](h))
        h = (1 - z) * n + z * h
        return h, (h,)


GREFF_LINEARS = {f"W_{g}": ("I", f"W_{g}", f"b_{g}") for g in "zifo"} | {
    f"R_{g}": ("H", f"R_{g}", "") for g in "zifo"}  # W_* on x with biases, R_* on the state


class TextbookGreffVanilla(Textbook):
    """Greff et al. 2015 vanilla LSTM: peepholes p_i, p_f on c^{t-1}, p_o on c^t; state (c, y)."""

    linears = GREFF_LINEARS
    vectors = ("p_i", "p_f", "p_o")

    def step(self, x, state):
        c, y = state
        L, p = self.lin, self.vec
        z = torch.tanh(L["W_z"](x) + L["R_z"](y))
        i = torch.sigmoid(L["W_i"](x) + L["R_i"](y) + p["p_i"] * c)
        f = torch.sigmoid(L["W_f"](x) + L["R_f"](y) + p["p_f"] * c)
        c = z * i + c * f
        o = torch.sigmoid(L["W_o"](x) + L["R_o"](y) + p["p_o"] * c)
        y = torch.tanh(c) * o
        return y, (c, y)


class TextbookMUT1(Textbook):
    """Jozefowicz et al. 2015 MUT1: z from the input only, un-weighted tanh(x) (needs I == H)."""

    linears = {"xz": ("I", "W_xz", "b_z"), "xr": ("I", "W_xr", "b_r"), "hr": ("H", "W_hr", ""),
               "hh": ("H", "W_hh", "b")}

    def step(self, x, state):
        (h,) = state
        L = self.lin
        z = torch.sigmoid(L["xz"](x))
        r = torch.sigmoid(L["xr"](x) + L["hr"](h))
        h = torch.tanh(L["hh"](r * h) + torch.tanh(x)) * z + h * (1 - z)
        return h, (h,)


class TextbookSLSTM(Textbook):
    """Beck et al. 2024 sLSTM, one head, stabilised exponential input gate; state (h, c, n, m)."""

    linears = GREFF_LINEARS

    def step(self, x, state):
        h, c, n, m = state
        L = self.lin
        z = torch.tanh(L["W_z"](x) + L["R_z"](h))
        i_tilde = L["W_i"](x) + L["R_i"](h)
        f_tilde = L["W_f"](x) + L["R_f"](h)
        o = torch.sigmoid(L["W_o"](x) + L["R_o"](h))
        log_f = F.logsigmoid(f_tilde)
        m_new = torch.maximum(log_f + m, i_tilde)
        i = torch.exp(i_tilde - m_new)
        f = torch.exp(log_f + m - m_new)
        c = f * c + i * z
        n = f * n + i
        h = o * c / n
        return h, (h, c, n, m_new)


class TextbookIndRNN(Textbook):
    """Li et al. 2018 eq. (2): h' = relu(W x + u * h + b)."""

    linears = {"W": ("I", "W", "b")}
    vectors = ("u",)

    def step(self, x, state):
        (h,) = state
        h = torch.relu(self.lin["W"](x) + self.vec["u"] * h)
        return h, (h,)


class TextbookSRU(Textbook):
    """Lei et al. 2018 SRU with v * c_{t-1}; carries c, outputs h; highway on raw x (I == H)."""

    linears = {"W": ("I", "W", ""), "W_f": ("I", "W_f", "b_f"), "W_r": ("I", "W_r", "b_r")}
    vectors = ("v_f", "v_r")

    def step(self, x, state):
        (c,) = state
        L, v = self.lin, self.vec
        f = torch.sigmoid(L["W_f"](x) + v["v_f"] * c)
        r = torch.sigmoid(L["W_r"](x) + v["v_r"] * c)
        c_new = f * c + (1 - f) * L["W"](x)
        h = r * c_new + (1 - r) * x
        return h, (c_new,)


class TextbookMinGRU(Textbook):
    """Feng et al. 2024 minGRU, plain form."""

    linears = {"z": ("I", "W_z", "b_z"), "h": ("I", "W_h", "b_h")}

    def step(self, x, state):
        (h,) = state
        z = torch.sigmoid(self.lin["z"](x))
        h = (1 - z) * h + z * self.lin["h"](x)
        return h, (h,)


class TextbookMinLSTM(Textbook):
    """Feng et al. 2024 minLSTM, plain form: f, i normalised to sum to one."""

    linears = {"f": ("I", "W_f", "b_f"), "i": ("I", "W_i", "b_i"), "h": ("I", "W_h", "b_h")}

    def step(self, x, state):
        (h,) = state
        f, i = torch.sigmoid(self.lin["f"](x)), torch.sigmoid(self.lin["i"](x))
        h = f / (f + i) * h + i / (f + i) * self.lin["h"](x)
        return h, (h,)


TEXTBOOK = {"lstm": TextbookLSTM, "gru": TextbookGRU, "greff_vanilla": TextbookGreffVanilla,
            "mut1": TextbookMUT1, "slstm": TextbookSLSTM, "indrnn": TextbookIndRNN, "sru": TextbookSRU,
            "mingru": TextbookMinGRU, "minlstm": TextbookMinLSTM}


class ReferenceTextbook(nn.Module):
    """The per-gate step of tests/reference_cells.py (written from the papers, `x @ W.T + b`), for the
    cells without a Textbook class; its parameters are copies of the layer's."""

    def __init__(self, cell: str, layer):
        super().__init__()
        self.cell = cell
        names = list(layer.compiled.ir.params)
        self.params = nn.ParameterList([nn.Parameter(layer.cell_parameter(n).detach().clone())
                                        for n in names])
        self.names = names
        self.compiled = False

    def compile_step(self) -> None:
        self.compiled = True

    def forward(self, x, state):
        p = dict(zip(self.names, self.params, strict=True))
        if not self.compiled:
            return reference_cells.REFERENCES[self.cell](p, x, state)
        run = reference_cells.run
        reference_cells.run = lambda step, x, state: run(torch.compile(step, dynamic=False), x, state)
        try:  # torch.compile keys its cache on the step's code: compiled once, in the warm-up
            return reference_cells.REFERENCES[self.cell](p, x, state)
        finally:
            reference_cells.run = run


# ---- the rows of one table ------------------------------------------------------------------------------

class Impl:
    """One row: `run(x) -> output [T, N, H]` with parameters `params` (for zeroing gradients)."""

    def __init__(self, label: str, run: Callable[[torch.Tensor], torch.Tensor], params, kind: str):
        self.label, self.run, self.params, self.kind = label, run, list(params), kind
        self.times: dict[str, list[float]] = {"fwd": [], "fwdbwd": []}


def cell_text(cell: str) -> str:
    return (ZOO / f"{cell}.cell").read_text()


def library_layer(cell: str, I: int, H: int, **kw):
    """The layer as the library builds it."""
    if cell == "lstm":
        return celldsl.LSTM(I, H, **kw)
    if cell == "gru":
        return celldsl.GRU(I, H, **kw)
    return celldsl.Recurrent(cell, I, H, **kw)


def python_loop_layer(cell: str, I: int, H: int):
    """A private copy of the cell (its own cache key and loop) forced onto the Python loop on torch.mm."""
    from celldsl.ops.function import cell_for
    from celldsl.targets.c import fused as cpu_fused

    layer = celldsl.Recurrent(cell_text(cell) + "\n# bench/cpu.py: the Python loop\n", I, H)
    compiled = layer.compiled
    loop = cell_for(compiled.key).loop("cpu")
    if not isinstance(loop, cpu_fused.FusedCPULoop):
        raise SystemExit(f"the C kernels are unavailable here: {cpu_fused.build_library(compiled)[1]}")
    loop.gemm = "mm"
    return layer


def impls_for(cell: str, I: int, H: int, N: int, rows: tuple[str, ...], **kw) -> list[Impl]:
    """rows: a subset of nn, celldsl, python, textbook, compiled, in the order wanted; kw: the layers'
    options (nn and celldsl rows only)."""
    torch.manual_seed(0)
    impls: list[Impl] = []
    ref = None
    if "nn" in rows:
        ref = (nn.LSTM if cell == "lstm" else nn.GRU)(I, H, **kw)
        onednn = " (oneDNN)" if torch.backends.mkldnn.is_available() else ""
        impls.append(Impl(f"torch.nn.{cell.upper()}{onednn}", lambda x, m=ref: m(x)[0], ref.parameters(),
                          "nn"))
    layer = library_layer(cell, I, H, **kw)
    if ref is not None:
        layer.load_state_dict(ref.state_dict())
    name = {"lstm": "celldsl.LSTM", "gru": "celldsl.GRU"}.get(cell, f"celldsl {cell}.cell")
    impls.append(Impl(name, lambda x, m=layer: m(x)[0], layer.parameters(), "celldsl"))
    if "python" in rows:
        copy = python_loop_layer(cell, I, H)
        copy.load_state_dict(layer.state_dict())
        impls.append(Impl(f"{name}, Python loop (torch.mm + C per step)", lambda x, m=copy: m(x)[0],
                          copy.parameters(), "python"))
    n_states = len(layer.compiled.ir.states)
    zeros = tuple(torch.zeros(N, H) for _ in range(n_states))
    for kind in ("textbook", "compiled"):
        if kind not in rows:
            continue
        if cell in TEXTBOOK:
            book = TEXTBOOK[cell](I, H)
            book.load_from(layer)
        else:
            book = ReferenceTextbook(cell, layer)
        label = "textbook per-gate (autograd)" if cell in TEXTBOOK else "textbook, tests/reference_cells.py"
        if kind == "compiled":
            book.compile_step()
            label = "torch.compile of the textbook step"
        impls.append(Impl(label, lambda x, m=book: m(x, zeros)[0], book.parameters(), kind))
    return impls


def time_once(impl: Impl, x: torch.Tensor, g: torch.Tensor, backward: bool, clock) -> float:
    for p in impl.params:
        p.grad = None
    start = clock()
    if backward:
        impl.run(x).backward(g)
    else:
        with torch.no_grad():
            impl.run(x)
    return clock() - start


def measure(impls: list[Impl], x: torch.Tensor, repeats: int, warmup: int, clock, modes) -> None:
    with torch.no_grad():
        g = torch.randn_like(impls[0].run(x))
    for key in modes:
        backward = key == "fwdbwd"
        for _ in range(warmup):
            for impl in impls:
                time_once(impl, x, g, backward, clock)
        for r in range(repeats):
            # interleaved: every repeat runs every implementation once, in an order rotated by one per
            # repeat, so that each follows each equally often (the one run right after torch.nn measured
            # ~1.5% slower than after itself: a fixed order biases the ratios)
            k = r % len(impls)
            for impl in impls[k:] + impls[:k]:
                impl.times[key].append(time_once(impl, x, g, backward, clock))


def max_diff(impls: list[Impl], x: torch.Tensor, base: Impl) -> dict[str, float]:
    with torch.no_grad():
        want = base.run(x)
        return {i.label: float((i.run(x) - want).abs().max()) for i in impls}


def ms(impl: Impl, key: str) -> float:
    times = impl.times[key]
    return 1000.0 * statistics.median(times) if times else float("nan")


# ---- the tables -------------------------------------------------------------------------------------------

class Report:
    """The targets, as lines: measured value, target, met or missed by how much."""

    def __init__(self):
        self.lines: list[str] = []

    def at_most(self, what: str, value: float, target: float) -> None:
        verdict = "met" if value <= target else f"MISSED by {100 * (value / target - 1):.0f}%"
        self.lines.append(f"- {what}: {value:.2f} (target <= {target}): {verdict}")

    def at_least(self, what: str, value: float, target: float) -> None:
        verdict = "met" if value >= target else f"MISSED by {100 * (1 - value / target):.0f}%"
        self.lines.append(f"- {what}: {value:.2f}x (target >= {target}x): {verdict}")


def size_text(T, N, I, H) -> str:
    return f"T={T} N={N} I={I} H={H}"


def table(title: str, impls: list[Impl], diffs: dict[str, float], base: Impl) -> None:
    """One markdown table: times, and ratios to `base` (torch.nn, or celldsl)."""
    print(f"\n{title}\n")
    print(f"| implementation | forward ms | forward+backward ms | fwd / {base.kind} | fwd+bwd / {base.kind} "
          "| max abs diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for impl in impls:
        print(f"| {impl.label} | {ms(impl, 'fwd'):.2f} | {ms(impl, 'fwdbwd'):.2f} "
              f"| {ms(impl, 'fwd') / ms(base, 'fwd'):.2f} | {ms(impl, 'fwdbwd') / ms(base, 'fwdbwd'):.2f} "
              f"| {diffs[impl.label]:.1e} |")


def run_rows(cell, T, N, I, H, rows, args, clock, **kw):
    impls = impls_for(cell, I, H, N, rows, **kw)
    x = torch.randn(T, N, I)
    measure(impls, x, args.repeats, args.warmup, clock, ("fwd", "fwdbwd"))
    ours = next(i for i in impls if i.kind == "celldsl")
    return impls, max_diff(impls, x, ours), ours


def nn_tables(args, clock, report: Report) -> None:
    sizes = [("lstm", *args.size), ("gru", *args.size), ("lstm", args.size[0], 1, *args.size[2:]),
             ("lstm", *args.big)]
    for cell, T, N, I, H in sizes:
        rows = ("nn", "celldsl", "python", "textbook")
        impls, diffs, ours = run_rows(cell, T, N, I, H, rows, args, clock)
        base = impls[0]
        table(f"{cell.upper()}, {size_text(T, N, I, H)}", impls, diffs, base)
        fwd, fwdbwd = ms(ours, "fwd") / ms(base, "fwd"), ms(ours, "fwdbwd") / ms(base, "fwdbwd")
        what = f"{ours.label} / {base.label} at {size_text(T, N, I, H)}"
        if cell == "gru":
            report.at_most(f"{what}, forward+backward", fwdbwd, 0.7)
        elif N == 1:
            report.at_most(f"{what}, forward", fwd, 1.1)
        elif (N, I, H) == tuple(args.size[1:]):
            report.at_most(f"{what}, forward+backward", fwdbwd, 0.9)
            report.at_most(f"{what}, forward", fwd, 1.2)
        else:
            report.at_most(f"{what}, forward+backward", fwdbwd, 0.9)


SMALL_SIZES = ((10, 8, 64, 64), (100, 1, 32, 32))
SMALL_BIDIRECTIONAL = (20, 8, 64, 64)  # a tagger's BiLSTM: two layers, both directions


def small_tables(args, clock, report: Report) -> None:
    """Small layers: the fixed cost of a call, not the arithmetic, sets the time."""
    sizes = SMALL_SIZES if not args.smoke else SMALL_SIZES[:1]
    runs = [(cell, size, {}) for cell in ("lstm", "gru") for size in sizes]
    runs.append(("lstm", SMALL_BIDIRECTIONAL, {"bidirectional": True, "num_layers": 2}))
    for cell, (T, N, I, H), kw in runs:
        impls, diffs, ours = run_rows(cell, T, N, I, H, ("nn", "celldsl"), args, clock, **kw)
        base = impls[0]
        options = ", bidirectional, 2 layers" if kw else ""
        table(f"{cell.upper()}{options}, {size_text(T, N, I, H)}", impls, diffs, base)
        what = f"{ours.label}{options} / {base.label} at {size_text(T, N, I, H)}"
        for key, label in (("fwd", "forward"), ("fwdbwd", "forward+backward")):
            report.at_most(f"{what}, {label}", ms(ours, key) / ms(base, key), 1.0)


def zoo_cells() -> list[str]:
    """The zoo cells a generic layer builds (tests/zoo.py's GENERIC: lstm_proj, slstm_heads and
    phased_lstm need sizes, heads or an extra input the table does not give)."""
    from zoo import GENERIC

    return list(GENERIC)


def needs_i_equal_h(cell: str) -> bool:
    return bool(celldsl.compile_cell(cell).ir.needs_hidden_size)


def zoo_tables(args, clock, report: Report) -> None:
    T, N, I, H = args.size
    rows = ("celldsl", "textbook") + (("compiled",) if args.compile else ())
    print(f"\nEvery zoo cell, {size_text(T, N, I, H)} (I = H = {H} for the cells that need it)\n")
    print("| cell | celldsl fwd ms | celldsl fwd+bwd ms | textbook fwd+bwd ms | textbook / celldsl "
          "| torch.compile fwd+bwd ms | torch.compile / celldsl | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for cell in args.cells or zoo_cells():
        width = H if needs_i_equal_h(cell) else I
        impls, diffs, ours = run_rows(cell, T, N, width, H, rows, args, clock)
        book = next(i for i in impls if i.kind == "textbook")
        comp = next((i for i in impls if i.kind == "compiled"), None)
        vs_book = ms(book, "fwdbwd") / ms(ours, "fwdbwd")
        vs_comp = ms(comp, "fwdbwd") / ms(ours, "fwdbwd") if comp else float("nan")
        source = "" if cell in TEXTBOOK else " (reference_cells)"
        print(f"| {cell}{source} | {ms(ours, 'fwd'):.2f} | {ms(ours, 'fwdbwd'):.2f} "
              f"| {ms(book, 'fwdbwd'):.2f} | {vs_book:.2f} "
              f"| {ms(comp, 'fwdbwd') if comp else float('nan'):.2f} | {vs_comp:.2f} "
              f"| {max(diffs.values()):.1e} |")
        report.at_least(f"{cell}: textbook / celldsl, forward+backward", vs_book, 2.0)
        if comp:
            report.at_least(f"{cell}: torch.compile / celldsl, forward+backward", vs_comp, 1.5)


def long_tables(args, clock, report: Report) -> None:
    T, I, H = args.long
    rows = ("celldsl", "python", "textbook") + (("compiled",) if args.compile else ())
    for N in (1, 32) if not args.smoke else (1, 2):
        for cell in LONG_CELLS:
            width = H if needs_i_equal_h(cell) else I
            impls, diffs, ours = run_rows(cell, T, N, width, H, rows, args, clock)
            table(f"{cell}, {size_text(T, N, width, H)}", impls, diffs, ours)
            book = next(i for i in impls if i.kind == "textbook")
            shipped = next(i for i in impls if i.kind == "python")
            ratio = ms(book, "fwdbwd") / ms(ours, "fwdbwd")
            if N == 1 and cell in ("mingru", "indrnn"):
                report.at_least(f"{cell} N=1: textbook / celldsl, forward+backward", ratio,
                                15.0 if cell == "mingru" else 7.0)
            if N != 1:
                report.at_most(f"{cell} N={N}: celldsl / the Python loop, forward+backward",
                               ms(ours, "fwdbwd") / ms(shipped, "fwdbwd"), 1.0)


def step_tables(args, clock, report: Report) -> None:
    """One step of a cell module with its state in and out (no target: see the module doc)."""
    H = args.size[3]

    def first(result):
        return result[0] if isinstance(result, tuple) else result  # LSTMCell: (h, c)

    for name in ("LSTMCell", "GRUCell", "LSTM", "GRU"):  # a layer on T = 1: input [1, N, I], hx [1, N, H]
        layer = not name.endswith("Cell")
        for N in (args.size[1], 1):
            torch.manual_seed(0)
            ref, ours = getattr(nn, name)(H, H), getattr(celldsl, name)(H, H)
            ours.load_state_dict(ref.state_dict())
            h = torch.randn(1, N, H) if layer else torch.randn(N, H)
            state = (h, torch.randn_like(h)) if name.startswith("LSTM") else h
            impls = [Impl(f"torch.nn.{name}", lambda x, m=ref, s=state: first(m(x, s)), ref.parameters(),
                          "nn"),
                     Impl(f"celldsl.{name}", lambda x, m=ours, s=state: first(m(x, s)), ours.parameters(),
                          "celldsl")]
            x = torch.randn(1, N, H) if layer else torch.randn(N, H)
            measure(impls, x, args.repeats * 20, args.warmup * 20, clock, ("fwd", "fwdbwd"))
            what = "T=1, " if layer else ""
            table(f"{name}, one step with state in and out, {what}N={N} I={H} H={H} (median of "
                  f"{args.repeats * 20})", impls, max_diff(impls, x, impls[1]), impls[0])
            for key, what in (("fwd", "forward"), ("fwdbwd", "forward+backward")):
                report.at_most(f"{name} step N={N}: celldsl / torch.nn, {what}",
                               ms(impls[1], key) / ms(impls[0], key), 1.0)


def matrix_reference(cell: str, heads: int):
    """The textbook einsum loop of tests/matrix_references.py: (p, x, state) -> (out, state)."""
    import matrix_references as mr

    return {"mlstm": lambda p, x, s: mr.ref_mlstm(p, x, s, heads=heads, stabilized=True),
            "gla": lambda p, x, s: mr.ref_gla(p, x, s, heads=heads),
            "deltanet": lambda p, x, s: mr.ref_deltanet(p, x, s, heads=heads),
            "mamba": lambda p, x, s: mr.ref_mamba(mamba_block_params(p), x, s)}[cell]


def mamba_block_params(p: dict) -> dict:
    """mamba.cell's parameters as ref_mamba's block takes them: W_in = [W_in_u; W_in_z], conv_w [D, 4]
    (the taps oldest first)."""
    p = dict(p)
    p["W_in"] = torch.cat([p.pop("W_in_u"), p.pop("W_in_z")])
    p["conv_w"] = torch.stack([p.pop(f"conv_w{j}") for j in range(4)], -1)
    return p


def reference_params(layer) -> dict[str, torch.Tensor]:
    """A MatrixRecurrent's parameters in the references' layout ([heads * rows, I], head-major)."""
    p = {}
    for stored, t in layer.named_parameters():
        name = stored.removesuffix("_l0")
        kind = layer.ir.kinds[name]
        if not kind.head or (kind.rows in ("1", "x") and kind.cols == "1"):
            p[name] = t
        else:
            p[name] = t.reshape(-1, t.shape[-1]) if kind.cols != "1" else t.reshape(-1)
    return p


class CompiledSteps:
    """The reference loop one step at a time, the step (the reference at T = 1) through torch.compile:
    the textbook step compiled, the loop in Python as the textbook's."""

    def __init__(self, ref, p):
        self.ref, self.p = ref, p
        self.step = torch.compile(ref, dynamic=False)

    def __call__(self, x):
        out, state = self.ref(self.p, x[:1], None)  # the zero state, as the reference makes it
        outs = [out]
        for t in range(1, x.shape[0]):
            out, state = self.step(self.p, x[t:t + 1], state)
            outs.append(out)
        return torch.cat(outs)


def matrix_tables(args, clock, report: Report) -> None:
    from celldsl.lang.errors import CellError
    from celldsl.nn.matrix import MatrixRecurrent

    T, N, heads, K, I = args.matrix
    D, N_s, R = args.mamba
    for cell in MATRIX_CELLS:
        if cell == "mamba":  # no heads: one D x N_s state
            sizes, heads_ = {"heads": 1, "D": D, "N_s": N_s, "R": R, "O": I}, 1
            text = f"T={T} N={N} D={D} N_s={N_s} R={R} I=O={I}"
        else:
            sizes, heads_ = {"heads": heads, "K": K, "V": K, "R": R}, heads
            text = f"T={T} N={N} heads={heads} K=V={K} I={I}"
        torch.manual_seed(0)
        try:
            layer = MatrixRecurrent(str(ROOT / "cells" / f"{cell}.cell"), I, sizes, backend="cpu")
        except CellError as exc:  # a cell the cpu backend refuses: say why, measure the others
            why = str(exc).splitlines()[0]
            print(f"\n{cell} (matrix memory), {text}: not measured: {why}")
            report.lines.append(f"- {cell}: not measured (backend cpu refuses it: {why})")
            continue
        ref, p = matrix_reference(cell, heads_), reference_params(layer)
        impls = [Impl(f"celldsl {cell}.cell, backend cpu (fused C loop)", lambda x, m=layer: m(x)[0],
                      layer.parameters(), "celldsl"),
                 Impl("textbook einsum loop, tests/matrix_references.py (autograd)",
                      lambda x, r=ref, p=p: r(p, x, None)[0], layer.parameters(), "textbook")]
        if args.compile:
            try:
                steps = CompiledSteps(ref, p)
                steps(torch.randn(2, N, I)).sum().backward()  # compile now, outside the timings
                impls.append(Impl("torch.compile of the textbook step", steps, layer.parameters(),
                                  "compiled"))
            except Exception as exc:  # noqa: BLE001 - say why the row is missing, keep the others
                print(f"\n(torch.compile does not run here: {type(exc).__name__}: {str(exc)[:200]})")
        x = torch.randn(T, N, I)
        measure(impls, x, args.repeats, args.warmup, clock, ("fwd", "fwdbwd"))
        ours = impls[0]
        table(f"{cell} (matrix memory), {text}", impls, max_diff(impls, x, ours), ours)
        for impl, target in ((impls[1], 3.0), *(((impls[2], 2.0),) if len(impls) > 2 else ())):
            report.at_least(f"{cell}: {impl.label} / celldsl cpu, forward+backward",
                            ms(impl, "fwdbwd") / ms(ours, "fwdbwd"), target)


def cpu_model() -> str:
    """The CPU as /proc/cpuinfo names it, with its vector extensions (the GEMMs' choice depends on them)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(info.get("flags", "").split())
    simd = "AVX-512" if "avx512f" in flags else "AVX2, no AVX-512" if "avx2" in flags else "no AVX2"
    model = info.get("model name", platform.processor() or platform.machine())
    family = f" (family {info['cpu family']} model {info['model']})" if "cpu family" in info else ""
    return f"{model}{family}, {simd}, torch CPU capability {torch.backends.cpu.get_cpu_capability()}"


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tables", default=",".join(DEFAULT_TABLES),
                    help=f"comma-separated subset of {TABLES} (default: {','.join(DEFAULT_TABLES)})")
    ap.add_argument("--matrix-T", type=int, default=1024, help="matrix table: the sequence length")
    ap.add_argument("--cells", default="", help="zoo table: comma-separated cells (default: every zoo cell)")
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per row (the median is reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as it is)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: elapsed time. cpu: this process's CPU time, steadier on a shared machine "
                         "and meaningful only with --threads 1")
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="leave out the torch.compile rows (compiling a step takes seconds per cell)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes, one run, no warm-up, no torch.compile: checks that every row runs")
    args = ap.parse_args(argv)
    args.tables = [t for t in args.tables.split(",") if t]
    for t in args.tables:
        if t not in TABLES:
            ap.error(f"unknown table {t!r}; choose from {TABLES}")
    args.cells = [c for c in args.cells.split(",") if c]
    for c in args.cells:
        if c not in zoo_cells():
            ap.error(f"unknown cell {c!r}; the zoo: {', '.join(zoo_cells())}")
    if args.clock == "cpu" and args.threads != 1:
        ap.error("--clock cpu needs --threads 1 (CPU time adds up the threads)")
    args.size, args.big, args.long = (100, 32, 128, 256), (100, 128, 512, 512), (1000, 64, 128)
    args.matrix = (args.matrix_T, 8, 4, 64, 256)  # T, N, heads, K = V, I
    args.mamba = (256, 16, 16)  # D, N_s, R (also the other cells' gate rank)
    if args.smoke:
        args.size, args.big, args.long = (3, 2, 4, 4), (3, 3, 5, 5), (4, 3, 4)
        args.matrix = (3, 2, 2, 3, 4)
        args.mamba = (5, 3, 2)
        args.repeats, args.warmup, args.compile = 1, 0, False
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_grad_enabled(True)
    command = " ".join(["python bench/cpu.py", *(sys.argv[1:] if argv is None else argv)])
    load = " ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    print(f"command: `{command}`\n")
    print(f"{cpu_model()}; {os.cpu_count()} CPUs, load average {load} at start; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, float32; {args.clock} clock, median of {args.repeats} "
          f"interleaved runs after {args.warmup} warm-up runs")
    report = Report()
    for name, run in (("nn", nn_tables), ("zoo", zoo_tables), ("long", long_tables), ("step", step_tables),
                      ("small", small_tables), ("matrix", matrix_tables)):
        if name in args.tables:
            run(args, clock, report)
    end = " ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    print(f"\nTargets (load average {end} at the end):\n")
    print("\n".join(report.lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
