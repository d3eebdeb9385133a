"""CPU speed of the torch backend: celldsl vs torch.nn (oneDNN) vs a textbook per-gate PyTorch cell.

Run from the repository root (prints the command, a markdown table and the targets):

    .venv/bin/python bench/cpu.py                       # T=100, N=32, I=128, H=256, torch's threads
    .venv/bin/python bench/cpu.py --threads 1 --clock cpu    # steadier on a busy machine
    .venv/bin/python bench/cpu.py --T 4 --N 2 --I 8 --H 8 --repeats 1 --warmup 0   # smoke size

Every implementation of a cell runs with the same weights (torch.nn.LSTM/GRU's state_dict is loaded
into the celldsl layer; the textbook cells copy celldsl's `cell_parameter`s), and the table's last
column is the largest output difference from celldsl, so the rows compare like with like.
"textbook" is what one writes from the paper: one nn.Linear per gate and operand, applied every
step, autograd for the backward. Timings are interleaved (each repeat runs every implementation once,
in turn) and the median is reported, so slow drifts of the machine hit all rows alike.

forward: inference under torch.no_grad(). forward+backward: forward with autograd, then
`output.backward(g)` for a fixed random g, parameter gradients set to None before each run; the
input needs no gradient (a first layer). Threads: torch's default unless --threads (printed).
celldsl rows (--paths): the generated torch code and the C kernels of runtime/cpu_fused.py, each
forced on a private copy of the cell; the last one is the reference of the ratio column.
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

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

import celldsl  # noqa: E402

ZOO_CELLS = ("greff_vanilla", "mut1", "slstm")
ALL_CELLS = ("lstm", "gru", *ZOO_CELLS)


# ---- textbook cells: one nn.Linear per gate and operand, one Python step per time step --------------

class Textbook(nn.Module):
    """A cell written from its paper: `step(x_t, state) -> (y_t, state)` applied T times.

    x [T, N, I] -> (y [T, N, H], final state tuple of [N, H]).
    """

    def __init__(self, linears: dict[str, tuple[int, int, bool]], vectors: tuple[str, ...], hidden: int):
        super().__init__()
        self.lin = nn.ModuleDict({k: nn.Linear(i, o, bias=b) for k, (i, o, b) in linears.items()})
        self.vec = nn.ParameterDict({k: nn.Parameter(torch.zeros(hidden)) for k in vectors})
        self.hidden = hidden

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, ...]):
        ys = []
        for x_t in x:
            y, state = self.step(x_t, state)
            ys.append(y)
        return torch.stack(ys), state


class TextbookLSTM(Textbook):
    """torch.nn.LSTM's equations (gates i, f, g, o; biases b_i* and b_h*)."""

    def __init__(self, I: int, H: int):
        super().__init__({f"{w}{g}": (I if w == "i" else H, H, True) for w in "ih" for g in "ifgo"}, (), H)

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

    def load_from(self, layer) -> None:
        for w in "ih":
            for g in "ifgo":
                self.lin[f"{w}{g}"].weight.data.copy_(layer.cell_parameter(f"W_{w}{g}"))
                self.lin[f"{w}{g}"].bias.data.copy_(layer.cell_parameter(f"b_{w}{g}"))


class TextbookGRU(Textbook):
    """torch.nn.GRU's equations: reset applied after the recurrent product."""

    def __init__(self, I: int, H: int):
        super().__init__({f"{w}{g}": (I if w == "i" else H, H, True) for w in "ih" for g in "rzn"}, (), H)

    def step(self, x, state):
        (h,) = state
        L = self.lin
        r = torch.sigmoid(L["ir"](x) + L["hr"](h))
        z = torch.sigmoid(L["iz"](x) + L["hz"](h))
        n = torch.tanh(L["in"](x) + r * L["hn"](h))
        h = (1 - z) * n + z * h
        return h, (h,)

    def load_from(self, layer) -> None:
        for w in "ih":
            for g in "rzn":
                self.lin[f"{w}{g}"].weight.data.copy_(layer.cell_parameter(f"W_{w}{g}"))
                self.lin[f"{w}{g}"].bias.data.copy_(layer.cell_parameter(f"b_{w}{g}"))


class TextbookGreffVanilla(Textbook):
    """Greff et al. 2015 vanilla LSTM: peepholes p_i, p_f on c^{t-1}, p_o on c^t; state (c, y)."""

    def __init__(self, I: int, H: int):
        lin = {f"W_{g}": (I, H, True) for g in "zifo"} | {f"R_{g}": (H, H, False) for g in "zifo"}
        super().__init__(lin, ("p_i", "p_f", "p_o"), H)

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

    def load_from(self, layer) -> None:
        for g in "zifo":
            self.lin[f"W_{g}"].weight.data.copy_(layer.cell_parameter(f"W_{g}"))
            self.lin[f"W_{g}"].bias.data.copy_(layer.cell_parameter(f"b_{g}"))
            self.lin[f"R_{g}"].weight.data.copy_(layer.cell_parameter(f"R_{g}"))
        for g in "ifo":
            self.vec[f"p_{g}"].data.copy_(layer.cell_parameter(f"p_{g}"))


class TextbookMUT1(Textbook):
    """Jozefowicz et al. 2015 MUT1: z from the input only, un-weighted tanh(x) (needs I == H)."""

    def __init__(self, I: int, H: int):
        lin = {"xz": (I, H, True), "xr": (I, H, True), "hr": (H, H, False), "hh": (H, H, True)}
        super().__init__(lin, (), H)

    def step(self, x, state):
        (h,) = state
        L = self.lin
        z = torch.sigmoid(L["xz"](x))
        r = torch.sigmoid(L["xr"](x) + L["hr"](h))
        h = torch.tanh(L["hh"](r * h) + torch.tanh(x)) * z + h * (1 - z)
        return h, (h,)

    def load_from(self, layer) -> None:
        for k, b in (("xz", "b_z"), ("xr", "b_r"), ("hr", None), ("hh", "b")):
            self.lin[k].weight.data.copy_(layer.cell_parameter(f"W_{k}"))
            if b is not None:
                self.lin[k].bias.data.copy_(layer.cell_parameter(b))


class TextbookSLSTM(Textbook):
    """Beck et al. 2024 sLSTM, one head, stabilised exponential input gate; state (h, c, n, m)."""

    def __init__(self, I: int, H: int):
        lin = {f"W_{g}": (I, H, True) for g in "zifo"} | {f"R_{g}": (H, H, False) for g in "zifo"}
        super().__init__(lin, (), H)

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

    def load_from(self, layer) -> None:
        for g in "zifo":
            self.lin[f"W_{g}"].weight.data.copy_(layer.cell_parameter(f"W_{g}"))
            self.lin[f"W_{g}"].bias.data.copy_(layer.cell_parameter(f"b_{g}"))
            self.lin[f"R_{g}"].weight.data.copy_(layer.cell_parameter(f"R_{g}"))


TEXTBOOK = {
    "lstm": TextbookLSTM,
    "gru": TextbookGRU,
    "greff_vanilla": TextbookGreffVanilla,
    "mut1": TextbookMUT1,
    "slstm": TextbookSLSTM,
}
TITLE = {
    "lstm": "LSTM",
    "gru": "GRU",
    "greff_vanilla": "Greff vanilla LSTM (peepholes)",
    "mut1": "MUT1",
    "slstm": "sLSTM (1 head)",
}
N_STATES = {"lstm": 2, "gru": 1, "greff_vanilla": 2, "mut1": 1, "slstm": 4}


# ---- the implementations of one cell ------------------------------------------------------------

class Impl:
    """One row: `run(x) -> output [T, N, H]` with parameters `params` (for zeroing gradients)."""

    def __init__(self, label: str, run: Callable[[torch.Tensor], torch.Tensor], params):
        self.label, self.run, self.params = label, run, list(params)
        self.times: dict[str, list[float]] = {"fwd": [], "fwdbwd": []}


PATH_LABELS = {
    None: " [backend auto]",
    "plain": " [generated torch code]",
    "fused": " [C kernels]",
}


def celldsl_layer(cell: str, I: int, H: int, path: str | None):
    """The celldsl layer of a zoo cell. path None: the layer as the library builds it. Otherwise the
    CPU loop is forced: "plain" (the generated torch module, runtime/torch_loop.py), "fused" (C
    kernels, runtime/cpu_fused.py: what backend="auto" runs on CPU tensors). A forced path compiles a
    private copy of the cell text (its own cache key), so that the paths run side by side in one
    process."""
    if path is None:
        if cell == "lstm" and hasattr(celldsl, "LSTM"):
            return celldsl.LSTM(I, H)
        if cell == "gru" and hasattr(celldsl, "GRU"):
            return celldsl.GRU(I, H)
        return celldsl.Recurrent(cell, I, H)
    from celldsl.runtime import cpu_fused
    from celldsl.runtime.function import cell_for

    text = (ROOT / "cells" / f"{cell}.cell").read_text() + f"\n# bench/cpu.py: {path} path\n"
    layer = celldsl.Recurrent(text, I, H)
    compiled = cell_for(layer.compiled.key)  # the cell object the registered ops look up
    if path == "plain":
        loop = compiled.torch_loop
    else:
        loop = cpu_fused.cpu_loop(compiled)
        if not isinstance(loop, cpu_fused.FusedCPULoop):
            why = cpu_fused.build_library(compiled)[1]
            raise SystemExit(f"the fused CPU path is unavailable here: {why}")
    for c in {id(compiled): compiled, id(layer.compiled): layer.compiled}.values():
        c.loop = lambda backend, loop=loop: loop
    return layer


def impls_for(cell: str, I: int, H: int, N: int, paths) -> list[Impl]:
    torch.manual_seed(0)
    impls: list[Impl] = []
    if cell in ("lstm", "gru"):
        ref = (nn.LSTM if cell == "lstm" else nn.GRU)(I, H)
        onednn = " (oneDNN)" if torch.backends.mkldnn.is_available() else ""
        impls.append(Impl(f"torch.nn.{cell.upper()}{onednn}", lambda x, m=ref: m(x)[0], ref.parameters()))
    layers = []
    for path in paths:
        layer = celldsl_layer(cell, I, H, path)
        if cell in ("lstm", "gru"):
            layer.load_state_dict(ref.state_dict())
        elif layers:
            layer.load_state_dict(layers[0].state_dict())
        layers.append(layer)
        name = {"lstm": "celldsl.LSTM", "gru": "celldsl.GRU"}.get(cell, f"celldsl {cell}.cell")
        impls.append(Impl(name + PATH_LABELS[path], lambda x, m=layer: m(x)[0], layer.parameters()))
    book = TEXTBOOK[cell](I, H)
    book.load_from(layers[0])
    zeros = tuple(torch.zeros(N, H) for _ in range(N_STATES[cell]))
    impls.append(Impl("textbook per-gate (autograd)", lambda x, m=book: m(x, zeros)[0], book.parameters()))
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


def measure(impls: list[Impl], x: torch.Tensor, repeats: int, warmup: int, clock) -> None:
    with torch.no_grad():
        g = torch.randn_like(impls[-1].run(x))
    for backward, key in ((False, "fwd"), (True, "fwdbwd")):
        for _ in range(warmup):
            for impl in impls:
                time_once(impl, x, g, backward, clock)
        for _ in range(repeats):
            for impl in impls:  # interleaved: every repeat runs every implementation once
                impl.times[key].append(time_once(impl, x, g, backward, clock))


def max_diff(impls: list[Impl], x: torch.Tensor, base: Impl) -> dict[str, float]:
    with torch.no_grad():
        want = base.run(x)
        return {i.label: float((i.run(x) - want).abs().max()) for i in impls}


STAT = {"median": statistics.median, "min": min}
_stat = statistics.median


def ms(seconds: list[float]) -> float:
    return 1000.0 * _stat(seconds)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", type=int, default=100)
    ap.add_argument("--N", type=int, default=32)
    ap.add_argument("--I", type=int, default=128)
    ap.add_argument("--H", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per row (the median is reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--cells", default=",".join(ALL_CELLS), help=f"comma-separated subset of {ALL_CELLS}")
    ap.add_argument("--paths", default="plain,default",
                    help="celldsl rows, comma-separated: 'default' (the layer as the library builds it: "
                         "backend auto), 'plain' (generated torch code, backend torch), 'fused' (the C "
                         "kernels forced). The last one is the reference of the ratios.")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as it is)")
    ap.add_argument("--stat", choices=tuple(STAT), default="median",
                    help="median of the repeats, or min (the least disturbed run, on a shared machine)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: elapsed time. cpu: this process's CPU time, steadier on a shared machine "
                         "and meaningful only with --threads 1")
    args = ap.parse_args(argv)
    args.cells = [c for c in args.cells.split(",") if c]
    for c in args.cells:
        if c not in ALL_CELLS:
            ap.error(f"unknown cell {c!r}; choose from {ALL_CELLS}")
    args.paths = [None if p == "default" else p for p in args.paths.split(",") if p]
    for p in args.paths:
        if p not in PATH_LABELS:
            ap.error(f"unknown path {p!r}; choose from default, plain, fused")
    if args.clock == "cpu" and args.threads != 1:
        ap.error("--clock cpu needs --threads 1 (CPU time adds up the threads)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    global _stat
    _stat = STAT[args.stat]
    torch.set_grad_enabled(True)
    command = " ".join(["python bench/cpu.py", *(sys.argv[1:] if argv is None else argv)])
    load = " ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    print(f"command: `{command}`\n")
    print(f"{platform.machine()}, {os.cpu_count()} CPUs (load average {load} at start), "
          f"torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, float32, T={args.T} N={args.N} I={args.I} H={args.H}; "
          f"{args.clock} clock, {args.stat} of {args.repeats} interleaved runs after {args.warmup} warm-up "
          "runs; "
          "forward under no_grad, forward+backward with parameter gradients only\n")
    print("| cell | implementation | forward ms | forward+backward ms | fwd+bwd / celldsl | max abs diff |")
    print("|---|---|---:|---:|---:|---:|")
    summary = []
    for cell in args.cells:
        I = args.H if cell == "mut1" else args.I  # MUT1's un-weighted tanh(x) needs I == H
        impls = impls_for(cell, I, args.H, args.N, args.paths)
        x = torch.randn(args.T, args.N, I)
        measure(impls, x, args.repeats, args.warmup, clock)
        ref = [i for i in impls if i.label.startswith("celldsl")][-1]
        diffs = max_diff(impls, x, ref)
        title = TITLE[cell] + (f" (I=H={args.H})" if I != args.I else "")
        for impl in impls:
            ratio = ms(impl.times["fwdbwd"]) / ms(ref.times["fwdbwd"])
            print(f"| {title} | {impl.label} | {ms(impl.times['fwd']):.1f} | {ms(impl.times['fwdbwd']):.1f} "
                  f"| {ratio:.2f} | {diffs[impl.label]:.1e} |")
        if cell == "lstm":
            tnn = impls[0]
            r = ms(ref.times["fwdbwd"]) / ms(tnn.times["fwdbwd"])
            summary.append(f"- LSTM forward+backward, {ref.label} / {tnn.label}: {r:.2f} (target <= 1.3)")
        if cell in ZOO_CELLS:
            r = ms(impls[-1].times["fwdbwd"]) / ms(ref.times["fwdbwd"])
            summary.append(f"- {TITLE[cell]} forward+backward, textbook / {ref.label}: {r:.2f}x "
                           "(target >= 1.5)")
    print("\n" + "\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
