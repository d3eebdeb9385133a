"""The CPU time loop with each stage's pointwise step one compiled C call (emit/c_source.py).

The generated torch module spends most of a small step in per-operation overhead (an LSTM step is
~25 torch calls forward and ~40 backward, each a few microseconds over [N, H]). Here a step is its
GEMMs (torch.mm into preallocated buffers) and one C call per stage; the backward writes gradients
straight into [T*N, ...] buffers and sums vector gradients inside the kernel, so there are no
per-step lists, stacks or concatenations. The C file is compiled once per cell with the system's C
compiler ($CC, else `cc`) into the compile cache, keyed by its content, and loaded with ctypes.

Fallback: without a working compiler (or with CELLDSL_CPU_FUSED=0), `cpu_loop` returns the plain
TorchLoop. `FusedCPULoop` itself runs the plain loop for what the kernels do not cover: dtypes other
than float32/float64 and non-CPU tensors.

Shapes as in TorchLoop: x [T, N, I] (or packed [rows, I] with batch_sizes), states [N, H], hoisted
weights [rows, I], step weights [rows, K], vectors [H], scalars [].
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

from .. import cache
from ..emit.c_source import backward_schedule, c_source, kernel_specs, summed_products
from ..plan import Plan
from .torch_loop import TorchLoop, _to_width, input_columns, steps_of

DTYPES = {torch.float32: "f32", torch.float64: "f64"}
BASE_FLAGS = ["-std=c99", "-fPIC", "-shared", "-fno-math-errno", "-Wl,-z,defs"]
# first try: tuned for this CPU, OpenMP threads (torch's own libgomp: it is loaded already, and the
# loader shares a library by its soname), glibc's vector math (libmvec); then plainer builds
FAST = ["-O3", "-fopenmp-simd"]
ATTEMPTS = (
    [*FAST, "-march=native", "-fopenmp", "-DCELLDSL_LIBMVEC", "-lmvec", "-lm"],
    [*FAST, "-march=native", "-DCELLDSL_LIBMVEC", "-lmvec", "-lm"],
    [*FAST, "-march=native", "-lm"],
    [*FAST, "-lm"],
)
# gcc's time grows faster than the source: vectorising a 180 kB file took 8 s at -O3, a 470 kB one
# 76 s even at -O1. A large cell (few are: the zoo's C files have 10-40 kB) is built with less
# optimisation, so any cell that passed `check` compiles in well under 30 s.
LARGE_SOURCE, HUGE_SOURCE = 128 << 10, 256 << 10


def attempts(source: str) -> tuple[list[str], ...]:
    """The compiler flags to try in order, by the size of the C source."""
    if len(source) <= LARGE_SOURCE:
        return ATTEMPTS
    return (["-O1", "-lm"],) if len(source) <= HUGE_SOURCE else (["-O0", "-lm"],)


COMPILE_SECONDS = 60  # all attempts together: a safety net (see attempts())
MIN_PARALLEL = 4096  # elements of a step (n * H) below which a kernel runs on one thread
_lock = threading.Lock()
_warned: set[str] = set()


# ---- building the kernels ---------------------------------------------------------------------

def compiler() -> str | None:
    """The C compiler to use: $CC if set (None when it does not exist), else `cc` or `gcc` on PATH."""
    if os.environ.get("CELLDSL_CPU_FUSED", "1") == "0":
        return None
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)
    return shutil.which("cc") or shutil.which("gcc")


def _cpu_fingerprint() -> str:
    """-march=native builds are only valid on the same kind of CPU: the cache key includes it."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return platform.machine() + ":" + flags


def build_library(cell, cache_root: Path | None = None) -> tuple[ctypes.CDLL | None, str]:
    """Compile (or load from the cache) the C kernels of a compiled cell.

    Returns (library, "") or (None, why not). Never raises for a missing or failing compiler. A
    library is loaded only after its bytes match the checksum recorded when it was built (a truncated
    or replaced file would crash the process when mapped); anything else is rebuilt.
    """
    cc = compiler()
    if cc is None:
        reason = "CELLDSL_CPU_FUSED=0" if os.environ.get("CELLDSL_CPU_FUSED") == "0" else \
            "no C compiler found ($CC, cc, gcc)"
        return None, reason
    source = c_source(cell.plan)
    recipe = "\0".join([source, cc, _cpu_fingerprint(), repr(attempts(source))])
    digest = hashlib.sha256(recipe.encode()).hexdigest()
    folder = (cache_root or cache.root()) / cell.key
    lib_path = folder / f"cpu_kernels_{digest[:20]}.so"
    with _lock:
        for _attempt in range(2):  # a library that verifies but does not load is rebuilt once
            if not cache.verified(lib_path):
                error = _build(cc, source, folder, lib_path)
                if error:
                    return None, error
            try:
                return ctypes.CDLL(str(lib_path)), ""
            except OSError as exc:
                load_error = f"cannot load {lib_path}: {exc}"
                lib_path.unlink(missing_ok=True)
        return None, load_error


def _build(cc: str, source: str, folder: Path, lib_path: Path) -> str:
    """Compile `source` into `lib_path` and seal it; "" on success, else why it failed. The attempts
    share one deadline (COMPILE_SECONDS), so a pathological file cannot hold the process for long."""
    errors = []
    try:
        src_path = folder / (lib_path.stem + ".c")
        cache.atomic_write(src_path, source.encode())
        deadline = time.monotonic() + COMPILE_SECONDS
        for extra in attempts(source):
            left = deadline - time.monotonic()
            if left <= 0:
                errors.append(f"gave up after {COMPILE_SECONDS} s")
                break
            err = _compile(cc, src_path, lib_path, extra, left)
            if err is None:
                cache.seal(lib_path)
                return ""
            errors.append(err)
    except OSError as exc:
        errors.append(str(exc))
    return f"the C compiler {cc} failed: {errors[-1] if errors else '?'}"


def _compile(cc: str, src: Path, out: Path, extra: list[str], seconds: float) -> str | None:
    """Compile to a temporary file and move it into place (atomic); None on success, else stderr."""
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        proc = subprocess.run([cc, *BASE_FLAGS, "-o", tmp, str(src), *extra],
                              capture_output=True, text=True, timeout=seconds)
        if proc.returncode != 0:
            return (proc.stderr or proc.stdout).strip()[-2000:]
        os.replace(tmp, out)
        return None
    except subprocess.TimeoutExpired:
        return f"timed out after {seconds:.0f} s"
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cpu_loop(cell) -> TorchLoop:
    """The fastest CPU loop available for a compiled cell: FusedCPULoop, else its plain TorchLoop
    (with a one-time warning saying why)."""
    lib, reason = build_library(cell)
    if lib is None:
        kind = reason.split(":")[0]  # once per kind of failure, not once per cell
        if kind not in _warned and reason != "CELLDSL_CPU_FUSED=0":
            _warned.add(kind)
            warnings.warn(f"celldsl: CPU kernels unavailable ({reason}); running the generated torch "
                          "code instead (slower)", RuntimeWarning, stacklevel=2)
        return cell.torch_loop
    return FusedCPULoop(cell.plan, cell.torch_module, lib)


# ---- the loop -----------------------------------------------------------------------------------

class _Kernel:
    """One stage's C function (its `_at` entry: pointers computed in C) for both dtypes, and its
    argument list (c_source.KernelSpec)."""

    def __init__(self, lib, spec):
        self.spec = spec
        self.fns = {}
        for dt in DTYPES.values():
            fn = getattr(lib, f"{spec.name}_{dt}_at")
            fn.argtypes = [ctypes.c_int64] * 4 + [ctypes.c_void_p, ctypes.c_int64]
            fn.restype = None
            self.fns[dt] = fn
        self.plan = ctypes.c_int64 * (5 * len(spec.args))


class _Arg:
    """Where one kernel argument lives: row r of a step is at base + r * row_bytes (row stride ld
    elements); `prev` arguments (previous states) use the previous step's row, or `first` (the
    initial state) at the first step. Vectors, scalars, accumulators and [N, H] buffers have
    row_bytes 0."""

    __slots__ = ("base", "row_bytes", "ld", "first", "prev")

    def __init__(self, base: int, row_bytes: int, ld: int, first: int = 0, prev: bool = False):
        self.base, self.row_bytes, self.ld, self.first, self.prev = base, row_bytes, ld, first, prev

    @staticmethod
    def rows(t: torch.Tensor) -> _Arg:
        return _Arg(t.data_ptr(), t.stride(0) * t.element_size(), t.stride(0))

    @staticmethod
    def fixed(t: torch.Tensor | None) -> _Arg:
        """The same memory at every step: an [N, H] buffer (rows 0..n-1) or a vector (every row)."""
        return _Arg(0 if t is None else t.data_ptr(), 0, t.stride(0) if t is not None and t.dim() == 2 else 0)


class _Bound:
    """A kernel with its arguments bound for one sequence; call(r, q, n) runs one step."""

    def __init__(self, kernel: _Kernel, dtype: str, hidden: int, args: list[_Arg]):
        self.fn = kernel.fns[dtype]
        self.hidden = hidden
        self.plan = kernel.plan(*[a.base for a in args], *[a.row_bytes for a in args],
                                *[a.first for a in args], *[a.ld for a in args], *[int(a.prev) for a in args])
        self.threads = torch.get_num_threads()

    def __call__(self, r: int, q: int, n: int) -> None:
        threads = self.threads if n * self.hidden >= MIN_PARALLEL else 1
        self.fn(r, q, n, self.hidden, self.plan, threads)


class FusedCPULoop(TorchLoop):
    """TorchLoop's forward and backward with compiled pointwise kernels, padded or packed sequences:
    same arguments, results and saved shapes. One difference in what is saved: the output of a step
    GEMM of `summed_products` holds hoisted + product (what the kernels read), so this loop's
    backward takes this loop's forward only. Each kernel runs over [rows, its width]; a GEMM's blocks
    sit at the offsets their widths give (`_block_offsets`)."""

    def __init__(self, plan: Plan, module, lib):
        super().__init__(plan, module)
        self.kernels = {(s.pointwise, s.backward): _Kernel(lib, s) for s in kernel_specs(plan)}
        self.schedule = backward_schedule(plan)
        self.same_vectors = {self.vectors.index(name): self.vectors.index(mode[5:])
                             for modes in self.schedule.modes.values() for name, mode in modes.items()
                             if mode.startswith("same:") and name in self.vectors}
        touched = {self.where[s.name].index for pw in plan.pointwise for s in pw.grad_inputs
                   if self.where[s.name].kind == "state"}
        touched |= {self.where[g.operand.name].index for g in self.gemms
                    if self.where[g.operand.name].kind == "state"}
        self.untouched_states = [i for i in range(len(self.states)) if i not in touched]
        # inputs whose gradient the kernels write
        self.dx_from_kernels = sorted({s.name for pw in plan.pointwise for s in pw.grad_inputs
                                       if self.where[s.name].kind == "input"})
        # step GEMM g -> (hoisted GEMM, first block): its output is saved as hoisted + product (S)
        self.summed = summed_products(plan)
        self.summed_blocks: dict[str, tuple[int, int]] = {}  # hoisted symbol -> (step GEMM, block)
        self.zero_blocks: set[str] = set()  # product symbols read as 0 (their value is inside S)
        for gi, (hi, first) in self.summed.items():
            for j, q in enumerate(self.gemms[gi].products):
                self.summed_blocks[self.hoisted[hi].products[first + j].name] = (gi, j)
                self.zero_blocks.add(q.name)
        # per GEMM: (operand is a state, state index or operand name)
        self.gemm_operands = [(self.where[g.operand.name].kind == "state", self.where[g.operand.name].index)
                              for g in self.gemms]

    def fused(self, x, states, hoisted_w, step_w, vectors, scalars) -> bool:
        """Whether the compiled kernels handle these arguments (else the plain loop runs them): CPU
        tensors of float32 or float64, GEMMs without heads. Raises ValueError for shapes the kernels
        would read out of bounds."""
        if x.device.type != "cpu" or x.dtype not in DTYPES:
            return False
        if not all(t.device.type == "cpu" and t.dtype == x.dtype
                   for t in (*states, *hoisted_w, *step_w, *vectors, *scalars)):
            return False
        if any(w.dim() != 2 for w in (*hoisted_w, *step_w)):
            return False  # block-diagonal GEMMs (heads) run in the plain loop
        self._check_shapes(x, states, hoisted_w, step_w, vectors, scalars)
        return True

    def _check_shapes(self, x, states, hoisted_w, step_w, vectors, scalars) -> None:
        if len(states) != len(self.states) or len(vectors) != len(self.vectors) or \
                len(scalars) != len(self.scalars) or len(step_w) != len(self.gemms) or \
                len(hoisted_w) != len(self.hoisted):
            raise ValueError(
                f"cell {self.plan.ir.name!r} takes {len(self.states)} states, {len(self.hoisted)} hoisted "
                f"and {len(self.gemms)} step weights, {len(self.vectors)} vectors, {len(self.scalars)} "
                f"scalars; got {len(states)}, {len(hoisted_w)}, {len(step_w)}, {len(vectors)}, "
                f"{len(scalars)}")
        ir = self.plan.ir
        if states[0].dim() != 2:
            raise ValueError(f"state {self.states[0]!r} must be [N, width], got {tuple(states[0].shape)}")
        sizes = self.sizes(states, vectors, hoisted_w, step_w)
        N = states[0].shape[0]
        for name, s in zip(self.states, states, strict=True):
            if tuple(s.shape) != (N, sizes[ir.width(name)]):
                raise ValueError(f"state {name!r} must be [N, {ir.width(name)}] = {(N, sizes[ir.width(name)])}, "
                                 f"got {tuple(s.shape)}")
        for name, v in zip(self.vectors, vectors, strict=True):
            if tuple(v.shape) != (sizes[ir.width(name)],):
                raise ValueError(f"vector {name!r} must have shape ({sizes[ir.width(name)]},), got {tuple(v.shape)}")
        for name, v in zip(self.scalars, scalars, strict=True):
            if v.numel() != 1:
                raise ValueError(f"scalar {name!r} must have one element, got shape {tuple(v.shape)}")
        for kind, ws, gemms in (("hoisted", hoisted_w, self.hoisted), ("step", step_w, self.gemms)):
            for w, g in zip(ws, gemms, strict=True):
                rows = sum(sizes[b] for b in g.widths)
                if w.dim() != 2 or w.shape[0] != rows:
                    counts = {w: g.widths.count(w) for w in dict.fromkeys(g.widths)}
                    widths = " + ".join(f"{n} * {w}" if n > 1 else w for w, n in counts.items())
                    raise ValueError(f"{kind} weight [{', '.join(g.params)}] must have {widths} = {rows} rows, "
                                     f"got {tuple(w.shape)}")
        if len(self.inputs) > 1:
            cols = input_columns(self.plan, x.shape[-1], sizes, hoisted_w)
            widths = {name: c.stop - c.start for name, c in cols.items()}
        else:
            widths = {self.inputs[0]: x.shape[-1]}
        for pw in self.plan.pointwise:
            for sym in pw.inputs:
                name = self.shifted.get(sym.name, (sym.name,))[0]
                if self.where[sym.name].kind != "input" or ir.width(name) == "row":
                    continue
                if widths[name] != sizes[pw.width]:
                    raise ValueError(f"this cell uses its input {name!r} elementwise with {pw.width}-wide values: "
                                     f"it must have {pw.width} = {sizes[pw.width]} features, got {widths[name]}")

    # ---- argument pointers ----------------------------------------------------------------------

    @staticmethod
    def _block_offsets(gemms, sizes) -> list[list[int]]:
        """Per GEMM, the first column of each block in its output (blocks have their own widths)."""
        offsets = []
        for g in gemms:
            starts, at = [], 0
            for w in g.widths:
                starts.append(at)
                at += sizes[w]
            offsets.append(starts)
        return offsets

    def _input(self, name: str, bufs: dict) -> _Arg:
        """A pointwise input of the forward (and the backward, which reads the same values)."""
        slot = self.where[name]
        isz = bufs["X"].element_size()
        if name in self.summed_blocks:  # hoisted + product, saved in the step GEMM's output
            gi, j = self.summed_blocks[name]
            arg = _Arg.rows(bufs["step"][gi])
            arg.base += bufs["step_blocks"][gi][j] * isz
            return arg
        if name in self.zero_blocks:
            return _Arg.fixed(bufs["zero"])
        if slot.kind == "state":  # the previous state: the initial one at the first step
            news = bufs["news"][slot.index]
            arg = _Arg.rows(news)
            arg.first, arg.prev = bufs["states"][slot.index].data_ptr(), True
            return arg
        if slot.kind in ("hoisted", "product"):
            hoisted = slot.kind == "hoisted"
            arg = _Arg.rows((bufs["hoisted"] if hoisted else bufs["step"])[slot.index])
            arg.base += (bufs["hoisted_blocks"] if hoisted else bufs["step_blocks"])[slot.index][slot.block] * isz
            return arg
        if slot.kind == "vector":
            return _Arg.fixed(bufs["vectors"][slot.index])
        if slot.kind == "scalar":
            return _Arg.fixed(bufs["scalars"][slot.index])
        if slot.kind == "input":
            return _Arg.rows(bufs["xs"][name])
        return _Arg.rows(bufs["operands"][name])

    def _output(self, name: str, bufs: dict) -> _Arg:
        if name in bufs["operands"]:
            return _Arg.rows(bufs["operands"][name])
        if name.endswith("'") and name[:-1] in self.states:
            return _Arg.rows(bufs["news"][self.states.index(name[:-1])])
        return _Arg.rows(bufs["out"])

    # ---- forward --------------------------------------------------------------------------------

    def forward(self, x, states, hoisted_w, step_w, vectors, scalars, batch_sizes=None):
        if not self.fused(x, states, hoisted_w, step_w, vectors, scalars):
            return super().forward(x, states, hoisted_w, step_w, vectors, scalars, batch_sizes)
        with torch.no_grad():
            return self._forward(x, states, hoisted_w, step_w, vectors, scalars, batch_sizes)

    @staticmethod
    def _contiguous(x, states, vectors, scalars, batch_sizes):
        """(X [rows, I], steps, offsets, states, vectors, scalars), contiguous as the kernels read them."""
        X, steps, offsets = steps_of(x, batch_sizes, states[0].shape[0])
        return (X.contiguous(), steps, offsets, [s.contiguous() for s in states],
                [v.contiguous() for v in vectors], [s.contiguous() for s in scalars])

    def _buffers(self, X, steps, offsets, states, vectors, scalars, hoisted_w, step_w, sizes) -> dict:
        """What every kernel argument points into, for one call (see _input)."""
        return {"X": X, "xs": self.split_inputs(X, sizes, hoisted_w, steps, offsets), "states": states,
                "vectors": vectors, "scalars": scalars, "zero": X.new_zeros(max(sizes.values())),
                "hoisted_blocks": self._block_offsets(self.hoisted, sizes),
                "step_blocks": self._block_offsets(self.gemms, sizes)}

    def _forward(self, x, states, hoisted_w, step_w, vectors, scalars, batch_sizes):
        N = states[0].shape[0]
        X, steps, offsets, states, vectors, scalars = self._contiguous(x, states, vectors, scalars, batch_sizes)
        rows = X.shape[0]
        ir = self.plan.ir
        sizes = self.sizes(states, vectors, hoisted_w, step_w)
        bufs = self._buffers(X, steps, offsets, states, vectors, scalars, hoisted_w, step_w, sizes)
        hoisted_ops = self._hoisted_operands(bufs["xs"], vectors, scalars)
        hoisted_out = [torch.mm(op, w.t()) for op, w in zip(hoisted_ops, hoisted_w, strict=True)]
        news = [X.new_empty(rows, sizes[ir.width(s)]) for s in self.states]
        out = news[self.output_state] if self.output_state is not None else X.new_empty(rows, self.output_width(sizes))
        step_out = [X.new_empty(rows, w.shape[0]) for w in step_w]
        operands = {name: X.new_empty(rows, sizes[self.width_of[name]]) for name in self.operand_names}
        bufs |= {"news": news, "out": out, "step": step_out, "hoisted": hoisted_out, "operands": operands}
        calls = {}
        for k, (_gemm_ids, steps_k) in enumerate(self.stages):
            for i, st in enumerate(steps_k):
                kernel = self.kernels[(st.pw.name, False)]
                args = [self._input(a.name, bufs) if a.part == "input" else self._output(a.name, bufs)
                        for a in kernel.spec.args]
                calls[(k, i)] = _Bound(kernel, DTYPES[X.dtype], sizes[st.pw.width], args)
        w_t = [w.t().contiguous() for w in step_w]  # [K, rows]: MKL is a little faster on this layout
        hoisted_starts = bufs["hoisted_blocks"]
        q = -1
        for b, r in zip(steps, offsets, strict=True):
            for k, (gemm_ids, steps_k) in enumerate(self.stages):
                for gi in gemm_ids:
                    is_state, index = self.gemm_operands[gi]
                    if not is_state:
                        opnd = operands[index][r : r + b]
                    else:
                        opnd = states[index][:b] if q < 0 else news[index][q : q + b]
                    if gi in self.summed:  # S = hoisted rows + opnd @ W.T, in one GEMM call
                        hi, first = self.summed[gi]
                        start = hoisted_starts[hi][first]
                        cols = slice(start, start + w_t[gi].shape[1])
                        torch.addmm(hoisted_out[hi][r : r + b, cols], opnd, w_t[gi],
                                    out=step_out[gi][r : r + b])
                    else:
                        torch.mm(opnd, w_t[gi], out=step_out[gi][r : r + b])
                for i in range(len(steps_k)):
                    calls[(k, i)](r, q, b)
            q = r
        # the final state of the sequences that end at step t is rows [b_{t+1}, b_t) of its new state
        if steps[-1] == N:
            finals = [n[rows - N :].clone() for n in news]
        else:
            ends = [*steps[1:], 0]
            finals = [torch.cat([n[offsets[t] + ends[t] : offsets[t] + steps[t]]
                                 for t in reversed(range(len(steps))) if ends[t] < steps[t]]) for n in news]
        saved = (
            [s for i, s in enumerate(news) if i != self.output_state]
            + step_out
            + [operands[name] for name in self.operand_names]
            + hoisted_out
        )
        if batch_sizes is None:
            out = out.view(x.shape[0], x.shape[1], -1)
        return out, finals, saved

    # ---- backward -------------------------------------------------------------------------------

    def backward(self, x, states, hoisted_w, step_w, vectors, scalars, out, saved, grad_out, grad_states,
                 batch_sizes=None, needs_dx: bool = True):
        """As TorchLoop.backward. needs_dx=False skips the input gradient's GEMM over all steps (a
        first layer's input needs none) and returns zeros for dx."""
        if not self.fused(x, states, hoisted_w, step_w, vectors, scalars):
            return super().backward(x, states, hoisted_w, step_w, vectors, scalars, out, saved, grad_out,
                                    grad_states, batch_sizes, needs_dx)
        with torch.no_grad():
            return self._backward(x, states, hoisted_w, step_w, vectors, scalars, out, saved, grad_out,
                                  grad_states, batch_sizes, needs_dx)

    def _backward(self, x, states, hoisted_w, step_w, vectors, scalars, out, saved, grad_out, grad_states,
                  batch_sizes, needs_dx):
        N = states[0].shape[0]
        X, steps, offsets, states, vectors, scalars = self._contiguous(x, states, vectors, scalars, batch_sizes)
        rows = X.shape[0]
        ir = self.plan.ir
        sizes = self.sizes(states, vectors, hoisted_w, step_w)
        news, step_all, operands, hoisted_out = self._unpack_saved(saved, out, sizes)
        bufs = self._buffers(X, steps, offsets, states, vectors, scalars, hoisted_w, step_w, sizes)
        bufs |= {"news": [n.contiguous() for n in news], "step": [s.contiguous() for s in step_all],
                 "hoisted": [h.contiguous() for h in hoisted_out],
                 "operands": {k: v.contiguous() for k, v in operands.items()}}
        news, operands, xs = bufs["news"], bufs["operands"], bufs["xs"]
        out_width = self.output_width(sizes)
        g_out = grad_out.reshape(rows, out_width).contiguous() if grad_out is not None else None
        zeros = X.new_zeros(N, out_width)
        # d loss / d (state i's new value) at the current step: B[i]; its old value, being written: A[i]
        widths = [sizes[ir.width(s)] for s in self.states]
        B = [g.contiguous().clone() if g is not None else X.new_zeros(N, w) for g, w in zip(grad_states, widths,
                                                                                             strict=True)]
        A = [X.new_empty(N, w) for w in widths]
        d_step = [X.new_empty(rows, w.shape[0]) for w in step_w]
        alias = self.schedule.hoisted_alias
        d_hoist = [d_step[alias[i]] if i in alias else X.new_empty(rows, w.shape[0])
                   for i, w in enumerate(hoisted_w)]
        dx_rows = {name: X.new_empty(rows, xs[name].shape[1]) for name in self.dx_from_kernels}
        acc_vec = [torch.zeros(v.shape[0], dtype=torch.float64) for v in vectors]
        acc_scal = [torch.zeros(1, dtype=torch.float64) for _ in self.scalars]
        dops = {name: X.new_empty(N, sizes[self.width_of[name]]) for name in self.operand_names}
        isz = X.element_size()

        def bind(pw, A, B) -> _Bound:
            kernel = self.kernels[(pw.name, True)]
            args = []
            for a in kernel.spec.args:
                if a.part == "input":
                    args.append(self._input(a.name, bufs))
                elif a.part == "grad_output":
                    if a.name in dops:
                        args.append(_Arg.fixed(dops[a.name]))
                    elif a.name.endswith("'") and a.name[:-1] in self.states:
                        args.append(_Arg.fixed(B[self.states.index(a.name[:-1])]))
                    else:  # the per-step output, not a state
                        args.append(_Arg.rows(g_out) if g_out is not None else _Arg.fixed(zeros))
                elif a.mode.startswith("same:"):  # not written by the kernel
                    args.append(_Arg.fixed(None))
                else:
                    slot = self.where[a.name]
                    if slot.kind == "state":
                        args.append(_Arg.fixed(A[slot.index]))
                    elif slot.kind in ("hoisted", "product"):
                        hoisted = slot.kind == "hoisted"
                        arg = _Arg.rows((d_hoist if hoisted else d_step)[slot.index])
                        starts = bufs["hoisted_blocks"] if hoisted else bufs["step_blocks"]
                        arg.base += starts[slot.index][slot.block] * isz
                        args.append(arg)
                    elif slot.kind == "input":
                        args.append(_Arg.rows(dx_rows[a.name]))
                    elif slot.kind == "vector":
                        args.append(_Arg.fixed(acc_vec[slot.index]))
                    else:
                        args.append(_Arg.fixed(acc_scal[slot.index]))
            return _Bound(kernel, DTYPES[X.dtype], sizes[pw.width], args)

        # kernels bound for both parities of the (A, B) swap
        calls = [{(k, i): bind(st.pw, a, b) for k, (_g, steps_k) in enumerate(self.stages)
                  for i, st in enumerate(steps_k)} for a, b in ((A, B), (B, A))]
        add_out = g_out is not None and self.output_state is not None
        for t in reversed(range(len(steps))):
            b, r = steps[t], offsets[t]
            q = offsets[t - 1] if t > 0 else -1
            parity = (len(steps) - 1 - t) % 2
            cur_A, cur_B = (A, B) if parity == 0 else (B, A)
            if add_out:
                cur_B[self.output_state][:b].add_(g_out[r : r + b])
            for k in reversed(range(len(self.stages))):
                gemm_ids, steps_k = self.stages[k]
                for i in range(len(steps_k)):
                    calls[parity][(k, i)](r, q, b)
                for gi in gemm_ids:
                    dP = d_step[gi][r : r + b]
                    is_state, index = self.gemm_operands[gi]
                    if not is_state:
                        torch.mm(dP, step_w[gi], out=dops[index][:b])
                    elif gi in self.schedule.first_gemm[k]:
                        torch.mm(dP, step_w[gi], out=cur_A[index][:b])
                    else:
                        cur_A[index][:b].addmm_(dP, step_w[gi])
            for i in self.untouched_states:
                cur_A[i][:b].zero_()
            if b < N:  # rows past b did not run at step t: their gradient passes through unchanged
                for a_i, b_i in zip(cur_A, cur_B, strict=True):
                    a_i[b:].copy_(b_i[b:])
        dstate = A if len(steps) % 2 == 1 else B  # the buffers written last: the initial states' gradients

        d_step_w = []
        for gi in range(len(self.gemms)):
            dP = d_step[gi]
            is_state, index = self.gemm_operands[gi]
            if not is_state:
                d_step_w.append(torch.mm(dP.t(), operands[index]))
            elif steps[-1] == N:  # operand rows: the initial state, then every new state but the last
                dw = torch.mm(dP[:N].t(), states[index])
                if rows > N:
                    dw.addmm_(dP[N:].t(), news[index][: rows - N])
                d_step_w.append(dw)
            else:
                d_step_w.append(torch.mm(dP.t(), self._previous_all(index, states, news, steps, offsets)))
        dx = {name: _to_width(d, xs[name]) for name, d in dx_rows.items()}  # input name -> [rows, its width]
        d_hoisted_w = []
        d_hoist_ops: dict[str, torch.Tensor] = {}
        hoisted_ops = self._hoisted_operands(xs, vectors, scalars)
        for gi, g in enumerate(self.hoisted):
            d_hoisted_w.append(torch.mm(d_hoist[gi].t(), hoisted_ops[gi]))
            name = g.operand.name
            if not needs_dx and not self.hoist and self.where[name].kind == "input":
                continue  # the operand is an input itself
            d_op = torch.mm(d_hoist[gi], hoisted_w[gi])
            d_hoist_ops[name] = d_op if name not in d_hoist_ops else d_hoist_ops[name] + d_op
        d_vectors = [acc_vec[self.same_vectors.get(i, i)].to(X.dtype) for i in range(len(acc_vec))]
        d_scal = [a[0].to(X.dtype) for a in acc_scal]
        for st in self.hoist:
            args = [self._static(s, xs, vectors, scalars) for s in st.slots]
            grads = [d_hoist_ops.pop(n, None) for n, _ in st.pw.outputs]
            grads = [g if g is not None else X.new_zeros(rows, sizes[self.width_of[n]])
                     for g, (n, _) in zip(grads, st.pw.outputs, strict=True)]
            for sym, res in zip(st.pw.grad_inputs, st.backward(*args, *grads), strict=True):
                if res is None:
                    continue
                slot = self.where[sym.name]
                if slot.kind == "input":
                    res = _to_width(res, xs[slot.index])
                    dx[slot.index] = res if slot.index not in dx else dx[slot.index] + res
                elif slot.kind == "vector":
                    d_vectors[slot.index] = d_vectors[slot.index] + res.reshape(-1, res.shape[-1]).sum(0)
                elif slot.kind == "scalar":
                    d_scal[slot.index] = d_scal[slot.index] + res.sum()
        for name, d_op in d_hoist_ops.items():
            if self.where[name].kind == "input":
                dx[name] = d_op if name not in dx else dx[name] + d_op
        dx = self.join_input_grads(dx, X, sizes, hoisted_w, steps, offsets)
        dx = torch.zeros_like(x) if dx is None or not needs_dx else dx.reshape(x.shape)
        return dx, list(dstate), d_hoisted_w, d_step_w, d_vectors, d_scal
