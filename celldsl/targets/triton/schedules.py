"""The Triton schedules: how a cell's time loop runs on the GPU, chosen from the plan and the sizes.

    graphed      every cell: per step a cuBLAS GEMM and a fused pointwise kernel per stage, the whole
                 loop replayed from a CUDA graph (targets/triton/cuda_graph.py); today's CUDA default
    persistent   dense recurrences: one launch per sequence and direction; each program keeps its
                 slice of the step weights on chip and loops over T, a grid barrier per GEMM stage
    fused_step   dense recurrences: one launch per GEMM stage and step, the recurrent GEMM (tl.dot,
                 weights streamed from L2) fused with its pointwise step; replayed from a CUDA graph
    time_loop    elementwise and linear recurrences: one launch per sequence; each program owns a
                 block of (batch, hidden) columns and loops over T with the states in registers
    scan         recurrences linear in the state (s' = a * s + b): a chunked parallel scan over T

Every schedule has the torch loop's interface (forward/backward/saved_shapes of targets/loop.py,
the same saved tensors), so the registered ops run any of them. `choose` names the schedule the
compiler picks for a plan and sizes; a schedule other than graphed becomes the CUDA default only once
its `gpu` tests have passed on hardware (VERIFIED_ON_HARDWARE, with the log under docs/results/gpu/).
Until then the layers take it through `schedule=`.
"""

from __future__ import annotations

import functools
import inspect

import torch
import triton

from .. import gemm
from ..loop import TorchLoop, steps_of
from .choice import ASSUMED, Config, Device, configure
from .emit_dense import DenseLayout
from .module import interpreting, load_triton_module


def device_of(device: torch.device) -> Device:
    """The schedule choice's view of a CUDA device (from Triton's driver)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device(index)


@functools.cache
def _device(index: int) -> Device:
    props = triton.runtime.driver.active.utils.get_device_properties(index)
    cap = torch.cuda.get_device_capability(index)
    return Device(torch.cuda.get_device_name(index), props["multiprocessor_count"], props["max_shared_mem"],
                  props["max_num_regs"], 10 * cap[0] + cap[1])


# ---- running a dense schedule -----------------------------------------------------------------------


def _cooperative_launch_supported() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_cooperative_grid" in inspect.signature(CUDAOptions).parameters


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 GEMMs follow torch's setting (TF32 only when torch allows it); other dtypes ignore it."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_compute_dtype(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def device_ints(values: list[int], device, dtype=torch.int32) -> torch.Tensor:
    """A host list on `device`; through pinned memory on CUDA, so the copy is asynchronous and can be
    captured in a CUDA graph."""
    t = torch.tensor(values, dtype=dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def steps_tensors(steps: list[int], offsets: list[int], device) -> dict:
    prev = [0, *offsets[:-1]]
    return {"step_offset": device_ints(offsets, device), "prev_offset": device_ints(prev, device),
            "step_rows": device_ints(steps, device)}


def _step_ints(t: int, steps: list[int], offsets: list[int]) -> dict:
    """Step t's rows as a fused-step launch takes them."""
    return {("step_offset_now", None): offsets[t], ("prev_offset_now", None): offsets[t - 1] if t else 0,
            ("rows_now", None): steps[t], ("t", None): t}


class DenseLoop(TorchLoop):
    """The persistent or fused-step schedule of a dense cell, with the torch loop's interface: the
    hoisted GEMMs and the weight gradients stay large torch GEMMs, the time loop is Triton."""

    def __init__(self, compiled, schedule: str):
        self.kernels = load_triton_module(compiled)
        super().__init__(compiled.plan, self.kernels)
        self.layout = DenseLayout(compiled.plan)
        self.schedule = schedule
        self._resident: dict = {}  # (kernel, config) -> programs per multiprocessor

    def config(self, N, H, T, dtype, device) -> Config:
        interpret = interpreting() or device.type != "cuda"
        dev = ASSUMED if interpret else device_of(device)
        c = configure(self.plan, self.schedule, N, H, T, dtype, dev, interpret)
        if not c.fits:
            raise ValueError(f"schedule {self.schedule!r} does not fit cell {self.plan.ir.name!r} at N={N}, "
                             f"H={H}, T={T}, {str(dtype).removeprefix('torch.')}: {c.why}; use "
                             "schedule='fused_step' (any H) or the default (graphed) path")
        return c

    def _hoisted(self, X, sizes, hoisted_w, vectors, scalars, steps, offsets):
        Xs = self.split_inputs(X, sizes, hoisted_w, steps, offsets)
        ops = self._hoisted_operands(Xs, vectors, scalars)
        return Xs, [gemm.matmul(op, w).contiguous() for op, w in zip(ops, hoisted_w, strict=True)]

    def _launch(self, name, grid, args, c: Config, dtype, extra=None, cooperative=False):
        module = self.kernels.module()
        kernel = getattr(module, name)
        constexprs = dict(c.blocks, SEQUENTIAL=interpreting(), COMPUTE=tl_compute_dtype(dtype),
                          DOT_PRECISION=_dot_precision(dtype), **(extra or {}))
        options = {"num_warps": c.num_warps}
        if cooperative and not interpreting():
            self._check_resident(kernel, grid, args, constexprs, options, args[0].device)
            if _cooperative_launch_supported():
                options["launch_cooperative_grid"] = True
        kernel[grid](*args, **constexprs, **options)

    def _check_resident(self, kernel, grid, args, constexprs, options, device):
        """Every program of a persistent launch must be resident at once (they wait for each other):
        the compiled kernel's registers and shared memory say how many fit on a multiprocessor."""
        key = (kernel.fn.__name__, tuple(sorted((k, str(v)) for k, v in constexprs.items())), str(device))
        per_sm = self._resident.get(key)
        if per_sm is None:
            compiled = kernel.warmup(*args, grid=grid, **constexprs, **options)
            compiled._init_handles()
            dev = device_of(device)
            threads = 32 * options["num_warps"]
            by_regs = dev.registers // max(1, compiled.n_regs * threads)
            shared = compiled.metadata.shared
            by_smem = dev.shared_memory // shared if shared else by_regs
            per_sm = min(by_regs, by_smem)
            self._resident[key] = per_sm
        programs = grid[0] * grid[1]
        dev = device_of(device)
        if programs > per_sm * dev.multiprocessors:
            raise ValueError(f"the persistent kernel's {programs} programs cannot all be resident ({per_sm} "
                             f"per multiprocessor x {dev.multiprocessors}); use schedule='fused_step'")

    # ---- forward --------------------------------------------------------------------------------

    def forward(self, x, states, hoisted_w, step_w, vectors, scalars, batch_sizes=None):
        N, H = states[0].shape
        X, steps, offsets = steps_of(x, batch_sizes, N)
        T, rows, dtype, dev = len(steps), X.shape[0], x.dtype, x.device
        c = self.config(N, H, T, dtype, dev)
        sizes = self.sizes(states, vectors, hoisted_w, step_w)
        Xs, hoisted_out = self._hoisted(X, sizes, hoisted_w, vectors, scalars, steps, offsets)
        L = self.layout
        seq = [torch.empty(rows, H, dtype=dtype, device=dev) for _ in self.states]
        carry = [s.to(compute_dtype(dtype)).contiguous().clone() for s in states]
        values = {("x", n): Xs[n].contiguous() for n in L.elementwise_inputs}
        values |= {("hoisted", i): h for i, h in enumerate(hoisted_out)}
        values |= {("weight", i): w.contiguous() for i, w in enumerate(step_w)}
        values |= {("vector", i): v.contiguous() for i, v in enumerate(vectors)}
        values |= {("scalar", i): s.contiguous() for i, s in enumerate(scalars)}
        values |= {("init", i): s.contiguous() for i, s in enumerate(states)}
        values |= {("seq", i): s for i, s in enumerate(seq)}
        values |= {("carry", i): s for i, s in enumerate(carry)}
        out = torch.empty(rows, H, dtype=dtype, device=dev) if L.output_state is None else None
        values[("out", None)] = out
        gemm_seq = [torch.empty(rows, w.shape[0], dtype=dtype, device=dev) for w in step_w]
        values |= {("gemm_seq", i): g for i, g in enumerate(gemm_seq)}
        operand_seq = {n: torch.empty(rows, H, dtype=dtype, device=dev) for n in L.operands}
        values |= {("operand_seq", n): v for n, v in operand_seq.items()}
        values |= {("T", None): T, ("N", None): N, ("H", None): H}
        if self.schedule == "persistent":
            values |= {(k, None): v for k, v in steps_tensors(steps, offsets, dev).items()}
            values[("sync", None)] = torch.zeros(c.grid[0], dtype=torch.int32, device=dev)
            args = [values[(a.kind, a.key)] for a in L.forward_args(fused=False)]
            self._launch("persistent_forward_kernel", c.grid, args, c, dtype, cooperative=True)
        else:
            for t in range(T):
                values |= _step_ints(t, steps, offsets)
                args = [values[(a.kind, a.key)] for a in L.forward_args(fused=True)]
                for n in range(len(L.phases)):
                    self._launch(f"fused_step_forward_kernel_{n + 1}", c.grid, args, c, dtype)
        finals = [s.to(dtype) for s in carry]
        out = seq[L.output_state] if L.output_state is not None else out
        saved = ([s for i, s in enumerate(seq) if i != L.output_state] + gemm_seq
                 + [operand_seq[n] for n in self.operand_names] + hoisted_out)
        if batch_sizes is None:
            out = out.view(x.shape[0], x.shape[1], -1)
        return out, finals, saved

    # ---- backward -------------------------------------------------------------------------------

    def backward(self, x, states, hoisted_w, step_w, vectors, scalars, out, saved, grad_out, grad_states,
                 batch_sizes=None, needs_dx: bool = True):
        N, H = states[0].shape
        X, steps, offsets = steps_of(x, batch_sizes, N)
        T, rows, dtype, dev = len(steps), X.shape[0], x.dtype, x.device
        c = self.config(N, H, T, dtype, dev)
        L = self.layout
        sizes = self.sizes(states, vectors, hoisted_w, step_w)
        Xs = self.split_inputs(X, sizes, hoisted_w, steps, offsets)
        news, step_all, operands, hoisted_out = self._unpack_saved(saved, out, sizes)
        compute = compute_dtype(dtype)
        dcarry = torch.zeros(2, len(self.states), N, H, dtype=compute, device=dev)
        for i, g in enumerate(grad_states):
            if g is not None:
                dcarry[(T - 1) % 2, i] = g
        slices = triton.cdiv(H, c.blocks["BLOCK_H"])
        tiles = triton.cdiv(N, c.blocks["BLOCK_N"])
        zeros = lambda *shape, dt=dtype: torch.zeros(*shape, dtype=dt, device=dev)  # noqa: E731
        d_gemm = [zeros(rows, w.shape[0]) for w in step_w]
        d_hoisted = [zeros(rows, w.shape[0]) for w in hoisted_w]
        d_x = {n: zeros(rows, H) for n in L.elementwise_inputs}
        d_vec = [zeros(tiles, H, dt=compute) for _ in vectors]
        d_scal = [zeros(tiles, slices, dt=compute) for _ in scalars]
        values = {("x", n): Xs[n].contiguous() for n in L.elementwise_inputs}
        values |= {("hoisted", i): h.contiguous() for i, h in enumerate(hoisted_out)}
        values |= {("weight", i): w.contiguous() for i, w in enumerate(step_w)}
        values |= {("vector", i): v.contiguous() for i, v in enumerate(vectors)}
        values |= {("scalar", i): s.contiguous() for i, s in enumerate(scalars)}
        values |= {("init", i): s.contiguous() for i, s in enumerate(states)}
        values |= {("seq", i): s.contiguous() for i, s in enumerate(news)}
        values |= {("gemm_seq", i): g.contiguous() for i, g in enumerate(step_all)}
        values |= {("operand_seq", n): operands[n].contiguous() for n in L.operands}
        g_out = grad_out.reshape(rows, H).contiguous() if grad_out is not None else news[0]
        values |= {("grad_out", None): g_out, ("dcarry", None): dcarry}
        values |= {("d_gemm", i): d for i, d in enumerate(d_gemm)}
        values |= {("d_hoisted", i): d for i, d in enumerate(d_hoisted)}
        values |= {("d_x", n): d for n, d in d_x.items()}
        values |= {("d_vector", i): d for i, d in enumerate(d_vec)}
        values |= {("d_scalar", i): d for i, d in enumerate(d_scal)}
        values |= {("T", None): T, ("N", None): N, ("H", None): H}
        extra = {"HAS_GRAD_OUT": grad_out is not None}
        if self.schedule == "persistent":
            values |= {(k, None): v for k, v in steps_tensors(steps, offsets, dev).items()}
            values[("sync", None)] = torch.zeros(c.grid[0], dtype=torch.int32, device=dev)
            args = [values[(a.kind, a.key)] for a in L.backward_args(fused=False)]
            self._launch("persistent_backward_kernel", c.grid, args, c, dtype, extra, cooperative=True)
        else:
            n_phases = len(L.phases) + (L.phases[0].stage > 0)
            for t in reversed(range(T)):
                values |= _step_ints(t, steps, offsets)
                args = [values[(a.kind, a.key)] for a in L.backward_args(fused=True)]
                for n in range(n_phases):
                    self._launch(f"fused_step_backward_kernel_{n + 1}", c.grid, args, c, dtype, extra)
        dstates = [dcarry[1, i].to(dtype) for i in range(len(self.states))]
        d_vectors, d_scalars = step_sums(L, d_vec, d_scal, vectors, scalars, dtype)
        return finish_backward(self, x, X, Xs, states, news, operands, steps, offsets, hoisted_w, step_w,
                               vectors, scalars, d_gemm, d_hoisted, d_x, d_vectors, d_scalars, dstates,
                               needs_dx)


def step_sums(layout, d_vec, d_scal, vectors, scalars, dtype) -> tuple[list, list]:
    """The kernels' per-tile vector and scalar gradients summed, for the parameters the step reads
    (layout.step_vectors / step_scalars); the others start from zeros of their own shape, and
    finish_backward adds what the hoisted function gives them (an I-wide mu in `W @ (mu * x)`)."""
    d_vectors = [d.sum(0).to(dtype) if i in layout.step_vectors else torch.zeros_like(v)
                 for i, (d, v) in enumerate(zip(d_vec, vectors, strict=True))]
    d_scalars = [d.sum().to(dtype) if i in layout.step_scalars else torch.zeros_like(s)
                 for i, (d, s) in enumerate(zip(d_scal, scalars, strict=True))]
    return d_vectors, d_scalars


def finish_backward(loop: TorchLoop, x, X, Xs, states, news, operands, steps, offsets, hoisted_w, step_w,
                    vectors, scalars, d_gemm, d_hoisted, d_x, d_vectors, d_scalars, dstates, needs_dx):
    """What follows the reverse time loop, as the torch loop does it: the weight gradients and dx as a
    few large GEMMs over all steps, and the hoisted pointwise function's backward."""
    d_step_w = []
    for gi, g in enumerate(loop.gemms):
        slot = loop.where[g.operand.name]
        if slot.kind == "state":
            opnd = loop._previous_all(slot.index, states, news, steps, offsets)
        else:
            opnd = operands[g.operand.name]
        d_step_w.append(gemm.weight_grad(d_gemm[gi], opnd, step_w[gi]))
    dx = dict(d_x)
    d_hoisted_w, d_hoist_ops = [], {}
    hoisted_ops = loop._hoisted_operands(Xs, vectors, scalars)
    for gi, g in enumerate(loop.hoisted):
        dP = d_hoisted[gi]
        d_hoisted_w.append(gemm.weight_grad(dP, hoisted_ops[gi], hoisted_w[gi]))
        name = g.operand.name
        if needs_dx or loop.where[name].kind != "input":
            d_hoist_ops[name] = _add(d_hoist_ops.get(name), gemm.input_grad(dP, hoisted_w[gi]))
    d_vectors, d_scalars = list(d_vectors), list(d_scalars)
    sizes = loop.sizes(states, vectors, hoisted_w, step_w)
    for st in loop.hoist:  # the hoisted pointwise functions' backward, over all steps at once
        args = [loop._static(s, Xs, vectors, scalars) for s in st.slots]
        grads = [d_hoist_ops.pop(n, None) for n, _ in st.pw.outputs]
        grads = [g if g is not None else X.new_zeros(X.shape[0], sizes[loop.width_of[n]])
                 for g, (n, _) in zip(grads, st.pw.outputs, strict=True)]
        for sym, r in zip(st.pw.grad_inputs, st.backward(*args, *grads), strict=True):
            if r is None:
                continue
            slot = loop.where[sym.name]
            if slot.kind == "input":
                dx[slot.index] = _add(dx.get(slot.index), r)
            elif slot.kind == "vector":
                d_vectors[slot.index] = d_vectors[slot.index] + r.reshape(-1, r.shape[-1]).sum(0)
            elif slot.kind == "scalar":
                d_scalars[slot.index] = d_scalars[slot.index] + r.sum()
    for name, d_op in d_hoist_ops.items():
        if loop.where[name].kind == "input":
            dx[name] = _add(dx.get(name), d_op)
    dx = loop.join_input_grads(dx, X, sizes, hoisted_w, steps, offsets)
    dx = torch.zeros_like(x) if dx is None else dx.reshape(x.shape)
    return dx, dstates, d_hoisted_w, d_step_w, d_vectors, d_scalars


def _add(a, b):
    return b if a is None else a + b
