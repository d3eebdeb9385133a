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
from .applies import states_plan
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
    """The column schedules' loop. For a cell whose per-step GEMMs only the output reads (an output
    projection), `states` is the loop of the states' plan (applies.states_plan): its kernels run the
    recurrence, then this loop (the torch loop of the whole plan) computes every step's output at
    once, as one step of all rows from their previous states; the backward sends the output's
    gradient of each previous state to the states' kernels as a direct gradient."""

    def __init__(self, compiled, schedule: str, plan=None):
        self.kernels = load_triton_module(compiled)
        plan = plan or compiled.plan
        super().__init__(plan, self.kernels)
        self.schedule = schedule
        self.states_loop = None
        if plan.gemms:
            self.states_loop = ColumnLoop(compiled, schedule, states_plan(plan)[0])
            return
        direct = plan is not compiled.plan
        self.layout = ScanLayout(plan, direct) if schedule == "scan" else ColumnLayout(plan, direct)
        self.chunk = None  # tests may set a scan chunk (a power of two >= 2) to cross its boundaries

    @property
    def chunk(self):
        return self.states_loop.chunk if self.states_loop is not None else self._chunk

    @chunk.setter
    def chunk(self, value):
        if self.states_loop is not None:
            self.states_loop.chunk = value
        else:
            self._chunk = value

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
        self.check_shapes(x, states, hoisted_w, step_w, vectors, scalars)
        if self.states_loop is not None:
            return self._projected_forward(x, states, hoisted_w, step_w, vectors, scalars, batch_sizes)
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

    # ---- an output projection: the states' kernels, then the output of all steps at once -------------

    def _one_step(self, x, states, batch_sizes):
        """x as [rows, I], the steps, and every row's previous states: the output of all steps is one
        step of the whole plan over `rows` sequences (nothing the output computes feeds back)."""
        X, steps, offsets = steps_of(x, batch_sizes, states[0].shape[0])
        return X, steps, offsets, torch.tensor([X.shape[0]])

    def _projected_forward(self, x, states, hoisted_w, step_w, vectors, scalars, batch_sizes):
        inner = self.states_loop
        first, finals, saved = inner.forward(x, states, hoisted_w, [], vectors, scalars, batch_sizes)
        X, steps, offsets, one = self._one_step(x, states, batch_sizes)
        news = [first.reshape(X.shape[0], -1), *saved[: len(self.states) - 1]]
        prev = [self._previous_all(i, states, news, steps, offsets) for i in range(len(self.states))]
        out, _, saved = TorchLoop.forward(self, X, prev, hoisted_w, step_w, vectors, scalars, one)
        if batch_sizes is None:
            out = out.view(x.shape[0], x.shape[1], -1)
        return out, finals, saved

    def _projected_backward(self, x, states, hoisted_w, step_w, vectors, scalars, out, saved, grad_out,
                            grad_states, batch_sizes, needs_dx):
        inner = self.states_loop
        X, steps, offsets, one = self._one_step(x, states, batch_sizes)
        rows, N = X.shape[0], states[0].shape[0]
        sizes = self.sizes(states, vectors, hoisted_w, step_w)
        flat_out = out.reshape(rows, -1)
        news, _, _, hoisted_out = self._unpack_saved(saved, flat_out, sizes)
        prev = [self._previous_all(i, states, news, steps, offsets) for i in range(len(self.states))]
        g_out = grad_out.reshape(rows, -1) if grad_out is not None else None
        dx, d_prev, d_hw, d_sw, d_vec, d_sc = TorchLoop.backward(
            self, X, prev, hoisted_w, step_w, vectors, scalars, flat_out, saved, g_out,
            [None] * len(self.states), one, needs_dx)
        # the previous state of a row at step t >= 1 is the new state of its sequence at step t - 1
        direct = [torch.zeros_like(n) for n in news]
        d_first = [torch.zeros_like(s) for s in states]
        index = _previous_rows(steps, offsets, X.device)
        for i, d in enumerate(d_prev):
            if d is None:
                continue
            d_first[i] = d_first[i] + d[:N]
            if len(steps) > 1:
                direct[i].index_add_(0, index, d[steps[0]:])
        first = news[0] if batch_sizes is not None else news[0].view(x.shape[0], x.shape[1], -1)
        inner_saved = [*news[1:], *hoisted_out]
        d = inner.backward(x, states, hoisted_w, [], vectors, scalars, first, inner_saved, None, grad_states,
                           batch_sizes, needs_dx, direct=direct)
        total = lambda a, b: b if a is None else a if b is None else a + b  # noqa: E731
        dx = total(d[0], dx.reshape(d[0].shape) if dx is not None else None)
        return (dx, [total(a, b) for a, b in zip(d[1], d_first, strict=True)],
                [total(a, b) for a, b in zip(d[2], d_hw, strict=True)], d_sw,
                [total(a, b) for a, b in zip(d[4], d_vec, strict=True)],
                [total(a, b) for a, b in zip(d[5], d_sc, strict=True)])

    def backward(self, x, states, hoisted_w, step_w, vectors, scalars, out, saved, grad_out, grad_states,
                 batch_sizes=None, needs_dx: bool = True, direct=None):
        """direct: per state, a gradient [rows, H] each new state gets from outside the recurrence."""
        self.check_shapes(x, states, hoisted_w, step_w, vectors, scalars)
        if self.states_loop is not None:
            return self._projected_backward(x, states, hoisted_w, step_w, vectors, scalars, out, saved,
                                            grad_out, grad_states, batch_sizes, needs_dx)
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
        if self.layout.direct:
            direct = direct or [torch.zeros(rows, H, dtype=dtype, device=dev) for _ in self.states]
            values |= {("direct", i): d.contiguous() for i, d in enumerate(direct)}
        common = (x, X, Xs, states, news, steps, offsets, hoisted_w, step_w, vectors, scalars)
        if self.schedule == "time_loop":
            return self._time_loop_backward(*common, values, g_out, c, needs_dx)
        return self._scan_backward(*common, hoisted_out, values, g_out, c, needs_dx, direct)

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
                       hoisted_out, values, g_out, c, needs_dx, extra=None):
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
        for i, d in enumerate(extra or []):  # an output projection's share (see _projected_backward)
            direct[i] += d
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
