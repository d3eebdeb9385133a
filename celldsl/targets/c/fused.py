"""The CPU time loop with each stage's pointwise step one compiled C call (targets/c/emit.py).

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
import functools
import hashlib
import math
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from ... import cache
from ...plan import Plan
from ..loop import TorchLoop, fit_gradient, steps_of, to_width
from . import gemm as cpu_gemm
from . import memory, scratch
from .emit import backward_schedule, c_source, folding, kernel_specs
from .emit_gemm import gemm_source
from .emit_loop import native_blocker
from .flags import ATTEMPTS, BACKGROUND_NICE, BASE_FLAGS, QUICK_LEVEL, cpu_fingerprint
from .gemm import DTYPES
from .native import BackGemm, NativeLoop, Rows, StepGemm

# gcc's time grows faster than the source: vectorising a 180 kB file took 8 s at -O3, a 470 kB one
# 76 s even at -O1. A large cell (few are: the zoo's C files have 10-40 kB) is built with less
# optimisation, so any cell that passed `check` compiles in well under 30 s. ln_lstm's C (194 kB, both
# element types) builds in 8-10 s at -O3 and its kernels run 3-4x faster than at -O1.
LARGE_SOURCE, HUGE_SOURCE = 200 << 10, 256 << 10


def attempts(source: str) -> tuple[list[str], ...]:
    """The compiler flags to try in order, by the size of the C source."""
    if len(source) <= LARGE_SOURCE:
        return ATTEMPTS
    return (["-O1", "-lm"],) if len(source) <= HUGE_SOURCE else (["-O0", "-lm"],)


COMPILE_SECONDS = 60  # all attempts together: a safety net (see attempts())
MIN_PARALLEL = 4096  # elements of a step (n * H) below which a kernel runs on one thread
# What a step of the Python loop costs beyond its GEMMs (a C call per pointwise stage, the loop's
# bookkeeping), which the native loop does not pay and the GEMM micro-benchmark does not see:
# forced onto the Python loop, the LSTM at T=100 N=1 took 9.55 ms against the native loop's 5.20
# (43 us a step) while the micro-benchmark had the two step GEMMs within 1 us of each other (38.1
# and 37.3 us), and chose the Python loop. Counted at about half of that, to stay on the safe side
# for a faster machine. It grows with the step too (its values go through memory between the torch
# GEMM and the C kernels): at T=100 N=128 I=H=512 the micro-benchmark had oneDNN's packed GEMM at
# 1.21 ms a step against native's 1.33, and the Python loop took 295-315 ms a call against 231-250 in
# the native loop, ~0.75 ms a step more. So the torch GEMMs must win by PYTHON_STEP_FACTOR too (that
# step's cost beyond its GEMM is ~60% of the GEMM's, N=1's ~110%: counted at half of the smaller).
PYTHON_STEP_SECONDS = 20e-6
PYTHON_STEP_FACTOR = 1.3
CALL_PLANS = 64  # signatures a loop remembers the call plan of
# a PreparedSequence's limit, in elements of x and of the states over all steps (rows * (I + widths)).
# Its time against the op's infer, LSTM and GRU at one thread (bench in docs/benchmarks.md): 0.36-0.38x
# at 10-15 K elements, 0.74 at 100-150 K, 0.84-0.90 at 160-250 K, 0.93-1.02 at 400-600 K, 1.12 at
# 1.2-2 M (its copies in and out, and no in-cache projection chunks or fused step tiles)
SEQUENCE_ELEMENTS = 1 << 18
_lock = threading.RLock()
_warned: set[str] = set()
_gemm_libraries: dict[tuple, tuple] = {}  # (cache root, compiler) -> build_gemm_library's result
_gemm_builds: dict[tuple, threading.Thread] = {}  # the same key -> its background build (gemm_library_soon)
_cell_builds: dict[str, tuple] = {}  # an -O3 library file -> (its build thread, [its result]) (library_soon)
_path_locks: dict[str, threading.RLock] = {}  # a library file -> the lock its build and load hold


# ---- building the kernels ---------------------------------------------------------------------

def compiler_command() -> tuple[list[str] | None, str]:
    """The C compiler command and "" , or (None, why there is none). $CC is split as make and the shell
    split it, a program and its arguments ("gcc -O2", "ccache gcc"); unset or empty: `cc`, else `gcc`."""
    if os.environ.get("CELLDSL_CPU_FUSED", "1") == "0":
        return None, "CELLDSL_CPU_FUSED=0"
    cc = os.environ.get("CC", "")
    if not cc.strip():
        found = shutil.which("cc") or shutil.which("gcc")
        return ([found], "") if found else (None, "no C compiler found: $CC is not set and neither cc nor "
                                                  "gcc is on PATH")
    try:
        words = shlex.split(cc)
    except ValueError as err:
        return None, f"cannot read $CC={cc!r}: {err}"
    if not words:
        return None, f"$CC={cc!r} names no program"
    program = shutil.which(words[0])
    if program is None:
        return None, f"no C compiler: the program {words[0]!r} of $CC={cc!r} is not found (or not executable)"
    return [program, *words[1:]], ""


def compiler() -> str | None:
    """The C compiler's program (the first word of $CC, found on PATH), or None when there is none."""
    command, _why = compiler_command()
    return command[0] if command else None


def build_library(cell, cache_root: Path | None = None, *, source: str | None = None,
                  background: bool = False) -> tuple[ctypes.CDLL | None, str]:
    """Compile (or load from the cache) the C kernels of a compiled cell.

    Returns (library, "") or (None, why not). Never raises for a missing or failing compiler. A
    library is loaded only after its bytes match the checksum recorded when it was built (a truncated
    or replaced file would crash the process when mapped), and used only when it has every function
    the loop calls; anything else is rebuilt or refused. `source`: c_source(cell.plan), when the caller
    has it; `background`: the compiler runs at a lower priority (a build nobody waits for).
    """
    return _library(source or c_source(cell.plan), (cache_root or cache.root()) / cell.key, "cpu_kernels",
                    cell_symbols(cell.plan), background=background)


def background_builds() -> bool:
    """Whether libraries missing from the cache may build in the background while a quicker path runs
    (the Python loop on torch's GEMMs, the quick (-Og) kernels). Its results agree with the final library's
    only up to the order of sums, so the same call could give other last bits once a library is
    swapped in: not with `torch.use_deterministic_algorithms(True)`, which asks for the same numbers
    from the same inputs, nor with CELLDSL_BACKGROUND_BUILD=0."""
    if os.environ.get("CELLDSL_BACKGROUND_BUILD", "1") == "0":
        return False
    return not torch.are_deterministic_algorithms_enabled()


def quick_attempts(source: str) -> tuple[list[str], ...]:
    """attempts(source) at QUICK_LEVEL (-Og): the same code and flags but the optimisation level,
    built in a fraction of the time (flags.py: ln_lstm's kernels ~4x faster to build than at -O1)."""
    return tuple([QUICK_LEVEL if flag in ("-O1", "-O3") else flag for flag in extra]
                 for extra in attempts(source))


def cell_library_soon(cell) -> tuple[ctypes.CDLL | None, str, str | None]:
    """(library, why not, key of a background build or None): the -O3 library when it is in the
    cache (or background builds are off: CELLDSL_BACKGROUND_BUILD=0), else the quick (-Og) build of the
    same source now and the -O3 one in a background thread (`cell_library_ready(key)`), each under its
    own file's lock, cache checks and seal."""
    source = c_source(cell.plan)
    return library_soon(source, cache.root() / cell.key, "cpu_kernels", cell_symbols(cell.plan),
                        full=lambda background: build_library(cell, source=source, background=background))


def library_soon(source: str, folder: Path, stem: str, symbols=(), full=None):
    """(library, why not, key of a background build or None) of any generated source, as
    cell_library_soon: the final library when it is in the cache or background builds are off, else a
    quick build now ("quick_" + stem) and the final one in a background thread at a lower priority.
    `full(background)` builds the final library (default: _library of the same source)."""
    if full is None:
        full = lambda background: _library(source, folder, stem, symbols, background=background)  # noqa: E731
    quick = quick_attempts(source)
    path = _library_path(source, folder, stem)
    if not background_builds() or path is None or list(quick) == list(attempts(source)) or _is_built(path):
        return (*full(False), None)
    lib, _why = _library(source, folder, "quick_" + stem.removeprefix("cpu_"), symbols, tries=quick)
    if lib is None:
        return (*full(False), None)
    key = str(path)
    with _lock:
        if key not in _cell_builds:
            result: list = []
            thread = threading.Thread(target=lambda: result.append(full(True)),
                                      name="celldsl-cell-build")  # not a daemon: exit waits for it
            _cell_builds[key] = (thread, result)
            thread.start()
    return lib, "", key


def cell_library_ready(key: str) -> tuple[bool, ctypes.CDLL | None]:
    """(done, the final library or None when its build failed) of a build library_soon started."""
    thread, result = _cell_builds[key]
    if thread.is_alive():
        return False, None
    return True, (result[0][0] if result else None)


def cell_symbols(plan: Plan) -> list[str]:
    """The functions FusedCPULoop and NativeLoop call in a cell's library."""
    names = [f"{spec.name}_{dt}_at" for spec in kernel_specs(plan) for dt in DTYPES.values()]
    if not native_blocker(plan):
        names += [f"cd_{way}_{dt}" for way in ("forward", "backward") for dt in DTYPES.values()]
    return ["cd_openmp", *names]


GEMM_SYMBOLS = [f"cd_{name}_{dt}" for dt in DTYPES.values()
                for name in ("panel_width", "pack", "gemm", "gemm_repeat", "transpose_matrix", "tiles")]


def build_gemm_library(cache_root: Path | None = None,
                       background: bool = False) -> tuple[ctypes.CDLL | None, str]:
    """The native GEMM (targets/c/emit_gemm.py), one library for every cell: (library, "") or (None, why).
    Waits for a build that gemm_library_soon started."""
    root = cache_root or cache.root()
    key = (str(root), repr(compiler_command()))
    if key not in _gemm_libraries:
        result = _library(gemm_source(), root / "cpu_gemm", "cpu_gemm", GEMM_SYMBOLS, background=background)
        with _lock:
            _gemm_libraries.setdefault(key, result)
    return _gemm_libraries[key]


def gemm_library_soon(cache_root: Path | None = None):
    """(library, "") when the GEMM library is loaded or in the cache, else (None, key) after starting its
    build (5 s at -O3, half of a new cell's cold first call) in a background thread: meanwhile the
    cell runs its Python loop on torch's GEMMs, and `gemm_library_ready(key)` hands the library over
    once built. The build is build_gemm_library's: the same cache, checks and per-file lock, so a
    load of that file waits for it. CELLDSL_BACKGROUND_BUILD=0 builds it here and now."""
    root = cache_root or cache.root()
    key = (str(root), repr(compiler_command()))
    if key in _gemm_libraries or not background_builds():
        return build_gemm_library(cache_root)
    source = gemm_source()
    path = _library_path(source, root / "cpu_gemm", "cpu_gemm")
    with _lock:
        started = key in _gemm_builds
        if not started and path is not None and _is_built(path):
            started = None  # in the cache: load it now
        elif not started:
            # not a daemon: exit waits for it (no half-built file left)
            _gemm_builds[key] = threading.Thread(target=build_gemm_library, args=(cache_root, True),
                                                 name="celldsl-gemm-build")
            _gemm_builds[key].start()
    if started is None:
        return build_gemm_library(cache_root)
    return None, key


def gemm_library_ready(key) -> tuple[bool, ctypes.CDLL | None]:
    """(done, library or None when its build failed) of a build gemm_library_soon started."""
    thread = _gemm_builds.get(key)
    if thread is not None and thread.is_alive():
        return False, None
    lib, _why = _gemm_libraries.get(key, (None, "the build thread ended without a result"))
    return True, lib


def _is_built(path: Path) -> bool:
    with _path_lock(path):
        return cache.verified(path)


def build_source_library(source: str, folder: Path, stem: str, symbols=()) -> tuple[ctypes.CDLL | None, str]:
    """Build or load any generated source with this module's compiler, flags and trusted cache
    (matrix_loop.py's libraries): (library, "") or (None, why not)."""
    return _library(source, folder, stem, symbols)


def _library(source: str, folder: Path, stem: str, symbols=(), tries=None,
             background: bool = False) -> tuple[ctypes.CDLL | None, str]:
    """Build or load a library; (None, why not) when there is no compiler, it fails, or the library it
    made lacks one of `symbols` ($CC is no C compiler, or one that left the kernels out). `background`:
    the compiler runs niced (flags.BACKGROUND_NICE)."""
    cc, why = compiler_command()
    if cc is None:
        return None, why
    lib_path = _library_path(source, folder, stem, tries)
    with _path_lock(lib_path):  # one build or load of a file at a time; other files go on meanwhile
        for _attempt in range(2):  # a library that verifies but does not load is rebuilt once
            if not cache.verified(lib_path):
                error = _build(cc, source, folder, lib_path, tries, background)
                if error:
                    return None, error
            try:
                lib = ctypes.CDLL(str(lib_path))
            except OSError as exc:
                load_error = f"cannot load {lib_path}: {exc}"
                lib_path.unlink(missing_ok=True)
                continue
            missing = [name for name in symbols if not hasattr(lib, name)]
            if missing:
                lib_path.unlink(missing_ok=True)  # a later, working $CC builds under another name anyway
                return None, (f"the library built by $CC ({shlex.join(cc)}) lacks the kernel function "
                              f"{missing[0]}{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}; "
                              "is $CC a C compiler that honours -shared and -o?")
            return lib, ""
        return None, load_error


def _library_path(source: str, folder: Path, stem: str, tries=None) -> Path | None:
    """Where the library of `source` is cached (its name: the recipe's digest); None without a compiler."""
    cc, _why = compiler_command()
    if cc is None:
        return None
    recipe = "\0".join([source, *cc, cpu_fingerprint(), repr(BASE_FLAGS), repr(tries or attempts(source))])
    digest = hashlib.sha256(recipe.encode()).hexdigest()
    return folder / f"{stem}_{digest[:20]}.so"


def _path_lock(path: Path) -> threading.RLock:
    with _lock:
        return _path_locks.setdefault(str(path), threading.RLock())


def _build(cc: list[str], source: str, folder: Path, lib_path: Path, tries=None,
           background: bool = False) -> str:
    """Compile `source` into `lib_path` and seal it; "" on success, else why it failed. The attempts
    share one deadline (COMPILE_SECONDS), so a pathological file cannot hold the process for long."""
    errors = []
    try:
        src_path = folder / (lib_path.stem + ".c")
        cache.atomic_write(src_path, source.encode())
        deadline = time.monotonic() + COMPILE_SECONDS
        for extra in tries or attempts(source):
            left = deadline - time.monotonic()
            if left <= 0:
                errors.append(f"gave up after {COMPILE_SECONDS} s")
                break
            err = _compile(_niced(cc) if background else cc, src_path, lib_path, extra, left)
            if err is None:
                cache.seal(lib_path)
                return ""
            errors.append(err)
    except OSError as exc:  # the cache, not the compiler: a full disk, say (cache.CacheWriteError)
        return f"cannot build in {folder}: {exc}"
    return f"the C compiler {shlex.join(cc)} failed: {errors[-1] if errors else '?'}"


def _niced(cc: list[str]) -> list[str]:
    """cc run by `nice` (its child processes, cc1 and the linker, inherit the priority), when there is one."""
    nice = shutil.which("nice")
    return [nice, "-n", str(BACKGROUND_NICE), *cc] if nice else cc


def _compile(cc: list[str], src: Path, out: Path, extra: list[str], seconds: float) -> str | None:
    """Compile to a temporary file and move it into place (atomic); None on success, else stderr."""
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        proc = subprocess.run([*cc, *BASE_FLAGS, "-o", tmp, str(src), *extra],
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
    lib, reason, cell_waiting = cell_library_soon(cell)
    if lib is None:
        kind = reason.split(":")[0]  # once per kind of failure, not once per cell
        if kind not in _warned and reason != "CELLDSL_CPU_FUSED=0":
            _warned.add(kind)
            warnings.warn(f"celldsl: CPU kernels unavailable ({reason}); running the generated torch "
                          "code instead (slower)", RuntimeWarning, stacklevel=2)
        return cell.torch_loop
    # without the GEMM library the native loop is off: the Python loop runs (on torch's GEMMs) until
    # its background build is done (a cold cache), and the loop takes it then (FusedCPULoop.waiting)
    gemm_lib, waiting = gemm_library_soon()
    memory.keep_freed_memory()  # a call's buffers then stay mapped for the next (targets/c/memory.py)
    loop = FusedCPULoop(cell.plan, cell.torch_module, lib, gemm_lib)
    if gemm_lib is None and isinstance(waiting, tuple):
        loop.waiting = waiting
    loop.cell_waiting = cell_waiting
    return loop


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

    def c(self) -> Rows:
        """The cd_rows struct the C side reads."""
        return Rows(self.base, self.row_bytes, self.first, self.ld, int(self.prev))


def _step_arrays(steps: list[int], offsets: list[int], padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """b_t and the first row of each step as the int64 arrays the native loop reads (torch.tensor
    builds them 2x faster than ctypes); a padded batch's are the same at every call of its shape."""
    if padded:
        return _padded_steps(len(steps), steps[0])
    return torch.tensor(steps, dtype=torch.int64), torch.tensor(offsets, dtype=torch.int64)


@functools.lru_cache(maxsize=64)
def _padded_steps(T: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """_step_arrays of T steps of n rows each (only read, by C)."""
    return torch.full((T,), n, dtype=torch.int64), torch.arange(T, dtype=torch.int64) * n


def _rows_array(args: list[_Arg]):
    return (Rows * len(args))(*[a.c() for a in args])


class _Bound:
    """A kernel with its arguments bound for one sequence; call(r, q, n) runs one step."""

    def __init__(self, kernel: _Kernel, dtype: str, hidden: int, args: list[_Arg]):
        self.fn = kernel.fns[dtype]
        self.hidden = hidden
        self.args = _rows_array(args)
        self.address = ctypes.addressof(self.args)
        self.threads = torch.get_num_threads()

    def __call__(self, r: int, q: int, n: int) -> None:
        threads = self.threads if n * self.hidden >= MIN_PARALLEL else 1
        self.fn(r, q, n, self.hidden, self.address, threads)


@dataclass(frozen=True)
class _CallPlan:
    """What the shapes of a call decide, worked out at its signature's first call (`_call_plan`):
    that the kernels handle it (checked), every width's size, where each GEMM's blocks start, and the
    forward's loop (native or Python) and hoisted GEMM backends. At batch 1 the Python of a
    call cost as much as a hundred steps' arithmetic, and these were a third of it."""

    sizes: dict[str, int]
    hoisted_blocks: list[list[int]]
    step_blocks: list[list[int]]
    native: bool  # the forward runs the native loop
    hoisted: list[str]  # the backend of each hoisted GEMM


class FusedCPULoop(TorchLoop):
    """TorchLoop's forward and backward with compiled kernels, padded or packed sequences: same
    arguments and results. Each sequence runs either as one native call (targets/c/emit_loop.py: the GEMMs
    and the pointwise kernels of every step in C) or as a Python loop over the steps with a torch
    GEMM (torch.mm or oneDNN) and one C call per pointwise function; targets/c/gemm.py chooses by
    measuring the step products at this shape. Both keep the same intermediates, so either backward
    takes either forward. The native loop needs every per-step value H wide and no reduction over a
    row (`native_blocker`, kept in `self.native_blocker`); other cells always run the Python loop,
    where each kernel runs over [rows, its width] and a GEMM's blocks sit at the offsets their widths
    give (`_block_offsets`). GEMMs with heads (block-diagonal weights) run TorchLoop's plain loop.

    What is saved differs from TorchLoop's: the output of a step GEMM of `Folding.summed` is added
    onto its hoisted rows in place (which then hold hoisted + product, what the kernels read; its
    own saved entry is empty), and folded vectors are inside the GEMM outputs; so this loop's
    backward takes this loop's forward only (`saved_shapes` says so to the fake kernels)."""

    # bytes of infer's hoisted rows per chunk (see _run_chunked; 0: one hoisted GEMM over all steps).
    # Measured (one thread, A/B in one process): 256 kB, 512 kB and 1 MB took 0.99x, 0.97-0.98x and
    # 0.97-0.98x the time of no chunks for the LSTM forward N=32 H=256 f32. Against 512 kB (fewer
    # chunks: fewer barriers, W_ih's panels read fewer times): 1.5 MB took 0.977-0.989x the time for
    # that LSTM (12 steps a chunk), 0.95x for the GRU N=32; LSTM N=128 I=H=512 and N=1 the same chunks
    # (one step; all steps). 2 MB: LSTM N=32 0.98x, but N=128 1.01x (2 steps a chunk).
    ring_bytes = 1536 * 1024
    # infer's LSTM steps with fused tiles (see _run_chunked); False: the chunks' two GEMMs (A/B runs)
    fused_steps = True

    def __init__(self, plan: Plan, module, lib, gemm_lib=None):
        super().__init__(plan, module)
        self.lib = gemm_lib  # the native GEMM (targets/c/emit_gemm.py); None: torch GEMMs only
        self.gemm: str | None = None  # a backend forced for this loop (benchmarks, tests): cpu_gemm.choose
        self.cell_lib = lib
        self.native_blocker = native_blocker(plan)  # why the native loop cannot run this cell, or ""
        self.kernels = {(s.pointwise, s.backward): _Kernel(lib, s) for s in kernel_specs(plan)}
        self.schedule = backward_schedule(plan)
        self.folding = folding(plan)
        self.summed = self.folding.summed
        self.same_vectors = {self.vectors.index(name): self.vectors.index(mode[5:])
                             for modes in self.schedule.modes.values() for name, mode in modes.items()
                             if mode.startswith("same:") and name in self.vectors}
        self.folded = {self.vectors.index(name): where for name, where in self.folding.biases.items()}
        # (kind, gemm) -> block -> the vectors folded into it
        self.folded_blocks: dict[tuple[str, int], dict[int, list[int]]] = {}
        for i, (kind, gi, block) in self.folded.items():
            self.folded_blocks.setdefault((kind, gi), {}).setdefault(block, []).append(i)
        touched = {self.where[s.name].index for pw in plan.pointwise for s in pw.grad_inputs
                   if self.where[s.name].kind == "state"}
        touched |= {self.where[g.operand.name].index for g in self.gemms
                    if self.where[g.operand.name].kind == "state"}
        self.untouched_states = [i for i in range(len(self.states)) if i not in touched]
        # inputs whose gradient the kernels write
        self.dx_from_kernels = sorted({s.name for pw in plan.pointwise for s in pw.grad_inputs
                                       if self.where[s.name].kind == "input"})
        # per GEMM: (operand is a state, state index or operand name)
        self.gemm_operands = [(self.where[g.operand.name].kind == "state", self.where[g.operand.name].index)
                              for g in self.gemms]
        self.in_place = self._in_place_states(plan)
        self._natives: dict[torch.dtype, NativeLoop] = {}
        self._plans: dict[tuple, _CallPlan | None] = {}  # signature -> call plan (see _call_plan)
        # what ran last, for tests and `explain`-style questions: "forward"/"backward" -> "native" or
        # the torch backends of the step products, e.g. ("mm",) ; "hoisted" -> the hoisted backends;
        # "fused" -> whether infer's chunks ran with fused LSTM steps (_run_chunked)
        self.ran: dict[str, tuple[str, ...] | str | bool] = {}
        self.waiting = None  # the key of the GEMM library's background build (cpu_loop), until taken
        self.cell_waiting = None  # the key of the cell's -O3 build, while `lib` is its quick (-Og) build
        self._swaps = 0  # libraries swapped in so far (`revision`)

    def _in_place_states(self, plan: Plan) -> list[int]:
        """The states a forward without saves (`infer`) keeps in one [N, width] buffer, new value over
        old: not the output, no GEMM's operand (a GEMM reads all of a state's columns while the other
        threads' kernels would write theirs), and read only by the kernel that writes its new value
        (whose loads of an element precede its stores: emit.py's element loops). Cells with a
        `native_blocker` (values of one per row, reductions) keep every state's rows."""
        if self.native_blocker:
            return []
        operands = {index for is_state, index in self.gemm_operands if is_state}
        kept = []
        for i, s in enumerate(self.states):
            writers = [pw for pw in plan.pointwise if any(name == s + "'" for name, _ in pw.outputs)]
            readers = [pw for pw in plan.pointwise if any(sym.name == s for sym in pw.inputs)]
            if i != self.output_state and i not in operands and len(writers) == 1 and \
                    all(pw is writers[0] for pw in readers):
                kept.append(i)
        return kept

    def _take_cell_library(self) -> None:
        """Swap in the cell's -O3 library once built (between two calls, as _take_gemm_library): the
        same source, so the same kernels and arguments; a failed build keeps the quick one."""
        key = self.cell_waiting  # read once: another thread may take it meanwhile
        if key is None:
            return
        done, lib = cell_library_ready(key)
        if done:
            self.cell_waiting = None
            if lib is not None:
                self.cell_lib = lib
                self.kernels = {(s.pointwise, s.backward): _Kernel(lib, s) for s in kernel_specs(self.plan)}
                self._natives = {}
                self._plans.clear()
                self._swaps += 1

    def _take_gemm_library(self) -> None:
        """Use the GEMM library once its background build is done (between two calls: a call runs on
        the GEMMs it started with; either loop's backward takes either's forward). The choices made
        without it are dropped, so the next call measures the native GEMM too."""
        key = self.waiting  # read once: another thread may take it meanwhile
        if key is None:
            return
        done, lib = gemm_library_ready(key)
        if done:
            self.waiting = None
            if lib is not None:
                self.lib, self._natives = lib, {}
                self._plans.clear()
                self._swaps += 1

    def revision(self) -> tuple:
        """What a prepared call (PreparedStep, PreparedSequence) was bound to and must be made again
        when it changes: the libraries (a background -O3 build is swapped in here, as at any call: the
        quick -Og kernels round otherwise) and the GEMM choices (measurements, CELLDSL_CPU_GEMM,
        `gemm`)."""
        if self.waiting is not None:
            self._take_gemm_library()
        if self.cell_waiting is not None:
            self._take_cell_library()
        return self._swaps, cpu_gemm.generation(), cpu_gemm.forced(), self.gemm

    def native(self, dtype: torch.dtype) -> NativeLoop:
        if dtype not in self._natives:
            self._natives[dtype] = NativeLoop(self.cell_lib, self.lib, dtype)
        return self._natives[dtype]

    def saved_shapes(self, rows: int, sizes: dict[str, int], hoisted_w, step_w) -> list[tuple[int, int]]:
        shapes = super().saved_shapes(rows, sizes, hoisted_w, step_w)
        if step_w and step_w[0].device.type == "cpu" and step_w[0].dtype in DTYPES:
            first = len(self.states) - (self.output_state is not None)
            for gi in self.summed:  # its products are inside the hoisted rows
                shapes[first + gi] = (0, step_w[gi].shape[0])
        return shapes

    def fused(self, x, states, hoisted_w, step_w, vectors, scalars) -> bool:
        """Whether the compiled kernels handle these arguments (else the plain loop runs them): CPU
        tensors of float32 or float64, GEMMs without heads. Raises ValueError for shapes the kernels
        would read out of bounds."""
        return self._call_plan(x, states, hoisted_w, step_w, vectors, scalars) is not None

    def _call_plan(self, x, states, hoisted_w, step_w, vectors, scalars) -> _CallPlan | None:
        """The call plan of these arguments' signature (None: the kernels do not handle them, see
        `fused`), made at the signature's first call; shapes the kernels would read out of bounds
        raise ValueError at every call (a failed check is not remembered)."""
        if self.waiting is not None:
            self._take_gemm_library()
        if self.cell_waiting is not None:
            self._take_cell_library()
        tensors = (x, *states, *hoisted_w, *step_w, *vectors, *scalars)
        signature = (tuple((t.shape, t.dtype, t.is_cpu) for t in tensors),
                     (len(states), len(hoisted_w), len(step_w), len(vectors)),
                     torch.get_num_threads(), self.gemm, cpu_gemm.forced())
        try:
            return self._plans[signature, cpu_gemm.generation()]
        except KeyError:
            pass
        plan = None
        if self._kernels_handle(x, states, hoisted_w, step_w, vectors, scalars):
            plan = self._make_call_plan(x, states, hoisted_w, step_w, vectors)
        if len(self._plans) >= CALL_PLANS:  # e.g. a new sequence length every call: start again
            self._plans.clear()
        self._plans[signature, cpu_gemm.generation()] = plan  # after the choices it measured
        return plan

    def _make_call_plan(self, x, states, hoisted_w, step_w, vectors) -> _CallPlan:
        sizes = self.sizes(states, vectors, hoisted_w, step_w, x)
        rows = math.prod(x.shape[:-1])  # of every hoisted operand: T * N, or a packed batch's
        hoisted = [cpu_gemm.choose(cpu_gemm.site("hoisted", x.dtype, rows, w.shape[1], w.shape[0]), self.lib,
                                   force=self.gemm) for w in hoisted_w]
        native = self.runs_native("step", x.dtype, states[0].shape[0], step_w)
        blocks = (self._block_offsets(self.hoisted, sizes), self._block_offsets(self.gemms, sizes))
        return _CallPlan(sizes, *blocks, native, hoisted)

    def _kernels_handle(self, x, states, hoisted_w, step_w, vectors, scalars) -> bool:
        """`fused`, worked out."""
        if x.device.type != "cpu" or x.dtype not in DTYPES:
            return False
        if not all(t.device.type == "cpu" and t.dtype == x.dtype
                   for t in (*states, *hoisted_w, *step_w, *vectors, *scalars)):
            return False
        if any(w.dim() != 2 for w in (*hoisted_w, *step_w)):
            return False  # block-diagonal GEMMs (heads) run in the plain loop
        self.check_shapes(x, states, hoisted_w, step_w, vectors, scalars)
        return True

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
        """A pointwise input of the forward (and the backward, which reads the same values). A hoisted
        block of a summed GEMM holds hoisted + product (see Folding)."""
        slot = self.where[name]
        isz = bufs["X"].element_size()
        if slot.kind == "state":  # the previous state: the initial one at the first step
            news = bufs["news"][slot.index]
            arg = self._rows(news, bufs)
            arg.first, arg.prev = bufs["states"][slot.index].data_ptr(), True
            return arg
        if slot.kind in ("hoisted", "product"):
            hoisted = slot.kind == "hoisted"
            arg = self._rows((bufs["hoisted"] if hoisted else bufs["step"])[slot.index], bufs)
            blocks = bufs["hoisted_blocks"] if hoisted else bufs["step_blocks"]
            arg.base += blocks[slot.index][slot.block] * isz
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
            return self._rows(bufs["news"][self.states.index(name[:-1])], bufs)
        return _Arg.rows(bufs["out"])

    @staticmethod
    def _rows(t: torch.Tensor, bufs: dict) -> _Arg:
        """Where a step's rows of t are: those of the step in a [rows, ...] buffer; rows 0..b-1 at
        every step in a buffer of one step ([N, ...], bufs["one_step"]: `infer`)."""
        return _Arg.fixed(t) if id(t) in bufs.get("one_step", ()) else _Arg.rows(t)

    def _operand(self, gi: int, bufs: dict) -> _Arg:
        """The rows step GEMM gi multiplies: a previous state (the initial one at the first step) or
        an operand computed in the step."""
        is_state, index = self.gemm_operands[gi]
        if not is_state:
            return _Arg.rows(bufs["operands"][index])
        arg = _Arg.rows(bufs["news"][index])
        arg.first, arg.prev = bufs["states"][index].data_ptr(), True
        return arg

    def _biases(self, vectors, bufs: dict, hoisted_w, step_w):
        """The folded vectors added up per GEMM: ([rows of W] or None per hoisted GEMM, per step GEMM)."""
        biases = {"hoisted": [None] * len(hoisted_w), "step": [None] * len(step_w)}
        for (kind, gi), blocks in self.folded_blocks.items():
            w = (hoisted_w if kind == "hoisted" else step_w)[gi]
            starts = [*bufs[f"{kind}_blocks"][gi], w.shape[0]]
            parts = []  # one add per block (b_ih + b_hh): a few large ops, not one per vector
            for b in range(len(starts) - 1):
                vs = [vectors[i] for i in blocks.get(b, ())]
                parts.append(sum(vs[1:], vs[0]) if vs else w.new_zeros(starts[b + 1] - starts[b]))
            biases[kind][gi] = torch.cat(parts) if len(parts) > 1 else parts[0]
        return biases["hoisted"], biases["step"]

    # ---- which loop runs a sequence ---------------------------------------------------------------

    def runs_native(self, kind: str, dtype: torch.dtype, n: int, step_w) -> bool:
        """Whether the native loop runs this sequence: never for a cell it cannot express
        (`self.native_blocker`) or without the GEMM library; a cell without a state GEMM always
        (unless a torch backend is forced), else when the native GEMM is the fastest on the step
        products (kind "step" or "step_backward"; cpu_gemm measures it once per shape) once the
        Python loop's own cost per step (PYTHON_STEP_FACTOR, PYTHON_STEP_SECONDS) is counted."""
        force = self.gemm or cpu_gemm.forced()
        if self.lib is None or self.native_blocker:
            return False
        if force is not None or not step_w:
            return force in (None, "native")
        native, other = 0.0, 0.0
        for w in step_w:
            seconds = cpu_gemm.timings(cpu_gemm.site(kind, dtype, n, w.shape[1], w.shape[0]), self.lib)
            native += seconds.get("native", math.inf)
            other += min(s for name, s in seconds.items() if name != "native")
        return native <= PYTHON_STEP_FACTOR * other + PYTHON_STEP_SECONDS

    def _products(self, kind: str, dtype: torch.dtype, n: int, step_w) -> list:
        """The GEMM of each step product for the Python loop, chosen per shape: a torch one, or the
        native kernel called once per step (for the cells the native loop cannot express)."""
        products = []
        for w in step_w:
            s = cpu_gemm.site(kind, dtype, n, w.shape[1], w.shape[0])
            backend = cpu_gemm.choose(s, self.lib, native=self.lib is not None, force=self.gemm)
            products.append(cpu_gemm.product(backend, kind, w, n, self.lib))
        self.ran["forward" if kind == "step" else "backward"] = tuple(p.backend for p in products)
        return products

    # ---- forward --------------------------------------------------------------------------------

    def forward(self, x, states, hoisted_w, step_w, vectors, scalars, batch_sizes=None):
        plan = self._call_plan(x, states, hoisted_w, step_w, vectors, scalars)
        if plan is None:
            return super().forward(x, states, hoisted_w, step_w, vectors, scalars, batch_sizes)
        with torch.no_grad():
            return self._forward(plan, x, states, hoisted_w, step_w, vectors, scalars, batch_sizes)

    def infer(self, x, states, hoisted_w, step_w, vectors, scalars, batch_sizes=None):
        """(out, final states) of `forward`, bit for bit, for a call no backward follows: what only the
        backward reads is not kept. The states of `in_place` and the native loop's step products live
        in [N, ...] buffers that every step reuses (in the caches), not in [rows, ...] ones written through
        memory: at T=100 N=32 H=256 in float32, the LSTM's c (3.3 MB a call) and the GRU's products
        (9.8 MB)."""
        plan = self._call_plan(x, states, hoisted_w, step_w, vectors, scalars)
        if plan is None:
            return super().infer(x, states, hoisted_w, step_w, vectors, scalars, batch_sizes)
        with torch.no_grad():
            out, finals, _ = self._forward(plan, x, states, hoisted_w, step_w, vectors, scalars, batch_sizes,
                                           save=False)
        return out, finals

    def prepare_step(self, x, states, hoisted_w, step_w, vectors, scalars) -> PreparedStep | None:
        """A PreparedStep for one step (x [1, N, I]) of these arguments' shapes and weights, or None
        where it does not apply (the op then runs as usual): the Python loop chosen, extra inputs or
        prev(x) or hoisted operands computed from x, an empty batch, a vector or scalar that is not
        contiguous (the kernels read them in place, at every call). Checks the shapes as `forward`."""
        if not all(v.is_contiguous() for v in [*vectors, *scalars]):
            return None
        plan = self._call_plan(x, states, hoisted_w, step_w, vectors, scalars)
        if plan is None or not plan.native or x.dim() != 3 or x.shape[0] != 1 or states[0].numel() == 0 \
                or len(self.inputs) != 1 or self.shifted or self.hoist:
            return None
        with torch.no_grad():
            return PreparedStep(self, plan, x, states, hoisted_w, step_w, vectors, scalars)

    def prepare_sequence(self, x, states, hoisted_w, step_w, vectors, scalars) -> PreparedSequence | None:
        """A PreparedSequence for inference calls on a padded x [T, N, I] of these arguments' shapes
        and weights, or None where it does not apply: as prepare_step's, and a call too large for
        its copies in and out to be cheap (SEQUENCE_ELEMENTS). Checks the shapes as `forward`."""
        if not all(v.is_contiguous() for v in [*vectors, *scalars]) or x.dim() != 3 or \
                x.shape[0] * x.shape[1] * (x.shape[2] + sum(s.shape[-1] for s in states)) > SEQUENCE_ELEMENTS:
            return None
        plan = self._call_plan(x, states, hoisted_w, step_w, vectors, scalars)
        if plan is None or not plan.native or states[0].numel() == 0 or x.shape[0] == 0 \
                or len(self.inputs) != 1 or self.shifted or self.hoist:
            return None
        with torch.no_grad():
            return PreparedSequence(self, plan, x, states, hoisted_w, step_w, vectors, scalars)

    def prepare_train_step(self, x, states, hoisted_w, step_w, vectors, scalars) -> PreparedTrainStep | None:
        """A PreparedTrainStep (a step whose backward is prepared too), or None where it does not
        apply: where prepare_step or `_train_plan` does not."""
        if x.dim() != 3 or x.shape[0] != 1:
            return None
        plan = self._train_plan(x, states, hoisted_w, step_w, vectors, scalars)
        if plan is None:
            return None
        with torch.no_grad():
            return PreparedTrainStep(self, plan, x, states, hoisted_w, step_w, vectors, scalars)

    def prepare_train_sequence(self, x, states, hoisted_w, step_w, vectors, scalars
                               ) -> PreparedTrainSequence | None:
        """A PreparedTrainSequence (a padded sequence under autograd, its backward prepared too), or
        None where it does not apply: where prepare_sequence or `_train_plan` does not."""
        if x.dim() != 3 or \
                x.shape[0] * x.shape[1] * (x.shape[2] + sum(s.shape[-1] for s in states)) > SEQUENCE_ELEMENTS:
            return None
        plan = self._train_plan(x, states, hoisted_w, step_w, vectors, scalars)
        if plan is None:
            return None
        with torch.no_grad():
            return PreparedTrainSequence(self, plan, x, states, hoisted_w, step_w, vectors, scalars)

    def _train_plan(self, x, states, hoisted_w, step_w, vectors, scalars) -> _CallPlan | None:
        """The call plan of a prepared training call (x [T, N, I], T > 0), or None where one does not
        apply: cells with scalar parameters, an input read elementwise (its gradient comes from the
        kernels), a hoisted GEMM on anything but the input, a step GEMM on anything but a state, a
        vector that is not contiguous, extra inputs or prev(x) or hoisted operands computed from x, an
        empty batch, or the Python loop chosen for either direction."""
        if self.scalars or self.dx_from_kernels or \
                not all(is_state for is_state, _i in self.gemm_operands) or \
                not all(v.is_contiguous() for v in vectors) or \
                any(self.where[g.operand.name].kind != "input" for g in self.hoisted):
            return None
        plan = self._call_plan(x, states, hoisted_w, step_w, vectors, scalars)
        if plan is None or not plan.native or x.shape[0] == 0 or states[0].numel() == 0 \
                or len(self.inputs) != 1 or self.shifted or self.hoist or \
                not self.runs_native("step_backward", x.dtype, states[0].shape[0], step_w):
            return None
        return plan

    @staticmethod
    def _contiguous(x, states, vectors, scalars, batch_sizes):
        """(X [rows, I], steps, offsets, states, vectors, scalars), contiguous as the kernels read them."""
        n = states[0].shape[0]
        if batch_sizes is None and x.dim() == 3 and x.shape[0] > 0 and x.shape[1] == n:
            # padded: every step has n rows (steps_of checks the same, in Python, step by step)
            T = x.shape[0]
            X, steps, offsets = x.reshape(-1, x.shape[-1]), [n] * T, list(range(0, T * n, n))
        else:
            X, steps, offsets = steps_of(x, batch_sizes, n)
        return (X.contiguous(), steps, offsets, [s.contiguous() for s in states],
                [v.contiguous() for v in vectors], [s.contiguous() for s in scalars])

    def _buffers(self, plan, x, states, hoisted_w, step_w, vectors, scalars, batch_sizes):
        """One call's contiguous tensors and what every kernel argument points into (see _input), as
        (bufs, steps, offsets, step_w, sizes); the forward and the backward both start here."""
        X, steps, offsets, states, vectors, scalars = self._contiguous(
            x, states, vectors, scalars, batch_sizes
        )
        step_w = [w.contiguous() for w in step_w]
        sizes = plan.sizes
        bufs = {"X": X, "xs": self.split_inputs(X, sizes, hoisted_w, steps, offsets), "states": states,
                "vectors": vectors, "scalars": scalars, "sizes": sizes, "padded": batch_sizes is None,
                "hoisted_blocks": plan.hoisted_blocks, "step_blocks": plan.step_blocks}
        return bufs, steps, offsets, step_w, sizes

    def _forward(self, plan, x, states, hoisted_w, step_w, vectors, scalars, batch_sizes, save: bool = True):
        """save=False: `infer` (the saved list comes back empty)."""
        N = states[0].shape[0]
        bufs, steps, offsets, step_w, sizes = self._buffers(plan, x, states, hoisted_w, step_w, vectors,
                                                            scalars, batch_sizes)
        X, states, vectors, scalars = bufs["X"], bufs["states"], bufs["vectors"], bufs["scalars"]
        rows = X.shape[0]
        hoisted_ops = self._hoisted_operands(bufs["xs"], vectors, scalars)
        hoisted_bias, step_bias = self._biases(vectors, bufs, hoisted_w, step_w)
        chunk = not save and plan.native and self._chunked(hoisted_ops, hoisted_w, plan, bufs)
        if chunk:
            hoisted_out = [X.new_empty(rows, hoisted_w[0].shape[0])]  # never touched: the ring holds the rows
        else:
            hoisted_out = [cpu_gemm.linear(op, w, bias, self.lib, backend)
                           for op, w, bias, backend in zip(hoisted_ops, hoisted_w, hoisted_bias, plan.hoisted,
                                                           strict=True)]
        args = self._bind_outputs(bufs, N, step_w, hoisted_out, save, plan.native)
        news, out, step_out, operands, one_step = (bufs[k] for k in ("news", "out", "step", "operands",
                                                                     "one_step"))
        if plan.native and chunk:
            native, prepared, panels = self._forward_native(bufs, args, steps, offsets, N, step_w, step_bias,
                                                            run=False)
            self._run_chunked(native, prepared, hoisted_ops[0], hoisted_w[0], hoisted_bias[0], hoisted_out[0],
                              N, bufs["sizes"]["H"])
        elif plan.native:
            self._forward_native(bufs, args, steps, offsets, N, step_w, step_bias)
        else:
            self._forward_python(bufs, args, steps, offsets, N, step_w, step_bias)
        # the final state of the sequences that end at step t is rows [b_{t+1}, b_t) of its new state;
        # a one-step buffer holds them already (its rows past b_t kept their values after step t)
        ends = [*steps[1:], 0]
        finals = [n if id(n) in one_step else n[rows - N :].clone() if steps[-1] == N else
                  torch.cat([n[offsets[t] + ends[t] : offsets[t] + steps[t]]
                             for t in reversed(range(len(steps))) if ends[t] < steps[t]]) for n in news]
        saved = [] if not save else (
            [s for i, s in enumerate(news) if i != self.output_state]
            + step_out
            + [operands[name] for name in self.operand_names]
            + hoisted_out
        )
        if batch_sizes is None:
            out = out.view(x.shape[0], x.shape[1], -1)
        return out, finals, saved

    def _bind_outputs(self, bufs, N: int, step_w, hoisted_out, save: bool, native: bool) -> dict:
        """A call's new states, output, step products and operands, put into bufs -> the kernels'
        arguments (pointers into bufs) by pointwise kernel. save=False (`infer`): the states of
        `in_place` and the native loop's step products get buffers of one step."""
        X, sizes, ir = bufs["X"], bufs["sizes"], self.plan.ir
        rows = X.shape[0]
        news = [X.new_empty(rows if save or i not in self.in_place else N, sizes[ir.width(s)])
                for i, s in enumerate(self.states)]
        out = (news[self.output_state] if self.output_state is not None
               else X.new_empty(rows, self.output_width(sizes)))
        # the Python loop's products keep their rows: torch's GEMMs (MKL) may round otherwise into
        # memory aligned otherwise, and `infer` promises forward's numbers bit for bit
        step_rows = rows if save or not native else N
        step_out = [X.new_empty(0 if gi in self.summed else step_rows, w.shape[0])
                    for gi, w in enumerate(step_w)]
        operands = {name: X.new_empty(rows, sizes[self.width_of[name]]) for name in self.operand_names}
        one_step = set() if save else {id(t) for t in [*step_out, *news] if t.shape[0] == N < rows}
        bufs |= {"news": news, "out": out, "step": step_out,
                 "hoisted": hoisted_out, "operands": operands, "one_step": one_step}
        return {pw.name: [self._input(a.name, bufs) if a.part == "input" else self._output(a.name, bufs)
                          for a in self.kernels[(pw.name, False)].spec.args] for pw in self.plan.pointwise}

    def _step_output(self, gi: int, bufs: dict) -> tuple[_Arg, int]:
        """Where step GEMM gi writes, and how (1: adds onto its hoisted rows; 2: = bias +; 0: =)."""
        if gi in self.summed:
            hi, first = self.summed[gi]
            arg = _Arg.rows(bufs["hoisted"][hi])
            arg.base += bufs["hoisted_blocks"][hi][first] * bufs["X"].element_size()
            return arg, 1
        return self._rows(bufs["step"][gi], bufs), 2 if bufs["step_bias"][gi] is not None else 0

    def _forward_native(self, bufs, args, steps, offsets, N, step_w, step_bias, run: bool = True):
        """Runs the native loop (unless run=False) -> (NativeLoop, its prepared call, the packed
        panels the call reads)."""
        H, dtype = bufs["sizes"]["H"], bufs["X"].dtype  # every value is H wide (native_blocker)
        native = self.native(dtype)
        nt = native.threads(N, H, N * sum(w.numel() for w in step_w), bufs["X"].shape[0])
        bufs["step_bias"] = step_bias
        panels, gemms = [], []
        for gi, w in enumerate(step_w):
            panels.append(native.gemm.pack_transposed(w, len(self.gemms[gi].products), nt))
            output, init = self._step_output(gi, bufs)
            bias = step_bias[gi]
            gemms.append(StepGemm(operand=self._operand(gi, bufs).c(), output=output.c(), init=init,
                                  bias=bias.data_ptr() if bias is not None else None,
                                  panels=panels[-1].data_ptr(), K=w.shape[1],
                                  blocks=len(self.gemms[gi].products)))
        kernels = [_rows_array(args[pw.name]) for pw in self.plan.pointwise]
        self.ran["forward"] = "native"
        prepared = native.prepare_forward(*_step_arrays(steps, offsets, bufs["padded"]), N, H, nt, gemms,
                                          kernels)
        if run:
            native.run_forward(prepared)
        return native, prepared, panels

    def _chunked(self, hoisted_ops, hoisted_w, plan, bufs) -> bool:
        """Whether `infer` computes the hoisted product a few steps at a time inside the native loop
        (see cd_hoist_chunk in targets/c/emit_loop.py): one hoisted GEMM, on the native kernel (the
        numbers are then the same bit for bit), whose blocks are H wide."""
        if len(hoisted_w) != 1 or plan.hoisted != ["native"] or self.ring_bytes <= 0:
            return False
        H, w, a = bufs["sizes"]["H"], hoisted_w[0], hoisted_ops[0]
        return (a.dim() == 2 and a.stride(1) == 1 and w.shape[0] % H == 0
                and list(bufs["hoisted_blocks"][0][: w.shape[0] // H]) == list(range(0, w.shape[0], H)))

    def _run_chunked(self, native, prepared, a, w, bias, hoisted, N, H):
        """Runs a prepared native forward whose hoisted rows `hoisted` (allocated, never written) are
        computed chunk by chunk into a ring of about ring_bytes: every argument that points into
        them is handed to the loop, which rebases it onto the ring at each chunk."""
        loop, keep = prepared[0], prepared[1]
        self.ran["fused"] = False
        lo, hi = hoisted.data_ptr(), hoisted.data_ptr() + hoisted.numel() * hoisted.element_size()
        blocks, row = w.shape[0] // H, w.shape[0] * a.element_size()
        k = max(1, min(loop.T, self.ring_bytes // max(1, N * row)))
        panels = native.gemm.pack_transposed(w.contiguous(), blocks, loop.nt)
        ring = a.new_empty(k * N + 4, w.shape[0])  # 2 rows of room on either side (cd_hoist_chunk)
        gemms = (StepGemm * len(self.gemms)).from_address(loop.gemms) if self.gemms else []
        structs = [g.output for g in gemms]
        structs += [r for arr in keep.held if isinstance(arr, ctypes.Array) and arr._type_ is Rows
                    for r in arr]
        rebased = [r for r in structs if lo <= r.base < hi]
        # reads rows of other steps (not from a ring), or a GEMM library that does not say its MR
        if any(r.row_bytes != row or r.prev for r in rebased) or native.gemm.height <= 0:
            hoisted.copy_(cpu_gemm.linear(a, w, bias, self.lib, "native"))
            native.run_forward(prepared)
            return
        ptrs = (ctypes.c_int64 * max(1, len(rebased)))(*[ctypes.addressof(r) for r in rebased])
        offs = (ctypes.c_int64 * max(1, len(rebased)))(*[r.base - lo for r in rebased])
        loop.hk, loop.hx, loop.hlda, loop.hK = k, a.data_ptr(), a.stride(0), a.shape[1]
        loop.hpanels, loop.hbias = panels.data_ptr(), bias.data_ptr() if bias is not None else None
        loop.hinit, loop.hblocks, loop.hld = 2 if bias is not None else 0, blocks, w.shape[0]
        loop.hmr, loop.ring, loop.nre = native.gemm.height, ring[2:].data_ptr(), len(rebased)
        loop.re, loop.re_off = ctypes.addressof(ptrs), ctypes.addressof(offs)
        # the LSTM's shape: one step GEMM adds onto all of the hoisted rows, in the first stage, with
        # no kernel before it (nothing reads those rows earlier in a step): it may run fused with them
        # (cd_fused_gemm in targets/c/emit_loop.py). Not the GRU's: its step product has rows of its own.
        onto = [gi for gi, g in enumerate(gemms) if g.init == 1 and lo <= g.output.base < hi]
        if self.fused_steps and native.fused_tiles and len(onto) == 1 and gemms[onto[0]].output.base == lo \
                and gemms[onto[0]].blocks == blocks and self.gemms[onto[0]].stage == 1 \
                and not self.plan.pointwise_of_stage(0):
            loop.ftiles, loop.fgemm = native.fused_tiles, onto[0]
            self.ran["fused"] = True
        native.run_forward(prepared)
        del panels, ring, ptrs, offs

    def _forward_python(self, bufs, args, steps, offsets, N, step_w, step_bias) -> None:
        X, sizes = bufs["X"], bufs["sizes"]
        bufs["step_bias"] = step_bias
        dtype = DTYPES[X.dtype]
        calls = [[_Bound(self.kernels[(st.pw.name, False)], dtype, sizes[st.pw.width], args[st.pw.name])
                  for st in steps_k] for _gemm_ids, steps_k in self.stages]
        products = self._products("step", X.dtype, N, step_w)
        states, news, operands = bufs["states"], bufs["news"], bufs["operands"]
        q = -1
        for b, r in zip(steps, offsets, strict=True):
            for k, (gemm_ids, _steps_k) in enumerate(self.stages):
                for gi in gemm_ids:
                    is_state, index = self.gemm_operands[gi]
                    if not is_state:
                        opnd = operands[index][r : r + b]
                    else:
                        opnd = states[index][:b] if q < 0 else news[index][q : q + b]
                    if gi in self.summed:  # S = hoisted rows + opnd @ W.T, in place
                        hi, first = self.summed[gi]
                        start = bufs["hoisted_blocks"][hi][first]
                        cols = slice(start, start + step_w[gi].shape[0])
                        products[gi](opnd, bufs["hoisted"][hi][r : r + b, cols], 1)
                    else:
                        bias = step_bias[gi]
                        products[gi](opnd, bufs["step"][gi][r : r + b], 0 if bias is None else 2, bias)
                for call in calls[k]:
                    call(r, q, b)
            q = r

    # ---- backward -------------------------------------------------------------------------------

    def backward(self, x, states, hoisted_w, step_w, vectors, scalars, out, saved, grad_out, grad_states,
                 batch_sizes=None, needs_dx: bool = True):
        """As TorchLoop.backward. needs_dx=False skips the input gradient's GEMM over all steps (a
        first layer's input needs none) and returns None for dx (zeros cost a pass over [T, N, I])."""
        plan = self._call_plan(x, states, hoisted_w, step_w, vectors, scalars)
        if plan is None:
            return super().backward(x, states, hoisted_w, step_w, vectors, scalars, out, saved, grad_out,
                                    grad_states, batch_sizes, needs_dx)
        with torch.no_grad(), scratch.buffers() as take:
            return self._backward(plan, x, states, hoisted_w, step_w, vectors, scalars, out, saved, grad_out,
                                  grad_states, batch_sizes, needs_dx, take)

    def _bind_backward(self, pw, A, B, bufs, grads) -> list[_Arg]:
        """The arguments of pw's backward kernel when A holds d old states and B d new states."""
        isz = bufs["X"].element_size()
        args = []
        for a in self.kernels[(pw.name, True)].spec.args:
            if a.part == "input":
                args.append(self._input(a.name, bufs))
            elif a.part == "grad_output":
                if a.name in grads["ops"]:
                    args.append(_Arg.fixed(grads["ops"][a.name]))
                elif a.name.endswith("'") and a.name[:-1] in self.states:
                    args.append(_Arg.fixed(B[self.states.index(a.name[:-1])]))
                else:  # the per-step output, not a state
                    g_out = grads["out"]
                    args.append(_Arg.rows(g_out) if g_out is not None else _Arg.fixed(grads["zeros"]))
            elif a.mode.startswith("same:") or a.mode == "fold":  # not written by the kernel
                args.append(_Arg.fixed(None))
            else:
                slot = self.where[a.name]
                if slot.kind == "state":
                    args.append(_Arg.fixed(A[slot.index]))
                elif slot.kind in ("hoisted", "product"):
                    hoisted = slot.kind == "hoisted"
                    arg = _Arg.rows(grads["hoisted" if hoisted else "step"][slot.index])
                    starts = bufs["hoisted_blocks" if hoisted else "step_blocks"][slot.index]
                    arg.base += starts[slot.block] * isz
                    args.append(arg)
                elif slot.kind == "input":
                    args.append(_Arg.rows(grads["x"][a.name]))
                elif slot.kind == "vector":
                    args.append(_Arg.fixed(grads["vectors"][slot.index]))
                else:
                    args.append(_Arg.fixed(grads["scalars"][slot.index]))
        return args

    def _backward(self, plan, x, states, hoisted_w, step_w, vectors, scalars, out, saved, grad_out,
                  grad_states, batch_sizes, needs_dx, take):
        """`take` (from scratch.buffers) makes the [rows, ...] gradients no result aliases: the d products."""
        N = states[0].shape[0]
        bufs, steps, offsets, step_w, sizes = self._buffers(plan, x, states, hoisted_w, step_w, vectors,
                                                            scalars, batch_sizes)
        X, states, vectors, scalars = bufs["X"], bufs["states"], bufs["vectors"], bufs["scalars"]
        rows = X.shape[0]
        ir = self.plan.ir
        news, step_all, operands, hoisted_out = self._unpack_saved(saved, out, sizes)
        bufs |= {"news": [n.contiguous() for n in news],
                 "step": [s.contiguous() for s in step_all],
                 "hoisted": [h.contiguous() for h in hoisted_out],
                 "operands": {k: v.contiguous() for k, v in operands.items()}}
        news, operands, xs = bufs["news"], bufs["operands"], bufs["xs"]
        out_width = self.output_width(sizes)
        g_out = grad_out.reshape(rows, out_width).contiguous() if grad_out is not None else None
        # d loss / d (state i's new value) at the current step: B[i]; its old value, being written: A[i]
        widths = [sizes[ir.width(s)] for s in self.states]
        B = [g.contiguous().clone() if g is not None else X.new_zeros(N, w)
             for g, w in zip(grad_states, widths, strict=True)]
        A = [X.new_empty(N, w) for w in widths]
        d_step = [take(rows, w.shape[0], X.dtype) for w in step_w]
        alias = self.schedule.hoisted_alias
        d_hoist = [d_step[alias[i]] if i in alias else take(rows, w.shape[0], X.dtype)
                   for i, w in enumerate(hoisted_w)]
        slots = max(1, torch.get_num_threads())  # per-thread accumulators of the scalar gradients
        grads = {"out": g_out, "zeros": X.new_zeros(N, out_width),
                 "ops": {name: X.new_empty(N, sizes[self.width_of[name]]) for name in self.operand_names},
                 "step": d_step, "hoisted": d_hoist,
                 "x": {name: X.new_empty(rows, xs[name].shape[1]) for name in self.dx_from_kernels},
                 "vectors": [torch.zeros(v.shape[0], dtype=torch.float64) for v in vectors],
                 "scalars": [torch.zeros(slots, dtype=torch.float64) for _ in self.scalars]}
        args = {pw.name: [self._bind_backward(pw, a, b, bufs, grads) for a, b in ((A, B), (B, A))]
                for pw in self.plan.pointwise}
        if self.runs_native("step_backward", X.dtype, N, step_w):
            self._backward_native(bufs, grads, args, A, B, steps, offsets, N, step_w)
        else:
            self._backward_python(bufs, grads, args, A, B, steps, offsets, N, step_w)
        dstate = A if len(steps) % 2 == 1 else B  # the buffers written last: the initial states' gradients

        # weight gradients d.T @ operand; a GEMM gradient shared by two GEMMs (hoisted_alias) is
        # transposed once for both
        weight_grads: dict[int, cpu_gemm.WeightGrads] = {}

        def grads_of(d):
            if id(d) not in weight_grads:
                weight_grads[id(d)] = cpu_gemm.WeightGrads(d, self.lib, self.gemm, take)
            return weight_grads[id(d)]

        d_step_w = []
        for gi in range(len(self.gemms)):
            dP = grads_of(d_step[gi])
            is_state, index = self.gemm_operands[gi]
            if not is_state:
                d_step_w.append(dP(operands[index]))
            elif steps[-1] == N:  # operand rows: the initial state, then every new state but the last
                dw = dP(states[index])
                if rows > N:
                    dP(news[index][: rows - N], start=N, out=dw)
                d_step_w.append(dw)
            else:
                d_step_w.append(dP(self._previous_all(index, states, news, steps, offsets)))
        dx = {name: to_width(d, xs[name]) for name, d in grads["x"].items()}  # input -> [rows, its width]
        d_hoisted_w = []
        d_hoist_ops: dict[str, torch.Tensor] = {}
        hoisted_ops = self._hoisted_operands(xs, vectors, scalars)
        for gi, g in enumerate(self.hoisted):
            d_hoisted_w.append(grads_of(d_hoist[gi])(hoisted_ops[gi]))
            name = g.operand.name
            if not needs_dx and not self.hoist and self.where[name].kind == "input":
                continue  # the operand is an input itself
            d_op = cpu_gemm.matmul(d_hoist[gi], hoisted_w[gi], self.lib, self.gemm)
            d_hoist_ops[name] = d_op if name not in d_hoist_ops else d_hoist_ops[name] + d_op
        sums: dict = {}  # column sums of the GEMM gradients folded vectors read, one pass per buffer
        d_vectors = [self._vector_grad(i, grads["vectors"], d_hoist, d_step, bufs, sums).to(X.dtype)
                     for i in range(len(self.vectors))]
        d_scal = [a.sum().to(X.dtype) for a in grads["scalars"]]
        for st in self.hoist:
            hoist_args = [self._static(s, xs, vectors, scalars) for s in st.slots]
            hoist_grads = [d_hoist_ops.pop(n, None) for n, _ in st.pw.outputs]
            hoist_grads = [g if g is not None else X.new_zeros(rows, sizes[self.width_of[n]])
                           for g, (n, _) in zip(hoist_grads, st.pw.outputs, strict=True)]
            for sym, res in zip(st.pw.grad_inputs, st.backward(*hoist_args, *hoist_grads), strict=True):
                if res is None:
                    continue
                res = fit_gradient(res, st.pw.kinds[sym.name], rows, sizes[st.pw.width])
                slot = self.where[sym.name]
                if slot.kind == "input":
                    res = to_width(res, xs[slot.index])
                    dx[slot.index] = res if slot.index not in dx else dx[slot.index] + res
                elif slot.kind == "vector":
                    d_vectors[slot.index] = d_vectors[slot.index] + res.reshape(-1, res.shape[-1]).sum(0)
                elif slot.kind == "scalar":
                    d_scal[slot.index] = d_scal[slot.index] + res.sum()
        for name, d_op in d_hoist_ops.items():
            if self.where[name].kind == "input":
                dx[name] = d_op if name not in dx else dx[name] + d_op
        dx = self.join_input_grads(dx, X, sizes, hoisted_w, steps, offsets)
        if not needs_dx:
            dx = None
        else:  # no kernel read the input (a cell that ignores it): zeros
            dx = torch.zeros_like(x) if dx is None else dx.reshape(x.shape)
        return dx, list(dstate), d_hoisted_w, d_step_w, d_vectors, d_scal

    def _vector_grad(self, i: int, accumulators, d_hoist, d_step, bufs: dict, sums: dict) -> torch.Tensor:
        """Vector i's gradient: a column sum of its block's gradient (folded), the accumulator of the
        vector with the same gradient ("same:"), or its own accumulator."""
        if i in self.folded:
            kind, gi, block = self.folded[i]
            if (kind, gi) not in sums:
                sums[(kind, gi)] = (d_hoist if kind == "hoisted" else d_step)[gi].sum(0)
            start = bufs[f"{kind}_blocks"][gi][block]
            return sums[(kind, gi)][start : start + bufs["vectors"][i].shape[0]]
        j = self.same_vectors.get(i, i)
        return self._vector_grad(j, accumulators, d_hoist, d_step, bufs, sums) if j != i else accumulators[i]

    def _backward_native(self, bufs, grads, args, A, B, steps, offsets, N, step_w, run: bool = True):
        """Runs the native backward (unless run=False) -> (NativeLoop, its prepared call, the packed
        panels the call reads)."""
        H, dtype = bufs["sizes"]["H"], bufs["X"].dtype  # every value is H wide (native_blocker)
        native = self.native(dtype)
        nt = native.threads(N, H, N * sum(w.numel() for w in step_w), bufs["X"].shape[0])
        panels, gemms = [], []
        for gi, w in enumerate(step_w):
            panels.append(native.gemm.pack_plain(w, nt))
            is_state, index = self.gemm_operands[gi]
            if is_state:
                dest = (_Arg.fixed(A[index]).c(), _Arg.fixed(B[index]).c())
                accumulate = gi not in self.schedule.first_gemm[self.gemms[gi].stage]
            else:
                dest = (_Arg.fixed(grads["ops"][index]).c(),) * 2
                accumulate = False
            gemms.append(BackGemm(grad=_Arg.rows(grads["step"][gi]).c(), dest=(Rows * 2)(*dest),
                                  accumulate=int(accumulate), panels=panels[-1].data_ptr(),
                                  blocks=len(self.gemms[gi].products)))
        kernels = [_rows_array(a) for pw in self.plan.pointwise for a in args[pw.name]]
        self.ran["backward"] = "native"
        out_state = self.output_state if grads["out"] is not None and self.output_state is not None else -1
        state_grads = [t for pair in zip(A, B, strict=True) for t in pair]
        untouched = [int(i in self.untouched_states) for i in range(len(self.states))]
        prepared = native.prepare_backward(*_step_arrays(steps, offsets, bufs["padded"]), N, H, nt, gemms,
                                           kernels, state_grads, untouched, out_state, grads["out"])
        if run:
            native.run_backward(prepared)
        return native, prepared, panels

    def _backward_python(self, bufs, grads, args, A, B, steps, offsets, N, step_w) -> None:
        X, sizes = bufs["X"], bufs["sizes"]
        dtype = DTYPES[X.dtype]
        # per parity of the (A, B) swap, per stage: its kernels, one per output width
        calls = [[[_Bound(self.kernels[(st.pw.name, True)], dtype, sizes[st.pw.width], args[st.pw.name][p])
                   for st in steps_k] for _gemm_ids, steps_k in self.stages] for p in (0, 1)]
        products = self._products("step_backward", X.dtype, N, step_w)
        g_out, d_step, dops = grads["out"], grads["step"], grads["ops"]
        add_out = g_out is not None and self.output_state is not None
        for t in reversed(range(len(steps))):
            b, r = steps[t], offsets[t]
            q = offsets[t - 1] if t > 0 else -1
            parity = (len(steps) - 1 - t) % 2
            cur_A, cur_B = (A, B) if parity == 0 else (B, A)
            if add_out:
                cur_B[self.output_state][:b].add_(g_out[r : r + b])
            for k in reversed(range(len(self.stages))):
                for call in calls[parity][k]:
                    call(r, q, b)
                for gi in self.stages[k][0]:
                    dP = d_step[gi][r : r + b]
                    is_state, index = self.gemm_operands[gi]
                    if not is_state:
                        products[gi](dP, dops[index][:b])
                    else:
                        products[gi](dP, cur_A[index][:b], 0 if gi in self.schedule.first_gemm[k] else 1)
            for i in self.untouched_states:
                cur_A[i][:b].zero_()
            if b < N:  # rows past b did not run at step t: their gradient passes through unchanged
                for a_i, b_i in zip(cur_A, cur_B, strict=True):
                    a_i[b:].copy_(b_i[b:])


class PreparedStep:
    """One step (T = 1) of a cell bound once to its own buffers, for a decoder that calls a cell once
    per token: every kernel argument is bound when it is made, so a call copies x and the states in,
    runs the GEMMs and one native call, and returns copies of the results. No autograd.

    It reads the tensors it was given (the module's parameters or views of them) live, at every call,
    as torch.nn does: nothing computed from their values is kept across calls. The hoisted GEMMs and
    the step GEMMs on a state run before the native call on the weights as they are (`products`:
    torch's GEMM, or for a few rows the native row-major one, which reads the weight unpacked), their
    biases added up again at every call, and the native call skips those step GEMMs; a step GEMM on a
    value computed inside the step (`in_loop`) stays in the native call, its weight packed again and
    its bias added up again at every call. So a write torch does not count (`p.data.mul_()`, numpy,
    WGAN clipping, a target network's soft update) is seen at the next call. Its owner
    (nn/cells.py) makes a new one when a parameter's storage, shape or strides change; an op weight
    that is no view of a parameter is a copy: made of blocks that are views, the step reads the blocks
    in its place where it can (`read_blocks`), else the owner makes the copy again before each call."""

    def __init__(self, loop: FusedCPULoop, plan, x, states, hoisted_w, step_w, vectors, scalars):
        self.x = torch.empty(x.shape, dtype=x.dtype)
        self.states = [torch.empty(s.shape, dtype=s.dtype) for s in states]
        bufs, steps, offsets, packed_w, sizes = loop._buffers(plan, self.x, self.states, hoisted_w, step_w,
                                                              vectors, scalars, None)
        X, N = bufs["X"], self.x.shape[1]
        _hoisted_bias, step_bias = loop._biases(bufs["vectors"], bufs, hoisted_w, step_w)
        self.hoisted_x = loop._hoisted_operands(bufs["xs"], bufs["vectors"], bufs["scalars"])  # views of x
        self.hoisted_out = [X.new_empty(N, w.shape[0]) for w in hoisted_w]
        ir = loop.plan.ir
        self.news = [X.new_empty(N, sizes[ir.width(s)]) for s in loop.states]
        out = self.news[loop.output_state] if loop.output_state is not None else \
            X.new_empty(N, loop.output_width(sizes))
        self.out, self.output_state = out, loop.output_state
        step_out = [X.new_empty(0 if gi in loop.summed else N, w.shape[0]) for gi, w in enumerate(step_w)]
        named = {name: X.new_empty(N, sizes[loop.width_of[name]]) for name in loop.operand_names}
        bufs |= {"news": self.news, "out": out, "step": step_out, "operands": named,
                 "hoisted": self.hoisted_out}
        args = {pw.name: [loop._input(a.name, bufs) if a.part == "input" else loop._output(a.name, bufs)
                          for a in loop.kernels[(pw.name, False)].spec.args] for pw in loop.plan.pointwise}
        # the step GEMMs on a value made inside the step run in the native call, on panels and a bias
        # of their own that every call fills again (`_refill`)
        in_loop = [gi for gi, (is_state, _i) in enumerate(loop.gemm_operands) if not is_state]
        step_bias = [b.clone() if gi in in_loop and b is not None else b for gi, b in enumerate(step_bias)]
        self.native, prepared, panels = loop._forward_native(bufs, args, steps, offsets, N, packed_w,
                                                             step_bias, run=False)
        self.prepared = prepared
        on_states = [gi for gi in range(len(step_w)) if gi not in in_loop]
        self.forward_call = self.native.skipping(prepared, StepGemm, len(step_w), on_states)
        self.in_loop = [(gi, step_w[gi], panels[gi], step_bias[gi]) for gi in in_loop]
        self._loop, self._vectors, self._hoisted_w, self._step_w = loop, list(vectors), list(hoisted_w), \
            list(step_w)
        self._held = (bufs, panels, packed_w, step_bias)  # what the pointers point into
        self._steps = (steps, offsets, args)
        self._rows_gemm = cpu_gemm.native_gemm(loop.lib, x.dtype) if loop.lib is not None else None
        self._made = self._products(loop, plan, bufs, hoisted_w, step_w, vectors, on_states)
        self.calls, self._held_views = self._calls([self._bound(*p) for _i, p in self._made])
        self._views: dict = {}
        self._leads: dict = {}
        # held by a call while it uses the buffers (nn/cells.py, nn/prepared.py): the native call lets
        # go of the GIL, and two threads in one step wrote each other's inputs (tests/test_threads.py)
        self.lock = threading.RLock()

    def _products(self, loop, plan, bufs, hoisted_w, step_w, vectors, on_states) -> list:
        """The GEMMs run before the native call, each (the weight's index in the op's parameter
        list, (operand, live weight w [n, k], output, bias or None, [(output columns, live vector)]
        added after, whether it adds onto its output, the native GEMM (`_LiveGemm`) or None for
        torch's)): the hoisted ones, then the step ones on a state (whose operands are the initial
        states)."""
        N = self.x.shape[1]
        # per GEMM: (a live vector covering its bias or None, [(its output's columns, a live vector)])
        biases = {key: self._bias_terms(loop, key, bufs, hoisted_w, step_w, vectors, out)
                  for key, out in [*[(("hoisted", gi), o) for gi, o in enumerate(self.hoisted_out)],
                                   *[(("step", gi), o) for gi, o in enumerate(bufs["step"])]]
                  if key in loop.folded_blocks}
        products = []
        for gi, (a, w, out) in enumerate(zip(self.hoisted_x, hoisted_w, self.hoisted_out, strict=True)):
            products.append((gi, (a, w, out, *biases.get(("hoisted", gi), (None, [])), False,
                                  _LiveGemm.of(loop, w, N))))
        self.step_operands = []
        for gi, w in enumerate(step_w):
            operand = self.states[loop.gemm_operands[gi][1]] if gi in on_states else None
            self.step_operands.append(operand)
            if gi not in on_states:
                continue
            first, added = biases.get(("step", gi), (None, []))
            if gi in loop.summed:
                hi, block = loop.summed[gi]
                start = plan.hoisted_blocks[hi][block]
                out = self.hoisted_out[hi][:, start : start + w.shape[0]]
                added = [(out, first), *added] if first is not None else added
                product = (operand, w, out, None, added, True, _LiveGemm.of(loop, w, N))
            else:
                product = (operand, w, bufs["step"][gi], first, added, False, _LiveGemm.of(loop, w, N))
            products.append((len(hoisted_w) + gi, product))
        return products

    def _calls(self, bound: list) -> tuple[list, list]:
        """The products' operations in order as calls without arguments, each run of row-major
        products one native call (cd_gemm_rows_list)."""
        calls, held, rows = [], [], []
        for ops, tensors in bound:
            held += tensors
            for kind, op in ops:
                if kind == "rows":
                    rows.append(op)
                    continue
                if rows:
                    calls.append(self._rows_gemm.rows(rows))
                    rows = []
                calls.append(op)
        if rows:
            calls.append(self._rows_gemm.rows(rows))
        return calls, held

    def read_blocks(self, blocks: dict[int, list[torch.Tensor]]) -> set[int]:
        """Weights given as their row blocks ({index in the op's parameter list: [blocks]}, views of
        the module's parameters: the weight is their concatenation, a copy) read block by block,
        live, where every product on them is row-major and none runs in the native call -> the
        indices now read live: their copy is no longer read, and needs no refreshing."""
        in_loop = {len(self._hoisted_w) + gi for gi, *_rest in self.in_loop}
        live = set()
        for i, parts in blocks.items():
            uses = [p for j, p in self._made if j == i]
            if uses and i not in in_loop and all(p[6] is not None and p[6].rowwise for p in uses) \
                    and all(b.dim() == 2 and b.stride(1) == 1 for b in parts):
                live.add(i)
        if live:
            self._blocks = {i: blocks[i] for i in live}
            self.calls, self._held_views = self._calls([self._bound(*p, blocks=self._blocks.get(i))
                                                        for i, p in self._made])
        return live

    @staticmethod
    def _bound(a, w, out, bias, added, adds, native, blocks=None) -> tuple[list, list]:
        """One product of `_products` as ([("rows", row-major kernel arguments) or ("call", a call
        without arguments)], the tensors the arguments point into), reading w (or its row blocks,
        where given) and the vectors as they are when it runs."""
        if native is not None and native.rowwise:
            return _rowwise_segments(a, w, out, bias, added, adds, native, blocks)
        return [("call", PreparedStep._torch_or_packed(a, w, out, bias, added, adds, native))], []

    @staticmethod
    def _torch_or_packed(a, w, out, bias, added, adds, native):
        """A product on w packed at the call (native) or torch's GEMM, its vectors added by torch."""
        if native is not None:
            init = 1 if adds else 0 if bias is None else 2
            if adds and added and added[0][0] is out:  # += bias + a @ w.T in one call
                init, bias, added = 3, added[0][1], added[1:]
            gemm = native.bind(a, w, out, init, bias)
            if not added:
                return gemm

            def run_native():
                gemm()
                for cols, v in added:
                    cols.add_(v)
            return run_native

        def run_torch():
            if adds:
                out.addmm_(a, w.t())
            elif bias is None:
                torch.mm(a, w.t(), out=out)
            else:
                torch.addmm(bias, a, w.t(), out=out)
            for cols, v in added:
                cols.add_(v)
        return run_torch

    @staticmethod
    def _bias_terms(loop, key, bufs, hoisted_w, step_w, vectors, out) -> tuple:
        """(a live vector that is the whole bias, or None; [(columns of `out`, a live vector)] added
        after the GEMM): the folded vectors of one GEMM, added at each call. Vectors that lie next to
        each other in one tensor, in the order of the blocks they go to, are one term (torch's
        bias_ih: one add)."""
        kind, gi = key
        w = (hoisted_w if kind == "hoisted" else step_w)[gi]
        starts = bufs[f"{kind}_blocks"][gi]
        # in the order of the cell's vectors, not of their addresses: which vector is the GEMM's bias
        # and which are added after it sets the order of the sums, and by address two modules with
        # the same weights gave numbers a rounding apart (tests/test_streaming_step.py)
        terms = sorted((i, starts[b], vectors[i]) for b, ids in loop.folded_blocks[key].items() for i in ids)
        merged: list[list] = []
        for _i, start, v in terms:
            if merged:
                s0, parts = merged[-1]
                last = parts[-1]
                if start == s0 + sum(p.numel() for p in parts) and v.is_contiguous() \
                        and last.is_contiguous() \
                        and v.untyped_storage().data_ptr() == last.untyped_storage().data_ptr() \
                        and v.storage_offset() == last.storage_offset() + last.numel():
                    parts.append(v)
                    continue
            merged.append([start, [v]])
        first, added = None, []
        for start, parts in merged:
            n = sum(p.numel() for p in parts)
            base = parts[0]._base if parts[0]._base is not None else parts[0]
            # one view over adjacent vectors (live: a view of the parameter)
            source = parts[0] if len(parts) == 1 else \
                base.view(-1)[parts[0].storage_offset() - base.storage_offset():][:n]
            if first is None and n == w.shape[0]:
                first = source
            else:
                added.append((out[:, start : start + n], source))
        return first, added

    def _as(self, buf: torch.Tensor, shape) -> torch.Tensor:
        """buf (contiguous) viewed as `shape`, the same elements in the same order (an unbatched
        call's [I], a layer's [1, N, I] or [N, 1, I] for x [1, N, I]); each view made once."""
        if buf.shape == shape:
            return buf
        key = (id(buf), shape)
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = buf.view(shape)
        return view

    def _copy_in(self, x: torch.Tensor, states) -> None:
        """x and the given states into their buffers (the rest of the states zero), each of any shape
        with the buffer's elements in its order."""
        self._as(self.x, x.shape).copy_(x)
        for buf, s in zip(self.states, states, strict=False):
            self._as(buf, s.shape).copy_(s)
        for buf in self.states[len(states):]:
            buf.zero_()

    def _news(self, lead) -> list[torch.Tensor]:
        """Copies of the new states, each shaped lead + (width,)."""
        views = self._leads.get(lead)
        if views is None:
            views = self._leads[lead] = [n.view(*lead, n.shape[-1]) for n in self.news]
        return [v.clone() for v in views]

    def _refill(self) -> None:
        """The in-loop step GEMMs' panels and biases from the weights and vectors as they are now."""
        loop, bufs = self._loop, self._held[0]
        _hoisted, biases = loop._biases(self._vectors, bufs, self._hoisted_w, self._step_w)
        for gi, w, panels, bias in self.in_loop:
            _pack_step_weight(loop, self.native, gi, w, panels, self.prepared[0].nt)
            if bias is not None:
                bias.copy_(biases[gi])

    def _run(self, x: torch.Tensor, states: list[torch.Tensor]) -> None:
        """The step on x and the given states (copied in), into the bound buffers, on the weights
        as they are now."""
        self._copy_in(x, states)
        for call in self.calls:
            call()
        if self.in_loop:
            self._refill()
        self.native.run_forward(self.forward_call)

    def __call__(self, x: torch.Tensor, states: list[torch.Tensor], distinct_out: bool = True, lead=None,
                 out_lead=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x [1, N, I] and the first len(states) states [N, width] (the rest start at zero), of the
        dtype it was made for, or the same elements in other shapes -> (out, new states): the new
        states shaped lead + (width,), out out_lead + (width,) (both (N,) if None). distinct_out=False:
        out may be the new state it equals (for a caller that returns only one of them)."""
        self._run(x, states)
        news = self._news((self.x.shape[1],) if lead is None else lead)
        if not distinct_out and self.output_state is not None:
            return news[self.output_state], news
        out_lead = (self.x.shape[1],) if out_lead is None else out_lead
        return self._as(self.out, (*out_lead, self.out.shape[-1])).clone(), news


def _pack_step_weight(loop: FusedCPULoop, native: NativeLoop, gi: int, w: torch.Tensor, panels: torch.Tensor,
                      threads: int) -> None:
    """Step GEMM gi's weight as it is now into the panels `_forward_native` packed it into at first
    (a prepared call's, filled again at every call)."""
    groups = len(loop.gemms[gi].products)
    n, k = w.shape[0] // groups, w.shape[1]
    native.gemm.pack(w.contiguous(), groups, n, k, k, 1, n * k, threads, panels)


class PreparedSequence:
    """FusedCPULoop.infer on a padded sequence with its kernel arguments bound once, to buffers of its
    own, for calls of one signature: binding them is most of a small call's time (a layer's call at
    T=10 N=8 H=64 spent ~110 us there, ~50 us in the native loop). Like PreparedStep, it reads the
    weights and vectors live at every call: the hoisted GEMMs run on them, the step GEMMs' panels are
    packed again and their biases added up again, and the kernels read the vectors in place (they
    must be contiguous); the numbers are infer's, bit for bit, but for the hoisted product, which
    infer may compute chunk by chunk (bit for bit the same). A call copies x and the states in and
    its results out, so its owner (nn/stack.py) keeps it for small calls (SEQUENCE_ELEMENTS) and
    holds `lock` while it runs."""

    def __init__(self, loop: FusedCPULoop, plan, x, states, hoisted_w, step_w, vectors, scalars,
                 save: bool = False):
        """save: keep every step's values, as `forward` does (PreparedTrainSequence), not `infer`'s."""
        self.loop, self.plan = loop, plan
        self.x = torch.empty(x.shape, dtype=x.dtype)
        self.states = [torch.empty(s.shape, dtype=s.dtype) for s in states]
        bufs, steps, offsets, packed_w, _sizes = loop._buffers(plan, self.x, self.states, hoisted_w, step_w,
                                                               vectors, scalars, None)
        X, N = bufs["X"], self.x.shape[1]
        self.hoisted_ops = loop._hoisted_operands(bufs["xs"], bufs["vectors"], bufs["scalars"])  # views of X
        self.hoisted_out = [X.new_empty(X.shape[0], w.shape[0]) for w in hoisted_w]
        _hoisted_bias, step_bias = loop._biases(bufs["vectors"], bufs, hoisted_w, step_w)
        self.step_bias = [None if b is None else b.clone() for b in step_bias]  # filled at every call
        args = loop._bind_outputs(bufs, N, packed_w, self.hoisted_out, save, True)
        self.native, self.prepared, self.panels = loop._forward_native(
            bufs, args, steps, offsets, N, packed_w, self.step_bias, run=False)
        self.news, self.out, self.one_step = bufs["news"], bufs["out"], bufs["one_step"]
        self.hoisted_w, self.step_w, self.vectors = list(hoisted_w), list(step_w), bufs["vectors"]
        self._held = (bufs, args)  # what the bound pointers point into
        self.lock = threading.Lock()  # not re-entrant: a nested call takes the full path

    def __call__(self, x: torch.Tensor, states: list[torch.Tensor]) -> tuple[torch.Tensor, list]:
        """x [T, N, I] (any strides) and the first len(states) states [N, width] (the rest start at
        zero) -> (out [T, N, width], final states [N, width]), tensors of their own."""
        self._run(x, states)
        T, N = self.x.shape[0], self.x.shape[1]
        rows = T * N
        finals = [n.clone() if id(n) in self.one_step else n[rows - N :].clone() for n in self.news]
        return self.out.view(T, N, -1).clone(), finals

    def _run(self, x: torch.Tensor, states: list[torch.Tensor]) -> None:
        """The sequence on x and the given states (copied in), into the bound buffers, on the
        weights and vectors as they are now."""
        loop = self.loop
        self.x.copy_(x)
        for buf, s in zip(self.states, states, strict=False):
            buf.copy_(s)
        for buf in self.states[len(states):]:
            buf.zero_()
        bufs = self._held[0]
        hoisted_bias, step_bias = loop._biases(self.vectors, bufs, self.hoisted_w, self.step_w)
        for op, w, bias, out, backend in zip(self.hoisted_ops, self.hoisted_w, hoisted_bias, self.hoisted_out,
                                             self.plan.hoisted, strict=True):
            out.copy_(cpu_gemm.linear(op, w, bias, loop.lib, backend))
        for gi, (w, panels) in enumerate(zip(self.step_w, self.panels, strict=True)):
            _pack_step_weight(loop, self.native, gi, w, panels, self.prepared[0].nt)
            if self.step_bias[gi] is not None:
                self.step_bias[gi].copy_(step_bias[gi])
        self.native.run_forward(self.prepared)


class _TrainBackward:
    """What PreparedTrainStep and PreparedTrainSequence share: the backward's buffers and kernel
    arguments bound once over `rows` rows (N for a step, T * N for a sequence), the gradients copied
    in before each backward, the records' protocol (a forward's values copied into its Record before
    a later call overwrites them), and the parameters' gradients read off the buffers (`gemm_grad`,
    `gradients`: nn/prepared.Layout)."""

    def _bind_backward(self, loop: FusedCPULoop, bufs: dict, steps, offsets, rows: int, hoisted_w, step_w,
                       vectors):
        """Binds the backward -> (its NativeLoop, prepared call, packed panels)."""
        X, N, sizes = bufs["X"], self.x.shape[1], bufs["sizes"]
        self.hoisted_w, self.step_w = list(hoisted_w), list(step_w)  # live: not copies
        widths = [s.shape[1] for s in self.states]
        A, B = [X.new_empty(N, w) for w in widths], [X.new_empty(N, w) for w in widths]
        d_step = [X.new_empty(rows, w.shape[0]) for w in step_w]
        alias = loop.schedule.hoisted_alias
        d_hoist = [d_step[alias[i]] if i in alias else X.new_empty(rows, w.shape[0])
                   for i, w in enumerate(hoisted_w)]
        self.g_out = X.new_zeros(rows, loop.output_width(sizes))
        self.g_out_zero = True
        accumulators = [torch.zeros(v.shape[0], dtype=torch.float64) for v in vectors]
        grads = {"out": self.g_out, "zeros": self.g_out[:N], "step": d_step, "hoisted": d_hoist, "x": {},
                 "ops": {name: X.new_empty(N, sizes[loop.width_of[name]]) for name in loop.operand_names},
                 "vectors": accumulators, "scalars": []}
        args = {pw.name: [loop._bind_backward(pw, a, b, bufs, grads) for a, b in ((A, B), (B, A))]
                for pw in loop.plan.pointwise}
        native, prepared, panels = loop._backward_native(bufs, grads, args, A, B, steps, offsets, N,
                                                         [w.contiguous() for w in step_w], run=False)
        self._held_back = (grads, args, panels)  # what the bound pointers point into
        self.A, self.B, self.d_step, self.d_hoist = A, B, d_step, d_hoist
        self.d_step_t, self.d_hoist_t = [d.t() for d in d_step], [d.t() for d in d_hoist]
        # the accumulators the kernels add into (zeroed per call); the others are GEMM columns' sums
        self.accumulated = [accumulators[i] for i in range(len(vectors))
                            if i not in loop.folded and i not in loop.same_vectors]
        self.accumulators = accumulators
        self.state_of_gemm = [i for _is_state, i in loop.gemm_operands]
        self.vector_sources = [_vector_source(loop, i, bufs) for i in range(len(vectors))]
        self.holds = _dead  # the Record of the call whose values the buffers hold
        return native, prepared, panels

    def _record(self) -> Record:
        """A new call's Record, after the previous call's values were copied into its own (`spill`)."""
        record = Record()
        self.holds = weakref.ref(record)
        return record

    def spill(self) -> None:
        """Copies the buffers' values into the Record of the call they belong to, before they are
        overwritten, if that call's backward may yet run (its Record and the tensors autograd saved
        for it are alive) and it has no copy yet. A caller that refills a buffer itself (`keep_also`)
        calls it first."""
        held = self.holds()
        if held is not None and held.needed():
            held.values = [k.clone() for k in self.kept]

    def _restore(self, record: Record) -> bool:
        """Makes the buffers hold `record`'s call's values (copied back, after the values they hold
        were spilled) -> whether they had to be copied."""
        if self.holds() is record:
            return False
        if record.values is None:  # not spilled: its saved tensors were freed (Record.needed)
            raise RuntimeError("Trying to backward through the graph a second time (or directly access "
                               "saved tensors after they have already been freed). Specify retain_graph=True "
                               "if you need to backward through the graph a second time. (celldsl: a "
                               "prepared call's values were released)")
        self.spill()
        self.holds = weakref.ref(record)
        for buf, k in zip(self.kept, record.values, strict=True):
            buf.copy_(k)
        return True

    def keep_also(self, tensors: list[torch.Tensor]) -> None:
        """Tensors the backward reads that the caller refills before each forward (a GEMM weight
        copied from parameters stored apart): kept with each call's values, so an earlier call's
        backward reads that call's weights, not those of a later forward."""
        self.kept = [*self.kept, *tensors]

    def _take_gradients(self, grad_out, grad_news) -> None:
        """grad_out and the new (final) states' gradients into their buffers (None: zeros), and the
        accumulators zeroed, for one backward."""
        for buf, g in zip(self.B, grad_news, strict=True):
            if g is None:
                buf.zero_()
            else:
                buf.copy_(g.reshape(buf.shape))
        if grad_out is not None:
            self.g_out.copy_(grad_out.reshape(self.g_out.shape))
            self.g_out_zero = False
        elif not self.g_out_zero:  # the native call only reads it
            self.g_out.zero_()
            self.g_out_zero = True
        for acc in self.accumulated:
            acc.zero_()

    @staticmethod
    def weight_grad(d: torch.Tensor, operand: torch.Tensor) -> torch.Tensor:
        """d.T @ operand, a weight's gradient (nn/prepared.Layout), as a new tensor: torch's GEMM."""
        return torch.mm(d.t(), operand)

    def gemm_grad(self, kind: str, gi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(d rows [rows, out], operand [rows, cols]) of hoisted or step GEMM gi: after a backward, its
        weight's gradient is d.T @ operand and a bias block's the column sums of d. Buffers bound
        once: their values are the latest backward's."""
        if kind == "hoisted":
            return self.d_hoist[gi], self.hoisted_x[gi]
        return self.d_step[gi], self.step_operands[gi]

    def gradients(self) -> tuple[list[torch.Tensor], list[torch.Tensor], dict]:
        """The latest backward's parameter gradients, fresh tensors: ([d hoisted weight], [d step
        weight], {vector source (vector_sources): its values})."""
        d_step_w = [torch.mm(d_t, a) for d_t, a in zip(self.d_step_t, self.step_operands, strict=True)]
        d_hoisted_w = [torch.mm(d_t, a) for d_t, a in zip(self.d_hoist_t, self.hoisted_x, strict=True)]
        sources = {}
        for key, _start in self.vector_sources:
            if key not in sources:
                if key[0] == "acc":
                    sources[key] = self.accumulators[key[1]].to(self.x.dtype, copy=True)
                else:
                    sources[key] = (self.d_hoist if key[0] == "hoisted" else self.d_step)[key[1]].sum(0)
        return d_hoisted_w, d_step_w, sources


def _vector_source(loop: FusedCPULoop, i: int, bufs: dict) -> tuple:
    """Where vector i's gradient is: (("hoisted" or "step", GEMM), first column) of a GEMM gradient's
    column sums, or (("acc", j), 0): accumulator j."""
    i = loop.same_vectors.get(i, i)
    if i in loop.folded:
        kind, gi, block = loop.folded[i]
        return (kind, gi), bufs[f"{kind}_blocks"][gi][block]
    return ("acc", i), 0


class PreparedTrainStep(PreparedStep, _TrainBackward):
    """A PreparedStep for a call under autograd. Its buffers and kernel arguments are bound once,
    forward and backward, but it reads the weights live: the GEMMs are torch's on the tensors it was
    given (the module's parameters or views of them), the biases added up again at every call, so a
    write torch does not count (`p.data.add_(...)`, gradcheck's perturbations) is seen as in
    torch.nn. `forward` hands back copies of what the backward reads (the hoisted rows, the step
    products, the in-step operands); a backward copies the gradients in (and its forward's values,
    unless the buffers still hold them), runs one native call (the kernels), then the GEMMs of the
    input's and the initial states' gradients where needed. The op parameters' gradients (hoisted
    weights, step weights, vectors by `vector_sources`) are then read off its buffers (`gemm_grad`:
    one GEMM per weight, column sums per bias) or made by `gradients`; nn/prepared.Layout makes the
    module's, only those needed. Every step GEMM must multiply a state (FusedCPULoop.prepare_train_step)."""

    saves_input = False  # a cell's input may be written after the call (the step keeps a copy)

    def __init__(self, loop: FusedCPULoop, plan, x, states, hoisted_w, step_w, vectors, scalars):
        super().__init__(loop, plan, x, states, hoisted_w, step_w, vectors, scalars)
        bufs, _panels, _step_w, _step_bias = self._held
        steps, offsets, _args = self._steps
        self.back_native, prepared, _panels = self._bind_backward(loop, bufs, steps, offsets, self.x.shape[1],
                                                                  hoisted_w, step_w, vectors)
        # the state GEMMs' d operands (d initial states) run here, with torch, where needed: at
        # T = 1 the backward's GEMMs only add onto the d initial states, so the native call runs none
        every = list(range(len(step_w)))
        self.backward_call = self.back_native.skipping(prepared, BackGemm, len(step_w), every)
        # what a backward reads besides the initial states (x: a copy, the caller may write into x)
        self.kept = [self.x, *bufs["hoisted"], *[s for s in bufs["step"] if s.numel()],
                     *bufs["operands"].values()]

    def forward(self, x: torch.Tensor, states: list[torch.Tensor], lead) -> tuple[list[torch.Tensor], Record]:
        """Runs the step on x and the given states (shaped as `__call__` takes them) -> (copies of
        the new states shaped lead + (width,), the Record its backward takes). The buffers are about
        to be overwritten: the previous call's values are copied into its Record first, if that
        Record is still held (its backward may yet run)."""
        self.spill()
        self._run(x, states)
        return self._news(lead), self._record()

    def output(self, lead) -> torch.Tensor:
        """A copy of the latest forward's output, shaped lead + (width,)."""
        return self._as(self.out, (*lead, self.out.shape[-1])).clone()

    def backward(self, record: Record, states, grad_out, grad_news, needs_dx: bool, needs_states):
        """The gradients of the forward that made `record` (given the states it took), for grad_out
        (None: zero) and the new states' gradients (None: zero) -> (dx or None, [d initial state or
        None, per needs_states]); the parameters' are then made from the buffers it leaves
        (`gemm_grad`, `gradients`), only those needed. At T = 1 the backward reads the initial
        states, not the new ones."""
        if self._restore(record):
            for buf, s in zip(self.states, states, strict=False):
                self._as(buf, s.shape).copy_(s)
            for buf in self.states[len(states):]:
                buf.zero_()
        self._take_gradients(grad_out, grad_news)
        self.back_native.run_backward(self.backward_call)
        if any(needs_states):
            for d, w, i in zip(self.d_step, self.step_w, self.state_of_gemm, strict=True):
                self.A[i].addmm_(d, w)
        dx = None
        if needs_dx:
            for d, w in zip(self.d_hoist, self.hoisted_w, strict=True):
                dx = torch.mm(d, w) if dx is None else dx.addmm_(d, w)
            if dx is None:
                dx = torch.zeros_like(self.x[0])
        dstates = [a.clone() if need else None for a, need in zip(self.A, needs_states, strict=False)]
        return dx, dstates


class PreparedTrainSequence(PreparedSequence, _TrainBackward):
    """A PreparedSequence for a call under autograd (a small layer's training call: nn/stack.py, through
    nn/prepared.PreparedCall, the same Function as PreparedTrainStep's). The forward keeps every
    step's values in its buffers, as FusedCPULoop.forward saves them (`kept`); the backward is bound
    once too: it copies the gradients in, repacks the step weights as they are now, runs one native
    call over the steps, then torch's GEMMs for the input's gradient. The op parameters' gradients
    are read off its buffers (`gemm_grad`, `gradients`) as PreparedTrainStep's, so nn/prepared.Layout
    makes the module's. As there, a later forward first copies the buffers into the earlier call's
    Record while that call's backward may still run, and a backward of an earlier call copies its
    values back. Every step GEMM multiplies a state and every hoisted GEMM the input
    (FusedCPULoop.prepare_train_sequence)."""

    saves_input = True  # nn/prepared.PreparedCall saves x: a write into it is autograd's error, as torch.nn's

    def __init__(self, loop: FusedCPULoop, plan, x, states, hoisted_w, step_w, vectors, scalars):
        super().__init__(loop, plan, x, states, hoisted_w, step_w, vectors, scalars, save=True)
        bufs, _args = self._held
        N, rows = self.x.shape[1], bufs["X"].shape[0]
        self.back_native, self.back_prepared, self.back_panels = self._bind_backward(
            loop, bufs, [N] * self.x.shape[0], list(range(0, rows, N)), rows, hoisted_w, step_w, vectors)
        # the initial states' gradients: the buffers the last step (t = 0) wrote (A, B swap per step)
        self.d_initial = self.A if self.x.shape[0] % 2 == 1 else self.B
        # a step GEMM's operand rows: the initial state, then every new state but the last
        widths = [s.shape[1] for s in self.states]
        self.previous = {i: bufs["X"].new_empty(rows, widths[i]) for i in set(self.state_of_gemm)}
        self.step_operands = [self.previous[i] for i in self.state_of_gemm]
        self.hoisted_x = self.hoisted_ops
        self._backends: dict[tuple, str] = {}
        # what a backward reads (x and the initial states: copies, the caller may write into them)
        self.kept = [self.x, *self.states, *[n for n in self.news if n.numel()],
                     *[t for t in bufs["step"] if t.numel()], *bufs["operands"].values(), *self.hoisted_out]

    def _backend(self, kind: str, m: int, k: int, n: int) -> str:
        """The GEMM backend measured fastest for a product of the backward, as FusedCPULoop.backward's
        (at T * N rows the native GEMM took 0.65x torch's time for [160, 256].T @ [160, 128], and an
        LSTM at T=20 N=16 H=256 took 1.35x the full path's time on torch's GEMMs alone); chosen once
        per shape: a change of the choices (the loop's revision) makes a new sequence."""
        key = (kind, m, k, n)
        backend = self._backends.get(key)
        if backend is None:
            backend = self._backends[key] = cpu_gemm.choose(cpu_gemm.site(kind, self.x.dtype, m, k, n),
                                                            self.loop.lib, force=self.loop.gemm)
        return backend

    def weight_grad(self, d: torch.Tensor, operand: torch.Tensor) -> torch.Tensor:
        """d.T @ operand as a new tensor, on the backend chosen for its shape; a block of d's columns
        (a weight stored in blocks) on torch's."""
        if not d.is_contiguous() or \
                self._backend("weight_grad", d.shape[0], operand.shape[1], d.shape[1]) != "native":
            return torch.mm(d.t(), operand)
        return cpu_gemm.WeightGrads(d, self.loop.lib, "native")(operand)

    def forward(self, x: torch.Tensor, states: list[torch.Tensor], lead) -> tuple[list[torch.Tensor], Record]:
        """Runs the sequence on x [T, N, I] and the given states [N, width] (the rest zero) -> (copies
        of the final states shaped lead + (width,), the Record its backward takes)."""
        self.spill()
        self._run(x, states)
        N = self.x.shape[1]
        return [n[n.shape[0] - N :].view(*lead, n.shape[-1]).clone() for n in self.news], self._record()

    def output(self, lead) -> torch.Tensor:
        """A copy of the latest forward's output, shaped lead + (width,) (lead: (T, N))."""
        return self.out.view(*lead, self.out.shape[-1]).clone()

    def backward(self, record: Record, states, grad_out, grad_finals, needs_dx: bool, needs_states):
        """The gradients of the forward that made `record`, for grad_out ([T, N, width] or None: zero)
        and the final states' gradients (None: zero) -> (dx [T * N, I] or None, [d initial state or
        None, per needs_states]); the parameters' are then made from its buffers (`gemm_grad`,
        `gradients`), only those needed. `states` (PreparedTrainStep.backward's argument) is not
        read: the buffers, or the record's copies, hold the initial states."""
        self._restore(record)
        self._take_gradients(grad_out, grad_finals)
        nt = self.back_prepared[0].nt
        for w, panels in zip(self.step_w, self.back_panels, strict=True):  # the weights as they are now
            self.back_native.gemm.pack_plain(w.contiguous(), nt, panels)
        self.back_native.run_backward(self.back_prepared)
        N, rows = self.x.shape[1], self.g_out.shape[0]
        for i, prev in self.previous.items():
            prev[:N].copy_(self.states[i])
            prev[N:].copy_(self.news[i][: rows - N])
        dx = None
        if needs_dx:  # d hoisted rows @ W, with the backend measured fastest for its shape
            for d, w in zip(self.d_hoist, self.hoisted_w, strict=True):
                d_x = cpu_gemm.matmul(d, w, self.loop.lib, self._backend("input_grad", d.shape[0], w.shape[1],
                                                                         w.shape[0]))
                dx = d_x if dx is None else dx.add_(d_x)
            if dx is None:
                dx = torch.zeros_like(self.x).view(rows, -1)
        dstates = [a.clone() if need else None for a, need in zip(self.d_initial, needs_states, strict=False)]
        return dx, dstates


class Record:
    """One PreparedTrainStep's or PreparedTrainSequence's call, for its backward: `values` holds copies
    of what the backward reads once a later call overwrote the buffers (None while they still hold
    them); `alive` (set by nn/prepared.PreparedCall) a weak reference to a tensor autograd keeps
    while that backward may still run."""

    __slots__ = ("values", "alive", "__weakref__")

    def __init__(self):
        self.values = None
        self.alive = None

    def needed(self) -> bool:
        return self.values is None and (self.alive is None or self.alive() is not None)


def _dead():
    return None


class _LiveGemm:
    """out (init 0: =, 1: +=, 2: = bias +) a @ w.T with the native GEMM on the weight as it is at the
    call: for a few rows (at most ROWWISE_ROWS) the kernel that reads w row-major (cd_gemm_rows), else
    w packed into panels of its own at every call, then the panel kernel (at N = 32, a 1024 x 256
    weight: ~27 us to pack, ~70 us the product, against ~175 us for torch's and ~135 us row-major)."""

    # measured crossover (one thread, AVX-512, 1024 x 256): row-major 44 us at 8 rows, 64 at 12; packed
    # 27 + 20 at 8, 27 + 28 at 12
    ROWWISE_ROWS = 8

    def __init__(self, gemm, w: torch.Tensor, rows: int, threads: int):
        self.gemm, self.threads = gemm, threads
        self.rowwise = rows <= self.ROWWISE_ROWS and gemm.has_rows
        self.panels = None if self.rowwise else \
            torch.empty(gemm.panels(w.shape[0]) * gemm.width * w.shape[1], dtype=w.dtype)

    @classmethod
    def of(cls, loop: FusedCPULoop, w: torch.Tensor, rows: int) -> _LiveGemm | None:
        """The native GEMM for a product of `rows` rows on w, or None where torch's runs it: the
        GEMM chosen for the shape is not the native one (cpu_gemm.choose, or CELLDSL_CPU_GEMM), or w's
        columns are not contiguous."""
        if loop.lib is None or w.dim() != 2 or w.stride(1) != 1 or w.shape[1] == 0:
            return None
        site = cpu_gemm.site("step", w.dtype, rows, w.shape[1], w.shape[0])
        if cpu_gemm.choose(site, loop.lib, force=loop.gemm) != "native":
            return None
        threads = cpu_gemm.native_threads(rows * w.numel(), torch.get_num_threads())
        return cls(cpu_gemm.native_gemm(loop.lib, w.dtype), w, rows, threads)

    def bind(self, a, w, out, init: int, bias):
        """out (init 0: =, 1: +=, 2: = bias +, 3: += bias +) a @ w.T on w packed at the call, as a
        call without arguments (the row-major kernel's products: PreparedStep._calls)."""
        n, k = w.shape

        def run():
            self.gemm.pack(w, 1, n, k, w.stride(0), 1, 0, self.threads, self.panels)
            self.gemm.gemm(a, self.panels, out, 1 if init == 3 else init, bias, self.threads)
            if init == 3:
                out.add_(bias)
        return run


def _rowwise_segments(a, w, out, bias, added, adds: bool, native: _LiveGemm, blocks=None) -> list:
    """out (=, or += where adds) a @ w.T + its vectors (bias over all columns, added over some) as
    products of the row-major kernel (NativeGemm.rows_call), one per run of columns that the same
    vectors cover, each taking two vectors itself (torch's b_ih + b_hh: no pass of their own); a
    third, if any, is added after by torch. -> [("rows", arguments) or ("call", callable)] and the
    tensors the arguments point into. blocks: w's rows as views of other tensors, read in their
    place (a run of columns never spans two)."""
    size = out.element_size()
    starts = [0]
    for b in blocks or []:
        starts.append(starts[-1] + b.shape[0])
    terms = [(0, out.shape[1], bias)] if bias is not None else []
    for cols, v in added:
        start = (cols.data_ptr() - out.data_ptr()) // size
        terms.append((start, start + cols.shape[1], v))
    cuts = sorted({0, out.shape[1], *[t[0] for t in terms], *[t[1] for t in terms], *starts})
    ops, held = [], []
    for p, q in zip(cuts, cuts[1:], strict=False):
        vs = [v[p - s : q - s] for s, e, v in terms if s <= p and q <= e]
        cols = out[:, p:q]
        if blocks:
            k = max(j for j, start in enumerate(starts[:-1]) if start <= p)
            rows = blocks[k][p - starts[k] : q - starts[k]]
        else:
            rows = w[p:q]
        held += [rows, cols, *vs]
        init = (1 if adds else 0) if not vs else (3 if adds else 2)
        ops.append(("rows", native.gemm.rows_call(a, rows, cols, init, vs[0] if vs else None,
                                                  native.threads, vs[1] if len(vs) > 1 else None)))
        ops += [("call", functools.partial(torch.Tensor.add_, cols, v)) for v in vs[2:]]
    return ops, held
