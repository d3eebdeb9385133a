"""The Triton loop of a matrix-memory cell: matrix_emit.py's kernels, launched one program per
(sequence, head, value block) (one block where matrix_emit.value_width finds no split), under a
torch.autograd.Function. The backward's per-block partial gradients are summed here over the blocks.

OPT-IN: no GPU has run these kernels yet (MATRIX_SCHEDULE is not in choice.VERIFIED_ON_HARDWARE), so
only backend="triton" reaches them; backend="auto" keeps the torch loop on every device. On the CPU
they run under TRITON_INTERPRET=1. A prev() and what depends on it but on no state is computed by
torch before the kernels for all steps (targets/matrix_hoist.py, differentiated by autograd); the
kernels read it per step (q) and write its gradient per step (dq). The forward keeps the states
every `checkpoint` steps (not T matrices); the backward recomputes each segment from its checkpoint
in a scratch of `checkpoint` matrices per program.
"""

from __future__ import annotations

import hashlib

import torch

from ... import cache
from ...lang.tensors import ONE, TensorIR
from ..matrix_args import check_run
from ..matrix_hoist import as4, evaluate
from .matrix_emit import given, matrix_triton_source, value_width, widths
from .module import import_module, interpreting

MATRIX_SCHEDULE = "matrix_recurrent"
CHECKPOINT = 16  # steps between stored states (the backward's scratch holds this many per program)
VALUE_BLOCK = 32  # rows of the split width per program (a power of two; matrix_emit.value_width)


def _pow2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


class TritonMatrixLoop:
    """Forward and backward of one matrix-memory cell over [T, N, I] inputs on Triton kernels."""

    def __init__(self, ir: TensorIR, checkpoint: int = CHECKPOINT, value_block: int = VALUE_BLOCK):
        if not isinstance(checkpoint, int) or isinstance(checkpoint, bool) or checkpoint < 1:
            raise ValueError(f"checkpoint must be a positive integer, got {checkpoint!r}")
        if (not isinstance(value_block, int) or isinstance(value_block, bool) or value_block < 1
                or value_block & (value_block - 1)):
            raise ValueError(f"value_block must be a positive power of two, got {value_block!r}")
        self.ir, self.checkpoint, self.value_block = ir, checkpoint, value_block
        self.split = value_width(ir)  # None: one program per (sequence, head) holds the whole state
        self.source = matrix_triton_source(ir)  # CellError here for what the emitter cannot express
        self.digest = hashlib.sha256(self.source.encode("utf-8")).hexdigest()
        name = ir.name if ir.name.isidentifier() else "cell"
        self.path = cache.root() / "triton" / self.digest[:32] / f"{name}_matrix.py"
        cache.write_if_changed(self.path, self.source)
        self.widths = widths(ir)
        self.given = given(ir)

    def module(self):
        return import_module(self.path, self.digest, interpreting())

    def constexprs(self, sizes: dict[str, int], dtype) -> dict:
        import triton.language as tl

        out = {}
        for j, w in enumerate(self.widths):
            out[f"D{j}"] = sizes[w]
            out[f"B{j}"] = min(_pow2(sizes[w]), self.value_block) if w == self.split else _pow2(sizes[w])
        out["COMPUTE"] = tl.float64 if dtype == torch.float64 else tl.float32
        return out

    def blocks(self, sizes: dict[str, int]) -> int:
        """Programs per (sequence, head): the split width's blocks of value_block rows (1 unsplit)."""
        if self.split is None:
            return 1
        return -(-sizes[self.split] // min(_pow2(sizes[self.split]), self.value_block))

    def numel(self, name: str, sizes: dict[str, int]) -> int:
        k = self.ir.kinds[name]
        return (1 if k.rows == ONE else sizes[k.rows]) * (1 if k.cols == ONE else sizes[k.cols])

    def run(self, x, states, params, sizes, lengths=None):
        """(outputs [T, N, heads * width], final states), differentiable once (as the torch loop)."""
        x = check_run(self.ir, x, states, params, sizes, lengths)
        q = self.hoist(x, params, sizes)
        out = _Function.apply(self, sizes, lengths, len(states), x, *states, *params, *q)
        return out[0], tuple(out[1:])

    def hoist(self, x, params, sizes) -> list[torch.Tensor]:
        """The hoisted values the kernels read, [T * N, heads, rows, cols] each (autograd-tracked)."""
        if not self.given:
            return []
        ir = self.ir
        p4 = [as4(ir, n, p) for n, p in zip(ir.params, params, strict=True)]
        dims = {**sizes, ir.inputs[0]: x.shape[-1]}
        vals = evaluate(ir, self.given, x, p4, dims)
        out = []
        for j in self.given:
            k = ir.nodes[j].kind
            shape = [1 if w == ONE else dims[w] for w in (k.rows, k.cols)]
            out.append(vals[j].expand(x.shape[0] * x.shape[1], sizes["heads"], *shape).contiguous())
        return out

    def launch_forward(self, x, states, params, sizes, lengths, q=()):
        ir, T, N, H = self.ir, x.shape[0], x.shape[1], sizes["heads"]
        k = self.checkpoint
        nc = max(-(-T // k), 1)
        out_kind = ir.nodes[ir.output_node].kind
        width = ((1 if out_kind.rows == ONE else sizes[out_kind.rows])
                 * (1 if out_kind.cols == ONE else sizes[out_kind.cols]))
        x = x.contiguous()
        out = x.new_empty((T, N, H * width))
        s_in = [s.contiguous() for s in states]
        s_out = [torch.empty_like(s) for s in s_in]
        ckpt = [x.new_zeros((N, H, nc, self.numel(s, sizes))) for s in ir.states]
        p = [q.contiguous() for q in params]
        lens = _lengths(lengths, T, N, x.device)
        if T > 0:
            self.module().matrix_forward_kernel[(N, H, self.blocks(sizes))](
                x, lens, out, *s_in, *s_out, *ckpt, *p, *q, T, N, H, self.blocks(sizes), k, nc,
                **self.constexprs(sizes, x.dtype))
        else:
            out.zero_()
            s_out = [s.clone() for s in s_in]
        return out, s_out, ckpt

    def launch_backward(self, x, ckpt, params, sizes, lengths, d_out, d_finals, q=()):
        ir, T, N, H = self.ir, x.shape[0], x.shape[1], sizes["heads"]
        k, nv = self.checkpoint, self.blocks(sizes)
        nc = ckpt[0].shape[2]
        # per value block: each program writes its own partial gradients, summed here (deterministic)
        d_in = [d.contiguous() for d in d_finals]
        d_state = [x.new_zeros((N, H, nv, self.numel(s, sizes))) for s in ir.states]
        scratch = [x.new_empty((N, H, nv, k, self.numel(s, sizes))) for s in ir.states]
        dx = x.new_zeros((T, N, H, nv, x.shape[2]))
        dp = [x.new_zeros((N, H, nv, self.numel(n, sizes))) for n in ir.params]
        dq = [v.new_zeros((v.shape[0], v.shape[1], nv, *v.shape[2:])) for v in q]
        p = [q.contiguous() for q in params]
        lens = _lengths(lengths, T, N, x.device)
        if T > 0:
            self.module().matrix_backward_kernel[(N, H, nv)](
                x.contiguous(), lens, d_out.contiguous(), dx, *ckpt, *scratch, *d_in, *d_state, *p, *dp, *q,
                *dq, T, N, H, nv, k, nc, **self.constexprs(sizes, x.dtype))
            d_state = [d.sum(2).reshape(f.shape) for d, f in zip(d_state, d_finals, strict=True)]
        else:
            d_state = [d.clone() for d in d_in]
        dq = [d.sum(2) for d in dq]
        d_params = []
        for name, g, q in zip(ir.params, dp, params, strict=True):
            g = g.sum(2).sum(0)  # over the value blocks, the sequences
            g = g if ir.kinds[name].head else g.sum(0)  # shared by the heads: over the heads too
            d_params.append(g.reshape(q.shape))
        return dx.sum((2, 3)), d_state, d_params, dq


def _lengths(lengths, T: int, N: int, device) -> torch.Tensor:
    """Each sequence's length as int32 on the device (T for every sequence when not packed)."""
    if lengths is None:
        return torch.full((N,), T, dtype=torch.int32, device=device)
    return torch.as_tensor(lengths).to(device=device, dtype=torch.int32)


class _Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, loop, sizes, lengths, n_states, x, *tensors):
        n_params = len(loop.ir.params)
        states, params = list(tensors[:n_states]), list(tensors[n_states:n_states + n_params])
        q = list(tensors[n_states + n_params:])
        out, finals, ckpt = loop.launch_forward(x, states, params, sizes, lengths, q)
        ctx.loop, ctx.sizes, ctx.lengths, ctx.shapes = loop, sizes, lengths, [s.shape for s in states]
        ctx.save_for_backward(x, *ckpt, *params, *q)
        ctx.n_states, ctx.n_params, ctx.out_shape = n_states, n_params, out.shape
        return (out, *finals)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, *d_finals):
        x, *rest = ctx.saved_tensors
        ckpt, params = rest[:ctx.n_states], rest[ctx.n_states:ctx.n_states + ctx.n_params]
        q = rest[ctx.n_states + ctx.n_params:]
        if d_out is None:
            d_out = torch.zeros(ctx.out_shape, dtype=x.dtype, device=x.device)
        d_finals = [d if d is not None else torch.zeros(shape, dtype=x.dtype, device=x.device)
                    for d, shape in zip(d_finals, ctx.shapes, strict=True)]
        dx, d_state, d_params, dq = ctx.loop.launch_backward(x, list(ckpt), params, ctx.sizes, ctx.lengths,
                                                             d_out, d_finals, q)
        return (None, None, None, None, dx, *d_state, *d_params, *dq)


def aot_jobs(loop: TritonMatrixLoop, sizes: dict[str, int], dtype: str = "float32") -> list[tuple]:
    """(kernel name, jit function, signature, constexprs) of both kernels at these sizes, for
    triton.compile with a GPUTarget (no GPU needed): the storage dtype's pointers, int32 lengths."""
    pointer = {"float32": "*fp32", "float64": "*fp64", "bfloat16": "*bf16", "float16": "*fp16"}[dtype]
    module = import_module(loop.path, loop.digest, False)
    constexprs = loop.constexprs(sizes, getattr(torch, dtype))
    jobs = []
    for name in ("matrix_forward_kernel", "matrix_backward_kernel"):
        fn = getattr(module, name)
        signature = {}
        for arg in fn.arg_names:
            if arg in constexprs:
                signature[arg] = "constexpr"
            elif arg == "len_ptr":
                signature[arg] = "*i32"
            elif arg.endswith("_ptr"):
                signature[arg] = pointer
            else:
                signature[arg] = "i32"
        jobs.append((name, fn, signature, constexprs))
    return jobs
