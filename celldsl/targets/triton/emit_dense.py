"""Plan -> the Triton kernels of the dense schedules: `persistent` (one launch per sequence) and
`fused_step` (one launch per GEMM stage and step, the recurrent GEMM fused with its pointwise step).

Both tile the hidden units the same way: a program owns every gate row of a slice of BLOCK_H hidden
units, so the pointwise step of its slice needs nothing from other programs, and only the GEMM
operands (the previous states, MUT's `r * h`) cross programs. One step of the cell is a sequence of
*phases*: phase k runs the stage-k GEMMs (`operand [BLOCK_N, H] @ W[rows of the slice].T`, tl.dot)
and the plan's pointwise function k (the generated `stage{k}_step`, inlined); a phase that writes
an operand the next one multiplies is followed by a grid barrier (persistent) or ends its launch
(fused_step). The backward runs the phases in reverse: pointwise backward (`stage{k}_step_grad`),
gate-gradient tiles written to [rows, G*H] buffers, and the operand gradient `d_gates @ W[:, slice]`
after a barrier; the weight gradients are large GEMMs on the host afterwards, never accumulated in
registers across steps.

`DenseLayout(plan)` decides whether the schedules apply (`DenseLayout.decline(plan)` says why not)
and fixes the kernels' argument lists (`Arg`), which the runtime (targets/triton/schedules.py) fills
in the same order. User names reach the source only through `identifier`, in a scope seeded with
every fixed name the kernels use (DENSE_LOCALS).
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from ...plan import Plan, Pointwise
from ..printers import PYTHON_RESERVED, identifier, python_text
from .applies import dense_decline
from .emit_pointwise import KERNEL_LOCALS, KNOWN_GLOBALS, RESERVED, Function, module_names

# every name the dense kernels bind that does not come from the cell (kept out of user identifiers)
DENSE_LOCALS = {
    "pid_n", "rows", "cols", "kk", "k0", "first", "last", "s", "t", "tt", "step_offset", "prev_offset",
    "rows_t", "live", "mask", "valid", "at", "prev_at", "d_new", "d_old", "slices",
    "step_offset_ptr", "prev_offset_ptr", "step_rows_ptr", "sync_ptr", "dcarry_ptr", "grad_out_ptr",
    "T", "N", "H", "BLOCK_N", "BLOCK_H", "BLOCK_K", "SEQUENTIAL", "COMPUTE", "DOT_PRECISION",
    "HAS_GRAD_OUT", "out_ptr", "operand_tile", "grad_tile",
}  # fmt: skip


def _fixed_names(plan: Plan) -> set[str]:
    """Names with an index in them (buffers and tiles of the i-th GEMM): reserved before any user name."""
    names = set()
    for gi, g in enumerate(plan.gemms):
        names |= {f"weight{gi}_ptr", f"gemm{gi}_seq_ptr", f"d_gemm{gi}_ptr"}
        names |= {f"w{gi}_{j}" for j in range(len(g.params))} | {f"wt{gi}_{j}" for j in range(len(g.params))}
    for gi, _ in enumerate(plan.hoisted):
        names |= {f"hoisted{gi}_ptr", f"d_hoisted{gi}_ptr"}
    return names


@dataclass(frozen=True)
class Arg:
    """One kernel parameter: its identifier, what the runtime passes (kind, key) and its element type
    ("storage": the layer's dtype, "compute": fp32/fp64 scratch, "int32", or "i32" for an int)."""

    name: str
    kind: str
    key: object
    dtype: str


@dataclass
class Phase:
    stage: int  # the GEMM stage (0: the pointwise before the first GEMM)
    gemms: list[int]  # indices into plan.gemms of this stage
    pointwise: Pointwise | None


def step_parameters(pws: list[Pointwise], vectors: list[str], scalars: list[str]) -> tuple[set, set]:
    """Indices of the vectors and scalars the step functions read: the kernels grade only these (H wide,
    tile_decline sees to it). A parameter read only by the hoisted function before the loop (RWKV's
    token-shift mix `W @ (mu * x + (1 - mu) * prev(x))`, mu I wide) gets its whole gradient from that
    function's backward after the loop, never from the kernels' [.., H] buffers."""
    read = {s.name for pw in pws for s in pw.inputs}
    return ({i for i, v in enumerate(vectors) if v in read}, {i for i, v in enumerate(scalars) if v in read})


def parameter_pointers(inputs: list[str], vectors: list[str], scalars: list[str], taken: set[str]) -> dict:
    """The kernel parameters of what both the dense and the column kernels read and grade: each
    elementwise input, vector and scalar and its gradient, keyed by (kind, name or index)."""
    ptr = {}
    for n in inputs:
        ptr[("x", n)] = identifier(n, taken, "_ptr")
        ptr[("d_x", n)] = identifier("d_" + n, taken, "_ptr")
    for i, v in enumerate(vectors):
        ptr[("vector", i)] = identifier(v, taken, "_ptr")
        ptr[("d_vector", i)] = identifier("d_" + v, taken, "_ptr")
    for i, v in enumerate(scalars):
        ptr[("scalar", i)] = identifier(v, taken, "_ptr")
        ptr[("d_scalar", i)] = identifier("d_" + v, taken, "_ptr")
    return ptr


class DenseLayout:
    """What the dense kernels of one plan read and write, and their names."""

    def __init__(self, plan: Plan):
        reason = self.decline(plan)
        if reason:
            raise ValueError(reason)
        self.plan = plan
        ir = plan.ir
        self.states = list(ir.states)
        self.output_state = self.states.index(ir.output) if ir.output in self.states else None
        self.vectors = [n for n, p in ir.params.items() if p.kind == "vector"]
        self.scalars = [n for n, p in ir.params.items() if p.kind == "scalar"]
        by_stage = {pw.stage: pw for pw in plan.pointwise}
        self.phases = [Phase(k, [i for i, g in enumerate(plan.gemms) if g.stage == k], by_stage.get(k))
                       for k in range(plan.num_stages + 1)]
        if self.phases[0].pointwise is None:
            self.phases = self.phases[1:]
        self.product_of = {}  # product symbol -> (gemm index, block)
        for gi, g in enumerate(plan.gemms):
            for j, p in enumerate(g.products):
                self.product_of[p] = (gi, j)
        self.hoisted_of = {}
        for gi, g in enumerate(plan.hoisted):
            for j, p in enumerate(g.products):
                self.hoisted_of[p] = (gi, j)
        self.operands = [g.operand.name for g in plan.gemms if plan.role(g.operand) == "operand"]
        self.operands = list(dict.fromkeys(self.operands))
        pws = [pw for pw in plan.pointwise]
        self.elementwise_inputs = [n for n in ir.inputs
                                   if any(s.name == n for pw in pws for s in pw.inputs)]
        self.step_vectors, self.step_scalars = step_parameters(pws, self.vectors, self.scalars)
        # the kernels' scope: reserved words, the module's names, the fixed locals, then the cell's names
        taken = set(PYTHON_RESERVED) | RESERVED | KNOWN_GLOBALS | KERNEL_LOCALS | DENSE_LOCALS
        taken |= set(module_names(plan)) | _fixed_names(plan)
        self.taken = taken
        self.value: dict[sp.Symbol, str] = {}  # a pointwise input or output -> its local in the kernels
        for pw in pws:
            for s in [*pw.inputs, *pw.grad_outputs]:
                if s not in self.value:
                    self.value[s] = identifier(s.name, taken)
        self.result: dict[str, str] = {}  # pointwise output name -> local
        for pw in pws:
            for name, _ in pw.outputs:
                if name not in self.result:
                    self.result[name] = identifier(name, taken)
        self.grad_of: dict[sp.Symbol, str] = {}  # backward result locals, per input symbol
        for pw in pws:
            for s in pw.grad_inputs:
                if s not in self.grad_of:
                    self.grad_of[s] = identifier("d_" + s.name, taken)
        self.grad_out_of: dict[str, str] = {}  # pointwise output name -> local of its gradient
        for pw in pws:
            for (name, _), g in zip(pw.outputs, pw.grad_outputs, strict=True):
                self.grad_out_of.setdefault(name, self.value[g])
        self.operand_grad = {}  # GEMM operand (a state or a computed operand) -> local of its gradient
        for g in plan.gemms:
            if g.operand.name not in self.operand_grad:
                self.operand_grad[g.operand.name] = identifier("d_" + g.operand.name + "_gemm", taken)
        # (kind, key) -> parameter name
        self.ptr = parameter_pointers(self.elementwise_inputs, self.vectors, self.scalars, taken)
        for i, s in enumerate(self.states):
            self.ptr[("init", i)] = identifier(s, taken, "_init_ptr")
            self.ptr[("seq", i)] = identifier(s, taken, "_seq_ptr")
            self.ptr[("carry", i)] = identifier(s, taken, "_carry_ptr")
        for name in self.operands:
            self.ptr[("operand_seq", name)] = identifier(name, taken, "_seq_ptr")
        for gi, _ in enumerate(plan.gemms):
            self.ptr[("weight", gi)] = f"weight{gi}_ptr"
            self.ptr[("gemm_seq", gi)] = f"gemm{gi}_seq_ptr"
            self.ptr[("d_gemm", gi)] = f"d_gemm{gi}_ptr"
        for gi, _ in enumerate(plan.hoisted):
            self.ptr[("hoisted", gi)] = f"hoisted{gi}_ptr"
            self.ptr[("d_hoisted", gi)] = f"d_hoisted{gi}_ptr"

    # ---- applicability -----------------------------------------------------------------------

    decline = staticmethod(dense_decline)  # why the dense schedules cannot run a plan (None: they can)

    # ---- argument lists ----------------------------------------------------------------------

    def _reads(self) -> list[Arg]:
        """The first arguments of the forward and the backward kernels: what both read."""
        a = [Arg(self.ptr[("x", n)], "x", n, "storage") for n in self.elementwise_inputs]
        a += [Arg(self.ptr[("hoisted", i)], "hoisted", i, "storage") for i in range(len(self.plan.hoisted))]
        a += [Arg(self.ptr[("weight", i)], "weight", i, "storage") for i in range(len(self.plan.gemms))]
        a += [Arg(self.ptr[("vector", i)], "vector", i, "storage") for i in range(len(self.vectors))]
        a += [Arg(self.ptr[("scalar", i)], "scalar", i, "storage") for i in range(len(self.scalars))]
        a += [Arg(self.ptr[("init", i)], "init", i, "storage") for i in range(len(self.states))]
        a += [Arg(self.ptr[("seq", i)], "seq", i, "storage") for i in range(len(self.states))]
        return a

    def forward_args(self, fused: bool) -> list[Arg]:
        a = self._reads()
        a += [Arg(self.ptr[("carry", i)], "carry", i, "compute") for i in range(len(self.states))]
        if self.output_state is None:
            a.append(Arg("out_ptr", "out", None, "storage"))
        a += [Arg(self.ptr[("gemm_seq", i)], "gemm_seq", i, "storage") for i in range(len(self.plan.gemms))]
        a += [Arg(self.ptr[("operand_seq", n)], "operand_seq", n, "storage") for n in self.operands]
        a += self._steps(fused)
        return a

    def backward_args(self, fused: bool) -> list[Arg]:
        a = self._reads()
        a += [Arg(self.ptr[("gemm_seq", i)], "gemm_seq", i, "storage") for i in range(len(self.plan.gemms))]
        a += [Arg(self.ptr[("operand_seq", n)], "operand_seq", n, "storage") for n in self.operands]
        a += [Arg("grad_out_ptr", "grad_out", None, "storage"), Arg("dcarry_ptr", "dcarry", None, "compute")]
        a += [Arg(self.ptr[("d_gemm", i)], "d_gemm", i, "storage") for i in range(len(self.plan.gemms))]
        a += [Arg(self.ptr[("d_hoisted", i)], "d_hoisted", i, "storage")
              for i in range(len(self.plan.hoisted))]
        a += [Arg(self.ptr[("d_x", n)], "d_x", n, "storage") for n in self.elementwise_inputs]
        a += [Arg(self.ptr[("d_vector", i)], "d_vector", i, "compute") for i in range(len(self.vectors))]
        a += [Arg(self.ptr[("d_scalar", i)], "d_scalar", i, "compute") for i in range(len(self.scalars))]
        a += self._steps(fused)
        return a

    def _steps(self, fused: bool) -> list[Arg]:
        """Where step t's rows are: arrays over all steps for the persistent kernels, the numbers of
        step t for a fused-step launch (plain ints: no host-to-device copy in a captured graph)."""
        if fused:
            a = [Arg("step_offset", "step_offset_now", None, "i32"),
                 Arg("prev_offset", "prev_offset_now", None, "i32"), Arg("rows_t", "rows_now", None, "i32")]
        else:
            a = [Arg("step_offset_ptr", "step_offset", None, "int32"),
                 Arg("prev_offset_ptr", "prev_offset", None, "int32"),
                 Arg("step_rows_ptr", "step_rows", None, "int32"), Arg("sync_ptr", "sync", None, "int32")]
        a += [Arg("T", "T", None, "i32"), Arg("N", "N", None, "i32"), Arg("H", "H", None, "i32")]
        if fused:
            a.append(Arg("t", "t", None, "i32"))
        return a

    def gemm_rows(self, gi: int) -> int:
        return len(self.plan.gemms[gi].params)

    def hoisted_rows(self, gi: int) -> int:
        return len(self.plan.hoisted[gi].params)


# ---- emission ----------------------------------------------------------------------------------


class Code:
    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, depth: int, text: str = "") -> None:
        self.lines.append(("    " * depth + text) if text else "")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


CONSTEXPRS = ("BLOCK_N", "BLOCK_H", "BLOCK_K", "SEQUENTIAL", "COMPUTE", "DOT_PRECISION")


def signature(
    code: Code, name: str, args: list[Arg], extra: tuple[str, ...], specialize_t: bool = True
) -> None:
    """A kernel's decorator and parameters. A fused-step launch gets step t's rows as ints that
    change every launch (specialize_t=False: not specialised on, or each step would compile)."""
    ints = '["step_offset", "prev_offset", "rows_t", "t"]'
    code(0, f"@triton.jit(do_not_specialize={ints})" if not specialize_t else "@triton.jit")
    code(0, f"def {name}(")
    for a in args:
        code(1, f"{a.name},")
    for c in extra:
        code(1, f"{c}: tl.constexpr,")
    code(0, "):")


def _step_header(code: Code, depth: int, fused: bool = False) -> None:
    if not fused:  # a fused-step launch gets these three as arguments
        code(depth, "step_offset = tl.load(step_offset_ptr + t)  # first row of step t in the sequences")
        code(depth, "prev_offset = tl.load(prev_offset_ptr + t)  # first row of step t - 1 (unread at t = 0)")
        code(depth, "rows_t = tl.load(step_rows_ptr + t)  # sequences still running at step t (packed input)")
    code(depth, "live = rows < rows_t")
    code(depth, "at = (step_offset + rows).to(tl.int64)")
    code(depth, "prev_at = (prev_offset + rows).to(tl.int64)")


class _Emitter:
    """The phase bodies, shared by the persistent and fused-step kernels (`streamed` GEMMs loop over
    BLOCK_K columns of the operand and load the weights as they go; resident ones use the tiles the
    persistent kernel loaded before its time loop)."""

    def __init__(self, layout: DenseLayout):
        self.L = layout
        self.plan = layout.plan

    # -- the operand of a stage GEMM, [BLOCK_N, BLOCK_K] at columns kk
    def _operand(self, gi: int, kk: str = "kk") -> str:
        g, L = self.plan.gemms[gi], self.L
        if self.plan.role(g.operand) == "state":
            i = L.states.index(g.operand.name)
            return (f"lib.load_previous({L.ptr[('init', i)]}, {L.ptr[('seq', i)]}, rows, prev_at, t, {kk}, "
                    "live, H)")
        ptr = L.ptr[("operand_seq", g.operand.name)]
        return f"lib.load_exchanged({ptr}, at, H, {kk}, live[:, None] & ({kk} < H)[None, :])"

    def gemms(self, code: Code, depth: int, phase: Phase, streamed: bool) -> None:
        """The stage's products for this slice, [BLOCK_N, BLOCK_H] each, in COMPUTE."""
        L = self.L
        if not phase.gemms:
            return
        dot = "lib.dot({}, {}, COMPUTE, DOT_PRECISION)"
        if not streamed:
            for gi in phase.gemms:
                g = self.plan.gemms[gi]
                code(depth, f"operand_tile = {self._operand(gi)}  # [BLOCK_N, BLOCK_K]: every H column")
                for j, p in enumerate(g.products):
                    code(depth, f"{L.value[p]} = {dot.format('operand_tile', f'w{gi}_{j}')}")
            return
        for gi in phase.gemms:
            for p in self.plan.gemms[gi].products:
                code(depth, f"{L.value[p]} = tl.full((BLOCK_N, BLOCK_H), 0.0, COMPUTE)")
        code(depth, "for k0 in range(0, H, BLOCK_K):  # BLOCK_K columns of the operand at a time")
        code(depth + 1, "kk = k0 + tl.arange(0, BLOCK_K)")
        for gi in phase.gemms:
            g = self.plan.gemms[gi]
            code(depth + 1, f"operand_tile = {self._operand(gi)}")
            for j, p in enumerate(g.products):
                w = f"lib.weight_tile({L.ptr[('weight', gi)]}, {j}, cols, kk, H)"
                code(depth + 1, f"{L.value[p]} += {dot.format('operand_tile', w)}")

    # -- loads of a pointwise function's inputs for this slice
    def load_input(self, code: Code, depth: int, s: sp.Symbol, phase_stage: int, backward: bool) -> None:
        L, role = self.L, self.plan.role(s)
        v = L.value[s]
        if role == "product":
            gi, j = L.product_of[s]
            if self.plan.gemms[gi].stage == phase_stage and not backward:
                return  # this phase's dot result
            ptr, width = L.ptr[("gemm_seq", gi)], f"{L.gemm_rows(gi)} * H"
            code(depth, f"{v} = lib.load_block({ptr}, at, {width}, {j} * H + cols, mask).to(COMPUTE)")
        elif role == "hoisted":
            gi, j = L.hoisted_of[s]
            ptr, width = L.ptr[("hoisted", gi)], f"{L.hoisted_rows(gi)} * H"
            code(depth, f"{v} = lib.load_block({ptr}, at, {width}, {j} * H + cols, mask).to(COMPUTE)")
        elif role == "state":
            i = L.states.index(s.name)
            if backward:  # the state step t read, as the forward's carry held it
                init, seq = L.ptr[("init", i)], L.ptr[("seq", i)]
                load = f"lib.load_previous({init}, {seq}, rows, prev_at, t, cols, live, H)"
                code(depth, f"{v} = {load}.to(COMPUTE)")
            else:
                code(depth, f"{v} = lib.load_block({L.ptr[('carry', i)]}, rows, H, cols, mask)")
        elif role == "vector":
            i = L.vectors.index(s.name)
            code(depth, f"{v} = lib.load_vector({L.ptr[('vector', i)]}, cols, H).to(COMPUTE)")
        elif role == "scalar":
            i = L.scalars.index(s.name)
            code(depth, f"{v} = tl.load({L.ptr[('scalar', i)]}).to(COMPUTE)")
        elif role == "input":
            code(depth, f"{v} = lib.load_block({L.ptr[('x', s.name)]}, at, H, cols, mask).to(COMPUTE)")
        elif role == "operand":
            ptr = L.ptr[("operand_seq", s.name)]
            code(depth, f"{v} = lib.load_block({ptr}, at, H, cols, mask).to(COMPUTE)")

    # -- forward pointwise: loads, the step function, stores
    def forward_pointwise(self, code: Code, depth: int, phase: Phase) -> None:
        L, pw = self.L, phase.pointwise
        for gi in phase.gemms:  # the saved GEMM outputs (the backward's inputs)
            for j, p in enumerate(self.plan.gemms[gi].products):
                ptr, width = L.ptr[("gemm_seq", gi)], f"{L.gemm_rows(gi)} * H"
                code(depth, f"lib.store_block({ptr}, at, {width}, {j} * H + cols, {L.value[p]}, mask)")
        if pw is None:
            return
        for s in pw.inputs:
            self.load_input(code, depth, s, phase.stage, backward=False)
        f = Function(f"stage{pw.stage}", pw, self.plan, backward=False)
        outs = [L.result[pw.outputs[i][0]] for i in f.unique]
        call = ", ".join(L.value[s] for s in pw.inputs)
        code(depth, f"({', '.join(outs)},) = stage{pw.stage}_step({call})")
        for i, (name, _) in enumerate(pw.outputs):
            value = L.result[pw.outputs[f.unique[f.slot_of[i]]][0]]
            if name.endswith("'") and name[:-1] in L.states:
                si = L.states.index(name[:-1])
                code(depth, f"lib.store_block({L.ptr[('seq', si)]}, at, H, cols, {value}, mask)")
                code(depth, f"lib.store_block({L.ptr[('carry', si)]}, rows, H, cols, {value}, mask)")
            elif name in L.operands:
                code(depth, f"lib.store_block({L.ptr[('operand_seq', name)]}, at, H, cols, {value}, mask)")
            else:  # the output, when it is not a state
                code(depth, f"lib.store_block(out_ptr, at, H, cols, {value}, mask)")

    # -- backward: operand gradient of stage k+1 GEMMs, then pointwise k backward
    def backward_phase(self, code: Code, depth: int, phase: Phase, later: Phase | None, streamed: bool,
                       init: set) -> None:
        L, plan = self.L, self.plan
        d_operand: dict[str, str] = {}  # operand or state name -> local holding its GEMM gradient
        if later is not None and later.gemms:
            dot = "lib.dot({}, {}, COMPUTE, DOT_PRECISION)"
            for gi in later.gemms:
                name = plan.gemms[gi].operand.name
                first = name not in d_operand
                local = d_operand.setdefault(name, L.operand_grad[name])
                if streamed:
                    if first:
                        code(depth, f"{local} = tl.full((BLOCK_N, BLOCK_H), 0.0, COMPUTE)")
                    code(depth, "for k0 in range(0, H, BLOCK_K):  # BLOCK_K gate columns at a time")
                    code(depth + 1, "kk = k0 + tl.arange(0, BLOCK_K)")
                for j in range(L.gemm_rows(gi)):
                    tile = (f"lib.load_exchanged({L.ptr[('d_gemm', gi)]}, at, {L.gemm_rows(gi)} * H, "
                            f"{j} * H + kk, live[:, None] & (kk < H)[None, :])")
                    if streamed:
                        w = f"lib.weight_tile_t({L.ptr[('weight', gi)]}, {j}, cols, kk, H)"
                        code(depth + 1, f"{local} += {dot.format(tile, w)}")
                        continue
                    term = dot.format("grad_tile", f"wt{gi}_{j}")
                    code(depth, f"grad_tile = {tile}  # [BLOCK_N, BLOCK_K]: gate block {j}, every H column")
                    code(depth, f"{local} = {term}" if first and j == 0 else f"{local} += {term}")
            for name, local in d_operand.items():
                if name in L.states:
                    self._state_grad(code, depth, L.states.index(name), local, init)
        pw = phase.pointwise
        if pw is None:
            return
        for s in pw.inputs:
            self.load_input(code, depth, s, phase.stage, backward=True)
        for (name, _), g in zip(pw.outputs, pw.grad_outputs, strict=True):
            local = L.value[g]
            if name.endswith("'") and name[:-1] in L.states:
                si = L.states.index(name[:-1])
                code(depth, f"{local} = lib.load_block(d_new + {si} * N * H, rows, H, cols, mask)")
                if si == L.output_state:
                    code(depth, "if HAS_GRAD_OUT:")
                    code(depth + 1, f"{local} += lib.load_block(grad_out_ptr, at, H, cols, mask).to(COMPUTE)")
            elif name in L.operands:
                code(depth, f"{local} = {d_operand[name]}")
            else:  # the output, when it is not a state
                code(depth, "if HAS_GRAD_OUT:")
                code(depth + 1, f"{local} = lib.load_block(grad_out_ptr, at, H, cols, mask).to(COMPUTE)")
                code(depth, "else:")
                code(depth + 1, f"{local} = tl.full((BLOCK_N, BLOCK_H), 0.0, COMPUTE)")
        f = Function(f"stage{pw.stage}", pw, plan, backward=True)
        if not f.unique:
            return
        uniq = [L.grad_of[pw.grad_inputs[i]] for i in f.unique]
        call = ", ".join(L.value[s] for s in [*pw.inputs, *pw.grad_outputs])
        code(depth, f"({', '.join(uniq)},) = stage{pw.stage}_step_grad({call})")
        for i, s in enumerate(pw.grad_inputs):
            if i not in f.slot_of:
                continue  # identically zero
            value = uniq[f.slot_of[i]]
            role = plan.role(s)
            if role == "product":
                gi, j = L.product_of[s]
                self._add(code, depth, ("d_gemm", gi, j), L.ptr[("d_gemm", gi)], f"{L.gemm_rows(gi)} * H",
                          f"{j} * H + cols", value, init)
            elif role == "hoisted":
                gi, j = L.hoisted_of[s]
                self._add(code, depth, ("d_hoisted", gi, j), L.ptr[("d_hoisted", gi)],
                          f"{L.hoisted_rows(gi)} * H", f"{j} * H + cols", value, init)
            elif role == "input":
                self._add(code, depth, ("d_x", s.name), L.ptr[("d_x", s.name)], "H", "cols", value, init)
            elif role == "state":
                self._state_grad(code, depth, L.states.index(s.name), value, init)
            elif role == "vector":
                ptr = L.ptr[("d_vector", L.vectors.index(s.name))]
                code(depth, f"lib.add_vector({ptr} + pid_n * H, cols, {value}, mask, H)")
            elif role == "scalar":
                ptr = L.ptr[("d_scalar", L.scalars.index(s.name))]
                code(depth, f"lib.add_scalar({ptr} + pid_n * slices + s, {value}, mask)")

    @staticmethod
    def _add(code, depth, key, ptr, width, cols, value, init: set) -> None:
        """The first contribution to a gradient tile stores it, later ones (other stages) add to it."""
        if key in init:
            code(depth, f"lib.add_block({ptr}, at, {width}, {cols}, {value}, mask)")
        else:
            init.add(key)
            code(depth, f"lib.store_block({ptr}, at, {width}, {cols}, {value}, mask)")

    def _state_grad(self, code, depth, si: int, value: str, init: set) -> None:
        """Gradient of the state step t read: rows that did not run at step t pass theirs through."""
        if ("d_old", si) in init:
            code(depth, f"lib.add_block(d_old + {si} * N * H, rows, H, cols, {value}, mask)")
            return
        init.add(("d_old", si))
        code(depth, f"lib.store_block(d_old + {si} * N * H, rows, H, cols, tl.where(mask, {value}, "
                    f"lib.load_block(d_new + {si} * N * H, rows, H, cols, valid)), valid)")

    def pass_through(self, code, depth, init: set) -> None:
        """States no phase gave a gradient to (never read): zero for the rows that ran, else passed on."""
        for si in range(len(self.L.states)):
            if ("d_old", si) not in init:
                init.add(("d_old", si))
                code(depth, f"lib.store_block(d_old + {si} * N * H, rows, H, cols, tl.where(mask, 0.0, "
                            f"lib.load_block(d_new + {si} * N * H, rows, H, cols, valid)), valid)")


def _slice_header(code: Code, depth: int, with_valid: bool = False) -> None:
    code(depth, "cols = s * BLOCK_H + tl.arange(0, BLOCK_H)  # this slice's hidden units")
    code(depth, "mask = live[:, None] & (cols < H)[None, :]")
    if with_valid:
        code(depth, "valid = (rows < N)[:, None] & (cols < H)[None, :]")


def _weights(code: Code, depth: int, L: DenseLayout, backward: bool) -> None:
    fn = "weight_tile_t" if backward else "weight_tile"
    prefix = "wt" if backward else "w"
    for gi in range(len(L.plan.gemms)):
        for j in range(L.gemm_rows(gi)):
            code(depth, f"{prefix}{gi}_{j} = lib.{fn}({L.ptr[('weight', gi)]}, {j}, cols, kk, H)")


def persistent_forward(L: DenseLayout) -> str:
    code, em = Code(), _Emitter(L)
    name = "persistent_forward_kernel"
    signature(code, name, L.forward_args(fused=False), CONSTEXPRS)
    phases = L.phases
    code(1, "# Program (batch tile pid_n, hidden slice): every gate row of BLOCK_H hidden units. On the GPU")
    code(1, "# each program owns one slice and keeps its weight tiles on chip for all T steps; SEQUENTIAL")
    code(1, "# (the interpreter) runs one program per batch tile doing every slice in turn, phase by phase.")
    code(1, "pid_n = tl.program_id(0)")
    code(1, "rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # batch rows")
    code(1, "kk = tl.arange(0, BLOCK_K)  # the contraction: every column of a GEMM operand (H, padded)")
    code(1, "if SEQUENTIAL:")
    code(2, "first, last = 0, (H + BLOCK_H - 1) // BLOCK_H")
    code(1, "else:")
    code(2, "first, last = tl.program_id(1), tl.program_id(1) + 1")
    code(1, "cols = first * BLOCK_H + tl.arange(0, BLOCK_H)")
    if L.plan.gemms:
        code(1, "# this slice's rows of every step weight, [BLOCK_K, BLOCK_H] per gate block, loaded once")
        _weights(code, 1, L, backward=False)
    code(1, "for t in range(T):")
    _step_header(code, 2)
    for n, phase in enumerate(phases):
        what = f"stage-{phase.stage} GEMMs, then " if phase.gemms else ""
        code(2, f"# ---- phase {n + 1} of {len(phases)}: {what}pointwise {phase.stage}")
        code(2, "for s in range(first, last):")
        _slice_header(code, 3)
        if phase.gemms:
            code(3, "if SEQUENTIAL:  # the interpreter: this slice's weights (the GPU loaded its own once)")
            for gi in phase.gemms:
                for j in range(L.gemm_rows(gi)):
                    code(4, f"w{gi}_{j} = lib.weight_tile({L.ptr[('weight', gi)]}, {j}, cols, kk, H)")
        em.gemms(code, 3, phase, streamed=False)
        em.forward_pointwise(code, 3, phase)
        code(2, f"lib.grid_barrier(sync_ptr + pid_n, (t * {len(phases)} + {n + 1}) * tl.num_programs(1), "
                "SEQUENTIAL)")
    return code.text()


def fused_step_forward(L: DenseLayout, n: int) -> str:
    code, em = Code(), _Emitter(L)
    phase = L.phases[n]
    signature(code, f"fused_step_forward_kernel_{n + 1}", L.forward_args(fused=True), CONSTEXPRS,
               specialize_t=False)
    code(1, f"# phase {n + 1} of {len(L.phases)} of step t; program (batch tile, slice of BLOCK_H units)")
    code(1, "pid_n, s = tl.program_id(0), tl.program_id(1)")
    code(1, "rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)")
    _step_header(code, 1, fused=True)
    _slice_header(code, 1)
    em.gemms(code, 1, phase, streamed=True)
    em.forward_pointwise(code, 1, phase)
    return code.text()


def backward_order(L: DenseLayout) -> list[tuple[Phase, Phase | None]]:
    """(phase, the phase after it) from the last phase to the first: phase k's backward starts with the
    operand gradient of the next phase's GEMMs."""
    phases = L.phases
    order = [(phases[i], phases[i + 1] if i + 1 < len(phases) else None)
             for i in reversed(range(len(phases)))]
    if phases[0].gemms:  # no pointwise 0: the stage-1 operand gradient still needs a phase of its own
        order.append((Phase(0, [], None), phases[0]))
    return order


def persistent_backward(L: DenseLayout) -> str:
    code, em = Code(), _Emitter(L)
    name = "persistent_backward_kernel"
    signature(code, name, L.backward_args(fused=False), (*CONSTEXPRS, "HAS_GRAD_OUT"))
    order = backward_order(L)
    barriers = [n for n, (phase, _) in enumerate(order) if phase.gemms]
    code(1, "# the forward's tiling, in reverse time; dcarry [2, states, N, H] holds the gradient of the")
    code(1, "# new states (d_new) and collects the gradient of the states step t read (d_old)")
    code(1, "pid_n = tl.program_id(0)")
    code(1, "rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)")
    code(1, "kk = tl.arange(0, BLOCK_K)")
    code(1, "slices = (H + BLOCK_H - 1) // BLOCK_H")
    code(1, "if SEQUENTIAL:")
    code(2, "first, last = 0, slices")
    code(1, "else:")
    code(2, "first, last = tl.program_id(1), tl.program_id(1) + 1")
    code(1, "cols = first * BLOCK_H + tl.arange(0, BLOCK_H)")
    if L.plan.gemms:
        code(1, "# this slice's columns of every step weight, [BLOCK_K, BLOCK_H] per gate block, loaded once")
        _weights(code, 1, L, backward=True)
    code(1, "for tt in range(T):")
    code(2, "t = T - 1 - tt")
    _step_header(code, 2)
    code(2, f"d_new = dcarry_ptr + (t % 2) * {len(L.states)} * N * H")
    code(2, f"d_old = dcarry_ptr + ((t + 1) % 2) * {len(L.states)} * N * H")
    init: set = set()
    for n, (phase, later) in enumerate(order):
        words = []
        if later is not None and later.gemms:
            words.append(f"operand gradients of the stage-{later.stage} GEMMs")
        if phase.pointwise is not None:
            words.append(f"pointwise {phase.stage} backward")
        code(2, f"# ---- phase {n + 1} of {len(order)}: {', then '.join(words)}")
        code(2, "for s in range(first, last):")
        _slice_header(code, 3, with_valid=True)
        if later is not None and later.gemms:
            code(3, "if SEQUENTIAL:")
            for gi in later.gemms:
                for j in range(L.gemm_rows(gi)):
                    code(4, f"wt{gi}_{j} = lib.weight_tile_t({L.ptr[('weight', gi)]}, {j}, cols, kk, H)")
        em.backward_phase(code, 3, phase, later, streamed=False, init=init)
        if n == len(order) - 1:
            em.pass_through(code, 3, init)
        if n in barriers:
            b = barriers.index(n) + 1
            code(2, f"lib.grid_barrier(sync_ptr + pid_n, (tt * {len(barriers)} + {b}) * tl.num_programs(1), "
                    "SEQUENTIAL)")
    return code.text()


def fused_step_backward(L: DenseLayout, n: int) -> str:
    code, em = Code(), _Emitter(L)
    order = backward_order(L)
    phase, later = order[n]
    signature(code, f"fused_step_backward_kernel_{n + 1}", L.backward_args(fused=True),
               (*CONSTEXPRS, "HAS_GRAD_OUT"), specialize_t=False)
    code(1, f"# backward phase {n + 1} of {len(order)} of step t")
    code(1, "pid_n, s = tl.program_id(0), tl.program_id(1)")
    code(1, "rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)")
    code(1, "slices = tl.num_programs(1)")
    _step_header(code, 1, fused=True)
    code(1, f"d_new = dcarry_ptr + (t % 2) * {len(L.states)} * N * H")
    code(1, f"d_old = dcarry_ptr + ((t + 1) % 2) * {len(L.states)} * N * H")
    _slice_header(code, 1, with_valid=True)
    init: set = set()
    for m in range(n):  # what earlier phases of the step already wrote (stores there, adds here)
        _mark_written(L, order[m], init)
    em.backward_phase(code, 1, phase, later, streamed=True, init=init)
    if n == len(order) - 1:
        em.pass_through(code, 1, init)
    return code.text()


def _mark_written(L: DenseLayout, step: tuple[Phase, Phase | None], init: set) -> None:
    """The gradient tiles a backward phase writes first (so later phases add to them)."""
    sink = Code()
    _Emitter(L).backward_phase(sink, 0, step[0], step[1], streamed=True, init=init)


def dense_source(plan: Plan) -> str:
    """The dense schedules' section of a generated module ("" when they do not apply)."""
    if dense_decline(plan):
        return ""
    L = DenseLayout(plan)
    parts = [f"# ---- dense schedules: persistent and fused_step {'-' * 58}", DENSE_DOC.strip("\n") + "\n",
             persistent_forward(L), persistent_backward(L)]
    parts += [fused_step_forward(L, n) for n in range(len(L.phases))]
    parts += [fused_step_backward(L, n) for n in range(len(backward_order(L)))]
    return "\n\n".join(p.strip("\n") + "\n" for p in parts)


DENSE_DOC = '''
# The step of this cell as phases: each runs a stage's GEMMs (tl.dot of every H column of the operand
# with this program's rows of the weights) and the stage's pointwise step, for a [BLOCK_N, BLOCK_H]
# tile of (batch rows, hidden units); a grid barrier (persistent) or the end of the launch (fused_step)
# separates phases, because the next GEMM multiplies what every program wrote. Sequences are flat:
# step t owns rows step_offset[t] .. + step_rows[t] of every [rows, .] tensor (packed input: fewer).
'''


def describe_phases(plan: Plan) -> list[str]:
    """One line per forward phase, for `celldsl explain`."""
    L = DenseLayout(plan)
    lines = []
    for n, phase in enumerate(L.phases):
        gemms = ", ".join(f"[{'; '.join(plan.gemms[g].params)}] @ {python_text(plan.gemms[g].operand.name)}"
                          for g in phase.gemms)
        what = f"GEMMs {gemms}, then " if gemms else ""
        lines.append(f"phase {n + 1}: {what}pointwise {phase.stage}")
    return lines
