"""Which GEMM runs each product of the CPU loops, chosen per shape by measurement and cached on disk.

The fastest GEMM depends on the machine: on this project's AMD EPYC (AVX2) celldsl's own kernel
(targets/c/emit_gemm.py) beats MKL (torch.mm) and oneDNN on the per-step shapes; on an Intel CPU MKL takes
its AVX-512 path and may win. So, as cuDNN's "find" does, the first use of a product at a (kind,
shape, dtype, threads) times every backend available for it a few times and keeps the fastest, in
$CELLDSL_CACHE/cpu_gemm.json (JSON, never pickle; a missing, corrupt or foreign file is measured
again and rewritten).

Kinds of products (w is the weight as the layer stores it, [n, k]):

    step           out[b, n] (=, +=, = bias +) a[b, k] @ w.T    every time step (forward)
    step_backward  out[b, k] (=, +=) d[b, n] @ w                 every time step (backward)
    hoisted        out[rows, n] = bias + x[rows, k] @ w.T        once per call (input projection)
    input_grad     out[rows, k] = d[rows, n] @ w                 once per call (d x)
    weight_grad    out[n, k] (=, +=) d[rows, n].T @ a[rows, k]   once per call and weight (d W)

The native weight gradient transposes d first (its tiles read rows of A, and d.T's rows are d's
columns) and runs the rows in chunks, each packed as B, summed into out: on an AMD EPYC with
AVX-512 (Zen 5) it reached 158-196 GFLOP/s where MKL's transposed-A GEMM takes its AVX2 path at
81-97 (bench/cpu_gemm.py, docs/results/cpu/bench_gemm_1thread.md).

Backends: "native" (celldsl's kernel; for the step kinds it means the whole time loop runs in C,
targets/c/native.py), "mm" (torch.mm/addmm: MKL or OpenBLAS), "onednn" (torch.ops.mkldnn's
_linear_pointwise on the plain weight) and "onednn_packed" (the weight reordered once per call by
_reorder_linear_weight). The oneDNN ops are torch internals: they are used only when
torch.backends.mkldnn.is_available(), for float32, when their schema is the one this code was
written against, and after they computed a small product right; else they are not candidates.

CELLDSL_CPU_GEMM=<backend> forces a backend wherever it is available (benchmarks, tests).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import math
import os
import threading
import time
from dataclasses import dataclass

import torch

from ... import cache
from . import scratch
from .emit_gemm import gemm_source
from .flags import ATTEMPTS, BASE_FLAGS, cpu_fingerprint

BACKENDS = ("native", "mm", "onednn", "onednn_packed")
KINDS = ("step", "step_backward", "hoisted", "input_grad", "weight_grad")
CACHE_FILE = "cpu_gemm.json"
# 3: weight_grad sites, measured with a scratch pool and padded rows; 4: small products measured on the
# one thread they run on (`native_threads`; older entries: measured again)
FORMAT = 4
BIG_ROWS = 4096  # products over all rows are measured at min(rows rounded up to a power of 2, this)
# rows of a weight gradient per chunk, in bytes of a row of d.T: 1024 floats (a panel of 32 columns,
# 128 kB, stays in the L2 cache); 256 and 512 ran 5-15% slower at (12800 x 2048 x 512), one thread
WEIGHT_GRAD_CHUNK_BYTES = 4096
TRANSPOSE_PAD = 16  # elements of padding per row of d.T (see WeightGrads)
SECONDS_PER_TIMING = 2e-3  # one timing repeats a product for at least this long
# multiply-adds of a product below which the native kernels run on one thread: a team's barrier costs
# more than it saves, and on a busy machine a team waits for its second core for a scheduler's time
# slice. Measured on two threads, a 3 x 16 x 16 step product took 6.7 ms a call on a loaded 2-core
# machine (one thread: ~1.5 us); remembered, such a timing sent small cells to the Python loop.
MIN_PARALLEL_WORK = 1 << 16
ROUNDS = 5  # interleaved rounds; the minimum of the rounds is kept (the least disturbed run)
ONEDNN_SCHEMAS = {
    "_linear_pointwise": "mkldnn::_linear_pointwise(Tensor X, Tensor W, Tensor? B, str attr, "
                         "Scalar?[] scalars, str? algorithm) -> Tensor Y",
    "_linear_pointwise.binary": "mkldnn::_linear_pointwise.binary(Tensor X, Tensor other, Tensor W, "
                                "Tensor? B, str attr) -> Tensor Y",
    "_reorder_linear_weight": "mkldnn::_reorder_linear_weight(Tensor self, int? batch_size=None) -> Tensor Y",
}
DTYPES = {torch.float32: "f32", torch.float64: "f64"}

_lock = threading.RLock()
_choices: dict[str, dict] = {}  # this process's view of the cache file: site key -> entry
_loaded = False
_generation = 0  # counts the changes to _choices: what a choice remembered elsewhere was made under
_onednn: bool | None = None


@dataclass(frozen=True)
class Site:
    """One product of the loop at one shape: m rows (the batch b, or all rows), k, n as above."""

    kind: str
    dtype: torch.dtype
    m: int
    k: int
    n: int
    threads: int

    @property
    def key(self) -> str:
        return f"{self.kind}/{DTYPES[self.dtype]}/{self.m}x{self.k}x{self.n}/t{self.threads}"


def site(kind: str, dtype: torch.dtype, m: int, k: int, n: int) -> Site:
    """The site of a product at the current thread count; products over all rows are measured at a
    representative row count (their cost per row is flat beyond a few thousand)."""
    if kind in ("hoisted", "input_grad", "weight_grad"):
        m = min(BIG_ROWS, 1 << max(0, math.ceil(math.log2(max(m, 1)))))
    return Site(kind, dtype, m, k, n, torch.get_num_threads())


# ---- oneDNN through torch internals, guarded ----------------------------------------------------------

def onednn_available() -> bool:
    """True when torch's oneDNN linear ops exist with the expected schemas and compute a small
    product right (checked once per process)."""
    global _onednn
    if _onednn is None:
        _onednn = _check_onednn()
    return _onednn and torch.backends.mkldnn.is_available()


def _check_onednn() -> bool:
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        ops = torch.ops.mkldnn
        for name, schema in ONEDNN_SCHEMAS.items():
            base, _, overload = name.partition(".")
            if str(getattr(getattr(ops, base), overload or "default")._schema) != schema:
                return False
        gen = torch.Generator().manual_seed(0)
        a, w = torch.randn(3, 8, generator=gen), torch.randn(5, 8, generator=gen)
        bias, other = torch.randn(5, generator=gen), torch.randn(3, 5, generator=gen)
        want = torch.addmm(bias, a, w.t())
        packed = ops._reorder_linear_weight(w, 3)
        got = [ops._linear_pointwise(a, w, bias, "none", [], ""),
               ops._linear_pointwise(a, packed, bias, "none", [], ""),
               ops._linear_pointwise.binary(a, other, packed, bias, "add") - other]
        return all(torch.allclose(g, want, rtol=1e-4, atol=1e-4) for g in got)
    except (AttributeError, RuntimeError, TypeError):
        return False


def candidates(kind: str, dtype: torch.dtype, native: bool) -> list[str]:
    """The backends that can run a product of this kind and dtype here."""
    names = ["native"] if native and dtype in DTYPES else []
    names.append("mm")
    if dtype == torch.float32 and onednn_available():
        if kind in ("step", "step_backward"):
            names += ["onednn", "onednn_packed"]
        elif kind == "hoisted":
            names.append("onednn")
    return names


# ---- the products, per backend --------------------------------------------------------------------------

class NativeGemm:
    """The native kernel of a built cell library (targets/c/emit_gemm.py) for one dtype."""

    def __init__(self, lib, dtype: torch.dtype):
        dt = DTYPES[dtype]
        self.dtype = dtype
        self.width = int(getattr(lib, f"cd_panel_width_{dt}")())
        # 0 for a library without it (an older GEMM source: bench/cpu.py's A/B): no infer chunks
        height = getattr(lib, f"cd_tile_height_{dt}", None)
        self.height = int(height()) if height is not None else 0
        self._pack = getattr(lib, f"cd_pack_{dt}")
        self._gemm = getattr(lib, f"cd_gemm_{dt}")
        self._repeat = getattr(lib, f"cd_gemm_repeat_{dt}")
        self._transpose = getattr(lib, f"cd_transpose_matrix_{dt}")
        for fn, n in ((self._pack, 9), (self._gemm, 11), (self._repeat, 12), (self._transpose, 7)):
            fn.argtypes = [ctypes.c_int64] * n
            fn.restype = None
        # None for a library without it (an older GEMM source)
        self._rows = getattr(lib, f"cd_gemm_rows_list_{dt}", None)
        if self._rows is not None:
            self._rows.argtypes = [ctypes.c_int64, ctypes.c_void_p]
            self._rows.restype = None

    def panels(self, n: int) -> int:
        return -(-n // self.width)

    def pack(self, w: torch.Tensor, groups: int, n: int, k: int, s_n: int, s_k: int, s_group: int,
             threads: int = 1, out: torch.Tensor | None = None) -> torch.Tensor:
        """B(k, c) = w[g * s_group + c * s_n + k * s_k] (c < n) in panels, for each group g (into the
        first elements of `out` when given)."""
        size = groups * self.panels(n) * self.width * k
        out = torch.empty(size, dtype=self.dtype) if out is None else out.view(-1)[:size]
        self._pack(groups, n, k, w.data_ptr(), s_n, s_k, s_group, out.data_ptr(), threads)
        return out

    def pack_transposed(self, w: torch.Tensor, groups: int = 1, threads: int = 1) -> torch.Tensor:
        """Panels of B = w.T for w [groups * n, k] contiguous: out (+)= a @ w.T, group by group."""
        n, k = w.shape[0] // groups, w.shape[1]
        return self.pack(w, groups, n, k, k, 1, n * k, threads)

    def pack_plain(self, w: torch.Tensor, threads: int = 1, out: torch.Tensor | None = None) -> torch.Tensor:
        """Panels of B = w for w [k, n] contiguous: out (+)= d @ w (into `out` when given: a prepared
        call's panels, packed again at every call)."""
        k, n = w.shape
        return self.pack(w, 1, n, k, 1, n, 0, threads, out)

    def gemm(self, a: torch.Tensor, panels: torch.Tensor, out: torch.Tensor, init: int = 0,
             bias: torch.Tensor | None = None, threads: int = 1, reps: int = 0) -> None:
        """out (init 0: =, 1: +=, 2: = bias +) a @ B; a [M, K] and out [M, n] with unit column stride."""
        M, K = a.shape
        args = (M, out.shape[1], K, a.data_ptr(), a.stride(0), panels.data_ptr(), out.data_ptr(),
                out.stride(0), init, bias.data_ptr() if bias is not None else 0, threads)
        if reps:
            self._repeat(reps, *args)
        else:
            self._gemm(*args)

    @property
    def has_rows(self) -> bool:
        return self._rows is not None

    @staticmethod
    def rows_call(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, init: int = 0,
                  bias: torch.Tensor | None = None, threads: int = 1,
                  bias2: torch.Tensor | None = None) -> tuple[int, ...]:
        """The arguments of one row-major product (`rows`): out (init 0: =, 1: +=, 2: = bias +,
        3: += bias +) (bias2 +, if given) a @ w.T, w [n, K] read as it is, no packing (a weight that
        may change between calls); a, w and out with unit column stride, the biases contiguous. They
        hold the tensors' addresses: the caller keeps the tensors."""
        M, K = a.shape
        return (M, w.shape[0], K, a.data_ptr(), a.stride(0), w.data_ptr(), w.stride(0), out.data_ptr(),
                out.stride(0), init, bias.data_ptr() if bias is not None else 0,
                bias2.data_ptr() if bias2 is not None else 0, threads)

    def rows(self, calls: list[tuple[int, ...]]):
        """A call without arguments that runs these products (`rows_call`) in order, in one native
        call, on the memory of their tensors as it is at that time."""
        args = (ctypes.c_int64 * (13 * len(calls)))(*[v for call in calls for v in call])
        run = functools.partial(self._rows, len(calls), ctypes.addressof(args))
        run.args_array = args  # kept alive with the call
        return run

    def transpose(self, t: torch.Tensor, threads: int = 1, out: torch.Tensor | None = None) -> torch.Tensor:
        """t.T, contiguous (into `out` [c, r] when given); t [r, c] with unit column stride."""
        out = t.new_empty(t.shape[1], t.shape[0]) if out is None else out
        self._transpose(t.shape[0], t.shape[1], t.data_ptr(), t.stride(0), out.data_ptr(), out.stride(0),
                        threads)
        return out

    def weight_grad(self, d_t: torch.Tensor, a: torch.Tensor, out: torch.Tensor, accumulate: bool = False,
                    threads: int = 1, take=None) -> None:
        """out [n, k] (= or +=) d_t [n, rows] @ a [rows, k] (d_t: d transposed, unit column stride), the
        rows in chunks of WEIGHT_GRAD_CHUNK_BYTES per row of d_t: each chunk's panels stay in cache,
        and out is read and written once per chunk. take(rows, cols, dtype): where the panels go
        (scratch.buffers; None: a new tensor)."""
        n, rows = d_t.shape
        chunk = max(1, WEIGHT_GRAD_CHUNK_BYTES // d_t.element_size())
        if rows == 0 and not accumulate:
            out.zero_()
        space = None
        if rows and take is not None:
            space = take(min(rows, chunk), self.panels(a.shape[1]) * self.width, a.dtype)
        for r0 in range(0, rows, chunk):
            r1 = min(rows, r0 + chunk)
            panels = self.pack(a[r0:r1], 1, a.shape[1], r1 - r0, 1, a.stride(0), 0, threads, space)
            init = int(accumulate or r0 > 0)  # the first chunk sets out, the others add to it
            self._gemm(n, a.shape[1], r1 - r0, d_t.data_ptr() + r0 * d_t.element_size(), d_t.stride(0),
                       panels.data_ptr(), out.data_ptr(), out.stride(0), init, 0, threads)


def _mkldnn():
    return torch.ops.mkldnn


class TorchProduct:
    """out (=, +=, = bias +) a @ w.T (kind "step", "hoisted") or a @ w (kind "step_backward",
    "input_grad") with torch: the weight prepared once (transposed, reordered) for the calls to come."""

    def __init__(self, backend: str, kind: str, w: torch.Tensor, batch: int | None = None):
        self.backend = backend
        transposed = kind in ("step", "hoisted")  # out = a @ w.T
        if backend == "mm":
            # MKL is a little faster on [k, n] contiguous than on the transposed view (measured)
            self.w = w.t().contiguous() if transposed else w
        else:
            w_nk = w if transposed else w.t().contiguous()  # oneDNN computes a @ W.T for W [n, k]
            self.w = _mkldnn()._reorder_linear_weight(w_nk, batch) if backend == "onednn_packed" else w_nk

    def __call__(self, a: torch.Tensor, out: torch.Tensor, init: int = 0, bias: torch.Tensor | None = None):
        if self.backend == "mm":
            if init == 1:
                out.addmm_(a, self.w)
            elif init == 2:
                torch.addmm(bias, a, self.w, out=out)
            else:
                torch.mm(a, self.w, out=out)
            return
        ops = _mkldnn()
        if init == 1 and out.is_contiguous():
            out.copy_(ops._linear_pointwise.binary(a, out, self.w, None, "add"))
        else:
            y = ops._linear_pointwise(a, self.w, bias if init == 2 else None, "none", [], "")
            out.add_(y) if init == 1 else out.copy_(y)


class NativeProduct:
    """The same products with celldsl's kernel, for the Python loop (cells the native loop cannot
    express: layernorm, a projection): the weight packed into panels once per call, one ctypes
    call per step. a and out need unit column stride (rows of the loop's buffers have it)."""

    backend = "native"

    def __init__(self, lib, kind: str, w: torch.Tensor, threads: int, rows: int | None = None):
        """rows: of the operands it will multiply (None: unknown, `threads` threads)."""
        threads = threads if rows is None else native_threads(rows * w.numel(), threads)
        self.native, self.threads = native_gemm(lib, w.dtype), threads
        w = w.contiguous()
        self.panels = self.native.pack_transposed(w, 1, threads) if kind in ("step", "hoisted") else \
            self.native.pack_plain(w, threads)

    def __call__(self, a: torch.Tensor, out: torch.Tensor, init: int = 0, bias: torch.Tensor | None = None):
        self.native.gemm(a, self.panels, out, init, bias.contiguous() if init == 2 else None, self.threads)


def native_threads(macs: int, threads: int) -> int:
    """The threads the native kernels use for a product of `macs` multiply-adds: one below
    MIN_PARALLEL_WORK (the native loop's steps follow the same rule: native.NativeLoop.threads)."""
    return 1 if macs < MIN_PARALLEL_WORK else threads


def product(backend: str, kind: str, w: torch.Tensor, batch: int, lib) -> TorchProduct | NativeProduct:
    """A step product of `kind` with weight w run by `backend` (what `choose` returned)."""
    if backend == "native":
        return NativeProduct(lib, kind, w, torch.get_num_threads(), rows=batch)
    return TorchProduct(backend, kind, w, batch)


# ---- measuring and remembering ------------------------------------------------------------------------

def _machine() -> str:
    """What a measurement is valid for: the CPU, torch, the native kernel's source and its build flags."""
    text = "\0".join([cpu_fingerprint(), torch.__version__, gemm_source(), repr(BASE_FLAGS), repr(ATTEMPTS)])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _path():
    return cache.root() / CACHE_FILE


def _read_file() -> dict[str, dict]:
    """The entries of the cache file, or {} when it is missing, unreadable, corrupt or foreign (or not a
    regular file of ours: a FIFO there would block the read forever; see cache.read_trusted)."""
    try:
        data = json.loads(cache.read_trusted(_path()).decode("utf-8"))
    except cache.UnsafeCacheError:
        raise
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("machine") != _machine():
        return {}
    sites = data.get("sites")
    if not isinstance(sites, dict):
        return {}
    return {k: v for k, v in sites.items() if isinstance(k, str) and _valid(v)}


def _valid(entry) -> bool:
    if not isinstance(entry, dict) or entry.get("choice") not in BACKENDS:
        return False
    seconds = entry.get("seconds")
    return isinstance(seconds, dict) and all(
        name in BACKENDS and isinstance(s, int | float) and s > 0 for name, s in seconds.items())


def _remember(key: str, entry: dict) -> None:
    global _generation
    _choices[key] = entry
    _generation += 1
    try:  # merge with what other processes wrote meanwhile; a write that fails costs a re-measure
        merged = {**_read_file(), **_choices}
        data = {"format": FORMAT, "machine": _machine(), "sites": merged}
        cache.atomic_write(_path(), json.dumps(data, indent=1, sort_keys=True).encode())
    except cache.UnsafeCacheError:
        raise
    except OSError:
        pass


def timings(s: Site, lib, native: bool = True) -> dict[str, float]:
    """Seconds per call of each backend available for site `s` (measured once, then cached)."""
    global _loaded
    names = candidates(s.kind, s.dtype, native and lib is not None)
    with _lock:
        if not _loaded:
            _choices.update(_read_file())
            _loaded = True
        entry = _choices.get(s.key)
        if entry is None or not set(names) <= set(entry["seconds"]):
            seconds = measure(s, lib, names)
            entry = {"choice": preferred(seconds), "seconds": seconds}
            _remember(s.key, entry)
    return {name: entry["seconds"][name] for name in names if name in entry["seconds"]}


def forced() -> str | None:
    name = os.environ.get("CELLDSL_CPU_GEMM", "").strip()
    if name and name not in BACKENDS:
        raise ValueError(f"CELLDSL_CPU_GEMM must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name or None


def choose(s: Site, lib, native: bool = True, force: str | None = None) -> str:
    """The backend for site `s`: `force` (or $CELLDSL_CPU_GEMM) when available for it, else the
    fastest measured."""
    force = force or forced()
    names = candidates(s.kind, s.dtype, native and lib is not None)
    if force in names:
        return force
    if force is not None and force != "native":  # e.g. onednn without mkldnn: the measured choice
        names = [n for n in names if n != "native"]
    if len(names) == 1:
        return names[0]
    seconds = timings(s, lib, native)
    return preferred({n: seconds.get(n, math.inf) for n in names})


# The native GEMM is kept unless another is this much faster on the site's micro-benchmark: it is what
# the native time loop runs (no Python per step), and what infer's in-cache projection chunks and the
# LSTM's fused step tiles need, gains the micro-benchmark of one product cannot see. Measured by
# picking by the bare minimum: the hoisted 4096 x 128 x 1024 product timed native 4.85 ms, oneDNN
# 4.83 (noise), and the LSTM forward at N=32 then ran neither chunks nor fused steps, 3-5% slower; a
# step site at N=128 H=512 that timed oneDNN's packed GEMM 1.31 ms against native's 1.40 sent the
# layer to the Python loop: 315 ms a call against 231-250 ms in the native loop.
NATIVE_MARGIN = 1.07


def preferred(seconds: dict[str, float]) -> str:
    """The backend to use given each one's measured seconds: the fastest, but native when it is within
    NATIVE_MARGIN of it."""
    fastest = min(seconds, key=seconds.get)
    native = seconds.get("native", math.inf)
    return "native" if native <= NATIVE_MARGIN * seconds[fastest] else fastest


def measure(s: Site, lib, names: list[str]) -> dict[str, float]:
    """Time each backend on random data of the site's shape: interleaved rounds, the minimum kept
    (process CPU time of this thread at one thread, wall time beyond). A backend that fails or
    computes a wrong product is left out."""
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=s.dtype)  # noqa: E731
    transposed = s.kind in ("step", "hoisted")
    w = rand(s.m, s.k) if s.kind == "weight_grad" else rand(s.n, s.k)  # weight_grad: w is the operand
    a = rand(s.m, s.k if transposed else s.n)
    bias = rand(s.n) if s.kind == "hoisted" else None
    if s.kind == "weight_grad":
        want = a.t() @ w
    else:
        want = torch.addmm(bias, a, w.t()) if bias is not None else (a @ w.t() if transposed else a @ w)
    runs = {}
    for name in names:
        try:
            run = _runner(name, s, lib, a, w, bias)
            got = run(1)
            if not torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()) + 1e-6):
                continue
            runs[name] = run
        except (RuntimeError, ValueError, TypeError, OSError, AttributeError):
            continue
    clock = time.thread_time if s.threads == 1 else time.perf_counter
    reps = {}
    for name, run in runs.items():
        once = math.inf
        for _ in range(3):  # the least disturbed of three calls sets the repeats (one stalled call: 1)
            start = clock()
            run(1)
            once = min(once, clock() - start)
        reps[name] = max(1, min(1000, int(SECONDS_PER_TIMING / max(once, 1e-7))))
    best = {name: math.inf for name in runs}
    for _ in range(ROUNDS):
        for name, run in runs.items():
            start = clock()
            run(reps[name])
            best[name] = min(best[name], (clock() - start) / reps[name])
    return {name: max(t, 1e-9) for name, t in best.items()} or {"mm": 1.0}


def _runner(name, s: Site, lib, a, w, bias):
    """run(reps) -> the product (of the last repeat), for one backend at the site's shape."""
    if s.kind == "hoisted":
        return lambda reps: [_linear_with(name, a, w, bias, lib) for _ in range(reps)][-1]
    if s.kind == "input_grad":
        return lambda reps: [_matmul_with(name, a, w, lib) for _ in range(reps)][-1]
    if s.kind == "weight_grad":  # its temporaries from a scratch pool, as in the backward
        def run(reps):
            for _ in range(reps):
                with scratch.buffers() as take:
                    out = WeightGrads(a, lib, force=name, take=take)(w)
            return out
        return run
    transposed = s.kind == "step"
    out = a.new_empty(s.m, s.n if transposed else s.k)
    if name == "native":
        product = NativeProduct(lib, s.kind, w, s.threads, rows=s.m)  # the threads it will run on

        def run(reps):
            product.native.gemm(a, product.panels, out, 0, None, product.threads, reps=reps)
            return out
        return run
    product = TorchProduct(name, s.kind, w, s.m)

    def run(reps):
        for _ in range(reps):
            product(a, out)
        return out
    return run


@functools.cache
def native_gemm(lib, dtype: torch.dtype) -> NativeGemm:
    return NativeGemm(lib, dtype)


def _linear_with(backend: str, a, w, bias, lib):
    if backend == "native":
        native, threads = native_gemm(lib, a.dtype), torch.get_num_threads()
        out = a.new_empty(a.shape[0], w.shape[0])
        panels = native.pack_transposed(w.contiguous(), 1, threads)
        native.gemm(a, panels, out, 0 if bias is None else 2, bias, threads)
        return out
    if backend == "onednn":
        return _mkldnn()._linear_pointwise(a, w.contiguous(), bias, "none", [], "")
    return torch.mm(a, w.t()) if bias is None else torch.addmm(bias, a, w.t())


def _matmul_with(backend: str, d, w, lib):
    if backend == "native":
        native, threads = native_gemm(lib, d.dtype), torch.get_num_threads()
        out = d.new_empty(d.shape[0], w.shape[1])
        native.gemm(d, native.pack_plain(w.contiguous(), threads), out, 0, None, threads)
        return out
    return torch.mm(d, w)


def linear(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, lib, backend: str):
    """a [rows, k] @ w[n, k].T (+ bias) as a new tensor (the hoisted projection), with `backend`: the
    one chosen for its site, `choose(site("hoisted", ...))` (targets/c/fused.py's call plan)."""
    return _linear_with(backend, a.contiguous(), w, bias, lib)


def matmul(d: torch.Tensor, w: torch.Tensor, lib, force: str | None = None):
    """d [rows, n] @ w [n, k] as a new tensor (the input gradient), with the backend chosen for its shape."""
    d = d.contiguous()
    backend = choose(site("input_grad", d.dtype, d.shape[0], w.shape[1], w.shape[0]), lib, force=force)
    return _matmul_with(backend, d, w, lib)


class WeightGrads:
    """The weight gradients d.T @ a of one GEMM gradient d [rows, n], one per operand a (or per row
    range of d: a state operand is the initial state for the first N rows, then the new states), each
    with the backend chosen for its shape. The native backend transposes d once for all of them.
    take(rows, cols, dtype): where its temporaries go (scratch.buffers: fresh pages fault on their
    first write, a third of the transpose's time at [3200, 768]); None: new tensors."""

    def __init__(self, d: torch.Tensor, lib, force: str | None = None, take=None):
        self.d, self.lib, self.force, self.take = d, lib, force, take
        self._d_t = None

    def __call__(self, a: torch.Tensor, start: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
        """d[start : start + rows of a].T @ a, as a new [n, k] tensor, or added onto `out`."""
        d, rows = self.d, a.shape[0]
        backend = choose(site("weight_grad", d.dtype, d.shape[0], a.shape[1], d.shape[1]), self.lib,
                         force=self.force)
        if backend != "native":
            part = d[start : start + rows].t()
            return torch.mm(part, a) if out is None else out.addmm_(part, a)
        native, threads = native_gemm(self.lib, d.dtype), torch.get_num_threads()
        if self._d_t is None:
            # d.T's rows TRANSPOSE_PAD elements longer than needed: the tiles read 12 of them at once,
            # and a row stride of a multiple of 4 kB maps them all to one set of the L1 cache
            # (4096 x 512 x 128: 6.5 ms unpadded, 4.2 padded, MKL 7.3)
            width = d.shape[0] + TRANSPOSE_PAD
            space = self.take(d.shape[1], width, d.dtype) if self.take is not None else \
                d.new_empty(d.shape[1], width)
            self._d_t = native.transpose(d.contiguous() if d.stride(-1) != 1 else d, threads,
                                         space[:, : d.shape[0]])
        result = out if out is not None else d.new_empty(d.shape[1], a.shape[1])
        native.weight_grad(self._d_t[:, start : start + rows], a.contiguous(), result, out is not None,
                           threads, self.take)
        return result


def reset() -> None:
    """Forget this process's view of the cache and of oneDNN's availability (tests)."""
    global _loaded, _onednn, _generation
    with _lock:
        _choices.clear()
        _loaded = False
        _onednn = None
        _generation += 1


def generation() -> int:
    """A number that changes whenever a choice may change (a measurement, `reset`): callers that keep
    a choice (targets/c/fused.py's call plans) key it on this."""
    return _generation
