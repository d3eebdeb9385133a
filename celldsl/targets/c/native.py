"""Calls the native time loop of a cell (targets/c/emit_loop.py): the structures it reads, built with ctypes.

FusedCPULoop (targets/c/fused.py) allocates the buffers and binds every kernel argument to its
rows exactly as for its Python loop; this module packs the step weights for the native GEMM (once
per call: the weights may change between calls, in place, without torch telling) and hands the whole
sequence to cd_forward_T / cd_backward_T in one call. Layouts mirror the C structs field by field
(every field 8 bytes, so there is no padding to get wrong).
"""

from __future__ import annotations

import ctypes

import torch

from .gemm import DTYPES, MIN_PARALLEL_WORK, native_gemm

I64, PTR = ctypes.c_int64, ctypes.c_void_p
MIN_STEP_WORK = MIN_PARALLEL_WORK  # multiply-adds of a step below which the native loop runs on one thread
MIN_ELEMENTWISE_WORK = 1 << 14  # elements of a whole sequence, for cells without a state GEMM


class Rows(ctypes.Structure):
    """cd_rows: an argument's rows at a step (see c_source.CALL_AT)."""

    _fields_ = [("base", I64), ("row_bytes", I64), ("first", I64), ("ld", I64), ("prev", I64)]


class Loop(ctypes.Structure):
    """cd_loop."""

    _fields_ = [("T", I64), ("N", I64), ("H", I64), ("nt", I64), ("steps", PTR), ("offsets", PTR),
                ("gemms", PTR), ("kernels", PTR), ("grads", PTR), ("untouched", PTR),
                ("n_states", I64), ("out_state", I64), ("g_out", PTR), ("tiles", PTR), ("width", I64),
                ("hk", I64), ("hx", PTR), ("hlda", I64), ("hK", I64), ("hpanels", PTR), ("hbias", PTR),
                ("hinit", I64), ("hblocks", I64), ("hld", I64), ("hmr", I64), ("ring", PTR), ("hr0", I64),
                ("nre", I64), ("re", PTR), ("re_off", PTR), ("ftiles", PTR), ("fgemm", I64)]


class StepGemm(ctypes.Structure):
    """cd_step_gemm: output (init 0: =, 1: +=, 2: = bias +) operand @ W.T at one step."""

    _fields_ = [("operand", Rows), ("output", Rows), ("init", I64), ("bias", PTR), ("panels", PTR),
                ("K", I64), ("blocks", I64)]


class BackGemm(ctypes.Structure):
    """cd_back_gemm: d operand (= or +=) d product @ W at one step; dest by the step's parity."""

    _fields_ = [("grad", Rows), ("dest", Rows * 2), ("accumulate", I64), ("panels", PTR), ("blocks", I64)]


class NativeLoop:
    """The native forward and backward entry points of one built library, for one dtype."""

    def __init__(self, lib, gemm_lib, dtype: torch.dtype):
        """lib: the cell's library (targets/c/emit.py); gemm_lib: the GEMM's (targets/c/emit_gemm.py)."""
        dt = DTYPES[dtype]
        self.gemm = native_gemm(gemm_lib, dtype)
        self.tiles = ctypes.cast(getattr(gemm_lib, f"cd_tiles_{dt}"), PTR).value
        # None for a GEMM library without it (built without AVX-512, or an older source: bench/cpu.py's
        # A/B): no fused steps
        fused = getattr(gemm_lib, f"cd_fused_tiles_{dt}", None)
        self.fused_tiles = ctypes.cast(fused, PTR).value if fused is not None else None
        self._forward = getattr(lib, f"cd_forward_{dt}")
        self._backward = getattr(lib, f"cd_backward_{dt}")
        for fn in (self._forward, self._backward):
            fn.argtypes = [ctypes.POINTER(Loop)]
            fn.restype = None
        self.openmp = bool(lib.cd_openmp())

    def _loop(self, keep, steps, offsets, n, hidden, nt, cls, gemms, kernels) -> Loop:
        return Loop(T=len(steps), N=n, H=hidden, nt=nt, steps=keep.tensor(steps),
                    offsets=keep.tensor(offsets), gemms=keep.array(cls, gemms),
                    kernels=keep.pointers(kernels),
                    out_state=-1, tiles=self.tiles, width=self.gemm.width)

    def threads(self, n: int, hidden: int, step_macs: int, rows: int) -> int:
        """Threads for a sequence: torch's, unless the work is too small to share (a barrier per GEMM
        stage costs about a microsecond) or there are fewer panels of units than threads."""
        if not self.openmp:
            return 1
        nt = min(torch.get_num_threads(), self.gemm.panels(hidden))
        if step_macs and step_macs < MIN_STEP_WORK or not step_macs and rows * hidden < MIN_ELEMENTWISE_WORK:
            return 1
        return max(1, nt)

    def forward(self, steps, offsets, n, hidden, nt, gemms, kernels) -> None:
        """steps, offsets: int64 tensors [T]; gemms: [StepGemm] in plan order; kernels: [Rows array] per
        pointwise stage."""
        self.run_forward(self.prepare_forward(steps, offsets, n, hidden, nt, gemms, kernels))

    def prepare_forward(self, steps, offsets, n, hidden, nt, gemms, kernels):
        """forward's argument, built once: a replayed step (fused.PreparedStep) calls run_forward on
        it again and again, over the same buffers."""
        keep = _Keep()
        loop = self._loop(keep, steps, offsets, n, hidden, nt, StepGemm, gemms, kernels)
        return loop, keep, ctypes.byref(loop)

    def run_forward(self, prepared) -> None:
        self._forward(prepared[2])

    def backward(self, steps, offsets, n, hidden, nt, gemms, kernels, grads, untouched, out_state,
                 g_out) -> None:
        """kernels: [Rows array] per pointwise stage and parity (even, odd); grads: [A_0, B_0, ...]."""
        self.run_backward(self.prepare_backward(steps, offsets, n, hidden, nt, gemms, kernels, grads,
                                                untouched, out_state, g_out))

    def prepare_backward(self, steps, offsets, n, hidden, nt, gemms, kernels, grads, untouched, out_state,
                         g_out):
        """backward's argument, built once (fused.PreparedTrainStep replays it over the same buffers)."""
        keep = _Keep()
        loop = self._loop(keep, steps, offsets, n, hidden, nt, BackGemm, gemms, kernels)
        loop.grads = keep.i64([g.data_ptr() for g in grads])
        loop.untouched = keep.i64(untouched)
        loop.n_states, loop.out_state = len(untouched), out_state
        loop.g_out = g_out.data_ptr() if g_out is not None else None
        return loop, keep, ctypes.byref(loop)

    def run_backward(self, prepared) -> None:
        self._backward(prepared[2])

    @staticmethod
    def skipping(prepared, cls, gemms: int, skipped: list[int]):
        """A copy of a prepared forward (cls StepGemm) or backward (BackGemm) of `gemms` GEMMs whose
        GEMMs `skipped` do nothing (no blocks: the forward leaves the output as it is; the backward
        writes zeros, or adds nothing): for a caller that runs those products itself."""
        loop, keep, _ = prepared
        if not gemms:  # a cell without step GEMMs (minGRU): nothing to skip
            return prepared
        copies = [cls.from_buffer_copy(g) for g in (cls * gemms).from_address(loop.gemms)]
        for i in skipped:
            copies[i].blocks = 0
        held = _Keep()
        held.held.append(keep)
        copy = Loop.from_buffer_copy(loop)
        copy.gemms = held.array(cls, copies)
        return copy, held, ctypes.byref(copy)


class _Keep:
    """ctypes arrays that must outlive the native call they are passed to."""

    def __init__(self):
        self.held = []

    def _hold(self, obj) -> int:
        self.held.append(obj)
        return ctypes.addressof(obj)

    def tensor(self, t: torch.Tensor) -> int:
        """An int64 tensor (steps, offsets), contiguous."""
        self.held.append(t)
        return t.data_ptr()

    def i64(self, values) -> int:
        return self._hold((I64 * max(1, len(values)))(*values))

    def array(self, cls, items) -> int | None:
        return self._hold((cls * len(items))(*items)) if items else None

    def pointers(self, arrays) -> int:
        self.held += arrays
        return self.i64([ctypes.addressof(a) for a in arrays])
