"""The C target's loop for a matrix-memory cell: torch computes the products with the input for all
steps at once (GEMMs, differentiated by autograd); the generated C (matrix_emit.py) runs the rest, the
whole sequence in one call, forward and the derived reverse-time backward.

Memory: without gradients the forward keeps nothing but the outputs and final states; with them it
keeps the states every `every` steps, and the backward recomputes each segment: at least EVERY steps
apart, and far enough apart that the checkpoints take no more memory than the outputs and one state
(a state of K x V numbers per head against V outputs per step: every >= K). Beyond the outputs and checkpoints
the forward keeps the hoisted projections (q, k, v: a few numbers per step and head, as the outputs),
which the GEMMs' backward reads, and for a cell with prev() the hoisted values that follow it
(targets/matrix_hoist.py: vectors per step, never a matrix per step) with what autograd keeps of them.
"""

from __future__ import annotations

import ctypes
import math

import torch

from ... import cache
from ...lang.errors import CellError
from ...lang.tensors import ONE
from ..matrix_args import check_run
from ..matrix_hoist import as4, evaluate
from .fused import cell_library_ready, library_soon
from .matrix_emit import FIXED, SYMBOLS, blocker, host_nodes, matrix_c_source, used_host
from .matrix_rewrite import rewrite, split_output

EVERY = 32  # the fewest steps between the forward's checkpoints of the states
DTYPES = {torch.float32: "f32", torch.float64: "f64"}


def refusal(ir, why: str, node: int | None) -> CellError:
    """A located reason: at the node it is about, else at the first matrix state."""
    first = next((s for s in ir.states if ir.kinds[s].rows != ONE and ir.kinds[s].cols != ONE), ir.states[0])
    loc = ir.nodes[node].loc if node is not None and ir.nodes[node].loc is not None else ir.state_locs[first]
    return CellError(f"the cpu backend cannot run this matrix-memory cell: {why}; use backend='torch'",
                     ir.source, loc)


class CMatrixLoop:
    """run(x, states, params, sizes, lengths) as the torch target's MatrixLoop, on the C loop. With a
    `fallback` (backend="auto"), tensors the C loop does not take (not CPU, not float32/64) run there."""

    def __init__(self, compiled, fallback=None):
        self.compiled, self.key, self.fallback = compiled, compiled.key, fallback
        self.ir = rewrite(compiled.ir)  # the same values in fewer operations (matrix_rewrite.py)
        self.ir, self.post = split_output(self.ir)  # an output W @ v: the loop gives v, torch applies W
        why, node = blocker(self.ir)
        if why and fallback is None:
            raise refusal(self.ir, why, node)
        self.why = why
        self.host = host_nodes(self.ir)
        self.used = used_host(self.ir)
        self.libs: dict = {}

    def __reduce__(self):
        """Pickled (deepcopy, torch.save of a layer) as its cell and whether it is "auto": the
        libraries and torch's loop are made again where it is loaded."""
        return (_rebuild, (self.compiled, self.fallback is not None))

    def library(self, dims: dict[str, int]):
        """(library, why not) for these sizes: a quick build first when the cache lacks the final one,
        which then builds in the background and is taken between two calls (fused.library_soon)."""
        k = tuple(sorted(dims.items()))
        if k not in self.libs:
            self.libs[k] = library_soon(matrix_c_source(self.ir, dims), cache.root() / self.key, "cpu_matrix",
                                        SYMBOLS)
        lib, why, waiting = self.libs[k]
        if waiting is not None:
            done, full = cell_library_ready(waiting)
            if done:  # a failed final build keeps the quick one
                lib = full or lib
                self.libs[k] = (lib, why, None)
        return lib, why

    def hoist(self, x, params, dims) -> list[torch.Tensor]:
        """The host nodes the C loop reads, as contiguous [T*N or 1, heads or 1, rows, cols] tensors
        (torch, all steps at once: targets/matrix_hoist.py; autograd takes their gradients on)."""
        ir = self.ir
        p4 = [as4(ir, n, p) for n, p in zip(ir.params, params, strict=True)]
        vals = evaluate(ir, self.used, x, p4, dims)
        out = []
        for j in self.used:
            v, k = vals[j], ir.nodes[j].kind
            out.append(v.expand(*v.shape[:2], *_shape(k, dims)).contiguous())
        return out

    def run(self, x, states, params, sizes, lengths=None):
        """(outputs [T, N, heads * width], final states), differentiable once."""
        x = check_run(self.compiled.ir, x, states, params, sizes, lengths)  # before any raw memory is read
        if self.fallback is not None and (self.why or x.device.type != "cpu" or x.dtype not in DTYPES):
            return self.fallback.run(x, states, params, sizes, lengths)
        if x.device.type != "cpu":
            raise ValueError(f"backend='cpu' runs CPU tensors, got x on {x.device}")
        if x.dtype not in DTYPES:
            raise TypeError(f"backend='cpu' runs float32 and float64 tensors, got {x.dtype}")
        dims = {**sizes, self.ir.inputs[0]: x.shape[-1]}
        lib, why = self.library(dims)
        if lib is None:
            if self.fallback is not None:
                return self.fallback.run(x, states, params, sizes, lengths)
            raise RuntimeError(f"backend='cpu' could not build the matrix loop: {why}")
        host = self.hoist(x, params, dims)
        out = _Function.apply(self, lib, dims, lengths, len(states), x.shape[0], x.shape[1], *states, *host)
        return self.project(out[0], params), tuple(out[1:])

    def project(self, v: torch.Tensor, params) -> torch.Tensor:
        """The output W @ v of split_output, every step and head at once ([T, N, heads * width])."""
        if self.post is None:
            return v
        w = params[self.ir.params.index(self.post)]  # [rows, cols], or [heads, rows, cols]
        T, N, heads = v.shape[0], v.shape[1], v.shape[2] // w.shape[-1]
        v = v.reshape(T * N, heads, w.shape[-1])  # sizes, not -1: N may be 0
        if w.dim() == 2:
            return (v @ w.t()).reshape(T, N, heads * w.shape[-2])
        out = torch.matmul(v.transpose(0, 1), w.transpose(1, 2)).transpose(0, 1)
        return out.reshape(T, N, heads * w.shape[-2])


def _rebuild(compiled, auto: bool) -> CMatrixLoop:
    return CMatrixLoop(compiled, compiled.torch_loop if auto else None)


def _ptrs(tensors) -> ctypes.Array:
    return (ctypes.c_void_p * max(1, len(tensors)))(*[None if t is None else t.data_ptr() for t in tensors])


def _ints(values) -> ctypes.Array:
    return (ctypes.c_int64 * max(1, len(values)))(*values)


class _Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, loop, lib, dims, lengths, n_states, T, N, *tensors):
        ir = loop.ir
        states = [s.contiguous() for s in tensors[:n_states]]
        host = list(tensors[n_states:])
        dtype = states[0].dtype
        wrong = [(k, t.dtype) for k, t in enumerate([*states, *host])
                 if t.dtype != dtype or not t.is_contiguous() or t.device.type != "cpu"]
        if wrong or dtype not in DTYPES:  # the C loop reads raw memory: a buffer of another type is garbage
            raise TypeError("the cpu matrix loop takes contiguous CPU tensors of one dtype (float32 or "
                            f"float64); the states are {dtype}, and tensors {wrong} are not (states, then "
                            "the values computed before the loop)")
        dt = DTYPES[dtype]
        nodes = len(ir.nodes)
        hv, rs, hs = [None] * nodes, [0] * nodes, [0] * nodes
        for j, h in zip(loop.used, host, strict=True):
            hv[j] = h
            rs[j] = h.shape[1] * h.shape[2] * h.shape[3] if h.shape[0] > 1 else 0
            hs[j] = h.shape[2] * h.shape[3] if h.shape[1] > 1 else 0
        H = dims["heads"]
        ow = math.prod(_shape(ir.nodes[ir.output_node].kind, dims))
        out = torch.zeros(T, N, H * ow, dtype=dtype)
        finals = [torch.empty_like(s) for s in states]
        state_numbers = sum(s[0].numel() for s in states) if N else 1  # one sequence's, every head
        spacing = max(EVERY, -(-state_numbers // (H * ow)))  # checkpoints <= outputs in memory
        every = spacing if any(ctx.needs_input_grad[7:]) else 0
        nseg = -(-T // spacing)
        ck = [s.new_empty((nseg, *s.shape)) for s in states] if every else []
        lens = None if lengths is None else lengths.to(torch.int64).contiguous()
        rc = getattr(lib, f"cd_mx_forward_{dt}")(
            ctypes.c_int64(N), ctypes.c_int64(T), _ptrs(hv), _ints(rs), _ints(hs), _ptrs(states),
            _ptrs(finals), ctypes.c_void_p(out.data_ptr()),
            None if lens is None else ctypes.c_void_p(lens.data_ptr()),
            ctypes.c_int64(every), _ptrs(ck))
        if rc:
            raise MemoryError("the matrix loop could not allocate its step values")
        ctx.loop, ctx.lib, ctx.dims, ctx.lens, ctx.T, ctx.N, ctx.dt = loop, lib, dims, lens, T, N, dt
        ctx.hv, ctx.rs, ctx.hs, ctx.ck, ctx.every = hv, rs, hs, ck, spacing
        ctx.host = host
        ctx.state_shapes = [s.shape for s in states]
        return (out, *finals)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, *d_finals):
        loop, ir, H, T, N = ctx.loop, ctx.loop.ir, ctx.dims["heads"], ctx.T, ctx.N
        dtype = ctx.host[0].dtype if ctx.host else torch.float64
        d_out = torch.zeros(T, N, 1, dtype=dtype) if d_out is None else d_out
        ow = math.prod(_shape(ir.nodes[ir.output_node].kind, ctx.dims))
        d_out = d_out.expand(T, N, H * ow).contiguous()
        dfin = [torch.zeros(sh, dtype=dtype) if d is None else d.contiguous()
                for d, sh in zip(d_finals, ctx.state_shapes, strict=True)]
        dinit = [torch.empty(sh, dtype=dtype) for sh in ctx.state_shapes]
        gb = [None] * len(ir.nodes)
        for j, h in zip(loop.used, ctx.host, strict=True):
            if ir.nodes[j].op not in FIXED:
                gb[j] = torch.zeros(T * N if h.shape[0] > 1 else N, H, h.shape[2], h.shape[3], dtype=dtype)
        lens = ctx.lens
        rc = getattr(ctx.lib, f"cd_mx_backward_{ctx.dt}")(
            ctypes.c_int64(N), ctypes.c_int64(T), _ptrs(ctx.hv), _ints(ctx.rs), _ints(ctx.hs), _ptrs(ctx.ck),
            None if lens is None else ctypes.c_void_p(lens.data_ptr()), ctypes.c_int64(ctx.every),
            ctypes.c_void_p(d_out.data_ptr()), _ptrs(dfin), _ptrs(dinit), _ptrs(gb))
        if rc:
            raise MemoryError("the matrix loop could not allocate its step values")
        d_host = []
        for j, h in zip(loop.used, ctx.host, strict=True):
            g = gb[j]
            if g is not None:
                g = g.sum(0, keepdim=True) if h.shape[0] == 1 else g
                g = g.sum(1, keepdim=True) if h.shape[1] == 1 else g
            d_host.append(g)
        return (None,) * 7 + (*dinit, *d_host)


def _shape(kind, dims) -> tuple[int, int]:
    return tuple(1 if w == ONE else dims[w] for w in (kind.rows, kind.cols))
