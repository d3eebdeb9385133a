"""The time_loop and scan schedules (targets/triton/emit_columns.py) with the torch loop's interface.

The hoisted GEMMs stay torch GEMMs over all steps; the time loop is one Triton launch per sequence
and direction (forward) and one more for the backward. The scan's backward is its reverse scan of the
state gradients followed by the plan's pointwise backward over all steps at once (the generated
`stage0_backward`), so the per-step arithmetic of the gradients is the same code as everywhere else.
"""

from __future__ import annotations

import torch

from .. import gemm
from ..loop import TorchLoop, fit_gradient, steps_of
from .choice import ASSUMED, configure
from .emit_columns import ColumnLayout, ScanLayout
from .module import interpreting, load_triton_module
from .schedules import (
    compute_dtype,
    device_ints,
    finish_backward,
    step_sums,
    steps_tensors,
    tl_compute_dtype,
)


class ColumnLoop(TorchLoop):
    def __init__(self, compiled, schedule: str):
        self.kernels = load_triton_module(compiled)
        super().__init__(compiled.plan, self.kernels)
        self.schedule = schedule
        self.layout = ScanLayout(compiled.plan) if schedule == "scan" else ColumnLayout(compiled.plan)
        self.chunk = None  # tests may set a scan chunk (a power of two >= 2) to cross its boundaries

    def config(self, N, H, T, dtype):
        c = configure(self.plan, self.schedule, N, H, T, dtype, ASSUMED, interpreting())
        if self.chunk is not None and "CHUNK" in c.blocks:
            c.blocks["CHUNK"] = self.chunk
        return c

    def _launch(self, name, c, args, dtype, **extra):
        kernel = getattr(self.kernels.module(), name)
        kernel[c.grid](*args, **c.blocks, COMPUTE=tl_compute_dtype(dtype), num_warps=c.num_warps, **extra)

    def _common(self, x, states, hoisted_w, vectors, scalars, batch_sizes, hoisted_out=None):
        N, H = states[0].shape
        X, steps, offsets = steps_of(x, batch_sizes, N)
        Xs = self.split_inputs(X, self.sizes(states, vectors, hoisted_w, []), hoisted_w, steps, offsets)
        if hoisted_out is None:
            ops = self._hoisted_operands(Xs, vectors, scalars)
            hoisted_out = [gemm.matmul(op, w).contiguous() for op, w in zip(ops, hoisted_w, strict=True)]
        L = self.layout
        values = {("x", n): Xs[n].contiguous() for n in L.elementwise_inputs}
        values |= {("hoisted", i): h.contiguous() for i, h in enumerate(hoisted_out)}
        values |= {("vector", i): v.contiguous() for i, v in enumerate(vectors)}
        values |= {("scalar", i): s.contiguous() for i, s in enumerate(scalars)}
        values |= {("init", i): s.contiguous() for i, s in enumerate(states)}
        values |= {(k, None): v for k, v in steps_tensors(steps, offsets, x.device).items()}
        values |= {("T", None): len(steps), ("N", None): N, ("H", None): H}
        return N, H, X, Xs, steps, offsets, hoisted_out, values

    # ---- forward --------------------------------------------------------------------------------

    def forward(self, x, states, hoisted_w, step_w, vectors, scalars, batch_sizes=None):
        N, H, X, Xs, steps, offsets, hoisted_out, values = self._common(
            x, states, hoisted_w, vectors, scalars, batch_sizes)
        rows, dtype, dev, L = X.shape[0], x.dtype, x.device, self.layout
        c = self.config(N, H, len(steps), dtype)
        seq = [torch.empty(rows, H, dtype=dtype, device=dev) for _ in self.states]
        finals = [torch.empty(N, H, dtype=dtype, device=dev) for _ in self.states]
        values |= {("seq", i): s for i, s in enumerate(seq)} | {("final", i): f for i, f in enumerate(finals)}
        out = None
        if self.schedule == "time_loop":
            if L.output_state is None:
                out = values[("out", None)] = torch.empty(rows, H, dtype=dtype, device=dev)
            self._launch("time_loop_forward_kernel", c, _args(L.forward_args(), values), dtype)
        else:
            self._launch("scan_forward_kernel", c, _args(L.forward_args(), values), dtype)
            if L.output_state is None:  # the output from the states, every step at once
                out = self._pointwise_forward(seq, states, X, Xs, hoisted_out, vectors, scalars, steps,
                                              offsets)[self.plan.ir.output]
        out = seq[L.output_state] if L.output_state is not None else out
        saved = [s for i, s in enumerate(seq) if i != L.output_state] + hoisted_out
        if batch_sizes is None:
            out = out.view(x.shape[0], x.shape[1], -1)
        return out, finals, saved

    def _pointwise_args(self, news, states, Xs, hoisted_out, vectors, scalars, steps, offsets):
        """The stage-0 pointwise function's arguments for every step at once: [rows, H] tensors."""
        args = []
        for s in self.layout.pw.inputs:
            slot = self.where[s.name]
            if slot.kind == "state":
                args.append(self._previous_all(slot.index, states, news, steps, offsets))
            elif slot.kind == "hoisted":
                g = self.hoisted[slot.index]
                args.append(self._blocks(hoisted_out[slot.index], g, {"H": states[0].shape[1]})[slot.block])
            else:
                args.append(self._static(slot, Xs, vectors, scalars))
        return args

    def _pointwise_forward(self, news, states, X, Xs, hoisted_out, vectors, scalars, steps, offsets):
        args = self._pointwise_args(news, states, Xs, hoisted_out, vectors, scalars, steps, offsets)
        fwd = self.stages[0][1][0].forward
        return {name: r for (name, _), r in zip(self.layout.pw.outputs, fwd(*args), strict=True)}

    # ---- backward -------------------------------------------------------------------------------

    def backward(self, x, states, hoisted_w, step_w, vectors, scalars, out, saved, grad_out, grad_states,
                 batch_sizes=None, needs_dx: bool = True):
        news, _, _, hoisted_out = self._unpack_saved(saved, out, self.sizes(states, vectors, hoisted_w, []))
        N, H, X, Xs, steps, offsets, hoisted_out, values = self._common(
            x, states, hoisted_w, vectors, scalars, batch_sizes, hoisted_out)
        rows, dtype, dev = X.shape[0], x.dtype, x.device
        c = self.config(N, H, len(steps), dtype)
        g_out = grad_out.reshape(rows, H).contiguous() if grad_out is not None else None
        d_final = [g.contiguous() if g is not None else torch.zeros(N, H, dtype=dtype, device=dev)
                   for g in grad_states]
        values |= {("d_final", i): g for i, g in enumerate(d_final)}
        values |= {("seq", i): s.contiguous() for i, s in enumerate(news)}
        common = (x, X, Xs, states, news, steps, offsets, hoisted_w, step_w, vectors, scalars)
        if self.schedule == "time_loop":
            return self._time_loop_backward(*common, values, g_out, c, needs_dx)
        return self._scan_backward(*common, hoisted_out, values, g_out, c, needs_dx)

    def _time_loop_backward(self, x, X, Xs, states, news, steps, offsets, hoisted_w, step_w, vectors, scalars,
                            values, g_out, c, needs_dx):
        rows, dtype, dev, L = X.shape[0], x.dtype, x.device, self.layout
        N, H = states[0].shape
        compute = compute_dtype(dtype)
        zeros = lambda *shape, dt=dtype: torch.zeros(*shape, dtype=dt, device=dev)  # noqa: E731
        d_hoisted = [zeros(rows, gemm.rows_of(w)) for w in hoisted_w]
        d_x = {n: zeros(rows, H) for n in L.elementwise_inputs}
        # zeros: the kernel stores only the sums of what the step grades (step_parameters)
        d_vec = [torch.zeros(N, H, dtype=compute, device=dev) for _ in vectors]
        d_scal = [torch.zeros(N, H, dtype=compute, device=dev) for _ in scalars]
        d_init = [torch.empty(N, H, dtype=dtype, device=dev) for _ in states]
        values |= {("grad_out", None): g_out if g_out is not None else news[0]}
        values |= {("d_hoisted", i): d for i, d in enumerate(d_hoisted)}
        values |= {("d_x", n): d for n, d in d_x.items()}
        values |= {("d_vector", i): d for i, d in enumerate(d_vec)}
        values |= {("d_scalar", i): d for i, d in enumerate(d_scal)}
        values |= {("d_init", i): d for i, d in enumerate(d_init)}
        self._launch("time_loop_backward_kernel", c, _args(L.backward_args(), values), dtype,
                     HAS_GRAD_OUT=g_out is not None)
        for n in L.row_inputs:  # stored per column: an input of one value per row gets their sum
            d_x[n] = d_x[n].sum(1, keepdim=True)
        d_vectors, d_scalars = step_sums(L, d_vec, d_scal, vectors, scalars, dtype)
        return finish_backward(self, x, X, Xs, states, news, {}, steps, offsets, hoisted_w, step_w, vectors,
                               scalars, [], d_hoisted, d_x, d_vectors, d_scalars, d_init, needs_dx)

    def _scan_backward(self, x, X, Xs, states, news, steps, offsets, hoisted_w, step_w, vectors, scalars,
                       hoisted_out, values, g_out, c, needs_dx):
        rows, dtype, dev, L = X.shape[0], x.dtype, x.device, self.layout
        N, H = states[0].shape
        pw = L.pw
        args = self._pointwise_args(news, states, Xs, hoisted_out, vectors, scalars, steps, offsets)
        bwd = self.stages[0][1][0].backward
        direct = [torch.zeros(rows, H, dtype=dtype, device=dev) for _ in self.states]
        if g_out is not None:
            if L.output_state is not None:
                direct[L.output_state] += g_out
            else:  # the output at step t + 1 reads the state of step t: its share of lambda_t
                grads = [g_out if name == self.plan.ir.output else torch.zeros_like(g_out)
                         for name, _ in pw.outputs]
                by_state = self._state_grads(bwd(*args, *grads))
                prev = _previous_rows(steps, offsets, dev)
                for i, d in by_state.items():
                    if d is not None and len(steps) > 1:
                        direct[i].index_add_(0, prev, d[steps[0]:])
        lam = [torch.empty(rows, H, dtype=dtype, device=dev) for _ in self.states]
        values |= {("direct", i): d for i, d in enumerate(direct)}
        values |= {("lam", i): v for i, v in enumerate(lam)}
        self._launch("scan_backward_kernel", c, _args(L.backward_args(), values), dtype)
        # every other gradient: the pointwise backward of all steps at once, with lambda as the new states'
        grads = []
        for name, _ in pw.outputs:
            if name.endswith("'") and name[:-1] in self.states:
                grads.append(lam[self.states.index(name[:-1])])
            else:
                grads.append(g_out if g_out is not None else torch.zeros(rows, H, dtype=dtype, device=dev))
        results = bwd(*args, *grads)
        d_hoisted = [torch.zeros(rows, gemm.rows_of(w), dtype=dtype, device=dev) for w in hoisted_w]
        d_x, d_vectors = {}, [torch.zeros_like(v) for v in vectors]
        d_scalars = [torch.zeros_like(s) for s in scalars]
        d_init = [torch.zeros(N, H, dtype=dtype, device=dev) for _ in states]
        for sym, r in zip(pw.grad_inputs, results, strict=True):
            if r is None:
                continue
            slot = self.where[sym.name]
            if slot.kind == "hoisted":
                d_hoisted[slot.index][:, slot.block * H:(slot.block + 1) * H] += r
            elif slot.kind == "input":  # a `: 1` input's gradient is the sum over its row
                r = fit_gradient(r, pw.kinds[sym.name], rows, H)
                d_x[slot.index] = r if slot.index not in d_x else d_x[slot.index] + r
            elif slot.kind == "vector":
                d_vectors[slot.index] = d_vectors[slot.index] + r.reshape(-1, H).sum(0)
            elif slot.kind == "scalar":
                d_scalars[slot.index] = d_scalars[slot.index] + r.sum()
            elif slot.kind == "state":  # the rows of step 0 read the initial state
                d_init[slot.index] = r[:N]
        return finish_backward(self, x, X, Xs, states, news, {}, steps, offsets, hoisted_w, step_w, vectors,
                               scalars, [], d_hoisted, d_x, d_vectors, d_scalars, d_init, needs_dx)

    def _state_grads(self, results) -> dict[int, torch.Tensor]:
        out = {}
        for sym, r in zip(self.layout.pw.grad_inputs, results, strict=True):
            slot = self.where[sym.name]
            if slot.kind == "state" and r is not None:
                out[slot.index] = r
        return out


def _args(args, values: dict) -> list:
    """The kernel's arguments in its parameter order (emit_dense.Arg: kind and key)."""
    return [values[(a.kind, a.key)] for a in args]


def _previous_rows(steps: list[int], offsets: list[int], device) -> torch.Tensor:
    """For every row of steps 1..T-1 (in order), the row of the same sequence at the step before."""
    index = [offsets[t - 1] + n for t in range(1, len(steps)) for n in range(steps[t])]
    return device_ints(index, device, torch.int64)
